"""The end of a study: baselines, the confirm split, the statistics, the best merge, the report.

Run by the worker that ends the study (once per state of it): each parent and the uniform
average, and the best trial of each method, are scored on the confirm split item by item
(random methods on ``eval.confirm_seeds`` seeds); the rows are compared pairwise
(``report.compare``); the best merge (chosen on the search split) is written to
``runs/<study>/best/`` with its card; ``summary.json``, ``confirm_items.csv``, ``trials.csv``,
``comparison.md`` and ``report.html`` go to ``runs/<study>/`` and to the MLflow parent run with
the verdict, the plots and the registered model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator.config import SweepConfig
from orchestrator.engine.adapter_output import merge_recipe_to_disk
from orchestrator.merge import get_method
from orchestrator.report import card, plots
from orchestrator.report.compare import BASELINE, Row, compare, method_counts
from orchestrator.report.html import report_html
from orchestrator.report.summary import confirm_items_csv, summary, trials_csv
from orchestrator.report.table import LEGEND, format_table
from orchestrator.study.candidates import baseline_recipes
from orchestrator.study.records import State, StudyNotes, TrialRecord, recipe_key
from orchestrator.study.resident import Resident
from orchestrator.sweep.setup import Setup
from orchestrator.tracking import registry
from orchestrator.tracking.review import log_review


def run_baselines(notes: StudyNotes, resident: Resident, setup: Setup, tracker: Any, say: Any,
                  quiet: bool = False) -> list[Row]:
    """Each parent and the uniform average on the search split (stored in the study, once)."""
    stored = notes.baselines()
    logged = tracker.logged_baselines() if tracker.enabled else set()
    rows = []
    for name, recipe in baseline_recipes(setup.candidates).items():
        if name not in stored:
            resident.merge(recipe, 0)
            rung = resident.full_search()
            notes.set_baseline(name, recipe, rung)
            stored = notes.baselines()
        b = stored[name]
        if name not in logged:
            from orchestrator.study.records import Rung

            tracker.log_baseline(name, recipe, Rung(b["n_items"], b["score"], b["stderr"] or float("nan"),
                                                    b["components"]))
        rows.append(Row(name, BASELINE, b["recipe"], b["score"], _nan(b["stderr"]), dict(b["components"])))
        if not quiet:
            say(f"baseline {name:<22} search {b['score']:.4f} ± {_nan(b['stderr']):.4f}")
    return rows


def _nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


def best_rows(records: Sequence[TrialRecord], methods: Sequence[str], multi_objective: bool) -> list[Row]:
    """The best complete trial of each method (every Pareto-optimal trial when multi-objective)."""
    done = [r for r in records if r.state is State.COMPLETE and r.recipe is not None and r.values]
    if multi_objective:
        return [_row(r, f"pareto #{r.number}") for r in _pareto(done)]
    rows = []
    for method in methods:
        mine = [r for r in done if r.method == method]
        if mine:
            rows.append(_row(max(mine, key=lambda r: (r.value, -r.number)), f"best {method}"))
    return rows


def _row(r: TrialRecord, name: str) -> Row:
    last = r.last
    return Row(name, r.method, dict(r.recipe), r.value, last.stderr if last else float("nan"),
               dict(last.components) if last else {}, trial=r.number)


def _pareto(done: Sequence[TrialRecord]) -> list[TrialRecord]:
    def dominated(a: TrialRecord) -> bool:
        return any(all(y >= x for x, y in zip(a.values, b.values)) and b.values != a.values for b in done)
    return [r for r in done if not dominated(r)]


def confirm_seeds(recipe: Mapping[str, Any], seed: int, n: int) -> tuple[int, ...]:
    """The study's seed, and for methods that draw random masks the next ``n - 1`` too."""
    return tuple(seed + i for i in range(n)) if get_method(recipe["merge_method"]).random else (seed,)


def confirm_rows(rows: Sequence[Row], resident: Resident, notes: StudyNotes, seed: int, n_seeds: int,
                 say: Any) -> None:
    """Score each row on the confirm split, item by item (cached in the study by recipe and seeds)."""
    for row in rows:
        seeds = confirm_seeds(row.recipe, seed, n_seeds)
        key = f"{recipe_key(row.recipe, 0)}:{','.join(map(str, seeds))}"
        result = notes.confirmed(key)
        if result is None:
            result = resident.confirm(row.recipe, seeds)
            notes.set_confirmed(key, result)
        row.confirm, row.confirm_key = result, key
        spread = f" (mean of {len(seeds)} seeds, sd {row.spread:.4f})" if len(seeds) > 1 else ""
        say(f"confirm {row.name:<24} {result.score:.4f}{spread}")


def closest_seed(row: Row) -> int | None:
    """The confirm seed whose score is closest to the mean over seeds (the one saved)."""
    if row.confirm is None or not row.confirm.seeds:
        return None
    pairs = zip(row.confirm.seeds, row.confirm.per_seed)
    return min(pairs, key=lambda p: (abs(p[1] - row.confirm.score), p[0]))[0]


def shown_path(path: Path) -> str:
    """``path`` relative to the working folder when it is under it (what a user types)."""
    try:
        return os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd().resolve()) else str(path)
    except ValueError:
        return str(path)


