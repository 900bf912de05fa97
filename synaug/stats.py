"""Statistics and reporting: does synthetic data help, and how sure are we?

One run on a 140-image test set cannot tell a gain from noise, so every number here comes with its
uncertainty over seeds. Results arrive as a long table, one row per (cell, seed, metric), with columns
`cell` (str), `seed` (int), `metric` (str, e.g. `test/f1_macro`) and `value` (float). A cell is one
configuration of the experiment grid; its baseline is the same classifier and policy without synthetic data.

Inference is at the level of the *independent unit*: the real training subset, with the generator trained on
it (optional column `unit`; without it every seed is its own unit). Seeds that share a real subset share its
generator and its luck, so they are averaged into one value per unit before any CI or test; treating them as
independent turns noise into significance (pseudo-replication). A comparison also needs *distinct* results:
eight seeds of a deterministic classifier that all give one value are one replicate, not eight. Below
`min_units` effective replicates (default 5) no CI and no p-value is printed, and the `note` says why.

- `summarize`: per cell and metric, median/mean/std over seeds and a bootstrap CI of the median over units.
- `compare`: each (cell, reference) pair, paired by unit: median difference with a bootstrap CI, a Wilcoxon
  signed-rank p-value, Holm-adjusted across the pairs, the probability of improvement with its CI, a
  practical-equivalence verdict against a margin, the minimum detectable effect and the smallest p reachable.
- `markdown_table`, `write_report`: the table of a thesis chapter, and the CSVs behind it.
- `plot_cells`, `plot_ratio_curve`: figures (plain `Figure` objects, no pyplot state, so they work headless).
- `learning_curve`, `synthetic_worth`: the metric against the number of real images, and how many real images
  an augmented result is worth.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scipy.stats
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from scipy.optimize import isotonic_regression

Statistic = Literal["median", "mean"]
STATISTICS = {"median": np.median, "mean": np.mean}
RESULT_COLUMNS = ["cell", "seed", "metric", "value"]
MAIN_METRIC = "test/f1_macro"
MIN_UNITS = 5  # fewer effective replicates than this: no CI, no p-value
MARGIN = 0.01  # practical-equivalence margin: one point of a metric in [0, 1]
ALPHA = 0.05
POWER = 0.8
Verdict = Literal["better", "worse", "equivalent", "inconclusive"]
# label -> metric: the columns of a thesis results table, in its order
TABLE_COLUMNS = {
    "accuracy": "test/acc",
    "precision (macro)": "test/precision_macro",
    "recall (macro)": "test/recall_macro",
    "F1 (macro)": "test/f1_macro",
    "cross-entropy": "test/cross_entropy",
}


def check_results(results: pd.DataFrame) -> None:
    """Raise if `results` is not a long table with one row per (cell, seed, metric)."""
    missing = set(RESULT_COLUMNS) - set(results.columns)
    if missing:
        raise ValueError(f"results lack columns {sorted(missing)}; expected {RESULT_COLUMNS}")
    # a duplicated row (e.g. a run's results appended twice) would double-weight a seed and break the pairing
    duplicated = results.duplicated(["cell", "seed", "metric"])
    if duplicated.any():
        raise ValueError(f"duplicate (cell, seed, metric) rows:\n{results[duplicated].head()}")


# ---------------------------------------------------------------------------------------------------------------
# confidence intervals and tests


def bootstrap_ci(
    values: ArrayLike,
    statistic: Statistic = "median",
    confidence: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
    method: Literal["percentile", "basic", "BCa"] = "percentile",
) -> tuple[float, float]:
    """Two-sided bootstrap confidence interval of the median (or mean) of `values`, via `scipy.stats.bootstrap`.

    The default method is the percentile interval. BCa is second-order accurate for smooth statistics such as
    the mean, but not for the median of ~20 seeds: its acceleration comes from the jackknife, which is
    inconsistent for the median, and the bootstrap distribution of a small-sample median is a handful of
    order statistics with large ties, which distorts its bias correction (and makes it NaN for constant data).
    The percentile interval has no such failure and covers close to nominally for the median at n = 20
    (see tests). `method` may still pick another interval, e.g. BCa for the mean.

    A constant sample returns (v, v): every resample has the same statistic, so the bootstrap distribution is a
    point mass; returning it directly avoids the degenerate-data path of BCa. Fewer than two values give
    (nan, nan): one seed says nothing about the spread.
    """
    values = np.asarray(values, dtype=float)
    if values.size < 2:
        return np.nan, np.nan
    if np.all(values == values[0]):
        return float(values[0]), float(values[0])
    result = scipy.stats.bootstrap(
        (values,),
        STATISTICS[statistic],
        n_resamples=n_resamples,
        confidence_level=confidence,
        method=method,
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def wilcoxon_p(differences: ArrayLike) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (scipy's defaults: zeros dropped, 'auto').

    All-zero differences give p = 1.0: the cell and its baseline agree on every seed, which is no evidence of a
    difference (scipy would divide by a zero variance on the way to the same answer, with a warning).
    """
    differences = np.asarray(differences, dtype=float)
    if np.all(differences == 0):
        return 1.0
    return float(scipy.stats.wilcoxon(differences).pvalue)


