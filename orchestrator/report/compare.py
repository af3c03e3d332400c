"""The comparison a study ends with: rows on the confirm items, paired statistics, a verdict.

Pure functions over data: ``Row``s (the baselines and each method's best trial, scored on the
confirm split item by item) and the study's ``TrialRecord``s. ``compare`` pairs every merge row
with the best parent and with the uniform average on the same confirm items: the difference of
the objective with a 95% interval (paired bootstrap over items, stratified by task, seeded) and
a p-value (exact McNemar for 0/1 items when every item weighs the same, else a paired sign-flip
permutation test), Holm-corrected across the rows of the table. Each row's confirm score gets a
95% interval too (Wilson for one 0/1 task, else a stratified bootstrap). ``summary`` turns it all
into ``summary.json``; everything in it can be recomputed from ``confirm_items.csv``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.report import stats
from orchestrator.study.records import ConfirmResult, State, TrialRecord

ALPHA = 0.05
BASELINE, AVERAGE, PARENT = "baseline", "uniform average", "parent:"


@dataclass
class Row:
    """One line of the comparison: a baseline, or the best trial of a method.

    ``confirm`` is filled by the confirm step; ``vs`` by ``compare`` (keyed ``best parent`` and
    ``uniform average``).
    """

    name: str
    method: str
    recipe: Mapping[str, Any]
    search: float
    search_se: float
    search_components: Mapping[str, float] = field(default_factory=dict)
    trial: int | None = None
    confirm_key: str | None = None
    confirm: ConfirmResult | None = None
    interval: tuple[float, float] | None = None
    vs: dict[str, stats.PairedComparison] = field(default_factory=dict)
    p_holm: dict[str, float] = field(default_factory=dict)

    def stored(self) -> dict[str, Any]:
        """What the study keeps of the row to rebuild it later (the confirm result is kept apart)."""
        return {"name": self.name, "method": self.method, "recipe": dict(self.recipe), "search": self.search,
                "search_se": None if math.isnan(self.search_se) else self.search_se,
                "search_components": dict(self.search_components), "trial": self.trial,
                "confirm_key": self.confirm_key}

    @classmethod
    def from_stored(cls, data: Mapping[str, Any], confirm: ConfirmResult | None) -> Row:
        se = data.get("search_se")
        return cls(data["name"], data["method"], data["recipe"], data["search"], math.nan if se is None else se,
                   dict(data.get("search_components") or {}), data.get("trial"), data.get("confirm_key"), confirm)

    @property
    def is_baseline(self) -> bool:
        return self.method == BASELINE

    @property
    def is_parent(self) -> bool:
        return self.name.startswith(PARENT)

    @property
    def spread(self) -> float | None:
        """Standard deviation of the confirm score across seeds (random methods)."""
        per_seed = self.confirm.per_seed if self.confirm else ()
        return statistics.stdev(per_seed) if len(per_seed) > 1 else None

    def items(self) -> tuple[list[str], list[str], list[float]]:
        """(tasks, items, values) of the confirm split, in a fixed order."""
        rows = sorted(self.confirm.items) if self.confirm else []
        return [t for t, _, _ in rows], [i for _, i, _ in rows], [v for _, _, v in rows]


def best_parent(rows: Sequence[Row]) -> Row | None:
    """The parent with the best confirm score (the conservative reference)."""
    parents = [r for r in rows if r.is_parent and r.confirm is not None]
    return max(parents, key=lambda r: r.confirm.score, default=None)


def reference_rows(rows: Sequence[Row]) -> dict[str, Row]:
    """The rows every merge is compared with: the best parent and the uniform average."""
    refs = {}
    parent = best_parent(rows)
    if parent is not None:
        refs["best parent"] = parent
    average = next((r for r in rows if r.name == AVERAGE and r.confirm is not None), None)
    if average is not None:
        refs["uniform average"] = average
    return refs


def compare(rows: Sequence[Row], weights: Mapping[str, float], seed: int, n_resamples: int = 10_000) -> None:
    """Fill each row's confirm interval and, for merge rows, the paired comparisons (in place)."""
    for row in rows:
        if row.confirm is not None and row.confirm.items:
            tasks, _, values = row.items()
            row.interval = stats.score_interval(values, tasks, weights, seed=seed, n_resamples=n_resamples)
    refs = reference_rows(rows)
    merges = [r for r in rows if not r.is_baseline and r.confirm is not None and r.confirm.items]
    for row in merges:
        tasks, items, values = row.items()
        for label, ref in refs.items():
            ref_tasks, ref_items, ref_values = ref.items()
            if ref_items != items:
                raise ValueError(f"rows {row.name!r} and {ref.name!r} were scored on different confirm items")
            row.vs[label] = stats.compare_paired(values, ref_values, tasks, weights, seed=seed,
                                                 n_resamples=n_resamples)
    for label in refs:
        scored = [r for r in merges if label in r.vs]
        for row, p in zip(scored, stats.holm([r.vs[label].p_value for r in scored])):
            row.p_holm[label] = p


