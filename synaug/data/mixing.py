"""Which real and synthetic images a training set holds: per-class real fraction or count, per-class synthetic
ratio, the classes to augment, and the leakage guards.

Counts, for each class c with n_c real training images:
    real kept      k_c = real_count[c] if given, else round(real_fraction[c] * n_c)
    synthetic      s_c = round(synthetic_ratio[c] * k_c) for the augmented classes, else 0
So "double the glioma class" is ratio 1.0 for glioma, and "80% real + 20% synthetic" is real_fraction 0.8 with
synthetic_ratio 0.25 (0.2 of the class's images, relative to the 0.8 that are real).
The real subset is drawn with `subset_seed`, the synthetic images with `seed`: several classifier seeds can
share one real subset (and the generator trained on it). Each class has its own permutation per subset seed and
a fraction takes its prefix, so subsets are nested (the 0.2 subset lies inside the 0.4 one: a learning curve
adds images rather than redrawing them) and one class's fraction never changes another's images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from synaug.data.sources import DataError
from synaug.data.synthetic import SyntheticSource


def per_class(
    value: float | dict[str, float] | None, classes: list[str], default: float, what: str
) -> np.ndarray:
    """Expand a number or a {class: number} mapping to one value per class; unknown names are an error."""
    if value is None or isinstance(value, int | float):
        out = np.full(len(classes), default if value is None else float(value))
        return _non_negative(out, classes, what)
    unknown = sorted(set(value) - set(classes))
    if unknown:
        raise DataError(f"{what}: unknown class(es) {unknown}; classes are {classes}")
    out = np.array([float(value.get(c, default)) for c in classes])
    return _non_negative(out, classes, what)


def _non_negative(out: np.ndarray, classes: list[str], what: str) -> np.ndarray:
    bad = {c: float(v) for c, v in zip(classes, out, strict=True) if v < 0}  # plain numbers in the message
    if bad:
        raise DataError(f"{what}: negative value(s) {bad}; use 0 or more per class")
    return out


@dataclass
class TrainingSet:
    real: np.ndarray  # indices into the real source's items
    synthetic: np.ndarray  # indices into the synthetic items
    variants: dict[int, np.ndarray] = field(default_factory=dict)  # real index -> synthetic variants of it
    counts: pd.DataFrame | None = None  # per class: real available, real kept, synthetic


def synthetic_count(ratio: float, real_kept: int) -> int:
    """The counting rule: synthetic images of a class at `ratio`, relative to its kept real images."""
    return round(ratio * int(real_kept))


def plan(
    real_items: pd.DataFrame,
    classes: list[str],
    synthetic: SyntheticSource | None = None,
    *,
    real_fraction: float | dict[str, float] = 1.0,
    real_count: dict[str, int] | None = None,
    synthetic_ratio: float | dict[str, float] = 0.0,
    augment_classes: list[str] | None = None,
    replace_prob: float = 0.0,
    seed: int = 0,
    subset_seed: int | None = None,
    allow_unrecorded_train_set: bool = False,
) -> TrainingSet:
    """Choose the training set. `real_items` is the real source's table (all splits; train rows are used)."""
    frac = per_class(real_fraction, classes, 1.0, "real_fraction")
    ratio = per_class(synthetic_ratio, classes, 0.0, "synthetic_ratio")
    if augment_classes is not None:
        per_class(dict.fromkeys(augment_classes, 0.0), classes, 0.0, "augment_classes")  # name check
        ratio[[c not in augment_classes for c in classes]] = 0.0
    if (frac <= 0).any() or (frac > 1).any():
        raise DataError(
            f"real_fraction must be in (0, 1], got {dict(zip(classes, frac.tolist(), strict=True))}"
        )
    if ratio.any() and synthetic is None:
        raise DataError("synthetic_ratio > 0 needs at least one synthetic source (data.synthetic)")
    if replace_prob and synthetic is None:
        raise DataError("replace_prob > 0 needs a synthetic source with image-conditioned variants")

    subset_seed = seed if subset_seed is None else subset_seed
    labels, split = real_items["label"].to_numpy(), real_items["split"].to_numpy()
    real, rows = [], []
    for c, name in enumerate(classes):
        pool = np.flatnonzero((labels == c) & (split == "train"))
        k = real_count[name] if real_count and name in real_count else round(frac[c] * len(pool))
        # A selection manifest of some classes only (one cluster, for a per-cluster generator) trains on them.
        selected_out = k == 0 == len(pool) and ((labels == c) & (split == "unselected")).any()
        if not 1 <= k <= len(pool) and not selected_out:
            raise DataError(f"class '{name}': asked for {k} real training images, {len(pool)} available")
        real.append(np.sort(np.random.default_rng([subset_seed, c]).permutation(pool)[:k]))
        rows.append((name, len(pool), k))
    if real_count:
        per_class(dict.fromkeys(real_count, 0.0), classes, 0.0, "real_count")
    real = np.concatenate(real)
    counts = pd.DataFrame(rows, columns=["class", "real_available", "real_kept"]).set_index("class")
    counts["synthetic"] = 0
    if synthetic is None:
        return TrainingSet(real, np.empty(0, np.int64), counts=counts)

    usable = guard(real_items, real, synthetic, allow_unrecorded_train_set)
    rng = np.random.default_rng(seed)
    syn_labels = synthetic.items["label"].to_numpy()
    chosen = []
    for c, name in enumerate(classes):
        want = synthetic_count(ratio[c], counts.at[name, "real_kept"])
        pool = np.flatnonzero(usable & (syn_labels == c))
        if want > len(pool):
            raise DataError(
                f"class '{name}': synthetic_ratio {ratio[c]} asks for {want} synthetic images, "
                f"the synthetic source(s) hold {len(pool)} usable ones"
            )
        chosen.append(np.sort(rng.choice(pool, want, replace=False)))
        counts.at[name, "synthetic"] = want
    variants = {}
    if replace_prob:
        by_source: dict[str, list[int]] = {}
        for j in np.flatnonzero(usable):
            for sid in synthetic.sources(j):
                by_source.setdefault(sid, []).append(j)
        ids = real_items["id"].to_numpy()
        variants = {int(i): np.array(by_source[ids[i]]) for i in real if ids[i] in by_source}
        if not variants:
            raise DataError("replace_prob > 0 but no synthetic image records a kept real image as its source")
    return TrainingSet(real, np.concatenate(chosen), variants, counts)


