"""A callback for `synaug fit` subprocesses: which table rows each rank trained, validated and tested on."""

import json
import os
from collections import defaultdict
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class RecordRows(Callback):
    """Writes `$ROWS_DIR/rank<r>.json`, `{"train/<epoch>": rows, "val/<epoch>": rows, "test": rows}`, at the end of
    fit and of test (the sanity check's validation batches are left out)."""

    def __init__(self):
        self.rows = defaultdict(list)

    def _add(self, key, batch):
        self.rows[key] += batch[2].tolist()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._add(f"train/{trainer.current_epoch}", batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._add(f"val/{trainer.current_epoch}", batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._add("test", batch)

    def _write(self, trainer):
        path = Path(os.environ["ROWS_DIR"]) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.rows))

    def on_fit_end(self, trainer, pl_module):
        self._write(trainer)

    def on_test_end(self, trainer, pl_module):
        self._write(trainer)
