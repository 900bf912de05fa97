"""Real image sources behind one interface: an image folder, a MedMNIST `.npz`, a CSV manifest.

`load_source(path)` returns an `ImageSource`: its class names, a table of items (`id`, `label`, `split`,
`path`), a content fingerprint and `decode()`. Splits are `train`, `val` and `test`. Where the source has no
validation split, one is carved from train; where it has no splits at all, train/val/test are carved. Carving
is seeded, stratified by class, and assigns whole groups to one side: the subject (patient) groups the source
names (a `group` column in a CSV manifest, or `group_pattern` on file names), else near-duplicate groups
(perceptual hash, bounded diameter, across classes; `synaug.data.twins`), so that neither a patient nor a
re-encoded copy of an image sits on both sides. Medical practice splits by patient, not by image.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from synaug.cache import cached_tensors, file_sha256
from synaug.data.images import IMAGE_EXTENSIONS, BadImageError, load_image
from synaug.data.twins import NEAR_BITS, bounded_groups, source_hashes

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
OnBad = Literal["error", "skip"]


class DataError(ValueError):
    """A dataset that cannot be used as given; the message says what and where."""


@dataclass
class ImageSource:
    root: Path
    classes: list[str]
    items: pd.DataFrame  # id, label, split, path (files) ; row order is the index used everywhere
    arrays: np.ndarray | None = None  # (N, H, W[, C]) uint8 for array-backed sources, in `items` order
    missing: list[str] = field(default_factory=list)  # manifest rows left out with on_bad_image="skip"
    fingerprint: str = field(init=False)

    def __post_init__(self):
        if len(self.classes) < 2:
            raise DataError(
                f"{self.root}: found {len(self.classes)} class(es) {self.classes}; a classifier needs at least 2"
            )
        counts = self.items.groupby("label").size().reindex(range(len(self.classes)), fill_value=0)
        empty = [self.classes[i] for i, n in counts.items() if n == 0]
        if empty:
            raise DataError(f"{self.root}: class(es) with no images: {empty}")
        self.items = self.items.reset_index(drop=True)
        if "sha256" not in self.items:
            self.items["sha256"] = self._hashes()
        h = hashlib.sha256()
        for row in self.items[["id", "label", "split", "sha256"]].itertuples(index=False):
            h.update("\t".join(map(str, row)).encode() + b"\n")
        self.fingerprint = h.hexdigest()

    def __len__(self) -> int:
        return len(self.items)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.items["split"].to_numpy() == split)

    def raw(self, i: int) -> bytes | np.ndarray:
        return self.arrays[i] if self.arrays is not None else Path(self.items.at[i, "path"]).read_bytes()

    def _hashes(self) -> list[str]:
        if self.arrays is not None:
            return [hashlib.sha256(a.tobytes()).hexdigest() for a in self.arrays]
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(file_sha256, self.items["path"]))

    def load(self, i: int, size: int, channels: int) -> np.ndarray:
        """One image as (channels, size, size) uint8; raises BadImageError naming the file."""
        if self.arrays is not None:
            return load_image(_png(self.arrays[i]), size, channels, name=self.items.at[i, "id"])
        return load_image(self.items.at[i, "path"], size, channels)

    def decode(
        self, indices: Sequence[int], size: int, channels: int, on_bad: OnBad = "error"
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Decode `indices` into one uint8 tensor (n, channels, size, size), cached on disk by content.

        Returns the tensor and the indices it holds: with `on_bad="skip"` unreadable images are left out
        (and logged), with `"error"` the first one raises BadImageError naming the file.
        """
        indices = np.asarray(indices, dtype=np.int64)
        key = dict(
            source=self.fingerprint,
            indices=hashlib.sha256(indices.tobytes()).hexdigest(),
            size=size,
            channels=channels,
            on_bad=on_bad,
        )

        def compute():
            x, kept = decode_all(lambda i: self.load(int(i), size, channels), indices, size, channels, on_bad)
            return {"images": x, "indices": torch.from_numpy(kept)}

        out = cached_tensors("decoded", key, compute)
        return out["images"], out["indices"].numpy()


def decode_all(
    load, keys: Sequence, size: int, channels: int, on_bad: OnBad
) -> tuple[torch.Tensor, np.ndarray]:
    """`load(key)` for every key on a thread pool (PIL releases the GIL while decoding), stacked as uint8.

    Returns the stack and the keys it holds; with `on_bad="skip"` images raising BadImageError are left out."""

    def one(k):
        try:
            return load(k)
        except BadImageError as err:
            if on_bad == "error":
                raise
            log.warning("skipping %s", err)
            return None

    with ThreadPoolExecutor(8) as pool:
        images = list(tqdm(pool.map(one, keys), total=len(keys), desc="decoding", disable=len(keys) < 2000))
    kept = np.array([k for k, a in zip(keys, images, strict=True) if a is not None])
    stack = [a for a in images if a is not None]
    x = (
        torch.from_numpy(np.stack(stack))
        if stack
        else torch.empty(0, channels, size, size, dtype=torch.uint8)
    )
    return x, kept


