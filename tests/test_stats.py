"""orchestrator.report.stats: hand-computed cases, scipy cross-checks and seeded simulations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from orchestrator.report.stats import (
    PairedComparison,
    compare_paired,
    holm,
    is_binary,
    mcnemar_exact,
    mean_interval,
    objective,
    paired_bootstrap_ci,
    paired_permutation_p,
    score_interval,
    wilson_interval,
)


def _pair_with_discordance(n01: int, n10: int, n_agree: int = 3) -> tuple[list[int], list[int]]:
    """Two 0/1 rows with exactly n01 (a=0, b=1) and n10 (a=1, b=0) discordant items."""
    a = [0] * n01 + [1] * n10 + [1] * n_agree + [0] * n_agree
    b = [1] * n01 + [0] * n10 + [1] * n_agree + [0] * n_agree
    return a, b


# ---------------------------------------------------------------------------------------------
# objective


def test_objective_weighted_mean_of_task_means_by_hand():
    values = [1, 0, 0, 1, 1, 1, 0.5]
    tasks = ["mmlu", "mmlu", "mmlu", "mmlu", "hs", "hs", "arc"]
    # task means: mmlu 2/4 = 0.5, hs 1.0, arc 0.5; weights mmlu 2, hs 1 (default), arc 3
    expected = (2 * 0.5 + 1 * 1.0 + 3 * 0.5) / (2 + 1 + 3)
    assert objective(values, tasks, {"mmlu": 2, "arc": 3}) == pytest.approx(expected)
    # default weights: the plain mean of task means, not the item mean (5.5 / 7)
    assert objective(values, tasks) == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    # arrays work like lists; weights for absent tasks are ignored
    weights = {"mmlu": 2, "arc": 3, "gone": 9}
    assert objective(np.array(values), np.array(tasks), weights) == pytest.approx(expected)


def test_objective_zero_weight_drops_a_task():
    assert objective([1, 1, 0], ["a", "a", "b"], {"b": 0}) == 1.0


# ---------------------------------------------------------------------------------------------
# McNemar


def test_mcnemar_one_sided_discordance_by_hand():
    a, b = _pair_with_discordance(n01=0, n10=5)
    assert mcnemar_exact(a, b) == pytest.approx(2 * 0.5**5)  # 0.0625


def test_mcnemar_2_vs_8_by_hand():
    a, b = _pair_with_discordance(n01=2, n10=8)
    # two-sided: 2 * P(X <= 2), X ~ Bin(10, 0.5) = 2 * (1 + 10 + 45) / 1024
    assert mcnemar_exact(a, b) == pytest.approx(2 * (1 + 10 + 45) / 1024)  # 0.109375


@pytest.mark.parametrize(("n01", "n10"), [(1, 1), (3, 0), (4, 9), (10, 25), (30, 31)])
def test_mcnemar_matches_binomtest_and_is_symmetric(n01, n10):
    a, b = _pair_with_discordance(n01, n10)
    expected = sps.binomtest(min(n01, n10), n01 + n10, 0.5).pvalue
    assert mcnemar_exact(a, b) == pytest.approx(expected)
    assert mcnemar_exact(b, a) == mcnemar_exact(a, b)


def test_mcnemar_no_discordant_pairs_is_one():
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]) == 1.0


def test_mcnemar_rejects_non_binary():
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact([1, 0.5], [1, 0])


# ---------------------------------------------------------------------------------------------
# identical rows


def test_identical_rows_give_zero_interval_and_p_one():
    rng = np.random.default_rng(3)
    tasks = ["a"] * 40 + ["b"] * 25
    for row in ((rng.random(65) < 0.6).astype(int), rng.normal(size=65)):
        diff, lo, hi = paired_bootstrap_ci(row, row.copy(), tasks, {"a": 2})
        assert (diff, lo, hi) == (0.0, 0.0, 0.0)
        assert paired_permutation_p(row, row.copy(), tasks) == 1.0
    assert mcnemar_exact(row > 0, row > 0) == 1.0
    result = compare_paired([1, 0, 1], [1, 0, 1], ["t"] * 3)
    assert result == PairedComparison(0.0, 0.0, 0.0, 1.0, "mcnemar", 3, 0)


# ---------------------------------------------------------------------------------------------
# bootstrap


def test_bootstrap_constant_difference_is_exact():
    tasks = ["a"] * 7 + ["b"] * 13
    a = np.arange(20) % 3 + 1.0
    b = a - 1.0  # +1 on every item
    assert paired_bootstrap_ci(a, b, tasks, {"b": 5}) == (1.0, 1.0, 1.0)


def test_bootstrap_is_stratified_by_task():
    # Task "a" always +1, task "b" always 0, sizes 10 and 90. Within each task the difference is
    # constant, so a stratified resample always gives (1 + 0) / 2 = 0.5. An unstratified one
    # draws a varying share of "a" items (sometimes none), which would widen the interval.
    tasks = ["a"] * 10 + ["b"] * 90
    a = np.array([1.0] * 10 + [0.0] * 90)
    b = np.zeros(100)
    assert paired_bootstrap_ci(a, b, tasks, n_resamples=2000) == (0.5, 0.5, 0.5)


def test_bootstrap_agrees_with_scipy_bootstrap_on_independent_samples():
    # scipy.stats.bootstrap resamples each sample independently: per-task samples = stratified.
    rng = np.random.default_rng(11)
    d_a, d_b = rng.normal(0.2, 1.0, 60), rng.normal(-0.1, 0.5, 140)
    a = np.concatenate([d_a, d_b])
    tasks = ["a"] * 60 + ["b"] * 140
    weights = {"a": 3.0, "b": 1.0}

    def statistic(x, y, axis=-1):
        return (3.0 * np.mean(x, axis=axis) + np.mean(y, axis=axis)) / 4.0

    ref = sps.bootstrap((d_a, d_b), statistic, n_resamples=20_000, method="percentile", rng=5, paired=False)
    diff, lo, hi = paired_bootstrap_ci(a, np.zeros_like(a), tasks, weights, n_resamples=20_000, seed=1)
    assert diff == pytest.approx(statistic(d_a, d_b))
    half_width = (hi - lo) / 2
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.03 * half_width)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.03 * half_width)


def test_bootstrap_coverage_on_known_shift():
    # 200 seeded experiments with known per-task accuracies; the 95% CI of the difference
    # should contain the true objective difference about 95% of the time.
    p_a, p_b, sizes, w = np.array([0.7, 0.5]), np.array([0.6, 0.45]), (150, 100), np.array([2.0, 1.0])
    true_diff = float(np.sum(w * (p_a - p_b)) / w.sum())
    tasks = np.repeat(["x", "y"], sizes)
    rng = np.random.default_rng(2024)
    covered = 0
    for sim in range(200):
        probs_a, probs_b = np.repeat(p_a, sizes), np.repeat(p_b, sizes)
        a = (rng.random(tasks.size) < probs_a).astype(float)
        b = (rng.random(tasks.size) < probs_b).astype(float)
        _, lo, hi = paired_bootstrap_ci(a, b, tasks, {"x": 2.0, "y": 1.0}, n_resamples=1000, seed=sim)
        covered += lo <= true_diff <= hi
    assert 0.90 <= covered / 200 <= 0.99


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    tasks = ["a", "b"] * 25
    assert paired_bootstrap_ci(a, b, tasks, seed=7) == paired_bootstrap_ci(a, b, tasks, seed=7)
    assert paired_bootstrap_ci(a, b, tasks, seed=7) != paired_bootstrap_ci(a, b, tasks, seed=8)


# ---------------------------------------------------------------------------------------------
# permutation


def _brute_force_p(a, b, tasks, weights):
    """Flip every item (zeros included) and recompute objective() from scratch."""
    d = np.asarray(a, float) - np.asarray(b, float)
    observed = abs(objective(d, tasks, weights))
    stats_ = [
        abs(objective(d * np.array(signs), tasks, weights))
        for signs in itertools.product((1.0, -1.0), repeat=d.size)
    ]
    return float(np.mean(np.array(stats_) >= observed - 1e-12))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([0.9, 0.4, 0.7, 0.2, 0.5, 0.8, 0.3, 0.6], [0.1, 0.4, 0.2, 0.5, 0.1, 0.3, 0.3, 0.2]),
        ([1, 1, 0, 1, 1, 0, 1, 1], [0, 1, 0, 0, 1, 1, 0, 0]),
    ],
)
def test_permutation_exact_matches_brute_force(a, b):
    tasks = ["a", "a", "a", "b", "b", "b", "b", "b"]
    weights = {"a": 2.0}
    ours = paired_permutation_p(a, b, tasks, weights)
    assert ours == pytest.approx(_brute_force_p(a, b, tasks, weights))
    coef = np.array([2.0 / (3 * 3)] * 3 + [1.0 / (3 * 5)] * 5)  # objective = sum_i coef_i * d_i
    ref = sps.permutation_test(  # 2^8 <= 9999: scipy enumerates exactly too
        (np.subtract(a, b, dtype=float),),
        lambda d, axis=-1: np.sum(d * coef, axis=axis),
        permutation_type="samples",
        vectorized=True,
    )
    assert ours == pytest.approx(ref.pvalue)


def test_permutation_exact_equals_mcnemar_for_one_binary_task():
    # One task, equal item weights: the sign-flip null of the mean difference is McNemar's.
    a, b = _pair_with_discordance(n01=2, n10=8)
    assert paired_permutation_p(a, b, ["t"] * len(a)) == pytest.approx(mcnemar_exact(a, b))


def test_permutation_monte_carlo_agrees_with_scipy():
    rng = np.random.default_rng(9)
    n = 60
    tasks = np.repeat(["a", "b"], [20, 40])
    a, b = rng.normal(0.25, 1.0, n), rng.normal(0.0, 1.0, n)
    coef = np.where(tasks == "a", 2.0 / (3 * 20), 1.0 / (3 * 40))  # weights a=2, b=1

    def statistic(d, axis=-1):
        return np.sum(d * coef, axis=axis)

    ref = sps.permutation_test(
        (a - b,), statistic, permutation_type="samples", n_resamples=20_000, vectorized=True, rng=1
    ).pvalue
    ours = paired_permutation_p(a, b, tasks, {"a": 2.0}, n_resamples=20_000, seed=3)
    assert 0.01 < ref < 0.5  # a case where the Monte Carlo error matters
    se = math.sqrt(2 * ref * (1 - ref) / 20_000)
    assert abs(ours - ref) < 4 * se


def test_permutation_monte_carlo_is_seeded_and_never_zero():
    a = np.arange(30, dtype=float)
    b = np.zeros(30)  # every difference positive: the most extreme outcome
    tasks = ["t"] * 30
    p = paired_permutation_p(a, b, tasks, n_resamples=999, seed=4)
    assert p == paired_permutation_p(a, b, tasks, n_resamples=999, seed=4)
    assert p == pytest.approx(1 / 1000)  # (0 + 1) / (999 + 1): only the +1 correction


# ---------------------------------------------------------------------------------------------
# intervals for one row


def test_wilson_8_of_10_by_hand_and_scipy():
    k, n, z = 8, 10, sps.norm.ppf(0.975)
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    lo, hi = wilson_interval(k, n)
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    assert (lo, hi) == pytest.approx((0.4901624715, 0.9433178485))
    ci = sps.binomtest(k, n).proportion_ci(method="wilson")
    assert (lo, hi) == pytest.approx((ci.low, ci.high))


def test_wilson_edges():
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and 0.6 < lo < 0.75  # not the degenerate Wald [1, 1]
    with pytest.raises(ValueError, match="successes <= n"):
        wilson_interval(11, 10)


def test_mean_interval_t_by_hand():
    values = [1.0, 2.0, 3.5]
    mean, sd = np.mean(values), np.std(values, ddof=1)
    half = sps.t.ppf(0.975, df=2) * sd / math.sqrt(3)
    assert mean_interval(values) == pytest.approx((mean - half, mean + half))
    assert mean_interval([2.0, 2.0]) == (2.0, 2.0)
    assert all(math.isnan(x) for x in mean_interval([2.0]))


def test_score_interval_picks_wilson_or_bootstrap():
    one_task = [1] * 8 + [0] * 2
    assert score_interval(one_task, ["t"] * 10) == pytest.approx(wilson_interval(8, 10))
    # two tasks, each constant: the stratified bootstrap has nothing to vary
    assert score_interval([1, 1, 0, 0, 0], ["a", "a", "b", "b", "b"], {"a": 3}) == (0.75, 0.75)
    rng = np.random.default_rng(1)
    values = rng.random(200)
    lo, hi = score_interval(values, ["t"] * 200, seed=2)
    assert lo < objective(values, ["t"] * 200) < hi
    assert (lo, hi) == score_interval(values, ["t"] * 200, seed=2)


# ---------------------------------------------------------------------------------------------
# Holm


def test_holm_by_hand():
    # sorted 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_monotone_and_capped():
    rng = np.random.default_rng(5)
    raw = rng.random(20) ** 2
    adjusted = np.array(holm(raw))
    order = np.argsort(raw)
    assert np.all(np.diff(adjusted[order]) >= 0)
    assert np.all(adjusted >= raw) and np.all(adjusted <= 1.0)
    assert holm([0.5, 0.6]) == [1.0, 1.0]


def test_holm_nan_stays_and_is_not_counted():
    out = holm([float("nan"), 0.01, 0.04])
    assert math.isnan(out[0])
    assert out[1:] == pytest.approx([0.02, 0.04])  # m = 2, not 3
    assert holm([]) == []
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.1, 1.5])


# ---------------------------------------------------------------------------------------------
# compare_paired and is_binary


def test_is_binary():
    assert is_binary([0, 1, 1.0, True])
    assert not is_binary([0, 0.5])
    assert not is_binary([0, float("nan")])


def test_compare_paired_picks_the_test():
    a, b = _pair_with_discordance(n01=2, n10=8)
    tasks = ["a", "b"] * (len(a) // 2)
    binary = compare_paired(a, b, tasks, n_resamples=2000)
    assert binary.test == "mcnemar" and binary.p_value == pytest.approx(mcnemar_exact(a, b))
    assert (binary.n_items, binary.n_discordant) == (len(a), 10)
    assert binary.diff == pytest.approx(objective(a, tasks) - objective(b, tasks))
    assert binary.ci_lo <= binary.diff <= binary.ci_hi
    scores = np.array(a) * 0.5 + 0.25
    cont = compare_paired(scores, b, tasks, n_resamples=2000)
    assert cont.test == "permutation"
    assert cont.p_value == paired_permutation_p(scores, b, tasks, n_resamples=2000)
    assert cont.n_discordant == len(a)
    with pytest.raises(AttributeError):
        cont.diff = 0.0  # frozen


def test_compare_paired_uses_the_permutation_test_when_items_weigh_differently():
    # Tasks of 6 and 2 items weighted equally: an item of the small task counts 3x in the
    # objective, so pooled McNemar would test another quantity than the interval's.
    a = [1, 1, 1, 1, 0, 0, 1, 1]
    b = [0, 0, 0, 1, 0, 0, 0, 0]
    tasks = ["big"] * 6 + ["small"] * 2
    unequal = compare_paired(a, b, tasks, n_resamples=2000)
    assert unequal.test == "permutation"
    proportional = compare_paired(a, b, tasks, weights={"big": 3, "small": 1}, n_resamples=2000)
    assert proportional.test == "mcnemar"
    assert proportional.p_value == pytest.approx(mcnemar_exact(a, b))


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: paired_bootstrap_ci([1, 0, 1], [1, 0], ["t"] * 3), r"same length.*got 3 and 2"),
        (lambda: paired_permutation_p([1, 0], [1, 0, 1], ["t"] * 2), r"same length.*got 2 and 3"),
        (lambda: compare_paired([], [], []), r"at least one item, got 0"),
        (lambda: objective([], []), r"at least one item, got 0"),
        (lambda: objective([1, 0], ["t"]), r"one label per value.*\(1,\) for 2 values"),
        (lambda: objective([1, float("nan")], ["t", "t"]), r"finite, got nan at index 1"),
        (lambda: objective([1, 0], ["a", "b"], {"a": -1}), r">= 0, got 'a'=-1"),
        (lambda: objective([1, 0], ["a", "b"], {"a": 0, "b": 0}), r"sum to > 0"),
        (lambda: objective([[1, 0]], ["t"]), r"1-D, got shape \(1, 2\)"),
        (lambda: paired_bootstrap_ci([1], [0], ["t"], confidence=1.5), r"confidence.*got 1.5"),
        (lambda: paired_permutation_p([1], [0], ["t"], n_resamples=0), r"n_resamples.*got 0"),
    ],
)
def test_bad_input_raises_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
