"""Pure statistics for comparing merges honestly on the same confirm items.

Every row (a parent, the uniform average, the best merge of a method) is scored on the same
items. An item has a value (0/1 accuracy for multiple choice, any float otherwise) and a task.
A row's score is the objective: the weighted mean over tasks of each task's mean item value,

    score = sum_t w_t * mean_t(values) / sum_t w_t      (w_t defaults to 1).

So intervals and tests here resample or permute *within* tasks and compute the same statistic:
a plain item-level mean would weight tasks by their sizes, which the objective does not.

Functions take lists or numpy arrays and raise ``ValueError`` (stating the rule and the values)
for misaligned or empty input. Randomness comes only from a seeded ``numpy.random.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

# Elements per bootstrap/permutation chunk: bounds memory (~16 MB of int64 indices) while
# keeping the work in numpy. Chunking depends only on the input size, so results stay seeded.
_CHUNK_ELEMENTS = 2_000_000
# Relative tolerance when comparing permuted statistics with the observed one: the same sum in
# another order can differ in the last bits, and a tie must count as "at least as extreme".
_TIE_RTOL = 1e-9

ArrayLike = Sequence[Any] | np.ndarray
Weights = Mapping[Hashable, float] | None


# ---------------------------------------------------------------------------------------------
# Input validation and task strata


def _as_values(values: ArrayLike, name: str = "values") -> np.ndarray:
    """A 1-D finite float array with at least one item, or ValueError."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must have at least one item, got 0")
    if not np.all(np.isfinite(arr)):
        where = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{name} must be finite, got {arr[where]} at index {where}")
    return arr


def _as_pair(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Two aligned value arrays (the same items in the same order), or ValueError."""
    a_arr, b_arr = _as_values(a, "a"), _as_values(b, "b")
    if a_arr.size != b_arr.size:
        raise ValueError(
            f"a and b must have the same length (paired items), got {a_arr.size} and {b_arr.size}"
        )
    return a_arr, b_arr


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _check_resamples(n_resamples: int) -> None:
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be an integer >= 1, got {n_resamples}")


@dataclass(frozen=True)
class _Strata:
    """Items grouped by task: ``codes[i]`` is item i's task index into ``labels``."""

    labels: np.ndarray
    codes: np.ndarray
    counts: np.ndarray
    weights: np.ndarray  # task weights aligned with labels, sum > 0

    def means(self, values: np.ndarray) -> np.ndarray:
        """Per-task means of item values, aligned with ``labels``."""
        return np.bincount(self.codes, weights=values, minlength=self.labels.size) / self.counts

    def combine(self, task_means: np.ndarray) -> np.ndarray | float:
        """The objective from per-task means (last axis = tasks)."""
        return np.sum(task_means * self.weights, axis=-1) / np.sum(self.weights)

    def item_coefficients(self) -> np.ndarray:
        """c_i with objective(values) == sum_i c_i * values_i (the objective is linear)."""
        return (self.weights / (np.sum(self.weights) * self.counts))[self.codes]


def _strata(tasks: ArrayLike, n_values: int, weights: Weights) -> _Strata:
    """Task strata for ``n_values`` items; weights missing for a task default to 1."""
    labels_in = np.asarray(tasks)
    if labels_in.ndim != 1 or labels_in.size != n_values:
        raise ValueError(
            f"tasks must be 1-D with one label per value, "
            f"got shape {labels_in.shape} for {n_values} values"
        )
    labels, codes = np.unique(labels_in, return_inverse=True)
    weights = weights or {}
    # Keys are the labels as given (e.g. str), not numpy scalars: look up with .item().
    w = np.array([float(weights.get(label.item(), 1.0)) for label in labels])
    for label, value in zip(labels, w):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"task weights must be finite and >= 0, got {label.item()!r}={value}")
    if w.sum() <= 0:
        present = dict(zip(labels.tolist(), w.tolist()))
        raise ValueError(f"task weights must sum to > 0 over the tasks present, got {present}")
    codes = codes.ravel()
    return _Strata(labels=labels, codes=codes, counts=np.bincount(codes).astype(float), weights=w)


