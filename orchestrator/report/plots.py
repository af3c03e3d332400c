"""The study's figures: budget curves, score distributions, the forest plot, Optuna's plots.

Every function returns matplotlib figures (or plotly figures for the interactive versions) and
never fails the study: a plot that cannot be drawn (too few trials for importances, say) is
skipped. Labels are kept inside the figure (``constrained`` layout; figures are saved with a
tight bounding box).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from orchestrator.report.compare import Row, significant


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def budget_figure(curves: Mapping[str, Sequence[Mapping[str, float]]]) -> Any:
    """Best search score so far per method, against trials started and against items evaluated."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for method, points in curves.items():
        xs = [(p["trials"], p["items"], p["best"]) for p in points if p["best"] is not None]
        if not xs:
            continue
        axes[0].step([x[0] for x in xs], [x[2] for x in xs], where="post", label=method)
        axes[1].step([x[1] for x in xs], [x[2] for x in xs], where="post", label=method)
    for ax, label in zip(axes, ("trials started", "items evaluated (search split)")):
        ax.set_xlabel(label)
        ax.set_ylabel("best search score so far")
        ax.grid(alpha=0.3)
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle("Budget curves: what each method found for what it cost")
    return fig


def distribution_figure(scores: Mapping[str, Sequence[float]]) -> Any:
    """Each method's search scores over its complete trials (box plot and the points)."""
    plt = _plt()
    methods = [m for m, v in scores.items() if v]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(methods) + 2), 4), layout="constrained")
    if methods:
        ax.boxplot([scores[m] for m in methods], tick_labels=methods, showfliers=False)
        for i, m in enumerate(methods, start=1):
            n = len(scores[m])
            ax.scatter([i + 0.15 * ((k % 5) - 2) / 2 for k in range(n)], scores[m], s=10, alpha=0.6)
    ax.set_ylabel("search score (complete trials)")
    ax.set_title("Score distribution per method")
    ax.grid(alpha=0.3, axis="y")
    return fig


def forest_figure(rows: Sequence[Row], label: str = "best parent") -> Any | None:
    """Paired differences to the reference with their 95% intervals, one line per merge."""
    shown = [r for r in rows if label in r.vs]
    if not shown:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(shown) + 1.5), layout="constrained")
    for y, r in enumerate(reversed(shown)):
        c = r.vs[label]
        color = "tab:green" if significant(r, label) else "tab:gray"
        ax.errorbar(c.diff, y, xerr=[[c.diff - c.ci_lo], [c.ci_hi - c.diff]], fmt="o", color=color, capsize=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(shown)), [r.name for r in reversed(shown)])
    ax.set_xlabel(f"confirm score minus the {label}'s (95% paired bootstrap interval)")
    ax.set_title(f"Paired differences to the {label} (green: significant after Holm)")
    ax.grid(alpha=0.3, axis="x")
    return fig


def optuna_figures(studies: Mapping[str, Any], multi_objective: bool) -> Iterator[tuple[str, Any]]:
    """Optuna's matplotlib plots per Optuna study (``name`` prefixes each when there are several)."""
    from optuna.visualization import matplotlib as ovm

    plots = ({"pareto_front": ovm.plot_pareto_front} if multi_objective else
             {"optimization_history": ovm.plot_optimization_history, "param_importances": ovm.plot_param_importances,
              "intermediate_values": ovm.plot_intermediate_values, "slice": ovm.plot_slice})
    for prefix, study in studies.items():
        for name, fn in plots.items():
            top = slice_params(study) if name == "slice" else None
            if top:
                fn = (lambda st, top=top: ovm.plot_slice(st, params=top))
            fig = _draw(fn, study)
            if fig is not None and top:
                fig.suptitle(f"Slice plot: the {len(top)} most important parameters "
                             "(every one in optuna_interactive.html)")
            if fig is not None:
                yield (f"{prefix}/{name}" if prefix else name), fig


SLICE_MAX = 8  # panels of the static slice plot (the interactive page shows every parameter)
LEGEND_MAX = 12  # trials named in a static intermediate-values legend


def slice_params(study: Any) -> list[str] | None:
    """The ``SLICE_MAX`` most important parameters when a study has more (a data-flow genome
    has dozens: one panel each made a figure 8000 pixels wide), else None (all of them)."""
    names = {k for t in study.get_trials(deepcopy=False) for k in t.params}
    if len(names) <= SLICE_MAX:
        return None
    from optuna.importance import get_param_importances

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ranked = list(get_param_importances(study))
        except Exception:  # noqa: BLE001 - too few complete trials: first ones by name
            ranked = []
    return (ranked + sorted(names - set(ranked)))[:SLICE_MAX]


def optuna_interactive(studies: Mapping[str, Any], multi_objective: bool) -> str | None:
    """One self-contained HTML page with Optuna's interactive plots of every study."""
    from optuna import visualization as ov

    plots = ({"Pareto front": ov.plot_pareto_front} if multi_objective else
             {"Optimization history": ov.plot_optimization_history, "Parameter importances": ov.plot_param_importances,
              "Intermediate values (rungs)": ov.plot_intermediate_values, "Slice": ov.plot_slice,
              "Parallel coordinates": ov.plot_parallel_coordinate})
    parts, first = [], True
    for prefix, study in studies.items():
        for title, fn in plots.items():
            fig = _draw(fn, study, matplotlib=False)
            if fig is None:
                continue
            parts.append(f"<h2>{prefix + ': ' if prefix else ''}{title}</h2>"
                         + fig.to_html(full_html=False, include_plotlyjs=bool(first)))
            first = False
    if not parts:
        return None
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Optuna plots</title></head><body>"
            + "".join(parts) + "</body></html>")


def _draw(fn: Any, study: Any, matplotlib: bool = True) -> Any | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = fn(study)
        except Exception:  # noqa: BLE001 - e.g. too few trials for importances
            return None
    if not matplotlib:
        return out
    fig = out.figure if hasattr(out, "figure") else out.flat[0].figure
    fig.set_layout_engine("constrained")
    for ax in fig.axes:  # a legend of every trial squeezed the axes to nothing (40+ trials)
        legend = ax.get_legend()
        if legend is not None and len(legend.get_texts()) > LEGEND_MAX:
            legend.remove()
    if fig.legends or any(ax.get_legend() for ax in fig.axes):
        for ax in fig.axes:  # legends outside the axes would be cut: keep them inside
            legend = ax.get_legend()
            if legend is not None:
                legend.set_loc("best")
    return fig


def close(fig: Any) -> None:
    _plt().close(fig)


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
