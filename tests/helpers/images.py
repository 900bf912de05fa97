"""Tiny images and weights the evaluation tests share."""

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file


def blobs(n: int, seed: int, size: int = 16, channels: int = 1, level: float = 0.0) -> torch.Tensor:
    """Smooth random uint8 images: 4x4 random fields upsampled, plus `level` brightness."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 4, 4, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False) * 200 + 20 + level
    return x.clamp(0, 255).round().to(torch.uint8)


def tiny_backbone_file(path: Path) -> Path:
    """A random `test_resnet` in timm's weight-file format."""
    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet").state_dict(), path)
    return path
