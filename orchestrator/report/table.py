"""The comparison table as markdown: what the sweep prints, the model card and MLflow show.

One line per row: trials completed/pruned for methods, the search score, the confirm score with
its 95% interval (and the spread across seeds for random methods), the paired difference to the
best parent with its interval and Holm-corrected p-value (``*`` where significant), and each
task's confirm score. ``mark`` names the row whose merge is in the folder (the card's table).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from orchestrator.report.compare import Row, significant

SIG = "*"


def format_table(rows: Sequence[Row], counts: Mapping[str, Mapping[str, int]] | None = None,
                 mark: str | None = None) -> str:
    """Markdown table of the rows (``counts``: per-method trial counts; ``mark``: a row name)."""
    comp_keys = list(dict.fromkeys(k for r in rows if r.confirm for k in r.confirm.components))
    head = ["", "method", "trial", "trials (done/pruned)", "search", "confirm [95% CI]", "seeds (sd)",
            "vs best parent [95% CI], p (Holm)", *(f"{k} (confirm)" for k in comp_keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = f"**{r.name}** (this folder)" if mark == r.name else r.name
        c = (counts or {}).get(r.method)
        cells = [name, r.method, "" if r.trial is None else str(r.trial),
                 f"{c['complete']}/{c['pruned']}" if c and not r.is_baseline else "",
                 _pm(r.search, r.search_se), _confirm(r), _seeds(r), _versus(r),
                 *[_num(r.confirm.components.get(k)) if r.confirm else "-" for k in comp_keys]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _confirm(r: Row) -> str:
    if r.confirm is None:
        return "-"
    if r.interval is None:
        return f"{r.confirm.score:.4f}"
    return f"{r.confirm.score:.4f} [{r.interval[0]:.3f}, {r.interval[1]:.3f}]"


def _seeds(r: Row) -> str:
    if r.confirm is None or len(r.confirm.seeds) < 2:
        return ""
    return f"{len(r.confirm.seeds)} ({r.spread:.4f})"


def _versus(r: Row, label: str = "best parent") -> str:
    comp = r.vs.get(label)
    if comp is None:
        return ""
    mark = SIG if significant(r, label) else ""
    return (f"{comp.diff:+.4f}{mark} [{comp.ci_lo:+.3f}, {comp.ci_hi:+.3f}], "
            f"p={r.p_holm.get(label, comp.p_value):.2g}")


def _pm(value: float | None, se: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f} ± {se:.4f}" if se is not None and se == se else f"{value:.4f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


LEGEND = (f"Search: the search split (the score that chose each row). Confirm: the held-out split, "
          f"with a 95% interval (Wilson for one 0/1 task, else a stratified bootstrap); random "
          f"methods are the mean over several seeds, with the standard deviation across seeds. vs best "
          f"parent: the paired difference on the same confirm items, its 95% bootstrap interval and "
          f"the Holm-corrected p-value; {SIG} marks a significant improvement (p < 0.05).")
