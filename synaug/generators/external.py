"""Imported folders: images generated elsewhere (e.g. thesis 2's DALL-E 2 variations) as a synthetic source,
with the provenance declared for them. A training-free generator kind (`import`).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

import pandas as pd

from synaug.data.images import IMAGE_EXTENSIONS, open_image, to_mode
from synaug.data.sources import DataError, load_source
from synaug.data.synthetic import Made, write_synthetic
from synaug.generators.registry import register


def import_folder(
    folder: str,
    out: str,
    generator: str,
    class_map: dict[str, str] | None = None,
    source_map: str | None = None,
    run_id: str = "external",
    checkpoint: str = "",
    train_ids: str | None = None,
    data: str | None = None,
    channels: Literal[1, 3] | None = None,
) -> Path:
    """Import externally generated images (e.g. thesis 2's DALL-E 2 variations) as a synthetic folder.

    The images are read from `folder/<class folder>/*` and written, with the provenance declared here, through
    SyntheticWriter into `out` (`<class>/<index>.png` in sorted file order, `manifest.csv`, and `imported.csv`
    mapping each original file to its new path). Rerunning resumes.

    Args:
        folder: one subfolder per class of images.
        out: the synthetic folder to write.
        generator: what made the images, for the manifest's `generator` column (e.g. `dalle2-variation`).
        class_map: subfolder name -> class name of the real dataset (default: the subfolder names are the class
            names); only mapped subfolders are imported when given.
        source_map: CSV with columns `file` (path relative to `folder`) and `source` (the real image ids it was
            derived from, `;`-separated): what the leakage guard needs for image variations. Files not in it
            have no source.
        run_id, checkpoint: the manifest's ids of the generator (a job id, a model version).
        train_ids: a text file of the real ids the generator learned from, one a line (none by default: DALL-E
            never saw the dataset).
        data: the real source; when given, class names and source ids are checked against it.
        channels: convert to 1 (grey) or 3 (RGB) channels (default: keep each image's grey or RGB mode).

    External images have no seed: the manifest's `seed` is empty.
    """
    folder, out = Path(folder), Path(out)
    subdirs = sorted(d.name for d in folder.iterdir() if d.is_dir())
    class_map = class_map or {d: d for d in subdirs}
    absent = sorted(set(class_map) - set(subdirs))
    if absent:
        raise DataError(f"{folder}: class_map names subfolder(s) {absent} that do not exist; found {subdirs}")
    files = {
        d: sorted(p for p in (folder / d).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        for d in class_map
    }
    sources: dict[str, list[str]] = {}
    if source_map:
        table = pd.read_csv(source_map, dtype=str, keep_default_na=False)
        if {"file", "source"} - set(table.columns):
            raise DataError(f"{source_map}: needs columns `file` and `source`; has {list(table.columns)}")
        known = {p.relative_to(folder).as_posix() for fs in files.values() for p in fs}
        stray = sorted(set(table["file"]) - known)
        if stray:
            raise DataError(f"{source_map}: file(s) not among the images imported from {folder}: {stray[:5]}")
        sources = {f: s.split(";") if s else [] for f, s in zip(table["file"], table["source"], strict=True)}
    ids = Path(train_ids).read_text().split() if train_ids else []
    if data:
        src = load_source(data, carve=False)
        wrong = sorted(set(class_map.values()) - set(src.classes))
        if wrong:
            raise DataError(f"class(es) {wrong} are not in {data}; its classes are {src.classes}")
        unknown = sorted({s for ss in sources.values() for s in ss} - set(src.items["id"]))
        if unknown:
            raise DataError(f"{source_map}: {len(unknown)} source id(s) not in {data}, e.g. {unknown[0]}")

    by_pair = {(c, k): p for d, c in class_map.items() for k, p in enumerate(files[d])}

    def make(batch: list[tuple[str, int]]) -> list[Made]:
        made = []
        for pair in batch:
            image = open_image(by_pair[pair])
            image = to_mode(image, channels or (1 if image.mode in ("L", "I;16", "I", "F", "LA") else 3))
            rel = by_pair[pair].relative_to(folder).as_posix()
            made.append(Made(image, "", sources.get(rel, [])))  # no seed: an empty `seed`
        return made

    settings = dict(
        generator=generator,
        folder=str(folder.resolve()),
        class_map=class_map,
        source_map=str(Path(source_map).resolve()) if source_map else None,
        run_id=run_id,
        checkpoint=checkpoint,
        channels=channels,
    )
    write_synthetic(
        out,
        settings,
        list(by_pair),
        make,
        generator=generator,
        run_id=run_id,
        checkpoint=checkpoint,
        train_ids=ids,
    )
    # Which original file each image is: the order is fixed (sorted per class), so the whole map is rewritten.
    with (out / "imported.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "path"])
        w.writerows([p.relative_to(folder).as_posix(), f"{c}/{k:06d}.png"] for (c, k), p in by_pair.items())
    return out


register(
    "import",
    "images generated elsewhere, imported with declared provenance; training-free",
    command=import_folder,
)
