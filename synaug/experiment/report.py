"""The report of an experiment: the tables (summary, paired comparisons, controls, worth) and the plots.

`report` takes the long results table and the cells (see its docstring); it reads nothing from MLflow, so a
notebook can call it on `synaug.notebooks.results_table` output as well.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from synaug import stats

COMPARISON_COLUMNS = ["cell", "baseline", "metric", "n", "median_diff", "mean_diff", "ci_low", "ci_high", "p"]


def report(
    results: pd.DataFrame,
    cells: pd.DataFrame,
    folder: Path,
    metric: str = stats.MAIN_METRIC,
    minority_metric: str | None = None,
    x: str = "real_per_class",
    margin: float = stats.MARGIN,
    min_units: int = stats.MIN_UNITS,
) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Write the tables and figures of an experiment into `folder`; returns the summary, comparison and table.

    `results`: one row per (cell, seed, metric), optionally with the seed's `unit` (its real subset);
    `cells`: indexed by cell, with the columns classifier, policy, real, generator, ratio (a number, nan when
    classes differ), synthetic (a label), baseline ('' for baselines), optionally controls (the cell's control
    cells, `;`-separated) and `x` (real training images, for learning curves).
    """
    folder.mkdir(parents=True, exist_ok=True)
    plots = folder / "plots"
    plots.mkdir(exist_ok=True)
    summary = stats.summarize(results, min_units=min_units)
    baselines = {c: b for c, b in cells["baseline"].items() if b}
    pairs = list(baselines.items())
    if "controls" in cells:
        pairs += [
            (c, k) for c, ks in cells["controls"].items() if isinstance(ks, str) for k in ks.split(";") if k
        ]
    comparison = (
        stats.compare(results, pairs, min_units=min_units, margin=margin)
        if pairs
        else pd.DataFrame(columns=[*COMPARISON_COLUMNS, "p_holm"])
    )
    paths = stats.write_report(summary, comparison, folder, minority_metric, metric, margin)
    results.to_csv(folder / "results.csv", index=False)
    cells.to_csv(folder / "cells.csv")

    present = set(summary["metric"])
    for m in dict.fromkeys([*stats.TABLE_COLUMNS.values(), metric, minority_metric]):
        if m in present:
            stats.plot_cells(summary, m, baselines).savefig(plots / f"cells_{slug(m)}.png")

    augmented = cells[cells["generator"] != "none"]
    for (policy, real, gen), group in augmented.groupby(["policy", "real", "generator"], sort=False):
        selected = pd.concat([cells.loc[group["baseline"].unique()], group])
        if selected["ratio"].isna().any():
            print(
                f"no ratio curve for {gen} (policy {policy}, real {real}): its classes get different ratios"
            )
            continue
        fig = stats.plot_ratio_curve(summary, selected, metric, x="ratio", hue="classifier")
        fig.axes[0].set_title(f"{gen}: policy {policy}, real data {real}")
        fig.savefig(plots / f"ratio_{slug(gen)}_{slug(policy)}_real{slug(real)}.png")

    curves, worth = [], []
    higher_is_better = "cross_entropy" not in metric
    main = results[results["metric"] == metric]

    def values(cell: str) -> np.ndarray:
        return main.loc[main["cell"] == cell, "value"].to_numpy()

    for (clf, policy), group in cells.groupby(["classifier", "policy"], sort=False):
        real_only = group[group["generator"] == "none"]
        if real_only[x].nunique() < 2:
            continue
        if group.duplicated([x, "synthetic"]).any():
            print(
                f"no learning curve for {clf}/{policy}: several of its cells train on the same number of real images"
            )
            continue
        curves.append(
            stats.learning_curve(results, group, metric, x=x, group="synthetic").assign(
                classifier=clf, policy=policy
            )
        )
        fig = stats.plot_ratio_curve(summary, group, metric, x=x, hue="synthetic")
        fig.axes[0].set_xscale("log")
        fig.axes[0].set_title(f"learning curve: {clf}, policy {policy}")
        fig.savefig(plots / f"learning_curve_{slug(clf)}_{slug(policy)}.png")
        real_curve = {row[x]: values(c) for c, row in real_only.iterrows()}
        against = comparison[comparison["metric"] == metric].drop_duplicates("cell").set_index("cell")
        for c, row in group[group["generator"] != "none"].iterrows():
            if c not in against.index or not stats.distinguishable(against.loc[c]):
                # a worth read off a difference that may be zero is a number made of noise
                worth.append({"cell": c, x: row[x], "flag": "not distinguishable"})
                continue
            w = stats.synthetic_worth(real_curve, values(c), row[x], higher_is_better=higher_is_better)
            worth.append(
                {
                    "cell": c,
                    x: row[x],
                    "n_equivalent": w.n_equivalent,
                    "ci_low": w.ci_low,
                    "ci_high": w.ci_high,
                }
                | {"extra_real": w.extra_real, "flag": w.flag}
                | {"frac_above": w.frac_above, "frac_below": w.frac_below}
            )
    table = paths["table"].read_text()
    if "controls" in cells and (cells["controls"].fillna("") != "").any():
        table += controls_table(comparison, cells, metric, margin)
        paths["table"].write_text(table)
    if curves:
        pd.concat(curves, ignore_index=True).to_csv(folder / "learning_curve.csv", index=False)
        worth = pd.DataFrame(worth)
        worth.to_csv(folder / "worth.csv", index=False)
        table += worth_table(worth, x, metric)
        paths["table"].write_text(table)
    return summary, comparison, table


