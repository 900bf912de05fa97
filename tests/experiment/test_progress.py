"""The progress line: counts done of each kind of step, and an ETA from the known seconds per step, else from
the pace so far (never nan)."""

import math

from synaug.experiment.grid import Progress


def test_eta_from_known_costs(capsys):
    p = Progress(
        {"generator trainings": 3, "generations": 3}, {"generator_train_s": 60.0, "generation_s": 30.0}
    )
    p.done("generator trainings")
    line = capsys.readouterr().out
    assert "generator trainings 1/3, generations 0/3" in line and "ETA 3.5 min" in line  # 2 x 60 s + 3 x 30 s


def test_eta_from_the_pace_when_a_cost_is_unknown(capsys, monkeypatch):
    clock = iter([0.0, 120.0])
    monkeypatch.setattr("synaug.experiment.grid.time.monotonic", lambda: next(clock))
    p = Progress({"classifier runs": 4}, {"classifier_s": math.nan})
    p.done("classifier runs")
    assert "classifier runs 1/4; elapsed 2.0 min, ETA 6.0 min" in capsys.readouterr().out
