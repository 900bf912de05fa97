"""Conventional augmentation policies by name (torchvision.transforms.v2), per image or on-device per batch."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from torchvision.transforms import v2

Policy = Literal["none", "hflip", "medical", "autoaugment", "randaugment", "trivialaugment"]


def policy_transform(name: Policy) -> nn.Module:
    """The per-image transform of a policy, on uint8 tensors (C, H, W) or batches.

    `medical` keeps what an intensity means in a medical image: a flip, a small affine (rotation, shift, scale)
    and mild brightness/contrast; no inversion, solarisation, posterisation or equalisation, which ImageNet's
    AutoAugment policy applies (it turns brains inverted). The ImageNet policies stay available to compare.
    """
    return {
        "none": nn.Identity(),
        "hflip": v2.RandomHorizontalFlip(),
        "medical": v2.Compose(
            [
                v2.RandomHorizontalFlip(),
                v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1)),
                v2.ColorJitter(brightness=0.1, contrast=0.1),
            ]
        ),
        "autoaugment": v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET),
        "randaugment": v2.RandAugment(),
        "trivialaugment": v2.TrivialAugmentWide(),
    }[name]


class BatchAugment(nn.Module):
    """A policy applied to a uint8 batch on whatever device it is on.

    v2 transforms draw one set of random parameters per call, so a whole batch would get the same operation.
    Flips are drawn per image; the other policies are applied per group of `group_size` images, each group
    with its own draw: per-image variety at a fraction of the kernel launches of a per-image loop.
    """

    def __init__(self, policy: Policy, group_size: int = 8):
        super().__init__()
        self.policy, self.group_size = policy, group_size
        self.transform = policy_transform(policy)

    def forward(self, x: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        if self.policy == "none":
            return x
        if seed is not None:
            with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
                torch.manual_seed(seed)
                return self(x)
        if self.policy == "hflip":
            flip = torch.rand(len(x), device=x.device) < 0.5
            return torch.where(flip[:, None, None, None], x.flip(-1), x)
        return torch.cat([self.transform(g) for g in x.split(self.group_size)])
