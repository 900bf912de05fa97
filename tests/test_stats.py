import numpy as np
import pandas as pd
import pytest
import scipy.stats
from matplotlib.collections import PolyCollection

from synaug import stats


def long_table(values: dict[tuple[str, str], dict[int, float]]) -> pd.DataFrame:
    """{(cell, metric): {seed: value}} -> the long results table."""
    rows = [
        {"cell": cell, "seed": seed, "metric": metric, "value": value}
        for (cell, metric), by_seed in values.items()
        for seed, value in by_seed.items()
    ]
    return pd.DataFrame(rows)


def test_bootstrap_ci_of_median_covers_at_nominal_rate():
    rng = np.random.default_rng(0)
    true_median = 2.0
    covered = []
    for rep in range(200):
        low, high = stats.bootstrap_ci(rng.normal(true_median, 1.0, 20), n_resamples=999, seed=rep)
        covered.append(low <= true_median <= high)
    assert 0.90 <= np.mean(covered) <= 0.99


def test_bootstrap_ci_mean_narrows_with_more_data_and_contains_the_estimate():
    rng = np.random.default_rng(1)
    small, large = rng.normal(0, 1, 20), rng.normal(0, 1, 500)
    low_s, high_s = stats.bootstrap_ci(small, "mean", n_resamples=999)
    low_l, high_l = stats.bootstrap_ci(large, "mean", n_resamples=999)
    assert low_s < small.mean() < high_s
    assert low_l < large.mean() < high_l
    assert high_l - low_l < (high_s - low_s) / 2  # width ~ 1/sqrt(n): 5x narrower here


def test_bootstrap_ci_degenerate_samples():
    assert stats.bootstrap_ci([0.7, 0.7, 0.7, 0.7]) == (0.7, 0.7)
    assert stats.bootstrap_ci([0.7, 0.7, 0.7], method="BCa") == (0.7, 0.7)  # BCa would give nan here
    assert all(np.isnan(stats.bootstrap_ci([0.7])))


def test_holm_worked_example_and_cap():
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    # 2 * 0.5 = 1.0, then the running max keeps 0.6 * 1 from dropping below it
    np.testing.assert_allclose(stats.holm([0.5, 0.6]), [1.0, 1.0])
    np.testing.assert_allclose(stats.holm([0.3, 0.9, 0.02]), [0.6, 0.9, 0.06])


def test_holm_is_monotone_bounded_and_at_least_raw():
    p = np.random.default_rng(2).uniform(0, 0.2, 30)
    adjusted = stats.holm(p)
    order = np.argsort(p)
    assert np.all(np.diff(adjusted[order]) >= 0)
    assert np.all(adjusted >= p)
    assert np.all(adjusted <= 1)
    assert adjusted[order[0]] == pytest.approx(30 * p[order[0]])


def test_holm_agrees_with_statsmodels_with_ties_and_refused_tests():
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(3)
    for size in (1, 3, 6, 11):  # few calls: each runs a full gc.collect(), seconds in a pytest worker
        p = rng.choice([0.001, 0.01, 0.02, 0.04, 0.3, 0.8], size=size)  # ties on purpose
        np.testing.assert_allclose(stats.holm(p), multipletests(p, method="holm")[1])
    mixed = stats.holm([0.01, np.nan, 0.04, np.nan])
    np.testing.assert_allclose(mixed, [0.02, np.nan, 0.04, np.nan])
    assert np.isnan(stats.holm([np.nan])).all() and stats.holm([]).size == 0


