"""Tiny data the generator tests learn from and generate for."""

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Trainer
from PIL import Image
from torch.utils.data import TensorDataset


def toy_data(n: int = 8, size: int = 16) -> TensorDataset:
    """(x, y, row) batches of grey images: class 0 a bright square on black, class 1 a dark square on grey."""
    x = torch.zeros(n, 1, size, size)
    y = torch.arange(n) % 2
    x[y == 1] = 0.5
    x[y == 0, :, 4:12, 4:12] = 1.0
    x[y == 1, :, 4:12, 4:12] = 0.0
    return TensorDataset(x, y, torch.arange(n))


def image_folder(root: Path, classes: list[str], size: int = 16) -> Path:
    """Random grey `size` px images in `root/<split>/<class>/<i>.png`: 3 training, 1 validation, 1 test per class."""
    rng = np.random.default_rng(0)
    for split, n in [("train", 3), ("val", 1), ("test", 1)]:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png"
                )
    return root


def trainer(tmp_path: Path, max_steps: int, **kw) -> Trainer:
    """A quiet, deterministic CPU trainer that writes only under `tmp_path`."""
    args = dict(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        deterministic=True,
    )
    return Trainer(**{**args, **kw})
