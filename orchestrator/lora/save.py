"""Writing adapters in PEFT format, and building the config that gives each module its scaling.

A computed adapter (``cat``, ``svd``, PEFT-compatible combinations) may have modules of
different ranks and scalings. PEFT gives every module ``r`` and ``lora_alpha`` unless a
``rank_pattern``/``alpha_pattern`` key matches it, so the config written here holds the most
common rank and alpha and one escaped full-name pattern per module that differs. Module
scalings are then recomputed from that config, so what this package uses is exactly what
``PeftModel.from_pretrained`` will compute.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from orchestrator.errors import UserError
from orchestrator.lora.adapter import (
    CONFIG_FILE,
    PEFT_PREFIX,
    WEIGHTS_FILE,
    Adapter,
    LoraModule,
    module_scaling,
    natural_key,
)

# Options of a source config that do not describe the written tensors; reset when saving.
RESET_KEYS = {
    "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
    "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
    "bias": "none", "lora_dropout": 0.0,
}


def _alpha_for(scaling: float, rank: int, rslora: bool) -> float | int:
    """The alpha giving ``scaling`` at ``rank``; an int when it is one (up to rounding)."""
    alpha = scaling * (math.sqrt(rank) if rslora else rank)
    nearest = round(alpha)
    return int(nearest) if abs(alpha - nearest) <= 1e-9 * max(1.0, abs(alpha)) else alpha


def make_config(template: Mapping[str, Any], modules: Mapping[str, LoraModule], *,
                use_rslora: bool = False) -> dict[str, Any]:
    """A PEFT config under which every module gets its own rank and ``scaling``.

    Args:
        template: config to start from (task type, base model name...).
        modules: the modules, with the scaling each must get.
        use_rslora: express scalings as ``alpha / sqrt(r)``.
    """
    ranks = {m.module: m.rank for m in modules.values()}
    alphas = {m.module: _alpha_for(m.scaling, m.rank, use_rslora) for m in modules.values()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    names = sorted(ranks, key=natural_key)
    config = {**dict(template), **RESET_KEYS}
    config.update(
        peft_type="LORA", r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=names,
        fan_in_fan_out=any(m.fan_in_fan_out for m in modules.values()),
        rank_pattern={re.escape(n): ranks[n] for n in names if ranks[n] != r},
        alpha_pattern={re.escape(n): alphas[n] for n in names if alphas[n] != alpha},
    )
    return config


def with_config(adapter: Adapter, config: dict[str, Any]) -> Adapter:
    """The adapter under ``config``, module scalings recomputed from it as PEFT would."""
    modules = {}
    for param, mod in adapter.modules.items():
        rank, scaling = module_scaling(config, mod.module)
        if rank != mod.rank or not math.isclose(scaling, mod.scaling, rel_tol=1e-6):
            raise AssertionError(f"config gives {mod.module} rank {rank} scaling {scaling}, "
                                 f"wanted {mod.rank} / {mod.scaling}")
        modules[param] = replace(mod, scaling=scaling)
    return replace(adapter, modules=modules, config=config)


def adapter_tensors(adapter: Adapter, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The adapter's factors under PEFT's saved key names."""
    out = {}
    for mod in adapter.modules.values():
        key = f"{PEFT_PREFIX}{mod.module}"
        a_key, b_key = ((f"{key}.lora_embedding_A", f"{key}.lora_embedding_B")
                        if mod.kind == "embedding" else (f"{key}.lora_A.weight", f"{key}.lora_B.weight"))
        out[a_key] = mod.a.to(dtype or mod.a.dtype).contiguous()
        out[b_key] = mod.b.to(dtype or mod.b.dtype).contiguous()
    return out


def save_adapter(adapter: Adapter, out_dir: str | Path, *, dtype: torch.dtype | None = None,
                 base_model_name_or_path: str | None = None, overwrite: bool = False) -> Path:
    """Write ``adapter`` as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads.

    Written into a staging folder beside ``out_dir`` and renamed into place.

    Args:
        adapter: the adapter (its ``config`` must give each module its rank and scaling).
        out_dir: the folder to create.
        dtype: dtype of the saved factors (default: as held).
        base_model_name_or_path: recorded in the config (default: the adapter's).
        overwrite: replace an existing ``out_dir``.

    Raises:
        UserError: ``out_dir`` exists and ``overwrite`` is false.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UserError(f"output folder {out} exists; pass overwrite to replace it")
    config = dict(adapter.config)
    if base_model_name_or_path is not None:
        config["base_model_name_or_path"] = base_model_name_or_path
    with_config(adapter, config)  # the config must reproduce every module's scaling
    stage = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    try:
        save_file(adapter_tensors(adapter, dtype), str(stage / WEIGHTS_FILE), metadata={"format": "pt"})
        (stage / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                         encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    return out
