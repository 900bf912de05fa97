"""Grid workers (`synaug.experiment.workers`) in one process, on an SQLite Optuna store: what a worker does when it
joins a grid whose runs are all done, or one that was enqueued under another config. The multi-process case, a
killed worker included, is tests/experiment/test_workers_postgres.py."""

import threading
import time
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from synaug.experiment import experiment
from synaug.experiment.workers import ENQUEUED, GridStudy

CNN = {
    "cnn": {
        "model": {
            "class_path": "synaug.classifiers.ImageClassifier",
            "init_args": {"backbone": "basic_cnn", "model_kwargs": {"hidden": [32, 16]}},
        }
    }
}


def tiny_base(npz) -> dict:
    trainer = {
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 2,
        "enable_progress_bar": False,
    }
    return {"data": {"root": str(npz), "image_size": 28, "batch_size": 64}, "trainer": trainer}


def test_a_late_worker_leaves_the_report_to_the_last_one_and_a_changed_grid_is_refused(
    breast_npz, tmp_path, capsys
):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    name = f"workers-{uuid.uuid4().hex[:8]}"
    report = tmp_path / "report"
    args = dict(
        name=name, base=tiny_base(breast_npz), classifiers=CNN, seeds=1, controls=False, out=str(report)
    )
    parent = experiment(**args, storage=storage, heartbeat_interval=1)
    study = optuna.load_study(study_name=f"{name}:grid", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    assert (report / "summary.csv").is_file()

    (report / "summary.csv").unlink()
    capsys.readouterr()
    assert experiment(**args, storage=storage, heartbeat_interval=1) == parent  # nothing left to train
    assert "the report is written by worker" in capsys.readouterr().out
    assert not (report / "summary.csv").exists()
    assert len(optuna.load_study(study_name=f"{name}:grid", storage=storage).trials) == 1

    with pytest.raises(ValueError, match="runs the study was not given"):  # a second seed: another grid
        experiment(**args | {"seeds": 2}, storage=storage, heartbeat_interval=1)
    with pytest.raises(ValueError, match="start more workers"):  # not silently one process at a time
        experiment(**args, storage=storage, workers=2)


def test_a_worker_waits_for_a_live_first_worker_and_not_for_a_dead_one(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = GridStudy(storage, "grid", None, None, heartbeat_interval=1)
    later = GridStudy(storage, "grid", None, None, heartbeat_interval=1, grace_period=3)
    assert first.first and not later.first
    waiting = threading.Thread(target=later.wait_for_jobs)
    waiting.start()
    time.sleep(5)  # longer than the grace period: the first worker's heartbeat keeps the later one waiting
    assert waiting.is_alive()
    first.study.set_user_attr(ENQUEUED, [])
    first._enqueued.set()
    waiting.join(timeout=10)
    assert not waiting.is_alive()

    dead = GridStudy(storage, "other", None, None, heartbeat_interval=1)
    dead._enqueued.set()  # its heartbeat stops as if the process had died before enqueuing
    later = GridStudy(storage, "other", None, None, heartbeat_interval=1, grace_period=2)
    errors = []

    def wait() -> None:
        try:
            later.wait_for_jobs()
        except RuntimeError as e:
            errors.append(str(e))

    waiting = threading.Thread(target=wait, daemon=True)  # bounded: waiting forever is the failure
    waiting.start()
    waiting.join(timeout=20)
    assert not waiting.is_alive() and "the first worker stopped before it enqueued the runs" in errors[0]
