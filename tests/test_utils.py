"""AtomicCheckpointIO writes in the background: what a caller does next sees the write complete, in order."""

import errno

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