def holm(pvalues: ArrayLike) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (controls the family-wise error rate).

    Returned in the input's order. NaN (a test refused for too few units) is no member of the family and stays NaN.
    Written out rather than statsmodels' `multipletests(method="holm")` (the tests check they agree): that one
    runs a full `gc.collect()` per call, 1.5 s in a process holding torch and MLflow, and a report or a tuning
    study calls it once per family."""
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full(p.size, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = len(order)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(p[order] * np.arange(m, 0, -1)))
    return adjusted


def smallest_p(n: int) -> float:
    """The smallest two-sided p-value an exact Wilcoxon signed-rank test can give with n paired units: every
    difference of one sign, probability 2 / 2^n (0.0625 with 5 units: no n = 5 study reaches p < 0.05)."""
    return min(1.0, 2.0 * 0.5**n) if n > 0 else np.nan


def detectable_effect(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimum detectable effect: the mean paired difference a two-sided paired test at level `alpha` detects
    with probability `power` at n units, sd(differences) = `sd`: (t_{1-alpha/2} + t_{power}) sd / sqrt(n),
    with n - 1 degrees of freedom (the paired t-test's; the Wilcoxon needs ~5% more units, its asymptotic
    relative efficiency being 3/pi). inf when the Wilcoxon test cannot reach `alpha` at n at all, nan below
    2 units."""
    if n < 2 or not np.isfinite(sd):
        return np.nan
    if smallest_p(n) > alpha:
        return np.inf
    t = scipy.stats.t.ppf(1 - alpha / 2, n - 1) + scipy.stats.t.ppf(power, n - 1)
    return float(t * sd / np.sqrt(n))


def verdict(low: float, high: float, margin: float = MARGIN) -> Verdict:
    """Practical-equivalence verdict from the CI [low, high] of a difference (positive = improvement) against
    the margin +-`margin`: `equivalent` when the whole CI lies inside the margin, else `better` when it lies
    above 0, `worse` below 0, `inconclusive` when it straddles 0 (or there is no CI)."""
    if np.isnan(low) or np.isnan(high):
        return "inconclusive"
    if -margin < low and high < margin:
        return "equivalent"
    return "better" if low > 0 else "worse" if high < 0 else "inconclusive"


def higher_is_better(metric: str) -> bool:
    return "cross_entropy" not in metric and "loss" not in metric


def unit_values(results: pd.DataFrame) -> pd.DataFrame:
    """One value per (cell, metric, unit): the mean over the seeds that share a unit (its real subset and
    generator). Without a `unit` column each seed is a unit. Columns: cell, metric, unit, value, seeds."""
    check_results(results)
    units = results.assign(unit=results["unit"] if "unit" in results else results["seed"])
    return (
        units.groupby(["cell", "metric", "unit"], sort=False)["value"]
        .agg(value="mean", seeds="size")
        .reset_index()
    )


def effective(values: np.ndarray) -> int:
    """Effective replicates: the number of units, counted once per distinct value (identical results are one
    replicate however many seeds produced them)."""
    return int(np.unique(np.round(np.asarray(values, dtype=float), 12)).size)


def refusal(units: int, distinct: int, min_units: int) -> str:
    if min(units, distinct) >= min_units:
        return ""
    if distinct < units:
        return f"no CI/p: {units} units but {distinct} distinct result(s) (< {min_units})"
    return f"no CI/p: {units} independent unit(s) (< {min_units})"


