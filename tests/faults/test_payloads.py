"""Payloads refused: checkpoints crafted to run code when read, given to the commands that read them. Each would
create a marker file if it were unpickled; none may."""

import pickle

import lightning.pytorch as L
import pytest
import torch

from synaug.classifiers import FeatureClassifier, ImageClassifier
from synaug.cli import main
from synaug.data import ClassificationData


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def classifier_checkpoint(tmp_path, marker):
    """An ImageClassifier checkpoint whose hyper-parameters hold a pickled payload (passes no `weights_only` load)."""
    clf = ImageClassifier(backbone="basic_cnn", num_classes=2, in_chans=1, image_size=28)
    path = tmp_path / "crafted_image.ckpt"
    hparams = dict(clf.hparams) | {"note": Payload(marker)}
    torch.save(
        {
            "state_dict": clf.state_dict(),
            "hyper_parameters": hparams,
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    return path


def head_checkpoints(tmp_path, breast_npz, marker):
    """A fitted logistic-regression head's checkpoint, then two crafted from it: the old format (a pickle inside a
    uint8 tensor, which passes `weights_only=True`) and the new one naming a class that is no head."""
    dm = ClassificationData(str(breast_npz), image_size=28, channels=1, batch_size=64, real_fraction=0.1)
    model = FeatureClassifier(
        "logreg",
        backbone="basic_cnn",
        pretrained=False,
        num_classes=2,
        in_chans=1,
        image_size=28,
        max_iter=50,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        max_epochs=1,
        limit_val_batches=1,
    )
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "good.ckpt")
    ckpt = torch.load(tmp_path / "good.ckpt", weights_only=True)
    ckpt.pop(
        "hyper_parameters"
    )  # the command line names the model (a plain Trainer's hparams lack its class)
    old = {k: v for k, v in ckpt.items() if k != "sklearn_state"}
    old["sklearn"] = torch.frombuffer(bytearray(pickle.dumps(Payload(marker))), dtype=torch.uint8)
    torch.save(old, tmp_path / "crafted_head_pickle.ckpt")
    named = dict(ckpt) | {
        "sklearn_state": {"class": "builtins.open", "state": {"file": str(marker), "mode": "w"}}
    }
    torch.save(named, tmp_path / "crafted_head_class.ckpt")
    return tmp_path / "crafted_head_pickle.ckpt", tmp_path / "crafted_head_class.ckpt"


def test_test_command_refuses_crafted_checkpoints(breast_npz, tmp_path, monkeypatch, capsys, figures):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "payload_ran"
    common = ["--data.root", str(breast_npz), "--data.image_size", "28", "--data.channels", "1"]
    common += ["--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false"]
    image = ["--model", "synaug.classifiers.ImageClassifier", "--model.backbone", "basic_cnn"]
    head = ["--model", "synaug.classifiers.FeatureClassifier", "--model.head", "logreg"]
    head += ["--model.backbone", "basic_cnn", "--model.pretrained", "false", "--model.max_iter", "50"]
    pickled, named = head_checkpoints(tmp_path, breast_npz, marker)
    cases = {
        "classifier checkpoint with a pickled object (synaug test)": (
            image,
            classifier_checkpoint(tmp_path, marker),
            "refused to load a checkpoint that holds objects other than tensors",
        ),
        "frozen head stored as a pickle in a tensor (synaug test)": (head, pickled, "retrain"),
        "frozen head naming a non-head class (synaug test)": (head, named, "'builtins.open'"),
    }
    capsys.readouterr()
    for what, (model, path, expected) in cases.items():
        with pytest.raises(SystemExit) as err:
            main(["test", *model, *common, "--ckpt_path", str(path)])
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert not marker.exists(), what
        assert err.value.code == 2 and message.startswith("synaug: error: ") and expected in message, message
        figures("payloads refused", what, message)


def test_quality_refuses_a_crafted_feature_checkpoint(breast_npz, tmp_path, monkeypatch, capsys, figures):
    from synaug.generators.transform import transform_generate

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "payload_ran"
    folder = tmp_path / "transform"
    transform_generate(str(breast_npz), str(folder), per_class={"malignant": 4}, image_size=28)
    crafted = classifier_checkpoint(tmp_path, marker)
    capsys.readouterr()
    args = ["quality", str(breast_npz), str(folder), "--feature", "classifier"]
    with pytest.raises(SystemExit) as err:
        main([*args, "--checkpoint_path", str(crafted), "--image_size", "28", "--in_chans", "1"])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert not marker.exists()
    assert (
        err.value.code == 2 and "refused to load a checkpoint" in message and "Unsupported global" in message
    ), message
    figures("payloads refused", "classifier checkpoint with a pickled object (synaug quality)", message)
