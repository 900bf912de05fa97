"""LightningCLI for training (`synaug fit`, `validate`, `test`, `predict`): synaug's defaults and provenance.

Training runs are configured by YAML under `configs/` (`synaug fit -c configs/classifiers/resnet18.yaml`);
the type-hinted `__init__` of the model and of `ClassificationData` is the schema, so a mistyped key is an
error that names it. Every run lands in MLflow with its resolved config, its distinguishing params, git commit,
data fingerprints and datasets. Imported only by the commands that train (`synaug --help` stays light).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.core import LightningModule

from synaug.data import ClassificationData

# The classifier and generator bases, timm and MLflow are imported where used: `synaug fit --help` builds the
# parser from the signatures of the Trainer and of ClassificationData only.

CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"


class TrackRun(SaveConfigCallback):
    """Logs what makes a run reproducible and inspectable: the resolved config, the git commit, the data's
    fingerprints and per-class counts, and a grid of training images labelled real/synthetic."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        from synaug.tracking import MLFlowLogger, git_commit, log_datasets, run_params

        logger = trainer.logger
        if not isinstance(logger, MLFlowLogger):
            return
        client, run = logger.experiment, logger.run_id
        logger.start_system_metrics()
        client.log_text(run, self.parser.dump(self.config, skip_none=False), "config.yaml")
        client.set_tag(run, "git_commit", git_commit())
        client.set_tag(run, "stage", trainer.state.fn.value)
        client.set_tag(run, "model", type(pl_module).__name__)
        # What tells this run from another in the UI's compare view (optimizer and its settings, epochs,
        # precision, ...): the module's own hyperparameters leave the optimizer and the trainer out.
        logger.log_hyperparams(run_params(self.config) | {"trainer.precision": trainer.precision})
        dm = trainer.datamodule
        if isinstance(dm, ClassificationData):
            client.set_tag(run, "data.fingerprint", dm.fingerprint)
            client.set_tag(run, "data.train_fingerprint", dm.train_fingerprint)
            client.log_text(run, dm.counts.to_csv(), "data/counts.csv")
            client.log_table(run, dm.counts.reset_index(), "data/counts.json")
            log_datasets(client, run, dm)
            client.log_metric(run, "data/skipped_images", len(dm.skipped))
            client.log_metric(run, "data/dropped_test_twins", dm.dropped_twins)
            if dm.skipped:
                client.log_text(run, "\n".join(map(str, dm.skipped)), "data/skipped_images.txt")
            client.log_image(run, dm.preview_image(), "data/train_grid.png")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # A resumed fit (`--ckpt_path`) continues this run: its metrics, its checkpoint folder, its best score.
        from synaug.tracking import MLFlowLogger

        if isinstance(trainer.logger, MLFlowLogger):
            checkpoint["mlflow_run_id"] = trainer.logger.run_id


