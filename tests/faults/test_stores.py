"""Concurrent creation of fresh stores: four processes start at the same moment in an empty folder, each opening
the default MLflow store (`mlruns/mlflow.db`, as `synaug fit` does through its logger) and the default Optuna
store (`mlruns/optuna.db`, as `synaug tune` does), so that all of them find both fresh; all succeed."""

import os
import subprocess
import sys
import time

import mlflow
import optuna
import pytest

WORKERS = 4
# Imports first (seconds), then every process waits for the same go signal: they create the stores together.
WORKER = """
import os, time
from pathlib import Path
import optuna
import pytest
from synaug.tracking import MLFlowLogger, rdb_storage
from synaug.experiment.tune import default_storage
Path(f"ready-{os.getpid()}").touch()
while not Path("go").exists():
    time.sleep(0.005)
logger = MLFlowLogger(experiment_name="concurrent")
logger.log_metrics({"train/loss": 1.0}, step=0)
logger.finalize("success")
study = optuna.create_study(storage=rdb_storage(default_storage()), study_name="concurrent", load_if_exists=True)
study.optimize(lambda t: t.suggest_float("ratio", 0, 1), n_trials=1)
"""


@pytest.mark.slow  # three (four) fresh processes: their imports dominate
def test_four_processes_create_fresh_stores_at_once(tmp_path, figures):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the default store, in cwd
    env["OMP_NUM_THREADS"] = "1"  # four processes on a few cores: no thread pool spinning against the others
    procs = []
    for i in range(WORKERS):
        with (tmp_path / f"worker-{i}.log").open("w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", WORKER],
                    cwd=tmp_path,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    deadline = time.time() + 120
    while len(list(tmp_path.glob("ready-*"))) < WORKERS and time.time() < deadline:
        assert all(p.poll() is None for p in procs)
        time.sleep(0.05)
    (tmp_path / "go").touch()
    codes = [p.wait(timeout=120) for p in procs]
    logs = "\n".join((tmp_path / f"worker-{i}.log").read_text()[-2000:] for i in range(WORKERS))
    assert codes == [0] * WORKERS, logs
    study = optuna.load_study(study_name="concurrent", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert len(study.trials) == WORKERS
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id])
    assert len(runs) == WORKERS and all(r.info.status == "FINISHED" for r in runs)
    figures(
        "faults survived",
        "4 processes creating fresh MLflow and Optuna SQLite stores at once",
        "all 4 succeeded",
    )
