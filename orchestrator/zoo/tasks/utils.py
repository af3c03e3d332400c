"""Data loading and prompt functions of the demo tasks (lm-eval ``!function`` hooks).

lm-eval imports this file by path, so it uses no package imports. The data lies in ``data/``
beside this file and is found relative to ``__file__``, whatever the working directory.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import datasets

DATA_DIR = Path(__file__).resolve().parent / "data"


@lru_cache(maxsize=4)
def _rows(file_name: str) -> tuple[dict, ...]:
    """All rows of one data file (read once per process)."""
    with open(DATA_DIR / file_name, encoding="utf-8") as fh:
        return tuple(json.loads(line) for line in fh if line.strip())


def _by_split(rows, keep) -> datasets.DatasetDict:
    """Group rows by their ``split`` field into a DatasetDict, dropping ``split``."""
    splits: dict[str, list[dict]] = {}
    for row in rows:
        if keep(row):
            splits.setdefault(row["split"], []).append({k: v for k, v in row.items() if k != "split"})
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


def load_mmlu(subject: str, **_kwargs) -> datasets.DatasetDict:
    """Splits ``dev``, ``validation`` and ``test`` of one demo_mmlu subject."""
    return _by_split(_rows("demo_mmlu.jsonl"), lambda row: row["subject"] == subject)


def load_hellaswag(**_kwargs) -> datasets.DatasetDict:
    """Splits ``train``, ``validation`` and ``test`` of demo_hellaswag."""
    return _by_split(_rows("demo_hellaswag.jsonl"), lambda row: True)


def mmlu_text(doc: dict) -> str:
    """mmlu_continuation prompt: the question, then ``Answer:``."""
    return f"Question: {doc['question'].strip()}\nAnswer:"


def mmlu_choices(doc: dict) -> list[str]:
    """Each choice's text is scored as the continuation."""
    return list(doc["choices"])


def mmlu_target(doc: dict) -> int:
    """Index of the right choice."""
    return int(doc["answer"])


def hellaswag_text(doc: dict) -> str:
    """The context (an actor and the first steps of a script)."""
    return doc["ctx"]


def hellaswag_choices(doc: dict) -> list[str]:
    """The four endings."""
    return list(doc["endings"])


def hellaswag_target(doc: dict) -> int:
    """Index of the true next step."""
    return int(doc["label"])
