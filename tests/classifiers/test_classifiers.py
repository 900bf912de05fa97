import lightning.pytorch as L
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from synaug.classifiers import FeatureClassifier, ImageClassifier
from synaug.data import ClassificationData
from synaug.models import WeightsUnavailableError


def _trainer(**kw):
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **({"enable_checkpointing": False} | kw),
    )


@pytest.fixture
def breast(breast_npz):
    dm = ClassificationData(str(breast_npz), image_size=28, channels=1, batch_size=64)
    dm.setup()
    return dm


def _train_loss(model, dm):
    x = dm.images[dm.train_rows].float() / 255
    y = torch.as_tensor(dm.table["label"].to_numpy()[dm.train_rows])
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def test_two_epochs_on_breastmnist_lower_the_training_loss(breast):
    L.seed_everything(0)
    model = ImageClassifier(
        "basic_cnn", num_classes=2, in_chans=1, image_size=28, class_names=breast.class_names
    )
    before = _train_loss(model.eval(), breast)
    _trainer(max_epochs=2).fit(model, datamodule=breast)
    assert _train_loss(model.eval(), breast) < before - 0.05


@pytest.mark.parametrize("head", ["ffnn", "svc", "logreg"])
def test_feature_heads_fit_test_and_survive_a_checkpoint(head, breast, tmp_path):
    L.seed_everything(0)
    model = FeatureClassifier(
        head,
        backbone="basic_cnn",
        pretrained=False,
        num_classes=2,
        in_chans=1,
        image_size=28,
        class_names=breast.class_names,
    )
    trainer = _trainer(max_epochs=3 if head == "ffnn" else 1)
    trainer.fit(model, datamodule=breast)
    first = trainer.test(model, datamodule=breast, verbose=False)[0]
    assert {"test/acc", "test/f1_macro", "test/cross_entropy", "test/recall/malignant"} <= set(first)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    fresh = FeatureClassifier(
        head,
        backbone="basic_cnn",
        pretrained=False,
        num_classes=2,
        in_chans=1,
        image_size=28,
        class_names=breast.class_names,
    )
    again = _trainer().test(fresh, datamodule=breast, ckpt_path=str(ckpt), weights_only=True, verbose=False)[
        0
    ]
    assert again == pytest.approx(first, abs=1e-6)
    if head != "ffnn":  # a fitted scikit-learn head beats the majority class on its own training data
        rows = breast.train_rows
        pred = fresh.estimator.predict(fresh.features[rows].numpy())
        labels = breast.table["label"].to_numpy()[rows]
        assert (pred == labels).mean() > max(np.bincount(labels)) / len(labels)


def test_features_are_cached_on_disk(breast, monkeypatch):
    calls = []
    model = FeatureClassifier(
        "ffnn", backbone="basic_cnn", pretrained=False, num_classes=2, in_chans=1, image_size=28
    )
    original = FeatureClassifier._extract
    monkeypatch.setattr(
        FeatureClassifier,
        "_extract",
        lambda self, dm, rows: calls.append(len(rows)) or original(self, dm, rows),
    )
    trainer = _trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(model, datamodule=breast)
    n = len(calls)
    other = FeatureClassifier(
        "logreg", backbone="basic_cnn", pretrained=False, num_classes=2, in_chans=1, image_size=28
    )
    _trainer(max_epochs=1, limit_val_batches=1).fit(other, datamodule=breast)
    assert len(calls) == n  # same images, backbone and weights: no second extraction
    assert torch.equal(model.features, other.features)


def test_feature_classifier_refuses_augmentation(breast_npz):
    dm = ClassificationData(str(breast_npz), image_size=28, policy="hflip")
    model = FeatureClassifier(
        "svc", backbone="basic_cnn", pretrained=False, num_classes=2, in_chans=1, image_size=28
    )
    with pytest.raises(ValueError, match="data.policy is 'hflip'"):
        _trainer(max_epochs=1).fit(model, datamodule=dm)


def test_pretrained_without_weights_names_the_model_and_the_fix():
    with pytest.raises(WeightsUnavailableError, match=r"'resnet18'.*timm/resnet18.*checkpoint_path"):
        ImageClassifier("resnet18", num_classes=4, in_chans=1, pretrained=True)
    with pytest.raises(WeightsUnavailableError, match="not found: /nowhere/r18.safetensors"):
        ImageClassifier("resnet18", num_classes=4, checkpoint_path="/nowhere/r18.safetensors")


def test_local_checkpoint_loads_and_adapts_to_grey(tmp_path):
    ref = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    save_file(ref.state_dict(), tmp_path / "r18.safetensors")
    model = ImageClassifier(
        "resnet18", num_classes=4, in_chans=1, checkpoint_path=str(tmp_path / "r18.safetensors")
    )
    # pretrained RGB weights keep their stem: grey images are repeated to it, normalised per channel
    assert torch.equal(model.net.conv1.weight, ref.conv1.weight)
    assert torch.equal(model.net.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    assert model.net.fc.out_features == 4
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 4)
    assert model.mean.shape == (1, 3, 1, 1)
