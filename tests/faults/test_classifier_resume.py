"""SIGKILL during `synaug fit` of a classifier: the run left RUNNING is marked KILLED by the next command that
opens its experiment; `--ckpt_path last.ckpt` continues the same MLflow run (its id is in the checkpoint), with
the best-so-far score restored, so that `test_after_fit` tests the best checkpoint of the whole fit."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from synaug.tracking import MLFlowLogger

SYNAUG = Path(sys.executable).with_name("synaug")


def fit(cwd: Path, npz: Path, name: str, *extra: str, **env: str) -> subprocess.Popen:
    environment = os.environ | env
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).parent), environment.get("PYTHONPATH", "")]
    )
    args = ["fit", "--model", "synaug.classifiers.ImageClassifier", "--model.backbone", "basic_cnn"]
    args += ["--data.root", str(npz), "--data.image_size", "28", "--trainer.max_epochs", "3"]
    args += ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.experiment_name", name]
    log = (cwd / "fit.log").open("a")
    return subprocess.Popen(
        [str(SYNAUG), *args, *extra], cwd=cwd, env=environment, stdout=log, stderr=subprocess.STDOUT
    )


@pytest.mark.slow  # real `synaug` processes: their imports dominate
def test_sigkill_then_resume_continues_the_run_with_its_best_score(breast_npz, tmp_path, figures):
    name, marker = "resume-classifier", tmp_path / "hanging"
    killed = fit(
        tmp_path,
        breast_npz,
        name,
        "--trainer.callbacks+=hang.HangAfterFirstCheckpoint",
        HANG_MARKER=str(marker),
    )
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert killed.poll() is None and time.time() < deadline, (tmp_path / "fit.log").read_text()[
                -3000:
            ]
            time.sleep(0.1)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    finally:
        if killed.poll() is None:
            killed.kill()
    client = mlflow.MlflowClient()
    exp_id = client.get_experiment_by_name(name).experiment_id
    (run,) = client.search_runs([exp_id])
    assert run.info.status == "RUNNING"  # what SIGKILL leaves behind
    MLFlowLogger(experiment_name=name)  # the next command opening the experiment
    assert client.get_run(run.info.run_id).info.status == "KILLED"

    dirpath = Path(marker.read_text().split()[1])
    assert (tmp_path / dirpath / "last.ckpt").is_file()  # written for a classifier without asking
    resumed = fit(tmp_path, breast_npz, name, "--ckpt_path", str(dirpath / "last.ckpt"))
    assert resumed.wait(timeout=300) == 0, (tmp_path / "fit.log").read_text()[-3000:]
    (again,) = client.search_runs([exp_id])  # one run, continued: not a second one
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val/f1_macro")
    assert sorted(m.step for m in history) == [1, 3, 5]  # epochs 0, 1, 2 in one run
    assert "test/f1_macro" in again.data.metrics
    ckpt = torch.load(tmp_path / dirpath / "last.ckpt", map_location="cpu", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if "'monitor': 'val/f1_macro'" in k]  # the best's
    assert float(state["best_model_score"]) == max(m.value for m in history)  # the best of the whole fit
    figures(
        "faults survived",
        "SIGKILL during classifier fit, resumed from last.ckpt",
        "run marked KILLED, then continued: one MLflow run, 3 epochs, best score of the whole fit tested",
    )
