"""Progressive GAN (Karras et al. 2018, "Progressive Growing of GANs"): the networks, and sampling.

Both networks hold every resolution's layers from the start, 4x4 up to the canvas; `stage` s (0 = 4x4) says
how many are in use and `alpha` blends the newest one in: at alpha = 0 the output is exactly the previous
stage's, upsampled (G) or read from the downsampled input (D). What the paper adds for stability is here:

- equalised learning rate: weights are N(0, 1) and scaled at runtime by He's constant, so Adam's
  scale-invariant updates move every layer at the same relative speed (`EqualizedConv2d`, `EqualizedLinear`);
- pixel norm after each generator convolution; minibatch standard deviation before the critic's last block;
- nearest upsampling, average-pool downsampling, linear to/from-image 1x1 convolutions with `in_chans`
  channels, so grey images stay one channel end to end.

Class conditioning: a learned label embedding concatenated to the latent (the official code's one-hot
concat, pixel-normalised together) and a projection discriminator (Miyato & Koyama 2018): the critic's
score gets <embed(y), phi(x)>. With one class (or data restricted to one) both terms are constants and the
model is the unconditional PGGAN.

Image sizes: the canvas is the next power of two >= the image size (28 px MedMNIST -> 32). Smaller images
are reflect-padded, centred, to the canvas for training and `sample` crops the centre back
(`synaug.generators.base.pad_to`, `crop_to`); nothing is resized.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from synaug.generators.base import crop_to, seed_list


def canvas_size(image_size: int) -> int:
    """The power of two >= `image_size` that the networks grow to."""
    if image_size < 4:
        raise ValueError(f"PGGAN starts at 4x4; image_size must be at least 4, got {image_size}")
    return 2 ** math.ceil(math.log2(image_size))


def num_stages(canvas: int) -> int:
    return int(math.log2(canvas)) - 1


class EqualizedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, gain: float = math.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = gain / math.sqrt(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class EqualizedConv2d(nn.Module):
    def __init__(self, in_chans: int, out_chans: int, kernel_size: int, gain: float = math.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_chans, in_chans, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_chans))
        self.scale = gain / math.sqrt(in_chans * kernel_size**2)
        self.padding = kernel_size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


def lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def downsample(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2)


def minibatch_std(x: torch.Tensor, group_size: int = 4) -> torch.Tensor:
    """Append the feature-averaged standard deviation over groups of samples as one more channel.

    Groups of `gcd(B, group_size)` samples, so any batch size works (a last, odd-sized batch gets smaller
    groups); the paper's members of a group are B/G apart, as here.
    """
    b, c, h, w = x.shape
    g = math.gcd(b, group_size)
    y = x.reshape(g, -1, c, h, w).float()
    y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (B / g,)
    y = y.to(x.dtype).reshape(1, -1, 1, 1, 1).expand(g, -1, 1, h, w).reshape(b, 1, h, w)
    return torch.cat([x, y], dim=1)


def resolution(stage: int) -> int:
    return 4 * 2**stage


def _channels(res: int, channel_base: int, max_channels: int) -> int:
    return min(max_channels, channel_base // res)


class Generator(nn.Module):
    """z (B, latent_dim), labels (B,) -> images (B, in_chans, r, r) in about [-1, 1], r the stage's side.

    `stage` and `alpha` (attributes) are the growth state `forward` uses when given none: the last stage, fully
    blended in, unless a loader sets those of a generator exported mid-schedule.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        canvas: int,
        latent_dim: int = 512,
        channel_base: int = 16384,
        max_channels: int = 512,
    ):
        super().__init__()
        if canvas != canvas_size(canvas):
            raise ValueError(f"the canvas must be a power of two >= 4, got {canvas}")
        self.config = dict(
            num_classes=num_classes,
            in_chans=in_chans,
            canvas=canvas,
            latent_dim=latent_dim,
            channel_base=channel_base,
            max_channels=max_channels,
        )
        self.num_stages = num_stages(canvas)
        self.stage, self.alpha = self.num_stages - 1, 1.0
        nf = [_channels(resolution(s), channel_base, max_channels) for s in range(self.num_stages)]
        self.embed = nn.Embedding(num_classes, latent_dim)  # N(0, 1) like the latent it is concatenated to
        # The paper's 4x4 "deconvolution" of the latent is a dense layer; gain sqrt(2)/4 as in the official code.
        self.dense = EqualizedLinear(2 * latent_dim, nf[0] * 16, gain=math.sqrt(2) / 4)
        self.blocks = nn.ModuleList([EqualizedConv2d(nf[0], nf[0], 3)])
        self.blocks.extend(
            nn.Sequential(EqualizedConv2d(nf[s - 1], nf[s], 3), EqualizedConv2d(nf[s], nf[s], 3))
            for s in range(1, self.num_stages)
        )
        self.to_rgb = nn.ModuleList(EqualizedConv2d(n, in_chans, 1, gain=1) for n in nf)

    def _block(self, s: int, x: torch.Tensor) -> torch.Tensor:
        if s == 0:
            x = pixel_norm(lrelu(self.dense(x).view(len(x), -1, 4, 4)))
            return pixel_norm(lrelu(self.blocks[0](x)))
        x = upsample(x)
        for conv in self.blocks[s]:
            x = pixel_norm(lrelu(conv(x)))
        return x

    def forward(
        self, z: torch.Tensor, labels: torch.Tensor, stage: int | None = None, alpha: float | None = None
    ) -> torch.Tensor:
        stage = self.stage if stage is None else stage
        alpha = self.alpha if alpha is None else alpha
        x = pixel_norm(torch.cat([z, self.embed(labels)], dim=1))
        for s in range(stage):
            x = self._block(s, x)
        out = self.to_rgb[stage](self._block(stage, x))
        if stage > 0 and alpha < 1:
            out = torch.lerp(upsample(self.to_rgb[stage - 1](x)), out, alpha)
        return out


