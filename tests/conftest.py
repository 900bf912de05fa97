"""Every test runs offline on the CPU, with its caches and MLflow store in a temporary folder."""

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
BRAIN = DATA / "brain_tumor_mri"
BREAST = DATA / "medmnist" / "breastmnist.npz"


@pytest.fixture(autouse=True, scope="session")
def _isolated_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    os.environ["SYNAUG_CACHE"] = str(root / "cache")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    yield


@pytest.fixture(scope="session")
def brain_root() -> Path:
    assert BRAIN.is_dir(), f"shared data missing: {BRAIN}"
    return BRAIN.resolve()


@pytest.fixture(scope="session")
def breast_npz() -> Path:
    assert BREAST.is_file(), f"shared data missing: {BREAST}"
    return BREAST.resolve()
