"""Shared fixtures: offline environment and tiny real Llama models saved as safetensors."""

from __future__ import annotations

import os
import tempfile

# Offline before any Hugging Face import, and a private datasets cache per test session.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="mo-hf-home-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.tiny import make_lora_zoo, make_tiny_family  # noqa: E402


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict[str, Path]:
    """A base and three fine-tunes (tiny Llama, float32 safetensors): {'base', 'ft_a', 'ft_b', 'ft_c'}."""
    return make_tiny_family(tmp_path_factory.mktemp("tiny_family"))


@pytest.fixture(scope="session")
def lora_zoo(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama and five PEFT LoRA adapters on it: {'base', 'ad1'..'ad5'} (``tests.tiny.ADAPTERS``)."""
    return make_lora_zoo(tmp_path_factory.mktemp("lora_zoo"))


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory) -> Path:
    """The micro demo zoo (tiny base and experts, little training, seconds to build), built once.

    Model folders are ``micro_zoo / name`` for the names of ``orchestrator.zoo.MODEL_NAMES``
    (``default_model_paths(micro_zoo)``); scores are in ``micro_zoo / "zoo.json"``.
    """
    from orchestrator.zoo.build import build_zoo

    return build_zoo(tmp_path_factory.mktemp("micro_zoo") / "zoo", micro=True, log=lambda *_: None)
