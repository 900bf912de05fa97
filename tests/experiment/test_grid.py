"""`synaug experiment` end to end on BreastMNIST (a tiny CNN at 28 px, one short epoch): the MLflow layout, the
report, resuming after a kill, the learning-curve report, the example configs; and the transform generator's
provenance, which the leakage guard relies on."""

import importlib
import inspect
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from jsonargparse import ArgumentParser

from synaug import stats
from synaug.cli import main
from synaug.data import ClassificationData, DataError
from synaug.experiment.grid import Synthetic, check_base, experiment, grid, merge, prepare
from synaug.experiment.report import report
from synaug.experiment.runs import search
from synaug.experiment.tune import tune
from synaug.generators.transform import transform_generate

EXPERIMENTS = Path(__file__).parents[2] / "experiments"
CNN = {
    "cnn": {
        "model": {
            "class_path": "synaug.classifiers.ImageClassifier",
            "init_args": {"backbone": "basic_cnn", "model_kwargs": {"hidden": [32, 16]}},
        }
    }
}
BASELINE, AUGMENTED = "cnn/none/real=1/none", "cnn/none/real=1/transform@0.25"


def tiny_base(npz) -> dict:
    return {
        "data": {"root": str(npz), "image_size": 28, "batch_size": 64},
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 2,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
    }


@pytest.fixture(scope="module")
def grid_args(breast_npz, tmp_path_factory) -> dict:
    # the experiment makes this folder itself, from each seed's real subset (all real images here)
    folder = tmp_path_factory.mktemp("synthetic") / "transform-{real}-{subset_seed}"
    source = Synthetic(
        folders=[str(folder)], ratios=[0.25], augment_classes=["malignant"], transform="autoaugment"
    )
    return dict(
        name="grid",
        base=tiny_base(breast_npz),
        classifiers=CNN,
        synthetic={"transform": source},
        seeds=2,
        out=str(tmp_path_factory.mktemp("report")),
        controls=False,  # the controls are tested on their own: two more cells here would only cost time
    )


