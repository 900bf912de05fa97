import pickle

import lightning.pytorch as L
import numpy as np
import pytest
import torch

from synaug.classifiers import FeatureClassifier
from synaug.classifiers.frozen import sklearn_from_state, sklearn_state
from synaug.data import ClassificationData


def _trainer(**kw):
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **({"enable_checkpointing": False} | kw),
    )


def _data(breast_npz, **kw):
    dm = ClassificationData(str(breast_npz), image_size=28, channels=1, batch_size=64, **kw)
    dm.setup()
    return dm


def _head(head, seed=None, **kw):
    return FeatureClassifier(
        head,
        backbone="basic_cnn",
        pretrained=False,
        num_classes=2,
        in_chans=1,
        image_size=28,
        head_seed=seed,
        max_iter=50,
        **kw,
    )


def _fit(model, dm, epochs=1):
    _trainer(max_epochs=epochs, limit_val_batches=1).fit(model, datamodule=dm)
    return model


def test_features_are_extracted_only_for_a_run_s_images_and_shared(breast_npz, monkeypatch, tmp_path):
    monkeypatch.setenv("SYNAUG_CACHE", str(tmp_path))
    extracted = []
    original = FeatureClassifier._extract
    monkeypatch.setattr(
        FeatureClassifier,
        "_extract",
        lambda self, dm, rows: extracted.append(len(rows)) or original(self, dm, rows),
    )
    small = _data(breast_npz, real_fraction=0.1)
    first = _fit(_head("logreg"), small)
    shas = set(small.table["sha256"])
    assert len(small.table) < len(small.source)  # a 10% subset of the training images, val and test
    assert sum(extracted) <= len(
        shas
    )  # nothing outside the run's table (less where an earlier test stored some)

    other = _data(breast_npz, real_fraction=0.2, seed=1)  # another subset: only its new images are extracted
    before = sum(extracted)
    second = _fit(_head("svc"), other)
    assert sum(extracted) - before == len(set(other.table["sha256"]) - shas) > 0
    again = sum(extracted)
    _fit(_head("logreg", seed=5), small)  # another seed and head on the first subset: nothing new
    assert sum(extracted) == again
    # the same image has the same features in both runs
    common = small.table.reset_index().merge(other.table.reset_index(), on="sha256")
    assert len(common) > 0
    assert torch.equal(
        first.features[common["index_x"].to_numpy()], second.features[common["index_y"].to_numpy()]
    )


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_checkpoint_cannot_run_code_through_the_head(breast_npz, tmp_path):
    dm = _data(breast_npz, real_fraction=0.1)
    trainer = _trainer(max_epochs=1, limit_val_batches=1)
    trainer.fit(_head("logreg", seed=0), datamodule=dm)
    good = tmp_path / "good.ckpt"
    trainer.save_checkpoint(good)
    ckpt = torch.load(good, weights_only=True)
    assert "sklearn_state" in ckpt and "sklearn" not in ckpt
    marker = tmp_path / "marker"

    old = {
        k: v for k, v in ckpt.items() if k != "sklearn_state"
    }  # the old format: a pickle in a uint8 tensor
    old["sklearn"] = torch.frombuffer(bytearray(pickle.dumps(_Payload(marker))), dtype=torch.uint8)
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="pickle.*retrain"):
        _trainer().test(
            _head("logreg"), datamodule=dm, ckpt_path=str(tmp_path / "old.ckpt"), weights_only=True
        )

    crafted = dict(ckpt)  # the new format naming a class that is not a head
    crafted["sklearn_state"] = {"class": "builtins.open", "state": {"file": str(marker), "mode": "w"}}
    torch.save(crafted, tmp_path / "crafted.ckpt")
    with pytest.raises(ValueError, match="'builtins.open'.*refusing"):
        _trainer().test(
            _head("logreg"), datamodule=dm, ckpt_path=str(tmp_path / "crafted.ckpt"), weights_only=True
        )
    assert not marker.exists()


@pytest.mark.parametrize("head", ["logreg", "svc"])
def test_stored_heads_predict_as_the_fitted_ones(head, breast_npz):
    model = _fit(_head(head, seed=0), _data(breast_npz, real_fraction=0.2))
    x = model.features.numpy()
    back = sklearn_from_state(sklearn_state(model.estimator))
    assert np.array_equal(back.predict_proba(x), model.estimator.predict_proba(x))


def _fitted(head, dm, seed=None, global_seed=0):
    L.seed_everything(global_seed)
    model = _fit(_head(head, seed=seed), dm, epochs=1)
    if head == "ffnn":
        return torch.cat([p.detach().flatten() for p in model.ffnn.parameters()]).numpy()
    if head == "logreg":
        return model.estimator[-1].coef_
    return np.array([c.a_ for c in model.estimator[-1].calibrated_classifiers_[0].calibrators])


@pytest.mark.parametrize("head", ["logreg", "svc", "ffnn"])
def test_the_run_s_seed_reaches_the_head(head, breast_npz):
    dm = _data(breast_npz, real_fraction=0.2)
    a, b = _fitted(head, dm, seed=1), _fitted(head, dm, seed=2)
    assert not np.array_equal(a, b)
    assert np.array_equal(a, _fitted(head, dm, seed=1, global_seed=7))  # an explicit seed wins
    # without one, the run's seed_everything decides
    assert np.array_equal(_fitted(head, dm, global_seed=3), _fitted(head, dm, global_seed=3))
    assert not np.array_equal(_fitted(head, dm, global_seed=3), _fitted(head, dm, global_seed=4))
