"""MLflow queries of the experiment commands: paged tag searches, the runs of a cell, their results table.

`synaug experiment`, `synaug tune`, `synaug.notebooks` and `synaug.tracking` read runs through these, so a run is
"complete" or a tag value "matched" in one way everywhere, and MLflow's result pages are followed in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run, RunStatus

if TYPE_CHECKING:
    from mlflow.store.entities import PagedList

    from synaug.experiment.grid import Cell


def log_counts(client: MlflowClient, run_id: str, counts: pd.DataFrame) -> None:
    """The real and synthetic training images per class, as metrics: the x of learning curves."""
    metrics = {"data/real_per_class": float(counts["real_kept"].mean())}
    for c, row in counts.iterrows():
        metrics[f"data/real_kept/{c}"] = float(row["real_kept"])
        metrics[f"data/synthetic/{c}"] = float(row["synthetic"])
    for k, v in metrics.items():
        client.log_metric(run_id, k, v)


PAGE = 5000  # results per MLflow page


def every_page(search: Callable[..., PagedList], *args, **kwargs) -> list:
    """All results of an MLflow search (`client.search_runs`, `client.search_experiments`, ...), page after page."""
    out, token = [], None
    while True:
        page = search(*args, max_results=PAGE, page_token=token, **kwargs)
        out += page
        token = page.token
        if not token:
            return out


def search(
    client: MlflowClient, experiment_id: str | list[str], tags: dict[str, str], status: str | None = None
) -> list[Run]:
    """Every active run of the experiment(s) with these tag values (and this `status`: FINISHED, RUNNING, ...),
    oldest first.

    MLflow's filter language has no escape for a quote inside a string, so a value holding a quote or a
    backslash (a cell or experiment named `it's`) is not written into the filter: it is matched here."""
    ids = [experiment_id] if isinstance(experiment_id, str) else list(experiment_id)
    exact = {k: v for k, v in tags.items() if not set(v) & set("'\"\\")}
    terms = [f"tags.`{k}` = '{v}'" for k, v in exact.items()]
    if status is not None:
        RunStatus.from_string(status)  # a misspelt status is an error naming the valid ones, not zero runs
        terms.append(f"attributes.status = '{status}'")
    runs = every_page(client.search_runs, ids, " and ".join(terms), order_by=["attributes.start_time ASC"])
    return [r for r in runs if all(r.data.tags.get(k) == v for k, v in tags.items())]


def find_or_create(
    client: MlflowClient, experiment_id: str, key: dict[str, str], run_name: str, tags: dict[str, str]
) -> str:
    runs = search(client, experiment_id, key)
    if runs:
        client.update_run(runs[0].info.run_id, status="RUNNING")
        return runs[0].info.run_id
    return client.create_run(experiment_id, run_name=run_name, tags={**key, **tags}).info.run_id


def complete(run: Run, metric: str) -> bool:
    return run.info.status == "FINISHED" and metric in run.data.metrics


def collect(
    runs: list[Run], cells: list[Cell], metric: str, x_metric: str, wanted: dict[tuple[str, str], str]
) -> tuple[pd.DataFrame, dict]:
    """The long results table (test metrics of the complete seed runs of these cells, in grid order, with the
    `unit` each seed belongs to: a hash of its real subset) and each cell's `x_metric` (real training images, the same for
    every seed of a cell). `wanted` maps (cell, seed) to its run hash: only the seeds the config asks for, and
    only runs of the current config, data and synthetic images, are read."""
    from synaug import stats  # scipy.stats: not for `search`, which every fit calls

    order = {c.name: i for i, c in enumerate(cells)}
    rows, x, seen = [], {}, set()
    for run in runs:
        cell, seed = run.data.tags["cell"], run.data.tags["seed"]
        if cell not in order or not complete(run, metric) or (cell, seed) in seen:
            continue
        if wanted.get((cell, seed)) != run.data.tags.get("config_hash"):
            continue
        seen.add((cell, seed))
        if x_metric not in run.data.metrics:
            known = sorted(k for k in run.data.metrics if k.startswith("data/real_kept/"))
            raise ValueError(f"runs log no {x_metric}; per-class counts are {known}")
        unit = run.data.tags.get("unit", run.data.tags["subset_seed"])
        rows += [(cell, int(seed), k, v, unit) for k, v in run.data.metrics.items() if k.startswith("test/")]
        x.setdefault(cell, run.data.metrics[x_metric])
    results = pd.DataFrame(rows, columns=[*stats.RESULT_COLUMNS, "unit"])
    results = results.sort_values(
        ["cell", "seed", "metric"], key=lambda s: s.map(order) if s.name == "cell" else s
    )
    return results.reset_index(drop=True), x
