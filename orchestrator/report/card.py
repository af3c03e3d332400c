"""The study's section of the best merge's model card (appended to the engine's README.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.report.compare import Row, beats_best_parent
from orchestrator.report.table import LEGEND, format_table


def card_title(study: str, folder: str) -> str:
    """The card's title: the study and the folder the merge lives in (never a staging folder)."""
    return f"{folder} (best merge of study {study})"


def scores_section(study: str, rows: Sequence[Row], best: Row, seed: int | None, verdict: str,
                   counts: Mapping[str, Mapping[str, int]]) -> str:
    """Markdown: which trial this folder is, the comparison table with its row marked, the verdict."""
    random = seed is not None and best.confirm is not None and len(best.confirm.seeds) > 1
    seeds = (f" Its masks use seed {seed}, the confirm seed closest to the mean over "
             f"{len(best.confirm.seeds)} seeds." if random else "")
    warning = "" if beats_best_parent(rows, best) else (
        "\n\n**This merge does not beat the best parent model on the confirm split.** "
        "It is the best merge the study found, not an improvement over the parents.")
    return (f"\n## Scores (merge-orchestrator)\n\nStudy `{study}`. This folder holds the merge of "
            f"trial {best.trial} ({best.method}), the best of the study on the search split; the row "
            f"**{best.name}** below.{seeds}{warning}\n\n{format_table(rows, counts, mark=best.name)}\n\n"
            f"{verdict}\n\n{LEGEND}\n")


def scores_json(study: str, best: Row, seed: int | None, folder: str, summary: Mapping[str, Any]) -> dict[str, Any]:
    """``scores.json`` of the folder: the study's verdict on this merge."""
    return {"study": study, "folder": folder, "trial": best.trial, "method": best.method, "seed": seed,
            "search": {"score": best.search, "stderr": best.search_se, "components": dict(best.search_components)},
            "confirm": {"score": best.confirm.score if best.confirm else None,
                        "stderr": best.confirm.stderr if best.confirm else None,
                        "components": dict(best.confirm.components) if best.confirm else {},
                        "ci95": list(best.interval) if best.interval else None,
                        "seed_score": _seed_score(best, seed)},
            "recipe": dict(best.recipe), "verdict": summary["verdict"],
            "beats_best_parent_on_confirm": summary["best"]["beats_best_parent_on_confirm"]}


def _seed_score(best: Row, seed: int | None) -> float | None:
    """The confirm score of the seed saved in the folder (what the folder itself scores)."""
    if best.confirm is None or seed not in best.confirm.seeds:
        return best.confirm.score if best.confirm else None
    return best.confirm.per_seed[best.confirm.seeds.index(seed)]
