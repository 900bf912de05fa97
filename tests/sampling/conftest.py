"""A tiny image folder with two visually distinct groups per class: bright discs and horizontal stripes."""

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

SIZE = 32


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one thread is faster, and on a shared CPU a parallel region waits for a
    descheduled OpenMP thread, which made each forward pass cost ~1.5 s instead of ~0.05 s."""
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


def disc(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.uniform(12, 20, size=2)
    r = rng.uniform(7, 11)
    return np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r**2, 230, 20).astype(np.uint8)


def stripes(rng: np.random.Generator) -> np.ndarray:
    period = int(rng.integers(4, 7))
    rows = (np.arange(SIZE) + int(rng.integers(period))) % period < period // 2
    return np.repeat(np.where(rows, 200, 30)[:, None], SIZE, axis=1).astype(np.uint8)


@pytest.fixture(scope="session")
def groups_root(tmp_path_factory) -> Path:
    """`root/<class>/<group>_<i>.png`: classes `a` and `b`, each 8 discs and 8 stripes (grey, 32 px)."""
    root = tmp_path_factory.mktemp("groups")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir()
        for i in range(8):
            Image.fromarray(disc(rng)).save(root / cls / f"disc_{i}.png")
            Image.fromarray(stripes(rng)).save(root / cls / f"stripes_{i}.png")
    return root
