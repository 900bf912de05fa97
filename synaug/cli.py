"""`synaug`: LightningCLI verbs for training (`fit`, `validate`, `test`, `predict`, see `synaug.training`) and
plain commands for the rest, each a function whose signature is its schema, with `-c config.yaml` as well.

This module stays light: `synaug --help`, `--version` and a mistyped command import neither torch, Lightning nor
MLflow; a command imports what it runs, and `synaug COMMAND --help` is built once, then read from a cache
(`help_text`). By default a command prints its own progress and results and none of the libraries' notices (`-v`
shows them); a user error is one line and exit status 2 (`--debug` for the traceback).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import inspect
import io
import json
import logging
import os
import pickle
import re
import shutil
import site
import sys
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

COMMANDS = {
    "data audit": "synaug.data.audit:audit",
    "sample": "synaug.sampling:sample",
    # Before "generate": main() takes the first name that prefixes the arguments.
    "generate img2img": "synaug.generators.stable_diffusion.img2img:img2img",
    "generate from-folder": "synaug.generators.external:import_folder",
    "generate": "synaug.generators.generate:generate",
    "quality": "synaug.evaluation.quality:quality",
    "explain": "synaug.evaluation.explain:explain",
    "experiment": "synaug.experiment.grid:experiment",
    "tune": "synaug.experiment.tune:tune",
}
TRAINING = {
    "fit": "train a classifier or a generator from a config (then test the best checkpoint)",
    "validate": "evaluate a checkpoint on the validation set",
    "test": "evaluate a checkpoint on the test set",
    "predict": "class probabilities of a checkpoint on a split",
}
# One line per command for `synaug --help` (the function's docstring says the rest: `synaug COMMAND --help`).
SUMMARIES = {
    "data audit": "audit a dataset: duplicates, near twins across splits, label conflicts, imbalance",
    "sample": "representative images per class, clustered (which images to train a generator on)",
    "generate img2img": "Stable Diffusion img2img variants of every real image (noise augmentation)",
    "generate from-folder": "import externally generated images as a synthetic folder",
    "generate": "sample a trained generator into a synthetic folder",
    "quality": "per-class quality of a synthetic folder against the real images (FID, KID, k-NN, leaks)",
    "explain": "Grad-CAM of a classifier on real vs synthetic images of each class",
    "experiment": "train and test a grid of cells x seeds, then report with confidence intervals",
    "tune": "tune the synthetic ratio per class on validation data (Optuna)",
}
# The old spellings still run.
RENAMED = {"generate --from-folder": "generate from-folder"}
# One spelling for one option everywhere (MLflow's own): a command whose function names it otherwise (`tracking`,
# `name`) takes both spellings from the command line.
SPELLINGS = {"tracking_uri": "tracking", "experiment": "name"}


def usage() -> str:
    width = max(map(len, [*COMMANDS, *TRAINING])) + 2
    lines = [
        "usage: synaug [-h] [--version] [-v] [--debug] COMMAND ...",
        "",
        "Does adding synthetic images make an image classifier better, for which classes, from which generator,",
        "at which real/synthetic ratio?",
        "",
        "training (LightningCLI, `synaug fit -c CONFIG.yaml`):",
        *(f"  {name:<{width}}{text}" for name, text in TRAINING.items()),
        "",
        "commands (`synaug COMMAND -c CONFIG.yaml`, or options; `synaug COMMAND --help`):",
        *(f"  {name:<{width}}{SUMMARIES[name]}" for name in COMMANDS),
        "",
        "options:",
        "  -h, --help     this message",
        "  --version      synaug's version",
        "  -v, --verbose  the libraries' notices too (Lightning, MLflow, model summary)",
        "  --debug        a user error's traceback (also $SYNAUG_DEBUG=1)",
    ]
    return "\n".join(lines)


def version() -> str:
    from synaug import __version__

    return __version__


def run_command(target: str, argv: list[str], prog: str, verbose: bool = False):
    """Run the command function `target` ("module:function") with these words."""
    module, fn = target.split(":")
    fn = getattr(importlib.import_module(module), fn)
    if verbose and "verbose" in inspect.signature(fn).parameters:  # a grid's runs print to the console
        argv = [*argv, "--verbose=true"]
    return run_function(fn, argv, prog)


def run_function(fn: Callable, argv: list[str], prog: str):
    """Run a command function from the command line: its signature is the schema, `-c` reads YAML."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, description=inspect.getdoc(fn))
    parser.add_argument("-c", "--config", action=ActionConfigFile)
    parser.add_function_arguments(fn, as_positional=True)
    cfg = parser.instantiate(parser.parse_args(respell(argv, inspect.signature(fn).parameters)))
    kwargs = {k: cfg[k] for k in inspect.signature(fn).parameters}
    result = fn(**kwargs)
    if note := results_note(fn, result, kwargs):
        print(note)
    return result


