"""Learned generators inside the grid: the experiment trains a tiny diffusion model per real subset on exactly
that subset's training images, samples it, checks its quality, gates it, and caches every step (BreastMNIST)."""

from pathlib import Path

import mlflow
import pytest

from synaug.data import ClassificationData
from synaug.data.synthetic import read_synthetic
from synaug.experiment.grid import Synthetic, experiment
from synaug.experiment.runs import search
from synaug.generators.base import read_export

ROOT = Path(__file__).parents[2]
CNN = {
    "cnn": {
        "model": {
            "class_path": "synaug.classifiers.ImageClassifier",
            "init_args": {"backbone": "basic_cnn", "model_kwargs": {"hidden": [32, 16]}},
        }
    }
}
TINY = {"trainer": {"max_steps": 3}, "model": {"init_args": {"sample_every": 1000}}}


def args(npz, out, overrides=TINY, gate=None) -> dict:
    source = Synthetic(
        train=str(ROOT / "configs/generators/diffusion_tiny.yaml"),
        overrides=overrides,
        sampler={"steps": 2},
        ratios=[1.0],
        quality={"image_size": 32, "kid_subset_size": 4, "kid_subsets": 2},
        gate=gate,
    )
    return dict(
        name="learned",
        base={
            "data": {"root": str(npz), "image_size": 28, "batch_size": 32},
            "trainer": {"max_epochs": 1, "limit_train_batches": 1, "enable_progress_bar": False},
        },
        classifiers=CNN,
        real_fractions=[0.03],
        synthetic={"diffusion": source},
        seeds=2,
        subset_seeds=1,
        controls=False,
        out=str(out),
    )


