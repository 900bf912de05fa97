"""Grid workers on a real PostgreSQL server (`bash .ci/postgres.sh`; skipped without it): two `synaug experiment
--storage` processes share one grid (2 cells x 2 seeds, basic CNN on BreastMNIST at 28 px); worker A hangs in its
first fit (tests/faults/hang.py) and is killed there with SIGKILL; worker B fails that trial by its stale
heartbeat, trains the run again, and writes the report."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from synaug.experiment import search
from synaug.tracking import experiment_id, tracking_uri

SYNAUG = Path(sys.executable).with_name("synaug")
FAULTS = Path(__file__).parents[1] / "faults"
CELLS, SEEDS = ["cnn/none/real=1/none", "cnn/hflip/real=1/none"], 2


def worker(folder: Path, config: Path, name: str, **env: str) -> subprocess.Popen:
    # one torch thread each: two fits at once on a 2-core machine
    environment = os.environ | {"OMP_NUM_THREADS": "1"} | env
    environment["PYTHONPATH"] = os.pathsep.join([str(FAULTS), environment.get("PYTHONPATH", "")])
    log = folder / f"{name}.log"  # a file: a full pipe would block it
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(SYNAUG), "experiment", "-c", str(config)],
            cwd=folder,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    proc.log = log
    return proc


@pytest.fixture(scope="module")
def killed_grid(postgres, breast_npz, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("grid-workers")
    name = f"grid-{uuid.uuid4().hex[:8]}"  # the database outlives the test: a fresh grid each time
    settings = dict(
        name=name,
        base={
            "data": {"root": str(breast_npz), "image_size": 28, "batch_size": 64},
            "trainer": {
                "max_epochs": 1,
                "limit_train_batches": 2,
                "limit_val_batches": 2,
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "callbacks": [{"class_path": "hang.HangInFit"}],  # hangs only where $HANG_DIR is set
            },
        },
        classifiers={
            "cnn": {
                "model": {
                    "class_path": "synaug.classifiers.ImageClassifier",
                    "init_args": {"backbone": "basic_cnn", "model_kwargs": {"hidden": [32, 16]}},
                }
            }
        },
        policies=["none", "hflip"],
        seeds=SEEDS,
        controls=False,
        out=str(folder / "report"),
        storage=postgres,
        heartbeat_interval=1,
        grace_period=3,
    )
    config = folder / "grid.yaml"
    config.write_text(yaml.safe_dump(settings))
    # the stores' tables before the workers start: two processes creating them at once collide
    optuna.storages.RDBStorage(postgres)
    uri = tracking_uri()
    experiment_id(mlflow.MlflowClient(uri), name, uri)
    (folder / "hang").mkdir()
    a = worker(folder, config, "a", HANG_DIR=str(folder / "hang"), HANG_AT_FIT="1")
    b = worker(folder, config, "b")
    try:
        deadline = time.time() + 150
        while not (folder / "hang" / "fitting").exists():
            assert a.poll() is None and time.time() < deadline, a.log.read_text()[-4000:]
            time.sleep(0.1)
        a.send_signal(signal.SIGKILL)
        assert a.wait() == -signal.SIGKILL
        b.wait(timeout=150)
        assert b.returncode == 0, b.log.read_text()[-4000:]
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
    study = optuna.load_study(study_name=f"{name}:grid", storage=postgres)
    return {"name": name, "study": study, "a": a.pid, "b": b.pid, "folder": folder, "log": b.log.read_text()}


def test_every_run_trained_once_despite_a_killed_worker(killed_grid):
    client = mlflow.MlflowClient()
    exp_id = client.get_experiment_by_name(killed_grid["name"]).experiment_id
    runs = search(client, exp_id, {"level": "seed", "experiment": killed_grid["name"]})
    finished = sorted((r.data.tags["cell"], r.data.tags["seed"]) for r in runs if r.info.status == "FINISHED")
    assert finished == sorted((c, str(s)) for c in CELLS for s in range(SEEDS))  # each exactly once
    assert all("test/f1_macro" in r.data.metrics for r in runs if r.info.status == "FINISHED")
    (dead,) = [r for r in runs if r.info.status != "FINISHED"]  # the run A was killed in
    assert dead.info.status == "KILLED" and dead.data.tags["worker"].endswith(f":{killed_grid['a']}")

    study = killed_grid["study"]
    (failed,) = study.get_trials(states=(TrialState.FAIL,))  # failed by its stale heartbeat
    assert failed.user_attrs["worker"].endswith(f":{killed_grid['a']}")
    assert dead.data.tags["optuna.trial"] == str(failed.number)
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["job"] == failed.user_attrs["job"]
    assert retry.user_attrs["worker"].endswith(f":{killed_grid['b']}")
    complete = [t.user_attrs["job"] for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert sorted(complete) == sorted(study.user_attrs["enqueued"]) and len(complete) == len(CELLS) * SEEDS
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))


def test_the_last_worker_writes_the_whole_report(killed_grid):
    report = killed_grid["folder"] / "report"
    summary = pd.read_csv(report / "summary.csv")
    assert sorted(summary["cell"].unique()) == sorted(CELLS)
    assert (summary.loc[summary["metric"] == "test/f1_macro", "n"] == SEEDS).all()
    text = (report / "report.md").read_text()
    assert all(c in text for c in CELLS)
    client = mlflow.MlflowClient()
    exp_id = client.get_experiment_by_name(killed_grid["name"]).experiment_id
    (parent,) = search(client, exp_id, {"level": "experiment", "experiment": killed_grid["name"]})
    assert parent.info.status == "FINISHED"
    assert "report" in {a.path for a in client.list_artifacts(parent.info.run_id)}
