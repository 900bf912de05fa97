import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from synaug.metrics import DARK, ClassificationMetrics


def test_metrics_equal_scikit_learn_on_fixed_predictions():
    rng = np.random.default_rng(0)
    k, n = 4, 300
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]  # informative but imperfect
    probs = torch.tensor(logits).softmax(-1).float()
    m = ClassificationMetrics(k, ["g", "m", "n", "p"])
    for part in torch.arange(n).split(64):  # accumulated over batches, as in an epoch
        m.update(probs[part], torch.tensor(y)[part])
    out = m.compute("test")
    pred = probs.argmax(-1).numpy()
    p = probs.double().numpy()
    assert np.isclose(out["test/acc"], skm.accuracy_score(y, pred), atol=1e-6)
    assert np.isclose(out["test/f1_macro"], skm.f1_score(y, pred, average="macro"), atol=1e-6)
    assert np.isclose(out["test/precision_macro"], skm.precision_score(y, pred, average="macro"), atol=1e-6)
    assert np.isclose(out["test/recall_macro"], skm.recall_score(y, pred, average="macro"), atol=1e-6)
    assert np.isclose(
        out["test/auroc"], skm.roc_auc_score(y, p, multi_class="ovr", average="macro"), atol=1e-4
    )
    assert np.isclose(out["test/cross_entropy"], skm.log_loss(y, p), atol=1e-5)
    per_class = skm.recall_score(y, pred, average=None)
    assert np.allclose([out[f"test/recall/{c}"] for c in "gmnp"], per_class, atol=1e-6)
    assert np.allclose([out[f"test/f1/{c}"] for c in "gmnp"], skm.f1_score(y, pred, average=None), atol=1e-6)
    assert (m.confmat.compute().numpy() == skm.confusion_matrix(y, pred)).all()


def test_a_class_absent_from_the_split_is_nan_and_left_out_of_macro_averages():
    # main scored the absent class recall 0 and F1 0 while macro-F1 read 1.0, and averaged a 0 into macro AUROC
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)  # classes 0 and 1 only; class 2 has no test image
    logits = rng.normal(size=(200, 3)) + 1.0 * np.eye(3)[y]
    probs = torch.tensor(logits).softmax(-1).float()
    m = ClassificationMetrics(3, ["a", "b", "c"])
    m.update(probs, torch.tensor(y))
    with pytest.warns(UserWarning, match=r"\['c'\] have no test images"):
        out = m.compute("test")
    assert np.isnan(out["test/recall/c"]) and np.isnan(out["test/f1/c"])
    pred = probs.argmax(-1).numpy()
    assert np.isclose(
        out["test/f1_macro"], np.mean(skm.f1_score(y, pred, labels=[0, 1], average=None)), atol=1e-6
    )
    assert np.isclose(
        out["test/recall_macro"], skm.recall_score(y, pred, labels=[0, 1], average="macro"), atol=1e-6
    )
    one_vs_rest = [skm.roc_auc_score(y == c, probs[:, c].numpy()) for c in (0, 1)]
    assert np.isclose(out["test/auroc"], np.mean(one_vs_rest), atol=1e-4)


def test_the_confusion_image_shades_each_cell_by_its_share_of_the_row():
    m = ClassificationMetrics(2, ["benign", "malignant"])
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    pred = torch.tensor([0, 0, 0, 1, 1, 1])  # benign row: 75% / 25%; malignant row: 0% / 100%
    m.update(torch.nn.functional.one_hot(pred, 2).float(), y)
    image = m.confusion_image("test")
    pixels = {c: n for n, c in image.getcolors(image.width * image.height)}  # colour -> how many pixels

    def shade(share):
        return tuple(round(255 + share * (c - 255)) for c in DARK)

    cell = 72 * 72 // 2  # at least half a cell's area, whatever its text covers
    assert all(pixels.get(shade(share), 0) > cell for share in (1.0, 0.75, 0.25))
    assert pixels.get(shade(0.5), 0) < cell  # no cell has half of its row (its colour is only in text edges)
    wider = ClassificationMetrics(4, ["a", "b", "c", "d"])
    wider.update(torch.eye(4), torch.arange(4))
    assert wider.confusion_image().width > image.width  # a column per class
