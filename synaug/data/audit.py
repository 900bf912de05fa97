"""`synaug data audit ROOT`: what is in a dataset before anything is trained on it.

Counts per class and split, classes absent from a split, the imbalance ratio, unreadable files, exact duplicates
(same bytes, sha256) and near duplicates (perceptual difference hash within `near_threshold` bits; groups of
bounded diameter that do not chain, `synaug.data.twins`) within and across splits, and label conflicts among
duplicates. `write_clean` writes a CSV manifest with every validation/test image that has an exact twin in an
earlier split (train, then val) removed; the source files are not touched. With `strict` (the default) the
command exits with status 1 when a file is unreadable or a class is missing from a split, so that a pipeline
can gate on it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from synaug.data.images import BadImageError, open_image
from synaug.data.sources import load_source
from synaug.data.twins import NEAR_BITS, bounded_groups, dhash, near_pairs  # noqa: F401 (re-exported)

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2, "": 0}


def _describe(items: pd.DataFrame, groups: list[list[int]]) -> dict:
    split, label = items["split"].to_numpy(), items["label"].to_numpy()
    cross = [g for g in groups if len(set(split[g])) > 1]
    conflicts = [g for g in groups if len(set(label[g])) > 1]
    with_train_twin = {i for g in cross for i in g if split[i] != "train" and "train" in set(split[g])}
    return {
        "groups": len(groups),
        "files_in_groups": sum(map(len, groups)),
        "within_split_groups": sum(len(set(split[g])) == 1 for g in groups),
        "cross_split_groups": len(cross),
        "test_with_train_twin": sum(split[i] == "test" for i in with_train_twin),
        "val_with_train_twin": sum(split[i] == "val" for i in with_train_twin),
        "label_conflict_groups": len(conflicts),
    }


def audit(
    root: str,
    write_clean: str | None = None,
    near_threshold: int = NEAR_BITS,
    data_root: str | None = None,
    report: str | None = None,
    strict: bool = True,
) -> dict:
    """Audit a dataset (image folder, MedMNIST .npz or CSV manifest) and print the findings.

    Args:
        root: the data source, as for `data.root`.
        write_clean: write a CSV manifest (path,label,split) without validation/test images that have an exact
            twin in an earlier split; use it with `data.root: OUT.csv` and `data.data_root: ROOT`.
        near_threshold: bits (of 256) of difference-hash distance up to which two images count as near
            duplicates. On brain MRI, 10 finds re-encoded and re-windowed copies of the same slice; around 16
            neighbouring slices of the same patient start to match.
        data_root: for CSV sources, the folder their paths are relative to.
        report: also write the findings as JSON to this file.
        strict: exit with status 1 (after reporting everything) when a file is unreadable or a class has no
            image in a split.
    """
    src = load_source(root, data_root=data_root, carve=False)
    items = src.items.copy()
    items["split"] = items["split"].replace("", "all")
    classes = src.classes

    def scan(i):
        try:
            img = (
                open_image(src.raw(i), name=items.at[i, "id"])
                if src.arrays is None
                else Image.fromarray(src.arrays[i])
            )
            return dhash(img), None
        except BadImageError as err:
            return None, str(err)

    with ThreadPoolExecutor(8) as pool:
        scanned = list(pool.map(scan, range(len(items))))
    unreadable = [e for _, e in scanned if e is not None]
    ok = np.array([h is not None for h, _ in scanned])

    counts = items.pivot_table(index="label", columns="split", values="id", aggfunc="count", fill_value=0)
    counts.index = [classes[i] for i in counts.index]
    train_counts = counts["train"] if "train" in counts else counts.sum(axis=1)
    exact = [list(g) for g in items.groupby("sha256").indices.values() if len(g) > 1]
    hashes = np.stack([h if h is not None else np.zeros(4, np.uint64) for h, _ in scanned])
    sha = items["sha256"].to_numpy()
    group = bounded_groups(hashes, near_threshold, ok)
    # near groups: bounded groups of readable images holding more than one distinct file
    near_groups = [
        list(g)
        for g in pd.Series(np.arange(len(items))).groupby(group).groups.values()
        if len(g) > 1 and ok[list(g)].all() and len(set(sha[list(g)])) > 1
    ]
    absent = {
        s: [c for c in classes if counts.at[c, s] == 0] for s in counts.columns if (counts[s] == 0).any()
    }
    findings = {
        "root": str(root),
        "images": len(items),
        "classes": classes,
        "counts": counts.to_dict(),
        "imbalance_ratio": float(train_counts.max() / train_counts.min()),
        "unreadable": unreadable,
        "absent_classes": absent,
        "exact_duplicates": _describe(items, exact),
        "near_duplicates": _describe(items, near_groups) | {"threshold_bits": near_threshold},
    }

    print(f"{root}: {len(items)} images, {len(classes)} classes")
    print(counts.to_string())
    print(f"imbalance ratio (largest / smallest training class): {findings['imbalance_ratio']:.2f}")
    for split, missing in absent.items():
        print(f"PROBLEM: class(es) {missing} have no image in the {split} split")
    print(f"unreadable files: {len(unreadable)}")
    for e in unreadable:
        print(f"  {e}")
    for kind in ("exact_duplicates", "near_duplicates"):
        d = findings[kind]
        print(
            f"{kind.replace('_', ' ')}: {d['groups']} groups ({d['files_in_groups']} files); "
            f"{d['cross_split_groups']} groups span splits; {d['test_with_train_twin']} test and "
            f"{d['val_with_train_twin']} val images have a twin in train; "
            f"{d['label_conflict_groups']} groups with conflicting labels"
        )

    if write_clean:
        split = items["split"].to_numpy()
        drop = np.zeros(len(items), dtype=bool)
        for g in exact:
            first = min(SPLIT_ORDER.get(split[i], 0) for i in g)
            drop[[i for i in g if SPLIT_ORDER.get(split[i], 0) > first]] = True
        base = Path(data_root or (src.root if src.root.is_dir() else src.root.parent)).resolve()
        paths = (
            [str(Path(p).resolve().relative_to(base)) for p in items["path"]] if src.arrays is None else None
        )
        if paths is None:
            raise ValueError("write_clean needs a file-based source (folder or CSV); a .npz has no paths")
        clean = pd.DataFrame(
            {
                "path": paths,
                "label": [classes[i] for i in items["label"]],
                "split": items["split"].replace("all", ""),
            }
        )[~drop]
        clean.to_csv(write_clean, index=False)
        findings["clean"] = {"path": write_clean, "removed": int(drop.sum()), "kept": int((~drop).sum())}
        print(
            f"wrote {write_clean}: {int((~drop).sum())} images, {int(drop.sum())} val/test twins removed; "
            f"use data.root: {write_clean} with data.data_root: {base}"
        )
    if report:
        import json

        Path(report).write_text(json.dumps(findings, indent=2, default=str))
    if strict and (unreadable or absent):
        print(f"audit failed: {len(unreadable)} unreadable file(s), classes missing from {sorted(absent)}")
        raise SystemExit(1)
    return findings