def resumed_run(ckpt_path) -> str | None:
    """The MLflow run a checkpoint was written by (`TrackRun`), if it names one."""
    if not ckpt_path or not Path(ckpt_path).is_file():
        return None  # Lightning's "last" / "best" / "hpc", or a missing file it reports itself
    return torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("mlflow_run_id")


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
                "plugins": [{"class_path": "synaug.utils.AtomicCheckpointIO"}],  # no truncated .ckpt, ever
                # ClassificationData shards its loaders across DDP ranks itself (Lightning's sampler cannot
                # reach its in-memory batches, and would pad evaluation with repeated images).
                "use_distributed_sampler": False,
                # The layer table (and its "Total FLOPs: 0") only when Lightning's log is verbose (`synaug -v`).
                "enable_model_summary": logging.getLogger(
                    "lightning.pytorch.utilities.rank_zero"
                ).isEnabledFor(logging.INFO),
            },
            seed_everything_default=0,
            # "usage: synaug fit ..." however it was started (python -m, a script): the help is also cached
            parser_kwargs={"prog": "synaug"},
            args=args,
            run=run,
        )

    def parse_arguments(self, parser, args) -> None:
        # synaug always hands LightningCLI its words (main() has read and trimmed sys.argv; a grid passes each
        # cell's): Lightning's warning about `args` given beside a non-empty sys.argv is about another use.
        self.config = (
            parser.parse_object(args) if isinstance(args, dict | Namespace) else parser.parse_args(args)
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
        from synaug.classifiers.base import Classifier
        from synaug.generators.base import GeneratorModule

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
            # The best first: `trainer.checkpoint_callback` (what test_after_fit tests) is the first one. The
            # resume point is a second callback writing last.ckpt every epoch: ModelCheckpoint(save_last=True)
            # rewrites last.ckpt only in epochs that improve the best, so a kill after epochs that did not
            # improve would resume from an older epoch and redo them (and log their metrics twice). The best is
            # tested, never resumed from: its weights only (45 MB for ResNet-18 where Adam's state makes 134).
            best = Namespace(monitor="val/f1_macro", mode="max", save_weights_only=True)
            last = Namespace(filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
            cfg.trainer.callbacks = [
                *callbacks,
                Namespace(class_path=CHECKPOINT, init_args=best),
                Namespace(class_path=CHECKPOINT, init_args=last),
            ]
        logger = cfg.trainer.logger
        if (
            isinstance(logger, Namespace)
            and logger.class_path == "synaug.tracking.MLFlowLogger"
            and not logger.init_args.get("run_name")
        ):
            logger.init_args.run_name = run_name(cfg)
        if (
            self.subcommand == "fit"
            and isinstance(logger, Namespace)
            and logger.class_path == "synaug.tracking.MLFlowLogger"
            and not logger.init_args.get("run_id")
            and (run_id := resumed_run(cfg.ckpt_path))
        ):
            logger.init_args.run_id = run_id

    def after_fit(self) -> None:
        if self.config[self.subcommand].test_after_fit:
            best = self.trainer.checkpoint_callback and self.trainer.checkpoint_callback.best_model_path
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if best else None)
        if self.trainer.is_global_zero:  # under DDP the other ranks have no MLflow run to name
            print(results_note(self.trainer))

    def after_test(self) -> None:
        if self.trainer.is_global_zero:
            print(results_note(self.trainer))


def run_name(cfg) -> str:
    """A run's default name from what tells it apart: the model, the image size and the data's mix, e.g.
    `resnet18-64px-real0.05-hflip` (a config's fixed name would be wrong as soon as an override changes it)."""
    model, data = cfg.model.init_args, cfg.data
    parts = [model.get("backbone") or cfg.model.class_path.rsplit(".", 1)[-1].lower()]
    if model.get("head"):
        parts.append(model.head)
    parts.append(f"{data.image_size}px")
    if data.real_count:
        parts.append("real" + "_".join(f"{c}{n}" for c, n in data.real_count.items()))
    elif data.real_fraction != 1.0:
        fraction = data.real_fraction
        parts.append(
            "real"
            + (
                "_".join(f"{c}{f:g}" for c, f in fraction.items())
                if isinstance(fraction, dict)
                else f"{fraction:g}"
            )
        )
    if data.synthetic and data.synthetic_ratio:
        ratio = data.synthetic_ratio
        parts.append(
            "syn"
            + ("_".join(f"{c}{r:g}" for c, r in ratio.items()) if isinstance(ratio, dict) else f"{ratio:g}")
        )
    if data.policy != "none":
        parts.append(str(data.policy))
    return "-".join(parts)


def results_note(trainer) -> str:
    """Where a finished run's results are: its MLflow run, the command that shows it, its checkpoints."""
    from synaug.tracking import MLFlowLogger, run_note

    lines = []
    logger = trainer.logger
    if isinstance(logger, MLFlowLogger):
        lines += run_note(logger._tracking_uri, logger.run_id)
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        best = f" (best: {callback.best_model_path})" if callback.best_model_path else ""
        lines.append(f"checkpoints: {callback.dirpath}{best}")
    return "\n".join(["", "results:", *lines])
