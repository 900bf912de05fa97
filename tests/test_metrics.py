import numpy as np
import torch
from sklearn import metrics as skm

from synaug.metrics import ClassificationMetrics


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