def test_summarize_matches_numpy():
    a, b = [0.8, 0.7, 0.9, 0.85, 0.6], [1.2, 1.0, 1.1]
    results = long_table(
        {
            ("base", "test/acc"): dict(enumerate(a)),
            ("base", "test/cross_entropy"): dict(enumerate(b)),
        }
    )
    summary = stats.summarize(results.sample(frac=1, random_state=0), n_resamples=999).set_index(
        ["cell", "metric"]
    )
    for metric, values in [("test/acc", a), ("test/cross_entropy", b)]:
        row = summary.loc[("base", metric)]
        assert row["n"] == len(values)
        assert row["median"] == pytest.approx(np.median(values))
        assert row["mean"] == pytest.approx(np.mean(values))
        assert row["std"] == pytest.approx(np.std(values, ddof=1))
    row = summary.loc[("base", "test/acc")]
    assert min(a) <= row["ci_low"] <= row["median"] <= row["ci_high"] <= max(a)
    # three seeds are fewer than the 5 units a CI needs: none is printed, and the note says why
    row = summary.loc[("base", "test/cross_entropy")]
    assert (
        np.isnan(row["ci_low"]) and np.isnan(row["ci_high"]) and "3 independent unit(s) (< 5)" in row["note"]
    )


def test_summarize_rejects_duplicate_rows():
    results = long_table({("base", "test/acc"): {0: 0.5, 1: 0.6}})
    with pytest.raises(ValueError, match="duplicate"):
        stats.summarize(pd.concat([results, results.iloc[:1]]))


@pytest.fixture
def paired():
    """Baseline seeds 0..9; `syn` misses seed 3; `syn` is better by seed-dependent amounts on F1."""
    rng = np.random.default_rng(3)
    base_f1 = dict(enumerate(rng.uniform(0.5, 0.7, 10)))
    gain = dict(enumerate(rng.normal(0.03, 0.02, 10)))
    syn_f1 = {seed: base_f1[seed] + gain[seed] for seed in range(10) if seed != 3}
    base_acc = dict(enumerate(rng.uniform(0.6, 0.8, 10)))
    results = long_table(
        {
            ("base", "test/f1_macro"): base_f1,
            ("syn", "test/f1_macro"): syn_f1,
            ("base", "test/acc"): base_acc,
            ("syn", "test/acc"): {seed: base_acc[seed] for seed in syn_f1},  # identical: no difference at all
        }
    )
    expected = np.array([syn_f1[s] - base_f1[s] for s in sorted(syn_f1)])
    return results.sample(frac=1, random_state=1).reset_index(drop=True), expected


def test_compare_pairs_by_seed(paired):
    results, expected = paired
    comparison = stats.compare(results, {"syn": "base"}, n_resamples=999).set_index("metric")
    f1 = comparison.loc["test/f1_macro"]
    assert f1["n"] == 9
    assert f1["median_diff"] == pytest.approx(np.median(expected))
    assert f1["mean_diff"] == pytest.approx(np.mean(expected))
    assert f1["ci_low"] <= f1["median_diff"] <= f1["ci_high"]
    assert f1["p"] == pytest.approx(scipy.stats.wilcoxon(expected).pvalue)
    acc = comparison.loc["test/acc"]
    # nine seeds with identical differences are one distinct result: no CI, no p, and the note says why
    assert acc["median_diff"] == 0 and np.isnan(acc["p"]) and np.isnan(acc["ci_low"])
    assert acc["distinct"] == 1 and "1 distinct result(s)" in acc["note"]


def test_compare_raises_without_shared_seeds():
    results = long_table({("base", "test/acc"): {0: 0.5, 1: 0.6}, ("syn", "test/acc"): {2: 0.7, 3: 0.8}})
    with pytest.raises(ValueError, match="share no seed"):
        stats.compare(results, {"syn": "base"})
    with pytest.raises(ValueError, match="own baseline"):
        stats.compare(results, {"base": "base"})


def test_compare_holm_is_per_metric_across_cells():
    rng = np.random.default_rng(4)
    table = {}
    for metric in ["test/acc", "test/f1_macro"]:
        table[("base", metric)] = dict(enumerate(rng.uniform(0.5, 0.6, 12)))
        for cell, shift in [("a", 0.0), ("b", 0.02), ("c", 0.05)]:
            table[(cell, metric)] = {
                s: v + shift + rng.normal(0, 0.02) for s, v in table[("base", metric)].items()
            }
    comparison = stats.compare(long_table(table), {"a": "base", "b": "base", "c": "base"}, n_resamples=99)
    assert len(comparison) == 6
    for _, family in comparison.groupby("metric"):
        np.testing.assert_allclose(family["p_holm"], stats.holm(family["p"]))
    assert not np.allclose(comparison["p_holm"], stats.holm(comparison["p"]))  # not one pooled family


