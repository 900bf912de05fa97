"""`synaug`: LightningCLI for training (`fit`, `validate`, `test`, `predict`) and plain commands for the rest.

Training runs are configured by YAML under `configs/` (`synaug fit -c configs/classifiers/resnet18.yaml`);
the type-hinted `__init__` of the model and of `ClassificationData` is the schema, so a mistyped key is an
error that names it. Every run lands in MLflow with its resolved config, git commit and data fingerprints.
The other commands are functions whose signatures are their schema, with `-c config.yaml` as well.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.core import LightningModule

from synaug.classifiers.base import Classifier
from synaug.data import ClassificationData
from synaug.generators.base import GeneratorModule
from synaug.tracking import MLFlowLogger, git_commit, log_figure

CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"
COMMANDS = {
    "data audit": "synaug.data.audit:audit",
    "sample": "synaug.sampling:sample",
    # Before "generate": main() takes the first name that prefixes the arguments.
    "generate img2img": "synaug.generators.stable_diffusion.img2img:img2img",
    "generate --from-folder": "synaug.generators.external:import_folder",
    "generate": "synaug.generators.generate:generate",
    "quality": "synaug.evaluation.quality:quality",
    "explain": "synaug.evaluation.explain:explain",
    "experiment": "synaug.experiment.grid:experiment",
    "tune": "synaug.experiment.tune:tune",
}


class TrackRun(SaveConfigCallback):
    """Logs what makes a run reproducible and inspectable: the resolved config, the git commit, the data's
    fingerprints and per-class counts, and a grid of training images labelled real/synthetic."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        logger = trainer.logger
        if not isinstance(logger, MLFlowLogger):
            return
        client, run = logger.experiment, logger.run_id
        client.log_text(run, self.parser.dump(self.config, skip_none=False), "config.yaml")
        client.set_tag(run, "git_commit", git_commit())
        client.set_tag(run, "stage", trainer.state.fn.value)
        client.set_tag(run, "model", type(pl_module).__name__)
        dm = trainer.datamodule
        if isinstance(dm, ClassificationData):
            client.set_tag(run, "data.fingerprint", dm.fingerprint)
            client.set_tag(run, "data.train_fingerprint", dm.train_fingerprint)
            client.log_text(run, dm.counts.to_csv(), "data/counts.csv")
            client.log_metric(run, "data/skipped_images", len(dm.skipped))
            client.log_metric(run, "data/dropped_test_twins", dm.dropped_twins)
            if dm.skipped:
                client.log_text(run, "\n".join(map(str, dm.skipped)), "data/skipped_images.txt")
            log_figure(client, run, dm.preview_figure(), "data/train_grid.png")


class SynAugCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        super().__init__(
            LightningModule,
            ClassificationData,
            subclass_mode_model=True,
            save_config_callback=TrackRun,
            save_config_kwargs={"save_to_log_dir": False},
            trainer_defaults={
                "default_root_dir": "outputs",
                "logger": {"class_path": "synaug.tracking.MLFlowLogger"},
            },
            seed_everything_default=0,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        for source, target in [
            ("num_classes", "num_classes"),
            ("class_names", "class_names"),
            ("channels", "in_chans"),
            ("image_size", "image_size"),
        ]:
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool | None,
            default=None,
            help="After fit, evaluate the best checkpoint once on the test set (default: for a classifier; a "
            "generator has no test step).",
        )

    def before_instantiate_classes(self) -> None:
        # A classifier keeps its best checkpoint by validation macro-F1 (the one `test_after_fit` evaluates)
        # unless the config names a ModelCheckpoint. Added to the config, not to trainer_defaults (which every
        # model, generators included, would get on top of its own), so the logged config.yaml shows it.
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        module, _, name = cfg.model.class_path.rpartition(".")
        model = getattr(importlib.import_module(module), name)
        if cfg.get("test_after_fit") is None:
            cfg.test_after_fit = issubclass(model, Classifier)
        if issubclass(model, GeneratorModule) and cfg.trainer.limit_val_batches is None:
            # A generator has no validation loss: its sample grids (SampleGrid) show progress.
            cfg.trainer.limit_val_batches = 0
        callbacks = cfg.trainer.callbacks or []
        if issubclass(model, Classifier) and not any(
            c.class_path.endswith(".ModelCheckpoint") for c in callbacks
        ):
            checkpoint = Namespace(monitor="val/f1_macro", mode="max")
            cfg.trainer.callbacks = [*callbacks, Namespace(class_path=CHECKPOINT, init_args=checkpoint)]

    def after_fit(self) -> None:
        if self.config[self.subcommand].test_after_fit:
            best = self.trainer.checkpoint_callback and self.trainer.checkpoint_callback.best_model_path
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if best else None)
        print(results_note(self.trainer))

    def after_test(self) -> None:
        print(results_note(self.trainer))


def results_note(trainer) -> str:
    """Where a finished run's results are: its MLflow run, the command that shows it, its checkpoints."""
    lines = []
    logger = trainer.logger
    if isinstance(logger, MLFlowLogger):
        client = logger.experiment
        run = client.get_run(logger.run_id)
        experiment = client.get_experiment(run.info.experiment_id).name
        lines += [
            f"MLflow run {run.info.run_name} ({run.info.run_id}) in experiment {experiment}",
            f"  show it: mlflow ui --backend-store-uri {logger._tracking_uri}",
        ]
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        best = f" (best: {callback.best_model_path})" if callback.best_model_path else ""
        lines.append(f"checkpoints: {callback.dirpath}{best}")
    return "\n".join(["", "results:", *lines])


def run_function(fn: Callable, argv: list[str], prog: str):
    """Run a command function from the command line: its signature is the schema, `-c` reads YAML."""
    parser = ArgumentParser(prog=prog, description=inspect.getdoc(fn))
    parser.add_argument("-c", "--config", action=ActionConfigFile)
    parser.add_function_arguments(fn, as_positional=True)
    cfg = parser.instantiate_classes(parser.parse_args(argv))
    return fn(**{k: cfg[k] for k in inspect.signature(fn).parameters})


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["--dry_run=true" if a == "--dry-run" else a for a in argv]  # the usual spelling of the switch
    for name, target in COMMANDS.items():
        words = name.split()
        if argv[: len(words)] == words:
            module, fn = target.split(":")
            run_function(getattr(importlib.import_module(module), fn), argv[len(words) :], f"synaug {name}")
            return
    if argv in ([], ["-h"], ["--help"]):
        print(
            "usage: synaug {fit,validate,test,predict} -c CONFIG.yaml   (LightningCLI; `synaug fit --help`)\n"
            "       synaug {" + ",".join(COMMANDS) + "} [-c CONFIG.yaml] ...   (`synaug COMMAND --help`)"
        )
        return
    SynAugCLI(args=argv)


if __name__ == "__main__":
    main()
