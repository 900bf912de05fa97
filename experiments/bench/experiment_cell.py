"""Wall time of one experiment cell: ResNet-18 on brain MRI (128 px, 30 epochs), 20 seeds, each trained and tested
through `synaug experiment` (the MLflow runs, the report), with `--workers` seeds at a time in separate
processes sharing the GPU. The target is under 3 minutes on one H100.

    python experiments/bench/experiment_cell.py [--workers 4] [--precision bf16-mixed]
    python experiments/bench/experiment_cell.py --seeds 2 --epochs 1 --image_size 32 --real_fraction 0.05 \\
        --batch_size 50 --workers 2 --precision 32-true     # a CPU smoke run: a minute or two

Every call is a fresh experiment in a temporary MLflow store, so nothing is skipped as already done. Prints the
wall time of the cell, seconds per seed, and the cell's test macro-F1 (median and 95% CI) as a sanity check.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from synaug.experiment import experiment


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data",
        default=str(Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "brain_tumor_mri"),
    )
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--real_fraction", type=float, default=1.0)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--workers", type=int, default=4 if torch.cuda.is_available() else 1)
    p.add_argument("--precision", default="bf16-mixed" if torch.cuda.is_available() else "32-true")
    args = p.parse_args()

    base = {
        "model": {
            "class_path": "synaug.classifiers.ImageClassifier",
            "init_args": {"backbone": args.backbone},
        },
        "data": {"root": args.data, "image_size": args.image_size, "batch_size": args.batch_size},
        "trainer": {
            "max_epochs": args.epochs,
            "precision": args.precision,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        experiment(
            name="bench-cell",
            base=base,
            classifiers={args.backbone: {}},
            real_fractions=[args.real_fraction],
            seeds=args.seeds,
            workers=args.workers,
            out=f"{tmp}/report",
            tracking=f"sqlite:///{tmp}/mlflow.db",
        )
        wall = time.perf_counter() - start
        summary = pd.read_csv(f"{tmp}/report/summary.csv")
    f1 = summary[summary["metric"] == "test/f1_macro"].iloc[0]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"\n{args.backbone}, {args.image_size} px, {args.epochs} epochs, real fraction {args.real_fraction}, "
        f"{args.seeds} seeds, {args.workers} worker(s), {args.precision}, on {device}\n"
        f"cell wall time {wall:.1f} s ({wall / 60:.2f} min), {wall / args.seeds:.1f} s per seed\n"
        f"test macro-F1 median {f1['median']:.4f} [{f1['ci_low']:.4f}, {f1['ci_high']:.4f}]"
    )


if __name__ == "__main__":  # the workers are spawned processes: they re-import this module
    main()
