"""What defines a study, stored when it is created and checked on every resume.

A study's trials are comparable only while the candidates (and their files), the methods and
their search spaces, the evaluation (tasks, splits, metrics, weights, rungs), the merge seed and
the way methods share the trials stay the same. ``fingerprint`` flattens those to dotted keys;
``changes`` lists what differs. What may change on a resume is everything else: ``n_trials``,
the sampler, the pruner, the workers, tracking, devices, timeouts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator.engine.weights import resolve_model_path


def files_digest(ref: str) -> str:
    """A short digest of a model reference's files: names and sizes, and config.json's bytes.

    Cheap (no weights are read) and enough to tell two zoos or two checkpoints apart.
    """
    parts = []
    for side in ref.split("+"):
        try:
            folder = resolve_model_path(side)
        except Exception:  # noqa: BLE001 - an unresolvable reference is its own digest
            parts.append(side)
            continue
        for path in sorted(Path(folder).iterdir()):
            if path.is_file() and (path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json")):
                parts.append(f"{path.name}:{path.stat().st_size}")
        config = Path(folder) / "config.json"
        if config.is_file():
            parts.append(hashlib.sha256(config.read_bytes()).hexdigest())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def fingerprint(*, models: Mapping[str, str], base: str | None, dtype: str, tokenizer_source: str | None,
                spaces: Mapping[str, Any], tasks: Sequence[Mapping[str, Any]], rungs: Sequence[Any],
                num_fewshot: int | None, seed: int, compare: str, directions: Sequence[str],
                knots: bool = False) -> dict[str, Any]:
    """The defining settings of a study as a flat ``{dotted key: value}`` mapping."""
    data: dict[str, Any] = {"candidates.base": base, "candidates.dtype": dtype,
                            "candidates.tokenizer_source": tokenizer_source,
                            "method.methods": list(spaces), "eval.rungs": list(rungs),
                            "eval.num_fewshot": num_fewshot, "study.seed": seed, "study.compare": compare,
                            "study.objectives": len(directions)}
    if knots:  # only when set: studies created before the option keep their fingerprint
        data["candidates.knots"] = True
    for name, ref in models.items():
        data[f"candidates.models.{name}"] = ref
        data[f"candidates.models.{name}.files"] = files_digest(ref)
    if base:
        data["candidates.base.files"] = files_digest(base)
    for method, space in spaces.items():
        data[f"search_spaces.{method}"] = json.dumps(space, sort_keys=True)
    for task in tasks:
        data[f"eval.tasks.{task['name']}"] = json.dumps(dict(task), sort_keys=True, default=str)
    return data


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every key that differs (a missing key is None)."""
    keys = sorted(set(old) | set(new))
    return [(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)]


def describe(study: str, diffs: Sequence[tuple[str, Any, Any]], limit: int = 3) -> str:
    """One line: what changed since the study was created, and what to do."""
    shown = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in diffs[:limit])
    more = f" (and {len(diffs) - limit} more)" if len(diffs) > limit else ""
    return (f"study {study!r} was created with other settings, so its trials would not be comparable: "
            f"{shown}{more}; use a new study.name (e.g. study.name={study}-2), or the settings it was created with")


def _short(value: Any) -> str:
    text = "unset" if value is None else str(value)
    return text if len(text) <= 80 else text[:77] + "..."
