"""`synaug tune`: an Optuna study of the per-class synthetic ratio (and optionally the real fraction, the augmented
classes and the conventional policy), maximising a validation metric averaged over k seeds.

    synaug tune -c experiments/tune_breastmnist/config.yaml

- Objective: each trial trains seeds 0..k-1 (real subsets as in `synaug experiment`) on the training set,
  validating each epoch; its value is the mean over seeds of the validation metric at the epoch the checkpoint
  callback keeps (best val/f1_macro by default), the model a test would use. The test set is never read.
- Pruning: the metric is reported each epoch at step `seed * max_epochs + epoch`. Every trial runs the same seeds
  in the same order, so a step means the same thing across trials; the median pruner stops a trial that falls
  below the median of earlier trials at the same step, once a seed has trained `warmup_epochs`.
- Storage: an RDB URL, SQLite under mlruns/ by default; the study is loaded by name, so the same command resumes
  it, and processes sharing a PostgreSQL URL work on one study (`n_trials` counts trials of the whole study; a
  race at the end may add up to one trial per extra process). Each process keeps a heartbeat per running trial:
  a trial whose process died is marked FAIL `grace_period` seconds after its last heartbeat by the next process
  that starts a trial, and queued again with its parameters (at most `max_retry` times). Several
  processes starting together on a new SQLite file take turns creating its tables and the study (a file lock,
  as for a new MLflow store); on a new server database, create the study first (`optuna create-study --storage
  URL --study-name NAME --direction maximize`).
- MLflow (experiment `name`): one run per trial (tags optuna.study, optuna.trial, worker, state; the trial's
  params, `intermediate` per step, `objective/seed` and `objective`), each with one child run per seed (the
  Lightning run: its per-epoch validation metrics). The best trial's run is tagged best=true.
- Reference: before the first trial, the configuration without synthetic images is trained over the same seeds
  (MLflow run tagged level=reference; its value is the study's user attribute `reference`), so a tuned ratio is
  always read against no synthetic data. A trial proposing a configuration already evaluated (on a grid, the
  sampler repeats itself) reuses its value (user attribute `reused_from`) rather than training it again.
- Learned generators: a source with `train:` (as an entry of `synaug experiment`'s `synthetic:`) is trained,
  sampled and quality-checked before the reference, once per (real setting, real subset) the seeds use, on that
  subset's training images only, with as many images per class as the largest ratio of `ratio` needs; every
  trial draws its ratio from that pool. It is the grid's generator stage (`synaug.experiment.generators`), with
  its cache (`outputs/generators/<generator_cache>/<generator>/real<real>-subset<s>/<hash>/`) and its MLflow
  runs (level=generator, here top-level runs tagged optuna.study; each seed run names its `generator_run`). A
  `generate:` source (img2img, training-free) goes through the same stage with nothing to train.
- Then the best configuration is trained over `evaluate_seeds` seeds and tested once against its baseline
  without synthetic images, through `synaug experiment` (MLflow experiment `<name>-test`). With several
  processes, give them `--evaluate_seeds 0` and evaluate once the study is done: the same command again runs
  no more trials, only the evaluation.
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

import lightning.pytorch as L
import numpy as np
import optuna
from mlflow import MlflowClient
from mlflow.entities import Param
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState

from synaug import stats
from synaug.cli import SynAugCLI
from synaug.data.transforms import Policy
from synaug.experiment import generators
from synaug.experiment.grid import Cell, Synthetic, check_base, experiment, merge, prepare, run_config
from synaug.experiment.runs import log_counts, search
from synaug.tracking import STORE, experiment_id, git_commit, rdb_storage, tracking_uri

Report = Callable[[int, float], bool]  # (epoch, value) -> prune?
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)


class ReportMetric(L.Callback):
    """After each validation epoch: keep the logged metrics, report `metric` to the trial, stop when it is pruned.

    Stopping (rather than raising from inside the trainer) lets Lightning end the run cleanly; `fit_seed` then
    raises `optuna.TrialPruned`.
    """

    def __init__(self, metric: str, report: Report):
        self.metric, self.report = metric, report
        self.history: list[dict[str, float]] = []
        self.pruned = False

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if self.metric not in metrics:
            raise KeyError(
                f"{self.metric!r} is not logged; validation logs {sorted(k for k in metrics if k.startswith('val/'))}"
            )
        self.history.append(metrics)
        if self.report(trainer.current_epoch, metrics[self.metric]):
            self.pruned = True
            trainer.should_stop = True


def fit_seed(config: dict, metric: str, report: Report) -> float:
    """Train one seed (a LightningCLI config) without testing; returns `metric` at the epoch the checkpoint keeps."""
    cli = SynAugCLI(args=config, run=False)
    trainer = cli.trainer
    tracker = ReportMetric(metric, report)
    trainer.callbacks.append(tracker)
    trainer.fit(cli.model, datamodule=cli.datamodule)
    log_counts(trainer.logger.experiment, trainer.logger.run_id, cli.datamodule.counts)
    ckpt = trainer.checkpoint_callback
    shutil.rmtree(ckpt.dirpath)  # tuning keeps no weights: the best configuration is retrained for its test
    if tracker.pruned:
        raise optuna.TrialPruned(
            f"{metric} = {tracker.history[-1][metric]:.4f} at epoch {trainer.current_epoch}"
        )
    monitored = np.array([h[ckpt.monitor] for h in tracker.history])
    # the first best epoch, as ModelCheckpoint keeps it (it replaces a checkpoint only on strict improvement)
    best = int(np.argmax(monitored) if ckpt.mode == "max" else np.argmin(monitored))
    return tracker.history[best][metric]


def model_label(base: dict) -> str:
    if "model" not in base:
        raise ValueError("tune needs base.model: the classifier whose synthetic ratio is tuned")
    init = base["model"].get("init_args", {})
    parts = [str(init[k]) for k in ("backbone", "head") if k in init]
    return "-".join(parts) or base["model"]["class_path"].rsplit(".", 1)[-1]


def default_storage() -> str:
    STORE.mkdir(exist_ok=True)
    return f"sqlite:///{(STORE / 'optuna.db').resolve()}"


def tune(
    name: str,
    base: dict,
    synthetic: list[str] | Synthetic,
    ratio: dict[str, tuple[float, float]],
    ratio_step: float | None = None,
    transform: Policy | None = None,
    augment_classes: list[list[str]] | None = None,
    real_fractions: list[float] | None = None,
    policies: list[Policy] | None = None,
    metric: str = "val/f1_macro",
    direction: Literal["maximize", "minimize"] = "maximize",
    seeds: int = 3,
    subset_seeds: int | None = None,
    n_trials: int = 30,
    storage: str | None = None,
    sampler_seed: int | None = None,
    pruner_startup_trials: int = 5,
    warmup_epochs: int = 2,
    heartbeat_interval: int = 60,
    grace_period: int | None = None,
    max_retry: int = 3,
    evaluate_seeds: int = 20,
    fit: str = "synaug.experiment.tune:fit_seed",
    tracking: str | None = None,
    generator: str = "tuned",
    generator_cache: str | None = None,
    verbose: bool = False,
) -> FrozenTrial:
    """Tune the synthetic ratio per class on validation data; returns the best trial.

    Args:
        name: the study (Optuna) and the MLflow experiment of its trials.
        base: a LightningCLI config with `model:`, `data:`, `trainer:` (with `max_epochs`).
        synthetic: the synthetic folders (`{subset_seed}` and `{real}` templated as in `synaug experiment`), or
            a source as `synaug experiment` takes one: `train:` a generator's fit config (with `overrides`,
            `sampler`, `quality`, `gate`, `filter`, `oversample`), trained and sampled once per real setting
            and subset before the first trial, or `generate:` a training-free one's (img2img); the study
            chooses the ratios, so the source sets none.
        ratio: class -> (low, high): the search range of its synthetic ratio (`data.synthetic_ratio`).
        ratio_step: a grid step for the ratios (default: continuous).
        transform: make missing synthetic folders with the `transform` generator under this policy, from each
            seed's real subset (as `Synthetic.transform` in `synaug experiment`).
        augment_classes: also choose which classes are augmented, among these sets (a class of a set needs a
            `ratio` range); default: every class of `ratio`.
        real_fractions: also choose `data.real_fraction` among these (one value: fixed).
        policies: also choose `data.policy` among these (one value: fixed).
        metric: the validation metric, e.g. `val/f1_macro` or a minority recall `val/recall/malignant`.
        direction: `maximize`, or `minimize` for a loss such as `val/cross_entropy`.
        seeds: seeds per trial; the objective is the mean over them.
        subset_seeds: distinct real subsets (seed s draws `s mod subset_seeds`); default one per seed.
        n_trials: trials of the study (complete or pruned), across every process working on it.
        storage: an Optuna RDB URL (default: `sqlite:///mlruns/optuna.db`; `postgresql://...` to share it).
        sampler_seed: TPE seed (leave unset when several processes share the study: they would propose alike).
        pruner_startup_trials: trials run to the end before the median pruner may stop any.
        warmup_epochs: epochs of each seed before its trial may be pruned.
        heartbeat_interval, grace_period: seconds between heartbeats of a running trial; seconds without one
            before the trial counts as dead (default 2 x heartbeat_interval).
        max_retry: how often a dead trial is queued again.
        evaluate_seeds: seeds of the final test of the best configuration against its baseline; 0: no test.
        verbose: the final test's runs print to the console (`synaug -v`), not to their logs (`experiment`).
        fit: `module:function` that trains one seed, `(config, metric, report) -> value` (default
            `fit_seed`); a stand-in makes the storage machinery testable in seconds.
        tracking: MLflow tracking URI (default: `$MLFLOW_TRACKING_URI`, else the local store).
        generator: the source's name: its runs' `generator` tag, its cells' names, its cache folder.
        generator_cache: a `train:` source's trainings are cached under `outputs/generators/<generator_cache>/`
            (default: `name`). A grid's experiment name (and its source's name as `generator`) reuses the
            generators that grid trained on the same subsets, and the other way round.
    """
    if isinstance(synthetic, Synthetic):
        if transform is not None:
            raise ValueError("synthetic is a source: give its `transform` inside it, not beside it")
        source = synthetic
    else:
        source = Synthetic(folders=synthetic, transform=transform)
    grid_keys = ("policy",) * bool(policies) + ("real_fraction", "real_count") * bool(real_fractions)
    check_base(base, "base", grid_keys)
    for classes in augment_classes or []:
        missing = sorted(set(classes) - set(ratio))
        if missing:
            raise ValueError(f"augment_classes {classes}: no ratio range for {missing}")
    config = merge(base, {})
    epochs = config.get("trainer", {}).get("max_epochs")
    if epochs is None:
        raise ValueError(
            "tune needs base.trainer.max_epochs: intermediate steps are seed * max_epochs + epoch"
        )
    clf = model_label(base)
    data = config.get("data", {})
    subset_of = (lambda s: s) if subset_seeds is None else (lambda s: s % subset_seeds)
    module, function = fit.split(":")
    fit_fn = getattr(importlib.import_module(module), function)

    uri = tracking_uri(tracking)
    client = MlflowClient(uri)
    exp_id = experiment_id(client, name, uri)
    SynAugCLI(args=run_config(config, {}, 0, name, uri), run=False)  # a typo fails now, not in trial 1
    # every real data setting at the largest ratios: leakage or too few synthetic images fail before trial 0
    largest = {c: hi for c, (_, hi) in ratio.items()}
    source = replace(source, ratios=[largest])  # `made` stays shared: the trials read the folders made here
    reals = (
        [(f, None) for f in real_fractions]
        if real_fractions
        else [(data.get("real_fraction", 1.0), data.get("real_count"))]
    )
    pool = [Cell(clf, "none", f, n, generator, largest, source) for f, n in reals]
    generator_runs = {}  # (real, subset seed) -> the generator's MLflow run
    if source.staged:
        generators.check_gate(source.gate)
        subsets = sorted({subset_of(s) for s in range(seeds)})
        steps, dm = generators.plan_steps(pool, config, generator_cache or name, subsets, merge)
        for step in steps:
            print(f"{generator} real={step.real} subset {step.subset_seed}: {step.folder}")
            generators.run_step(step, source, dm, client, exp_id, name, uri, parent=None)
            client.set_tag(step.run_id, "optuna.study", name)
            if step.excluded:
                raise ValueError(
                    f"the gate excluded {generator} at real={step.real}, subset {step.subset_seed} "
                    f"({step.excluded}): there is no synthetic pool to tune; see its run {step.run_id}"
                )
            generator_runs[(step.real, step.subset_seed)] = step.run_id
    prepare(pool, {clf: config}, seeds, subset_of)
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def cell(params: dict) -> Cell:
        if augment_classes:
            chosen = params["augment_classes"]
            classes = chosen.split("+") if chosen else []
        else:
            classes = list(ratio)
        ratios = {c: params[f"ratio/{c}"] for c in classes}
        return Cell(
            clf,
            params.get("policy", data.get("policy", "none")),
            params.get("real_fraction", data.get("real_fraction", 1.0)),
            data.get("real_count") if not real_fractions else None,
            generator,
            ratios,
            replace(source, ratios=[ratios]),
        )

    def objective(trial: optuna.Trial) -> float:
        if policies:
            trial.suggest_categorical("policy", policies)
        if real_fractions:
            trial.suggest_categorical("real_fraction", real_fractions)
        classes = list(ratio)
        if augment_classes:
            chosen = trial.suggest_categorical("augment_classes", ["+".join(c) for c in augment_classes])
            classes = chosen.split("+") if chosen else []
        for c in classes:
            trial.suggest_float(f"ratio/{c}", *ratio[c], step=ratio_step)
        # On a grid the sampler proposes the same configuration again: its seeds would train to bit-identical
        # results, so the earlier value is reused (and the trial says so) instead of spending a training on it.
        for earlier in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if earlier.params == trial.params:
                trial.set_user_attr("reused_from", earlier.number)
                return earlier.value
        return evaluate(trial, cell(trial.params), trial.number)

    def evaluate(trial: optuna.Trial | None, trial_cell: Cell, number: int | str) -> float:
        """Train `trial_cell` over the seeds; the mean validation metric. `trial` None: the reference."""
        tags = trial_cell.tags() | {
            "level": "trial" if trial is not None else "reference",
            "optuna.study": name,
            "optuna.trial": str(number),
            "worker": worker,
        }
        if trial is not None and "mlflow_run_id" in trial.user_attrs:  # a retried trial: its dead attempt
            tags["retry_of_run"] = trial.user_attrs["mlflow_run_id"]
        run_id = client.create_run(exp_id, run_name=f"trial {number}", tags=tags).info.run_id
        if trial is not None:
            trial.set_user_attr("mlflow_run_id", run_id)
            trial.set_user_attr("worker", worker)
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in trial.params.items()])
        runs, values = [run_id], []
        try:
            for seed in range(seeds):
                seed_tags = trial_cell.tags() | {
                    "level": "seed",
                    "optuna.study": name,
                    "optuna.trial": str(number),
                    "seed": str(seed),
                    "subset_seed": str(subset_of(seed)),
                    "mlflow.parentRunId": run_id,
                }
                if trial_cell.source is not None and (trial_cell.real, subset_of(seed)) in generator_runs:
                    seed_tags["generator_run"] = generator_runs[(trial_cell.real, subset_of(seed))]
                seed_run = client.create_run(exp_id, run_name=f"trial {number} seed {seed}", tags=seed_tags)
                runs.append(seed_run.info.run_id)
                seed_config = merge(
                    run_config(config, trial_cell.data(seed, subset_of(seed)), seed, name, uri),
                    {"trainer": {"logger": {"init_args": {"run_id": seed_run.info.run_id}}}},
                )

                def report(epoch: int, value: float, seed: int = seed) -> bool:
                    step = seed * epochs + epoch
                    client.log_metric(run_id, "intermediate", value, step=step)
                    if trial is None:  # the reference is never pruned
                        return False
                    trial.report(value, step)
                    return epoch >= warmup_epochs and trial.should_prune()

                values.append(fit_fn(seed_config, metric, report))
                client.log_metric(run_id, "objective/seed", values[-1], step=seed)
                client.set_terminated(runs[-1], "FINISHED")
        except optuna.TrialPruned:
            # KILLED: the UI shows a pruned trial as stopped, not as finished
            client.set_tag(
                run_id, "mlflow.note.content", f"pruned by Optuna ({type(trial.study.pruner).__name__})"
            )
            end(runs, "KILLED", "PRUNED")
            raise
        except BaseException:
            end(runs, "FAILED", "FAIL")
            raise
        value = float(np.mean(values))
        client.log_metric(run_id, "objective", value)
        end(runs, "FINISHED", "COMPLETE")
        return value

    def end(runs: list[str], status: str, state: str) -> None:
        client.set_tag(runs[0], "state", state)
        for r in runs:
            client.set_terminated(r, status)

    retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def on_stale(study: optuna.Study, trial: FrozenTrial) -> None:
        # the dead process left its MLflow runs RUNNING: they will never finish
        for run in search(client, exp_id, {"optuna.study": name, "optuna.trial": str(trial.number)}):
            if run.info.status == "RUNNING":
                client.set_tag(run.info.run_id, "state", "FAIL")
                client.set_terminated(run.info.run_id, "KILLED")
        retry(study, trial)

    rdb = rdb_storage(
        storage or default_storage(),
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        heartbeat_stale_trial_callback=on_stale,
    )
    study = optuna.create_study(
        storage=rdb,
        study_name=name,
        direction=direction,
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=sampler_seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=pruner_startup_trials),
    )
    # what optuna-dashboard shows: the objective's name on its axes, the config and commit the study came from
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([metric])
    study.set_user_attr("config", config)
    study.set_user_attr("git_commit", git_commit())
    if "reference" not in study.user_attrs:
        # the configuration without synthetic images, over the same seeds: what every trial has to beat
        plain = Cell(clf, data.get("policy", "none"), reals[0][0], reals[0][1])
        study.set_user_attr("reference", evaluate(None, plain, "reference"))
    reference = study.user_attrs["reference"]
    done = len(study.get_trials(deepcopy=False, states=COUNTED))
    if done < n_trials:
        study.optimize(
            objective,
            n_trials=n_trials - done,
            callbacks=[MaxTrialsCallback(n_trials, states=COUNTED)],
            gc_after_trial=True,
            show_progress_bar=True,
        )
    best = study.best_trial
    if "reused_from" in best.user_attrs:  # the configuration's own evaluation holds the runs
        best = study.trials[best.user_attrs["reused_from"]]
    for run in search(client, exp_id, {"optuna.study": name, "level": "trial"}):
        flag = str(run.info.run_id == best.user_attrs["mlflow_run_id"]).lower()
        if run.data.tags.get("best") != flag:
            client.set_tag(run.info.run_id, "best", flag)
    print(
        f"study {name!r}: best trial {best.number}, {metric} = {best.value:.4f}, {best.params}; "
        f"without synthetic images (the reference): {reference:.4f}"
    )
    if not evaluate_seeds:
        return best

    tuned = cell(best.params)
    test_metric = "test/" + metric.removeprefix("val/")
    parent = experiment(
        name=f"{name}-test",
        base=base,
        classifiers={clf: {}},
        policies=[tuned.policy] if policies else None,
        real_fractions=[tuned.real_fraction] if real_fractions else None,
        synthetic={generator: tuned.source},
        seeds=evaluate_seeds,
        subset_seeds=subset_seeds,
        metric=test_metric,
        minority_metric=None if test_metric in stats.TABLE_COLUMNS.values() else test_metric,
        tracking=tracking,
        generator_cache=generator_cache or name,  # the subsets trained above are reused, not trained again
        verbose=verbose,
    )
    client.set_tag(parent, "optuna.study", name)
    client.set_tag(parent, "optuna.best_trial", str(best.number))
    return best