def test_markdown_table(paired):
    results, _ = paired
    recall = long_table(
        {
            ("base", "test/recall/glioma"): {s: 0.4 + 0.01 * s for s in range(10)},
            ("syn", "test/recall/glioma"): {s: 0.5 + 0.01 * s for s in range(10)},
        }
    )
    results = pd.concat([results, recall], ignore_index=True)
    summary = stats.summarize(results, n_resamples=99)
    comparison = stats.compare(results, {"syn": "base"}, n_resamples=99)
    columns = {"accuracy": "test/acc", "F1 (macro)": "test/f1_macro"}
    table = stats.markdown_table(summary, comparison, minority_metric="test/recall/glioma", columns=columns)
    lines = table.splitlines()
    assert "minority recall/glioma" in lines[0]
    rows = {line.split("|")[1].strip(): line for line in lines[2:] if line.startswith("|")}
    assert set(rows) == {"base", "syn"}
    assert all(line.count("|") == lines[0].count("|") for line in rows.values())
    f1 = comparison.set_index(["cell", "metric"]).loc[("syn", "test/f1_macro")]
    assert stats.format_p(f1["p_holm"]) in rows["syn"]
    assert f"{f1['median_diff']:+.3f}" in rows["syn"]
    assert "baseline" in rows["base"]
    glioma = summary.set_index(["cell", "metric"]).loc[("syn", "test/recall/glioma")]
    assert f"{glioma['median']:.3f} [{glioma['ci_low']:.3f}, {glioma['ci_high']:.3f}]" in rows["syn"]
    with pytest.raises(ValueError, match="cross_entropy"):
        stats.markdown_table(summary, comparison)  # the default columns ask for a metric never logged


def test_write_report_round_trips(tmp_path):
    metrics = list(stats.TABLE_COLUMNS.values())
    rng = np.random.default_rng(5)
    results = long_table(
        {(cell, m): dict(enumerate(rng.uniform(0, 1, 6))) for cell in ["base", "syn"] for m in metrics}
    )
    summary = stats.summarize(results, n_resamples=99)
    comparison = stats.compare(results, {"syn": "base"}, n_resamples=99)
    paths = stats.write_report(summary, comparison, tmp_path / "out")
    for name, frame in [("summary", summary), ("comparison", comparison)]:
        read = pd.read_csv(paths[name]).fillna({"note": ""})
        pd.testing.assert_frame_equal(read, frame, check_dtype=False)
    assert paths["table"].read_text() == stats.markdown_table(summary, comparison)


@pytest.fixture
def grid():
    """Two classifiers x ratios 0 (baseline), 0.5, 1; F1 rises with the ratio for the CNN only."""
    rng = np.random.default_rng(6)
    cells = pd.DataFrame(
        [(f"{clf}-r{ratio}", clf, ratio) for clf in ["cnn", "vit"] for ratio in [0.0, 0.5, 1.0]],
        columns=["cell", "classifier", "ratio"],
    ).set_index("cell")
    slope = {"cnn": 0.1, "vit": 0.0}
    results = long_table(
        {
            (cell, "test/f1_macro"): dict(
                enumerate(0.6 + slope[row.classifier] * row.ratio + rng.normal(0, 0.01, 8))
            )
            for cell, row in cells.iterrows()
        }
    )
    return results, cells, stats.summarize(results, n_resamples=99)


