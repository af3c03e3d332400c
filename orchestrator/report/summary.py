"""``summary.json``, ``confirm_items.csv`` and ``trials.csv``: the study's results as data.

``summary.json`` keeps the schema of the sweep issue (``study``, ``best``, ``methods``,
``baselines``, ``trials``, ``items_evaluated``), where ``search`` and ``confirm`` map each task to
its score plus ``objective`` (the weighted mean), and adds the fair comparison: per method the
trials started/completed/pruned, the confirm mean over seeds and its spread, and the paired
difference to the best parent and to the uniform average (95% interval, p-value, Holm-corrected
p-value, test); per row the confirm interval. ``confirm_items.csv`` (row, task, item, value)
holds every confirm item of every row (the mean over seeds for random methods), enough to
recompute every statistic of the summary.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.report.compare import (
    Row,
    best_parent,
    beats_best_parent,
    budget_curves,
    method_counts,
    search_scores,
    significant,
    verdict,
)
from orchestrator.study.records import State, TrialRecord

SCHEMA = 2


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def _scores(objective: float | None, components: Mapping[str, float]) -> dict[str, float | None]:
    return {"objective": _num(objective), **{k: _num(v) for k, v in components.items()}}


def row_summary(row: Row) -> dict[str, Any]:
    """One row: search and confirm scores, interval, seeds, paired comparisons."""
    out: dict[str, Any] = {"name": row.name, "method": row.method, "trial": row.trial,
                           "search": _scores(row.search, row.search_components),
                           "search_stderr": _num(row.search_se)}
    if row.confirm is not None:
        out["confirm"] = _scores(row.confirm.score, row.confirm.components)
        out["confirm_ci95"] = [_num(x) for x in row.interval] if row.interval else None
        out["confirm_seeds"] = list(row.confirm.seeds)
        out["confirm_per_seed"] = [_num(x) for x in row.confirm.per_seed]
        out["confirm_spread"] = _num(row.spread)
    for label, comp in row.vs.items():
        out[f"vs_{label.replace(' ', '_')}"] = {
            "diff": _num(comp.diff), "ci95": [_num(comp.ci_lo), _num(comp.ci_hi)], "p": _num(comp.p_value),
            "p_holm": _num(row.p_holm.get(label)), "test": comp.test, "n_items": comp.n_items}
    out["beats_best_parent"] = significant(row)
    return out


def summary(study: str, rows: Sequence[Row], records: Sequence[TrialRecord], best: Row | None,
            best_seed: int | None, best_dir: str | None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The machine-readable result of a study (see the module docstring)."""
    counts = method_counts(records)
    by_name = {r.name: row_summary(r) for r in rows}
    methods = {}
    for method, c in counts.items():
        row = next((r for r in rows if r.method == method and not r.is_baseline), None)
        entry: dict[str, Any] = {"trials": c, "best_trial": row.trial if row else None}
        if row is not None:
            entry.update({k: v for k, v in by_name[row.name].items() if k not in ("name", "method", "trial")})
        methods[method] = entry
    parent = best_parent(rows)
    return {
        "schema": SCHEMA, "study": study,
        "best": None if best is None else {
            **{k: v for k, v in by_name[best.name].items() if k != "name"}, "recipe": dict(best.recipe),
            "seed": best_seed, "folder": best_dir, "beats_best_parent_on_confirm": beats_best_parent(rows, best)},
        "best_parent": parent.name if parent else None,
        "verdict": verdict(rows, best),
        "methods": methods,
        "baselines": {r.name: by_name[r.name] for r in rows if r.is_baseline},
        "trials": _state_counts(records),
        "items_evaluated": sum(r.items_evaluated for r in records if r.duplicate_of is None),
        "budget_curves": budget_curves(records),
        "search_scores": search_scores(records),
        **dict(extra or {}),
    }


def _state_counts(records: Sequence[TrialRecord]) -> dict[str, int]:
    out = {s.value: 0 for s in (State.COMPLETE, State.PRUNED, State.FAILED, State.INTERRUPTED)}
    for r in records:
        if r.state.value in out:
            out[r.state.value] += 1
    return out


def confirm_items_csv(rows: Sequence[Row]) -> str:
    """``row,task,item,value`` for every confirm item of every row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["row", "task", "item", "value"])
    for row in rows:
        for task, item, value in sorted(row.confirm.items if row.confirm else ()):
            writer.writerow([row.name, task, item, repr(float(value))])
    return out.getvalue()


def trials_csv(records: Sequence[TrialRecord]) -> str:
    """One line per trial: number, method, state, parameters, rung scores, seconds, reason."""
    params = sorted({k for r in records for k in r.params if k != "method"})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["trial", "method", "state", "score", *params, "rungs", "merge_s", "eval_s",
                     "duplicate_of", "reason"])
    for r in sorted(records, key=lambda r: r.number):
        if r.state is State.WAITING:
            continue
        rungs = " ".join(f"{x.score:.4f}@{x.n_items}" for x in r.rungs)
        writer.writerow([r.number, r.method, r.state.value, _fmt(r.value), *(_fmt(r.params.get(p)) for p in params),
                         rungs, _fmt(r.merge_s), _fmt(r.eval_s), "" if r.duplicate_of is None else r.duplicate_of,
                         r.reason])
    return out.getvalue()


def _fmt(x: Any) -> str:
    if x is None:
        return ""
    return f"{x:.6g}" if isinstance(x, float) else str(x)
