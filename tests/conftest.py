"""Every test runs offline on the CPU, with its caches and MLflow store in a temporary folder."""

import json
import os
import tempfile
from collections import defaultdict
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
def postgres() -> str:
    """The PostgreSQL URL of the multi-process tests (`bash .ci/postgres.sh` starts it); skips without one."""
    import sqlalchemy

    url = os.environ.get(
        "SYNAUG_POSTGRES_URL", "postgresql+psycopg2://synaug:synaug@localhost:5432/synaug_test"
    )
    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.OperationalError as e:
        pytest.skip(f"no PostgreSQL at {url} (run `bash .ci/postgres.sh`, or set SYNAUG_POSTGRES_URL): {e}")
    finally:
        engine.dispose()
    return url


@pytest.fixture(scope="session")
def brain_root() -> Path:
    assert BRAIN.is_dir(), f"shared data missing: {BRAIN}"
    return BRAIN.resolve()


@pytest.fixture(scope="session")
def breast_npz() -> Path:
    assert BREAST.is_file(), f"shared data missing: {BREAST}"
    return BREAST.resolve()


# The reliability figures of tests/faults: each test appends its row to one file; the controller (the only
# process with a terminal under pytest-xdist) prints the table at the end.
FIGURES = pytest.StashKey[Path]()


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # an xdist worker: the controller's file
        config.stash[FIGURES] = Path(config.workerinput["synaug_figures"])
    else:
        fd, path = tempfile.mkstemp(prefix="synaug-reliability-figures-", suffix=".jsonl")
        os.close(fd)
        config.stash[FIGURES] = Path(path)


@pytest.fixture
def figures_file(request) -> Path:
    return request.config.stash[FIGURES]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):  # xdist, on the controller: tell each worker where the figures go
    node.workerinput["synaug_figures"] = str(node.config.stash[FIGURES])


def pytest_terminal_summary(terminalreporter, config):
    if hasattr(config, "workerinput"):  # workers run this hook too, unseen: the controller prints
        return
    path = config.stash[FIGURES]
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    path.unlink(missing_ok=True)
    if not rows:
        return
    by_kind = defaultdict(list)
    for row in rows:
        by_kind[row["kind"]].append(row)
    terminalreporter.section("reliability figures")
    for kind, group in by_kind.items():
        terminalreporter.write_line(f"{kind}: {len(group)}")
        for row in sorted(group, key=lambda r: r["what"]):
            terminalreporter.write_line(f"  {row['what']}: {row['outcome'][:160]}")