def worth_table(worth: pd.DataFrame, x: str, metric: str) -> str:
    lines = [
        f"\n### What the synthetic data is worth ({metric})\n",
        f"| configuration | {x} | worth, real images [CI] | extra real images |",
        "|---|:-:|:-:|:-:|",
    ]
    for row in worth.itertuples(index=False):
        d = row._asdict()
        if d["flag"] == "not distinguishable":
            lines.append(f"| {d['cell']} | {d[x]:.4g} | not distinguishable | — |")
            continue
        lines.append(
            f"| {d['cell']} | {d[x]:.4g} | {d['n_equivalent']:.4g} [{d['ci_low']:.4g}, {d['ci_high']:.4g}] "
            f"| {d['extra_real']:+.1f} |"
        )
    note = (
        "\nThe number of real images per class at which the real-only learning curve (isotonic, interpolated in "
        "log n) reaches the augmented result; inf: beyond the largest real set measured, nan: below the smallest. "
        "Only where the difference to the baseline is distinguishable from zero (its CI excludes 0); otherwise "
        '"not distinguishable": no worth can be read off a difference that may be none.\n'
    )
    return "\n".join(lines) + "\n" + note


def controls_table(comparison: pd.DataFrame, cells: pd.DataFrame, metric: str, margin: float) -> str:
    """Per synthetic arm (generator and ratio): its comparisons with its baseline and its controls, paired by
    unit, and which of them it beats."""
    rows = comparison[comparison["metric"] == metric].set_index(["cell", "baseline"])
    lines = [
        f"\n### Against the baseline and the controls ({metric})\n",
        "| configuration | against | Δ [CI] | P(improve) [CI] | verdict | p (Holm) | MDE | smallest p | beats |",
        "|---|---|:-:|:-:|:-:|:-:|:-:|:-:|:-:|",
    ]
    for cell, row in cells.iterrows():
        controls = [k for k in (row.get("controls") or "").split(";") if k]
        if not controls:
            continue
        refs = [row["baseline"], *controls]
        beaten = [r for r in refs if rows.loc[(cell, r), "verdict"] == "better"]
        beats = ", ".join(cells.loc[r, "synthetic"] if r != row["baseline"] else "baseline" for r in beaten)
        for r in refs:
            d = rows.loc[(cell, r)]
            name = "baseline" if r == row["baseline"] else cells.loc[r, "synthetic"]
            lines.append(
                f"| {cell} | {name} | {stats._interval(d['median_diff'], d['ci_low'], d['ci_high'], 3, '+')} "
                f"| {stats._interval(d['p_improve'], d['p_improve_low'], d['p_improve_high'], 2)} | {d['verdict']} "
                f"| {stats.format_p(d['p_holm'])} | {d['mde']:.3f} | {d['p_min']:.3g} | {beats or 'none'} |"
            )
    note = (
        "\nControls, at the same number of added images per class from the same real subset: duplicate-real "
        "(copies of the subset's own real images) and transform-medical (conventional transforms of them, no "
        "inversion or posterisation). A synthetic source that beats neither shows nothing beyond more real "
        f"copies. Verdict margin ±{margin:g}; MDE: the smallest mean difference the units could detect "
        "(α 0.05, power 0.8; inf: the test cannot reach p < 0.05 with this many units); smallest p: the lowest "
        "p-value the Wilcoxon test can give at this number of units.\n"
    )
    return "\n".join(lines) + "\n" + note


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")
