"""The generator contract: what every generator kind provides, so that `synaug generate`, the experiment grid
and the leakage guard treat them all alike.

A generator kind is registered once (`synaug.generators.registry.register`) with:

- how to train it: a `GeneratorModule` (a LightningModule) that `synaug fit` trains and that exports its weights
  at the end of fit (`save_pretrained`), or none for training-free kinds (img2img, transform, an imported
  folder), which are commands writing a synthetic folder directly;
- how to load an export (or a Lightning `.ckpt`): `load(path, device, **options) -> Generator`, `options` being
  the kind's sampling settings (a sampler, steps, guidance);
- how to sample: `Generator.sample(classes, seeds)`, one image per class name, image i from `seeds[i]` alone,
  so that an image does not depend on the batch it was made in.

Every export holds `generator.json`, one schema (`GeneratorMeta`): `kind` (the registry key), `module` (the
LightningModule's class path, imported to register a kind the registry does not know yet), `class_names`,
`image_size`, `channels`, the provenance fields (`run_id`, `train_set`, `global_step`, `git_commit`) and the kind's
own fields; `train_ids.txt` lists the real images it learned from. Older exports still load: DreamBooth's
`dreambooth.json` (`read_export`), and checkpoints that predate `kind` (`checkpoint_kind`).

Every kind writes through one resumable writer (`synaug.data.synthetic.write_synthetic`), and every trained kind
logs its sample grids through one callback (`SampleGrid`), so a new learned generator is a network, a
`GeneratorModule` and a `register` call: new files only.
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as L
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torchvision.utils import make_grid

from synaug.cache import file_sha256 as sha256
from synaug.data.synthetic import train_set_fingerprint
from synaug.tracking import git_commit, log_figure
from synaug.utils import atomic_path

log = logging.getLogger(__name__)
EXPORT_FILE = "generator.json"
PROVENANCE = ("run_id", "train_set", "global_step", "git_commit")


# ---- metadata ------------------------------------------------------------------------------------------------


@dataclass
class GeneratorMeta:
    """What `synaug generate` and the manifest need to know of a trained generator besides its weights."""

    kind: str  # the registry key
    class_names: list[str]
    image_size: int  # the side of the images it makes
    channels: int  # the channels of the images it learned from
    run_id: str = ""
    train_ids: list[str] = field(default_factory=list)
    checkpoint: str = ""  # sha256 of the weights file (of the files' digests when several)
    info: dict[str, Any] = field(
        default_factory=dict
    )  # the kind's own fields (noise schedule, stage, prompts)


def write_export(module: GeneratorModule, folder: Path, weights: list[Path], **info: Any) -> Path:
    """Write `generator.json` (kind, class path, classes, size, the `weights` files whose digest is the
    manifest's `checkpoint`, provenance, `info`) and `train_ids.txt` into the export `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = dict(
        kind=module.kind,
        module=f"{type(module).__module__}.{type(module).__qualname__}",
        class_names=module.class_names,
        image_size=module.hparams.image_size,
        channels=module.hparams.in_chans,
        weights=[Path(w).relative_to(folder).as_posix() for w in weights],
    )
    meta |= info | provenance(module, folder)
    (folder / EXPORT_FILE).write_text(json.dumps(meta, indent=2))
    log.info("exported the %s generator to %s", module.kind, folder)
    return folder


def read_info(folder: str | Path) -> dict[str, Any]:
    """An export's metadata file as a dict with `kind`; DreamBooth exports before the one schema still load."""
    folder = Path(folder)
    if (folder / EXPORT_FILE).is_file():
        return json.loads((folder / EXPORT_FILE).read_text())
    if (
        folder / "dreambooth.json"
    ).is_file():  # DreamBoothMeta, before `kind`: `resolution` was its image size
        info = json.loads((folder / "dreambooth.json").read_text())
        return dict(kind="dreambooth", image_size=info.pop("resolution"), **info)
    raise FileNotFoundError(f"{folder}: not a generator export (no {EXPORT_FILE})")