RUN_ID = re.compile(r"[0-9a-f]{32}")


def results_note(fn: Callable, result, kwargs: dict) -> str:
    """Where a command's results are: the MLflow run it made (name, id, experiment, the UI command), the Optuna
    study and the dashboard command, the output folder."""
    lines = []
    tracking = sys.modules.get("synaug.tracking")
    if tracking is not None:
        uri = tracking.tracking_uri(kwargs.get("tracking_uri") or kwargs.get("tracking"))
        runs = [r for u, r in tracking.COMMAND_RUNS if u == uri]
        run_id = (
            result if isinstance(result, str) and RUN_ID.fullmatch(result) else (runs[-1] if runs else None)
        )
        if run_id:
            lines += tracking.run_note(uri, run_id)
    if type(result).__name__ == "FrozenTrial":  # synaug tune
        storage = kwargs.get("storage") or sys.modules[fn.__module__].default_storage()
        lines += [f"Optuna study {kwargs['name']} in {storage}", f"  show it: optuna-dashboard {storage}"]
    out = kwargs.get("out") or (result if isinstance(result, os.PathLike) else None)
    if out:
        lines.append(f"output folder: {out}")
    return "\n".join(["", "results:", *lines]) if lines else ""


def respell(argv: list[str], params) -> list[str]:
    """`--tracking_uri X` for a function whose parameter is `tracking` (and the other way round), likewise
    `--experiment` / `--name`: the spelling the user knows from the other commands works here too."""
    other = {**SPELLINGS, **{v: k for k, v in SPELLINGS.items()}}
    out = []
    for word in argv:
        key, eq, value = word.partition("=")
        name = key[2:]
        if key.startswith("--") and name in other and name not in params and other[name] in params:
            word = f"--{other[name]}{eq}{value}"
        out.append(word)
    return out


# ---- a command's help, built once ----

HELP = (["-h"], ["--help"])
SOURCE = Path(__file__).parent  # synaug's own code: its signatures and docstrings are the help


def help_key(argv: list[str], verbose: bool) -> str:
    """What a command's help text depends on: its words, Lightning's log level (`-v` turns the model summary's
    default on), the terminal's width, the interpreter, the packages installed (the dist-info and .pth entries of
    the site folders: names and versions) and synaug's own source files (path, mtime, size)."""
    # The site folders, not all of sys.path: that differs between callers (a test runner's, a script's folder)
    # where nothing installed differs; synaug's own files are the "source" entry.
    folders = [p for p in sorted({*site.getsitepackages(), site.getusersitepackages()}) if os.path.isdir(p)]
    key = {
        "argv": argv,
        "verbose": verbose,
        "columns": shutil.get_terminal_size().columns,
        "python": [sys.executable, sys.version],
        "packages": sorted(
            {n for p in folders for n in os.listdir(p) if n.endswith((".dist-info", ".egg-info", ".pth"))}
        ),
        "source": [(str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(SOURCE.rglob("*.py"))],
    }
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]


def help_text(argv: list[str], verbose: bool, build: Callable[[], object]) -> None:
    """Print `synaug COMMAND --help`: `build()` prints it the first time, later calls read it from
    `$SYNAUG_CACHE/help/` (`synaug.cache`'s folder). Building a training verb's help imports Lightning, and
    Lightning imports torchmetrics whole, transformers, torchvision (and with it torch._dynamo) and scipy.signal
    included: about 10 s on a loaded 2-core machine, where synaug's own imports take under 1 s, so only not
    building it again brings `synaug fit --help` under a few seconds."""
    # synaug.cache.cache_dir(), which would import torch
    root = Path(os.environ.get("SYNAUG_CACHE", Path.home() / ".cache" / "synaug"))
    path = root / "help" / f"{help_key(argv, verbose)}.txt"
    if path.is_file():
        print(path.read_text(), end="")
        raise SystemExit(0)  # as argparse does after a help
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            build()
    except SystemExit as exit:
        if exit.code in (None, 0):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # write then rename, as synaug.cache does
            tmp.write_text(out.getvalue())
            tmp.replace(path)
        raise
    finally:
        sys.stdout.write(out.getvalue())


# ---- main() and its error paths ----