@pytest.fixture(scope="module")
def ran(grid_args, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        parent = experiment(**grid_args)
        assert not list(Path().rglob("*.ckpt"))  # checkpoints go once tested
    return parent


def seed_runs(client, exp_id) -> dict[tuple[str, int], list]:
    runs = {}
    for run in search(client, exp_id, {"level": "seed", "experiment": "grid"}):
        runs.setdefault((run.data.tags["cell"], int(run.data.tags["seed"])), []).append(run)
    return runs


def test_two_cells_two_seeds_nest_in_mlflow_with_tags(ran, grid_args):
    client = mlflow.MlflowClient()
    exp_id = client.get_experiment_by_name("grid").experiment_id
    (parent,) = search(client, exp_id, {"level": "experiment", "experiment": "grid"})
    assert parent.info.run_id == ran and parent.info.status == "FINISHED"
    cells = {r.data.tags["cell"]: r for r in search(client, exp_id, {"level": "cell", "experiment": "grid"})}
    assert set(cells) == {BASELINE, AUGMENTED}
    assert all(
        r.data.tags["mlflow.parentRunId"] == ran and r.info.status == "FINISHED" for r in cells.values()
    )
    assert cells[AUGMENTED].data.metrics["seeds"] == 2
    assert (
        cells[AUGMENTED].data.tags["generator"] == "transform" and cells[BASELINE].data.tags["ratio"] == "0"
    )

    runs = seed_runs(client, exp_id)
    assert sorted(runs) == [(BASELINE, 0), (BASELINE, 1), (AUGMENTED, 0), (AUGMENTED, 1)]
    for (cell, seed), (run,) in runs.items():
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == cells[cell].info.run_id
        assert (tags["classifier"], tags["policy"], tags["real_fraction"]) == ("cnn", "none", "1")
        assert tags["subset_seed"] == str(seed) and run.info.status == "FINISHED"
        assert {"test/f1_macro", "test/acc", "test/recall/malignant"} <= set(run.data.metrics)
        # ratio 0.25 of the 147 kept malignant images, in the augmented cell only
        assert run.data.metrics["data/synthetic/malignant"] == (37 if cell == AUGMENTED else 0)
        assert run.data.metrics["data/real_kept/malignant"] == 147


def test_runs_carry_the_grid_axes_and_their_settings_as_params(ran):
    # main: cell runs had no params at all ("No parameters to display" in the UI's compare view), seed runs
    # none of classifier, generator, ratio, schedule: the parallel-coordinates plot had no ratio axis
    client = mlflow.MlflowClient()
    exp_id = client.get_experiment_by_name("grid").experiment_id
    for run in search(client, exp_id, {"level": "cell", "experiment": "grid"}):
        augmented = run.data.tags["cell"] == AUGMENTED
        assert run.data.params == {
            "classifier": "cnn",
            "policy": "none",
            "real": "1",
            "real_fraction": "1",
            "real_count": "",
            "generator": "transform" if augmented else "none",
            "ratio": "0.25" if augmented else "0",
            "schedule": "mix" if augmented else "",
        }
    for (cell, seed), (run,) in seed_runs(client, exp_id).items():
        params = run.data.params
        axes = {
            k: params[k] for k in ("cell", "classifier", "generator", "ratio", "schedule", "seed_everything")
        }
        augmented = cell == AUGMENTED
        assert axes == {
            "cell": cell,
            "classifier": "cnn",
            "generator": "transform" if augmented else "none",
            "ratio": "0.25" if augmented else "0",
            "schedule": "mix" if augmented else "",
            "seed_everything": str(seed),
        }
        assert (params["policy"], params["real_fraction"], params["synthetic_ratio"]) == (
            "none",
            "1.0",
            "0.25" if augmented else "0.0",
        )
        assert (params["optimizer"], params["optimizer.lr"]) == ("Adam", "0.001")
        assert (params["trainer.max_epochs"], params["trainer.precision"], params["image_size"]) == (
            "1",
            "32-true",
            "28",
        )


def test_report_rows_are_the_cells(ran, grid_args):
    folder = Path(grid_args["out"])
    rows = [line for line in (folder / "report.md").read_text().splitlines() if line.startswith("| cnn/")]
    assert [r.split(" | ")[0].removeprefix("| ") for r in rows] == [BASELINE, AUGMENTED]
    assert "baseline" in rows[0] and rows[1].split(" | ")[1] == "2"  # seeds
    comparison = pd.read_csv(folder / "comparison.csv")
    assert set(comparison["cell"]) == {AUGMENTED} and set(comparison["baseline"]) == {BASELINE}
    assert (comparison["n"] == 2).all()
    results = pd.read_csv(folder / "results.csv")
    assert results.groupby("cell")["seed"].nunique().to_dict() == {BASELINE: 2, AUGMENTED: 2}
    client = mlflow.MlflowClient()
    logged = {a.path for a in client.list_artifacts(ran, "report")}
    logged |= {a.path for a in client.list_artifacts(ran, "report/plots")}
    assert {"report/report.md", "report/summary.csv", "report/plots/cells_test_f1_macro.png"} <= logged
    assert "report/plots/ratio_transform_none_real1.png" in logged


def test_the_transform_source_is_made_per_real_subset(ran, grid_args):
    made = sorted(Path(grid_args["synthetic"]["transform"].folders[0]).parent.glob("transform-*"))
    assert [f.name for f in made] == ["transform-1-0", "transform-1-1"]  # one per subset seed
    for folder in made:  # as many as the largest ratio asks for: 0.25 x 147 malignant images
        manifest = pd.read_csv(folder / "manifest.csv")
        assert manifest["class"].value_counts().to_dict() == {"malignant": 37}
        assert set(manifest["generator"]) == {"transform"}


def test_rerun_redoes_exactly_the_unfinished_pairs(ran, grid_args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    client = mlflow.MlflowClient()
    exp_id = client.get_experiment_by_name("grid").experiment_id
    before = {pair: runs[0] for pair, runs in seed_runs(client, exp_id).items()}
    # killed during fit: the run is still RUNNING
    client.update_run(before[(BASELINE, 1)].info.run_id, status="RUNNING")
    # killed between fit and test: Lightning had already marked the run FINISHED, with no test metrics
    killed = before[(AUGMENTED, 0)]
    client.delete_run(killed.info.run_id)
    fake = client.create_run(exp_id, tags=killed.data.tags).info.run_id
    client.log_metric(fake, "val/f1_macro", 0.5)
    client.set_terminated(fake, "FINISHED")

    # through the command line, as `synaug experiment -c config.yaml`; the two redone seeds run side by side
    # in two processes
    config = tmp_path / "config.yaml"
    args = grid_args | {"synthetic": {k: asdict(v) for k, v in grid_args["synthetic"].items()}}
    config.write_text(yaml.safe_dump(args))
    main(["experiment", "-c", str(config), "--workers", "2"])

    after = seed_runs(client, exp_id)
    for pair in [(BASELINE, 0), (AUGMENTED, 1)]:  # finished: skipped
        assert [r.info.run_id for r in after[pair]] == [before[pair].info.run_id]
    redone = {(BASELINE, 1): before[(BASELINE, 1)].info.run_id, (AUGMENTED, 0): fake}
    for pair, old in redone.items():
        runs = {r.info.run_id: r for r in after[pair]}
        assert runs[old].info.status == "KILLED"
        (new,) = [r for i, r in runs.items() if i != old]
        assert new.info.status == "FINISHED" and "test/f1_macro" in new.data.metrics
        # each worker process wrote its run's output to the run's log, logged to the run
        (log,) = client.list_artifacts(new.info.run_id, "logs")
        assert "Test metric" in (Path(grid_args["out"]) / log.path).read_text()
    results = pd.read_csv(Path(grid_args["out"]) / "results.csv")
    assert len(results.drop_duplicates(["cell", "seed"])) == 4


def test_learning_curve_and_worth_of_the_synthetic_data(tmp_path):
    # real-only medians 0.5 / 0.7 / 0.8 at 10 / 50 / 100 real images per class; with synthetic data, 10 real
    # images reach 0.7: worth about 50 real images
    rng = np.random.default_rng(0)
    levels = {
        ("none", 10): 0.5,
        ("none", 50): 0.7,
        ("none", 100): 0.8,
        ("gen@1", 10): 0.7,
        ("gen@1", 100): 0.85,
    }
    cells, rows = [], []
    for (synthetic, n), level in levels.items():
        cell = f"cnn/none/real={n}/{synthetic}"
        cells.append(
            {
                "cell": cell,
                "classifier": "cnn",
                "policy": "none",
                "real": str(n),
                "generator": synthetic.split("@")[0],
                "ratio": 0.0 if synthetic == "none" else 1.0,
                "synthetic": synthetic,
                "baseline": "" if synthetic == "none" else f"cnn/none/real={n}/none",
                "real_per_class": float(n),
            }
        )
        for seed in range(8):
            noise = rng.normal(0, 0.01)
            rows += [
                (cell, seed, m, level + noise) for m in ["test/f1_macro", "test/acc", "test/cross_entropy"]
            ]
            rows += [(cell, seed, m, 0.5 + noise) for m in ["test/precision_macro", "test/recall_macro"]]
    results = pd.DataFrame(rows, columns=["cell", "seed", "metric", "value"])
    _, comparison, table = report(results, pd.DataFrame(cells).set_index("cell"), tmp_path)

    curve = pd.read_csv(tmp_path / "learning_curve.csv")
    assert len(curve) == 5 and set(curve["synthetic"]) == {"none", "gen@1"}
    worth = pd.read_csv(tmp_path / "worth.csv").set_index("cell")
    assert 40 < worth.loc["cnn/none/real=10/gen@1", "n_equivalent"] < 60
    assert worth.loc["cnn/none/real=100/gen@1", "flag"] == "above"  # beyond the largest real set measured
    assert "What the synthetic data is worth" in table
    assert (tmp_path / "plots" / "learning_curve_cnn_none.png").is_file()
    assert set(comparison["cell"]) == {"cnn/none/real=10/gen@1", "cnn/none/real=100/gen@1"}


def test_base_may_not_set_what_the_grid_decides(breast_npz):
    base = tiny_base(breast_npz)
    base["data"]["seed"] = 3
    with pytest.raises(ValueError, match=r"data\.seed"):
        experiment("bad", base, CNN, seeds=1)
    with pytest.raises(ValueError, match=r"data\.policy"):
        check_base({"data": {"policy": "hflip"}}, "base", ("policy",))


def test_transform_source_records_its_real_subset(breast_npz, tmp_path):
    out = tmp_path / "half"
    args = dict(data=str(breast_npz), out=str(out), per_class={"malignant": 30}, image_size=28)
    transform_generate(**args, real_fraction=0.5, subset_seed=1)
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(manifest) == 30 and set(manifest["generator"]) == {"transform"}
    (train_set,) = set(manifest["train_set"])
    drawn = set((out / "train_sets" / f"{train_set}.txt").read_text().split("\n"))

    data = dict(root=str(breast_npz), image_size=28, real_fraction=0.5, synthetic=[str(out)])
    dm = ClassificationData(**data, synthetic_ratio={"malignant": 0.2}, subset_seed=1)
    dm.setup()
    assert drawn == set(dm.train_ids)  # exactly the run's real subset
    assert set(manifest["source"]) <= drawn  # each image comes from one of its real images
    with pytest.raises(DataError, match="outside this run's training set"):
        ClassificationData(**data, synthetic_ratio={"malignant": 0.2}, subset_seed=2).setup()

    transform_generate(**args, real_fraction=0.5, subset_seed=1)  # resuming: nothing to add
    assert len(pd.read_csv(out / "manifest.csv")) == 30
    with pytest.raises(ValueError, match="generated with"):
        transform_generate(**args, real_fraction=0.5, subset_seed=1, policy="hflip")


def test_rare_class_cells_get_their_own_subsets_and_sources(breast_npz, tmp_path):
    # keep 25 real malignant images, a fresh draw per subset seed; each draw gets its own transform folder
    folder = tmp_path / "{real}-{subset_seed}"
    source = Synthetic(
        folders=[str(folder)], ratios=[0.5, 1.0], augment_classes=["malignant"], transform="hflip"
    )
    base = tiny_base(breast_npz)
    cells = grid(
        base, CNN, real_fractions=[1.0], real_counts=[{"malignant": 25}], synthetic={"hflip": source}
    )
    assert [c.name for c in cells] == [
        "cnn/none/real=1/none",
        "cnn/none/real=1/hflip@0.5",
        "cnn/none/real=1/hflip@1",
        "cnn/none/real=n=malignant:25/none",
        "cnn/none/real=n=malignant:25/hflip@0.5",
        "cnn/none/real=n=malignant:25/hflip@1",
    ]
    rare = cells[-1]
    assert rare.tags()["real_count"] == "malignant:25" and rare.data(3, 1)["real_count"] == {"malignant": 25}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        prepare(cells[3:], {"cnn": merge(base, CNN["cnn"])}, seeds=4, subset_of=lambda s: s % 2)
    drawn = []
    for s in (0, 1):
        manifest = pd.read_csv(tmp_path / f"n=malignant:25-{s}" / "manifest.csv", dtype=str)
        assert len(manifest) == 25  # the largest ratio, 1.0, of 25 kept images
        drawn.append(set(manifest["source"]))
        data = ClassificationData(**base["data"], **rare.data(s, s))
        _, ts = data.training_set()
        assert ts.counts.loc["malignant"].to_dict() == {
            "real_available": 147,
            "real_kept": 25,
            "synthetic": 25,
        }
        assert drawn[-1] <= set(data.items["id"].to_numpy()[ts.real])  # made from this subset's images
    assert drawn[0] != drawn[1]


def test_a_source_from_another_real_subset_is_refused_before_training(breast_npz, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # one folder made from subset 0 of half the real images, used by every seed: seed 1 draws another subset
    folder = tmp_path / "half0"
    transform_generate(
        str(breast_npz), str(folder), ratio=0.5, image_size=28, real_fraction=0.5, subset_seed=0
    )
    source = Synthetic(folders=[str(folder)], ratios=[0.5])
    with pytest.raises(DataError, match="outside this run's training set"):
        experiment(
            "refused", tiny_base(breast_npz), CNN, real_fractions=[0.5], synthetic={"t": source}, seeds=2
        )
    client = mlflow.MlflowClient()
    assert not search(
        client, client.get_experiment_by_name("refused").experiment_id, {"experiment": "refused"}
    )


@pytest.mark.parametrize("config", sorted(EXPERIMENTS.glob("*/config.yaml")), ids=lambda p: p.parent.name)
def test_example_configs_parse(config):
    settings = yaml.safe_load(config.read_text())
    fn = experiment if "classifiers" in settings else tune
    parser = ArgumentParser()
    parser.add_function_arguments(fn, as_positional=True)
    args = parser.instantiate_classes(parser.parse_object(settings))
    configs = [merge(args.base, c) for c in args.classifiers.values()] if fn is experiment else [args.base]
    for c in configs:  # the models exist and take these arguments (instantiating them all would take minutes)
        module, name = c["model"]["class_path"].rsplit(".", 1)
        signature = inspect.signature(getattr(importlib.import_module(module), name))
        assert set(c["model"].get("init_args", {})) <= set(signature.parameters)
    if fn is experiment:  # the grid is valid: no cell twice, nothing in base that the grid decides
        cells = grid(
            args.base, args.classifiers, args.policies, args.real_fractions, args.real_counts, args.synthetic
        )
        assert len(cells) >= 2


def test_rerun_retrains_a_changed_config_and_reads_only_the_requested_seeds(
    ran, grid_args, tmp_path, monkeypatch
):
    # main matched finished runs by (experiment, cell, seed) only: a new learning rate said "0 runs to train"
    # and printed the old report, and lowering `seeds` kept the dropped seed in the results
    monkeypatch.chdir(tmp_path)
    client = mlflow.MlflowClient()
    exp_id = client.get_experiment_by_name("grid").experiment_id
    before = {pair: [r.info.run_id for r in runs] for pair, runs in seed_runs(client, exp_id).items()}
    out = tmp_path / "report"

    experiment(**grid_args | {"seeds": 1, "out": str(out)})  # nothing changed: reuses, reads seed 0 only
    assert {pair: [r.info.run_id for r in runs] for pair, runs in seed_runs(client, exp_id).items()} == before
    assert set(pd.read_csv(out / "results.csv")["seed"]) == {0}

    lr = merge(
        CNN,
        {
            "cnn": {
                "model": {
                    "init_args": {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}}}
                }
            }
        },
    )
    experiment(**grid_args | {"seeds": 1, "out": str(out), "classifiers": lr})
    after = seed_runs(client, exp_id)
    for pair in [(BASELINE, 0), (AUGMENTED, 0)]:
        old = [
            r
            for r in after[pair]
            if r.info.run_id in before[pair]
            and r.info.status == "FINISHED"
            and "test/f1_macro" in r.data.metrics
        ]
        assert old  # the finished runs of the old config: kept, tagged stale, never read
        (new,) = [r for r in after[pair] if r.info.run_id not in before[pair]]
        assert all(r.data.tags["stale"] == "true" for r in old)
        assert new.data.tags["config_hash"] != old[-1].data.tags["config_hash"]
    results = pd.read_csv(out / "results.csv")
    read = set(zip(results["cell"], results["seed"], strict=True))
    assert read == {(BASELINE, 0), (AUGMENTED, 0)}
    new_f1 = {
        r.data.tags["cell"]: r.data.metrics["test/f1_macro"]
        for p in after
        for r in after[p]
        if r.info.run_id not in before.get(p, []) and r.data.tags["seed"] == "0"
    }
    f1 = results[results["metric"] == "test/f1_macro"].set_index("cell")["value"].to_dict()
    assert f1 == pytest.approx(new_f1)


def test_cell_names_tell_close_ratios_apart(breast_npz):
    source = Synthetic(folders=["x"], ratios=[0.1234, 0.1231])
    cells = grid(
        tiny_base(breast_npz), CNN, synthetic={"gen": source}
    )  # main: "names these cells more than once"
    assert [c.name for c in cells] == [
        "cnn/none/real=1/none",
        "cnn/none/real=1/gen@0.1234",
        "cnn/none/real=1/gen@0.1231",
    ]


def test_every_arm_gets_count_matched_controls(breast_npz):
    source = Synthetic(folders=["x"], ratios=[0.5, 1.0], augment_classes=["malignant"])
    cells = grid(tiny_base(breast_npz), CNN, synthetic={"diffusion": source}, controls_dir="ctl")
    names = [c.name for c in cells]
    arm = cells[names.index("cnn/none/real=1/diffusion@0.5")]
    controls = arm.controls(cells)
    assert [c.name for c in controls] == [
        "cnn/none/real=1/duplicate-real@0.5",
        "cnn/none/real=1/transform-medical@0.5",
    ]
    assert [c.source.transform for c in controls] == ["none", "medical"]
    assert all(c.source.augment_classes == ["malignant"] and c.ratio == 0.5 for c in controls)
    assert controls[0].data(3, 1)["synthetic"] == ["ctl/duplicate-real/real1-subset1"]
    assert controls[0].controls(cells) == [] and len(names) == 7


def _fake_cells(levels: dict[str, float], units: int, seeds_per_unit: int, noise: float, rng) -> tuple:
    """A baseline, an arm and its two controls; `levels` are their true F1."""
    base = "cnn/none/real=1/none"
    cells, rows = [], []
    for synthetic in levels:
        cell = f"cnn/none/real=1/{synthetic}"
        controls = (
            ""
            if synthetic != "gen@1"
            else ";".join(f"cnn/none/real=1/{k}" for k in levels if k not in ("none", "gen@1"))
        )
        cells.append(
            {
                "cell": cell,
                "classifier": "cnn",
                "policy": "none",
                "real": "1",
                "generator": synthetic.split("@")[0],
                "ratio": 0.0 if synthetic == "none" else 1.0,
                "synthetic": synthetic,
                "baseline": "" if synthetic == "none" else base,
                "controls": controls,
                "real_per_class": 100.0,
            }
        )
    for u in range(units):
        for k in range(seeds_per_unit):
            seed = u * seeds_per_unit + k
            shared = rng.normal(0, noise)
            for c in cells:
                value = levels[c["synthetic"]] + shared + rng.normal(0, 0.002)
                rows += [(c["cell"], seed, m, value, u) for m in stats.TABLE_COLUMNS.values()]
    results = pd.DataFrame(rows, columns=["cell", "seed", "metric", "value", "unit"])
    return results, pd.DataFrame(cells).set_index("cell")


def test_report_names_units_controls_and_verdicts(tmp_path):
    rng = np.random.default_rng(0)
    levels = {"none": 0.6, "gen@1": 0.65, "duplicate-real@1": 0.65, "transform-medical@1": 0.6}
    results, cells = _fake_cells(levels, units=8, seeds_per_unit=2, noise=0.02, rng=rng)
    _, comparison, table = report(results, cells, tmp_path)
    arm = comparison[
        (comparison["cell"] == "cnn/none/real=1/gen@1") & (comparison["metric"] == "test/f1_macro")
    ]
    verdicts = dict(zip(arm["baseline"].str.split("/").str[-1], arm["verdict"], strict=True))
    assert verdicts == {"none": "better", "duplicate-real@1": "equivalent", "transform-medical@1": "better"}
    assert (arm["units"] == 8).all() and (arm["n"] == 16).all()
    assert "Independent units: 8 per cell" in table and "conditional on the one test set" in table
    line = next(x for x in table.splitlines() if x.startswith("| cnn/none/real=1/gen@1 | duplicate-real@1"))
    assert line.rstrip(" |").endswith(
        "baseline, transform-medical@1"
    )  # beats the baseline and the transforms


def test_report_refuses_cis_for_too_few_units_and_worth_of_noise(tmp_path):
    rng = np.random.default_rng(1)
    levels = {"none": 0.6, "gen@1": 0.62, "duplicate-real@1": 0.6, "transform-medical@1": 0.6}
    results, cells = _fake_cells(levels, units=2, seeds_per_unit=10, noise=0.02, rng=rng)
    summary, comparison, table = report(results, cells, tmp_path)
    assert comparison["p"].isna().all() and comparison["ci_low"].isna().all()
    assert (comparison["verdict"] == "inconclusive").all()
    assert summary["ci_low"].isna().all()
    assert "[no CI]" in table and "2 independent unit(s) (< 5)" in table


def test_worth_only_where_the_difference_is_distinguishable(tmp_path):
    # main printed "inf [1084, inf]" for a +0.020 F1 difference whose CI was [-0.006, +0.122]
    rng = np.random.default_rng(2)
    cells, rows = [], []
    for n in (10, 100):
        for synthetic in ("none", "gen@1"):
            cell = f"cnn/none/real={n}/{synthetic}"
            cells.append(
                {
                    "cell": cell,
                    "classifier": "cnn",
                    "policy": "none",
                    "real": str(n),
                    "generator": synthetic.split("@")[0],
                    "ratio": 0.0 if synthetic == "none" else 1.0,
                    "synthetic": synthetic,
                    "baseline": "" if synthetic == "none" else f"cnn/none/real={n}/none",
                    "real_per_class": float(n),
                }
            )
            for seed in range(8):
                level = {10: 0.5, 100: 0.7}[n] + (0.1 if (synthetic, n) == ("gen@1", 10) else 0)
                value = level + rng.normal(0, 0.05 if n == 100 else 0.005)
                rows += [(cell, seed, m, value) for m in stats.TABLE_COLUMNS.values()]
    results = pd.DataFrame(rows, columns=["cell", "seed", "metric", "value"])
    _, _, table = report(results, pd.DataFrame(cells).set_index("cell"), tmp_path)
    worth = pd.read_csv(tmp_path / "worth.csv").set_index("cell")
    assert worth.loc["cnn/none/real=100/gen@1", "flag"] == "not distinguishable"
    assert np.isnan(worth.loc["cnn/none/real=100/gen@1", "n_equivalent"])
    assert worth.loc["cnn/none/real=10/gen@1", "flag"] == "within"
    assert "| cnn/none/real=100/gen@1 | 100 | not distinguishable |" in table


def test_search_matches_names_holding_quotes(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = client.create_experiment("it's")
    names = ["cnn/it's/real=1/none", 'cnn/"quoted"/none', "plain"]
    for name in names:
        client.create_run(exp_id, tags={"experiment": "it's", "cell": name})
    for name in names:
        (run,) = search(client, exp_id, {"experiment": "it's", "cell": name})
        assert run.data.tags["cell"] == name