def read_export(folder: str | Path, weights: list[Path] | None = None) -> GeneratorMeta:
    """An export folder's metadata; `checkpoint` is the digest of `weights` (default: those it lists; exports
    from before `weights` was written pass theirs)."""
    folder = Path(folder)
    info = read_info(folder)
    weights = weights or [folder / w for w in info.get("weights", [])]
    ids = (folder / "train_ids.txt").read_text()
    return GeneratorMeta(
        kind=info.pop("kind"),
        class_names=info.pop("class_names"),
        image_size=info.pop("image_size"),
        channels=info.pop("channels"),
        run_id=info.pop("run_id"),
        train_ids=ids.split("\n") if ids else [],
        checkpoint=files_digest(weights),
        info=info,
    )


def module_meta(module: GeneratorModule, ckpt: Path, **info: Any) -> GeneratorMeta:
    """The metadata of a generator LightningModule restored from its checkpoint `ckpt`."""
    return GeneratorMeta(
        kind=module.kind,
        class_names=module.class_names,
        image_size=module.hparams.image_size,
        channels=module.hparams.in_chans,
        run_id=module.run_id,
        train_ids=module.train_ids,
        checkpoint=sha256(ckpt),
        info=info,
    )


def checkpoint_kind(path: str | Path) -> str:
    """The kind an export or a Lightning `.ckpt` of a generator declares."""
    path = Path(path)
    if path.is_dir():
        return read_info(path)["kind"]
    if path.suffix != ".ckpt" or not path.is_file():
        raise FileNotFoundError(f"{path}: expected a generator export folder or a Lightning .ckpt file")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    kind = ckpt.get("generator", {}).get("kind")
    if kind is None:  # a checkpoint from before `kind`: only the diffusion model and the PGGAN wrote those
        if "pggan" not in ckpt and "ema" not in ckpt:
            raise ValueError(f"{path}: not a generator checkpoint (it names no generator kind)")
        kind = "pggan" if "pggan" in ckpt else "diffusion"
    return kind


def files_digest(files: list[Path]) -> str:
    """sha256 of one file; of the files' digests for several."""
    if not files:
        raise ValueError("no weights files to digest")
    if len(files) == 1:
        return sha256(files[0])
    return hashlib.sha256("\n".join(sha256(f) for f in files).encode()).hexdigest()


# ---- a loaded generator ----------------------------------------------------------------------------------------


class Generator(ABC):
    """A loaded generator, what `synaug generate` samples from."""

    batch_size: ClassVar[int] = 64  # images per `sample` call unless the command says otherwise

    def __init__(self, meta: GeneratorMeta):
        self.meta = meta

    @property
    def name(self) -> str:
        """The manifest's `generator` column."""
        return self.meta.kind

    @property
    def classes(self) -> list[str]:
        """The classes it can make."""
        return self.meta.class_names

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """What, with the per-image seed, determines an image (a sampler, its steps): kept in `generation.json`."""

    @abstractmethod
    def sample(self, classes: list[str], seeds: list[int]) -> torch.Tensor | list[Image.Image]:
        """One image per class name, image i from `seeds[i]` alone: uint8 (N, C, H, W) or PIL images."""

    def to(self, device: torch.device) -> Generator:
        return self


# ---- training ------------------------------------------------------------------------------------------------


