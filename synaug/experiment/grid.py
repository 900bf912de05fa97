"""`synaug experiment`: a grid of configurations, each trained over N seeds, reported with CIs and paired tests.

    synaug experiment -c experiments/thesis2_brain/config.yaml

(Over 400 lines: the cells, their planning and `experiment`, which orchestrates the generator stage, the
classifier runs and the report. The progress display and the runs' logs are in `console`; the next split is the
planning and cost estimate (`measured_costs`, `finished_run`) and the generator stage's loop into their own
module.)

The grid is classifier x conventional policy x real data (a fraction or a count per class) x synthetic data
(none, or a source at a ratio). One point of it is a *cell*; every cell is trained and tested once per seed.
Seed s of every cell draws the same real training subset (subset seed s, or s mod `subset_seeds`), so a cell and
its baseline (same classifier, policy and real data, no synthetic images) are paired by seed.

Each (cell, seed) is a LightningCLI config: `base`, then the classifier's entry over it, then the cell's data
settings, `seed_everything` and the MLflow logger. It is trained in-process (or in one of `workers` processes),
and its best checkpoint (by validation macro-F1) is tested once.

Before anything trains, every (cell, real subset) is planned as its runs will plan it (`prepare`): a synthetic
source whose generator learned from real images outside the cell's training subset (recorded in its manifest) is
refused then, since it would carry the withheld images into training, as are too few synthetic images. Synthetic
folders are templated per subset (`{subset_seed}`, `{real}`); a learned generator is trained and sampled once per
subset beforehand (`subset_seeds` keeps that affordable), a `transform` source is made here, once per subset.

MLflow (experiment `name`): one parent run (tag level=experiment), one child per cell (level=cell), one grandchild
per seed (level=seed); every run carries the tags experiment, cell, classifier, policy, real, real_fraction,
real_count, generator, ratio, augment_classes (and seed, subset_seed), so `tags.generator = 'diffusion'` and the
like filter them; cell and seed runs also log the grid axes as params (`CELL_AXES`, `RUN_AXES`), which the UI's
compare view and parallel-coordinates plot read. Running the same command again skips the (cell, seed) pairs
whose run FINISHED with test metrics under the same `config_hash` (the resolved config, the real data
fingerprint, the synthetic folders' contents); a finished run under another hash is tagged stale and never read, and the pair is trained again; any
other run of a pair (killed mid-fit, failed, killed between fit and test) is marked KILLED and the pair is
trained again, so a report only ever reads complete, current runs, and only the seeds the config asks for. Two
processes must not run one experiment at the same time (use `workers`, or `storage` for worker processes on
one machine or many: `synaug.experiment.workers`).

Inference is per independent unit (`unit` tag: a hash of the seed's real training subset; see `synaug.stats`).
With `controls`, every synthetic source under test gets, per ratio, a count-matched `duplicate-real` and a
`transform-medical` control cell from the same real subsets, and the report says which of them each arm beats.

The report (`out`, also logged to the parent run under `report/`, without the runs' logs in `out/logs`, which are
on their runs): results.csv (one row per cell, seed, metric),
summary.csv (median, mean and bootstrap CI per cell and metric), comparison.csv (paired differences to the
baseline, Wilcoxon p, Holm-adjusted), report.md (the thesis-style table, also printed), plots of each metric per
cell, of the metric against the synthetic ratio, and, with two or more real data settings, learning curves
(the metric against real images per class with and without synthetic data) and how many real images each
synthetic setting is worth (learning_curve.csv, worth.csv).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import shutil
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing import forkserver, get_context
from pathlib import Path
from typing import Literal

import lightning.pytorch as L
import numpy as np
import pandas as pd
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run

from synaug import stats
from synaug.cli import SynAugCLI
from synaug.data import ClassificationData
from synaug.data.transforms import Policy
from synaug.experiment import generators
from synaug.experiment import workers as grid_workers
from synaug.experiment.console import Progress, log_file, to_log
from synaug.experiment.report import report
from synaug.experiment.runs import collect, complete, find_or_create, log_counts, search
from synaug.generators.transform import needed, write_transforms
from synaug.tracking import experiment_id, git_commit, tracking_uri

# data settings a cell decides; `base` and the classifiers must leave them to the grid
Schedule = Literal["mix", "pretrain_finetune"]
CELL_KEYS = ("synthetic", "synthetic_ratio", "augment_classes", "replace_prob", "seed", "subset_seed")
# what `ClassificationData.training_set` takes: the settings that choose the training images
MIXING_KEYS = (*CELL_KEYS, "real_fraction", "real_count")
# A cell run's params: its grid axes (all of them follow from its name, so a rerun never changes them). A seed run
# also gets the model's and the data's hyperparameters, the optimizer, epochs and precision (`synaug.training`),
# so only the axes those leave out (the others would clash: `real_fraction` is `1.0` there, `1` here).
CELL_AXES = ("classifier", "policy", "real", "real_fraction", "real_count", "generator", "ratio", "schedule")
RUN_AXES = ("cell", "classifier", "real", "generator", "ratio", "schedule")


@dataclass
class Synthetic:
    """A synthetic source of the grid: one cell per ratio.

    Attributes:
        folders: synthetic folders (`data.synthetic`), pooled. `{subset_seed}` and `{real}` (the cell's real data
            label, e.g. `0.05` or `glioma:25`) are replaced per run: the leakage guard needs a generator trained
            on (or a transform source drawn from) that run's real subset.
        ratios: `data.synthetic_ratio` values: one number for the augmented classes or a mapping class -> ratio.
        augment_classes: the classes that get synthetic images (default: every class with a ratio).
        replace_prob: DA-Fusion-style per-epoch replacement of real images by their synthetic variants.
        transform: make a missing folder with the `transform` generator under this policy (conventional
            transforms of the run's own real subset, as many as the largest ratio asks for): a source for
            trying a grid end to end, and a baseline a learned generator has to beat; tagged generator=<name>
            as any other, so name it for what it is (e.g. `transform-autoaugment`).
        control: this source is a control arm that the experiment adds (see `CONTROLS`), not one under test.
        train: a learned generator: its `synaug fit` config (a YAML path or a mapping: diffusion, PGGAN,
            DreamBooth, textual inversion, any registered kind), trained by the experiment once per (real
            setting, real subset) on exactly that subset's training images, then sampled (`folders` stays
            empty); see `synaug.experiment.generators`.
        generate: a training-free generator: the config of its command (a YAML path or a mapping, e.g.
            `configs/generators/img2img.yaml`, which `synaug generate img2img -c` reads), run by the experiment
            once per (real setting, real subset) on exactly that subset's kept training images (never validation
            or test images, never real images the cell withholds), as many images per class as the largest ratio
            needs; the same step as a `train` source's (cached folder, MLflow run, quality check, gate) with
            nothing to train. The command's settings that choose the real images (`data`, `split`, `per_image`,
            `classes`, the split fractions and seeds) are the grid's: the base config may hold them (they are not
            used), `overrides` may not. See `synaug.experiment.generators`.
        kind: the registered training-free kind that `generate` configures (one with a `derive`: `sd-img2img`,
            Stable Diffusion img2img variants; `transform`, conventional transforms).
        overrides: merged over the `train` or `generate` config (e.g. `{trainer: {max_steps: 500}}`,
            `{strength: 0.05}`).
        sampler: the kind's sampling settings for `synaug generate` (e.g. `{scheduler: ddim, steps: 20}`); a
            `generate` source has them in its config.
        quality: options of the quality check of a `train` or `generate` source (`feature`, `image_size`, ...).
        gate: `max_<metric>` thresholds on any class's quality row (`memorized_share`, `leaked`, `fid`,
            `val_fid`, `kid_mean`): a generator above one is left out of the classifier stage for that real
            setting, with the reason in its run and the report.
        filter: keep only the images that a classifier trained on the real subset assigns to their class with
            probability >= this τ (the kept share per class is logged to the generator's run).
        oversample: generate this many times the images the largest ratio needs (with `filter`: enough that the
            kept ones suffice).
    """

    folders: list[str] = field(default_factory=list)
    ratios: list[float | dict[str, float]] = field(default_factory=lambda: [1.0])
    augment_classes: list[str] | None = None
    replace_prob: float = 0.0
    transform: Policy | None = None
    control: bool = False  # a control arm (added by the experiment), not a source under test
    train: str | dict | None = None
    generate: str | dict | None = None
    kind: str = "sd-img2img"
    overrides: dict | None = None
    sampler: dict | None = None
    quality: dict | None = None
    gate: dict[str, float] | None = None
    filter: float | None = None
    oversample: float = 1.0
    # (real label, subset seed) -> the folder the experiment made for a `train` source (not config)
    made: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        made = [k for k in ("folders", "train", "generate") if getattr(self, k)]
        if len(made) > 1:
            raise ValueError(f"a synthetic source has one of `folders`, `train`, `generate`; got {made}")
        if self.generate is None and self.kind != Synthetic.kind:
            raise ValueError(
                f"kind {self.kind!r} names the generator of a `generate:` source; this one has none"
            )
        if self.generate is not None and self.sampler is not None:
            raise ValueError("a `generate` source has its sampling settings in its config (or `overrides`)")

    @property
    def staged(self) -> bool:
        """Made by the experiment's generator stage, per (real setting, subset): a `train` or `generate` source."""
        return self.train is not None or self.generate is not None

    def most(self, classes: list[str]) -> dict[str, float]:
        """The largest ratio each augmented class gets over `ratios`."""
        out = dict.fromkeys(self.augment_classes or classes, 0.0)
        for r in self.ratios:
            for c in out:
                out[c] = max(out[c], r.get(c, 0.0) if isinstance(r, dict) else r)
        return out


@dataclass(frozen=True)
class Cell:
    classifier: str
    policy: str
    real_fraction: float | dict[str, float]
    real_count: dict[str, int] | None
    generator: str = "none"
    ratio: float | dict[str, float] = 0.0
    source: Synthetic | None = None
    schedule: Schedule = "mix"

    @property
    def real(self) -> str:
        return f"n={label(self.real_count)}" if self.real_count else label(self.real_fraction)

    @property
    def synthetic(self) -> str:
        if self.source is None:
            return "none"
        return f"{self.generator}@{label(self.ratio)}" + (
            "" if self.schedule == "mix" else f"/{self.schedule}"
        )

    @property
    def name(self) -> str:
        return f"{self.classifier}/{self.policy}/real={self.real}/{self.synthetic}"

    @property
    def baseline(self) -> Cell | None:
        if self.source is None:
            return None
        return Cell(self.classifier, self.policy, self.real_fraction, self.real_count)

    @property
    def is_control(self) -> bool:
        return self.source is not None and self.source.control

    def controls(self, cells: list[Cell]) -> list[Cell]:
        """The control cells of this (tested, augmented) cell: same classifier, policy, real data, augmented
        classes and ratio."""
        if self.source is None or self.is_control:
            return []
        classes = self.source.augment_classes
        return [
            c
            for c in cells
            if c.is_control
            and (c.classifier, c.policy, c.real, label(c.ratio), c.schedule)
            == (self.classifier, self.policy, self.real, label(self.ratio), self.schedule)
            and (c.source.augment_classes or None) == (classes or None)
        ]

    @property
    def ratio_value(self) -> float:
        """The ratio as one number, for curves: nan when the classes get different ratios."""
        if isinstance(self.ratio, dict):
            values = set(self.ratio.values())
            return values.pop() if len(values) == 1 else math.nan
        return float(self.ratio)

    def tags(self) -> dict[str, str]:
        return {
            "cell": self.name,
            "classifier": self.classifier,
            "policy": self.policy,
            "real": self.real,
            "real_fraction": label(self.real_fraction),
            "real_count": label(self.real_count) if self.real_count else "",
            "generator": self.generator,
            "ratio": label(self.ratio),
            "augment_classes": ",".join(self.source.augment_classes or []) if self.source else "",
            "schedule": self.schedule if self.source else "",
        }

    def data(self, seed: int, subset_seed: int) -> dict:
        """The cell's `data:` settings for one seed."""
        data = dict(
            policy=self.policy,
            real_fraction=self.real_fraction,
            real_count=self.real_count,
            seed=seed,
            subset_seed=subset_seed,
        )
        if self.source is not None:
            folders = (
                [self.source.made[(self.real, subset_seed)]]
                if self.source.staged
                else [f.format(subset_seed=subset_seed, real=self.real) for f in self.source.folders]
            )
            data |= dict(
                synthetic=folders,
                synthetic_ratio=self.ratio,
                augment_classes=self.source.augment_classes,
                replace_prob=self.source.replace_prob,
            )
        return data


def label(value: float | dict | None) -> str:
    """A compact label that tells any two values apart: 0.25 -> `0.25`, 0.1234 -> `0.1234` (not rounded: two
    ratios must never share a cell name), {glioma: 1.0} -> `glioma:1`."""
    if isinstance(value, dict):
        return "+".join(f"{k}:{label(v)}" for k, v in value.items())
    return np.format_float_positional(float(value), trim="-")


# control arms of every synthetic source under test, at the same count of added images per class, made from the
# same real subset (name -> the `transform` policy that makes them): duplicated real images (plain copies: what
# the added count alone does), and the conventional-transform source under a policy that keeps a medical image's
# meaning. A synthetic source that beats neither has shown nothing beyond more copies of the real data.
CONTROLS: dict[str, Policy] = {"duplicate-real": "none", "transform-medical": "medical"}


def control_sources(synthetic: dict[str, Synthetic], controls_dir: str | None) -> dict[str, Synthetic]:
    """The control sources for the sources under test: one per control, over the union of their ratios (sources
    augmenting different classes each get their own, named after the classes)."""
    tested = {g: s for g, s in synthetic.items() if not s.control}
    if controls_dir is None or not tested:
        return {}
    groups: dict[tuple, list] = {}
    for source in tested.values():
        ratios = groups.setdefault(tuple(source.augment_classes or ()), [])
        ratios += [r for r in source.ratios if r not in ratios]
    out = {}
    for classes, ratios in groups.items():
        for name, policy in CONTROLS.items():
            gen = name if len(groups) == 1 else f"{name}-{'+'.join(classes) or 'all'}"
            folder = f"{controls_dir}/{gen}/real{{real}}-subset{{subset_seed}}"
            out[gen] = Synthetic([folder], ratios, list(classes) or None, transform=policy, control=True)
    return out


def merge(a: dict, b: dict) -> dict:
    """`b` over `a`, recursively for mappings; anything else in `b` replaces."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = (
            merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
        )
    return out


def check_base(config: dict, what: str, grid_keys: tuple[str, ...]) -> None:
    """Refuse a config that sets what the grid decides: a value there would be overridden, silently."""
    data = config.get("data", {})
    taken = [f"data.{k}" for k in (*CELL_KEYS, *grid_keys) if k in data]
    taken += ["seed_everything"] * ("seed_everything" in config)
    taken += ["trainer.logger"] * ("logger" in config.get("trainer", {}))
    if taken:
        raise ValueError(
            f"{what} sets {taken}; the experiment sets these per cell and seed (seed_everything = data.seed = "
            "the seed, one MLflow logger per seed run): remove them, and use the grid's axes instead"
        )


def run_config(config: dict, data: dict, seed: int, experiment: str, uri: str) -> dict:
    """One seed's LightningCLI config: `config` with the cell's data settings, the seed and the MLflow logger."""
    logger = {
        "class_path": "synaug.tracking.MLFlowLogger",
        "init_args": {"experiment_name": experiment, "tracking_uri": uri},
    }
    return merge(config, {"data": data, "seed_everything": seed, "trainer": {"logger": logger}})


@contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT stop the grid at once (Lightning shuts the running fit down as for Ctrl-C); the list
    it yields holds the signal number once one came. Lightning's own SIGTERM handler only notes the signal."""
    stopped: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield stopped
        return

    def handler(signum, frame):
        if not stopped:
            stopped.append(signum)
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stopped
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_seed(
    config: dict,
    experiment_id: str,
    tags: dict[str, str],
    run_name: str,
    keep_checkpoints: bool = False,
    log: Path | None = None,
) -> str:
    """Train one (cell, seed) on a new MLflow run, test its best checkpoint once; returns the run id. With `log`,
    everything the run prints goes to that file (`console.to_log`), then to the run's artifacts (`logs/`)."""
    uri = config["trainer"]["logger"]["init_args"]["tracking_uri"]
    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    # the grid axes that the model's and the data's hyperparameters leave out, as params: the UI's compare view
    # and parallel-coordinates plot read params, not tags
    client.log_batch(run_id, params=[Param(k, tags[k]) for k in RUN_AXES if k in tags])
    try:
        with to_log(log):
            cli = SynAugCLI(
                args=merge(config, {"trainer": {"logger": {"init_args": {"run_id": run_id}}}}), run=False
            )
            trainer = cli.trainer
            trainer.fit(cli.model, datamodule=cli.datamodule)
            log_counts(client, run_id, cli.datamodule.counts)
            if tags.get("schedule") == "pretrain_finetune":
                trainer = finetune_on_real(config, run_id, cli.model, trainer)
            trainer.test(trainer.lightning_module, datamodule=trainer.datamodule, ckpt_path="best")
            if not keep_checkpoints:  # 20 seeds x many cells of weights add up; the results are in MLflow
                shutil.rmtree(trainer.checkpoint_callback.dirpath)
    finally:
        if log is not None:
            client.log_artifact(run_id, str(log), "logs")
    return run_id


def finetune_on_real(config: dict, run_id: str, model, pretrained) -> L.Trainer:
    """The second stage of `pretrain_finetune`: from the best checkpoint of the (synthetic + real) training, train
    again on the real subset only (same seed, same real images, no synthetic data); returns its trainer."""
    best = pretrained.checkpoint_callback.best_model_path
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    shutil.rmtree(pretrained.checkpoint_callback.dirpath)  # the fine-tuning keeps its own best checkpoint
    real_only = {"synthetic": None, "synthetic_ratio": 0.0, "augment_classes": None, "replace_prob": 0.0}
    args = merge(config, {"data": real_only, "trainer": {"logger": {"init_args": {"run_id": run_id}}}})
    cli = SynAugCLI(args=args, run=False)
    cli.model.load_state_dict(state)
    # the run's params are the pretraining's (synthetic folders, ratio): MLflow refuses to change them, and the
    # fine-tuning's data is recorded as the data/finetune_* metrics below instead
    cli.trainer.logger.log_hyperparams = lambda *args, **kwargs: None
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    client = MlflowClient(config["trainer"]["logger"]["init_args"]["tracking_uri"])
    counts = cli.datamodule.counts
    client.log_metric(run_id, "data/finetune_real", float(counts["real_kept"].sum()))
    client.log_metric(run_id, "data/finetune_synthetic", float(counts["synthetic"].sum()))
    return cli.trainer


def _worker_init(threads: int) -> None:
    # several training processes on one machine: split the CPU threads instead of oversubscribing them
    torch.set_num_threads(threads)


def prepare(
    cells: list[Cell], configs: dict[str, dict], seeds: int, subset_of
) -> tuple[dict[str, str], dict[tuple[str, int], str]]:
    """Before anything trains: make the `transform` folders the grid needs, then plan every (cell, real subset)
    as its runs will. A synthetic source whose generator learned from images outside the cell's real subset (or
    from validation/test images), too few synthetic images, or an unknown class name fail now, not hours in.
    Returns each classifier's real data fingerprint (its files' content, its splits), and each (cell, subset
    seed)'s independent unit: a hash of its real training subset. Subset seeds that draw the same subset (every
    one of them at real_fraction 1) are one unit, not several."""
    modules: dict[str, ClassificationData] = {}  # one per real source: loading it hashes every file
    fingerprints: dict[str, str] = {}
    units: dict[tuple[str, int], str] = {}
    made = set()
    subsets = sorted({subset_of(s) for s in range(seeds)})
    for cell in cells:
        data = {k: v for k, v in configs[cell.classifier].get("data", {}).items() if k not in MIXING_KEYS}
        dm = modules.setdefault(yaml.safe_dump(data), ClassificationData(**data))
        fingerprints[cell.classifier] = dm.source.fingerprint
        for s in subsets:
            settings = {k: v for k, v in cell.data(s, s).items() if k in MIXING_KEYS}
            if cell.source is not None and cell.source.transform:
                if len(settings["synthetic"]) != 1:
                    raise ValueError(
                        f"{cell.name}: a transform source has one folder, got {settings['synthetic']}"
                    )
                (folder,) = settings["synthetic"]
                if folder not in made:
                    real = {k: settings[k] for k in ("real_fraction", "real_count", "subset_seed")}
                    _, ts = dm.training_set(**real, synthetic=None, synthetic_ratio=0.0, replace_prob=0.0)
                    counts = needed(ts.counts["real_kept"], cell.source.most(dm.class_names))
                    print(f"transform-{cell.source.transform}: {counts} images into {folder}")
                    write_transforms(
                        dm.source, ts.real, folder, counts, cell.source.transform, dm.image_size, dm.channels
                    )
                    made.add(folder)
            _, ts = dm.training_set(**settings)
            ids = "\n".join(sorted(dm.items["id"].to_numpy()[ts.real]))
            units[(cell.name, s)] = hashlib.sha256(
                f"{fingerprints[cell.classifier]}\n{ids}".encode()
            ).hexdigest()[:12]
    return fingerprints, units


def folder_fingerprint(folder: str) -> str:
    """sha256 over a synthetic folder's files (names and bytes): a regenerated or edited folder is a new one."""
    root, h = Path(folder), hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def run_hash(config: dict, data: str, synthetic: list[str]) -> str:
    """What decides a (cell, seed) run's result: its config (without the logger), its real data fingerprint and
    its synthetic folders' fingerprints. A finished run is reused only when this matches."""
    config = merge(config, {})
    config.get("trainer", {}).pop("logger", None)
    payload = yaml.safe_dump({"config": config, "data": data, "synthetic": synthetic}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def grid(
    base: dict,
    classifiers: dict[str, dict],
    policies: list[Policy] | None = None,
    real_fractions: list[float | dict[str, float]] | None = None,
    real_counts: list[dict[str, int]] | None = None,
    synthetic: dict[str, Synthetic] | None = None,
    controls_dir: str | None = None,
    schedules: list[Schedule] | None = None,
) -> list[Cell]:
    """Every cell of the grid (arguments as `experiment`'s), baselines first within each (classifier, policy,
    real data). An axis left out takes each classifier's configured value; an axis given must not be set there.
    With `controls_dir`, every ratio of the sources under test also gets its control cells (`CONTROLS`), their
    folders made under `controls_dir`."""
    synthetic = dict(synthetic or {}) | control_sources(synthetic or {}, controls_dir)
    grid_keys: tuple[str, ...] = ("policy",) if policies is not None else ()
    reals = None
    if real_fractions is not None or real_counts is not None:
        reals = [(f, None) for f in real_fractions or []] + [(1.0, c) for c in real_counts or []]
        grid_keys += ("real_fraction", "real_count")
    check_base(base, "base", grid_keys)
    cells = []
    for clf, overrides in classifiers.items():
        check_base(overrides, f"classifier {clf!r}", grid_keys)
        data = merge(base, overrides).get("data", {})
        for policy in policies or [data.get("policy", "none")]:
            for fraction, count in reals or [(data.get("real_fraction", 1.0), data.get("real_count"))]:
                cells.append(Cell(clf, policy, fraction, count))
                for gen, source in synthetic.items():
                    cells += [
                        Cell(clf, policy, fraction, count, gen, r, source, schedule)
                        for schedule in schedules or ["mix"]
                        for r in source.ratios
                    ]
    names = [c.name for c in cells]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"the grid names these cells more than once: {twice}")
    return cells


def run_all(
    jobs: list[tuple[dict, dict[str, str], str]],
    experiment_id: str,
    workers: int,
    keep: bool,
    progress: Progress | None = None,
    logs: Path | None = None,
    metric: str = stats.MAIN_METRIC,
) -> None:
    """Train the jobs, `workers` at a time; each one's output goes to its file under `logs` (None: the console,
    with a `[i/N]` line per run). The progress display gets each finished run's `metric` as its last result."""
    progress = progress or Progress({"classifier runs": len(jobs)}, {})

    def finished(config: dict, run_id: str, name: str) -> None:
        value = MlflowClient(config["trainer"]["logger"]["init_args"]["tracking_uri"]).get_run(run_id)
        progress.done("classifier runs", f"{name} {metric} {value.data.metrics.get(metric, math.nan):.3f}")

    if workers == 1:
        for i, (config, tags, run_name) in enumerate(jobs, 1):
            if logs is None:
                print(f"[{i}/{len(jobs)}] {run_name}", flush=True)
            progress.started(run_name)
            try:
                run_id = run_seed(config, experiment_id, tags, run_name, keep, log_file(logs, run_name))
            except Exception:
                progress.failed(run_name, log_file(logs, run_name))
                raise
            finished(config, run_id, run_name)
        return
    with ProcessPoolExecutor(
        workers,
        mp_context=worker_context(),
        initializer=_worker_init,
        initargs=(max(1, os.cpu_count() // workers),),
    ) as pool:
        futures = {
            pool.submit(run_seed, c, experiment_id, t, n, keep, log_file(logs, n)): (c, n) for c, t, n in jobs
        }
        progress.started(f"{min(workers, len(jobs))} runs at a time")
        try:
            for i, future in enumerate(as_completed(futures), 1):
                config, name = futures[future]
                try:
                    run_id = future.result()
                except Exception:
                    progress.failed(name, log_file(logs, name))
                    raise
                if logs is None:
                    print(f"[{i}/{len(jobs)}] done: {name}", flush=True)
                finished(config, run_id, name)
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the runs in flight finish; the queued ones never start
            raise


def worker_context():
    """The workers' start method, its server started now (idempotent). Not fork: CUDA cannot be re-initialised
    in a forked child. A fork server that has imported synaug (and so torch, Lightning, MLflow) but touched no GPU
    forks the workers: the imports are paid once, not per worker, and while this process goes on (`experiment`
    starts it before the generator stage: 8-10 s of imports on a 2-core CPU, overlapped)."""
    context = get_context("forkserver")
    context.set_forkserver_preload(["synaug.experiment.grid"])
    forkserver.ensure_running()
    return context


def measured_costs(client: MlflowClient, exp_id: str, name: str, estimate: dict | None) -> dict:
    """Seconds per generator training, per generated image and per classifier run: the medians of this
    experiment's finished runs where it has some, else `estimate`'s, else unknown (nan)."""
    out = {"generator_train_s": math.nan, "image_s": math.nan, "classifier_s": math.nan} | (estimate or {})
    measured = []
    gens = search(client, exp_id, {"level": "generator", "experiment": name}, status="FINISHED")
    for key in ("train_s", "image_s"):
        values = [r.data.metrics[f"time/{key}"] for r in gens if f"time/{key}" in r.data.metrics]
        if values:
            out[f"generator_{key}" if key == "train_s" else key] = float(np.median(values))
            measured.append(key)
    seeds = search(client, exp_id, {"level": "seed", "experiment": name}, status="FINISHED")
    if seeds:
        out["classifier_s"] = float(np.median([(r.info.end_time - r.info.start_time) / 1000 for r in seeds]))
        measured.append("classifier_s")
    out["generation_s"] = math.nan  # per generation step: set from the images each still needs
    out["from"] = f"measured: {', '.join(measured)}" if measured else "from `estimate`, nothing measured yet"
    return out


def finished_run(client, exp_id, name, cell, seed, base, classifiers, subset_of, uri, metric) -> bool:
    """For `--dry-run`: whether (cell, seed) has a finished run under the config hash it would run with. The real
    data fingerprint is read from a finished run (a dry run loads no data), so this errs towards "to do"."""
    previous = search(
        client, exp_id, {"level": "seed", "experiment": name, "cell": cell.name, "seed": str(seed)}
    )
    done = [r for r in previous if complete(r, metric)]
    if not done:
        return False
    data = cell.data(seed, subset_of(seed))
    run = run_config(merge(base, classifiers[cell.classifier]), data, seed, name, uri)
    fps = [folder_fingerprint(f) for f in data.get("synthetic") or []]
    hashes = {run_hash(run, r.data.tags.get("data.fingerprint", ""), fps) for r in done}
    return any(r.data.tags.get("config_hash") in hashes for r in done)


def experiment(
    name: str,
    base: dict,
    classifiers: dict[str, dict],
    policies: list[Policy] | None = None,
    real_fractions: list[float | dict[str, float]] | None = None,
    real_counts: list[dict[str, int]] | None = None,
    synthetic: dict[str, Synthetic] | None = None,
    schedules: list[Schedule] | None = None,
    seeds: int = 20,
    subset_seeds: int | None = None,
    metric: str = stats.MAIN_METRIC,
    minority_metric: str | None = None,
    learning_curve_class: str | None = None,
    workers: int = 1,
    keep_checkpoints: bool = False,
    out: str | None = None,
    tracking: str | None = None,
    controls: bool = True,
    generator_cache: str | None = None,
    margin: float = stats.MARGIN,
    min_units: int = stats.MIN_UNITS,
    dry_run: bool = False,
    estimate: dict[str, float] | None = None,
    storage: str | None = None,
    heartbeat_interval: int = 60,
    grace_period: int | None = None,
    verbose: bool = False,
) -> str:
    """Train and test every cell of a grid over `seeds` seeds, then report; returns the parent MLflow run id.

    Args:
        name: the experiment: its MLflow experiment, parent run and default report folder.
        base: a LightningCLI config (`data:`, `trainer:`, optionally `model:`) shared by every run.
        classifiers: name -> a LightningCLI config merged over `base`: its `model:`, and anything else the
            classifier needs (e.g. `trainer: {max_epochs: 1}` for an SVC).
        policies: conventional policies (`data.policy`) to cross; default: each classifier's configured one.
        real_fractions: real data settings (`data.real_fraction`: a number, or per class) to cross.
        real_counts: more real data settings (`data.real_count`, e.g. `{glioma: 25}` for a rare class). Without
            either, each classifier's configured real data is the only setting.
        synthetic: generator name -> a synthetic source and its ratios; every (classifier, policy, real data)
            also gets its baseline without synthetic images.
        schedules: how synthetic images are used, an axis of every synthetic cell (controls included): `mix`
            (real and synthetic images shuffled together; the default) and `pretrain_finetune` (train on the
            mix, then from its best checkpoint again on the real subset only; RoentGen-v2's synthetic
            pre-training). Paired with the same baseline and controls.
        seeds: seeds 0..seeds-1 per cell: `seed_everything` and `data.seed` (synthetic draw, shuffling).
        subset_seeds: the number of distinct real subsets: seed s draws subset `s mod subset_seeds`, so each
            generator is trained that many times only. Default: seed s draws subset s (independent resamples).
        metric: the report's main test metric: the paired comparison, ratio and learning curves.
        minority_metric: an extra table column, e.g. `test/recall/glioma`.
        learning_curve_class: learning curves against this class's real images, not the mean per class.
        workers: train this many seeds at a time, each in its own process with cores / workers torch threads:
            small models sharing one GPU, or scikit-learn heads on frozen features (one core each) on a CPU.
        keep_checkpoints: keep each run's best checkpoint (default: deleted once tested).
        out: the report folder (default `outputs/experiments/<name>`).
        tracking: MLflow tracking URI (default: `$MLFLOW_TRACKING_URI`, else the local store).
        controls: compare every synthetic source under test, paired by unit, with its count-matched controls
            (`CONTROLS`: duplicated real images, and conventional transforms that keep a medical image's
            meaning), made per real subset under `outputs/synthetic/<name>/controls`.
        generator_cache: the learned generators are cached under `outputs/generators/<generator_cache>/`
            (default: `name`); another experiment's or a `synaug tune` study's name reuses its trained ones.
        margin: the practical-equivalence margin of the verdicts, in units of the metric (0.01: one point).
        min_units: no CI or p-value from fewer effective replicates (independent units with distinct results).
        dry_run: print the plan (generator trainings, generations, classifier runs still to do) and its
            estimated cost, then stop: nothing is trained or written.
        estimate: seconds per step for the cost estimate where this experiment has not measured them yet:
            `generator_train_s` (one generator training), `image_s` (one generated image), `classifier_s`
            (one classifier run); measured durations of this experiment's finished runs take precedence.
        storage: an Optuna RDB URL (`postgresql+psycopg2://...`): this process is one of several workers of the
            grid, on this machine or others (`synaug.experiment.workers`); the last one writes the report.
        heartbeat_interval, grace_period: with `storage`, seconds between heartbeats of a worker's running run,
            and without one before it counts as dead and is retried (default 2 x heartbeat_interval).
        verbose: the runs print to the console (Lightning's notices, test tables, warnings), as `synaug -v`
            gives; by default each classifier run's and generator step's output goes to `<out>/logs/<run>.log`
            (also an artifact of its MLflow run) and the console shows one progress display (`console`).
    """
    synthetic = synthetic or {}
    controls_dir = str(Path("outputs") / "synthetic" / name / "controls") if controls else None
    cells = grid(base, classifiers, policies, real_fractions, real_counts, synthetic, controls_dir, schedules)
    subset_of = (lambda s: s) if subset_seeds is None else (lambda s: s % subset_seeds)

    uri = tracking_uri(tracking)
    client = MlflowClient(uri)
    exp_id = experiment_id(client, name, uri)
    # Instantiate each classifier x policy once before anything trains: a typo fails now, not hours in.
    for clf, policy in dict.fromkeys((c.classifier, c.policy) for c in cells):
        SynAugCLI(args=run_config(merge(base, classifiers[clf]), {"policy": policy}, 0, name, uri), run=False)
    subsets = sorted({subset_of(s) for s in range(seeds)})
    steps, generator_dm = [], None
    if any(s.staged for s in synthetic.values()):
        steps, generator_dm = generators.plan_steps(cells, base, generator_cache or name, subsets, merge)
        for source in synthetic.values():
            generators.check_gate(source.gate)
    pending_train = [s for s in steps if not s.trained]
    pending_images = [s for s in steps if s.generated()]
    costs = measured_costs(client, exp_id, name, estimate)
    if dry_run:
        for (
            step
        ) in steps:  # where the images will be: a missing folder fingerprints as new, so its runs count
            synthetic[step.generator].made[(step.real, step.subset_seed)] = str(step.images)
        fingerprints = {c: "" for c in classifiers}
        todo = sum(
            1
            for cell in cells
            for seed in range(seeds)
            if not finished_run(client, exp_id, name, cell, seed, base, classifiers, subset_of, uri, metric)
        )
        images = sum(s.generated() for s in steps)
        cost = (
            len(pending_train) * costs["generator_train_s"]
            + images * costs["image_s"]
            + todo * costs["classifier_s"]
        )
        print(
            f"{name} plan: {sum(not s.kind for s in steps)} generator trainings ({len(pending_train)} to do), "
            f"{len(steps)} generations ({len(pending_images)} to do, {images} images), "
            f"{len(cells)} cells x {seeds} seeds = {len(cells) * seeds} classifier runs ({todo} to do); "
            f"estimated {cost / 60:.1f} min at {costs['generator_train_s']:.0f} s per generator training, "
            f"{costs['image_s']:.3g} s per image, {costs['classifier_s']:.0f} s per classifier run "
            f"({costs['from']})"
        )
        return ""

    if storage and workers > 1:
        raise ValueError(
            "with `storage` each worker trains one run at a time: start more workers, not `workers`"
        )
    if workers > 1:
        worker_context()
    # one of several workers: the first trains the generators and enqueues the runs, the others wait for that
    pool = (
        grid_workers.join(storage, name, client, exp_id, heartbeat_interval, grace_period)
        if storage
        else None
    )

    def make_parent() -> str:
        key = {"level": "experiment", "experiment": name}
        return find_or_create(client, exp_id, key, name, {"git_commit": git_commit()})

    # the generators' runs are its children; without generators a grid refused by `prepare` leaves no run
    parent = make_parent() if steps else None
    if pending_images:  # a generation step's cost: its share of the images still to make
        costs["generation_s"] = costs["image_s"] * sum(s.generated() for s in steps) / len(pending_images)
    progress = Progress(
        {"generator trainings": len(pending_train), "generations": len(pending_images)}, costs
    )
    folder = Path(out) if out else Path("outputs") / "experiments" / name
    logs = None if verbose else folder / "logs"
    excluded: dict[tuple[str, str], str] = {}
    finished = 0  # generator steps done (trained, sampled, checked): kept for the next run of the command
    try:
        with stop_on_signals() as stopped:
            for step in steps:
                what = f"generator {step.generator} real={step.real} subset {step.subset_seed}"
                # a changed config is another training: another log
                log = log_file(logs, f"{what} {step.folder.name}")
                progress.started(what)
                try:
                    with to_log(log, "a"):
                        generators.run_step(
                            step,
                            synthetic[step.generator],
                            generator_dm,
                            client,
                            exp_id,
                            name,
                            uri,
                            parent,
                            lambda kind, result, what=what: progress.done(kind, f"{what}: {result}"),
                        )
                except Exception:
                    progress.failed(what, log)
                    raise
                finally:
                    if log is not None and step.run_id:
                        client.log_artifact(step.run_id, str(log), "logs")
                if step.excluded:
                    excluded[(step.generator, step.real)] = f"subset {step.subset_seed}: {step.excluded}"
                finished += 1
    except BaseException:
        progress.close()
        if not stopped:
            client.set_terminated(parent, "FAILED")
            raise
        flight = steps[finished]  # its fit saw the signal as an error (FAILED): it was stopped, not broken
        if flight.run_id and client.get_run(flight.run_id).info.status != "FINISHED":
            client.set_terminated(flight.run_id, "KILLED")
        client.set_terminated(parent, "KILLED")
        print(
            f"{name}: stopped by {signal.Signals(stopped[0]).name} in the generator stage: {finished} of "
            f"{len(steps)} generator steps finished (kept), no classifier run started; no report. Resume with "
            "the same command: it redoes only what did not finish (a killed generator fit resumes from its "
            "last checkpoint).",
            file=sys.stderr,
        )
        raise SystemExit(128 + stopped[0]) from None
    if excluded:
        # a generator gated out on one subset leaves its cells for that real setting unpaired on it: all go
        with progress.aside():
            for (gen, real), why in excluded.items():
                print(f"gate: {gen} at real={real} excluded from the classifier stage ({why})", flush=True)
        cells = [c for c in cells if (c.generator, c.real) not in excluded]
    generator_runs = {(s.generator, s.real, s.subset_seed): s.run_id for s in steps}
    with progress.aside():  # it prints the transform folders it makes
        fingerprints, units = prepare(
            cells, {c: merge(base, classifiers[c]) for c in classifiers}, seeds, subset_of
        )
    parent = parent or make_parent()
    settings = dict(
        name=name,
        base=base,
        classifiers=classifiers,
        policies=policies,
        real_fractions=real_fractions,
        real_counts=real_counts,
        synthetic={k: asdict(v) | {"made": None} for k, v in synthetic.items()},
        schedules=schedules,
        seeds=seeds,
        subset_seeds=subset_seeds,
        controls=controls,
        margin=margin,
        min_units=min_units,
    )
    client.log_text(parent, yaml.safe_dump(settings, sort_keys=False), "experiment.yaml")

    pairs: dict[tuple[str, str], list[Run]] = {}
    for run in search(client, exp_id, {"level": "seed", "experiment": name}):
        pairs.setdefault((run.data.tags["cell"], run.data.tags["seed"]), []).append(run)
    cell_runs, jobs, wanted, stale = {}, [], {}, 0
    folders: dict[str, str] = {}  # synthetic folder -> fingerprint
    for cell in cells:
        cell_runs[cell.name] = find_or_create(
            client,
            exp_id,
            {"level": "cell", "experiment": name, "cell": cell.name},
            cell.name,
            {**cell.tags(), "mlflow.parentRunId": parent},
        )
        client.log_batch(cell_runs[cell.name], params=[Param(k, cell.tags()[k]) for k in CELL_AXES])
        config = merge(base, classifiers[cell.classifier])
        for seed in range(seeds):
            data = cell.data(seed, subset_of(seed))
            run = run_config(config, data, seed, name, uri)
            synthetic_fps = [
                folders.setdefault(f, folder_fingerprint(f)) for f in data.get("synthetic") or []
            ]
            key = run_hash(run, fingerprints[cell.classifier], synthetic_fps)
            wanted[(cell.name, str(seed))] = key
            previous = pairs.get((cell.name, str(seed)), [])
            if any(complete(r, metric) and r.data.tags.get("config_hash") == key for r in previous):
                continue
            for r in previous if pool is None or pool.first else []:  # a later worker's: in flight elsewhere
                if complete(r, metric):  # another config, data or synthetic folder: kept, never read
                    stale += r.data.tags.get("stale") != "true"
                    client.set_tag(r.info.run_id, "stale", "true")
                elif r.info.status != "KILLED":  # killed or failed before its test metrics: superseded
                    client.set_terminated(r.info.run_id, "KILLED")
            tags = cell.tags() | {
                "level": "seed",
                "experiment": name,
                "seed": str(seed),
                "subset_seed": str(subset_of(seed)),
                "unit": units[(cell.name, subset_of(seed))],
                "config_hash": key,
                "mlflow.parentRunId": cell_runs[cell.name],
            }
            if (cell.generator, cell.real, subset_of(seed)) in generator_runs:
                tags["generator_run"] = generator_runs[(cell.generator, cell.real, subset_of(seed))]
            jobs.append((run, tags, f"{cell.name} seed {seed}"))
    changed = f" ({stale} of them because their config, data or synthetic images changed)" if stale else ""
    with progress.aside():
        print(
            f"{name}: {len(cells)} cells x {seeds} seeds; {len(jobs)} runs to train{changed}, "
            f"{len(cells) * seeds - len(jobs)} done",
            flush=True,
        )
    progress.add("classifier runs", len(jobs))
    try:
        with stop_on_signals() as stopped:
            if pool is None:
                run_all(jobs, exp_id, workers, keep_checkpoints, progress, logs, metric)
            elif not pool.run(jobs, keep_checkpoints, metric):
                return parent  # another worker writes the report
    except BaseException:
        progress.close()
        if not stopped:
            client.set_terminated(parent, "FAILED")
            raise
        # SIGTERM / SIGINT: what finished stays finished (a rerun skips it); say so, and exit non-zero
        done = {
            (r.data.tags["cell"], r.data.tags["seed"])
            for r in search(client, exp_id, {"level": "seed", "experiment": name})
            if complete(r, metric)
        }
        client.set_terminated(parent, "KILLED")
        print(
            f"{name}: stopped by {signal.Signals(stopped[0]).name}: {len(done)} of {len(cells) * seeds} runs "
            "finished (kept); no report. Resume with the same command: it trains only the unfinished runs.",
            file=sys.stderr,
        )
        raise SystemExit(128 + stopped[0]) from None
    progress.close()

    x = f"real_{learning_curve_class}" if learning_curve_class else "real_per_class"
    x_metric = f"data/real_kept/{learning_curve_class}" if learning_curve_class else "data/real_per_class"
    results, real_images = collect(
        search(client, exp_id, {"level": "seed", "experiment": name}), cells, metric, x_metric, wanted
    )
    table = pd.DataFrame(
        [
            {
                "cell": c.name,
                "classifier": c.classifier,
                "policy": c.policy,
                "real": c.real,
                "generator": c.generator,
                "ratio": c.ratio_value,
                "synthetic": c.synthetic,
                "baseline": c.baseline.name if c.baseline else "",
                "controls": ";".join(k.name for k in c.controls(cells)),
                x: real_images[c.name],
            }
            for c in cells
        ]
    ).set_index("cell")
    summary, _, markdown = report(results, table, folder, metric, minority_metric, x, margin, min_units)
    if steps:  # how good the generators were, next to the verdicts
        quality = generators.quality_table(steps)
        quality += "".join(
            f"\nExcluded by the gate: {g} at real={r} ({why}).\n" for (g, r), why in excluded.items()
        )
        markdown += quality
        (folder / "report.md").write_text((folder / "report.md").read_text() + quality)
        pd.concat(
            [
                s.quality.assign(
                    generator=s.generator, real=s.real, subset_seed=s.subset_seed, gate=s.excluded or "passed"
                )
                for s in steps
                if s.quality is not None
            ]
        ).to_csv(folder / "generator_quality.csv")

    now = int(pd.Timestamp.now().timestamp() * 1000)
    for cell, rows in summary.groupby("cell", sort=False):
        metrics = [Metric("seeds", float(rows["n"].max()), now, 0)]
        for row in rows.itertuples():
            metrics.append(Metric(row.metric, float(row.median), now, 0))
            if not math.isnan(row.ci_low):  # refused for too few units: no CI to log
                metrics += [
                    Metric(f"{row.metric}/ci_low", float(row.ci_low), now, 0),
                    Metric(f"{row.metric}/ci_high", float(row.ci_high), now, 0),
                ]
        client.log_batch(cell_runs[cell], metrics=metrics)
        client.set_terminated(cell_runs[cell], "FINISHED")
    for f in folder.iterdir():  # the runs' logs are on the runs already
        if f.is_file():
            client.log_artifact(parent, str(f), "report")
        elif f.name != "logs":
            client.log_artifacts(parent, str(f), f"report/{f.name}")
    client.set_terminated(parent, "FINISHED")
    print(markdown)
    print(f"report: {folder.resolve()}; MLflow parent run {parent} (experiment {name!r})")
    return parent
