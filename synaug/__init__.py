"""synaug: does adding synthetic images make a small, imbalanced image classifier better, for which classes,
from which generator, at which real/synthetic ratio?

The Python API does what the CLI does, with the same provenance (resolved config, git commit, data fingerprints and
datasets, the training-image grid, the test pass after fit), from a script or a notebook:

    import synaug
    run = synaug.fit("configs/quickstart.yaml", data={"real_fraction": 0.05}, trainer={"max_epochs": 2})
    run.run_id, run.metrics["test/f1_macro"], run.checkpoint
    model = synaug.load_classifier(run.checkpoint)
    parent = synaug.run_experiment("experiments/lowdata_breastmnist/config.yaml")  # a grid, then its report

Importing synaug is cheap: torch, Lightning and MLflow load with the first call that needs them.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("synaug")
except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "0+unknown"

__all__ = ["FitResult", "__version__", "fit", "load_classifier", "run_experiment", "test", "tune"]


def __getattr__(name: str):
    if name in __all__:
        from synaug import api

        return getattr(api, name)
    raise AttributeError(f"module 'synaug' has no attribute {name!r}")
