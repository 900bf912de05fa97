"""Near-duplicate images by perceptual hash: the audit, the carving of splits and the twin guards share these.

A 256-bit difference hash (`dhash`) per image; two images are near twins when their hashes differ in at most
`threshold` bits. Groups do not chain: connected components of the "within threshold" graph grow through chains
of neighbouring MRI slices until one group holds most of a dataset (6,332 of 6,400 images, all four classes, in
one case), which makes them useless for splitting. `bounded_groups` is leader clustering instead: each group is
the images within `threshold` of its first image, so no two members differ by more than 2 x threshold.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from synaug.cache import cached_tensors
from synaug.data.images import BadImageError, open_image, to_mode

NEAR_BITS = (
    10  # of 256: re-encoded and re-windowed copies of one brain MRI slice; ~16 matches neighbouring slices
)


def dhash(img: Image.Image, size: int = 16) -> np.ndarray:
    """Difference hash: the signs of horizontal gradients of a (size+1) x size grey thumbnail, as uint64 words.
    Robust to resizing, recompression and small intensity changes; not to crops or flips. 16 x 16 = 256 bits:
    the common 8 x 8 hash cannot tell apart brain MRI slices of different patients, which all look alike at
    that scale."""
    a = np.asarray(to_mode(img, 1).resize((size + 1, size), Image.Resampling.BILINEAR), dtype=np.int16)
    return np.packbits((a[:, 1:] > a[:, :-1]).ravel()).view(">u8").astype(np.uint64)


def array_hash(a: np.ndarray) -> np.ndarray:
    """`dhash` of a uint8 image array, (C, H, W) with C in {1, 3} or (H, W[, C])."""
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    return dhash(Image.fromarray(np.ascontiguousarray(a)))


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances (len(a), len(b)) between two stacks of hashes (n, words)."""
    return np.bitwise_count(a[:, None, :] ^ b[None, :, :]).sum(-1, dtype=np.int32)


def source_hashes(src) -> tuple[np.ndarray, np.ndarray]:
    """The `dhash` of every item of an `ImageSource` (n, 4) and which items could be read, cached by content."""

    def one(i):
        try:
            img = Image.fromarray(src.arrays[i]) if src.arrays is not None else open_image(src.raw(i))
            return dhash(img)
        except BadImageError:
            return None

    def compute():
        with ThreadPoolExecutor(8) as pool:
            hashes = list(pool.map(one, range(len(src.items))))
        ok = np.array([h is not None for h in hashes])
        stack = np.stack([h if h is not None else np.zeros(4, np.uint64) for h in hashes])
        return {"hashes": torch.from_numpy(stack.view(np.int64)), "ok": torch.from_numpy(ok)}

    # keyed by the files' content only: carving changes splits, not pixels
    key = {"sha256": hashlib.sha256("\n".join(src.items["sha256"]).encode()).hexdigest()}
    out = cached_tensors("dhash", key, compute)
    return out["hashes"].numpy().view(np.uint64), out["ok"].numpy()


def near_pairs(hashes: np.ndarray, threshold: int, chunk: int = 512) -> list[tuple[int, int]]:
    """All pairs i < j whose hashes (n, words) differ in at most `threshold` bits."""
    pairs = []
    for start in range(0, len(hashes), chunk):
        dist = distances(hashes[start : start + chunk], hashes)
        i, j = np.nonzero(dist <= threshold)
        i += start
        keep = i < j
        pairs += zip(i[keep].tolist(), j[keep].tolist(), strict=True)
    return pairs


def bounded_groups(hashes: np.ndarray, threshold: int, ok: np.ndarray | None = None) -> np.ndarray:
    """A group id per image (leader clustering, in order): image i, if not yet grouped, leads a group of every
    ungrouped image within `threshold` bits of it. Members of a group differ by at most 2 x threshold: groups do
    not chain. Unreadable images (`ok` False) each get a group of their own."""
    n = len(hashes)
    ok = np.ones(n, dtype=bool) if ok is None else ok
    group = np.full(n, -1, dtype=np.int64)
    next_id = 0
    for i in range(n):
        if group[i] >= 0:
            continue
        if ok[i]:
            near = (distances(hashes[i : i + 1], hashes)[0] <= threshold) & (group < 0) & ok
            group[near] = next_id
        group[i] = next_id
        next_id += 1
    return group


def has_near_twin(
    hashes: np.ndarray, query: np.ndarray, reference: np.ndarray, threshold: int, chunk: int = 1024
) -> np.ndarray:
    """For each row of `query` (indices), whether some row of `reference` is within `threshold` bits."""
    out = np.zeros(len(query), dtype=bool)
    if len(reference) == 0:
        return out
    ref = hashes[reference]
    for start in range(0, len(query), chunk):
        rows = query[start : start + chunk]
        out[start : start + len(rows)] = (distances(hashes[rows], ref) <= threshold).any(axis=1)
    return out
