"""The demo zoo: tiny expert models and local MMLU/HellaSwag-format benchmark tasks.

Importing this package is cheap (no torch); the builder is ``orchestrator.zoo.build.build_zoo``.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
"""lm-eval include path of the demo tasks (``demo_mmlu``, ``demo_hellaswag``)."""

DEFAULT_ZOO_DIR = Path("runs/zoo")
MODEL_NAMES = ("base", "knowledge", "knowledge2", "commonsense")
"""Full model folders (config, safetensors, tokenizer)."""
ADAPTER_NAMES = ("lora_knowledge", "lora_commonsense")
"""PEFT LoRA adapter folders trained on ``base`` (adapter_config.json, adapter_model.safetensors)."""


def default_model_paths(zoo_dir: str | Path = DEFAULT_ZOO_DIR) -> dict[str, Path]:
    """Model folders of a zoo: ``{"base": ..., "knowledge": ..., "knowledge2": ..., "commonsense": ...}``."""
    return {name: Path(zoo_dir) / name for name in MODEL_NAMES}


def default_adapter_paths(zoo_dir: str | Path = DEFAULT_ZOO_DIR) -> dict[str, Path]:
    """LoRA adapter folders of a zoo: ``{"lora_knowledge": ..., "lora_commonsense": ...}``.

    Each is a PEFT adapter of ``zoo_dir / "base"`` (its config names the base as ``../base``).
    """
    return {name: Path(zoo_dir) / name for name in ADAPTER_NAMES}

