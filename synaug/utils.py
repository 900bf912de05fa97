"""Small helpers every command shares: the device choice and a file's digest."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """`auto` (or None): CUDA when present, else the CPU; otherwise the device named (`cpu`, `cuda:1`, ...)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).expanduser().open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