def significant(row: Row, label: str = "best parent") -> bool:
    """The row beats the reference: a positive difference, Holm-corrected p below 0.05."""
    comp = row.vs.get(label)
    return comp is not None and comp.diff > 0 and row.p_holm.get(label, 1.0) < ALPHA


def verdict(rows: Sequence[Row], best: Row | None) -> str:
    """One line: which merges beat the best parent significantly and by how much, or none."""
    parent = best_parent(rows)
    if parent is None:
        return "no parent was scored on the confirm split: nothing to compare with"
    winners = [r for r in rows if significant(r)]
    head = f"best parent on confirm: {parent.name.removeprefix(PARENT)} {parent.confirm.score:.4f}"
    if not winners:
        above = best is not None and best.confirm is not None and best.confirm.score > parent.confirm.score
        tail = ("the best merge scores above it but not significantly" if above
                else "no merge beat it on the confirm split")
        return f"{head}; no merge beat the best parent significantly (Holm-corrected p < {ALPHA}): {tail}"
    parts = [f"{r.name} by {_signed(r.vs['best parent'].diff)} (95% CI {_signed(r.vs['best parent'].ci_lo)} "
             f"to {_signed(r.vs['best parent'].ci_hi)}, p={r.p_holm['best parent']:.2g})" for r in winners]
    return f"{head}; beaten significantly by " + "; ".join(parts)


def beats_best_parent(rows: Sequence[Row], best: Row | None) -> bool:
    """Whether the best merge's confirm score is above the best parent's."""
    parent = best_parent(rows)
    return (best is not None and best.confirm is not None and parent is not None
            and best.confirm.score > parent.confirm.score)


def _signed(x: float) -> str:
    return f"{x:+.4f}"


# ----------------------------------------------------------------------------- budgets


def method_counts(records: Sequence[TrialRecord]) -> dict[str, dict[str, int]]:
    """Per method: trials started, completed, pruned, failed (interrupted ones not counted)."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        if r.state in (State.WAITING, State.INTERRUPTED) or not r.method:
            continue
        c = out.setdefault(r.method, {"started": 0, "complete": 0, "pruned": 0, "failed": 0})
        c["started"] += 1
        key = {State.COMPLETE: "complete", State.PRUNED: "pruned", State.FAILED: "failed"}.get(r.state)
        if key:
            c[key] += 1
    return out


def budget_curves(records: Sequence[TrialRecord]) -> dict[str, list[dict[str, float]]]:
    """Per method, in trial order: trials started, items evaluated so far, best search score so far.

    Only complete trials set a best (a pruned trial's partial score is not comparable); the
    items of pruned and failed trials count toward the budget spent.
    """
    out: dict[str, list[dict[str, float]]] = {}
    state: dict[str, tuple[int, int, float]] = {}
    for r in sorted(records, key=lambda r: r.number):
        if not r.state.finished or r.state is State.INTERRUPTED or not r.method:
            continue
        started, items, best = state.get(r.method, (0, 0, -math.inf))
        started, items = started + 1, items + r.items_evaluated
        if r.state is State.COMPLETE and r.value is not None:
            best = max(best, r.value)
        state[r.method] = (started, items, best)
        out.setdefault(r.method, []).append({"trials": started, "items": items,
                                             "best": best if math.isfinite(best) else None})
    return out


def search_scores(records: Sequence[TrialRecord]) -> dict[str, list[float]]:
    """Per method, the search scores of its complete trials (the distribution of each method)."""
    out: dict[str, list[float]] = {}
    for r in records:
        if r.state is State.COMPLETE and r.value is not None and r.duplicate_of is None:
            out.setdefault(r.method, []).append(r.value)
    return out
