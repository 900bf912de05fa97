"""`synaug experiment`'s console: by default one progress display and each run's output in its own log file
(also on its MLflow run); `-v` brings the runs' output back; a failed run shows the end of its log."""

import io
import logging
import os
from pathlib import Path

import lightning.pytorch as L
import mlflow
import pytest
import yaml

from synaug.cli import main
from synaug.experiment.console import to_log
from synaug.experiment.runs import search

CNN = {
    "model": {
        "class_path": "synaug.classifiers.ImageClassifier",
        "init_args": {"backbone": "basic_cnn", "model_kwargs": {"hidden": [32, 16]}},
    }
}
# what Lightning prints during a run: its INFO notices and the test table
NOISE = ("Seed set to", "GPU available", "Restoring states", "Test metric", "DataLoader 0", "┏")


def write_config(tmp_path: Path, breast_npz: Path, name: str, seeds: int, synthetic: bool) -> Path:
    config = {
        "name": name,
        "base": {
            "data": {"root": str(breast_npz), "image_size": 28, "batch_size": 64},
            "trainer": {"max_epochs": 1, "limit_train_batches": 2, "enable_progress_bar": False},
        },
        "classifiers": {"cnn": CNN},
        "seeds": seeds,
        "out": str(tmp_path / "report"),
        "controls": False,
    }
    if synthetic:
        folder = str(tmp_path / "synthetic" / "t-{real}-{subset_seed}")
        config["synthetic"] = {
            "transform": {"folders": [folder], "ratios": [0.25], "augment_classes": ["malignant"]}
            | {"transform": "hflip"}
        }
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "grid.yaml"


@pytest.fixture
def quick(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_default_console_is_one_display_and_each_run_logs_to_its_file(breast_npz, tmp_path, quick, capfd):
    config = write_config(tmp_path, breast_npz, "console", seeds=2, synthetic=True)
    main(["experiment", "-c", str(config)])
    out, err = capfd.readouterr()
    assert not [n for n in NOISE if n in out + err], out + err
    progress = [line for line in out.splitlines() if line.startswith("progress: ")]
    assert [p.split(";")[0] for p in progress] == [f"progress: classifier runs {i}/4" for i in (1, 2, 3, 4)]
    assert "last: cnn/none/real=1/transform@0.25 seed 1 test/f1_macro 0." in progress[-1]
    # the report is the command's output; beside it a few lines (data warnings, the transform folders, the plan,
    # the progress lines, where the results are): on main each run added its Lightning lines and test table
    report = set((tmp_path / "report" / "report.md").read_text().splitlines())
    other = [line for line in (out + err).split("\n") if line.strip() and line not in report]
    assert len(other) <= 20, other

    logs = tmp_path / "report" / "logs"
    names = ["cnn_none_real=1_none_seed_0.log", "cnn_none_real=1_none_seed_1.log"]
    names += ["cnn_none_real=1_transform@0.25_seed_0.log", "cnn_none_real=1_transform@0.25_seed_1.log"]
    assert sorted(p.name for p in logs.iterdir()) == names
    for log in logs.iterdir():  # what the console was spared, the INFO notices included
        text = log.read_text()
        assert "Seed set to" in text and "Test metric" in text and "test/f1_macro" in text

    client = mlflow.MlflowClient()
    exp_id = client.get_experiment_by_name("console").experiment_id
    for run in search(client, exp_id, {"level": "seed", "experiment": "console"}):
        (artifact,) = client.list_artifacts(run.info.run_id, "logs")
        seed = run.data.tags["seed"]
        assert artifact.path == f"logs/{run.data.tags['cell'].replace('/', '_')}_seed_{seed}.log"
    (parent,) = search(client, exp_id, {"level": "experiment", "experiment": "console"})
    assert "report/logs" not in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}


def test_verbose_brings_the_runs_output_back(breast_npz, tmp_path, quick, capfd):
    config = write_config(tmp_path, breast_npz, "console-verbose", seeds=1, synthetic=False)
    main(["experiment", "-c", str(config), "-v"])
    out, _ = capfd.readouterr()
    assert "[1/1] cnn/none/real=1/none seed 0" in out and "Test metric" in out
    assert not (tmp_path / "report" / "logs").exists()


def test_a_failed_run_shows_the_end_of_its_log_and_its_path(breast_npz, tmp_path, quick, capfd, monkeypatch):
    def fit(self, *args, **kwargs):
        print("fitting, then failing")
        raise RuntimeError("boom")

    monkeypatch.setattr(L.Trainer, "fit", fit)
    config = write_config(tmp_path, breast_npz, "console-failed", seeds=1, synthetic=False)
    with pytest.raises(RuntimeError, match="boom"):
        main(["experiment", "-c", str(config)])
    _, err = capfd.readouterr()
    log = tmp_path / "report" / "logs" / "cnn_none_real=1_none_seed_0.log"
    assert f"cnn/none/real=1/none seed 0 failed; the end of its log ({log}):" in err
    assert "  fitting, then failing" in err and "  RuntimeError: boom" in err
    assert "Traceback" in log.read_text()


def test_a_log_block_takes_every_stream_and_gives_them_back(tmp_path, capfd):
    logger = logging.getLogger("synaug.tests.late")
    logger.propagate = False
    stale = logging.getLogger("synaug.tests.stale")
    # as pytest's capture of an earlier test
    stale.addHandler(gone := logging.StreamHandler(io.TextIOWrapper(io.BytesIO())))
    gone.stream.close()
    with to_log(tmp_path / "run.log"):
        print("printed")
        os.write(2, b"written to descriptor 2\n")  # as C++ code or a DataLoader worker does
        logger.addHandler(handler := logging.StreamHandler())  # as a library's first import makes one
        logger.warning("logged")
    # the first version left that handler on the closed log, and flushed the stale one: the next block failed
    logger.warning("logged after")
    with to_log(tmp_path / "next.log"):
        logger.warning("logged in the next block")
    logger.removeHandler(handler)
    stale.removeHandler(gone)
    assert (tmp_path / "run.log").read_text() == "printed\nwritten to descriptor 2\nlogged\n"
    assert (tmp_path / "next.log").read_text() == "logged in the next block\n"
    assert capfd.readouterr().err == "logged after\n"


def test_a_handler_shared_by_loggers_gets_its_stream_back(tmp_path):
    console = io.StringIO()
    # one handler on several loggers, as MLflow's is on its own, SQLAlchemy's, alembic's and huey's
    shared = logging.StreamHandler(console)
    loggers = [logging.getLogger(f"synaug.tests.shared{i}") for i in range(2)]
    for lg in loggers:
        lg.propagate = False
        lg.addHandler(shared)
    with to_log(tmp_path / "run.log"):
        loggers[0].warning("in the block")
    loggers[1].warning("after the block")  # the first version wrote this to the closed log: "Logging error"
    for lg in loggers:
        lg.removeHandler(shared)
    assert shared.stream is console and console.getvalue() == "after the block\n"
    assert (tmp_path / "run.log").read_text() == "in the block\n"
