"""The `transform` generator: conventional transforms of real TRAINING images, written as a synthetic source.

Until the learned generators feed the experiment grids, a `transform` folder lets every grid run end to end, and
it stays a baseline a generator has to beat: synthetic images that help no more than transformed copies of the
real ones add nothing beyond conventional augmentation. Each image is one real training image of the chosen
real subset through a policy (`medical` by default: no inversion or posterisation, see
`synaug.data.transforms`). The manifest records, per image, the real image it came
from (`source`: the leakage guard and DA-Fusion's `replace_prob` use it) and, for the folder, the real training
images it drew from (`train_sets/`): the guard then refuses the folder in a run whose real training set lacks
any of them, so a reduced real set needs a folder made from that same subset (`real_fraction`, `subset_seed`).

    python -m synaug.generators.transform --data ../shared/data/brain_tumor_mri \
        --out outputs/synthetic/brain-transform --ratio '{glioma: 1.0}' --image_size 128
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from synaug.data.mixing import plan, synthetic_count
from synaug.data.sources import ImageSource, load_source
from synaug.data.synthetic import Made, image_seed, train_set_fingerprint, write_synthetic
from synaug.data.transforms import Policy, policy_transform
from synaug.generators.registry import register


def transform_generate(
    data: str,
    out: str,
    per_class: int | dict[str, int] | None = None,
    ratio: float | dict[str, float] | None = None,
    policy: Policy = "medical",
    image_size: int = 128,
    channels: Literal[1, 3] = 1,
    seed: int = 0,
    real_fraction: float | dict[str, float] = 1.0,
    real_count: dict[str, int] | None = None,
    subset_seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> Path:
    """Write transformed real training images into `out`, resuming what is there.

    Args:
        data: the real source (image folder, MedMNIST .npz or CSV manifest), as `data.root`.
        out: the synthetic folder (`<class>/<index>.png` + `manifest.csv`, see `synaug.data.synthetic`).
        per_class: images per class, one number for every class or a mapping class -> number.
        ratio: instead of `per_class`: images per class as a multiple of the class's kept real images, counted
            as `data.synthetic_ratio` counts them (one number for every class, or a mapping).
        policy: the conventional policy applied to each image (`none` makes plain copies).
        image_size, channels: as the datamodule's; images are written at this size.
        seed: image k of class c is transformed under `image_seed(seed, c, k)`, recorded in the manifest.
        real_fraction, real_count, subset_seed: the real training subset to draw from, chosen exactly as
            `ClassificationData` chooses it with the same values (`data.subset_seed`), so that a run on that
            subset accepts this folder. Within a class, every subset image is used once before any twice.
        val_fraction, test_fraction, split_seed: as the datamodule's, so that the splits (and ids) agree.

    Returns the output folder.
    """
    if (per_class is None) == (ratio is None):
        raise ValueError("give either per_class or ratio")
    src = load_source(data, val_fraction=val_fraction, test_fraction=test_fraction, seed=split_seed)
    ts = plan(
        src.items,
        src.classes,
        real_fraction=real_fraction,
        real_count=real_count,
        seed=subset_seed,
        subset_seed=subset_seed,
    )
    if ratio is not None:
        counts = needed(ts.counts["real_kept"], ratio)
    else:
        counts = per_class if isinstance(per_class, dict) else dict.fromkeys(src.classes, per_class)
    return write_transforms(src, ts.real, out, counts, policy, image_size, channels, seed)


def needed(real_kept: pd.Series, ratio: float | dict[str, float]) -> dict[str, int]:
    """Synthetic images per class that `ratio` asks for with these kept real counts (`synaug.data.mixing`)."""
    ratios = ratio if isinstance(ratio, dict) else dict.fromkeys(real_kept.index, ratio)
    return {c: synthetic_count(r, real_kept[c]) for c, r in ratios.items() if r}


def write_transforms(
    src: ImageSource,
    subset: np.ndarray,
    out: str | Path,
    counts: dict[str, int],
    policy: Policy = "medical",
    image_size: int = 128,
    channels: int = 1,
    seed: int = 0,
) -> Path:
    """Write `counts[c]` transformed images of class c, drawn from the real rows `subset` of `src`, into `out`."""
    unknown = sorted(set(counts) - set(src.classes))
    if unknown:
        raise ValueError(f"class(es) {unknown} are not in {src.root}; its classes are {src.classes}")
    ids = src.items["id"].to_numpy()
    train_ids = ids[subset].tolist()

    settings = dict(
        generator="transform",
        data=src.fingerprint,
        policy=policy,
        image_size=image_size,
        channels=channels,
        seed=seed,
        train_set=train_set_fingerprint(train_ids),
    )
    transform = policy_transform(policy)
    labels = src.items["label"].to_numpy()
    order = {
        c: np.random.default_rng([seed, src.classes.index(c)]).permutation(
            subset[labels[subset] == src.classes.index(c)]
        )
        for c in counts
    }

    def make(batch: list[tuple[str, int]]) -> list[Made]:
        ((c, k),) = batch
        i = int(order[c][k % len(order[c])])
        s = image_seed(seed, c, k)
        torch.manual_seed(s)  # torchvision draws its random parameters from the global generator
        image = transform(torch.from_numpy(src.load(i, image_size, channels)))
        return [Made(image.numpy(), s, [ids[i]])]

    return write_synthetic(
        out,
        settings,
        [(c, k) for c, n in counts.items() for k in range(n)],
        make,
        generator="transform",
        run_id=f"transform-{policy}",
        train_ids=train_ids,
    )


register(
    "transform",
    "conventional transforms (AutoAugment, ...) of real training images: the baseline; training-free",
    command=transform_generate,
    derive=write_transforms,
)


if __name__ == "__main__":
    from synaug.cli import run_function

    run_function(transform_generate, sys.argv[1:], "python -m synaug.generators.transform")
