"""What the analysis notebooks (`notebooks/*.ipynb`) call: runs, metrics and artifacts from MLflow as tables and
files, a grid of a synthetic folder's samples, and tiny demo runs to try the notebooks (and test them) on.

The notebooks hold no logic of their own: each reads its parameters, then calls these functions and
`synaug.stats` / `synaug.evaluation.explain`. This module imports neither torch nor lightning (nor `synaug.tracking`, which
imports lightning) at the top, so that a notebook that only reads MLflow starts in seconds; the demo functions
import them when called. For the same reason the tracking URI is always given: the notebooks take it from
`$MLFLOW_TRACKING_URI`, else the checkout's local store.

An experiment's runs are found by their tags, not by how they are nested: every finished run tagged
`experiment=<name>` that also has `cell` and `seed` tags and `test/*` metrics is one seed of one cell, and its
other tags (`CELL_TAGS`: classifier, policy, real_fraction, generator, ratio, ...) describe the cell.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.entities import Metric, Run, RunTag
from PIL import Image

# A progress bar per downloaded figure only clutters a notebook.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# The tags that describe a cell (`synaug experiment` sets them all; a run may carry fewer).
CELL_TAGS = (
    "classifier",
    "policy",
    "real",
    "real_fraction",
    "real_count",
    "generator",
    "ratio",
    "augment_classes",
    "schedule",
)
# A cell's baseline is the cell with the same values of these and no synthetic data.
BASELINE_KEYS = ("classifier", "policy", "real", "real_fraction", "real_count")


def _search(c: mlflow.MlflowClient, tags: dict[str, str], experiment: str | None = None) -> list[Run]:
    """Every finished run with these tag values in `experiment` (default: all experiments), oldest first."""
    from synaug.experiment.runs import every_page, search  # MLflow and pandas only, as this module

    if experiment is None:
        ids = [e.experiment_id for e in every_page(c.search_experiments)]
    else:
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            raise LookupError(f"no MLflow experiment '{experiment}' at {c.tracking_uri}")
        ids = [exp.experiment_id]
    return search(c, ids, tags, status="FINISHED")


def _numeric(column: pd.Series) -> pd.Series:
    """Tags are strings: numbers become numbers (ratio 0.5), anything else (a per-class dict) stays as it is."""
    try:
        return pd.to_numeric(column)
    except (ValueError, TypeError):
        return column


# --- experiments ----------------------------------------------------------------------------------------------


def experiment_runs(experiment: str, tracking_uri: str) -> pd.DataFrame:
    """One row per finished seed run of `experiment`, in the order they ran.

    Columns: run_id, cell, seed, the cell tags present (`CELL_TAGS`), then every `test/*` metric. Runs without
    `cell` and `seed` tags (the experiment's parent, the cells' runs) or without test metrics are left out.
    """
    c = mlflow.MlflowClient(tracking_uri)
    runs = _search(c, {"experiment": experiment})
    rows = [
        {
            "run_id": r.info.run_id,
            "cell": r.data.tags["cell"],
            "seed": int(r.data.tags["seed"]),
            # the independent unit: the real subset (and its generator) the seed trained on
            "unit": r.data.tags.get("unit", r.data.tags.get("subset_seed", r.data.tags["seed"])),
            **{t: r.data.tags[t] for t in CELL_TAGS if t in r.data.tags},
            **{m: v for m, v in r.data.metrics.items() if m.startswith("test/")},
        }
        for r in runs
        if {"cell", "seed"} <= r.data.tags.keys()
        and any(m.startswith("test/") for m in r.data.metrics)
        and r.data.tags.get("stale") != "true"  # superseded by a rerun under a changed config
    ]
    if not rows:
        raise LookupError(
            f"no finished runs tagged experiment='{experiment}' with cell, seed and test metrics at "
            f"{c.tracking_uri}"
        )
    runs = pd.DataFrame(rows)
    for t in CELL_TAGS:
        if t in runs:
            runs[t] = _numeric(runs[t])
    return runs


def results_table(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`experiment_runs` as `synaug.stats` takes them: the long results table (cell, seed, unit, metric, value) and the
    cells (indexed by cell, one column per cell tag)."""
    metrics = [m for m in runs if m.startswith("test/")]
    ids = ["cell", "seed", "unit"] if "unit" in runs else ["cell", "seed"]
    results = runs.melt(ids, metrics, var_name="metric", value_name="value").dropna()
    cells = runs.drop_duplicates("cell").set_index("cell")[[t for t in CELL_TAGS if t in runs]]
    return results.reset_index(drop=True), cells


def is_baseline(cells: pd.DataFrame) -> pd.Series:
    """Cells without synthetic data: ratio 0, or no generator (missing, empty or `none`)."""
    plain = pd.Series(False, index=cells.index)
    if "ratio" in cells:
        plain |= cells["ratio"].astype(str).isin(["0", "0.0"])
    if "generator" in cells:
        plain |= cells["generator"].fillna("").astype(str).str.lower().isin(["", "none"])
    return plain