def guard(
    real_items: pd.DataFrame,
    kept: np.ndarray,
    synthetic: SyntheticSource,
    allow_unrecorded_train_set: bool = False,
) -> np.ndarray:
    """Leakage guard. Returns which synthetic images may be used with this training set.

    - from a learned generator (its manifest names a checkpoint) that records neither a training set nor source
      images: refused unless `allow_unrecorded_train_set`, since nothing says it never saw validation/test
      images (the datamodule also refuses pixel copies of them, whatever the manifest says);
    - derived from (or learned from) a validation or test image: refused, naming the image;
    - a generator that learned from real images outside this training set (a reduced real set): refused,
      since its images carry the withheld ones into training;
    - derived from a withheld training image (an img2img variant of an image this run left out): not used.
    """
    split = dict(zip(real_items["id"], real_items["split"], strict=True))
    kept_ids = set(real_items["id"].to_numpy()[kept])
    usable = np.ones(len(synthetic.items), dtype=bool)
    rows = synthetic.items
    unrecorded = (rows["checkpoint"] != "") & (rows["train_set"] == "") & (rows["source"] == "")
    if unrecorded.any() and not allow_unrecorded_train_set:
        first = rows[unrecorded].iloc[0]
        raise DataError(
            f"synthetic source {synthetic.folder}: {int(unrecorded.sum())} image(s) from the learned generator "
            f"{first['generator']!r} (checkpoint {first['checkpoint'][:12]}) record no training set, so nothing "
            "shows it never learned from validation/test images; export it with its training set, or pass "
            "data.allow_unrecorded_train_set: true (recorded as a tag on the run)"
        )
    for fp in sorted(set(synthetic.items["train_set"]) - {""}):
        ids = synthetic.train_ids(fp)
        held = [i for i in ids if split.get(i) in ("val", "test")]
        if held:
            raise DataError(
                f"synthetic source {synthetic.folder}: its generator (train set {fp}) learned from "
                f"{len(held)} validation/test image(s), e.g. {held[0]}; refusing it"
            )
        outside = [i for i in ids if i not in kept_ids]
        if outside:
            raise DataError(
                f"synthetic source {synthetic.folder}: its generator (train set {fp}) learned from {len(outside)} "
                f"real image(s) outside this run's training set, e.g. {outside[0]}; train the generator on the "
                f"same real subset (subset_seed) or use all real images"
            )
    for j in range(len(synthetic.items)):
        src = synthetic.sources(j)
        bad = [s for s in src if split.get(s) in ("val", "test")]
        if bad:
            raise DataError(
                f"synthetic image {synthetic.items.at[j, 'file']} is derived from {split[bad[0]]} "
                f"image {bad[0]}; validation and test must stay unseen"
            )
        usable[j] = all(s in kept_ids for s in src)
    return usable


def epoch_order(
    train: np.ndarray, variants: dict[int, np.ndarray], replace_prob: float, seed: int, epoch: int
) -> np.ndarray:
    """One epoch's order of `train` rows, shuffled; with `replace_prob` each real row that has variants is
    swapped for one of them with that probability (DA-Fusion style), fresh each epoch."""
    rng = np.random.default_rng([seed, epoch])
    order = train.copy()
    if replace_prob:
        for pos, i in enumerate(order):
            v = variants.get(int(i))
            if v is not None and rng.random() < replace_prob:
                order[pos] = rng.choice(v)
    return rng.permutation(order)
