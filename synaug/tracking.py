"""MLflow tracking: one default local store, the provenance every run carries, figures as images.

The local default is a SQLite database under `mlruns/` with artifacts beside it (MLflow 3 deprecates the
plain `./mlruns` file store). `MLFLOW_TRACKING_URI` (or `tracking_uri` in a config) points at a tracking server
instead (`http://127.0.0.1:5000`, `tools/mlflow_server.sh`): the server keeps runs in its database and artifacts
in its artifact root, and many processes and machines log to it at once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import socket
import subprocess
from contextlib import nullcontext
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # runs are headless: workers, CI, remote GPUs
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from filelock import FileLock  # noqa: E402
from lightning.fabric.utilities.logger import _convert_params, _flatten_dict  # noqa: E402
from lightning.pytorch.loggers import MLFlowLogger as _MLFlowLogger  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402

# MLflow is imported where used (4 s): `synaug fit --help` builds its parser, which reads this module's
# annotations, without it. The name an annotation of a client reads as:
Client = "mlflow.MlflowClient"

STORE = Path("mlruns")
# The MLflow UI opens such an experiment in its model-training view (runs, metrics charts), not the GenAI one.
TRAINING = {"mlflow.experimentKind": "custom_model_development"}


def tracking_uri(uri: str | None = None) -> str:
    """`uri`, else `$MLFLOW_TRACKING_URI`, else the local SQLite store `mlruns/mlflow.db` (created on demand)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        STORE.mkdir(exist_ok=True)
        uri = f"sqlite:///{(STORE / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///"):
        _create_store(uri)
    elif uri.startswith(("http://", "https://")):
        _check_server(uri)
    return uri


def store_lock(uri: str):
    """One process at a time creates or migrates a SQLite store (MLflow's or Optuna's): their alembic migrations
    collide when two processes find the same fresh file ("table _alembic_tmp_tags already exists" for good).
    A file lock beside the database; a server creates its tables when it starts (see `experiment_id` for what
    its clients still race on)."""
    if not uri.startswith("sqlite:///"):
        return nullcontext()
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{db}.lock")


def rdb_storage(url: str, **kwargs):
    """Optuna's RDBStorage at `url` (`kwargs` as its own), a fresh SQLite file created under the store's lock."""
    from optuna.storages import RDBStorage

    with store_lock(url):
        return RDBStorage(url, **kwargs)


@functools.cache
def _create_store(uri: str) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db = Path(uri.removeprefix("sqlite:///"))
    try:
        with store_lock(uri):
            SqlAlchemyStore(uri, artifact_location(uri))  # creates the tables, or checks an existing schema
    except Exception as err:  # sqlite3 / SQLAlchemy / filelock / OSError: one message for all of them
        reason = " ".join(str(getattr(err, "orig", None) or err).split())[:200]
        raise StoreError(
            f"{db}: cannot open the MLflow store ({type(err).__name__}: {reason}); check that the folder and the "
            "file are readable and writable and the disk has room, or point MLFLOW_TRACKING_URI elsewhere"
        ) from err


@functools.cache
def _check_server(uri: str) -> None:
    # MLflow's client retries a refused connection with backoff (4 min with its defaults), then fails: a
    # server that is not running (or a mistyped port) is said at once. One request without retries, through
    # MLflow's own HTTP layer (its credentials and TLS settings); any HTTP status will do (a proxy in front of the
    # server may not route /health): only no answer at all is an error.
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        http_request(get_default_host_creds(uri), "/health", "GET", max_retries=0, raise_on_status=False)
    except MlflowException as err:
        text = str(err)
        reason = re.search(r"\[Errno -?\d+\][^\"')]*|timeout exception", text)
        raise StoreError(
            f"{uri}: no MLflow tracking server answers ({reason.group(0) if reason else text}); start it "
            "(tools/mlflow_server.sh) or point MLFLOW_TRACKING_URI elsewhere"
        ) from err


