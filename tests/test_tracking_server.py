"""synaug through an MLflow tracking server (`tools/mlflow_server.sh`) on a real PostgreSQL (`bash .ci/postgres.sh`
starts it; CI runs this): the server gets a fresh database per test run (dropped after) and its own artifact root,
and a real `synaug fit` process logs to it through `MLFLOW_TRACKING_URI`, as the README says.

The server takes most of the time (its first start creates MLflow's tables), so one server serves the module.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import pytest
import requests
import sqlalchemy

from synaug.cli import main
from synaug.tracking import PID, experiment_id, owner

URL = os.environ.get("SYNAUG_POSTGRES_URL", "postgresql+psycopg2://synaug:synaug@localhost:5432/synaug_test")
BIN = Path(sys.executable).parent
SCRIPT = Path(__file__).parents[1] / "tools" / "mlflow_server.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def database() -> str:
    """A fresh PostgreSQL database for this run's server (the role may create them: `.ci/postgres.sh`)."""
    url = sqlalchemy.make_url(URL)
    admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with admin.connect():
            pass
    except sqlalchemy.exc.OperationalError as e:
        admin.dispose()
        pytest.skip(f"no PostgreSQL at {URL} (run `bash .ci/postgres.sh`, or set SYNAUG_POSTGRES_URL): {e}")
    name = f"synaug_mlflow_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:  # FORCE: a connection the server left open does not keep it
            c.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture(scope="module")
def server(database, tmp_path_factory) -> dict:
    """`tools/mlflow_server.sh` on the fresh database and a free port, started in its own folder (its default
    artifact root, mlruns/server-artifacts/, lands there), one worker; waits until it answers."""
    folder = tmp_path_factory.mktemp("server")
    port = free_port()
    log = folder / "server.log"
    env = os.environ | {"MLFLOW": str(BIN / "mlflow")}
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["bash", str(SCRIPT), database, "--port", str(port), "--workers", "1"],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its uvicorn worker goes down with it
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.time() < deadline, log.read_text()[-4000:]
            try:
                if requests.get(f"{uri}/health", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        yield {"uri": uri, "port": port, "artifacts": folder / "mlruns" / "server-artifacts", "db": database}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_server_binds_to_localhost_only(server):
    # Every 127.x address is this machine's loopback: a server bound to 0.0.0.0 would answer on 127.0.0.2 too.
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.2:{server['port']}/health", timeout=5)


def fit_args(root, experiment: str) -> list[str]:
    args = ["fit", "--model", "synaug.classifiers.ImageClassifier", "--model.backbone", "basic_cnn"]
    args += ["--data.root", str(root), "--data.image_size", "28", "--trainer.max_epochs", "1"]
    args += ["--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]
    args += [
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.experiment_name",
        experiment,
    ]
    return args


def test_fit_logs_everything_to_the_server(server, breast_npz, tmp_path):
    env = os.environ | {"MLFLOW_TRACKING_URI": server["uri"], "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(BIN / "synaug"), *fit_args(breast_npz, "through-server")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    client = mlflow.MlflowClient(server["uri"])
    exp = client.get_experiment_by_name("through-server")
    (run,) = client.search_runs([exp.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert {"test/acc", "test/f1_macro", "test/auroc", "test/recall/malignant", "val/f1_macro"} <= set(
        run.data.metrics
    )
    assert run.data.params["trainer.max_epochs"] == "1" and run.data.params["backbone"] == "basic_cnn"
    assert run.data.tags["git_commit"] and run.data.tags["data.fingerprint"]
    contexts = {i.tags[0].value for i in run.inputs.dataset_inputs}
    assert contexts == {"train", "validation", "test"}
    # the results block names the run's page on the server (not a local `mlflow ui`), and only it does (MLflow's
    # own "View run" lines are a library's notice)
    assert f"  show it: {server['uri']}/#/experiments/{exp.experiment_id}/runs/{run_id}\n" in done.stdout
    assert "View run" not in done.stdout, done.stdout
    # artifacts went through the server into its artifact root, not into a local mlruns/ of the client
    root = server["artifacts"] / exp.experiment_id / run_id / "artifacts"
    for path in ("config.yaml", "data/counts.csv", "data/train_grid.png", "test/confusion_matrix.png"):
        assert (root / path).stat().st_size > 0, path
    assert "basic_cnn" in (root / "config.yaml").read_text()
    assert not (tmp_path / "mlruns").exists()
    # and the run itself is in the PostgreSQL database
    engine = sqlalchemy.create_engine(server["db"])
    try:
        with engine.connect() as c:
            status = c.execute(
                sqlalchemy.text("SELECT status FROM runs WHERE run_uuid = :id"), {"id": run_id}
            ).scalar_one()
    finally:
        engine.dispose()
    assert status == "FINISHED"


def test_an_experiment_created_meanwhile_is_used(server):
    """Two workers starting together both find no experiment and both create it: the server refuses the second
    (a unique name); that one uses the first's. Here the other worker creates it between the look and the
    create."""
    name = f"race-{uuid.uuid4().hex[:8]}"

    class Late(mlflow.MlflowClient):
        looked = False

        def get_experiment_by_name(self, name):
            if not self.looked:
                self.looked = True
                mlflow.MlflowClient(server["uri"]).create_experiment(name)  # the other worker
                return None
            return super().get_experiment_by_name(name)

    exp_id = experiment_id(Late(server["uri"]), name, server["uri"])
    assert exp_id == mlflow.MlflowClient(server["uri"]).get_experiment_by_name(name).experiment_id


def test_no_server_is_one_line_at_once(breast_npz, tmp_path, monkeypatch, capsys):
    # MLflow's client would retry for minutes; no retries here, so that without the check this fails at once
    # (with a traceback) rather than slowly.
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(SystemExit) as exit_:
        main(fit_args(breast_npz, "nowhere"))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and "Traceback" not in "\n".join(err), err[-5:]
    line = err[-1]
    assert line.startswith("synaug: error: ") and f"{uri}: no MLflow tracking server answers" in line, line
    assert "Connection refused" in line and "tools/mlflow_server.sh" in line


def test_a_dead_process_run_is_marked_killed(server):
    """`mark_killed` through the server: a run left RUNNING by a process of this machine that is gone."""
    client = mlflow.MlflowClient(server["uri"])
    name = f"killed-{uuid.uuid4().hex[:8]}"
    exp_id = experiment_id(client, name, server["uri"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = client.create_run(exp_id, tags=owner() | {PID: str(gone.pid)}).info.run_id
    alive = client.create_run(exp_id, tags=owner()).info.run_id  # this process
    assert experiment_id(client, name, server["uri"]) == exp_id
    assert client.get_run(dead).info.status == "KILLED" and client.get_run(alive).info.status == "RUNNING"
