"""``compare --study NAME [--study NAME2 ...]``: the comparison of finished studies, again.

One study: its table (with intervals and paired tests), recomputed from what the study
stored, and its report files rewritten in ``RUNS_DIR/NAME/``. Several studies (typically the
same methods with other ``study.seed``): each one's table, then per method how many studies it
won (the best confirm score among the methods), how often it beat the best parent
significantly, and its mean confirm score, written to ``RUNS_DIR/comparisons/<names>/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.commands._study import add_study_args, open_study_group
from orchestrator.errors import UserError


def configure(parser: argparse.ArgumentParser) -> None:
    add_study_args(parser, many=True)
    parser.add_argument("--out", default=None, help="folder of the combined report (several studies)")


def run(args: argparse.Namespace) -> int:
    runs_dir = Path(args.runs_dir)
    summaries = {}
    for name in dict.fromkeys(args.study):
        summaries[name] = one_study(name, runs_dir, args.storage)
    if len(summaries) > 1:
        text = across(summaries)
        print(text)
        out = Path(args.out) if args.out else runs_dir / "comparisons" / "+".join(summaries)
        from orchestrator.sweep.finish import write_files

        write_files(out, {"comparison.md": text + "\n", "summary.json": json.dumps(wins(summaries), indent=2)})
        print(f"written: {out}")
    return 0


def one_study(name: str, runs_dir: Path, storage: str | None) -> dict[str, Any]:
    """Rebuild one study's comparison from its storage; print it; rewrite its report files."""
    from orchestrator.report.compare import compare, method_counts
    from orchestrator.report.html import report_html
    from orchestrator.report.summary import confirm_items_csv, summary, trials_csv
    from orchestrator.report.table import LEGEND, format_table
    from orchestrator.sweep.finish import best_of, shown_path, stored_rows, write_files

    group = open_study_group(name, runs_dir, storage)
    rows = stored_rows(group.notes)
    if not rows or any(r.confirm is None for r in rows):
        raise UserError(f"study {name!r} has not concluded yet (no confirm results): let its sweep finish, "
                        "or run it again to conclude it")
    fingerprint = group.notes.fingerprint() or {}
    weights = {k.removeprefix("eval.tasks."): json.loads(v).get("weight", 1.0)
               for k, v in fingerprint.items() if k.startswith("eval.tasks.")}
    seed = int(fingerprint.get("study.seed", 0))
    compare(rows, weights, seed=seed)
    records = group.records()
    best, best_dir = best_of(rows), runs_dir / name / "best"
    data = summary(name, rows, records, best, group.notes.best_seed(),
                   shown_path(best_dir) if best_dir.is_dir() else None)
    counts = method_counts(records)
    table = format_table(rows, counts)
    print(f"## {name}\n\n{table}\n\n{data['verdict']}\n")
    write_files(runs_dir / name, {"summary.json": json.dumps(data, indent=2), "confirm_items.csv": confirm_items_csv(rows),
                                  "trials.csv": trials_csv(records),
                                  "comparison.md": f"{table}\n\n{data['verdict']}\n\n{LEGEND}\n",
                                  "report.html": report_html(name, rows, data, counts)})
    return data


def wins(summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: studies run, won (best confirm among methods), beat the best parent, confirm scores."""
    out: dict[str, dict[str, Any]] = {}
    for name, data in summaries.items():
        scores = {m: (e.get("confirm") or {}).get("objective") for m, e in data["methods"].items()}
        scores = {m: s for m, s in scores.items() if s is not None}
        winner = max(scores, key=scores.get) if scores else None
        for method, score in scores.items():
            entry = out.setdefault(method, {"studies": 0, "wins": 0, "beats_best_parent": 0, "confirm": []})
            entry["studies"] += 1
            entry["wins"] += method == winner
            entry["beats_best_parent"] += bool(data["methods"][method].get("beats_best_parent"))
            entry["confirm"].append(score)
    return out


def across(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """The markdown table of ``wins`` over several studies."""
    table = wins(summaries)
    lines = [f"## Across {len(summaries)} studies: {', '.join(summaries)}", "",
             "| method | studies | wins (best confirm) | beat the best parent significantly | confirm mean | sd |",
             "|---|---:|---:|---:|---:|---:|"]
    for method, e in sorted(table.items(), key=lambda kv: -statistics.fmean(kv[1]["confirm"])):
        sd = statistics.stdev(e["confirm"]) if len(e["confirm"]) > 1 else float("nan")
        lines.append(f"| {method} | {e['studies']} | {e['wins']} | {e['beats_best_parent']} | "
                     f"{statistics.fmean(e['confirm']):.4f} | {sd:.4f} |")
    return "\n".join(lines)