def artifact_location(uri: str) -> str | None:
    """A SQLite store keeps its artifacts in `artifacts/` beside the database; a server decides its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()


def experiment_id(client: Client, name: str, uri: str) -> str:
    """The id of the MLflow experiment `name` in the store at `uri`, created with its artifact location if new."""
    from mlflow.exceptions import MlflowException

    with store_lock(uri):  # two processes creating one experiment: the second would fail on the unique name
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            exp_id = exp.experiment_id
        else:
            try:
                exp_id = client.create_experiment(name, artifact_location(uri), TRAINING)
            except MlflowException as err:
                # A server (or a PostgreSQL store) has no lock to take: another process, on this machine or
                # another, created it since we looked (tuning workers started together do).
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp_id = client.get_experiment_by_name(name).experiment_id
    mark_killed(client, exp_id)
    return exp_id


class StoreError(ValueError):
    """A tracking store that cannot be used (unreadable, read-only, full, not a database)."""


HOST, PID = "synaug.host", "synaug.pid"


def owner() -> dict[str, str]:
    """Tags naming the process that runs a run: how a later command tells a dead run from a running one."""
    return {HOST: socket.gethostname(), PID: str(os.getpid())}


def mark_killed(client: Client, exp_id: str) -> list[str]:
    """Runs left RUNNING by a process of this machine that no longer exists (SIGKILL, power loss, OOM) are marked
    KILLED; returns their ids. Runs of other machines are left alone (their process cannot be checked here)."""
    from synaug.experiment.runs import search  # every page, and a host name matched safely whatever it holds

    killed = []
    for run in search(client, exp_id, {HOST: socket.gethostname()}, status="RUNNING"):
        pid = int(run.data.tags.get(PID, "0"))
        if pid and not _alive(pid):
            client.set_terminated(run.info.run_id, "KILLED")
            killed.append(run.info.run_id)
    return killed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def command_run(
    experiment: str, run_name: str | None, uri: str | None, tags: dict[str, str]
) -> tuple[Client, str]:
    """A new MLflow run for a command (`synaug sample`, `quality`, `explain`), tagged with the git commit."""
    import mlflow  # where used: `synaug fit --help` builds its parser without it (4 s)

    uri = tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    run = client.create_run(
        experiment_id(client, experiment, uri),
        run_name=run_name,
        tags={**tags, "git_commit": git_commit(), **owner()},
    )
    COMMAND_RUNS.append((uri, run.info.run_id))
    return client, run.info.run_id


COMMAND_RUNS: list[tuple[str, str]] = []  # (store, run id) of the command runs this process made: `results:`


def run_note(uri: str, run_id: str) -> list[str]:
    """Where a run is, for a command's `results:` block: its name, id and experiment, and how to show it."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    exp_id = run.info.experiment_id
    # A server is its own UI: the run's page; a local store needs `mlflow ui` started on it.
    show = (
        f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"
        if uri.startswith(("http://", "https://"))
        else f"mlflow ui --backend-store-uri {uri}"
    )
    return [
        f"MLflow run {run.info.run_name} ({run_id}) in experiment {client.get_experiment(exp_id).name}",
        f"  show it: {show}",
    ]


CREATED: list[tuple[Client, str]] = []  # runs this process's loggers created, for `discard_empty`


def discard_empty() -> None:
    """Delete the runs this process created that hold no metric: what a config or data error left behind (the
    user's experiment shows no empty FAILED run for a run that never trained)."""
    while CREATED:
        client, run_id = CREATED.pop()
        if not client.get_run(run_id).data.metrics:
            client.delete_run(run_id)


