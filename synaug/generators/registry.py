"""The generator kinds, by name: each registered once, where it is defined (`register(...)` at the bottom of its
module), as timm registers its models.

    register("diffusion", "class-conditional DDPM ...", module=ClassConditionalDiffusion, load=DiffusionGenerator.load)

`synaug generate` reads the kind from the export's metadata (`base.checkpoint_kind`) and calls its `load`. The
built-in kinds are imported on first use (`BUILTIN`), so using one does not import the others' dependencies; a
kind defined elsewhere is registered when its module is imported (the export's `module` names it).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from synaug.generators.base import Generator, checkpoint_kind, read_info
from synaug.utils import pick_device

BUILTIN = {
    "diffusion": "synaug.generators.diffusion.module",
    "pggan": "synaug.generators.pggan.module",
    "dreambooth": "synaug.generators.stable_diffusion.dreambooth",
    "sd-img2img": "synaug.generators.stable_diffusion.img2img",
    "transform": "synaug.generators.transform",
    "import": "synaug.generators.external",
}


@dataclass(frozen=True)
class GeneratorKind:
    name: str
    description: str
    module: type | None = None  # the LightningModule `synaug fit` trains; None: training-free
    load: Callable[..., Generator] | None = None  # (export or .ckpt, device, **sampling options) -> Generator
    command: Callable[..., Path] | None = None  # training-free: the function that writes a synthetic folder
    # training-free, in a grid (`generate:` sources): (ImageSource, real rows, out, {class: count}, **settings)
    # writes exactly those counts of images derived from those rows only; its other parameters are the settings
    derive: Callable[..., Path] | None = None


_KINDS: dict[str, GeneratorKind] = {}


def register(name: str, description: str, **how: Any) -> GeneratorKind:
    """Register a generator kind once; a second registration under the same name is an error."""
    if name in _KINDS:
        raise ValueError(f"generator kind {name!r} is already registered ({_KINDS[name].description})")
    if how.get("module") is not None and how.get("load") is None:
        raise ValueError(f"generator kind {name!r}: a trained kind needs `load` for its exports")
    _KINDS[name] = kind = GeneratorKind(name, description, **how)
    return kind


def unregister(name: str) -> None:
    del _KINDS[name]


def get(name: str, module: str | None = None) -> GeneratorKind:
    """The kind `name`, importing its module (a built-in, or `module`'s) when it is not registered yet."""
    if name not in _KINDS and (name in BUILTIN or module):
        importlib.import_module(BUILTIN.get(name) or module.rpartition(".")[0])
    if name not in _KINDS:
        raise KeyError(f"unknown generator kind {name!r}; registered: {sorted({*_KINDS, *BUILTIN})}")
    return _KINDS[name]


def kinds() -> dict[str, GeneratorKind]:
    """Every kind, the built-ins imported."""
    for name in BUILTIN:
        get(name)
    return dict(_KINDS)


def load_generator(checkpoint: str | Path, device: str | torch.device = "auto", **options: Any) -> Generator:
    """Load an export folder or a Lightning `.ckpt` of any trained kind onto `device`; `options` are the kind's
    sampling settings (the parameters of its `load` after the path and the device)."""
    name = checkpoint_kind(checkpoint)
    module = read_info(checkpoint).get("module") if Path(checkpoint).is_dir() else None
    kind = get(name, module)
    if kind.load is None:
        raise ValueError(f"generator kind {name!r} is training-free: it has no exports to sample from")
    accepted = list(inspect.signature(kind.load).parameters)[2:]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"generator kind {name!r} takes the sampling options {accepted}; unknown: {unknown}")
    return kind.load(checkpoint, pick_device(device), **options)