# ---------------------------------------------------------------------------------------------
# Scores and intervals for one row


def objective(values: ArrayLike, tasks: ArrayLike, weights: Weights = None) -> float:
    """The objective of a row: the weighted mean over tasks of per-task mean item values.

    Args:
        values: item values (1-D).
        tasks: the task label of each item, aligned with ``values``.
        weights: task -> weight (finite, >= 0); tasks not in it weigh 1, extra keys are ignored.

    Returns:
        ``sum_t w_t * mean_t(values) / sum_t w_t``.
    """
    arr = _as_values(values)
    strata = _strata(tasks, arr.size, weights)
    return float(strata.combine(strata.means(arr)))


def is_binary(values: ArrayLike) -> bool:
    """True when every value is 0 or 1 (bools and 0.0/1.0 count; NaN does not)."""
    arr = np.asarray(values, dtype=float)
    return bool(np.all((arr == 0.0) | (arr == 1.0)))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (no continuity correction).

    Wilson rather than the normal (Wald) interval because it stays inside [0, 1] and keeps its
    coverage near 0 and 1, where good or bad merges' accuracies sit.

    Returns:
        ``(lo, hi)``; ``(nan, nan)`` when ``n == 0`` (no evidence either way).
    """
    _check_confidence(confidence)
    if int(n) != n or int(successes) != successes or not 0 <= successes <= n:
        raise ValueError(f"need integers 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return math.nan, math.nan
    ci = sps.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def mean_interval(values: ArrayLike, confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval for the mean of non-0/1 values (e.g. F1, BLEU, log-likelihood).

    ``mean +- t_{n-1} * s / sqrt(n)``: the t quantile rather than z so that small samples are
    not over-confident. Constant values give ``(mean, mean)``; one value gives ``(nan, nan)``
    because its spread cannot be estimated.
    """
    _check_confidence(confidence)
    arr = _as_values(values)
    if arr.size < 2:
        return math.nan, math.nan
    mean = float(np.mean(arr))
    t_quantile = sps.t.ppf(0.5 + confidence / 2, df=arr.size - 1)
    half = float(t_quantile * np.std(arr, ddof=1) / math.sqrt(arr.size))
    return mean - half, mean + half