def test_generator_is_trained_per_subset_cached_and_retrained_when_its_config_changes(
    breast_npz, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    run = args(breast_npz, tmp_path / "report") | {"tracking": uri}

    experiment(**run, dry_run=True)
    assert "1 generator trainings (1 to do)" in capsys.readouterr().out
    assert not Path("outputs").exists()  # a dry run writes nothing

    experiment(**run)
    client = mlflow.MlflowClient(uri)
    exp_id = client.get_experiment_by_name("learned").experiment_id
    (gen,) = search(client, exp_id, {"level": "generator"})
    assert gen.info.status == "FINISHED" and gen.data.tags["gate"] == "passed"
    assert "quality/memorized_share/normal_benign" in gen.data.metrics
    cell = "cnn/none/real=0.03/diffusion@1"
    assert cell in gen.data.tags["cells"].split(";")
    augmented = search(client, exp_id, {"level": "seed", "cell": cell})
    assert {r.data.tags["generator_run"] for r in augmented} == {gen.info.run_id}

    # it learned from exactly the cell's real training subset: no validation or test image, none withheld
    (export,) = Path("outputs/generators/learned/diffusion").glob("*/*/export")
    dm = ClassificationData(root=str(breast_npz), image_size=28, real_fraction=0.03, subset_seed=0)
    _, ts = dm.training_set()
    assert sorted(read_export(export).train_ids) == sorted(dm.items["id"].to_numpy()[ts.real])
    synth = read_synthetic(export.parent / "images", dm.class_names).items
    assert dict(synth["class"].value_counts()) == dict(ts.counts["real_kept"])  # ratio 1: one per real image
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Generator quality" in report and "| diffusion | 0.03 | 0 | malignant |" in report
    # the generator step's output (its training's Lightning notices among it) in its own log, also on its run
    (log,) = (tmp_path / "report" / "logs").glob("generator_diffusion_real=0.03_subset_0_*.log")
    assert log.name.endswith(f"_{export.parent.name}.log") and "Seed set to" in log.read_text()
    assert [a.path for a in client.list_artifacts(gen.info.run_id, "logs")] == [f"logs/{log.name}"]

    stamp = (export / "generator.json").stat().st_mtime_ns
    before = {r.info.run_id for r in search(client, exp_id, {"level": "seed"})}
    seeds_before = len(before)
    experiment(**run)  # a rerun: nothing trained again
    assert (export / "generator.json").stat().st_mtime_ns == stamp
    assert len(search(client, exp_id, {"level": "seed"})) == seeds_before
    assert len(search(client, exp_id, {"level": "generator"})) == 1

    # a changed generator config retrains that generator and the cells that use it, not the baseline
    changed = args(breast_npz, tmp_path / "report", TINY | {"trainer": {"max_steps": 4}}) | {"tracking": uri}
    experiment(**changed)
    assert len(search(client, exp_id, {"level": "generator"})) == 2
    new = [r for r in search(client, exp_id, {"level": "seed"}) if r.info.run_id not in before]
    retrained = {r.data.tags["cell"] for r in new}
    assert retrained == {cell}


def test_the_gate_excludes_a_generator_with_its_reason(breast_npz, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    experiment(**args(breast_npz, tmp_path / "report", gate={"max_fid": -1.0}), tracking=uri)
    client = mlflow.MlflowClient(uri)
    exp_id = client.get_experiment_by_name("learned").experiment_id
    (gen,) = search(client, exp_id, {"level": "generator"})
    assert gen.data.tags["gate"] == "excluded" and "fid" in gen.data.tags["gate_reason"]
    cells = {r.data.tags["cell"] for r in search(client, exp_id, {"level": "seed"})}
    assert cells == {"cnn/none/real=0.03/none"}  # the generator's cells never trained
    assert "Excluded by the gate: diffusion" in (tmp_path / "report" / "report.md").read_text()


def test_an_unknown_gate_key_is_refused_before_anything_trains(breast_npz, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="gate keys"):
        experiment(
            **args(breast_npz, tmp_path, gate={"max_beauty": 1}), tracking=f"sqlite:///{tmp_path}/m.db"
        )


def test_the_filter_keeps_the_images_the_real_subset_classifier_recognises(breast_npz, tmp_path):
    from synaug.experiment.generators import Step, filter_images
    from synaug.generators.transform import write_transforms

    settings = {"real_fraction": 0.05, "real_count": None, "subset_seed": 0}
    dm = ClassificationData(root=str(breast_npz), image_size=28)
    _, ts = dm.training_set(**settings, synthetic=None, synthetic_ratio=0.0, replace_prob=0.0)
    counts = dict(ts.counts["real_kept"])
    step = Step("copies", "0.05", 0, settings, {}, counts, tmp_path)
    # plain copies of the subset's own images: a classifier trained on them recognises (almost) all of them
    write_transforms(dm.source, ts.real, step.images, counts, "none", 28, 1)
    kept = filter_images(step, dm, 0.5, {"image_size": 32})
    assert min(kept.values()) >= 0.8
    filtered = read_synthetic(tmp_path / "filtered-0.5", dm.class_names).items
    assert set(filtered["path"]) <= set(read_synthetic(step.images, dm.class_names).items["path"])
    assert filter_images(step, dm, 1.01, {"image_size": 32}) == dict.fromkeys(kept, 0.0)  # no p exceeds 1


def test_a_killed_training_resumes_from_its_last_checkpoint(breast_npz, tmp_path, monkeypatch):
    from synaug.experiment.generators import plan_steps, train
    from synaug.experiment.grid import grid, merge
    from synaug.generators.base import read_info

    monkeypatch.chdir(tmp_path)
    run = args(breast_npz, tmp_path, TINY | {"trainer": {"max_steps": 8}})
    cells = grid(run["base"], CNN, real_fractions=[0.03], synthetic=run["synthetic"])
    (step,), _ = plan_steps(cells, run["base"], "learned", [0], merge)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment("learned")
    parent = client.create_run(exp_id).info.run_id
    # a training killed after step 4: its checkpoint is there, its export is not
    killed = step.config | {"trainer": step.config["trainer"] | {"max_steps": 4}}
    (step.config, full) = (killed, step.config)
    train(step, client, exp_id, "learned", uri, parent)
    (step.export / "generator.json").unlink()
    step.config = full
    train(step, client, exp_id, "learned", uri, parent)
    assert read_info(step.export)["global_step"] == 8  # went on from step 4 to 8, the same MLflow run
    assert len(search(client, exp_id, {"level": "generator"})) == 1


def test_the_quality_check_is_redone_when_the_folder_gained_images(breast_npz, tmp_path, monkeypatch):
    # a generator shared by two sources (a grid at ratio 1, a tune whose largest ratio is 2) gets more images for
    # the second: its cached quality table measured fewer, so it is measured again
    import pandas as pd

    from synaug.experiment import generators
    from synaug.generators.transform import write_transforms

    measured = []

    def measure(step, dm, options):  # the check's bookkeeping is under test, not its features
        n = read_synthetic(step.images, dm.class_names).items["class"].value_counts()[list(step.counts)]
        measured.append(dict(n))
        return pd.DataFrame({"n_synthetic": n, "fid": 1.0}).rename_axis("class")

    monkeypatch.setattr(generators, "measure_quality", measure)
    settings = {"real_fraction": 0.05, "real_count": None, "subset_seed": 0}
    dm = ClassificationData(root=str(breast_npz), image_size=28)
    _, ts = dm.training_set(**settings, synthetic=None, synthetic_ratio=0.0, replace_prob=0.0)
    step = generators.Step("copies", "0.05", 0, settings, {}, {"malignant": 4}, tmp_path)
    write_transforms(dm.source, ts.real, step.images, step.counts, "none", 28, 1)
    generators.check_quality(step, dm, None, None)
    generators.check_quality(step, dm, None, {"max_fid": 2.0})  # cached
    assert measured == [{"malignant": 4}] and not step.excluded
    step.counts = {"malignant": 8, "normal_benign": 4}
    write_transforms(dm.source, ts.real, step.images, step.counts, "none", 28, 1)  # adds the missing ones
    generators.check_quality(step, dm, None, None)
    assert measured[1:] == [{"malignant": 8, "normal_benign": 4}]
    step.counts = {"malignant": 8}  # a source that uses fewer classes reads the cached rows it needs
    generators.check_quality(step, dm, None, None)
    assert len(measured) == 2 and list(step.quality.index) == ["malignant"]
