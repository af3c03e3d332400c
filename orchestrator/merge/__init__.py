"""Merge math: pure per-tensor functions and the one registry of methods.

This package imports nothing above it (no files, configs, Optuna, MLflow or Hydra).
"""

from orchestrator.merge.base import MergeMethod, check_range, field_name, param_key
from orchestrator.merge.registry import REGISTRY, get_method

__all__ = ["REGISTRY", "MergeMethod", "check_range", "field_name", "get_method", "param_key"]
