"""AtomicCheckpointIO writes in the background: what a caller does next sees the write complete, in order, and the
state as it was when saved."""

import collections
import errno
import threading
from pathlib import Path

import pytest
import torch

from synaug import utils
from synaug.utils import AtomicCheckpointIO


def test_a_checkpoint_is_loadable_at_once_and_a_removal_waits_for_its_write(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "a.ckpt"
    io.save_checkpoint({"w": torch.arange(1000), "epoch": 3}, path)
    assert torch.equal(io.load_checkpoint(path)["w"], torch.arange(1000))  # waited for the write
    io.save_checkpoint({"epoch": 4}, tmp_path / "b.ckpt")
    io.remove_checkpoint(tmp_path / "b.ckpt")  # queued behind its own write: nothing comes back afterwards
    io.teardown()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt"]


def test_a_failed_background_write_raises_at_teardown_and_leaves_no_file(tmp_path, monkeypatch):
    class Full:  # the file is created, then the disk fills up part-way through the write
        def __init__(self, path, mode):
            self.f = open(path, mode)  # noqa: SIM115 (closed in __exit__)

        def write(self, data):
            self.f.write(bytes(memoryview(data)[:10]))
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(utils, "open", Full, raising=False)  # the module's `open`, not the builtin
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 0}, tmp_path / "a.ckpt")  # returns before the write fails
    with pytest.raises(OSError, match="No space left"):
        io.teardown()
    monkeypatch.delattr(utils, "open")
    assert list(tmp_path.iterdir()) == []  # no truncated file, no temporary one


def test_a_checkpoint_is_the_state_at_save_time_whatever_training_does_next(tmp_path, monkeypatch):
    started, release = threading.Event(), threading.Event()
    serialise = utils._serialise

    def slow(checkpoint, path):  # the write is still queued when the next optimizer step changes the weights
        started.set()
        release.wait(10)
        serialise(checkpoint, path)

    monkeypatch.setattr(utils, "_serialise", slow)
    io = AtomicCheckpointIO()
    w = torch.zeros(1000)
    state = collections.OrderedDict(w=w)
    io.save_checkpoint(
        {"state_dict": state, "optimizer_states": [{"step": torch.tensor(1.0)}], "epoch": 0},
        tmp_path / "a.ckpt",
    )
    started.wait(10)
    w.add_(1.0)  # in place, as an optimizer step is
    release.set()
    io.teardown()
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert torch.equal(ckpt["state_dict"]["w"], torch.zeros(1000))
    assert type(ckpt["state_dict"]) is collections.OrderedDict and ckpt["optimizer_states"][0]["step"] == 1.0


def test_a_classifiers_best_checkpoint_holds_its_weights_and_last_the_optimizer_too(breast_npz, tmp_path):
    from synaug.training import SynAugCLI

    args = {
        "model": {"class_path": "synaug.classifiers.ImageClassifier", "init_args": {"backbone": "basic_cnn"}},
        "data": {"root": str(breast_npz), "image_size": 28},
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "default_root_dir": str(tmp_path),
            "logger": False,
            "enable_progress_bar": False,
        },
    }
    cli = SynAugCLI(args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    best = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)
    last = torch.load(Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt", weights_only=True)
    assert "optimizer_states" not in best and best["state_dict"].keys() == last["state_dict"].keys()
    assert "optimizer_states" in last and "callbacks" in last  # what a resume needs
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best")  # what the best is for