def _bootstrap_objectives(
    values: np.ndarray, strata: _Strata, n_resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """Objectives of ``n_resamples`` stratified bootstrap resamples of ``values``.

    Each task's items are resampled with replacement within that task, so each resample keeps
    every task's item count (and thus the objective's task weighting); an unstratified
    bootstrap would let task proportions drift and inflate the interval when tasks differ.
    """
    groups = [values[strata.codes == t] for t in range(strata.labels.size)]
    out = np.empty(n_resamples)
    chunk = max(1, _CHUNK_ELEMENTS // values.size)
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        task_means = np.empty((size, len(groups)))
        for t, group in enumerate(groups):
            idx = rng.integers(0, group.size, size=(size, group.size))
            task_means[:, t] = group[idx].sum(axis=1) / group.size
        out[start : start + size] = strata.combine(task_means)
    return out


def _percentile_ci(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    lo, hi = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def score_interval(
    values: ArrayLike,
    tasks: ArrayLike,
    weights: Weights = None,
    seed: int = 0,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
) -> tuple[float, float]:
    """An interval for a row's objective.

    One task with 0/1 values: the Wilson interval (exact-ish, closed form, sane at 0% and 100%).
    Otherwise a stratified bootstrap percentile interval of the objective: the objective mixes
    tasks of different sizes and weights, and the bootstrap gets its spread without a variance
    formula for each metric. Note it is degenerate ([x, x]) when every task is constant.

    Args:
        values: item values; tasks: task labels aligned with them; weights: task -> weight.
        seed: seeds the bootstrap's numpy Generator.
        confidence: the interval's level; n_resamples: bootstrap resamples.
    """
    _check_confidence(confidence)
    _check_resamples(n_resamples)
    arr = _as_values(values)
    strata = _strata(tasks, arr.size, weights)
    if strata.labels.size == 1 and is_binary(arr):
        return wilson_interval(int(arr.sum()), arr.size, confidence)
    boots = _bootstrap_objectives(arr, strata, int(n_resamples), np.random.default_rng(seed))
    return _percentile_ci(boots, confidence)


# ---------------------------------------------------------------------------------------------
# Paired comparisons of two rows on the same items


def mcnemar_exact(a: ArrayLike, b: ArrayLike) -> float:
    """Two-sided exact McNemar p-value for paired 0/1 outcomes.

    Only discordant items carry evidence: with n01 = #(a=0, b=1) and n10 = #(a=1, b=0), under
    H0 each discordant item is a fair coin, so p = binomtest(min(n01, n10), n01 + n10, 0.5).
    No discordant items gives p = 1.0. Items are pooled across tasks (see ``compare_paired``).
    """
    a_arr, b_arr = _as_pair(a, b)
    for name, arr in (("a", a_arr), ("b", b_arr)):
        if not is_binary(arr):
            bad = arr[(arr != 0) & (arr != 1)][0]
            raise ValueError(f"mcnemar_exact needs 0/1 outcomes, got {bad} in {name}")
    n01 = int(np.sum((a_arr == 0) & (b_arr == 1)))
    n10 = int(np.sum((a_arr == 1) & (b_arr == 0)))
    if n01 + n10 == 0:
        return 1.0
    return float(sps.binomtest(min(n01, n10), n01 + n10, 0.5).pvalue)


def _sign_matrix_exact(m: int) -> np.ndarray:
    """All 2^m sign vectors (rows) of length m, as +-1 floats."""
    bits = (np.arange(2**m)[:, None] >> np.arange(m)) & 1
    return 1.0 - 2.0 * bits


def paired_permutation_p(
    a: ArrayLike,
    b: ArrayLike,
    tasks: ArrayLike,
    weights: Weights = None,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> float:
    """Two-sided paired sign-flip permutation test of the objective difference.

    Under H0 (a and b exchangeable on each item) every item's difference d_i = a_i - b_i is as
    likely to have either sign. The statistic is objective(d) (linear: sum_i c_i d_i), and the
    p-value is the share of sign flips with |statistic| >= |observed|. Zero differences cannot
    change, so only the m nonzero ones are flipped: exact enumeration when 2^m <= n_resamples,
    else Monte Carlo with ``(count + 1) / (n_resamples + 1)`` (never 0, valid for a random
    sample of flips). All differences zero gives p = 1.0.
    """
    _check_resamples(n_resamples)
    a_arr, b_arr = _as_pair(a, b)
    strata = _strata(tasks, a_arr.size, weights)
    terms = (strata.item_coefficients() * (a_arr - b_arr))[a_arr != b_arr]
    m = terms.size
    if m == 0:
        return 1.0
    threshold = abs(float(terms.sum())) - _TIE_RTOL * float(np.abs(terms).sum())
    if m < 63 and 2**m <= n_resamples:
        return float(np.mean(np.abs(_sign_matrix_exact(m) @ terms) >= threshold))
    rng = np.random.default_rng(seed)
    count, chunk = 0, max(1, _CHUNK_ELEMENTS // m)
    for start in range(0, int(n_resamples), chunk):
        size = min(chunk, int(n_resamples) - start)
        signs = 1.0 - 2.0 * rng.integers(0, 2, size=(size, m))
        count += int(np.sum(np.abs(signs @ terms) >= threshold))
    return (count + 1) / (int(n_resamples) + 1)


def paired_bootstrap_ci(
    a: ArrayLike,
    b: ArrayLike,
    tasks: ArrayLike,
    weights: Weights = None,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Observed objective difference and its stratified paired bootstrap percentile interval.

    Items are resampled with replacement within each task, with the same indices for a and b
    (pairing keeps the item-level correlation between rows, which makes the interval far
    narrower than resampling rows independently). Because the objective is linear, resampling
    the differences a - b is the same as resampling both rows with shared indices.

    Returns:
        ``(diff, lo, hi)`` with ``diff = objective(a) - objective(b)``; ``(0, 0, 0)`` exactly
        when a == b on every item.
    """
    _check_confidence(confidence)
    _check_resamples(n_resamples)
    a_arr, b_arr = _as_pair(a, b)
    strata = _strata(tasks, a_arr.size, weights)
    diff = float(strata.combine(strata.means(a_arr)) - strata.combine(strata.means(b_arr)))
    boots = _bootstrap_objectives(a_arr - b_arr, strata, int(n_resamples), np.random.default_rng(seed))
    lo, hi = _percentile_ci(boots, confidence)
    return diff, lo, hi


def holm(pvalues: Sequence[float] | np.ndarray) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order.

    Step-down: the k-th smallest of m p-values is multiplied by (m - k + 1), then a running
    maximum keeps the adjusted values monotone in the raw ones, capped at 1. Controls the
    family-wise error rate under any dependence (the rows share items, so tests are dependent).
    NaN entries (tests not run) stay NaN and do not count towards m.
    """
    p = np.asarray(pvalues, dtype=float).ravel()
    finite = ~np.isnan(p)
    outside = finite & ((p < 0) | (p > 1))
    if np.any(outside):
        raise ValueError(f"p-values must be in [0, 1] or NaN, got {p[outside].tolist()}")
    out = np.full(p.size, np.nan)
    idx = np.flatnonzero(finite)
    order = idx[np.argsort(p[idx], kind="stable")]
    m = order.size
    scaled = p[order] * (m - np.arange(m))
    out[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return out.tolist()


@dataclass(frozen=True)
class PairedComparison:
    """The comparison of two rows on the same items.

    Attributes:
        diff: objective(a) - objective(b).
        ci_lo, ci_hi: stratified paired bootstrap percentile interval (95%) of ``diff``.
        p_value: two-sided p-value of ``test``.
        test: "mcnemar" (both rows 0/1) or "permutation" (sign-flip on the objective).
        n_items: paired items; n_discordant: items where a != b (discordant pairs for 0/1).
    """

    diff: float
    ci_lo: float
    ci_hi: float
    p_value: float
    test: str
    n_items: int
    n_discordant: int


def compare_paired(
    a: ArrayLike,
    b: ArrayLike,
    tasks: ArrayLike,
    weights: Weights = None,
    seed: int = 0,
    n_resamples: int = 10_000,
) -> PairedComparison:
    """Compare two rows on the same items: difference, 95% interval and a p-value.

    When both rows are 0/1 and every item carries the same weight in the objective (one task,
    or task weights proportional to task sizes) the p-value is the exact McNemar test: it
    pools items, which is then exactly a test of the objective. Otherwise it is the sign-flip
    permutation test on the objective itself, which respects the task weighting (McNemar on
    pooled items can disagree with the objective's interval when tasks of unequal sizes are
    weighted equally). The interval always follows the objective (stratified paired bootstrap).
    """
    a_arr, b_arr = _as_pair(a, b)
    diff, lo, hi = paired_bootstrap_ci(a_arr, b_arr, tasks, weights, n_resamples=n_resamples, seed=seed)
    coefficients = _strata(tasks, a_arr.size, weights).item_coefficients()
    equal_items = bool(np.allclose(coefficients, coefficients[0], rtol=1e-9, atol=0))
    if equal_items and is_binary(a_arr) and is_binary(b_arr):
        test, p_value = "mcnemar", mcnemar_exact(a_arr, b_arr)
    else:
        test = "permutation"
        p_value = paired_permutation_p(a_arr, b_arr, tasks, weights, n_resamples=n_resamples, seed=seed)
    return PairedComparison(
        diff=diff,
        ci_lo=lo,
        ci_hi=hi,
        p_value=p_value,
        test=test,
        n_items=int(a_arr.size),
        n_discordant=int(np.sum(a_arr != b_arr)),
    )
