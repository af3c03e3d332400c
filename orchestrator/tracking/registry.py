"""The best merge in MLflow's Model Registry: a model named after the study, alias ``best``.

The version's source is the merge itself for small models: ``best/`` is copied into the parent
run's artifacts (``best_model/``), so the registry entry survives moving ``runs/`` and can be
downloaded from the UI. Past ``copy_limit_mb`` (``tracking.register_copy_mb``, default 500) the
folder is not copied: the version's source is a ``file://`` reference to ``best/`` (no
gigabytes duplicated; moving ``runs/`` then breaks that link). Each version is tagged with the
trial, method, confirm score and recipe. Finishing the study again with the same best merge
adds nothing; a new best (after a resume) adds a version and moves the alias to it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ALIAS = "best"


def model_name(study: str) -> str:
    """The registered model's name for a study (letters, digits, ``-_.``)."""
    return "merge-" + re.sub(r"[^A-Za-z0-9._-]+", "-", study)


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def register_best(tracker: Any, study: str, best_dir: Path, summary: Mapping[str, Any],
                  copy_limit_mb: float = 500) -> str | None:
    """Register ``best_dir`` (see the module docstring); returns ``name@best``, or None."""
    if not tracker.enabled or tracker.parent_id is None:
        return None
    client, best = tracker.client, summary["best"]
    name = model_name(study)
    key = json.dumps(best["recipe"], sort_keys=True, default=str) + f"#seed={best.get('seed')}"
    current = _current(client, name)
    if current is not None and current.tags.get("mo.recipe_key") == _digest(key):
        return f"{name}@{ALIAS}"
    if folder_mb(best_dir) <= copy_limit_mb:
        tracker.log_artifact(tracker.parent_id, "best_model", best_dir)
        source = f"{tracker.artifact_uri(tracker.parent_id)}/best_model"
    else:
        source = best_dir.resolve().as_uri()
    if current is None and not _exists(client, name):
        client.create_registered_model(name, description=f"Best merges of study {study} (merge-orchestrator).")
    confirm = (best.get("confirm") or {}).get("objective")
    tags = {"mo.study": study, "mo.trial": str(best["trial"]), "mo.method": best["method"],
            "mo.confirm": "" if confirm is None else f"{confirm:.4f}", "mo.seed": str(best.get("seed")),
            "mo.recipe": json.dumps(best["recipe"], default=str)[:4900], "mo.recipe_key": _digest(key)}
    version = client.create_model_version(name, source=source, run_id=tracker.parent_id, tags=tags,
                                          description=summary["verdict"][:4900])
    client.set_registered_model_alias(name, ALIAS, version.version)
    return f"{name}@{ALIAS}"


def _current(client: Any, name: str) -> Any:
    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except Exception:  # noqa: BLE001 - no such model or alias yet
        return None


def _exists(client: Any, name: str) -> bool:
    try:
        client.get_registered_model(name)
        return True
    except Exception:  # noqa: BLE001
        return False


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]
