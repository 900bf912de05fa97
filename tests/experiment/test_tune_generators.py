"""`synaug tune` with a learned generator (a tiny diffusion model on BreastMNIST): trained and sampled once
before the trials, on the seed's real subset only, reused from the cache by the final test and by another study,
the trials reading validation metrics only and the test set read only by the final test."""

from dataclasses import replace
from pathlib import Path

import mlflow
import optuna
import pytest

import synaug.experiment.tune as tune_module
from synaug.data import ClassificationData
from synaug.experiment import Synthetic, generators, label, search
from synaug.experiment.tune import tune
from synaug.generators.base import read_export
from synaug.generators.transform import needed

ROOT = Path(__file__).parents[2]


def stand_in(config: dict, metric: str, report) -> float:
    """Instead of training a classifier (the second study is about the generator stage only)."""
    report(0, 0.5)
    return 0.5


def test_a_tune_trains_its_generator_once_and_the_next_study_reuses_it(breast_npz, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainings, test_reads, evaluating = [], [], []
    train = generators.train

    def counting(step, *args):
        trainings.extend([step.folder] * (not step.trained))
        train(step, *args)

    monkeypatch.setattr(generators, "train", counting)
    test_dataloader = ClassificationData.test_dataloader
    monkeypatch.setattr(
        ClassificationData,
        "test_dataloader",
        lambda self: test_reads.append(bool(evaluating)) or test_dataloader(self),
    )
    final_test = tune_module.experiment
    monkeypatch.setattr(tune_module, "experiment", lambda **kw: evaluating.append(1) or final_test(**kw))
    source = Synthetic(
        train=str(ROOT / "configs/generators/diffusion_tiny.yaml"),
        overrides={"trainer": {"max_steps": 3}, "model": {"init_args": {"sample_every": 1000}}},
        sampler={"steps": 2},
        quality={"image_size": 32, "kid_subset_size": 4, "kid_subsets": 2},
    )
    uri, storage = f"sqlite:///{tmp_path}/mlruns.db", f"sqlite:///{tmp_path}/optuna.db"
    args = dict(
        base={
            "model": {
                "class_path": "synaug.classifiers.ImageClassifier",
                "init_args": {"backbone": "basic_cnn", "model_kwargs": {"hidden": [32, 16]}},
            },
            "data": {"root": str(breast_npz), "image_size": 28, "batch_size": 32, "real_fraction": 0.05},
            "trainer": {"max_epochs": 1, "limit_train_batches": 1, "enable_progress_bar": False},
        },
        synthetic=source,
        ratio={"malignant": (0.0, 1.0)},
        ratio_step=0.5,
        seeds=1,
        generator="diffusion",
        storage=storage,
        tracking=uri,
    )
    study = optuna.create_study(study_name="pool", storage=storage, direction="maximize")
    study.enqueue_trial({"ratio/malignant": 0.5})
    study.enqueue_trial({"ratio/malignant": 1.0})
    best = tune("pool", **args, n_trials=2, evaluate_seeds=1)

    assert len(trainings) == 1  # one subset: one training for the reference, 2 trials and the final test
    (folder,) = trainings
    dm = ClassificationData(root=str(breast_npz), image_size=28, real_fraction=0.05, subset_seed=0)
    _, ts = dm.training_set()
    # trained on exactly the seed's real subset (so the leakage guard took it), sampled at the largest ratio
    assert sorted(read_export(folder / "export").train_ids) == sorted(dm.items["id"].to_numpy()[ts.real])
    client = mlflow.MlflowClient(uri)
    exp_id = client.get_experiment_by_name("pool").experiment_id
    (gen,) = search(client, exp_id, {"level": "generator"})
    assert gen.info.status == "FINISHED" and gen.data.tags["optuna.study"] == "pool"
    assert gen.data.tags["gate"] == "passed" and gen.data.tags["step_hash"] == folder.name
    trials = {r.data.tags["optuna.trial"]: r for r in search(client, exp_id, {"level": "trial"})}
    assert sorted(trials) == ["0", "1"]
    for number, ratio in (("0", 0.5), ("1", 1.0)):
        (seed,) = search(client, exp_id, {"level": "seed", "optuna.trial": number})
        assert (
            seed.data.tags["generator_run"] == gen.info.run_id and seed.data.tags["generator"] == "diffusion"
        )
        wanted = needed(ts.counts["real_kept"], {"malignant": ratio})["malignant"]
        assert seed.data.metrics["data/synthetic/malignant"] == wanted > 0
        # the trial's value is its seed's validation metric; nothing of the test set was read
        assert trials[number].data.metrics["objective"] == pytest.approx(seed.data.metrics["val/f1_macro"])
        assert not [m for m in seed.data.metrics if m.startswith("test/")]

    # the test set: read only by the final test, once per run of it (tuned, baseline and controls, 1 seed)
    test_exp = client.get_experiment_by_name("pool-test").experiment_id
    tested = search(client, test_exp, {"level": "seed"})
    assert test_reads == [True] * len(tested) and len(tested) == 4
    (tested_gen,) = search(client, test_exp, {"level": "generator"})  # the same training, from the cache
    assert tested_gen.data.tags["step_hash"] == folder.name
    cell = f"basic_cnn/none/real=0.05/diffusion@malignant:{label(best.params['ratio/malignant'])}"
    assert cell in {r.data.tags["cell"] for r in tested}

    # another study on the same subset and source: the generator comes from the cache, nothing trains
    stamp = (folder / "export" / "generator.json").stat().st_mtime_ns
    tune(
        "again",
        **args,
        n_trials=1,
        evaluate_seeds=0,
        generator_cache="pool",
        fit="test_tune_generators:stand_in",
    )
    assert len(trainings) == 1 and (folder / "export" / "generator.json").stat().st_mtime_ns == stamp
    again = client.get_experiment_by_name("again").experiment_id
    (reused,) = search(client, again, {"level": "generator"})
    assert reused.data.tags["step_hash"] == folder.name

    # a gate that excludes the (cached) generator stops the next study before anything trains
    gated = args | {"synthetic": replace(source, gate={"max_fid": -1.0})}
    with pytest.raises(ValueError, match="the gate excluded diffusion at real=0.05, subset 0"):
        tune("gated", **gated, n_trials=1, evaluate_seeds=0, generator_cache="pool")
    assert len(trainings) == 1
    gated_exp = client.get_experiment_by_name("gated").experiment_id
    assert search(client, gated_exp, {"level": "reference"}) == []


def test_the_shipped_config_parses_into_a_learned_source():
    import yaml
    from jsonargparse import ArgumentParser

    config = ROOT / "experiments/tune_breastmnist/diffusion.yaml"
    parser = ArgumentParser()
    parser.add_function_arguments(tune, as_positional=True)
    args = parser.instantiate_classes(parser.parse_object(yaml.safe_load(config.read_text())))
    assert isinstance(args.synthetic, Synthetic) and (ROOT / args.synthetic.train).is_file()
    assert args.generator == "diffusion" and args.synthetic.sampler == {"scheduler": "ddim", "steps": 10}
