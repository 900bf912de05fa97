"""Frozen features on a CPU: the extraction rate of pretrained EfficientNet-Lite0, then the wall time of a 20-seed
cell of logistic-regression heads with its baseline once the features exist (target: <= 60 s on 2 cores).

    python experiments/bench/frozen_features.py [--seeds 20] [--image_size 128] [--real_fraction 0.2]

The cell is a `transform` source (hflip copies of each seed's own real subset, ratio 1) against its baseline on
BreastMNIST, each seed an independent real subset: 2 x `seeds` runs through `synaug experiment` (MLflow runs,
test metrics, the report; `--controls` adds the grid's two count-matched control cells, `--workers` runs that many
at a time in the timed pass). A first pass in a fresh feature cache extracts the features (timed per image); the
second, timed pass is the same grid in a fresh MLflow store and output folder, so nothing is skipped as done:
its images are the same content, and every feature comes from the cache.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from pathlib import Path

import torch

from synaug.classifiers import FeatureClassifier
from synaug.experiment import Synthetic, experiment

ROOT = Path(__file__).resolve().parents[2]


def grid(args, folder: Path, workers: int = 1) -> dict:
    model = {
        "class_path": "synaug.classifiers.FeatureClassifier",
        "init_args": {"head": "logreg", "backbone": "efficientnet_lite0", "pretrained": True},
    }
    return dict(
        name="bench-frozen",
        base={
            "data": {"root": args.data, "image_size": args.image_size, "channels": 1, "policy": "none"},
            "trainer": {"max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False},
        },
        classifiers={"lite0-logreg": {"model": model}},
        real_fractions=[args.real_fraction],
        synthetic={
            "transform-hflip": Synthetic(
                folders=[str(folder / "synthetic" / "real{real}-subset{subset_seed}")],
                ratios=[1.0],
                transform="hflip",
            )
        },
        seeds=args.seeds,
        controls=args.controls,
        workers=workers,
        out=str(folder / "report"),
        tracking=f"sqlite:///{folder / 'mlflow.db'}",
    )


def _timed(fn, total: list[float]):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - start

    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "medmnist" / "breastmnist.npz"))
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--image_size", type=int, default=128, help="BreastMNIST's 28 px upsampled for the CNN")
    p.add_argument("--real_fraction", type=float, default=0.2)
    p.add_argument(
        "--workers", type=int, default=1, help="runs at a time (a scikit-learn head uses one core)"
    )
    p.add_argument(
        "--controls", action="store_true", help="add the grid's count-matched controls (2 more cells)"
    )
    p.add_argument(
        "--cache", help="a feature cache to keep: the first pass runs only while it does not exist"
    )
    p.add_argument("--profile", type=int, default=0, help="print the N costliest calls of the cached pass")
    p.add_argument("--profile_out", help="with --profile: also save the profile there (pstats)")
    args = p.parse_args()

    extracted, seconds = [0], [0.0]
    original = FeatureClassifier._extract

    def timed(self, dm, rows):
        start = time.perf_counter()
        out = original(self, dm, rows)
        extracted[0] += len(rows)
        seconds[0] += time.perf_counter() - start
        return out

    FeatureClassifier._extract = timed  # in-process (workers=1): count and time every extraction
    head = {"setup": [0.0], "on_fit_start": [0.0]}  # features from the cache; the scikit-learn fit
    for hook, total in head.items():
        setattr(FeatureClassifier, hook, _timed(getattr(FeatureClassifier, hook), total))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = Path(args.cache).resolve() if args.cache else tmp / "cache"
        extract = not cache.exists()
        os.environ["SYNAUG_CACHE"] = str(cache)  # a fresh one: the first pass extracts everything it uses
        os.chdir(tmp)  # checkpoints land under ./outputs
        first = time.perf_counter()
        if extract:
            experiment(**grid(args, tmp / "first"))
        first = time.perf_counter() - first
        n, s = extracted[0], seconds[0]

        for total in head.values():
            total[0] = 0.0
        profile = cProfile.Profile() if args.profile else None
        start = time.perf_counter()
        if profile:
            profile.enable()
        experiment(**grid(args, tmp / "second", args.workers))
        wall = time.perf_counter() - start
        if profile:
            profile.disable()
            pstats.Stats(profile).sort_stats("cumulative").print_stats(args.profile)
            if args.profile_out:
                profile.dump_stats(args.profile_out)
        summary = (tmp / "second" / "report" / "summary.csv").read_text().splitlines()

    cells = "baseline, transform-hflip" + (", duplicate-real, transform-medical" if args.controls else "")
    runs = args.seeds * (4 if args.controls else 2)
    lines = [
        f"\nEfficientNet-Lite0 (ImageNet, packaged), BreastMNIST at {args.image_size} px, real fraction "
        f"{args.real_fraction}, {args.seeds} seeds, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs",
        f"extraction: {n} images in {s:.1f} s = {n / s:.1f} img/s (first pass, fresh cache: {first:.1f} s in all)"
        if extract
        else f"features from the kept cache {cache}",
        f"features cached: {runs} logistic-regression runs ({cells}) in {wall:.1f} s ({wall / runs:.2f} s per "
        f"run), {args.workers} worker(s); extracted in this pass: {extracted[0] - n} images",
        f"of which features read from the cache {head['setup'][0]:.1f} s, logistic regression fits "
        f"{head['on_fit_start'][0]:.1f} s; the rest is per-run overhead (CLI, MLflow, figures, test)"
        if args.workers == 1
        else "(the heads ran in worker processes: their parts are not timed here)",
    ]
    print("\n".join(lines))
    print("\n".join(line for line in summary if "f1_macro" in line))


if __name__ == "__main__":
    main()