def test_plot_cells_one_errorbar_per_cell(grid, tmp_path):
    _, cells, summary = grid
    baselines = {
        "cnn-r0.5": "cnn-r0.0",
        "cnn-r1.0": "cnn-r0.0",
        "vit-r0.5": "vit-r0.0",
        "vit-r1.0": "vit-r0.0",
    }
    fig = stats.plot_cells(summary, "test/f1_macro", baselines)
    (ax,) = fig.axes
    assert len(ax.containers) == len(cells)
    medians = summary.set_index("cell")["median"]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == list(summary["cell"])
    for label, container in zip(labels, ax.containers, strict=True):
        x, _ = container.lines[0].get_data()
        assert x[0] == pytest.approx(medians[label])
        assert (container.lines[0].get_color() == "black") == label.endswith("r0.0")
    fig.savefig(tmp_path / "cells.png")  # a pyplot-free Figure still renders headless
    assert (tmp_path / "cells.png").stat().st_size > 0


def test_plot_ratio_curve_one_line_per_hue(grid):
    _, cells, summary = grid
    fig = stats.plot_ratio_curve(summary, cells, "test/f1_macro")
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.lines] == ["cnn", "vit"]
    medians = summary.set_index("cell")["median"]
    for line in ax.lines:
        x, y = line.get_data()
        np.testing.assert_allclose(x, [0.0, 0.5, 1.0])
        np.testing.assert_allclose(y, [medians[f"{line.get_label()}-r{r}"] for r in [0.0, 0.5, 1.0]])
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 2  # one CI band per curve
    with pytest.raises(ValueError, match="several cells"):
        stats.plot_ratio_curve(summary, cells, "test/f1_macro", hue="ratio", x="ratio")


def test_learning_curve_medians_per_x_and_group():
    rng = np.random.default_rng(7)
    cells = pd.DataFrame(
        [(f"n{n}-{syn}", n, syn) for n in [10, 50, 100] for syn in ["none", "sd"]],
        columns=["cell", "real_per_class", "synthetic"],
    ).set_index("cell")
    values = {(cell, "test/f1_macro"): dict(enumerate(rng.uniform(0, 1, 5))) for cell in cells.index}
    values[("other", "test/f1_macro")] = {0: 0.1, 1: 0.2}  # not in `cells`: ignored
    curve = stats.learning_curve(long_table(values), cells, "test/f1_macro", n_resamples=99)
    assert list(curve["synthetic"]) == ["none"] * 3 + ["sd"] * 3
    assert list(curve["real_per_class"]) == [10, 50, 100] * 2
    for _, row in curve.iterrows():
        assert row["median"] == pytest.approx(
            np.median(list(values[(row["cell"], "test/f1_macro")].values()))
        )
    with pytest.raises(ValueError, match="several cells"):
        stats.learning_curve(long_table(values), cells, "test/f1_macro", group="real_per_class")


A, B = 0.3, 0.1  # metric = A + B log n
COUNTS = [25, 50, 100, 200, 400]


def test_synthetic_worth_recovers_exact_curve():
    curve = {n: np.full(6, A + B * np.log(n)) for n in COUNTS}
    worth = stats.synthetic_worth(curve, np.full(6, A + B * np.log(137)), n0=50, n_resamples=99)
    assert worth.flag == "within"
    assert worth.n_equivalent == pytest.approx(137)
    assert worth.extra_real == pytest.approx(87)
    # lower-is-better metrics: the same curve mirrored
    mirrored = {n: -v for n, v in curve.items()}
    worth = stats.synthetic_worth(
        mirrored, np.full(6, -(A + B * np.log(60))), n0=25, higher_is_better=False, n_resamples=99
    )
    assert worth.n_equivalent == pytest.approx(60)


def test_synthetic_worth_noisy_ci_and_non_monotone_curve():
    rng = np.random.default_rng(8)
    curve = {n: A + B * np.log(n) + rng.normal(0, 0.01, 20) for n in COUNTS}
    worth = stats.synthetic_worth(
        curve, A + B * np.log(150) + rng.normal(0, 0.01, 20), n0=50, n_resamples=999
    )
    assert worth.ci_low < 150 < worth.ci_high
    assert worth.ci_low > 100 and worth.ci_high < 200
    # a noisy dip at n=200 below n=100: isotonic fit pools them, giving one crossing, not two
    dipped = {25: [0.5, 0.5], 50: [0.6, 0.6], 100: [0.8, 0.8], 200: [0.7, 0.7], 400: [0.9, 0.9]}
    # pooled level 0.75 at 100 and 200; 0.675 lies halfway from 0.6 (n=50) to 0.75 (n=100) on log n
    # (the raw curve, 0.8 at n=100, would put it at 3/8 of the way)
    worth = stats.synthetic_worth(dipped, [0.675, 0.675], n0=25, n_resamples=99)
    assert worth.n_equivalent == pytest.approx(np.sqrt(50 * 100))
    # 0.78 is above the pooled 0.75, so it is met only between 200 and 400, at a fifth of the way
    worth = stats.synthetic_worth(dipped, [0.78, 0.78], n0=25, n_resamples=99)
    assert worth.n_equivalent == pytest.approx(200 * 2**0.2)