class Discriminator(nn.Module):
    """The critic: images (B, in_chans, r, r), labels (B,) -> WGAN scores (B,), r the stage's side."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        canvas: int,
        channel_base: int = 16384,
        max_channels: int = 512,
        mbstd_group: int = 4,
    ):
        super().__init__()
        self.num_stages, self.mbstd_group = num_stages(canvas), mbstd_group
        nf = [_channels(resolution(s), channel_base, max_channels) for s in range(self.num_stages)]
        self.from_rgb = nn.ModuleList(EqualizedConv2d(in_chans, n, 1) for n in nf)
        # blocks[s] takes stage s's resolution to stage s-1's; blocks[0] is the 4x4 head.
        self.blocks = nn.ModuleList(
            [nn.ModuleList([EqualizedConv2d(nf[0] + 1, nf[0], 3), EqualizedLinear(nf[0] * 16, nf[0])])]
        )
        self.blocks.extend(
            nn.ModuleList([EqualizedConv2d(nf[s], nf[s], 3), EqualizedConv2d(nf[s], nf[s - 1], 3)])
            for s in range(1, self.num_stages)
        )
        self.out = EqualizedLinear(nf[0], 1, gain=1)
        self.embed = nn.Embedding(num_classes, nf[0])  # the projection; scaled at runtime like `out`
        self.embed_scale = 1 / math.sqrt(nf[0])

    def _block(self, s: int, x: torch.Tensor) -> torch.Tensor:
        if s == 0:
            conv, dense = self.blocks[0]
            x = lrelu(conv(minibatch_std(x, self.mbstd_group)))
            return lrelu(dense(x.flatten(1)))
        for conv in self.blocks[s]:
            x = lrelu(conv(x))
        return downsample(x)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, stage: int, alpha: float = 1.0) -> torch.Tensor:
        h = self._block(stage, lrelu(self.from_rgb[stage](x)))
        if stage > 0 and alpha < 1:
            h = torch.lerp(lrelu(self.from_rgb[stage - 1](downsample(x))), h, alpha)
        for s in range(stage - 1, -1, -1):
            h = self._block(s, h)
        return self.out(h).squeeze(1) + self.embed_scale * (self.embed(labels) * h).sum(dim=1)


def seeded_latents(seeds: Sequence[int], latent_dim: int) -> torch.Tensor:
    """One latent per seed, drawn on the CPU, so an image does not depend on its batch or device."""
    return torch.stack([torch.randn(latent_dim, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def sample(
    generator: Generator,
    class_labels: Sequence[int] | torch.Tensor,
    seeds: int | Sequence[int] = 0,
    *,
    image_size: int | None = None,
    stage: int | None = None,
    alpha: float | None = None,
) -> torch.Tensor:
    """Generate one image per class label; returns uint8 (N, C, image_size, image_size) on the CPU.

    seeds: one per image (image i's latent is `torch.randn` seeded with `seeds[i]` on the CPU), or an int s
        giving image i the seed s + i.
    image_size: the side to crop the canvas to (default: the canvas).
    stage, alpha: the growth state to sample at (default: the generator's own). An image of an earlier stage
        is upsampled (nearest) to the canvas, so grids keep one size as the networks grow.
    """
    labels = torch.as_tensor(class_labels, dtype=torch.long)
    n = len(labels)
    seeds = seed_list(seeds, n)
    k = generator.config["num_classes"]
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < k:
        raise ValueError(f"class labels must lie in [0, {k}); got {labels.tolist()}")
    device = next(generator.parameters()).device
    z = seeded_latents(seeds, generator.config["latent_dim"]).to(device)
    x = generator(z, labels.to(device), stage, alpha).float()
    canvas = generator.config["canvas"]
    x = F.interpolate(x, size=canvas, mode="nearest") if x.shape[-1] != canvas else x
    x = crop_to(x, image_size or canvas)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
