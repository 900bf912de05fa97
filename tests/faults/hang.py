"""Fault injection for `synaug fit` subprocesses (tests/faults/ is on their PYTHONPATH)."""

import os
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class HangAfterFirstCheckpoint(Callback):
    """With $HANG_MARKER set: once the run's checkpoint folder holds `last.ckpt` (checkpoints land in the
    background, whole, after the step that saved them), write the global step to that file and hang (the test
    kills the process there with SIGKILL)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        marker = os.environ.get("HANG_MARKER")
        ckpt = trainer.checkpoint_callback
        if marker and ckpt is not None and ckpt.dirpath and (Path(ckpt.dirpath) / "last.ckpt").is_file():
            Path(marker).write_text(f"{trainer.global_step} {ckpt.dirpath}")
            time.sleep(600)


class HangInFit(Callback):
    """With $HANG_DIR set: the $HANG_AT_FIT-th fit of the process (from 1) writes `$HANG_DIR/fitting` at its
    start and hangs there (the test signals the process meanwhile)."""

    def on_train_start(self, trainer, pl_module):
        folder = os.environ.get("HANG_DIR")
        if not folder:
            return
        count = len(list(Path(folder).glob("fit-*"))) + 1
        (Path(folder) / f"fit-{count}").touch()
        if count == int(os.environ["HANG_AT_FIT"]):
            (Path(folder) / "fitting").touch()
            time.sleep(600)
