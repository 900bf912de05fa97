"""A deliberately tiny learned generator, defined outside the package: each class's mean image plus seeded noise.

It shows what a new learned kind takes: a network (here one parameter), a `GeneratorModule` that `synaug fit`
trains and exports, a `Generator` that `synaug generate` samples, and one `register` call; no synaug file changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from synaug.generators.base import Generator, GeneratorModule, class_names, read_export, write_export
from synaug.generators.registry import register


class MeanImage(GeneratorModule):
    kind = "mean-image"

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        image_size: int,
        class_names: list[str] | None = None,
        noise: float = 0.1,
        lr: float = 0.5,
        sample_every: int = 0,
        export_dir: str | None = None,
    ):
        super().__init__()
        self.class_names = class_names_(num_classes, class_names)
        self.save_hyperparameters()
        self.mean = nn.Parameter(torch.zeros(num_classes, in_chans, image_size, image_size))

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y, _ = batch
        loss = (self.mean[y] - x).pow(2).sum((1, 2, 3)).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"mean": self.mean.detach().cpu().contiguous()}, folder / "mean.safetensors")
        return write_export(self, folder, [folder / "mean.safetensors"], noise=self.hparams.noise)

    def grid_samples(self) -> tuple[torch.Tensor, list[str], str]:
        images = to_uint8(self.mean.detach().cpu())
        return images, self.class_names, f"class means, step {self.global_step}"


class_names_ = class_names  # the module's own `class_names` argument shadows it in __init__


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


class MeanImageGenerator(Generator):
    def __init__(self, mean: torch.Tensor, meta, noise: float):
        super().__init__(meta)
        self.mean, self.noise = mean, noise

    @classmethod
    def load(
        cls, checkpoint: str | Path, device: torch.device, noise: float | None = None
    ) -> MeanImageGenerator:
        """noise: the std of the noise added to the mean (default: the one it was trained with)."""
        meta = read_export(checkpoint)
        mean = load_file(Path(checkpoint) / "mean.safetensors")["mean"]
        return cls(mean, meta, meta.info["noise"] if noise is None else noise)

    def settings(self) -> dict[str, Any]:
        return dict(noise=self.noise)

    def sample(self, classes: list[str], seeds: list[int]) -> torch.Tensor:
        out = []
        for c, s in zip(classes, seeds, strict=True):
            m = self.mean[self.meta.class_names.index(c)]
            out.append(m + self.noise * torch.randn(m.shape, generator=torch.Generator().manual_seed(s)))
        return to_uint8(torch.stack(out))


register(
    "mean-image",
    "each class's mean image plus noise (a test fixture)",
    module=MeanImage,
    load=MeanImageGenerator.load,
)
