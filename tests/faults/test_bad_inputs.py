"""Bad inputs: each one is refused with one line naming the file or key and what to do."""

import os

import numpy as np
import pytest
from PIL import Image

from synaug.data.sources import DataError, load_source


def write_folder(root, counts: dict[str, int], seed: int = 0, split: str | None = None):
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        folder = root / split / name if split else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"{name}_{i}.png")
    return root


@pytest.fixture
def outside(tmp_path):
    return write_folder(tmp_path / "elsewhere", {"a": 3}, seed=5)


@pytest.mark.parametrize("kind", ["file", "directory", "class-directory", "inside-directory"])
def test_folder_source_refuses_symlinks_naming_link_and_target(tmp_path, outside, kind, figures):
    root = write_folder(tmp_path / "data", {"a": 4, "b": 4}, split="train")
    if kind == "file":
        link, target = root / "train" / "a" / "extra.png", next((outside / "a").iterdir())
    elif kind == "directory":
        link, target = root / "train" / "a" / "more", outside / "a"
    elif kind == "class-directory":
        link, target = root / "train" / "c", outside / "a"
    else:
        link, target = root / "train" / "b" / "again", root / "train" / "a"
    os.symlink(target, link)
    with pytest.raises(DataError) as err:
        load_source(root)
    message = str(err.value)
    assert str(link) in message and str(target.resolve()) in message
    figures("bad inputs refused", f"image folder with a {kind} symlink", message)