def test_synthetic_worth_flags_out_of_range():
    rng = np.random.default_rng(9)
    curve = {n: A + B * np.log(n) + rng.normal(0, 0.01, 10) for n in COUNTS}
    above = stats.synthetic_worth(
        curve, A + B * np.log(5000) + rng.normal(0, 0.01, 10), n0=50, n_resamples=99
    )
    assert above.flag == "above" and above.n_equivalent == np.inf and above.frac_above == 1.0
    below = stats.synthetic_worth(curve, A + B * np.log(5) + rng.normal(0, 0.01, 10), n0=50, n_resamples=99)
    assert below.flag == "below" and np.isnan(below.n_equivalent) and below.frac_below == 1.0
    # at the top of the range the CI straddles it: a finite lower bound, an unbounded upper one
    edge = stats.synthetic_worth(curve, A + B * np.log(400) + rng.normal(0, 0.01, 10), n0=50, n_resamples=999)
    assert edge.ci_high == np.inf and 200 < edge.ci_low < 400
    assert 0 < edge.frac_above < 1
    with pytest.raises(ValueError, match="at least two"):
        stats.synthetic_worth({25: [0.5, 0.6]}, [0.5, 0.6], n0=25)


def test_identical_replicates_give_no_ci_or_p():
    # Deterministic heads with the whole synthetic pool drawn: every seed trains the same model. Main reported
    # "Δ −0.064 [−0.064, −0.064], p=0.008" for 8 such seeds, "<0.001" for 20.
    for seeds in (8, 20):
        results = long_table(
            {
                ("base", "test/f1_macro"): dict.fromkeys(range(seeds), 0.630952),
                ("syn", "test/f1_macro"): dict.fromkeys(range(seeds), 0.566826),
            }
        )
        row = stats.compare(results, {"syn": "base"}, n_resamples=99).iloc[0]
        assert row["n"] == seeds and row["units"] == seeds and row["distinct"] == 1
        assert np.isnan(row["p"]) and np.isnan(row["p_holm"]) and np.isnan(row["ci_low"])
        assert row["verdict"] == "inconclusive" and "1 distinct result(s)" in row["note"]
        summary = stats.summarize(results, n_resamples=99)
        assert summary["ci_low"].isna().all() and summary["distinct"].eq(1).all()
        table = stats.markdown_table(
            summary,
            stats.compare(results, {"syn": "base"}, n_resamples=99),
            columns={"F1 (macro)": "test/f1_macro"},
        )
        assert "[no CI]" in table and "Refused" in table and "p=0.008" not in table