def _png(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def load_source(
    path: str | Path,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    classes: Sequence[str] | None = None,
    data_root: str | Path | None = None,
    carve: bool = True,
    group_pattern: str | None = None,
    near_threshold: int = NEAR_BITS,
    on_bad_image: OnBad = "error",
) -> ImageSource:
    """Open a folder, a MedMNIST `.npz` or a CSV manifest (`path,label[,split][,group]`) as an ImageSource.

    CSV paths are relative to `data_root` (default: the CSV's folder) and may not point outside it. A listed
    file that is not on disk is an error naming it, or with `on_bad_image="skip"` a row left out and named in
    `missing` (as the datamodule skips unreadable images).
    `carve=False` keeps the splits exactly as the source has them (what `synaug data audit` reports on).
    `group_pattern`: a regular expression on file names whose first capture group (else the whole match) names
    the subject, e.g. `^(P\\d+)_` for `P012_slice07.png`; a name it does not match is an error.
    `near_threshold`: hash bits within which images are near duplicates, grouped for carving when the source
    names no subjects.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        src = _from_folder(path)
    elif path.suffix == ".npz":
        src = _from_npz(path, classes)
    elif path.suffix == ".csv":
        src = _from_csv(path, Path(data_root).expanduser() if data_root else path.parent, on_bad_image)
    elif not path.exists():
        raise DataError(f"data source not found: {path}")
    else:
        raise DataError(f"{path}: not a folder, .npz or .csv data source")
    if group_pattern:
        names = [Path(i).name for i in src.items["id"]]
        found = [re.search(group_pattern, n) for n in names]
        missed = [n for n, m in zip(names, found, strict=True) if m is None]
        if missed:
            raise DataError(
                f"{path}: group_pattern {group_pattern!r} does not match {len(missed)} file(s), e.g. {missed[0]}"
            )
        src.items["group"] = [m.group(1) if m.groups() else m.group(0) for m in found]
    return _carve_splits(src, val_fraction, test_fraction, seed, near_threshold) if carve else src


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _refuse_links(root: Path) -> None:
    """The rule of every source: nothing outside the data root. A symbolic link whose target lies outside is
    refused, and so is a directory link inside it (it would list its images twice, or loop)."""
    real = root.resolve()
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            link = Path(folder) / name
            if not link.is_symlink():
                continue
            target = link.resolve()
            if not target.is_relative_to(real):
                raise DataError(
                    f"{link}: symbolic link to {target}, outside the data root {real}; copy the images "
                    "into the root, or point data.root at a folder holding both"
                )
            if target.is_dir():
                raise DataError(
                    f"{link}: symbolic link to the folder {target} inside the data root; remove the link "
                    "(its images are already in the root)"
                )


def _from_folder(root: Path) -> ImageSource:
    _refuse_links(root)
    sub = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    split_dirs = [s for s in sub if s in SPLITS]
    layout = {s: root / s for s in split_dirs} if split_dirs else {"": root}
    classes = sorted({d.name for base in layout.values() for d in base.iterdir() if d.is_dir()})
    rows = []
    for split, base in layout.items():
        for c, name in enumerate(classes):
            folder = base / name
            files = _list_images(folder) if folder.is_dir() else []
            if folder.is_dir() and not files:
                raise DataError(
                    f"{folder}: class folder is empty (no {'/'.join(sorted(IMAGE_EXTENSIONS))} files)"
                )
            rows += [(str(p.relative_to(root)), c, split, str(p)) for p in files]
    items = pd.DataFrame(rows, columns=["id", "label", "split", "path"])
    return ImageSource(root, classes, items)


MEDMNIST_CLASSES = {"breastmnist": ["malignant", "normal_benign"], "pneumoniamnist": ["normal", "pneumonia"]}


def _from_npz(path: Path, classes: Sequence[str] | None) -> ImageSource:
    with np.load(path) as z:
        keys = set(z.files)
        for s in SPLITS:
            if (f"{s}_images" in keys) != (f"{s}_labels" in keys):
                have, lack = (f"{s}_images", f"{s}_labels")[:: 1 if f"{s}_images" in keys else -1]
                raise DataError(
                    f"{path}: has {have} but no {lack}; a split needs both (keys: {sorted(keys)})"
                )
        parts = [(s, z[f"{s}_images"], z[f"{s}_labels"]) for s in SPLITS if f"{s}_images" in keys]
    for s, im, lab in parts:
        if len(im) != len(lab):
            raise DataError(
                f"{path}: {len(im)} {s}_images but {len(lab)} {s}_labels; they must match one to one"
            )
    if not parts:
        raise DataError(f"{path}: no MedMNIST keys (train_images, train_labels, ...) in the file")
    labels = np.concatenate([np.asarray(lab).reshape(len(lab), -1)[:, 0] for _, _, lab in parts]).astype(
        np.int64
    )
    if classes is None:
        classes = MEDMNIST_CLASSES.get(path.stem.split("_")[0]) or [str(i) for i in range(labels.max() + 1)]
    ids = [f"{s}/{i}" for s, im, _ in parts for i in range(len(im))]
    splits = [s for s, im, _ in parts for _ in range(len(im))]
    items = pd.DataFrame({"id": ids, "label": labels, "split": splits, "path": None})
    return ImageSource(path, list(classes), items, arrays=np.concatenate([im for _, im, _ in parts]))


def _from_csv(path: Path, root: Path, on_bad_image: OnBad = "error") -> ImageSource:
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise DataError(f"{path}: manifest lacks column(s) {sorted(missing)}; expected path,label[,split]")
    root = root.resolve()
    full = [(root / p).resolve() for p in table["path"]]
    for p, f in zip(table["path"], full, strict=True):
        if not f.is_relative_to(root):
            raise DataError(f"{path}: manifest path escapes the data root {root}: {p} -> {f}")
    on_disk = np.array([f.is_file() for f in full], dtype=bool)
    missing = table.loc[~on_disk, "path"].tolist()
    if missing and on_bad_image == "error":
        raise DataError(
            f"{path}: manifest names a file that does not exist under {root}: {missing[0]} "
            "(data.on_bad_image: skip leaves such rows out)"
        )
    table, resolved = (
        table[on_disk].reset_index(drop=True),
        [str(f) for f, ok in zip(full, on_disk, strict=True) if ok],
    )
    classes = sorted(table["label"].unique())
    split = table.get("split", "")
    bad = set(table["split"]) - set(SPLITS) if "split" in table else set()
    if bad:
        raise DataError(f"{path}: unknown split value(s) {sorted(bad)}; use train, val, test")
    items = pd.DataFrame(
        {"id": table["path"], "label": table["label"].map(classes.index), "split": split, "path": resolved}
    )
    if "group" in table:  # the subject (patient) of each image: carving keeps a group on one side
        if (table["group"] == "").any():
            raise DataError(
                f"{path}: the group column is empty for {int((table['group'] == '').sum())} row(s)"
            )
        items["group"] = table["group"].to_numpy()
    return ImageSource(root, classes, items, missing=missing)


def _carve_splits(
    src: ImageSource, val_fraction: float, test_fraction: float, seed: int, near_threshold: int = NEAR_BITS
) -> ImageSource:
    items = src.items.copy()
    unsplit = items["split"] == ""
    if not unsplit.any() and (items["split"] == "val").any():
        return src
    if "group" not in items:  # no subjects named: near-duplicate groups (which hold exact twins too)
        hashes, ok = source_hashes(src)
        items["group"] = bounded_groups(hashes, near_threshold, ok).astype(str)
    if unsplit.any():
        items.loc[unsplit, "split"] = _group_split(
            items[unsplit], {"test": test_fraction, "val": val_fraction}, seed
        )
    if not (items["split"] == "val").any():
        train = items["split"] == "train"
        items.loc[train, "split"] = _group_split(items[train], {"val": val_fraction}, seed)
    for s in SPLITS:
        if not (items["split"] == s).any():
            raise DataError(f"{src.root}: the {s} split is empty")
    src.items = items
    src.__post_init__()  # new splits, new fingerprint
    return src


def _group_split(items: pd.DataFrame, fractions: dict[str, float], seed: int) -> np.ndarray:
    """Seeded split, stratified by label, assigning whole groups (`group`, across classes: a group counts
    towards the class most of its images have)."""
    rng = np.random.default_rng(seed)
    out = np.full(len(items), "train", dtype=object)
    pos = {i: k for k, i in enumerate(items.index)}
    major = items.groupby("group")["label"].agg(lambda s: s.mode().iloc[0])
    members = items.groupby("group").groups
    for _, group_names in major.groupby(major, sort=True):
        groups = [members[g] for g in group_names.index]
        rng.shuffle(groups)
        n, taken = int(sum(map(len, groups))), 0
        for split, frac in fractions.items():
            want, got = round(frac * n), 0
            while groups and got < want:
                g = groups.pop()
                out[[pos[i] for i in g]] = split
                got += len(g)
            taken += got
    return out
