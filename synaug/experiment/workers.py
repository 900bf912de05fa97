"""Grid workers: several `synaug experiment` processes, on one machine or many, share one grid through Optuna's RDB
storage (the engine that already coordinates `synaug tune` workers), not a queue of our own.

    synaug experiment -c grid.yaml --storage postgresql+psycopg2://USER:PASSWORD@HOST/DB   # N times, anywhere

- The study `<name>:grid` holds the grid's jobs: one enqueued trial per (cell, seed) run still to train, its job
  key (cell, seed, config hash) and its LightningCLI config in the trial's user attributes. The process whose
  `create_study` succeeds (the database's unique study name decides: exactly one) is the first worker: it runs
  the generator stage (trains, samples and checks the generators), plans the runs, enqueues them and sets the
  study's `enqueued` attribute. The others wait for that attribute before their generator stage, which then only
  finds the cached generators, so no generator is trained twice and no run is enqueued twice.
- Each worker `optimize`s: it takes the next WAITING trial (Optuna hands a trial to one process only), trains and
  tests that run (`run_seed`, tagged `optuna.study`, `optuna.trial`, `worker`) and reports the trial COMPLETE with
  the run's test metric. A running trial keeps a heartbeat; a trial whose worker died is failed `grace_period`
  seconds after its last one by a live worker, its MLflow run marked KILLED, and enqueued again
  (RetryHeartbeatStaleTrialCallback, at most `max_retry` times). A worker with nothing left to take waits while
  other trials run (it takes over their retries), then the one that claims the study `<name>:grid:report`
  (again a unique name: exactly one) writes the report; the others exit 0 saying so.
- A SIGTERM/SIGINT stops the worker as it stops a grid (exit 143 / 130); its run is retried like a dead worker's.
  A run that fails with an error fails its trial and that worker (its traceback); the others go on, and no report is written while a job has no
  complete trial: fix the cause, delete both studies (`optuna delete-study --storage URL --study-name ...`) and
  start the workers again: finished runs are skipped by their config hash as in any rerun.
- The grid is fixed when it is enqueued: a worker whose plan has a run the study does not (another config, data
  or synthetic images) refuses to join it; delete the studies to start a new round.

The MLflow store must be one that several processes can write: a tracking server (`MLFLOW_TRACKING_URI`) across
machines; on one machine the local SQLite store does. Generator and synthetic folders must be on a shared file
system when the workers are on several machines.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings

import optuna
from mlflow import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from synaug.experiment.runs import search
from synaug.tracking import rdb_storage

ENQUEUED = "enqueued"  # the study's user attribute: the job keys, set once every job is enqueued
SETUP = "setup_heartbeat"  # the first worker's heartbeat until then: a count, so no two machines' clocks meet


def job_key(tags: dict[str, str]) -> str:
    """What a job is: its cell, seed and config hash (a changed config is another job)."""
    return f"{tags['cell']} seed {tags['seed']} {tags['config_hash']}"


class GridStudy:
    """This process as one worker of the grid `name` (see the module's docstring)."""

    def __init__(
        self,
        storage: str,
        name: str,
        client: MlflowClient,
        exp_id: str,
        heartbeat_interval: int = 60,
        grace_period: int | None = None,
        max_retry: int = 3,
    ):
        self.client, self.exp_id, self.study_name = client, exp_id, f"{name}:grid"
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        # Optuna's heartbeats are marked experimental (since 2.8; `synaug tune` relies on them too): nothing a
        # user can act on. Its INFO line per trial repeats what `_objective` prints.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.max_retry, self._retry = max_retry, RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self.rdb = rdb_storage(
            storage,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=self._on_stale,
        )
        self.poll, self.grace = heartbeat_interval, grace_period or 2 * heartbeat_interval
        try:  # the database's unique study name makes exactly one process the first
            self.study = optuna.create_study(
                storage=self.rdb, study_name=self.study_name, direction="maximize"
            )
            self.first = True
            self._enqueued = threading.Event()
            threading.Thread(target=self._setup_heartbeat, daemon=True).start()
        except optuna.exceptions.DuplicatedStudyError:
            self.study = optuna.load_study(study_name=self.study_name, storage=self.rdb)
            self.first = False

    def wait_for_jobs(self) -> None:
        """A later worker waits until the first has trained the generators and enqueued the jobs."""
        if self.first or ENQUEUED in self.study.user_attrs:
            return
        print(f"{self.study_name}: waiting for the first worker to train the generators and enqueue the runs")
        beat, seen = None, time.monotonic()
        while ENQUEUED not in (attrs := self.study.user_attrs):
            if attrs.get(SETUP) != beat:
                beat, seen = attrs.get(SETUP), time.monotonic()
            elif time.monotonic() - seen > self.grace:
                raise RuntimeError(
                    f"{self.study_name}: the first worker stopped before it enqueued the runs (no heartbeat for "
                    f"{self.grace} s; see its output). Delete the study (`optuna delete-study --storage URL "
                    f"--study-name {self.study_name}`) and start the workers again: the generators it finished "
                    "are cached."
                )
            time.sleep(min(1, self.poll))

    def _setup_heartbeat(self) -> None:
        # a worker waiting for the runs must tell a first worker that trains generators for hours from a dead one
        beat = 0
        while not self._enqueued.wait(0 if beat == 0 else self.poll):
            beat += 1
            self.study.set_user_attr(SETUP, beat)

    def run(self, jobs: list[tuple[dict, dict[str, str], str]], keep: bool, metric: str) -> bool:
        """Enqueue `jobs` (the first worker), then train trials until none is left or running; returns whether this
        worker writes the report."""
        if self.first:
            for config, tags, run_name in jobs:
                attrs = {"job": job_key(tags), "run_name": run_name, "config": config, "tags": tags}
                self.study.enqueue_trial({}, user_attrs=attrs)
            self.study.set_user_attr(ENQUEUED, [job_key(t) for _, t, _ in jobs])
            self._enqueued.set()
            print(f"{self.study_name}: {len(jobs)} runs enqueued")
        else:
            known = {t.user_attrs.get("job") for t in self.study.get_trials(deepcopy=False)}
            new = [n for _, t, n in jobs if job_key(t) not in known]
            if new:
                raise ValueError(
                    f"{self.study_name}: this worker's grid has {len(new)} runs the study was not given (e.g. "
                    f"{new[0]!r}): its config, data or synthetic images changed since the first worker enqueued "
                    f"it. Let that grid finish, or delete the studies {self.study_name!r} and "
                    f"{self.study_name + ':report'!r} to start a new round."
                )
        self.keep, self.metric = keep, metric
        while True:
            fail_stale_trials(self.study)  # a dead worker's trial goes back in the queue
            if self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                self.study.optimize(self._objective, callbacks=[_stop_when_empty], gc_after_trial=True)
                continue
            if not self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                break
            time.sleep(self.poll)  # other workers' runs: this one takes over their retries if they die
        done = {
            t.user_attrs.get("job")
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        }
        missing = [k for k in self.study.user_attrs[ENQUEUED] if k not in done]
        if missing:
            raise RuntimeError(
                f"{self.study_name}: {len(missing)} runs have no complete trial (failed with an error, or retried "
                f"{self.max_retry} times), e.g. {missing[0]!r}: no report. See the failed workers' output."
            )
        try:  # the report's own unique study: exactly one worker writes it
            claim = optuna.create_study(storage=self.rdb, study_name=f"{self.study_name}:report")
        except optuna.exceptions.DuplicatedStudyError:
            writer = optuna.load_study(study_name=f"{self.study_name}:report", storage=self.rdb)
            print(
                f"{self.study_name}: every run finished; the report is written by worker {writer.user_attrs['worker']}"
            )
            return False
        claim.set_user_attr("worker", self.worker)
        return True

    def _objective(self, trial: optuna.Trial) -> float:
        attrs = trial.user_attrs
        if "job" not in attrs:  # `optimize` made a fresh trial: another worker took the last job meanwhile
            trial.study.stop()
            raise optuna.TrialPruned("no job left")
        from synaug.experiment.grid import run_seed  # grid imports this module

        trial.set_user_attr("worker", self.worker)
        tags = attrs["tags"] | {
            "optuna.study": self.study_name,
            "optuna.trial": str(trial.number),
            "worker": self.worker,
        }
        print(f"{self.study_name}: trial {trial.number}: {attrs['run_name']}", flush=True)
        # SIGTERM / SIGINT (`stop_on_signals`) end the process with the trial RUNNING, as Lightning's exit does in a
        # fit: it is retried once its heartbeat is stale, as a dead worker's. Optuna would fail it on a
        # KeyboardInterrupt (the run lost), and queueing it here as well would run it twice.
        try:
            run_id = run_seed(attrs["config"], self.exp_id, tags, attrs["run_name"], self.keep)
        except KeyboardInterrupt:
            raise SystemExit(1) from None
        trial.set_user_attr("mlflow_run_id", run_id)
        value = self.client.get_run(run_id).data.metrics[self.metric]
        done = len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) + 1
        total = len(self.study.user_attrs[ENQUEUED])
        print(
            f"{self.study_name}: trial {trial.number} done, {self.metric} {value:.4f}; {done}/{total} runs done"
        )
        return value

    def _on_stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        # the dead worker left its MLflow run RUNNING (on another machine no pid tells), or FAILED where a signal
        # stopped its fit: either way it is superseded by the retry, as a rerun supersedes an unfinished run
        for run in search(
            self.client, self.exp_id, {"optuna.study": self.study_name, "optuna.trial": str(trial.number)}
        ):
            if run.info.status in ("RUNNING", "FAILED"):
                self.client.set_terminated(run.info.run_id, "KILLED")
        self._retry(study, trial)


def _stop_when_empty(study: optuna.Study, trial: FrozenTrial) -> None:
    # without it `optimize` would ask the sampler for new trials once the queue is empty
    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.stop()


def join(
    storage: str,
    name: str,
    client: MlflowClient,
    exp_id: str,
    heartbeat_interval: int,
    grace_period: int | None,
) -> GridStudy:
    """This process as a worker of grid `name`, once the jobs are enqueued (or as the first worker, at once)."""
    pool = GridStudy(storage, name, client, exp_id, heartbeat_interval, grace_period)
    pool.wait_for_jobs()
    return pool