def test_seeds_sharing_a_unit_are_one_replicate():
    # Pseudo-replication: seeds that share a real subset (and its generator) share its effect. With no true
    # effect, main's seed-level test gave false positives at 0.43 with 2 subsets; by unit there are 2 replicates.
    rng = np.random.default_rng(7)

    def experiment(units: int, seeds_per_unit: int) -> pd.DataFrame:
        rows = []
        for u in range(units):
            shared = rng.normal(0, 0.03)  # this subset's generator helps or hurts, by luck
            for k in range(seeds_per_unit):
                seed = u * seeds_per_unit + k
                base = 0.6 + rng.normal(0, 0.01)
                rows += [("base", seed, u, base), ("syn", seed, u, base + shared + rng.normal(0, 0.01))]
        table = pd.DataFrame(rows, columns=["cell", "seed", "unit", "value"])
        return table.assign(metric="test/f1_macro")

    two = stats.compare(experiment(2, 10), {"syn": "base"}, n_resamples=99).iloc[0]
    assert two["n"] == 20 and two["units"] == 2 and np.isnan(two["p"])
    assert "2 independent unit(s) (< 5)" in two["note"]

    # with 8 units of 4 seeds each, the unit-level test holds its level; the seed-level one does not
    unit_level, seed_level = [], []
    for _ in range(200):
        table = experiment(8, 4)
        unit_level.append(stats.compare(table, {"syn": "base"}, n_resamples=9).iloc[0]["p"] < 0.05)
        seed_level.append(
            stats.compare(table.drop(columns="unit"), {"syn": "base"}, n_resamples=9).iloc[0]["p"] < 0.05
        )
    assert np.mean(unit_level) <= 0.09
    assert np.mean(seed_level) >= 0.3


def test_probability_of_improvement_verdicts_and_detectable_effect():
    rng = np.random.default_rng(8)
    base = rng.uniform(0.5, 0.7, 12)
    table = {("base", "test/f1_macro"): dict(enumerate(base))}
    table[("better", "test/f1_macro")] = dict(enumerate(base + 0.05 + rng.normal(0, 0.005, 12)))
    table[("same", "test/f1_macro")] = dict(enumerate(base + rng.normal(0, 0.001, 12)))
    table[("noisy", "test/f1_macro")] = dict(enumerate(base + rng.normal(0, 0.08, 12)))
    table[("worse", "test/f1_macro")] = dict(enumerate(base - 0.05 + rng.normal(0, 0.005, 12)))
    comparison = stats.compare(
        long_table(table), {c: "base" for c in ["better", "same", "noisy", "worse"]}, n_resamples=999
    ).set_index("cell")
    assert comparison["verdict"].to_dict() == {
        "better": "better",
        "same": "equivalent",
        "noisy": "inconclusive",
        "worse": "worse",
    }
    assert comparison.at["better", "p_improve"] == 1.0 and comparison.at["worse", "p_improve"] == 0.0
    assert comparison.at["noisy", "p_improve_low"] < 0.5 < comparison.at["noisy", "p_improve_high"]
    assert comparison.at["noisy", "mde"] > comparison.at["same", "mde"] > 0
    assert comparison["p_min"].eq(2 * 0.5**12).all()

    # a lower-is-better metric: a drop in cross-entropy is the improvement
    ce = long_table(
        {
            ("base", "test/cross_entropy"): dict(enumerate(base)),
            ("syn", "test/cross_entropy"): dict(enumerate(base - 0.05 + rng.normal(0, 0.005, 12))),
        }
    )
    row = stats.compare(ce, {"syn": "base"}, n_resamples=99).iloc[0]
    assert row["verdict"] == "better" and row["p_improve"] == 1.0


def test_smallest_reachable_p_and_mde_at_five_units():
    # a two-sided Wilcoxon with 5 units cannot go below 0.0625: nothing at n = 5 is "significant at 0.05"
    assert stats.smallest_p(5) == 0.0625
    results = long_table(
        {
            ("base", "test/f1_macro"): dict(enumerate([0.5, 0.55, 0.6, 0.52, 0.58])),
            ("syn", "test/f1_macro"): dict(enumerate([0.6, 0.66, 0.72, 0.65, 0.72])),
        }
    )
    row = stats.compare(results, {"syn": "base"}, n_resamples=99).iloc[0]
    assert row["p"] == pytest.approx(0.0625) and row["p_min"] == 0.0625 and row["mde"] == np.inf
    assert stats.detectable_effect(0.02, 10) == pytest.approx(
        (scipy.stats.t.ppf(0.975, 9) + scipy.stats.t.ppf(0.8, 9)) * 0.02 / np.sqrt(10)
    )


def test_holm_leaves_refused_tests_out_of_the_family():
    np.testing.assert_allclose(stats.holm([0.01, np.nan, 0.04]), [0.02, np.nan, 0.04])
