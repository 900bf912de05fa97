"""synaug from Python (a script, a notebook): the CLI's commands as functions, with the same provenance.

`fit` runs exactly what `synaug fit -c CONFIG` runs (LightningCLI with synaug's defaults: the resolved config,
git commit, data fingerprints and datasets, the training-image grid in MLflow, the best checkpoint tested after
fit), with overrides given as nested dicts instead of `--data.real_fraction 0.05`.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class FitResult:
    """Where a finished `fit` or `test` is: its MLflow run, its metrics and its best checkpoint."""

    run_id: str | None
    run_name: str | None
    experiment: str | None
    tracking_uri: str | None
    metrics: dict[str, float]
    checkpoint: str | None
    model: Any
    trainer: Any


def _cli_args(config: str | Path | dict, overrides: dict) -> list[str]:
    # Each part is a `-c` of its own, merged in order as jsonargparse merges config files: a dict is YAML (JSON).
    args = ["-c", str(config) if isinstance(config, str | Path) else json.dumps(config)]
    return [*args, "-c", json.dumps(overrides)] if overrides else args


def fit(config: str | Path | dict, **overrides) -> FitResult:
    """Train as `synaug fit` does; `config` is a YAML path or the same as a dict, `overrides` nested dicts that
    replace its values, e.g. `fit("configs/quickstart.yaml", data={"real_fraction": 0.05},
    trainer={"max_epochs": 2})`. Classifiers are tested on the best checkpoint after fit (`test_after_fit`)."""
    return _run("fit", config, overrides)


def test(config: str | Path | dict, ckpt_path: str | Path, **overrides) -> FitResult:
    """Evaluate a checkpoint on the test set as `synaug test -c CONFIG --ckpt_path CKPT` does (a run of its own)."""
    return _run("test", config, {**overrides, "ckpt_path": str(ckpt_path)})


def _run(verb: str, config, overrides: dict) -> FitResult:
    from synaug.tracking import MLFlowLogger
    from synaug.training import SynAugCLI

    cli = SynAugCLI(args=[verb, *_cli_args(config, overrides)])
    trainer, logger = cli.trainer, cli.trainer.logger
    run_id = run_name = experiment = uri = None
    if isinstance(logger, MLFlowLogger):
        run = logger.experiment.get_run(logger.run_id)
        run_id, run_name, uri = run.info.run_id, run.info.run_name, logger._tracking_uri
        experiment = logger.experiment.get_experiment(run.info.experiment_id).name
    callback = trainer.checkpoint_callback
    best = (callback.best_model_path or None) if callback is not None else None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return FitResult(run_id, run_name, experiment, uri, metrics, best, cli.model, trainer)


def run_experiment(config: str | Path | dict, **overrides) -> str:
    """Run a grid as `synaug experiment -c CONFIG` does (cells x seeds, then the report); returns the parent
    MLflow run id. (Not `synaug.experiment`: that is the package that implements it.)"""
    return _command("experiment", config, overrides)


def tune(config: str | Path | dict, **overrides):
    """Tune the synthetic ratio as `synaug tune -c CONFIG` does; returns the best Optuna trial."""
    return _command("tune", config, overrides)


def _command(name: str, config, overrides: dict):
    from synaug.cli import COMMANDS, run_function

    module, fn = COMMANDS[name].split(":")
    return run_function(
        getattr(importlib.import_module(module), fn), _cli_args(config, overrides), f"synaug {name}"
    )


def load_classifier(path: str | Path):
    """A trained `ImageClassifier` from its checkpoint, in eval mode on the CPU (`weights_only`: no unpickling)."""
    from synaug.classifiers.finetune import load_classifier

    return load_classifier(path)
