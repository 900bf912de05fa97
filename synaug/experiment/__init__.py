"""`synaug experiment` and `synaug tune`: the grid (grid.py: cells, seeds, running), its MLflow queries (runs.py,
shared with `synaug.notebooks`), its report (report.py: tables and plots), the generators it trains per real
subset (generators.py) and the ratio search (tune.py).

The names below are imported when first used, not with the package: `synaug.notebooks` reads runs through
`synaug.experiment.runs` without importing torch and Lightning, which `grid` does.
"""

import importlib

# `grid` is the submodule here; the function is `synaug.experiment.grid.grid`

_NAMES = {
    "grid": [
        "CELL_KEYS",
        "CONTROLS",
        "MIXING_KEYS",
        "Cell",
        "Synthetic",
        "check_base",
        "experiment",
        "folder_fingerprint",
        "label",
        "merge",
        "prepare",
        "run_config",
        "run_hash",
    ],
    "report": ["report"],
    "runs": ["collect", "complete", "find_or_create", "log_counts", "search"],
}
_WHERE = {name: module for module, names in _NAMES.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'synaug.experiment' has no attribute {name!r}")
    return getattr(importlib.import_module(f"synaug.experiment.{_WHERE[name]}"), name)