def baselines(cells: pd.DataFrame) -> dict[str, str]:
    """cell -> its baseline: the cell with the same `BASELINE_KEYS` tags and no synthetic data (`is_baseline`).

    Cells without such a baseline are left out (they get no comparison in the table). Two baseline cells with
    the same keys raise: which of them a cell should be compared with would be a guess.
    """
    keys = [k for k in BASELINE_KEYS if k in cells]
    plain = is_baseline(cells)
    base = cells.loc[plain, keys].astype(str)
    twins = base.duplicated(keep=False)
    if twins.any():
        raise ValueError(
            f"baseline cells {list(base.index[twins])} share {keys}; tell them apart with another tag"
        )
    lookup = {tuple(row): cell for cell, row in zip(base.index, base.itertuples(index=False), strict=True)}
    augmented = cells.loc[~plain, keys].astype(str)
    return {
        cell: lookup[tuple(row)]
        for cell, row in zip(augmented.index, augmented.itertuples(index=False), strict=True)
        if tuple(row) in lookup
    }


def where(cells: pd.DataFrame, **equals) -> pd.DataFrame:
    """The cells whose tags equal `equals` (every cell when there are none), e.g. `where(cells, policy="hflip")`."""
    return cells[(cells[list(equals)] == pd.Series(equals)).all(axis=1)]


