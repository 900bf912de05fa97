"""On-disk cache for expensive, deterministic tensors (decoded images, frozen features, embeddings).

Entries are safetensors files named by a hash of their key, so a changed dataset, model or weight file gives a
new entry rather than a stale hit. `cached_rows` keeps one row per content id instead (an image's sha256), so
that runs over different subsets of a dataset compute each row once. The folder is `$SYNAUG_CACHE`, else
`~/.cache/synaug`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).expanduser().open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    _write(path, tensors, {"key": json.dumps(key, sort_keys=True, default=str)})
    return tensors


def cached_rows(
    kind: str, key: dict, ids: Sequence[str], compute: Callable[[np.ndarray], torch.Tensor]
) -> torch.Tensor:
    """One row per id (n, ...): rows stored under `key` are read back, `compute(positions)` gives the others.

    `ids` name the rows' content (e.g. images' sha256), so repeated ids are computed once and any later call
    with the same key, whatever its other ids, reuses them. `compute` gets the positions in `ids` of the ids not
    stored yet (one per id) and returns their rows in that order. The new rows become one more shard in
    `cache_dir()/kind/<hash(key)>/`; runs racing on the same ids store them twice, which is harmless.
    """
    folder = cache_dir() / kind / key_hash(**key)
    rows: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            stored = f.get_tensor("rows")
            rows.update(zip(json.loads(f.metadata()["ids"]), stored, strict=True))
    missing = list(dict.fromkeys(i for i in ids if i not in rows))
    if missing:
        first = {i: p for p, i in reversed(list(enumerate(ids)))}
        new = compute(np.array([first[i] for i in missing], dtype=np.int64)).contiguous().cpu()
        if len(new) != len(missing):
            raise ValueError(f"cached_rows({kind}): compute gave {len(new)} rows for {len(missing)} ids")
        meta = {"ids": json.dumps(missing), "key": json.dumps(key, sort_keys=True, default=str)}
        _write(folder / f"{key_hash(ids=missing)}.safetensors", {"rows": new}, meta)
        rows.update(zip(missing, new, strict=True))
    return torch.stack([rows[i] for i in ids]) if len(ids) else torch.empty(0)


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    # Write then rename: a run killed mid-write must not leave a truncated entry that later runs trust.
    save_file(tensors, tmp, metadata=metadata)
    tmp.replace(path)
