"""`synaug tune` on BreastMNIST (tiny CNN, 28 px): trials logged to MLflow with the best one tagged, the test set
never read while tuning, resuming a study by name, the final test of the best configuration against its
baseline, and the median pruner."""

import mlflow
import optuna
import pandas as pd
import pytest

from synaug.data import ClassificationData
from synaug.experiment import label, search
from synaug.experiment.tune import tune
from synaug.generators.transform import transform_generate

MODEL = {
    "class_path": "synaug.classifiers.ImageClassifier",
    "init_args": {"backbone": "basic_cnn", "model_kwargs": {"hidden": [32, 16]}},
}


FITS: list[dict] = []


def stand_in_fit(config: dict, metric: str, report) -> float:
    """Instead of training: a value that falls with the malignant ratio, reported over three 'epochs'."""
    FITS.append(config["data"])
    ratio = config["data"].get("synthetic_ratio", {})
    value = 1 - (ratio.get("malignant", 0.0) if isinstance(ratio, dict) else ratio)
    for epoch in range(3):
        if report(epoch, value):
            raise optuna.TrialPruned()
    return value


@pytest.fixture(scope="module")
def args(breast_npz, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("synthetic") / "transform"
    transform_generate(str(breast_npz), str(folder), per_class={"malignant": 60}, image_size=28)
    return dict(
        base={
            "model": MODEL,
            "data": {"root": str(breast_npz), "image_size": 28, "batch_size": 64},
            "trainer": {
                "max_epochs": 1,
                "limit_train_batches": 2,
                "enable_progress_bar": False,
                "enable_model_summary": False,
            },
        },
        synthetic=[str(folder)],
        ratio={"malignant": (0.0, 0.4)},
        seeds=1,
        sampler_seed=0,
        storage=f"sqlite:///{tmp_path_factory.mktemp('optuna') / 'optuna.db'}",
    )


@pytest.fixture(scope="module")
def tuned(args, tmp_path_factory):
    calls = []

    def refuse(self):
        calls.append(self)
        raise AssertionError("the test set was read during tuning")

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        mp.setattr(ClassificationData, "test_dataloader", refuse)
        best = tune("ratio", **args, n_trials=2, evaluate_seeds=0)
    return best, calls


def trial_runs(study: str) -> dict[int, mlflow.entities.Run]:
    client = mlflow.MlflowClient()
    exp_id = client.get_experiment_by_name(study).experiment_id
    return {int(r.data.tags["optuna.trial"]): r for r in search(client, exp_id, {"level": "trial"})}


def test_trials_are_logged_and_the_test_set_is_never_read(tuned, args):
    best, calls = tuned
    assert calls == []
    study = optuna.load_study(study_name="ratio", storage=args["storage"])
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert study.metric_names == ["val/f1_macro"] and study.user_attrs["git_commit"]
    assert study.user_attrs["config"]["trainer"]["max_epochs"] == args["base"]["trainer"]["max_epochs"]
    runs = trial_runs("ratio")
    assert sorted(runs) == [0, 1]
    client = mlflow.MlflowClient()
    for trial in study.trials:
        run = runs[trial.number]
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"] and run.info.status == "FINISHED"
        assert run.data.tags["optuna.study"] == "ratio" and run.data.tags["state"] == "COMPLETE"
        assert float(run.data.params["ratio/malignant"]) == pytest.approx(trial.params["ratio/malignant"])
        assert run.data.metrics["objective"] == pytest.approx(trial.value)
        assert run.data.tags["best"] == ("true" if trial.number == best.number else "false")
        (seed,) = client.search_runs(
            [run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
        )
        assert "val/f1_macro" in seed.data.metrics
        assert not [m for m in seed.data.metrics if m.startswith("test/")]
        assert seed.data.tags["generator"] == "tuned" and seed.data.metrics["data/synthetic/malignant"] > 0


def test_rerun_resumes_the_study_then_tests_the_best_against_its_baseline(tuned, args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    best, _ = tuned
    again = tune("ratio", **args, n_trials=2, evaluate_seeds=2)
    assert again.number == best.number
    assert len(optuna.load_study(study_name="ratio", storage=args["storage"]).trials) == 2  # none added
    client = mlflow.MlflowClient()
    exp_id = client.get_experiment_by_name("ratio-test").experiment_id
    (parent,) = search(client, exp_id, {"level": "experiment"})
    assert parent.data.tags["optuna.best_trial"] == str(best.number)
    results = pd.read_csv(tmp_path / "outputs" / "experiments" / "ratio-test" / "results.csv")
    ratio = label(best.params["ratio/malignant"])
    tuned_cell = f"basic_cnn/none/real=1/tuned@malignant:{ratio}"
    controls = [
        f"basic_cnn/none/real=1/{c}@malignant:{ratio}" for c in ("duplicate-real", "transform-medical")
    ]
    assert results.groupby("cell")["seed"].nunique().to_dict() == {
        "basic_cnn/none/real=1/none": 2,
        tuned_cell: 2,
        **dict.fromkeys(controls, 2),
    }
    comparison = pd.read_csv(tmp_path / "outputs" / "experiments" / "ratio-test" / "comparison.csv")
    assert set(comparison["cell"]) == {tuned_cell, *controls}
    against = comparison.loc[comparison["cell"] == tuned_cell, "baseline"]
    assert set(against) == {"basic_cnn/none/real=1/none", *controls}


def test_median_pruner_stops_a_trial_below_the_median(args):
    # queue a good and a worse ratio: the second falls below the first at its first step after warm-up
    study = optuna.create_study(study_name="pruning", storage=args["storage"], direction="maximize")
    study.enqueue_trial({"ratio/malignant": 0.1})
    study.enqueue_trial({"ratio/malignant": 0.3})
    tune(
        "pruning",
        **args,
        n_trials=2,
        evaluate_seeds=0,
        fit="test_tune:stand_in_fit",
        pruner_startup_trials=1,
        warmup_epochs=1,
    )
    first, second = optuna.load_study(study_name="pruning", storage=args["storage"]).trials
    assert first.state == optuna.trial.TrialState.COMPLETE and first.value == pytest.approx(0.9)
    assert second.state == optuna.trial.TrialState.PRUNED and sorted(second.intermediate_values) == [0, 1]
    runs = trial_runs("pruning")
    assert runs[1].data.tags["state"] == "PRUNED" and runs[0].data.tags["best"] == "true"
    assert runs[1].info.status == "KILLED" and runs[0].info.status == "FINISHED"  # the UI shows it stopped
    assert [
        m.step for m in mlflow.MlflowClient().get_metric_history(runs[1].info.run_id, "intermediate")
    ] == [0, 1]


def test_a_configuration_is_evaluated_once_and_the_reference_always(args):
    # main, on a grid of 5 ratios: 4 trials tried only 0.5 and 0.75, each twice with bit-identical results,
    # and never 0
    FITS.clear()
    study = optuna.create_study(study_name="grid", storage=args["storage"], direction="maximize")
    for r in (0.1, 0.3, 0.1, 0.3):
        study.enqueue_trial({"ratio/malignant": r})
    tune("grid", **args | {"ratio_step": 0.1}, n_trials=4, evaluate_seeds=0, fit="test_tune:stand_in_fit")
    trials = optuna.load_study(study_name="grid", storage=args["storage"]).trials
    assert [t.user_attrs.get("reused_from") for t in trials] == [None, None, 0, 1]
    assert [t.value for t in trials] == pytest.approx([0.9, 0.7, 0.9, 0.7])
    ratios = [d.get("synthetic_ratio") for d in FITS]
    assert ratios == [None, {"malignant": 0.1}, {"malignant": 0.3}]  # the reference first, then each once
    study = optuna.load_study(study_name="grid", storage=args["storage"])
    assert study.user_attrs["reference"] == pytest.approx(1.0)
    client = mlflow.MlflowClient()
    exp_id = client.get_experiment_by_name("grid").experiment_id
    (reference,) = search(client, exp_id, {"level": "reference"})
    assert reference.data.tags["generator"] == "none"
