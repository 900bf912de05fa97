"""A training-free generator in the grid (`generate:`): Stable Diffusion img2img, on a tiny dummy pipeline, makes
its variants per real subset from exactly that subset's kept training images (BreastMNIST)."""

import math
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from helpers.sd_dummy import save_dummy_pipeline  # tests/ is on sys.path (pytest rootdir-less import)
from torch import nn

from synaug.data import ClassificationData
from synaug.data.mixing import synthetic_count
from synaug.evaluation import features
from synaug.evaluation.features import ImageFeatures
from synaug.experiment import generators
from synaug.experiment.grid import Synthetic, experiment, grid, merge
from synaug.experiment.runs import search

ROOT = Path(__file__).parents[2]
CNN = {
    "cnn": {
        "model": {
            "class_path": "synaug.classifiers.ImageClassifier",
            "init_args": {"backbone": "basic_cnn", "model_kwargs": {"hidden": [16, 8]}},
        }
    }
}
PROMPTS = {"malignant": "an ultrasound of a malignant tumor", "normal_benign": "a breast ultrasound"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(save_dummy_pipeline(tmp_path_factory.mktemp("sd")))


class Pixels(nn.Module):
    """6 x 6 mean intensities, centred per image: a feature space where only alike images are near."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = nn.functional.adaptive_avg_pool2d(x[:, :1], 6).flatten(1)
        return f - f.mean(1, keepdim=True)


@pytest.fixture
def small_features(monkeypatch):
    """The quality check in a 36-d pixel space: its bookkeeping (cache, gate, MLflow) is under test here, and
    FID's matrix square root at EfficientNet-Lite0's 1,280 dimensions is a minute of CPU (tests/evaluation and
    test_generators.py check it in the real space)."""
    small = ImageFeatures(Pixels(), "pixels", 3, 36, torch.full((3,), 0.5), torch.full((3,), 0.5), size=32)
    monkeypatch.setattr(features, "feature_extractor", lambda *args, **kwargs: small)


def source(tiny: str, **overrides) -> Synthetic:
    return Synthetic(
        generate=str(ROOT / "configs/generators/img2img.yaml"),
        overrides={
            "model": tiny,
            "strength": 0.2,
            "steps": 5,
            "image_size": 32,
            "batch_size": 32,
            "device": "cpu",
            "prompts": PROMPTS,
        }
        | overrides,
        ratios=[0.5, 1.5],
        quality={"image_size": 32, "kid_subset_size": 4, "kid_subsets": 2},
        gate={"max_leaked": 0},
    )


def args(npz, tiny, out) -> dict:
    return dict(
        name="img2img",
        base={
            "data": {"root": str(npz), "image_size": 28, "batch_size": 32},
            "trainer": {"max_epochs": 1, "limit_train_batches": 1, "enable_progress_bar": False},
        },
        classifiers=CNN,
        real_fractions=[0.03],
        synthetic={"img2img": source(tiny)},
        seeds=1,
        controls=False,
        out=str(out),
    )


def test_img2img_varies_exactly_the_subsets_kept_training_images(
    breast_npz, tiny, small_features, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    run = args(breast_npz, tiny, tmp_path / "report") | {"tracking": uri}

    experiment(**run, dry_run=True)  # a generation, not a training
    assert "0 generator trainings (0 to do), 1 generations (1 to do, " in capsys.readouterr().out

    experiment(**run)
    dm = ClassificationData(root=str(breast_npz), image_size=28, real_fraction=0.03, subset_seed=0)
    _, ts = dm.training_set()
    kept = dm.items.iloc[ts.real]
    (images,) = Path("outputs/generators/img2img/img2img/real0.03-subset0").glob("*/images")
    manifest = pd.read_csv(images / "manifest.csv", dtype=str, keep_default_na=False)
    # every variant names one real image of the subset's kept training images, of its own class
    source_class = dict(zip(kept["id"], (dm.class_names[i] for i in kept["label"]), strict=True))
    assert manifest["source"].map(source_class).tolist() == manifest["class"].tolist()
    assert set(manifest["generator"]) == {"sd-img2img"}
    # as many per class as the largest ratio (1.5) needs, ceil(1.5) = 2 variants of some images, 1 of the others
    real_kept = kept["label"].map(dict(enumerate(dm.class_names))).value_counts()
    assert dict(manifest["class"].value_counts()) == {
        c: synthetic_count(1.5, n) for c, n in real_kept.items()
    }
    per_image = manifest.groupby("class")["source"].value_counts()
    for c, n in real_kept.items():
        assert len(per_image[c]) == n and set(per_image[c]) == {1, math.ceil(1.5)}  # every kept image used

    client = mlflow.MlflowClient(uri)
    exp_id = client.get_experiment_by_name("img2img").experiment_id
    (gen,) = search(client, exp_id, {"level": "generator"})
    assert gen.info.status == "FINISHED" and gen.data.tags["kind"] == "sd-img2img"
    assert gen.data.tags["gate"] == "passed" and "quality/leaked/malignant" in gen.data.metrics
    assert "time/image_s" in gen.data.metrics and "time/train_s" not in gen.data.metrics
    assert images.parent.name == gen.data.tags["step_hash"]
    # the cells' classifiers trained on them: each its ratio's count, drawn from that folder
    for ratio in (0.5, 1.5):
        (seed_run,) = search(client, exp_id, {"level": "seed", "cell": f"cnn/none/real=0.03/img2img@{ratio}"})
        assert (
            seed_run.data.tags["generator_run"] == gen.info.run_id
            and "test/f1_macro" in seed_run.data.metrics
        )
        for c, n in real_kept.items():
            assert seed_run.data.metrics[f"data/synthetic/{c}"] == synthetic_count(ratio, n)

    files = {f: f.stat().st_mtime_ns for f in images.rglob("*") if f.is_file()}
    runs = len(search(client, exp_id, {"level": "seed"}))
    experiment(**run)  # a rerun generates nothing, trains nothing
    assert {f: f.stat().st_mtime_ns for f in images.rglob("*") if f.is_file()} == files
    assert len(search(client, exp_id, {"level": "seed"})) == runs
    assert len(search(client, exp_id, {"level": "generator"})) == 1

    # a generation killed after some images makes exactly the missing ones
    cells = grid(run["base"], CNN, real_fractions=[0.03], synthetic=run["synthetic"])
    (step,), step_dm = generators.plan_steps(cells, run["base"], "img2img", [0], merge)
    assert step.images == images
    lost = manifest["path"].iloc[[1, -1]].tolist()
    manifest[~manifest["path"].isin(lost)].to_csv(images / "manifest.csv", index=False)
    (images / lost[0]).unlink()
    assert step.generated() == 2
    generators.generate_images(step, None, step_dm)
    after = pd.read_csv(images / "manifest.csv", dtype=str, keep_default_na=False)
    assert sorted(after["path"]) == sorted(manifest["path"]) and step.generated() == 0
    kept_files = [f for f in files if f.suffix == ".png" and f.relative_to(images).as_posix() not in lost]
    assert all(f.stat().st_mtime_ns == files[f] for f in kept_files)


def test_a_generate_source_refuses_what_the_grid_decides(tiny):
    with pytest.raises(ValueError, match=r"overrides \['per_image'\] choose the real images"):
        generators.derive_config("sd-img2img", {"model": tiny}, {"per_image": 3}, merge)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['strenght'\]"):
        generators.derive_config("sd-img2img", {"model": tiny}, {"strenght": 0.1}, merge)
    with pytest.raises(ValueError, match="split 'test'"):
        generators.derive_config("sd-img2img", {"model": tiny, "split": "test"}, None, merge)
    with pytest.raises(ValueError, match="no `derive`"):
        generators.derive_config("import", {}, None, merge)
    with pytest.raises(ValueError, match="one of `folders`, `train`, `generate`"):
        Synthetic(train="a.yaml", generate="b.yaml")
    with pytest.raises(ValueError, match="names the generator of a `generate:` source"):
        Synthetic(folders=["x"], kind="transform")
    # the command's own config is accepted: its data-selection keys are the grid's, not used
    config = generators.derive_config(
        "sd-img2img", str(ROOT / "configs/generators/img2img.yaml"), None, merge
    )
    assert "split" not in config and "per_image" not in config and config["strength"] == 0.1


def stand_in(config: dict, metric: str, report) -> float:
    """Instead of training a classifier: the tune's generator stage is under test."""
    report(0, 0.5)
    return 0.5


def test_a_tune_draws_its_ratios_from_an_img2img_pool(
    breast_npz, tiny, small_features, tmp_path, monkeypatch
):
    from synaug.experiment.tune import tune

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    base = args(breast_npz, tiny, tmp_path)["base"]
    tune(
        "tune-img2img",
        base=merge(base, {"model": CNN["cnn"]["model"], "data": {"real_fraction": 0.03}}),
        synthetic=source(tiny),
        ratio={"malignant": (0.0, 2.0)},
        seeds=1,
        n_trials=1,
        evaluate_seeds=0,
        fit="test_training_free:stand_in",
        tracking=uri,
        storage=f"sqlite:///{tmp_path}/optuna.db",
        generator="img2img",
    )
    client = mlflow.MlflowClient(uri)
    exp_id = client.get_experiment_by_name("tune-img2img").experiment_id
    (gen,) = search(client, exp_id, {"level": "generator"})
    assert gen.data.tags["kind"] == "sd-img2img" and gen.data.tags["optuna.study"] == "tune-img2img"
    (images,) = Path("outputs/generators/tune-img2img/img2img/real0.03-subset0").glob("*/images")
    manifest = pd.read_csv(images / "manifest.csv", dtype=str, keep_default_na=False)
    dm = ClassificationData(root=str(breast_npz), image_size=28, real_fraction=0.03, subset_seed=0)
    _, ts = dm.training_set()
    kept = dm.items.iloc[ts.real]
    malignant = set(kept["id"][kept["label"] == dm.class_names.index("malignant")])
    # the largest ratio of the search space, of the augmented class only, from the subset's kept images
    assert set(manifest["class"]) == {"malignant"} and set(manifest["source"]) == malignant
    assert len(manifest) == synthetic_count(2.0, len(malignant))
    (trial,) = search(client, exp_id, {"level": "seed", "optuna.trial": "0"})
    assert trial.data.tags["generator_run"] == gen.info.run_id


def test_any_kind_with_a_derive_is_a_generate_source(breast_npz, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = {"data": {"root": str(breast_npz), "image_size": 28}}
    source = Synthetic(generate={"policy": "none", "image_size": 28}, kind="transform", ratios=[0.5])
    cells = grid(base, CNN, real_fractions=[0.05], synthetic={"copies": source})
    (step,), dm = generators.plan_steps(cells, base, "any", [1], merge)
    assert step.kind == "transform" and step.trained  # nothing to train
    generators.generate_images(step, None, dm)
    _, ts = dm.training_set(real_fraction=0.05, subset_seed=1)
    kept = set(dm.items["id"].to_numpy()[ts.real])
    manifest = pd.read_csv(step.images / "manifest.csv", dtype=str, keep_default_na=False)
    assert set(manifest["source"]) <= kept and step.generated() == 0
    assert dict(manifest["class"].value_counts()) == {
        c: synthetic_count(0.5, n) for c, n in ts.counts["real_kept"].items()
    }