DEBUG_ENV = "SYNAUG_DEBUG"
# What a user fixes: a bad config value, bad or missing data, an unusable store. Anything else is a bug and keeps
# its traceback.
# pickle.UnpicklingError: a checkpoint refused by `weights_only=True` (it holds objects that could run code).
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    pickle.UnpicklingError,
)


def user_message(err: BaseException) -> str:
    """One line for a user error. jsonargparse reports a failed instantiation inside a Union ("Does not validate
    against any of the Union subtypes") with the real errors as text: keep the real one, name the class."""
    text = str(err)
    if isinstance(
        err, pickle.UnpicklingError
    ):  # torch's text suggests weights_only=False: not for user files
        found = re.search(r"(Unsupported global: [^\n]*?)(?: was not an allowed global|\n|$)", text)
        return (
            "refused to load a checkpoint that holds objects other than tensors and plain values (unpickling "
            f"them could run code): {found.group(1) if found else text.splitlines()[0]}"
        )
    if "Does not validate against any of the Union subtypes" in text:
        errors = [
            line.strip()[2:]
            for line in text.splitlines()
            if line.strip().startswith("- ") and not line.strip().startswith("- Expected a <class")
        ]
        given = re.search(r"class_path='([\w.]+)'", text)
        where = f"{given.group(1)}: " if given else ""
        text = where + (errors[0] if errors else text.splitlines()[0])
    return " ".join(text.split())


# Loggers whose INFO lines are the libraries talking about themselves ("GPU available", "Seed set", the
# litlogger tip, MLflow creating its tables); set on these names, not on "lightning.pytorch", which Lightning
# resets to INFO when it is imported.
CHATTY = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
    "mlflow.store.db.utils",
    "alembic",
)


def quiet() -> None:
    """A command's own output only: the libraries' INFO notices and the deprecations they trigger are left out."""
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Lightning's own use of a torch API torch deprecates: nothing a user can change.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # MLflow prints two "View run ... at: URL" lines whenever a run on a tracking server ends (every seed of a
    # grid): the command's `results:` block names the run's page instead.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def main(argv: list[str] | None = None) -> None:
    """`synaug ...`: a user error prints one line and exits 2; `--debug` (or $SYNAUG_DEBUG=1) shows the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    verbose = "-v" in argv or "--verbose" in argv
    argv = [a for a in argv if a not in ("--debug", "-v", "--verbose")]
    argv = ["--dry_run=true" if a == "--dry-run" else a for a in argv]  # the usual spelling of the switch
    try:
        dispatch(argv, verbose)
    except USER_ERRORS as err:
        if tracking := sys.modules.get("synaug.tracking"):  # only a command that opened MLflow created runs
            tracking.discard_empty()
        if debug:
            raise
        print(f"synaug: error: {user_message(err)}  (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def dispatch(argv: list[str], verbose: bool = True) -> None:
    if argv in ([], ["-h"], ["--help"]):
        print(usage())
        return
    if argv == ["--version"]:
        print(f"synaug {version()}")
        return
    for old, new in RENAMED.items():
        if argv[: len(old.split())] == old.split():
            argv = [*new.split(), *argv[len(old.split()) :]]
    for name, target in COMMANDS.items():
        words = name.split()
        if argv[: len(words)] == words:
            if not verbose:
                quiet()
            command = partial(run_command, target, argv[len(words) :], f"synaug {name}", verbose)
            if argv[len(words) :] in HELP:
                help_text(argv, verbose, command)
            else:
                command()
            return
    if not argv[0].startswith("-") and argv[0] not in TRAINING:
        if group := [name for name in COMMANDS if name.split()[0] == argv[0]]:
            print(f"synaug: error: '{argv[0]}' needs a subcommand: {', '.join(group)}", file=sys.stderr)
            raise SystemExit(2)
        known = sorted({*TRAINING, *(name.split()[0] for name in COMMANDS)})
        close = difflib.get_close_matches(argv[0], known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; the commands: {', '.join(known)}"
        print(f"synaug: error: unknown command '{argv[0]}'{hint}  (synaug --help)", file=sys.stderr)
        raise SystemExit(2)
    if not verbose:
        quiet()
    if argv[1:] in HELP:
        help_text(argv, verbose, partial(training, argv))
    else:
        training(argv)


def training(argv: list[str]):
    from synaug.training import SynAugCLI

    return SynAugCLI(args=argv)


def __getattr__(name: str):
    # `from synaug.cli import SynAugCLI` (grids, tests) without importing Lightning for `synaug --help`
    if name in ("SynAugCLI", "TrackRun", "results_note", "resumed_run", "CHECKPOINT"):
        return getattr(importlib.import_module("synaug.training"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