# ---------------------------------------------------------------------------------------------------------------
# tables


def summarize(
    results: pd.DataFrame,
    statistic: Statistic = "median",
    confidence: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
    min_units: int = MIN_UNITS,
) -> pd.DataFrame:
    """Per cell and metric: n (seeds), units, distinct, median, mean, std (ddof=1) over seeds, a bootstrap CI
    of `statistic` over the per-unit values, and `note` (why a CI is missing).

    Columns: cell, metric, n, units, distinct, median, mean, std, ci_low, ci_high, note; cells and metrics in
    the order they first appear in `results` (the order the experiment ran them). Fewer than `min_units`
    effective replicates give no CI (nan): a CI from two units, or from twenty copies of one value, is not one.
    """
    check_results(results)
    per_unit = unit_values(results).groupby(["cell", "metric"], sort=False)["value"]
    rows = []
    for (cell, metric), group in results.groupby(["cell", "metric"], sort=False):
        values = group["value"].to_numpy(dtype=float)
        units = per_unit.get_group((cell, metric)).to_numpy()
        note = refusal(units.size, effective(units), min_units)
        low, high = (
            (np.nan, np.nan) if note else bootstrap_ci(units, statistic, confidence, n_resamples, seed)
        )
        rows.append(
            {
                "cell": cell,
                "metric": metric,
                "n": values.size,
                "units": units.size,
                "distinct": effective(units),
                "median": np.median(values),
                "mean": values.mean(),
                "std": values.std(ddof=1) if values.size > 1 else np.nan,
                "ci_low": low,
                "ci_high": high,
                "note": note,
            }
        )
    return pd.DataFrame(rows)


def compare(
    results: pd.DataFrame,
    baselines: Mapping[str, str] | list[tuple[str, str]],
    metrics: list[str] | None = None,
    statistic: Statistic = "median",
    confidence: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
    min_units: int = MIN_UNITS,
    margin: float = MARGIN,
) -> pd.DataFrame:
    """Each (cell, reference) pair of `baselines` (a mapping cell -> baseline, or a list of pairs, e.g. an arm
    against its baseline and its controls), paired by independent unit.

    Only seeds present in both cells count (a crashed run drops one pair, not the cell); seeds of one unit are
    averaged, per cell, into one value, and the unit differences (cell - reference) are what every statistic
    sees. Per (cell, metric): n (seed pairs), units, distinct (distinct unit differences), median_diff,
    mean_diff, a bootstrap CI (ci_low, ci_high) of the `statistic` of the unit differences, the Wilcoxon
    signed-rank p-value `p` and `p_holm`, Holm-adjusted over all pairs for that metric (the family of claims
    one report makes about one metric); `p_improve`, the probability of improvement (share of units where the
    cell beats its reference, ties half, as rliable reports it) with its bootstrap CI; `verdict` against
    +-`margin` (see `verdict`; for a lower-is-better metric such as cross-entropy improvement is a decrease);
    `mde`, the minimum detectable effect at these units and `p_min`, the smallest p the test can reach; and
    `note`. Fewer than `min_units` effective replicates give no CI and no p (nan), and a note saying why.
    `metrics` defaults to every metric in `results`.
    """
    check_results(results)
    pairs = list(baselines.items()) if isinstance(baselines, Mapping) else list(baselines)
    selfish = [cell for cell, baseline in pairs if cell == baseline]
    if selfish:
        raise ValueError(f"cells {selfish} are their own baseline; leave baselines out of the mapping")
    metrics = list(results["metric"].unique()) if metrics is None else metrics
    if "unit" not in results:
        results = results.assign(unit=results["seed"])
    frames = []
    for metric in metrics:
        rows_m = results[results["metric"] == metric]
        by_seed = rows_m.pivot(index="seed", columns="cell", values="value")
        unit_of = rows_m.pivot(index="seed", columns="cell", values="unit")
        sign = 1.0 if higher_is_better(metric) else -1.0
        rows = []
        for cell, baseline in pairs:
            if cell not in by_seed or baseline not in by_seed:
                raise ValueError(f"no {metric!r} results for {cell!r} or its baseline {baseline!r}")
            both = by_seed[[cell, baseline]].dropna()  # aligned by seed
            if both.empty:
                raise ValueError(f"{cell!r} and its baseline {baseline!r} share no seed with {metric!r}")
            units_of = unit_of.loc[both.index, [cell, baseline]]
            if (units_of[cell] != units_of[baseline]).any():
                raise ValueError(
                    f"{cell!r} and {baseline!r} put one seed in different units: they cannot pair"
                )
            per_unit = both.groupby(units_of[cell].to_numpy()).mean()
            differences = (per_unit[cell] - per_unit[baseline]).to_numpy()
            units, distinct = differences.size, effective(differences)
            note = refusal(units, distinct, min_units)
            wins = np.where(sign * differences > 0, 1.0, np.where(differences == 0, 0.5, 0.0))
            if note:
                low = high = p = pi_low = pi_high = np.nan
            else:
                low, high = bootstrap_ci(differences, statistic, confidence, n_resamples, seed)
                pi_low, pi_high = bootstrap_ci(wins, "mean", confidence, n_resamples, seed)
                p = wilcoxon_p(differences)
            improvement = (low, high) if sign > 0 else (-high, -low)
            rows.append(
                {
                    "cell": cell,
                    "baseline": baseline,
                    "metric": metric,
                    "n": len(both),
                    "units": units,
                    "distinct": distinct,
                    "median_diff": np.median(differences),
                    "mean_diff": differences.mean(),
                    "ci_low": low,
                    "ci_high": high,
                    "p": p,
                    "p_improve": wins.mean(),
                    "p_improve_low": pi_low,
                    "p_improve_high": pi_high,
                    "verdict": verdict(*improvement, margin),
                    "mde": detectable_effect(differences.std(ddof=1) if units > 1 else np.nan, units),
                    "p_min": smallest_p(int(np.count_nonzero(differences))),
                    "note": note,
                }
            )
        frame = pd.DataFrame(rows)
        frame["p_holm"] = holm(frame["p"])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def distinguishable(row: Mapping) -> bool:
    """Whether a comparison's difference is told apart from zero: its CI excludes 0."""
    return bool(row["ci_low"] > 0 or row["ci_high"] < 0)


