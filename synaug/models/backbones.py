"""Backbones by name through timm, with local weight files and a clear error when weights cannot be had.

`create_backbone("resnet18", num_classes=0)` gives pooled features (timm's convention); `num_classes=k` a
classifier. Weights come from `checkpoint_path` (a local timm-format .safetensors/.pth file) or, with
`pretrained=True`, from the hub id timm knows for the name. Nothing here downloads when offline: a missing
file or an unreachable hub raises `WeightsUnavailableError` naming the model and how to pass a local file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import timm
import torch
import torch.nn as nn

import synaug.models.basic_cnn  # noqa: F401  (registers `basic_cnn` with timm)


class WeightsUnavailableError(RuntimeError):
    pass


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint_path: str | Path | None = None,
    num_classes: int = 0,
    in_chans: int = 3,
    **kwargs,
) -> nn.Module:
    if checkpoint_path is not None:
        path = Path(checkpoint_path).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"Checkpoint for backbone '{name}' not found: {path}")
        # timm's own local-file route: it adapts in_chans and drops a mismatched classifier as for hub weights.
        return timm.create_model(
            name,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(path)},
            num_classes=num_classes,
            in_chans=in_chans,
            **kwargs,
        )
    try:
        return timm.create_model(
            name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
        )
    except Exception as err:
        if not pretrained or "Unknown model" in str(err):
            raise
        hub_id = _hub_id(name)
        raise WeightsUnavailableError(
            f"Pretrained weights for backbone '{name}' (hub id: {hub_id}) could not be loaded: "
            f"{type(err).__name__}: {err}. This machine cannot download them. Download the weights where you "
            f"can (e.g. `huggingface-cli download {hub_id}`), then pass the file with "
            f"`checkpoint_path: /path/to/model.safetensors`, or set `pretrained: false`."
        ) from err


def normalization(net: nn.Module, pretrained: bool, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std, shaped (1, in_chans, 1, 1), that images in [0, 1] are normalised with before `net`.

    Pretrained weights expect the statistics they were trained with (timm lists RGB ones; a grey model, whose
    first conv timm sums over RGB, sees their average). From scratch, mean = std = 0.5 ([-1, 1]) is as good as any.
    Every user of a backbone (training, features, Grad-CAM, quality) goes through here so that they agree.
    """
    cfg = net.pretrained_cfg if pretrained else {"mean": (0.5,), "std": (0.5,)}
    mean, std = torch.tensor(cfg["mean"]), torch.tensor(cfg["std"])
    if len(mean) != in_chans:
        mean, std = mean.mean().repeat(in_chans), std.mean().repeat(in_chans)
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def weights_id(name: str, pretrained: bool, checkpoint_path: str | Path | None) -> str:
    """A string that changes whenever the weights change: the key for feature and embedding caches."""
    if checkpoint_path is not None:
        digest = hashlib.sha256(Path(checkpoint_path).expanduser().read_bytes()).hexdigest()[:16]
        return f"{name}:file:{digest}"
    if pretrained:
        return f"{name}:hub:{_hub_id(name)}"
    return f"{name}:random"


def _hub_id(name: str) -> str:
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else f"timm/{name}"
