"""What every generator LightningModule records about its training and where it exports: shared, so that
`synaug generate` and the leakage guard read the same provenance whichever generator wrote it."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.loggers import MLFlowLogger

from synaug.data.synthetic import train_set_fingerprint
from synaug.tracking import git_commit

log = logging.getLogger(__name__)


def class_names(num_classes: int, names: list[str] | None) -> list[str]:
    """`names` (the data module links them), else "0", "1", ...; their count must be `num_classes`."""
    names = names or [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names {names} for {num_classes} classes")
    return names


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


def provenance(module: L.LightningModule, folder: Path) -> dict:
    """Write `train_ids.txt` into the export `folder`; the provenance fields of its metadata file."""
    (folder / "train_ids.txt").write_text("\n".join(module.train_ids))
    return dict(
        run_id=module.run_id,
        train_set=train_set_fingerprint(module.train_ids) if module.train_ids else "",
        global_step=module.global_step,
        git_commit=git_commit(),
    )


def export_dir(module: L.LightningModule) -> Path:
    """`export_dir` when set, else `generator/` beside the run's checkpoints (or under the trainer's root)."""
    if module.hparams.export_dir:
        return Path(module.hparams.export_dir)
    ckpt = module.trainer.checkpoint_callback
    if ckpt is not None and ckpt.dirpath:
        return Path(ckpt.dirpath).parent / "generator"
    return Path(module.trainer.default_root_dir) / "generator"


@dataclass
class GeneratorMeta:
    """What `synaug generate` needs to know of a trained generator besides its weights."""

    class_names: list[str]
    image_size: int
    channels: int
    run_id: str
    train_ids: list[str]
    noise_schedule: dict[str, Any]  # the training DDPMScheduler config (diffusion only)
    checkpoint: str  # sha256 of the weights file: the safetensors of an export, or the .ckpt

    @classmethod
    def from_export(cls, folder: Path, weights: Path, noise_schedule: dict | None = None) -> GeneratorMeta:
        """From an export folder's `generator.json` and `train_ids.txt` (what `save_pretrained` writes)."""
        info = json.loads((folder / "generator.json").read_text())
        ids = (folder / "train_ids.txt").read_text()
        return cls(
            class_names=info["class_names"],
            image_size=info["image_size"],
            channels=info["channels"],
            run_id=info["run_id"],
            train_ids=ids.split("\n") if ids else [],
            noise_schedule=noise_schedule or {},
            checkpoint=sha256(weights),
        )

    @classmethod
    def from_module(
        cls, module: L.LightningModule, ckpt: Path, noise_schedule: dict | None = None
    ) -> GeneratorMeta:
        """From a generator LightningModule restored from its checkpoint `ckpt`."""
        return cls(
            class_names=module.class_names,
            image_size=module.hparams.image_size,
            channels=module.hparams.in_chans,
            run_id=module.run_id,
            train_ids=module.train_ids,
            noise_schedule=noise_schedule or {},
            checkpoint=sha256(ckpt),
        )


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