class MLFlowLogger(_MLFlowLogger):
    """Lightning's MLFlowLogger with synaug's defaults: the local SQLite store and its artifact folder."""

    def __init__(
        self,
        experiment_name: str = "synaug",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
        log_model: bool = False,
        system_metrics: bool = False,
    ):
        """`system_metrics`: also log the machine's CPU, memory, disk, network and GPU use as `system/*` metrics
        (MLflow's monitor, every `$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` seconds, default 10) while it trains."""
        import mlflow

        uri = globals()["tracking_uri"](tracking_uri)
        client = mlflow.MlflowClient(uri)
        if run_id is None:
            # Created here, under the store's lock (Lightning's own get-or-create races with other processes);
            # it also marks runs of dead processes KILLED.
            experiment_id(client, experiment_name, uri)
        elif rank_zero_only.rank == 0:  # a resumed fit continues its run (its id travels in the checkpoint)
            # (under DDP the other ranks neither mark it nor tag it with their own process)
            mark_killed(client, client.get_run(run_id).info.experiment_id)
            client.update_run(run_id, "RUNNING")
            for k, v in owner().items():
                client.set_tag(run_id, k, v)
        self._continued, self.system_metrics, self._monitor = run_id, system_metrics, None
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=uri,
            tags={**(tags or {}), **owner()},
            artifact_location=artifact_location(uri),
            run_id=run_id,
            log_model=log_model,
        )

    @property
    def experiment(self) -> Client:
        new = self._run_id is None
        client = super().experiment
        if new and self._run_id is not None:
            CREATED.append((client, self._run_id))
        return client

    def start_system_metrics(self) -> None:
        if self.system_metrics and self._monitor is None:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id, resume_logging=True, tracking_uri=self._tracking_uri
            )
            self._monitor.start()

    def finalize(self, status: str = "success") -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        super().finalize(status)

    @rank_zero_only  # as Lightning's: the other DDP ranks have no run to read
    def log_hyperparams(self, params) -> None:
        if self._continued:  # MLflow params are immutable: a resumed run keeps the values it started with
            logged = self.experiment.get_run(self.run_id).data.params
            params = {k: v for k, v in _flatten_dict(_convert_params(params)).items() if k not in logged}
        super().log_hyperparams(params)


TRAINER_PARAMS = (
    "max_epochs",
    "max_steps",
    "accumulate_grad_batches",
    "gradient_clip_val",
)  # precision: as resolved


def run_params(config) -> dict[str, object]:
    """The params of a training run's resolved config (`fit`/`test` subcommand) that its module's own
    hyperparameters leave out: the optimizer and scheduler with their settings, the trainer's and the seed."""
    params: dict[str, object] = {"seed_everything": config.get("seed_everything")}
    model = config.model.init_args
    for key in ("optimizer", "scheduler"):
        value = model.get(key)
        if value is None:
            continue
        params[key] = value.class_path.rsplit(".", 1)[-1]
        params |= {f"{key}.{k}": v for k, v in vars(value.get("init_args") or {}).items()}
    params |= {f"trainer.{k}": config.trainer.get(k) for k in TRAINER_PARAMS}
    return {k: v for k, v in params.items() if v is not None}


def log_datasets(client: Client, run_id: str, dm) -> None:
    """The run's real and synthetic training sets, validation and test sets as MLflow dataset inputs: the
    digest is the set's fingerprint (sha256 of its sorted image hashes, cut to MLflow's 36 characters), the
    profile its per-class counts; the UI's Datasets column shows them."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    table = dm.table
    train = np.zeros(len(table), dtype=bool)
    train[dm.train_rows] = True
    synthetic = table["synthetic"].to_numpy(dtype=bool)
    sets = {
        "train": (train & ~synthetic, str(dm.hparams.root)),
        "train_synthetic": (train & synthetic, ",".join(dm.hparams.synthetic or [])),
        "validation": (table["split"].to_numpy() == "val", str(dm.hparams.root)),
        "test": (table["split"].to_numpy() == "test", str(dm.hparams.root)),
    }
    inputs = []
    for context, (rows, source) in sets.items():
        if not rows.any():
            continue
        part = table[rows]
        digest = hashlib.sha256("\n".join(sorted(part["sha256"])).encode()).hexdigest()
        names = np.asarray(dm.class_names)[part["label"].to_numpy()]
        counts = pd.Series(names).value_counts().sort_index()
        profile = {"num_images": int(rows.sum()), "per_class": {k: int(v) for k, v in counts.items()}}
        dataset = Dataset(
            name=f"{Path(source.split(',')[0]).name}-{context}",
            digest=digest[:36],
            source_type="local",
            source=json.dumps({"uri": source}),
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", context)]))
    client.log_inputs(run_id, datasets=inputs)


def git_commit() -> str:
    """The commit of the synaug checkout a run came from, with `-dirty` when it had uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def log_figure(client: Client, run_id: str, fig: plt.Figure, path: str) -> None:
    client.log_figure(run_id, fig, path)
    plt.close(fig)
