"""Quality against training time of the learned generators on one low-data real subset, at a few budgets: what
the study configs' generator budgets are chosen from.

    python experiments/bench/generator_budget.py --kind diffusion --steps 100 300
    python experiments/bench/generator_budget.py --kind pggan --steps 80 400 --real_fraction 0.1

Each budget trains the tiny config (`configs/generators/<kind>_tiny.yaml`) from scratch on BreastMNIST's 10%
subset 0 (28 px; `--data`, `--image_size` and
`--real_fraction` for another set) through the experiment's own generator step (`synaug.experiment.generators`), samples 20
images per class and measures them against the subset's training images (FD, KID, precision/recall,
memorization; EfficientNet-Lite0 ImageNet features at 32 px). Prints one row per budget: training wall time,
training images per second, images generated (and written) per second, and the quality; writes a sample grid per budget to `--out`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from synaug.cli import SynAugCLI
from synaug.experiment import generators
from synaug.experiment.grid import merge
from synaug.generators.transform import needed
from synaug.notebooks import samples_figure

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=["diffusion", "pggan"], default="diffusion")
    p.add_argument("--steps", type=int, nargs="+", default=[100, 300])
    p.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "medmnist" / "breastmnist.npz"))
    p.add_argument("--real_fraction", type=float, default=0.1)
    p.add_argument("--image_size", type=int, default=28)
    p.add_argument("--per_class", type=int, default=20)
    p.add_argument(
        "--preset", default=None, help="diffusion UNet preset (tiny, cpu, small, ...); default: the config's"
    )
    p.add_argument("--batch_size", type=int, default=None, help="default: the config's")
    p.add_argument("--out", default="outputs/bench/generator_budget")
    a = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = {"root": a.data, "image_size": a.image_size, "channels": 1}
    settings = {"real_fraction": a.real_fraction, "real_count": None, "subset_seed": 0}
    dm = generators.ClassificationData(**data)
    _, ts = dm.training_set(**settings, synthetic=None, synthetic_ratio=0.0, replace_prob=0.0)
    rows = []
    for steps in a.steps:
        folder = Path(tempfile.mkdtemp(prefix=f"{a.kind}{steps}-"))
        overrides = {"trainer": {"max_steps": steps, "logger": False, "enable_progress_bar": False}}
        overrides["model"] = {"init_args": {"sample_every": 10**9}}
        if a.preset:
            overrides["model"]["init_args"]["preset"] = a.preset
        if a.batch_size:
            overrides["data"] = {"batch_size": a.batch_size}
        if (
            a.kind == "pggan"
        ):  # grow through every stage within the budget: 4 stages of stable + fade iterations
            stage = max(1, steps // 2 // 7)
            overrides["model"]["init_args"] |= {"stable": stage, "fade": stage}
        config = generators.generator_config(
            str(ROOT / f"configs/generators/{a.kind}_tiny.yaml"), overrides, data, settings, folder, merge
        )
        config["trainer"]["logger"] = False
        cli = SynAugCLI(args=config, run=False)
        started = time.monotonic()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        seconds = time.monotonic() - started
        batch = config["data"].get("batch_size", 32)
        step = generators.Step(a.kind, str(a.real_fraction), 0, settings, config, {}, folder)
        step.counts = dict.fromkeys(needed(ts.counts["real_kept"], 1.0), a.per_class)
        started = time.monotonic()
        generators.generate_images(step, {"steps": 25} if a.kind == "diffusion" else None, dm)
        sampling_s = time.monotonic() - started  # the images written to disk, manifest included
        sampled = sum(step.counts.values()) / sampling_s
        table = generators.measure_quality(
            step, dm, {"image_size": 32, "kid_subset_size": 10, "kid_subsets": 20}
        )
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        samples_figure(step.images, n=8).savefig(out / f"{a.kind}_{steps}steps.png")
        for c, r in table.iterrows():
            rows.append(
                {
                    "kind": a.kind,
                    "steps": steps,
                    "train_s": round(seconds, 1),
                    "img_per_s": round(steps * batch / seconds, 1),
                    "sample_img_per_s": round(sampled, 1),
                }
                | {
                    "class": c,
                    "fd": r["fid"],
                    "kid": r["kid_mean"],
                    "precision": r["precision"],
                    "recall": r["recall"],
                }
                | {"memorized": r["memorized_share"], "val_fd": r["val_fid"]}
            )
        print(pd.DataFrame(rows).to_string(index=False), flush=True)


if __name__ == "__main__":
    main()
