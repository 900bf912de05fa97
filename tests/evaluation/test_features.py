"""The one feature extractor (`synaug.evaluation.features`): Inception offline, a classifier's backbone, and a
crafted classifier checkpoint refused unread."""

import pickle
import urllib.error
from pathlib import Path

import pytest
import torch
from helpers.images import blobs, tiny_backbone_file  # tests/ is on sys.path

from synaug.evaluation import features as feat
from synaug.models.backbones import WeightsUnavailableError


def test_inception_offline_error_names_the_model(monkeypatch, tmp_path):
    import torch_fidelity.feature_extractor_inceptionv3 as tf

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tf, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError, match=r"Inception-v3 FID weights.*inception_weights"):
        feat.feature_extractor("inception")
    with pytest.raises(WeightsUnavailableError, match="not found: .*missing.pth"):
        feat.feature_extractor("inception", inception_weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="needs `backbone`"):
        feat.feature_extractor("auto")

    ckpt = tiny_backbone_file(tmp_path / "tiny.safetensors")
    fallback = feat.feature_extractor("auto", checkpoint_path=ckpt, backbone="test_resnet", in_chans=1)
    assert fallback.name.startswith("test_resnet:file:")
    features = fallback(blobs(2, seed=0))
    assert features.shape == (2, fallback.num_features)


def test_classifier_checkpoint_features_are_its_backbone(tmp_path):
    from synaug.classifiers.finetune import ImageClassifier

    torch.manual_seed(0)
    clf = ImageClassifier(backbone="test_resnet", num_classes=2, in_chans=1, image_size=24).eval()
    torch.save({"state_dict": clf.state_dict(), "hyper_parameters": dict(clf.hparams)}, tmp_path / "clf.ckpt")
    feature = feat.feature_extractor("classifier", checkpoint_path=tmp_path / "clf.ckpt")

    images = blobs(3, seed=0, size=24)
    clf.net.reset_classifier(0)
    with torch.no_grad():
        expected = clf(images.float() / 255)  # the classifier's own normalisation, pooled features
    assert feature.name.startswith("classifier:test_resnet:file:") and feature.in_chans == 1
    assert torch.allclose(feature(images), expected, atol=1e-5)


class _Payload:
    """Unpickling this creates the file `marker`: what a crafted checkpoint could run instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_quality_refuses_a_crafted_classifier_checkpoint_without_running_it(tmp_path):
    from synaug.classifiers.finetune import ImageClassifier

    marker = tmp_path / "payload_ran"
    clf = ImageClassifier(backbone="test_resnet", num_classes=2, in_chans=1, image_size=24)
    hparams = dict(clf.hparams) | {"note": _Payload(marker)}
    torch.save({"state_dict": clf.state_dict(), "hyper_parameters": hparams}, tmp_path / "crafted.ckpt")
    # What `synaug quality --feature classifier --checkpoint_path crafted.ckpt` loads its features with.
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        feat.feature_extractor("classifier", checkpoint_path=str(tmp_path / "crafted.ckpt"))
    assert not marker.exists()
