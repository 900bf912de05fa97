"""Generators inside the grid: a synthetic source with `train:` names a generator fit config, and the experiment
trains it once per (real data setting, real subset) on exactly that subset's training images, exports it,
generates as many images per class as the source's largest ratio needs, checks their quality against the subset
and gates the generator, before any classifier trains on them.

A source with `generate:` names a training-free generator's command config instead (`kind`, default `sd-img2img`:
`configs/generators/img2img.yaml`): the same step with nothing to train. Its kind's `derive` (the registry) writes,
from exactly the subset's kept training images (`ts.real`, the rows the cells keep; never validation or test
images, never images a cell withholds), as many images per class as the largest ratio needs: for img2img,
ceil(needed / kept) variants per image, then exactly `needed`, the images with one more variant a seeded draw
(`stable_diffusion.img2img.variants`). Its config is the command's, without the settings that choose the real
images (data, split, per_image, classes, split fractions and seeds: the grid's); an override of one is an error.

Every step is a folder under `outputs/generators/<experiment>/<generator>/real<real>-subset<s>/<hash>/`, the hash
over what decides its result: the resolved generator config, the real data fingerprint, the subset's training ids
and the code of the generator's package (`code_digest`). A rerun finds the folder and skips what is done:

    export/        the generator's export (`generator.json` written last, at the end of fit: its presence = trained;
                   none for a training-free step)
    checkpoints/   `last.ckpt`, written during fit: a killed training resumes from it
    images/        the synthetic folder (`write_synthetic` resumes a killed generation image by image)
    quality.json   per-class FD/KID/precision/recall against the subset's training and validation images,
                   memorization share, leaked images; and the gate's verdict

A changed generator config (or subset, data, code) is a new hash, so only that generator and the cells that use
it are redone; their classifier runs see new synthetic folders, hence a new `config_hash` (see `grid`).

Each step is an MLflow run (tags level=generator, experiment, generator, real, subset_seed, step_hash, and kind for
a training-free one), child of the experiment's parent run; the quality metrics are logged to it, and the cells
that use it are tagged on it (`cells`) while each seed run names it (`generator_run`).

`synaug tune` runs the same steps (`plan_steps`, then `run_step` each) before its first trial, with the largest
ratio of its search space; its generator runs are top-level runs of the study's experiment (tag optuna.study). The
cache folder's first part is `generator_cache` (default: the experiment's or the study's name), so a grid and a
tune naming one cache and one source share their trained generators.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from filelock import FileLock
from mlflow import MlflowClient

from synaug.data import ClassificationData
from synaug.data.images import load_image
from synaug.data.synthetic import COLUMNS, read_synthetic
from synaug.generators import registry
from synaug.generators.transform import needed

CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"
# gate keys: a class whose quality row exceeds one of them excludes the generator (for that subset's cells)
GATE_KEYS = ("memorized_share", "leaked", "fid", "val_fid", "kid_mean")


@dataclass
class Step:
    """One (staged source, real setting, subset): where its files go and what is done of it."""

    generator: str  # the source's name in the grid
    real: str  # the cell's real data label
    subset_seed: int
    settings: dict  # real_fraction, real_count, subset_seed
    config: dict  # the generator's fit config, resolved for this subset; a training-free kind's settings
    counts: dict[str, int]  # images per class the largest ratio needs
    folder: Path
    run_id: str = ""
    quality: pd.DataFrame | None = None
    excluded: str = ""  # the gate's reason, '' when passed
    cells: list[str] = field(default_factory=list)
    kind: str = ""  # a training-free kind (`Synthetic.generate`); '' for a learned generator

    @property
    def export(self) -> Path:
        return self.folder / "export"

    @property
    def images(self) -> Path:
        return self.folder / "images"

    @property
    def trained(self) -> bool:
        """Nothing left to train: the export is there, or the kind is training-free."""
        return bool(self.kind) or (self.export / "generator.json").is_file()

    def generated(self) -> int:
        """Images still missing from the synthetic folder."""
        manifest = self.images / "manifest.csv"
        have = pd.read_csv(manifest)["class"].value_counts() if manifest.is_file() else pd.Series(dtype=int)
        return sum(max(0, n - int(have.get(c, 0))) for c, n in self.counts.items())

    @property
    def quality_file(self) -> Path:
        return self.folder / "quality.json"


def load_config(train: str | dict) -> dict:
    return yaml.safe_load(Path(train).read_text()) if isinstance(train, str) else dict(train)


def code_digest(class_path: str) -> str:
    """sha256 over the source of the generator's package (the folder of `class_path`'s module: a class or a
    function) and the generator contract: a change in the network or its training (or a training-free kind's
    code) invalidates its steps, a change elsewhere does not."""
    module = importlib.import_module(class_path.rpartition(".")[0])
    files = sorted(Path(module.__file__).parent.glob("*.py"))
    files.append(Path(importlib.import_module("synaug.generators.base").__file__))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def generator_config(
    train: str | dict, overrides: dict, data: dict, settings: dict, folder: Path, merge
) -> dict:
    """The generator's fit config for one subset: its own config and `overrides`, the grid's real data (root,
    splits) with the subset's settings, no synthetic data, its export and resumable checkpoints in `folder`."""
    config = merge(load_config(train), overrides or {})
    gen_data = config.get("data", {})
    real = {k: v for k, v in data.items() if k not in ("policy", "batch_size", "image_size", "channels")}
    config["data"] = gen_data | real | settings | {"synthetic": None, "synthetic_ratio": 0.0}
    config.setdefault("model", {}).setdefault("init_args", {})["export_dir"] = str(folder / "export")
    trainer = config.setdefault("trainer", {})
    trainer.pop("logger", None)
    callbacks = [c for c in trainer.get("callbacks") or [] if c.get("class_path") != CHECKPOINT]
    every = max(1, int(trainer.get("max_steps", 100) or 100) // 4)
    callbacks.append(
        {
            "class_path": CHECKPOINT,
            "init_args": {
                "dirpath": str(folder / "checkpoints"),
                "save_last": True,
                "every_n_train_steps": every,
            },
        }
    )
    trainer["callbacks"] = callbacks
    return config


def derive_config(kind: str, generate: str | dict, overrides: dict | None, merge) -> dict:
    """A training-free kind's settings for the grid: its command's config (`generate`) and `overrides`, reduced to
    the parameters of its `derive`. The command's other parameters choose the real images, which the grid does
    (its subset, its ratio): the base config may carry them, an override of one is an error, and so is a key the
    command does not take, or a split other than `train`."""
    derive = registry.get(kind).derive
    if derive is None:
        raise ValueError(
            f"generator kind {kind!r} cannot make images from a real subset (no `derive`); a `generate:` source "
            f"takes {sorted(k for k, v in registry.kinds().items() if v.derive)}"
        )
    takes = list(inspect.signature(derive).parameters)[4:]  # after (src, rows, out, counts)
    command = registry.get(kind).command or derive
    grid = set(inspect.signature(command).parameters) - set(takes)
    decided = sorted(set(overrides or {}) & grid)
    if decided:
        raise ValueError(
            f"{kind}: overrides {decided} choose the real images, which the experiment does per real subset "
            "(its kept training images, as many as the ratio needs): remove them"
        )
    config = merge(load_config(generate), overrides or {})
    unknown = sorted(set(config) - set(takes) - grid)
    if unknown:
        raise ValueError(f"{kind}: unknown setting(s) {unknown}; it takes {takes}")
    if config.get("split", "train") != "train":
        raise ValueError(
            f"{kind}: split {config['split']!r}; a grid's synthetic images come from training images"
        )
    return {k: v for k, v in config.items() if k in takes}


def step_hash(config: dict, fingerprint: str, train_ids: list[str], code: str) -> str:
    payload = yaml.safe_dump(
        {
            "config": config,
            "data": fingerprint,
            "ids": sorted(train_ids),
            "code": code,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def plan_steps(
    cells, base: dict, name: str, subsets: list[int], merge
) -> tuple[list[Step], ClassificationData]:
    """Every (staged source, real setting, subset) the grid's cells use, with its hashed folder."""
    data = {k: v for k, v in base.get("data", {}).items() if k not in ("synthetic", "synthetic_ratio")}
    dm = ClassificationData(**{k: v for k, v in data.items() if k not in ("real_fraction", "real_count")})
    steps: dict[tuple, Step] = {}
    for cell in cells:
        source = cell.source
        if source is None or not source.staged:
            continue
        for s in subsets:
            key = (cell.generator, cell.real, s)
            if key in steps:
                steps[key].cells.append(cell.name)
                continue
            settings = dict(real_fraction=cell.real_fraction, real_count=cell.real_count, subset_seed=s)
            _, ts = dm.training_set(**settings, synthetic=None, synthetic_ratio=0.0, replace_prob=0.0)
            ids = dm.items["id"].to_numpy()[ts.real].tolist()
            root = Path("outputs") / "generators" / name / cell.generator / f"real{cell.real}-subset{s}"
            kind = source.kind if source.generate is not None else ""
            if kind:  # nothing trained, nothing exported: its settings are the whole config
                config = derive_config(kind, source.generate, source.overrides, merge)
                derive = registry.get(kind).derive
                code = code_digest(f"{derive.__module__}.{derive.__name__}")
            else:
                config = generator_config(source.train, source.overrides, data, settings, root, merge)
                code = code_digest(config["model"]["class_path"])
            folder = root / step_hash(config, dm.source.fingerprint, ids, code)
            if not kind:
                config = generator_config(source.train, source.overrides, data, settings, folder, merge)
            counts = needed(ts.counts["real_kept"], source.most(dm.class_names))
            counts = {c: math.ceil(n * source.oversample) for c, n in counts.items()}
            steps[key] = Step(
                cell.generator, cell.real, s, settings, config, counts, folder, cells=[cell.name], kind=kind
            )
    return list(steps.values()), dm


def train(
    step: Step, client: MlflowClient, exp_id: str, experiment: str, uri: str, parent: str | None
) -> None:
    """Train the generator of `step` (resuming a killed training from its last checkpoint) on its MLflow run, a
    child of `parent` (None: a top-level run, as `synaug tune` makes them). A trained or training-free step only
    finds (or creates) its run."""
    from synaug.cli import SynAugCLI
    from synaug.experiment.runs import search

    tags = {"level": "generator", "experiment": experiment, "step_hash": step.folder.name}
    runs = search(client, exp_id, tags | {"generator": step.generator, "real": step.real})
    if runs:
        step.run_id = runs[-1].info.run_id
    else:
        step.run_id = client.create_run(
            exp_id,
            run_name=f"{step.generator} real={step.real} subset {step.subset_seed}",
            tags=tags
            | {"generator": step.generator, "real": step.real, "subset_seed": str(step.subset_seed)}
            | ({"kind": step.kind} if step.kind else {})
            | ({"mlflow.parentRunId": parent} if parent else {}),
        ).info.run_id
        client.log_text(step.run_id, yaml.safe_dump(step.config, sort_keys=False), "generator_config.yaml")
    if step.trained:
        return
    client.update_run(step.run_id, status="RUNNING")
    logger = {
        "class_path": "synaug.tracking.MLFlowLogger",
        "init_args": {"experiment_name": experiment, "tracking_uri": uri, "run_id": step.run_id},
    }
    config = step.config | {"trainer": step.config["trainer"] | {"logger": logger}}
    cli = SynAugCLI(args=config, run=False)
    last = step.folder / "checkpoints" / "last.ckpt"
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(last) if last.is_file() else None)
    if not step.trained:
        raise RuntimeError(f"{step.generator}: fit ended without an export in {step.export}")


def run_step(
    step: Step,
    source,
    dm: ClassificationData,
    client: MlflowClient,
    exp_id: str,
    experiment: str,
    uri: str,
    parent: str | None,
    done: Callable[[str, str], None] | None = None,
) -> None:
    """One step, start to end, as `synaug experiment` and `synaug tune` run it: train the generator unless its
    export is there (or it is training-free), make the images still missing, check their quality and gate it,
    filter them if `source.filter`; then `source.made` names the folder the classifiers read. `done(kind,
    result)` hears of each training ("generator trainings") and generation ("generations") finished (a progress
    display).
    Processes sharing `outputs/` (tuning or grid workers starting together) take turns on a step: the first
    trains and samples it, the others find it done."""
    done = done or (lambda kind, result: None)
    step.folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(step.folder.parent / f"{step.folder.name}.lock"):
        trained, started = step.trained, time.monotonic()
        train(step, client, exp_id, experiment, uri, parent)  # a trained step: finds its run, trains nothing
        if not trained:
            train_s = time.monotonic() - started
            client.log_metric(step.run_id, "time/train_s", train_s)
            done("generator trainings", f"trained in {train_s / 60:.1f} min")
        missing = step.generated()
        if missing:
            client.update_run(step.run_id, status="RUNNING")
            started = time.monotonic()
            generate_images(step, source.sampler, dm)
            client.log_metric(step.run_id, "time/image_s", (time.monotonic() - started) / missing)
            done("generations", f"{missing} images")
    check_quality(step, dm, source.quality, source.gate)
    log_quality(step, client)
    client.set_terminated(step.run_id, "FINISHED")
    source.made[(step.real, step.subset_seed)] = str(step.images)
    if source.filter is not None:
        kept = filter_images(step, dm, source.filter, source.quality)
        for c, share in kept.items():
            client.log_metric(step.run_id, f"filter/kept_share/{c}", share)
        source.made[(step.real, step.subset_seed)] = str(step.folder / f"filtered-{source.filter:g}")


def generate_images(step: Step, sampler: dict | None, dm: ClassificationData) -> None:
    """The images still missing: sampled from the export, or (training-free) derived from the subset's kept
    training rows, the rows its cells train on."""
    if step.kind:
        _, ts = dm.training_set(**step.settings, synthetic=None, synthetic_ratio=0.0, replace_prob=0.0)
        registry.get(step.kind).derive(dm.source, ts.real, step.images, step.counts, **step.config)
        return
    from synaug.generators.generate import generate

    generate(str(step.export), str(step.images), per_class=step.counts, sampler=sampler, seed=0)


def _by_class(dm: ClassificationData, rows: np.ndarray, size: int, channels: int) -> dict[str, torch.Tensor]:
    labels = dm.items["label"].to_numpy()[rows]
    out = {}
    for i, c in enumerate(dm.class_names):
        images, _ = dm.source.decode(rows[labels == i], size, channels)
        out[c] = images
    return out


def check_quality(step: Step, dm: ClassificationData, options: dict | None, gate: dict | None) -> None:
    """Per-class quality of the step's images against the subset's training images (and validation as a
    held-out reference), memorization and leakage (`synaug.evaluation.quality`); then the gate. Cached in
    `quality.json` beside the images, for as long as they are the images it measured: a source that needs more
    images of the same generator (a larger ratio, another class; a tune's pool) adds some, and is measured again."""
    table = None
    if step.quality_file.is_file():  # the table is cached; the gate is applied afresh (it may have changed)
        table = pd.DataFrame(json.loads(step.quality_file.read_text())).set_index("class")
        have = read_synthetic(step.images, dm.class_names).items["class"].value_counts()
        measured = table["n_synthetic"].to_dict()
        # the classes this step uses, each measured on the images its folder holds now
        table = (
            None
            if any(measured.get(c) != have.get(c, 0) for c in step.counts)
            else table.loc[list(step.counts)]
        )
    if table is None:
        table = measure_quality(step, dm, options)
        step.quality_file.write_text(json.dumps(table.reset_index().to_dict("list"), default=float))
    reasons = [
        f"{c}: {k.removeprefix('max_')} {row[k.removeprefix('max_')]:.4g} > {limit:g}"
        for k, limit in (gate or {}).items()
        for c, row in table.iterrows()
        if row[k.removeprefix("max_")] > limit
    ]
    step.quality, step.excluded = table, "; ".join(reasons)


class _Memo(torch.nn.Module):
    """The extractor, remembering the features of each batch it has seen: the two quality passes (against the
    training and the validation images) share most of their batches, and a pretrained backbone at its input
    size is the cost of the check on a CPU."""

    def __init__(self, extractor: torch.nn.Module):
        super().__init__()
        self.extractor, self.seen = extractor, {}
        self.name, self.in_chans = getattr(extractor, "name", type(extractor).__name__), extractor.in_chans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = hashlib.sha256(x.cpu().numpy().tobytes()).hexdigest() + str(tuple(x.shape))
        if key not in self.seen:
            self.seen[key] = self.extractor(x)
        return self.seen[key]


def measure_quality(step: Step, dm: ClassificationData, options: dict | None) -> pd.DataFrame:
    from synaug.evaluation.features import feature_extractor
    from synaug.evaluation.quality import quality_details, report_table

    options = dict(options or {})
    size = options.pop("image_size", dm.image_size)
    extractor = _Memo(feature_extractor(options.pop("feature", "efficientnet_lite0"), in_chans=3))
    channels = extractor.in_chans
    _, ts = dm.training_set(**step.settings, synthetic=None, synthetic_ratio=0.0, replace_prob=0.0)
    train_images = _by_class(dm, ts.real, size, channels)
    val_images = _by_class(dm, np.flatnonzero(dm.items["split"].to_numpy() == "val"), size, channels)
    synth = read_synthetic(step.images, dm.class_names).items
    fake = {
        c: torch.from_numpy(
            np.stack([load_image(f, size, channels) for f in synth.loc[synth["class"] == c, "file"]])
        )
        for c in step.counts
    }
    train = quality_details(train_images, train_images, val_images, fake, extractor, **options)
    val = quality_details(val_images, train_images, val_images, fake, extractor, **options)
    table = report_table(train)
    for column in ("fid", "kid_mean", "precision", "recall"):
        table[f"val_{column}"] = report_table(val)[column]
    return table


def filter_images(step: Step, dm: ClassificationData, tau: float, options: dict | None) -> dict[str, float]:
    """Keep the synthetic images that a classifier trained on the real subset (logistic regression on the
    quality check's features of the subset's training images) assigns to their intended class with
    probability >= `tau` (He et al., ICLR 2023; ALIA): copied with their manifest rows into `filtered-<tau>/`,
    which the cells then use. Returns the kept share per class."""
    from sklearn.linear_model import LogisticRegression

    from synaug.evaluation.features import extract, feature_extractor

    out = step.folder / f"filtered-{tau:g}"
    synth = read_synthetic(step.images, dm.class_names).items
    if not (out / "manifest.csv").is_file():
        options = dict(options or {})
        size = options.get("image_size", dm.image_size)
        extractor = feature_extractor(options.get("feature", "efficientnet_lite0"), in_chans=3)
        _, ts = dm.training_set(**step.settings, synthetic=None, synthetic_ratio=0.0, replace_prob=0.0)
        real, _ = dm.source.decode(ts.real, size, extractor.in_chans)
        labels = dm.items["label"].to_numpy()[ts.real]
        head = LogisticRegression(max_iter=1000).fit(extract(extractor, real).numpy(), labels)
        fake = torch.from_numpy(np.stack([load_image(f, size, extractor.in_chans) for f in synth["file"]]))
        proba = head.predict_proba(extract(extractor, fake).numpy())
        column = {c: i for i, c in enumerate(head.classes_)}
        keep = proba[np.arange(len(synth)), [column[label] for label in synth["label"]]] >= tau
        kept = synth[keep]
        for rel in kept["path"]:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(step.images / rel, out / rel)
        if (step.images / "train_sets").is_dir():
            shutil.copytree(step.images / "train_sets", out / "train_sets", dirs_exist_ok=True)
        kept[COLUMNS].to_csv(out / "manifest.csv", index=False)  # written last: its presence = filtered
    kept = pd.read_csv(out / "manifest.csv")["class"].value_counts()
    total = synth["class"].value_counts()
    return {c: float(kept.get(c, 0) / total[c]) for c in total.index}


def log_quality(step: Step, client: MlflowClient) -> None:
    for c, row in step.quality.iterrows():
        for k, v in row.items():
            if isinstance(v, (int, float, np.number)) and not pd.isna(v):
                client.log_metric(step.run_id, f"quality/{k}/{c}", float(v))
    client.log_text(step.run_id, step.quality.to_csv(), "quality/report.csv")
    client.set_tag(step.run_id, "gate", "excluded" if step.excluded else "passed")
    if step.excluded:
        client.set_tag(step.run_id, "gate_reason", step.excluded[:4000])
    client.set_tag(step.run_id, "cells", ";".join(step.cells)[:4000])


def check_gate(gate: dict | None) -> None:
    unknown = sorted({k.removeprefix("max_") for k in gate or {}} - set(GATE_KEYS))
    if unknown:
        raise ValueError(f"gate keys are max_<metric> with metric in {GATE_KEYS}; unknown: {unknown}")


def quality_table(steps: list[Step]) -> str:
    """The report's section on generator quality: per (generator, real setting, subset, class)."""
    if not steps:
        return ""
    lines = [
        "\n### Generator quality (per real subset, against its own training images; val_: against validation)\n",
        "| generator | real | subset | class | FD | KID | precision | recall | val FD | memorized | leaked | gate |",
        "|---|---|:-:|---|:-:|:-:|:-:|:-:|:-:|:-:|:-:|---|",
    ]
    for s in steps:
        if s.quality is None:
            continue
        for c, r in s.quality.iterrows():
            lines.append(
                f"| {s.generator} | {s.real} | {s.subset_seed} | {c} | {r['fid']:.4g} | {r['kid_mean']:.4g} "
                f"| {r['precision']:.2f} | {r['recall']:.2f} | {r['val_fid']:.4g} | {r['memorized_share']:.2f} "
                f"| {int(r['leaked'])} | {'excluded: ' + s.excluded if s.excluded else 'passed'} |"
            )
    extractor = next((s.quality["extractor"].iloc[0] for s in steps if s.quality is not None), "")
    return "\n".join(lines) + f"\n\nFeature space: {extractor}.\n"
