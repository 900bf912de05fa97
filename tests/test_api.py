"""`import synaug`: a light import with a version, and `synaug.fit` doing what `synaug fit` does."""

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import mlflow
import torch

import synaug

CONFIG = Path(__file__).parents[1] / "configs" / "classifiers" / "basic_cnn.yaml"


def test_import_synaug_is_light_and_has_the_package_version():
    code = "import sys, synaug; print(synaug.__version__, 'torch' in sys.modules, 'lightning' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [version("synaug"), "False", "False"]


def test_fit_from_python_has_the_cli_provenance_and_loads_back(breast_npz, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = synaug.fit(
        CONFIG,
        data={"root": str(breast_npz), "image_size": 32, "real_fraction": 0.5},
        trainer={
            "max_epochs": 1,
            "limit_train_batches": 2,
            "enable_progress_bar": False,
            "logger": {"init_args": {"experiment_name": "api-test"}},
        },
    )
    assert run.experiment == "api-test" and run.run_name == "basic_cnn-32px-real0.5-hflip"
    logged = mlflow.MlflowClient(run.tracking_uri).get_run(run.run_id)
    # the same run the CLI makes: tested after fit, config, fingerprints, datasets, the image grid
    assert logged.data.metrics["test/f1_macro"] == run.metrics["test/f1_macro"]
    assert logged.data.params["real_fraction"] == "0.5" and logged.data.tags["data.fingerprint"]
    assert {d.dataset.name for d in logged.inputs.dataset_inputs} >= {
        "breastmnist.npz-train",
        "breastmnist.npz-test",
    }
    arts = {a.path for a in mlflow.MlflowClient(run.tracking_uri).list_artifacts(run.run_id, "data")}
    assert "data/train_grid.png" in arts
    model = synaug.load_classifier(run.checkpoint)
    assert not model.training
    x = torch.zeros(3, 1, 32, 32, dtype=torch.uint8)
    assert model.probs(x, None).shape == (3, 2)
