import numpy as np
import pytest
from PIL import Image


def write_folder(root, counts: dict[str, int], size: int = 16, seed: int = 0, split: str | None = None):
    """An image folder `root[/split]/<class>/*.png` of random images, class-dependent brightness."""
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(counts.items()):
        folder = root / split / name if split else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = rng.integers(0, 100, (size, size), dtype=np.uint8) + 60 * c
            Image.fromarray(a.astype(np.uint8)).save(folder / f"{name}_{split or 'x'}_{i:03d}.png")
    return root


@pytest.fixture(name="write_folder")
def _write_folder_fixture():
    return write_folder


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    write_folder(root, {"a": 20, "b": 12}, split="train")
    write_folder(root, {"a": 6, "b": 6}, split="test", seed=1)
    return root
