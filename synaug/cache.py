"""On-disk cache for expensive, deterministic tensors (decoded images, frozen features, embeddings).

Entries are safetensors files named by a hash of their key, so a changed dataset, model or weight file gives a
new entry rather than a stale hit. The folder is `$SYNAUG_CACHE`, else `~/.cache/synaug`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def cache_dir() -> Path:
    return Path(os.environ.get("SYNAUG_CACHE", Path.home() / ".cache" / "synaug"))


def key_hash(**key) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_tensors(
    kind: str, key: dict, compute: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Return `compute()`, stored under `cache_dir()/kind/<hash(key)>.safetensors` after the first call."""
    path = cache_dir() / kind / f"{key_hash(**key)}.safetensors"
    if path.exists():
        return load_file(path)
    tensors = {k: v.contiguous().cpu() for k, v in compute().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    # Write then rename: a run killed mid-write must not leave a truncated entry that later runs trust.
    save_file(tensors, tmp, metadata={"key": json.dumps(key, sort_keys=True, default=str)})
    tmp.replace(path)
    return tensors
