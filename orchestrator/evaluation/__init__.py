"""Evaluation: lm-eval in-process on a resident model, in rungs, on search and confirm splits.

* ``spec``: what to evaluate (``EvalSpec``, ``TaskSpec``) and results (``EvalResult``).
* ``tasks``: task names -> lm-eval task objects per split, split expressions.
* ``suite``: ``TaskSuite``, every task resolved before any model loads, items in a fixed order.
* ``models``: loading a model folder, wrapping it in ``HFLM`` once.
* ``evaluator``: ``ResidentEvaluator``, trial after trial on one loaded model.
* ``lm_eval_compat``: every use of lm-eval internals, guarded by a test against the pinned
  version.

The names below are imported lazily (``import orchestrator.evaluation`` imports neither torch
nor lm-eval).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvalSpec": "spec", "TaskSpec": "spec", "EvalResult": "spec", "TaskScore": "spec",
    "ROLES": "spec",
    "SplitRef": "tasks", "parse_split": "tasks", "split_indices": "tasks",
    "TaskSuite": "suite", "TaskItems": "suite", "check_tasks_available": "suite",
    "stratified_order": "suite",
    "check_model_dir": "models", "load_model": "models", "wrap_model": "models",
    "ResidentEvaluator": "evaluator",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'orchestrator.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"orchestrator.evaluation.{_EXPORTS[name]}"), name)
