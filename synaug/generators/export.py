"""What every generator LightningModule records about its training and where it exports: shared, so that
`synaug generate` and the leakage guard read the same provenance whichever generator wrote it."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.loggers import MLFlowLogger

log = logging.getLogger(__name__)


def record_training_set(module: L.LightningModule) -> None:
    """At fit start: add the data module's training ids to `module.train_ids` and note the MLflow run.

    A union, not a replacement: a generator fine-tuned on a second training set (one class after all classes,
    the Chongqing set after NIH) has learned from both. Resuming on the same set leaves it unchanged.
    """
    ids = getattr(module.trainer.datamodule, "train_ids", None)
    if ids is None:
        log.warning("the data module has no `train_ids`: the generator's training set goes unrecorded")
        ids = []
    module.train_ids = list(dict.fromkeys(module.train_ids + [str(i) for i in ids]))
    module.run_id = module.logger.run_id if isinstance(module.logger, MLFlowLogger) else ""


def export_dir(module: L.LightningModule) -> Path:
    """`export_dir` when set, else `generator/` beside the run's checkpoints (or under the trainer's root)."""
    if module.hparams.export_dir:
        return Path(module.hparams.export_dir)
    ckpt = module.trainer.checkpoint_callback
    if ckpt is not None and ckpt.dirpath:
        return Path(ckpt.dirpath).parent / "generator"
    return Path(module.trainer.default_root_dir) / "generator"
