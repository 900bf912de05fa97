"""Scale-out of `synaug tune` on a real PostgreSQL server (`bash .ci/postgres.sh` installs and starts it; CI runs
it): two worker processes share one study; one is killed with SIGKILL in the middle of a trial, and the other
fails that trial by its stale heartbeat, runs it again and finishes the study.

The workers are real `synaug tune -c` processes; their training is a stand-in (`slow_fit`) that takes a moment
per trial so that the workers overlap, hangs where the test wants a worker to die, and keeps the other worker
busy until the dead one's heartbeat is stale (a fast worker could finish the study before that).
"""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from synaug.experiment import search
from synaug.generators.transform import transform_generate
from synaug.tracking import experiment_id, tracking_uri

SYNAUG = Path(sys.executable).with_name("synaug")
N_TRIALS = 6
GRACE = 3  # seconds without a heartbeat before a running trial counts as dead


def slow_fit(config: dict, metric: str, report) -> float:
    """Stand-in training: waits until both workers are up (so they overlap), takes 0.3 s per 'epoch'; hangs in the
    trial given by $HANG_AT_TRIAL (the worker's own count, from 1) after writing a marker file; with
    $OUTLIVE_KILL, once a worker hangs, waits until the test has killed it and its heartbeat is stale."""
    here = Path(os.environ["WORKER_DIR"])
    (here / f"up-{os.getpid()}").touch()
    deadline = time.time() + 60
    while len(list(here.glob("up-*"))) < int(os.environ["WORKERS"]) and time.time() < deadline:
        time.sleep(0.05)
    if "synthetic_ratio" not in config["data"]:  # the no-synthetic reference each worker evaluates first
        return 1.0
    count = len(list(here.glob(f"trial-{os.getpid()}-*"))) + 1
    (here / f"trial-{os.getpid()}-{count}").touch()
    if count == int(os.environ.get("HANG_AT_TRIAL", 0)):
        (here / "hanging").write_text(str(os.getpid()))
        time.sleep(600)
    if os.environ.get("OUTLIVE_KILL") and (here / "hanging").exists():
        while not (here / "killed").exists():
            time.sleep(0.05)
        time.sleep(max(0.0, float((here / "killed").read_text()) + GRACE + 1 - time.time()))
    value = 1 - config["data"]["synthetic_ratio"]["malignant"]
    for epoch in range(2):
        time.sleep(0.3)
        report(epoch, value)
    return value


@pytest.fixture(scope="module")
def config(postgres, breast_npz, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("synthetic") / "transform"
    transform_generate(str(breast_npz), str(folder), per_class={"malignant": 60}, image_size=28)
    path = tmp_path_factory.mktemp("config") / "tune.yaml"
    study = f"pg-{uuid.uuid4().hex[:8]}"  # the database outlives the test: a fresh study each time
    settings = dict(
        name=study,
        base={
            "model": {
                "class_path": "synaug.classifiers.ImageClassifier",
                "init_args": {"backbone": "basic_cnn", "model_kwargs": {"hidden": [32, 16]}},
            },
            "data": {"root": str(breast_npz), "image_size": 28},
            "trainer": {"max_epochs": 2},
        },
        synthetic=[str(folder)],
        ratio={"malignant": [0.0, 0.4]},
        seeds=1,
        n_trials=N_TRIALS,
        storage=postgres,
        heartbeat_interval=1,
        grace_period=GRACE,
        evaluate_seeds=0,
        fit="test_tune_postgres:slow_fit",
    )
    path.write_text(yaml.safe_dump(settings))
    # Create the stores before the workers start, as the README says: two processes creating the tables of a
    # new database at once collide (both Optuna's and MLflow's).
    optuna.create_study(study_name=study, storage=postgres, direction="maximize")
    uri = tracking_uri()
    experiment_id(mlflow.MlflowClient(uri), study, uri)
    return {"path": path, "study": study, "storage": postgres}


def worker(config: dict, folder: Path, workers: int, *extra: str, **env: str) -> subprocess.Popen:
    environment = os.environ | env | {"WORKER_DIR": str(folder), "WORKERS": str(workers)}
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).parent), environment.get("PYTHONPATH", "")]
    )
    log = (
        folder / f"worker-{len(list(folder.glob('worker-*.log')))}.log"
    )  # a file: a full pipe would block it
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(SYNAUG), "tune", "-c", str(config["path"]), *extra],
            cwd=folder,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    proc.log = log
    return proc


def finish(proc: subprocess.Popen) -> None:
    proc.wait(timeout=180)
    assert proc.returncode == 0, proc.log.read_text()[-4000:]


@pytest.fixture(scope="module")
def two_workers(config, tmp_path_factory) -> tuple[optuna.Study, int, str]:
    """Workers A and B start together; A hangs in its second trial and is killed there; B finishes the study.
    Returns the study, the number of the trial A died in, and B's worker id."""
    folder = tmp_path_factory.mktemp("workers")
    a = worker(config, folder, 2, HANG_AT_TRIAL="2")
    b = worker(config, folder, 2, OUTLIVE_KILL="1")
    try:
        deadline = time.time() + 120
        while not (folder / "hanging").exists():
            assert a.poll() is None and time.time() < deadline, a.log.read_text()[-4000:]
            time.sleep(0.1)
        time.sleep(0.5)  # the hanging trial is RUNNING in the storage (its stand-in started after `ask`)
        a.send_signal(signal.SIGKILL)
        a.wait()
        (folder / "killed").write_text(str(time.time()))
        finish(b)
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
    study = optuna.load_study(study_name=config["study"], storage=config["storage"])
    (killed,) = [t.number for t in study.trials if t.user_attrs["worker"].endswith(f":{a.pid}")][1:]
    return study, killed, f":{b.pid}"


def test_two_workers_share_one_study(config, two_workers):
    study, _, _ = two_workers
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers)))  # every trial once, none lost
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    # n_trials counts the whole study; a race at the end may add one trial per extra worker
    assert N_TRIALS <= len(complete) <= N_TRIALS + 1
    assert len({t.user_attrs["worker"] for t in complete}) == 2  # both took part
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    # each trial has exactly one MLflow run, made by the worker that ran it
    client = mlflow.MlflowClient()
    exp_id = client.get_experiment_by_name(config["study"]).experiment_id
    runs = search(client, exp_id, {"level": "trial", "optuna.study": config["study"]})
    assert sorted(int(r.data.tags["optuna.trial"]) for r in runs) == numbers
    for t in complete:
        (run,) = [r for r in runs if r.info.run_id == t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["worker"] == t.user_attrs["worker"] and run.data.metrics["objective"] == t.value


def test_a_killed_workers_trial_fails_and_is_run_again(two_workers):
    study, killed_number, survivor = two_workers
    killed = study.trials[killed_number]
    assert killed.state == TrialState.FAIL
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed_number]
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    assert retry.user_attrs["worker"].endswith(survivor)
    client = mlflow.MlflowClient()
    dead = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert dead.info.status == "KILLED" and dead.data.tags["state"] == "FAIL"
    again = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert again.data.tags["retry_of_run"] == killed.user_attrs["mlflow_run_id"]
