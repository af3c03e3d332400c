"""The merge engine: mergekit recipes run to disk or into a resident model.

Modules, bottom up:

* ``recipe``: the mergekit YAML schema (models, base_model, merge_method, parameters with
  gradients and filters, slices, dtype, tokenizer_source), parsed and dumped.
* ``weights``: every read and write of model files (lazy safetensors, sharded writing,
  config and tokenizer copies, Hub references).
* ``plan``: which source tensors, method and parameters make each output tensor; checked
  against headers before any tensor is read.
* ``sources``: model references (folders, Hub ids, ``model+adapter``) opened lazily.
* ``compute``: one output tensor (readers, caches, vocabulary alignment, casting).
* ``streaming``: ``merge_to_disk``; ``resident``: ``InMemoryMerger``.
* ``modelcard``: the README of a merged folder; ``adapter_output``: one combined LoRA adapter.

The names below are imported lazily (``import orchestrator.engine`` does not import torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Recipe": "recipe", "load_recipe": "recipe",
    "MergePlan": "plan", "build_plan": "plan", "check_recipe": "validate",
    "ModelWeights": "weights", "resolve_model_path": "weights", "is_model_folder": "weights",
    "as_recipe": "sources", "open_models": "sources", "resolve_reference": "sources",
    "prepare": "sources",
    "StreamReader": "compute", "CachedReader": "compute", "compute_tensor": "compute",
    "MergeResult": "streaming", "merge_to_disk": "streaming",
    "InMemoryMerger": "resident", "MergeStats": "resident", "all_finite": "resident",
    "resolve_device": "devices", "check_device_name": "devices",
    "write_combined_adapter": "adapter_output", "uses_adapter_keys": "adapter_output",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'orchestrator.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"orchestrator.engine.{_EXPORTS[name]}"), name)