class GeneratorModule(L.LightningModule):
    """What every trainable generator shares: provenance recorded at fit start, the export at fit end, and the
    sample grids of `SampleGrid`. Subclasses set `kind`, build `class_names`, and implement `save_pretrained`
    and `grid_samples`; `__init__` takes `num_classes, in_chans, image_size, class_names` (linked from the data
    by the CLI) and `export_dir`.

    Provenance contract: `trainer.datamodule.train_ids` (the ids of the real training images) is recorded at the
    start of fit; without it the export records no training set.
    """

    kind: ClassVar[str]
    grid_every_hparam: ClassVar[str] = "sample_every"  # the hyperparameter holding the grid interval
    grid_folder: ClassVar[str] = "samples"  # where grids go in the run's artifacts

    def __init__(self) -> None:
        super().__init__()
        self.train_ids: list[str] = []
        self.run_id = ""

    def on_fit_start(self) -> None:
        record_training_set(self)

    @rank_zero_only
    def on_train_end(self) -> None:
        with atomic_path(self.export_dir()) as folder:  # a killed or full-disk export leaves no half folder
            self.save_pretrained(folder)

    def with_warmup_schedule(self, opt: torch.optim.Optimizer) -> dict:
        """`opt` with the diffusers learning-rate schedule `hparams.lr_schedule` (warm-up `warmup_steps`),
        stepped per optimizer step over the whole fit."""
        from diffusers.optimization import get_scheduler  # the contract itself needs no diffusers

        sched = get_scheduler(
            self.hparams.lr_schedule,
            opt,
            num_warmup_steps=self.hparams.warmup_steps,
            num_training_steps=int(self.trainer.estimated_stepping_batches),
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_callbacks(self) -> list[L.Callback]:
        every = self.hparams.get(self.grid_every_hparam, 0)
        return [SampleGrid(every, self.grid_folder)] if every else []

    def export_dir(self) -> Path:
        """`export_dir` when set, else `generator/` beside the run's checkpoints (or under the trainer's root)."""
        return export_dir(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["generator"] = {"kind": self.kind, "train_ids": self.train_ids, "run_id": self.run_id}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("generator")
        if state is not None:
            self.train_ids, self.run_id = state["train_ids"], state["run_id"]

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the weights to sample from (safetensors) and `write_export`'s metadata into `folder`."""
        raise NotImplementedError(f"{type(self).__name__} must implement save_pretrained")

    def grid_step(self) -> int:
        """The step count the grids are named and spaced by (default: optimizer steps)."""
        return self.global_step

    def grid_samples(self) -> tuple[torch.Tensor, list[str], str]:
        """uint8 images (N, C, H, W) in class order, the class name of each row, and the grid's title."""
        raise NotImplementedError(f"{type(self).__name__} logs sample grids but has no grid_samples")


class SampleGrid(L.Callback):
    """Logs a grid of the module's samples (`grid_samples`) to MLflow every `every` steps of `grid_step`, as
    `<folder>/step_<step>.png`; samples come at fixed seeds, so grids are comparable across steps."""

    def __init__(self, every: int, folder: str = "samples"):
        self.every, self.folder, self.last = every, folder, 0

    def on_train_batch_end(self, trainer, pl_module: GeneratorModule, outputs, batch, batch_idx) -> None:
        step = pl_module.grid_step()
        if step % self.every or step == self.last or not isinstance(trainer.logger, MLFlowLogger):
            return
        self.last = step
        if trainer.is_global_zero:
            images, names, title = pl_module.grid_samples()
            fig = sample_grid(images, names)
            fig.suptitle(title)
            log_figure(
                trainer.logger.experiment, trainer.logger.run_id, fig, f"{self.folder}/step_{step:07d}.png"
            )


def sample_grid(images: torch.Tensor, class_names: list[str]) -> plt.Figure:
    """One row per class of uint8 images (N, C, H, W), N a multiple of the number of classes, in class order."""
    rows = images.chunk(len(class_names))
    fig, axes = plt.subplots(len(rows), 1, figsize=(len(rows[0]) * 1.2, len(rows) * 1.3), squeeze=False)
    for ax, row, name in zip(axes[:, 0], rows, class_names, strict=True):
        ax.imshow(make_grid(row, nrow=len(row), pad_value=255).permute(1, 2, 0).numpy())
        ax.set_ylabel(name, rotation=0, ha="right", va="center")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


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


def seed_list(seeds: int | Sequence[int], n: int) -> list[int]:
    """One seed per image: `seeds` itself, or for an int s the seeds s, s + 1, ..., s + n - 1."""
    seeds = [seeds + i for i in range(n)] if isinstance(seeds, int) else list(seeds)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} images; give one per image")
    return seeds


# ---- the canvas ----------------------------------------------------------------------------------------------
# A network that halves the resolution L times needs a side divisible by 2^L: a smaller or odd-sized image is
# reflect-padded, centred, to such a canvas for training and the samples are cropped back. Reflection (not a
# constant) keeps the image statistics at the crop border, so the kept region has no artificial edge beside it.


def pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect-pad a (B, C, s, s) batch, centred, to (B, C, size, size)."""
    extra = size - x.shape[-1]
    if extra == 0:
        return x
    a, b = extra // 2, extra - extra // 2
    return F.pad(x, (a, b, a, b), mode="reflect")


def crop_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centre (size, size) of a batch padded by `pad_to`."""
    a = (x.shape[-1] - size) // 2
    return x[..., a : a + size, a : a + size]