def per_seed(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """`metric` of every run as a cell x seed table: the raw numbers behind the medians."""
    return runs.pivot(index="cell", columns="seed", values=metric).loc[runs["cell"].unique()]


# --- runs of the commands -------------------------------------------------------------------------------------


def command_run(command: str, experiment: str, tracking_uri: str, run_id: str | None = None) -> Run:
    """The run `run_id`, else the latest finished run of `synaug <command>` in `experiment`."""
    c = mlflow.MlflowClient(tracking_uri)
    if run_id is not None:
        return c.get_run(run_id)
    runs = _search(c, {"synaug.command": command}, experiment)
    if not runs:
        raise LookupError(f"no finished `synaug {command}` run in experiment '{experiment}'")
    return runs[-1]


def metric_table(run: Run, prefix: str) -> pd.DataFrame:
    """Metrics `<prefix>/<name>/<class>` of `run` as a class x name table."""
    rows = {}
    for key, value in run.data.metrics.items():
        if key.startswith(prefix + "/"):
            name, cls = key.removeprefix(prefix + "/").split("/", 1)
            rows.setdefault(cls, {})[name] = value
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("class")


def artifact(run: Run, path: str, tracking_uri: str) -> Path:
    """A local copy of the artifact `path` of `run` (in a fresh temporary folder)."""
    local = mlflow.MlflowClient(tracking_uri).download_artifacts(
        run.info.run_id, path, tempfile.mkdtemp(prefix="synaug-")
    )
    return Path(local)


def quality_run(folder: str | Path, experiment: str, tracking_uri: str, run_id: str | None = None) -> Run:
    """`run_id`, else the latest `synaug quality` run in `experiment` whose `synthetic` parameter is `folder`.

    The parameter is the path as given to `synaug quality`, perhaps relative to another working directory, so
    a relative one matches any folder whose path ends with it.
    """
    if run_id is not None:
        return mlflow.MlflowClient(tracking_uri).get_run(run_id)
    folder = Path(folder).expanduser().resolve()
    runs = _search(mlflow.MlflowClient(tracking_uri), {"synaug.command": "quality"}, experiment)

    def same(given: str) -> bool:
        path = Path(given).expanduser()
        if path.is_absolute():
            return path.resolve() == folder
        parts = [p for p in path.parts if p not in (".", "..")]
        return list(folder.parts[-len(parts) :]) == parts

    matching = [r for r in runs if same(r.data.params["synthetic"])]
    if not matching:
        raise LookupError(
            f"no `synaug quality` run of {folder} in experiment '{experiment}' (runs there are of "
            f"{sorted({r.data.params['synthetic'] for r in runs})}); run `synaug quality DATA {folder}`"
        )
    return matching[-1]


# --- synthetic folders ----------------------------------------------------------------------------------------


def manifest(folder: str | Path) -> pd.DataFrame:
    """The manifest of a synthetic folder (see `synaug.data.synthetic`), with `file`, each image's path."""
    folder = Path(folder).expanduser().resolve()
    items = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
    return items.assign(file=[str(folder / p) for p in items["path"]])


def samples_figure(folder: str | Path, n: int = 8, seed: int = 0) -> Figure:
    """A row of `n` randomly drawn images per class of a synthetic folder, as they are on disk."""
    items = manifest(folder)
    classes = list(items["class"].unique())
    rng = np.random.default_rng(seed)
    fig = Figure(figsize=(1.4 * n, 1.5 * len(classes) + 0.3), layout="constrained")
    axes = fig.subplots(len(classes), n, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for row, c in zip(axes, classes, strict=True):
        files = items.loc[items["class"] == c, "file"].to_numpy()
        for ax, f in zip(row, rng.permutation(files)[:n], strict=False):
            image = np.asarray(Image.open(f))
            ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        row[0].set_title(f"{c} ({len(files)})", fontsize=9, loc="left")
    fig.suptitle(f"{Path(folder).name}: {n} samples per class")
    return fig


# --- demo runs ------------------------------------------------------------------------------------------------

DEMO_METRICS = {
    "test/acc": 0.80,
    "test/precision_macro": 0.74,
    "test/recall_macro": 0.72,
    "test/f1_macro": 0.72,
    "test/auroc": 0.85,
    "test/cross_entropy": 0.45,
    "test/recall/malignant": 0.55,
}


def demo_experiment(name: str, tracking_uri: str, seeds: int = 3, gain: float = 0.03) -> str:
    """A made-up experiment to try `compare_runs.ipynb` on, with no training: a baseline cell and one with
    synthetic data, `seeds` seeds each, the augmented cell `gain` better on every metric but cross-entropy.

    Logged in the shape the notebook reads (see the module docstring): a parent run tagged `experiment`, a
    child run per cell and a grandchild run per seed, in the MLflow experiment `name`. Returns the parent's id.
    """
    from synaug.tracking import experiment_id  # here: see the module docstring

    c = mlflow.MlflowClient(tracking_uri)
    exp_id = experiment_id(c, name, tracking_uri)
    rng = np.random.default_rng(0)
    cells = {
        "basic_cnn/hflip": dict(generator="none", ratio="0.0"),
        "basic_cnn/hflip/diffusion x0.5": dict(generator="diffusion", ratio="0.5"),
    }

    def run(tags: dict[str, str], parent: str | None) -> str:
        tags = {"experiment": name, **tags} | ({"mlflow.parentRunId": parent} if parent else {})
        return c.create_run(exp_id, tags=tags, run_name=tags.get("cell")).info.run_id

    parent = run({}, None)
    for i, (cell, attrs) in enumerate(cells.items()):
        tags = dict(cell=cell, classifier="basic_cnn", policy="hflip", real_fraction="1.0", **attrs)
        child = run(tags, parent)
        for seed in range(seeds):
            leaf = run({**tags, "seed": str(seed)}, child)
            now = int(time.time() * 1000)
            metrics = [
                Metric(m, v + (-i if m == "test/cross_entropy" else i) * gain + rng.normal(0, 0.01), now, 0)
                for m, v in DEMO_METRICS.items()
            ]
            c.log_batch(leaf, metrics=metrics, tags=[RunTag("synaug.demo", "true")])
            c.set_terminated(leaf)
        c.set_terminated(child)
    c.set_terminated(parent)
    return parent


def demo_synthetic(
    data: str | Path, folder: str | Path, n: int = 8, image_size: int = 28, seed: int = 0
) -> Path:
    """A stand-in synthetic folder: `n` training images per class of `data`, mirrored and with noise added,
    written with `SyntheticWriter` (generator `demo`). For trying the notebooks and `synaug explain`."""
    from synaug.data import load_source  # here: importing it imports torch (see the module docstring)
    from synaug.data.synthetic import SyntheticWriter

    source = load_source(str(data))
    train = source.items[source.items["split"] == "train"]
    writer = SyntheticWriter(folder, generator="demo", run_id="demo", train_ids=train["id"].tolist())
    rng = np.random.default_rng(seed)
    for label, c in enumerate(source.classes):
        rows = np.flatnonzero(source.items["split"].eq("train") & source.items["label"].eq(label))
        for i, row in enumerate(rng.choice(rows, n, replace=False)):
            x = source.load(int(row), image_size, 1)
            noisy = x[:, :, ::-1] + rng.normal(0, 12, x.shape)
            writer.write(
                noisy.clip(0, 255).astype(np.uint8), c, i, seed=i, source=[source.items.at[row, "id"]]
            )
    return Path(folder)


def demo_classifier(
    data: str | Path, folder: str | Path, image_size: int = 28, max_steps: int = 150, seed: int = 0
) -> Path:
    """A small basic CNN trained for `max_steps` steps on `data` (grey, `image_size` px), saved as a Lightning
    checkpoint in `folder`: something to point `synaug explain` and `synaug quality` at in a demo or a test."""
    import lightning.pytorch as L  # here: see the module docstring

    from synaug.classifiers import ImageClassifier
    from synaug.data import ClassificationData

    L.seed_everything(seed, verbose=False)
    dm = ClassificationData(str(data), image_size=image_size, channels=1, batch_size=64, loader="memory")
    model = ImageClassifier(
        "basic_cnn",
        num_classes=dm.num_classes,
        in_chans=1,
        image_size=image_size,
        class_names=dm.class_names,
        model_kwargs={"channels": (8, 16), "hidden": (64, 32)},
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm)
    path = Path(folder) / "demo_classifier.ckpt"
    trainer.save_checkpoint(path)
    return path