def _interval(center: float, low: float, high: float, digits: int, sign: str = "") -> str:
    if np.isnan(low) or np.isnan(high):
        return f"{center:{sign}.{digits}f} [no CI]"
    return f"{center:{sign}.{digits}f} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"


def format_p(p: float, digits: int = 3) -> str:
    """A p-value as printed in the table: fixed decimals, `<0.001` rather than a misleading `0.000`, and `—`
    for a test refused (too few units)."""
    if np.isnan(p):
        return "—"
    return f"<{10**-digits:.{digits}f}" if p < 10**-digits else f"{p:.{digits}f}"


def markdown_table(
    summary: pd.DataFrame,
    comparison: pd.DataFrame,
    minority_metric: str | None = None,
    main_metric: str = MAIN_METRIC,
    columns: Mapping[str, str] = TABLE_COLUMNS,
    digits: int = 3,
    margin: float = MARGIN,
) -> str:
    """A thesis-style Markdown table: one row per cell, each metric as `median [ci_low, ci_high]`.

    `columns` (label -> metric) are the metric columns, then `minority_metric` (a per-class recall such as
    `test/recall/glioma`) when given, then, against the baseline on `main_metric`: the paired difference with
    its CI, the probability of improvement, the verdict and the Holm-adjusted Wilcoxon p-value. Baseline cells
    read `baseline` there; a cell without a comparison or without a metric reads `—`; a CI refused for too few
    units reads `[no CI]`, with the reason below the table. A metric absent from `summary` raises.
    """
    columns = dict(columns)
    if minority_metric is not None:
        columns[f"minority {minority_metric.removeprefix('test/')}"] = minority_metric
    absent = [metric for metric in [*columns.values(), main_metric] if metric not in set(summary["metric"])]
    if absent:
        raise ValueError(f"metrics {absent} are not in the summary")

    stats = summary.set_index(["cell", "metric"])
    main_rows = comparison[comparison["metric"] == main_metric]
    baseline_cells = set(main_rows["baseline"])
    diffs = main_rows.drop_duplicates("cell").set_index("cell")
    main = main_metric.removeprefix("test/")
    header = [
        "configuration",
        "seeds",
        "units",
        *columns,
        f"Δ {main} vs baseline",
        "P(improve)",
        "verdict",
        "p (Holm)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":-:"] * (len(header) - 1)) + "|"]
    for cell in summary["cell"].unique():
        known = (cell, main_metric) in stats.index
        row = [
            cell,
            str(stats.loc[(cell, main_metric), "n"]) if known else "—",
            str(stats.loc[(cell, main_metric), "units"]) if known else "—",
        ]
        for metric in columns.values():
            if (cell, metric) in stats.index:
                s = stats.loc[(cell, metric)]
                row.append(_interval(s["median"], s["ci_low"], s["ci_high"], digits))
            else:
                row.append("—")
        if cell in diffs.index:
            d = diffs.loc[cell]
            pi = _interval(d["p_improve"], d["p_improve_low"], d["p_improve_high"], 2)
            row += [
                _interval(d["median_diff"], d["ci_low"], d["ci_high"], digits, "+"),
                pi,
                d["verdict"],
                format_p(d["p_holm"]),
            ]
        else:
            row += ["baseline" if cell in baseline_cells else "—", "—", "—", "—"]
        lines.append("| " + " | ".join(row) + " |")
    units = summary.loc[summary["metric"] == main_metric, "units"]
    refused = [
        f"- {r.cell} vs {r.baseline}: {r.note}"
        for r in main_rows.itertuples()
        if isinstance(r.note, str) and r.note
    ]
    refused += [
        f"- {r.cell}: {r.note}"
        for r in summary[summary["metric"] == main_metric].itertuples()
        if isinstance(r.note, str) and r.note
    ]
    unit_range = f"{units.min()}" if units.min() == units.max() else f"{units.min()} to {units.max()}"
    note = (
        f"\nIndependent units: {unit_range} per cell (a unit is one real training subset, with the generator "
        f"trained on it; the seeds sharing a unit are averaged into one value). Median over seeds [bootstrap CI "
        f"over units]. Δ: median paired (by unit) difference to the cell's baseline, with its bootstrap CI; "
        f"P(improve): share of units where the cell beats its baseline [bootstrap CI]; verdict against a margin "
        f"of ±{margin:g} (better/worse: the CI excludes 0; equivalent: the CI lies within the margin; otherwise "
        f"inconclusive); p: two-sided Wilcoxon signed-rank test over units, Holm-adjusted across the "
        f"{int(main_rows['p'].notna().sum())} comparisons tested on {main_metric} (CIs and verdicts are per "
        f"comparison, not adjusted: read a verdict whose Holm p is large as suggestive). Every CI and p is "
        f"conditional on the one test set and on one generator training per subset: it says nothing about "
        f"another test set or another training of the generators.\n"
    )
    if refused:
        note += (
            "\nRefused (too few effective replicates; a CI or p from them would be noise):\n"
            + "\n".join(refused)
            + "\n"
        )
    return "\n".join(lines) + "\n" + note


def write_report(
    summary: pd.DataFrame,
    comparison: pd.DataFrame,
    folder: str | Path,
    minority_metric: str | None = None,
    main_metric: str = MAIN_METRIC,
    margin: float = MARGIN,
) -> dict[str, Path]:
    """Write `summary.csv`, `comparison.csv` and `report.md` (the `markdown_table`) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "summary": folder / "summary.csv",
        "comparison": folder / "comparison.csv",
        "table": folder / "report.md",
    }
    summary.to_csv(paths["summary"], index=False)
    comparison.to_csv(paths["comparison"], index=False)
    paths["table"].write_text(
        markdown_table(summary, comparison, minority_metric, main_metric, margin=margin)
    )
    return paths


# ---------------------------------------------------------------------------------------------------------------
# figures


def plot_cells(summary: pd.DataFrame, metric: str, baselines: Mapping[str, str] | None = None) -> Figure:
    """Each cell's median of `metric` with its CI as a horizontal error bar, one bar per cell, top to bottom.

    Baseline cells (the values of the `baselines` mapping given to `compare`) are drawn in black, the others in
    blue, so a gain reads as a blue bar clear of the black one.
    """
    rows = summary[summary["metric"] == metric].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"no {metric!r} in the summary")
    baseline_cells = set(baselines.values()) if baselines else set()
    fig = Figure(figsize=(6, 1 + 0.3 * len(rows)), layout="constrained")
    ax = fig.subplots()
    for y, row in rows.iterrows():
        is_baseline = row["cell"] in baseline_cells
        ax.errorbar(
            row["median"],
            y,
            xerr=[[row["median"] - row["ci_low"]], [row["ci_high"] - row["median"]]],
            fmt="s" if is_baseline else "o",
            color="black" if is_baseline else "tab:blue",
            capsize=3,
        )
    ax.set_yticks(range(len(rows)), rows["cell"])
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} (median, bootstrap CI)")
    ax.grid(axis="x", alpha=0.3)
    return fig


def _attach(summary: pd.DataFrame, cells: pd.DataFrame, metric: str, keys: list[str]) -> pd.DataFrame:
    """The summary rows of `metric` for the cells of `cells` (indexed by cell), with their `keys` attributes.

    `cells` selects what to plot; each combination of `keys` must name a single cell, else the curve would
    silently mix configurations.
    """
    rows = summary[summary["metric"] == metric].set_index("cell")
    missing = cells.index.difference(rows.index)
    if len(missing):
        raise ValueError(f"cells {list(missing)} have no {metric!r} in the summary")
    merged = cells[keys].join(rows, how="left").rename_axis("cell").reset_index()
    duplicated = merged.duplicated(keys, keep=False)
    if duplicated.any():
        raise ValueError(
            f"several cells share the same {keys}: {merged.loc[duplicated, 'cell'].tolist()}; "
            "select one configuration by filtering `cells`"
        )
    return merged.sort_values(keys[::-1], kind="stable").reset_index(drop=True)


def plot_ratio_curve(
    summary: pd.DataFrame, cells: pd.DataFrame, metric: str, x: str = "ratio", hue: str = "classifier"
) -> Figure:
    """`metric` (median line, CI band) against the cell attribute `x`, one curve per value of `hue`.

    `cells` is indexed by cell with attribute columns (classifier, policy, real_fraction, generator, ratio, ...)
    and selects the cells to draw: filter it so that each (hue, x) names one cell.
    """
    rows = _attach(summary, cells, metric, [x, hue])
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for name, curve in rows.groupby(hue, sort=False):
        (line,) = ax.plot(curve[x], curve["median"], marker="o", label=str(name))
        ax.fill_between(curve[x], curve["ci_low"], curve["ci_high"], color=line.get_color(), alpha=0.2)
    ax.set_xlabel(x)
    ax.set_ylabel(f"{metric} (median, bootstrap CI)")
    ax.legend(title=hue)
    ax.grid(alpha=0.3)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# learning curves


def learning_curve(
    results: pd.DataFrame,
    cells: pd.DataFrame,
    metric: str,
    x: str = "real_per_class",
    group: str = "synthetic",
    confidence: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
) -> pd.DataFrame:
    """The median of `metric` with its bootstrap CI per (x, group): e.g. against real images per class, with and
    without synthetic data. `cells` (indexed by cell) selects the cells; each (x, group) must be one cell.

    Columns: x, group, cell, n, median, mean, std, ci_low, ci_high; sorted by group, then x.
    """
    selected = results[(results["metric"] == metric) & results["cell"].isin(cells.index)]
    summary = summarize(selected, confidence=confidence, n_resamples=n_resamples, seed=seed)
    return _attach(summary, cells, metric, [x, group]).drop(columns="metric")


@dataclass(frozen=True)
class Worth:
    """How many real images an augmented result is worth (see `synthetic_worth`).

    `n_equivalent`, `ci_low`, `ci_high` are real-image counts: inf means more than the largest count measured,
    nan less than the smallest. `flag` says where the point estimate fell ("within", "above", "below");
    `frac_above` and `frac_below` are the shares of bootstrap replicates outside the measured range.
    """

    n0: float
    n_equivalent: float
    ci_low: float
    ci_high: float
    flag: Literal["within", "above", "below"]
    frac_above: float
    frac_below: float

    @property
    def extra_real(self) -> float:
        """Real images the synthetic data stands in for: n_equivalent - n0."""
        return self.n_equivalent - self.n0


def _equivalent_log_n(log_n: np.ndarray, curve: np.ndarray, weights: np.ndarray, level: float) -> float:
    """log n at which the monotone (isotonic) fit of `curve` first reaches `level`.

    Out of range, it returns a sentinel one unit outside the measured log n: below log_n[0] when the level is
    under the curve, above log_n[-1] when over it. Sentinels (not -inf/inf) keep the bootstrap distribution finite
    for scipy, and sort where they belong, so its quantiles stay meaningful.
    """
    fit = isotonic_regression(curve, weights=weights).x
    if level > fit[-1]:
        return log_n[-1] + 1
    if level < fit[0]:
        return log_n[0] - 1
    i = np.searchsorted(fit, level, side="left")  # first point at or above the level
    if i == 0:
        return log_n[0]
    t = (level - fit[i - 1]) / (fit[i] - fit[i - 1])  # fit[i-1] < level <= fit[i], so no division by zero
    return log_n[i - 1] + t * (log_n[i] - log_n[i - 1])


def synthetic_worth(
    real_curve: Mapping[float, ArrayLike],
    augmented: ArrayLike,
    n0: float,
    statistic: Statistic = "median",
    higher_is_better: bool = True,
    confidence: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
) -> Worth:
    """The number of real images the augmented result is equivalent to, with a bootstrap CI over seeds.

    `real_curve` maps a real-image count n to the per-seed metric of the real-only cell trained on n images;
    `augmented` is the per-seed metric of the augmented cell trained on n0 real images plus synthetic ones.

    Method: take the `statistic` (median) over seeds at each n, and make the curve monotone in n by isotonic
    regression (weighted by seeds per n): more real data should not hurt, and a dip from noise must not give
    two answers. The equivalent count is where the augmented level meets that curve, by linear interpolation
    on log n (learning curves are close to linear in log n) between the measured counts; on a flat stretch it
    is the smallest n that reaches the level, the conservative answer. Nothing is extrapolated: a level above
    the curve's largest value gives inf (flag "above": worth more than the largest n measured), below its
    smallest value nan (flag "below": worth less than the smallest n). For metrics where lower is better
    (cross-entropy) set `higher_is_better=False`.

    CI: percentile bootstrap (`scipy.stats.bootstrap`) resampling the seeds of each count and of the augmented
    cell independently (valid whether or not seeds are paired across cells; conservative if they are). The
    bounds are quantiles without interpolation (`inverted_cdf`), so a bound outside the measured range reads inf or nan honestly.
    """
    if len(real_curve) < 2:
        raise ValueError("the real-only curve needs at least two real-image counts")
    counts = np.array(sorted(real_curve), dtype=float)
    sign = 1.0 if higher_is_better else -1.0
    samples = [sign * np.asarray(real_curve[n], dtype=float) for n in sorted(real_curve)]
    samples.append(sign * np.asarray(augmented, dtype=float))
    log_n = np.log(counts)
    weights = np.array([s.size for s in samples[:-1]], dtype=float)
    reduce = STATISTICS[statistic]

    def equivalent(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
        # vectorized over resamples: each sample is (..., seeds); the isotonic fit runs per resample
        curves = np.stack([reduce(s, axis=axis) for s in samples[:-1]], axis=-1).reshape(-1, len(counts))
        levels = np.asarray(reduce(samples[-1], axis=axis)).reshape(-1)
        out = [_equivalent_log_n(log_n, c, weights, level) for c, level in zip(curves, levels, strict=True)]
        return np.array(out).reshape(np.shape(reduce(samples[-1], axis=axis)))

    point = float(equivalent(*samples))
    replicates = scipy.stats.bootstrap(
        samples,
        equivalent,
        n_resamples=n_resamples,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    ).bootstrap_distribution
    alpha = 1 - confidence
    low, high = np.quantile(replicates, [alpha / 2, 1 - alpha / 2], method="inverted_cdf")

    def decode(v: float) -> float:
        return np.inf if v > log_n[-1] else np.nan if v < log_n[0] else float(np.exp(v))

    flag = "above" if point > log_n[-1] else "below" if point < log_n[0] else "within"
    return Worth(
        n0=n0,
        n_equivalent=decode(point),
        ci_low=decode(low),
        ci_high=decode(high),
        flag=flag,
        frac_above=float(np.mean(replicates > log_n[-1])),
        frac_below=float(np.mean(replicates < log_n[0])),
    )
