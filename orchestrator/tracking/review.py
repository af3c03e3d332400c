"""What a reviewer sees on the parent run: the verdict, the files, the plots, the best merge.

``log_review`` writes, on the study's parent run: the note (``mlflow.note.content``, shown as
the run's description) with the winner, its confirm score and interval, the paired difference
to the best parent with its interval and p-value, where ``best/`` is and how to load it; on
the experiment, an index of its studies (each one's verdict, best merge and parent run, newest
first: several studies share one experiment); metrics per method (best confirm, trials completed and pruned);
the report files and figures as artifacts; ``mo.best=true`` on the best trial's run; and the
best merge in the Model Registry (``registry.register_best``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from orchestrator.tracking.runs import KIND_TAG, STUDY_TAG, TRIAL_TAG

NOTE = "mlflow.note.content"
BEST_TAG = "mo.best"
VERDICT_TAG, BEST_MERGE_TAG = "mo.verdict", "mo.best_merge"
NOTE_LIMIT = 19_000  # characters of the experiment's description (MLflow's limit is 20000)


def note(summary: Mapping[str, Any], best_dir: Path | None, registered: str | None) -> str:
    """The markdown description of the study (parent run and experiment)."""
    best = summary.get("best")
    lines = [f"## Study `{summary['study']}`", "", f"**Verdict:** {summary['verdict']}", ""]
    if best:
        confirm = best.get("confirm") or {}
        ci = best.get("confirm_ci95") or [None, None]
        lines.append(f"**Best merge:** trial {best['trial']} ({best['method']}), confirm "
                     f"{_f(confirm.get('objective'))} (95% CI {_f(ci[0])} to {_f(ci[1])}), search "
                     f"{_f((best.get('search') or {}).get('objective'))}.")
        vs = best.get("vs_best_parent")
        if vs:
            lines.append(f"Against the best parent ({summary.get('best_parent')}): {vs['diff']:+.4f} "
                         f"(95% CI {vs['ci95'][0]:+.4f} to {vs['ci95'][1]:+.4f}), p = {vs['p']:.3g} "
                         f"({vs['test']}), Holm-corrected p = {_f(vs.get('p_holm'), '.3g')}.")
        if not best.get("beats_best_parent_on_confirm"):
            lines.append("**No merge beat the best parent on the confirm split.**")
    if best_dir is not None:
        lines += ["", f"**Where:** `{best_dir}`" + (f", registered as `{registered}`" if registered else "") + ".",
                  "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f"model = AutoModelForCausalLM.from_pretrained(\"{best_dir}\")",
                  f"tokenizer = AutoTokenizer.from_pretrained(\"{best_dir}\")", "```"]
    lines += ["", "Files: `report.html` (the comparison with intervals and plots), `summary.json`, "
              "`confirm_items.csv`, `trials.csv`, `comparison.md`, `plots/`."]
    return "\n".join(lines)


def experiment_note(studies: Iterable[Any], experiment_id: str) -> str:
    """The experiment's description: one entry per study parent run (MLflow ``Run`` objects
    tagged ``mo.kind=study``), newest first, with its verdict and a link to its run."""
    ordered = sorted(studies, key=lambda r: (r.info.start_time or 0, r.info.run_id), reverse=True)
    lines = ["## Studies in this experiment", "",
             "Newest first. Each study's parent run (`study:<name>`) holds its full review: "
             "the verdict, the table with intervals, `report.html` and the plots."]
    for i, run in enumerate(ordered):
        tags = run.data.tags
        name = tags.get(STUDY_TAG, run.info.run_name)
        link = f"#/experiments/{experiment_id}/runs/{run.info.run_id}"
        entry = ["", f"### [{name}]({link})", "",
                 tags.get(VERDICT_TAG) or "_not finished: no verdict yet_"]
        if tags.get(BEST_MERGE_TAG):
            entry += ["", f"Best merge: {tags[BEST_MERGE_TAG]}"]
        if sum(len(x) + 1 for x in lines + entry) > NOTE_LIMIT:  # MLflow keeps 20000 characters
            lines += ["", f"... and {len(ordered) - i} older studies (their parent runs)."]
            break
        lines += entry
    return "\n".join(lines)


def _f(x: Any, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def method_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """Per method: best confirm score, trials completed and pruned (metrics of the parent run)."""
    out: dict[str, float] = {}
    for method, entry in summary["methods"].items():
        trials = entry.get("trials", {})
        out[f"{method}.trials_complete"] = trials.get("complete", 0)
        out[f"{method}.trials_pruned"] = trials.get("pruned", 0)
        confirm = (entry.get("confirm") or {}).get("objective")
        if confirm is not None:
            out[f"{method}.best_confirm"] = confirm
        vs = entry.get("vs_best_parent")
        if vs and vs.get("diff") is not None:
            out[f"{method}.diff_vs_best_parent"] = vs["diff"]
    best = summary.get("best")
    if best:
        out["best_search"] = (best.get("search") or {}).get("objective")
        out["best_confirm"] = (best.get("confirm") or {}).get("objective")
    return {k: v for k, v in out.items() if v is not None}


def log_review(tracker: Any, summary: Mapping[str, Any], files: Mapping[str, Any],
               figures: Iterable[tuple[str, Any]], best_dir: Path | None, best_trial: int | None,
               registered: str | None) -> None:
    """Everything above on the parent run (a disabled tracker does nothing)."""
    if not tracker.enabled:
        return
    pid = tracker.parent_id
    text = note(summary, best_dir, registered)
    best = summary.get("best") or {}
    where = f"`{best_dir}`" + (f" (`{registered}`)" if registered else "") if best_dir else ""
    best_merge = (f"trial {best['trial']} ({best['method']}), confirm "
                  f"{_f((best.get('confirm') or {}).get('objective'))}" + (f", {where}" if where else "")
                  if best else None)
    tracker.set_tags(pid, {NOTE: text, "best_trial": best_trial, "best_method": best.get("method"),
                           VERDICT_TAG: summary["verdict"], BEST_MERGE_TAG: best_merge})
    studies = tracker.client.search_runs([tracker.experiment_id], f"tags.`{KIND_TAG}` = 'study'",
                                         max_results=1000)
    tracker.client.set_experiment_tag(tracker.experiment_id, NOTE,
                                      experiment_note(studies, tracker.experiment_id))
    tracker.log_metrics(pid, method_metrics(summary))
    for name, value in files.items():
        tracker.log_artifact(pid, name, value)
    for name, fig in figures:
        tracker.log_figure(pid, fig, f"plots/{name}.png")
    if best_trial is not None:
        for run in tracker.children():
            is_best = run.data.tags.get(TRIAL_TAG) == str(best_trial)
            if is_best or run.data.tags.get(BEST_TAG) == "true":
                tracker.set_tags(run.info.run_id, {BEST_TAG: "true" if is_best else "false"})