def save_best(cfg: SweepConfig, best: Row, seed: int | None, rows: Sequence[Row], summary_data: Mapping[str, Any],
              counts: Mapping[str, Mapping[str, int]], out_dir: Path) -> Path:
    """Write the best merge as a model folder (staged, renamed into place) with its card and scores."""
    folder = shown_path(out_dir)

    def add_scores(stage: Path) -> None:
        section = card.scores_section(cfg.study.name, rows, best, seed, summary_data["verdict"], counts)
        with open(stage / "README.md", "a", encoding="utf-8") as handle:
            handle.write(section)
        (stage / "scores.json").write_text(json.dumps(card.scores_json(cfg.study.name, best, seed, folder,
                                                                        summary_data), indent=2))

    merge_recipe_to_disk(best.recipe, out_dir, seed=seed or 0, overwrite=True,
                         card_title=card.card_title(cfg.study.name, folder), card_path=folder, before_commit=add_scores,
                         **({} if best.recipe.get("parameters", {}).get("knots") else
                            {"allow_pickle": cfg.candidates.allow_pickle}))
    return out_dir


def write_files(folder: Path, files: Mapping[str, str]) -> None:
    """The study's report files, each written to a temporary name and renamed into place."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(folder / name)


def answers_table(resident: Resident, rows: Sequence[Row], best: Row, seed: int | None,
                  prompts: Sequence[str], max_new_tokens: int) -> str | None:
    """The parents' and the best merge's greedy answers to ``prompts``, side by side (markdown)."""
    if not prompts:
        return None
    shown = [r for r in rows if r.is_parent] + [best]
    answers = {r.name: resident.answers(r.recipe, seed if r is best else 0, prompts, max_new_tokens) for r in shown}
    head = ["prompt", *(r.name for r in shown)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, prompt in enumerate(prompts):
        cells = [prompt, *(answers[r.name][i] for r in shown)]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def figures(summary_data: Mapping[str, Any], rows: Sequence[Row], group: Any, multi_objective: bool) -> list:
    out = [("budget_curves", plots.budget_figure(summary_data["budget_curves"])),
           ("method_distributions", plots.distribution_figure(summary_data["search_scores"]))]
    forest = plots.forest_figure(rows)
    if forest is not None:
        out.append(("paired_differences", forest))
    studies = {m or "": s for m, s in group.members.items()}
    out += list(plots.optuna_figures(studies, multi_objective))
    return out


def conclude(cfg: SweepConfig, setup: Setup, session: Any, resident: Resident, say: Any) -> dict[str, Any]:
    """Everything the final worker does; returns what the outcome reports."""
    group, tracker = session.group, session.tracker
    records = group.records()
    tracker.reconcile(records)
    baselines = run_baselines(group.notes, resident, setup, tracker, say, quiet=True) if cfg.study.baselines else []
    rows = baselines + best_rows(records, list(setup.spaces), cfg.study.multi_objective)
    confirm_rows(rows, resident, group.notes, cfg.study.seed, cfg.eval.confirm_seeds, say)
    compare(rows, {t.name: t.weight for t in setup.spec.tasks}, seed=cfg.study.seed)
    best = best_of(rows)
    seed = closest_seed(best) if best else None
    group.notes.set_rows([r.stored() for r in rows], seed)
    out_dir = setup.runs_dir / cfg.study.name / "best"
    saving = best is not None and cfg.study.save_best
    data = summary(cfg.study.name, rows, records, best, seed, shown_path(out_dir) if saving else None)
    counts = method_counts(records)
    best_dir = save_best(cfg, best, seed, rows, data, counts, out_dir) if saving else None
    table = format_table(rows, counts)
    files = {"summary.json": json.dumps(data, indent=2), "confirm_items.csv": confirm_items_csv(rows),
             "trials.csv": trials_csv(records), "comparison.md": f"{table}\n\n{data['verdict']}\n\n{LEGEND}\n",
             "report.html": report_html(cfg.study.name, rows, data, counts)}
    answers = answers_table(resident, rows, best, seed, cfg.tracking.prompts, cfg.tracking.max_new_tokens) if best else None
    if answers:
        files["answers.md"] = answers
    write_files(setup.runs_dir / cfg.study.name, files)
    registered = None
    if best_dir is not None and cfg.tracking.register:
        registered = registry.register_best(tracker, cfg.study.name, best_dir, data, cfg.tracking.register_copy_mb)
    if tracker.enabled:
        interactive = plots.optuna_interactive({m or "": s for m, s in group.members.items()}, cfg.study.multi_objective)
        if interactive:
            files["plots/optuna_interactive.html"] = interactive
        figs = figures(data, rows, group, cfg.study.multi_objective)
        log_review(tracker, data, files, figs, Path(shown_path(best_dir)) if best_dir else None,
                   best.trial if best else None, registered)
        for _, fig in figs:
            plots.close(fig)
    say(table)
    say(data["verdict"])
    return {"rows": rows, "best": best, "best_dir": best_dir, "summary": data, "registered": registered}


def stored_rows(notes: StudyNotes) -> list[Row]:
    """The rows of the study's last conclusion, with their confirm results (no model needed)."""
    return [Row.from_stored(data, notes.confirmed(data["confirm_key"]) if data.get("confirm_key") else None)
            for data in notes.rows()]


def best_of(rows: Sequence[Row]) -> Row | None:
    """The best merge: the trial row with the best search score."""
    trials = [r for r in rows if r.trial is not None]
    return max(trials, key=lambda r: r.search) if trials else None
