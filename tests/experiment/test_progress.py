"""The progress display: counts done of each kind of step, an ETA from the known seconds per step, else from the
pace so far (never nan), the last result; one line per finished step, or one line redrawn in place."""

import math

from synaug.experiment.console import Progress


def test_eta_from_known_costs(capsys):
    p = Progress(
        {"generator trainings": 3, "generations": 3}, {"generator_train_s": 60.0, "generation_s": 30.0}
    )
    p.done("generator trainings", "diffusion real=1 subset 0 trained in 1.0 min")
    line = capsys.readouterr().out
    assert "generator trainings 1/3, generations 0/3" in line and "ETA 3.5 min" in line  # 2 x 60 s + 3 x 30 s
    assert line.rstrip().endswith("; last: diffusion real=1 subset 0 trained in 1.0 min")


def test_eta_from_the_pace_when_a_cost_is_unknown(capsys, monkeypatch):
    clock = iter([0.0, 120.0, 240.0])
    monkeypatch.setattr("synaug.experiment.console.time.monotonic", lambda: next(clock))
    p = Progress({"classifier runs": 2, "generations": 0}, {"classifier_s": math.nan})
    p.done("classifier runs")
    p.done("classifier runs")
    # main printed `ETA nan min` once every run was done, and the kinds with nothing to do
    assert capsys.readouterr().out.splitlines() == [
        "progress: classifier runs 1/2; elapsed 2.0 min, ETA 2.0 min",
        "progress: classifier runs 2/2; elapsed 4.0 min, ETA 0.0 min",
    ]


def test_on_a_terminal_one_line_is_redrawn_in_place(capsys):
    p = Progress({"classifier runs": 2}, {"classifier_s": 60.0}, live=True)
    p.started("cnn/none/real=1/none seed 0")
    p.done("classifier runs", "cnn/none/real=1/none seed 0 test/f1_macro 0.700")
    p.started("cnn/none/real=1/none seed 1")
    p.close()
    out = capsys.readouterr().out
    assert "progress:" not in out and out.count("\n") <= 1  # one line, redrawn after a carriage return
    draws = [d.rstrip() for d in out.strip().split("\r") if d.strip()]
    assert (
        draws[0] == "classifier runs 0/2; elapsed 0.0 min, ETA 2.0 min; running: cnn/none/real=1/none seed 0"
    )
    assert draws[-1].startswith(
        "classifier runs 1/2; elapsed 0.0 min, ETA 1.0 min; last: cnn/none/real=1/none"
    )
    assert draws[-1].endswith("seed 0 test/f1_macro 0.700; running: cnn/none/real=1/none seed 1")
