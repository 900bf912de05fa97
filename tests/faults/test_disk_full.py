"""A disk that fills up while a checkpoint is written: no truncated file under a checkpoint's name, the earlier
checkpoints intact. The full disk is the checkpoint folder's filesystem only (as when `$TMPDIR` is another one):
every write into that folder stops with ENOSPC after a few kilobytes, the rest of the machine has room."""

import builtins
import errno
import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

from synaug.cli import main

FREE = 4096  # bytes a file in the full folder may still take


class FullDisk:
    def __init__(self, f):
        self.f, self.written = f, 0

    def write(self, data):
        room = FREE - self.written
        if len(data) > room:
            self.f.write(bytes(memoryview(data)[:room]))
            self.written = FREE
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_leaves_no_truncated_checkpoint(breast_npz, tmp_path, monkeypatch, figures):
    monkeypatch.chdir(tmp_path)
    ckpts = tmp_path / "ckpts"
    elsewhere = Path(tempfile.mkdtemp(dir="/dev/shm"))  # another filesystem, with room
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    monkeypatch.setattr(shutil, "_USE_CP_SENDFILE", False)  # a cross-filesystem move copies through write()
    real_open, saves = builtins.open, []

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode and Path(str(file)).resolve().parent == ckpts.resolve():
            saves.append(file)
            if len(saves) > 1:  # the first checkpoint fits; the disk is full from the second on
                return FullDisk(f)
        return f

    monkeypatch.setattr(builtins, "open", open_)
    args = ["fit", "--model", "synaug.classifiers.ImageClassifier", "--model.backbone", "basic_cnn"]
    args += ["--data.root", str(breast_npz), "--data.image_size", "28", "--trainer.max_epochs", "3"]
    args += ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.callbacks+=ModelCheckpoint"]
    args += ["--trainer.callbacks.dirpath", str(ckpts), "--trainer.callbacks.every_n_epochs", "1"]
    args += ["--trainer.callbacks.save_top_k", "-1", "--test_after_fit", "false"]
    try:
        with pytest.raises(OSError, match="No space left") as err:
            main(args)
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)
    monkeypatch.setattr(builtins, "open", real_open)
    files = sorted(p.name for p in ckpts.iterdir())
    assert files == ["epoch=0-step=2.ckpt"]  # the one that was written whole; no partial, no temporary file
    assert zipfile.is_zipfile(ckpts / files[0])
    assert torch.load(ckpts / files[0], weights_only=False)["epoch"] == 0
    figures("faults survived", "disk full while writing a checkpoint", f"{err.value}; kept: {files}")
