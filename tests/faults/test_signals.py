"""SIGTERM and SIGINT of `synaug experiment` in the middle of a fit: it stops at once, says how many runs finished
and how to resume, exits 128 + the signal, and marks its parent run KILLED (not FINISHED, not a silent 0)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

SYNAUG = Path(sys.executable).with_name("synaug")


def grid(breast_npz, tmp_path, name: str) -> None:
    config = {
        "name": name,
        "base": {
            "data": {"root": str(breast_npz), "image_size": 28, "batch_size": 64},
            "trainer": {
                "max_epochs": 1,
                "limit_train_batches": 2,
                "enable_progress_bar": False,
                "callbacks": [{"class_path": "hang.HangInFit"}],
            },
        },
        "classifiers": {
            "cnn": {
                "model": {
                    "class_path": "synaug.classifiers.ImageClassifier",
                    "init_args": {"backbone": "basic_cnn"},
                }
            }
        },
        "seeds": 3,
    }
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(config))


def start(tmp_path, **env) -> subprocess.Popen:
    env = os.environ | {"HANG_DIR": str(tmp_path), **env}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [str(SYNAUG), "experiment", "-c", "grid.yaml"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow  # real `synaug` processes: their imports dominate
def test_sigkill_of_a_grid_then_the_same_command_finishes_it(breast_npz, tmp_path, figures):
    name = "killed-grid"
    grid(breast_npz, tmp_path, name)
    proc = start(tmp_path, HANG_AT_FIT="2")
    try:
        deadline = time.time() + 300
        while not (tmp_path / "fitting").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    again = start(tmp_path, HANG_AT_FIT="0")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    assert f"{name}: 1 cells x 3 seeds; 2 runs to train, 1 done" in out
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    seeds = client.search_runs([exp.experiment_id], "tags.level = 'seed'")
    assert sorted(r.info.status for r in seeds) == ["FINISHED"] * 3 + ["KILLED"]
    figures(
        "faults survived",
        "SIGKILL during `synaug experiment`, same command again",
        "1 finished run kept, the killed one marked KILLED and redone, report written",
    )


@pytest.mark.slow  # real `synaug` processes: their imports dominate
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_experiment_stops_and_says_how_to_resume(breast_npz, tmp_path, signum, figures):
    name = f"signalled-{signum.name}"
    grid(breast_npz, tmp_path, name)
    env = os.environ | {"HANG_DIR": str(tmp_path), "HANG_AT_FIT": "2"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [str(SYNAUG), "experiment", "-c", "grid.yaml"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while not (tmp_path / "fitting").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, out[-3000:]
    line = next(x for x in out.splitlines() if x.startswith(f"{name}: stopped by {signum.name}"))
    assert "1 of 3 runs finished" in line and "same command" in line
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    (parent,) = client.search_runs([exp.experiment_id], "tags.level = 'experiment'")
    assert parent.info.status == "KILLED"
    figures("faults survived", f"{signum.name} during `synaug experiment`", f"exit {proc.returncode}: {line}")


@pytest.mark.slow  # real `synaug` processes: their imports dominate
def test_sigterm_in_the_generator_stage_stops_and_says_how_to_resume(breast_npz, tmp_path, figures):
    name = "signalled-generator"
    grid(breast_npz, tmp_path, name)
    config = yaml.safe_load((tmp_path / "grid.yaml").read_text())
    config["base"]["trainer"].pop("callbacks")  # the hang is in the generator's fit, the first of the process
    config["real_fractions"] = [0.1]
    config["synthetic"] = {
        "diffusion": {
            "train": str(Path(__file__).parents[2] / "configs" / "generators" / "diffusion_tiny.yaml"),
            "overrides": {"trainer": {"max_steps": 4, "callbacks": [{"class_path": "hang.HangInFit"}]}},
            "sampler": {"steps": 2},
        }
    }
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(config))
    proc = start(tmp_path, HANG_AT_FIT="1")
    try:
        deadline = time.time() + 300
        while not (tmp_path / "fitting").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    line = next(
        x for x in out.splitlines() if x.startswith(f"{name}: stopped by SIGTERM in the generator stage")
    )
    assert "0 of 3 generator steps finished" in line and "same command" in line
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    (parent,) = client.search_runs([exp.experiment_id], "tags.level = 'experiment'")
    (generator,) = client.search_runs([exp.experiment_id], "tags.level = 'generator'")
    assert parent.info.status == "KILLED" and generator.info.status == "KILLED"
    figures(
        "faults survived", "SIGTERM during a generator fit inside `synaug experiment`", f"exit 143: {line}"
    )
