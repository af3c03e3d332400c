"""``report.html``: one self-contained page (figures inlined as SVG, no external files).

The comparison table with intervals and significance marks, the verdict, the budget curves,
the score distribution per method and the forest plot of paired differences.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.report import plots
from orchestrator.report.compare import Row
from orchestrator.report.table import LEGEND, format_table

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}.verdict{font-size:16px;padding:.6em;background:#f4f4f4}
svg{max-width:100%;height:auto}
"""


def svg(fig: Any) -> str:
    """A matplotlib figure as inline SVG (then closed)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plots.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def markdown_table_html(markdown: str) -> str:
    """The markdown table of ``format_table`` as an HTML table."""
    lines = [line.strip().strip("|").split(" | ") for line in markdown.splitlines() if line.startswith("|")]
    head, body = lines[0], lines[2:]
    cell = (lambda c: html.escape(c).replace("**", ""))
    out = ["<table><tr>" + "".join(f"<th>{cell(c)}</th>" for c in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in body]
    return "".join(out) + "</table>"


def report_html(study: str, rows: Sequence[Row], summary: Mapping[str, Any],
                counts: Mapping[str, Mapping[str, int]]) -> str:
    """The whole page."""
    sections = [f"<h1>Study {html.escape(study)}</h1>",
                f"<p class='verdict'>{html.escape(summary['verdict'])}</p>"]
    best = summary.get("best")
    if best:
        sections.append(f"<p>Best merge (chosen on the search split): trial {best['trial']} "
                        f"({html.escape(best['method'])}), seed {best['seed']}, in "
                        f"<code>{html.escape(str(best.get('folder') or '-'))}</code>.</p>")
    sections += ["<h2>Comparison</h2>", markdown_table_html(format_table(rows, counts)),
                 f"<p><small>{html.escape(LEGEND)}</small></p>"]
    figures = [("Budget curves", plots.budget_figure(summary["budget_curves"])),
               ("Search scores per method", plots.distribution_figure(summary["search_scores"])),
               ("Paired differences to the best parent", plots.forest_figure(rows))]
    for title, fig in figures:
        if fig is not None:
            sections += [f"<h2>{title}</h2>", svg(fig)]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(study)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>")
