"""Synthetic image folders and their provenance manifest.

A synthetic source is a folder of images plus `manifest.csv`, one row per image:

    path        image file, relative to the folder
    class       class name (must be one of the real source's classes)
    generator   what made it (e.g. `diffusion`, `pggan`, `sd-img2img`, `transform`, `import`)
    run_id      the run (MLflow run id) or other id of the generator that made it
    checkpoint  sha256 of the generator checkpoint ('' when there is none)
    seed        the seed that reproduces this image
    source      ids of the real images it was derived from, `;`-separated ('' for none): img2img, transforms
    train_set   fingerprint of the real images the generator learned from ('' for none); the ids are listed in
                `train_sets/<train_set>.txt` beside the manifest

`SyntheticWriter` appends image then row, so a killed generation loses at most the image in flight, and
`done()` tells a resumed generation exactly which (class, index) pairs exist. `write_synthetic` is the one
resumable loop every generator kind writes through.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from synaug.data.sources import DataError

COLUMNS = ["path", "class", "generator", "run_id", "checkpoint", "seed", "source", "train_set"]


def train_set_fingerprint(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


@dataclass
class SyntheticSource:
    folder: Path
    items: pd.DataFrame  # COLUMNS + `file` (absolute path) + `label` (index into the real classes)

    def sources(self, i: int) -> list[str]:
        s = self.items.at[i, "source"]
        return s.split(";") if s else []

    def train_ids(self, fingerprint: str) -> list[str]:
        return (self.folder / "train_sets" / f"{fingerprint}.txt").read_text().split("\n")


def read_synthetic(folder: str | Path, classes: Sequence[str]) -> SyntheticSource:
    folder = Path(folder).expanduser().resolve()
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise DataError(
            f"{folder}: no manifest.csv; a synthetic folder needs one (see synaug.data.synthetic)"
        )
    items = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    missing = set(COLUMNS) - set(items.columns)
    if missing:
        raise DataError(f"{manifest}: missing column(s) {sorted(missing)}")
    unknown = sorted(set(items["class"]) - set(classes))
    if unknown:
        raise DataError(f"{manifest}: class(es) {unknown} are not among the real classes {list(classes)}")
    items["file"] = [str((folder / p).resolve()) for p in items["path"]]
    escaping = [
        p for p, f in zip(items["path"], items["file"], strict=True) if not Path(f).is_relative_to(folder)
    ]
    if escaping:
        raise DataError(f"{manifest}: path escapes the synthetic folder: {escaping[0]}")
    items["label"] = items["class"].map(list(classes).index)
    return SyntheticSource(folder, items)


class SyntheticWriter:
    """Write generated images into `folder` as `<class>/<index>.png` with their manifest rows."""

    def __init__(
        self,
        folder: str | Path,
        generator: str,
        run_id: str,
        checkpoint: str = "",
        train_ids: Sequence[str] | None = None,
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.manifest = self.folder / "manifest.csv"
        self.meta = dict(generator=generator, run_id=run_id, checkpoint=checkpoint, train_set="")
        if train_ids:
            fp = train_set_fingerprint(train_ids)
            (self.folder / "train_sets").mkdir(exist_ok=True)
            (self.folder / "train_sets" / f"{fp}.txt").write_text("\n".join(sorted(train_ids)))
            self.meta["train_set"] = fp
        if not self.manifest.exists():
            with self.manifest.open("w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)

    def done(self) -> set[tuple[str, int]]:
        """(class, index) pairs already written: a row exists and so does its file."""
        rows = pd.read_csv(self.manifest, dtype=str, keep_default_na=False)
        return {
            (c, int(Path(p).stem))
            for c, p in zip(rows["class"], rows["path"], strict=True)
            if (self.folder / p).is_file()
        }

    def write(
        self, image: np.ndarray | Image.Image, cls: str, index: int, seed: int, source: Sequence[str] = ()
    ) -> Path:
        """`image`: PIL or uint8 array (C, H, W) with C in {1, 3}."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
        rel = Path(cls) / f"{index:06d}.png"
        (self.folder / cls).mkdir(exist_ok=True)
        image.save(self.folder / rel)
        row = {**self.meta, "path": rel.as_posix(), "class": cls, "seed": seed, "source": ";".join(source)}
        with self.manifest.open("a", newline="") as f:
            csv.writer(f).writerow([row[c] for c in COLUMNS])
        return self.folder / rel


def claim_folder(out: Path, settings: dict) -> None:
    """Make `out` the folder of one generation with `settings`; a rerun with the same settings resumes it."""
    file = out / "generation.json"
    if file.exists():
        before = json.loads(file.read_text())
        if before != settings:
            raise ValueError(
                f"{out} holds images generated with {before}; this call asks for {settings}. "
                "Resume with the same settings, or write to another folder."
            )
    elif (out / "manifest.csv").exists():
        raise ValueError(
            f"{out} already holds a synthetic manifest from another generation; use a new folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(settings, indent=2))


def image_seed(seed: int, cls: str, index: int) -> int:
    """The seed of image `index` of class `cls`: a hash, so it is independent of batching and of other classes."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{cls}/{index}".encode()).digest()[:8], "big") >> 1


@dataclass
class Made:
    """One image a generator made for a (class, index) pair: the image, its seed ('' for none), its sources."""

    image: np.ndarray | Image.Image
    seed: int | str
    source: Sequence[str] = ()


def write_synthetic(
    out: str | Path,
    settings: dict,
    wanted: Sequence[tuple[str, int]],
    make: Callable[[list[tuple[str, int]]], Sequence[Made]],
    *,
    generator: str,
    run_id: str,
    checkpoint: str = "",
    train_ids: Sequence[str] | None = None,
    batch_size: int = 1,
) -> Path:
    """Write the images `wanted` ((class, index) pairs) into the synthetic folder `out`, resuming what is there.

    `settings` (what, with the seeds, determines the images) claim the folder (`claim_folder`); the pairs already
    written are skipped, and `make` is called on batches of at most `batch_size` of the others, returning one
    `Made` per pair. Rerunning after a kill therefore makes exactly the missing images. Returns `out`.
    """
    out = Path(out)
    claim_folder(out, settings)
    writer = SyntheticWriter(out, generator, run_id, checkpoint, train_ids)
    done = writer.done()
    todo = [w for w in wanted if w not in done]
    with tqdm(total=len(todo), desc=f"{generator} into {out}", unit="img", disable=not todo) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            made = make(batch)
            for (c, k), m in zip(batch, made, strict=True):
                writer.write(m.image, c, k, m.seed, m.source)
            bar.update(len(batch))
    return out
