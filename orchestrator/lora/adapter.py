"""Reading PEFT LoRA adapters: factors, per-module scaling, base parameter names, refusals.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. Each targeted
module contributes the full update ``delta W = scaling * B @ A`` to the base parameter
``<module>.weight``, where ``scaling`` is ``alpha / r`` (``alpha / sqrt(r)`` with rslora) and
``r``/``alpha`` come from ``rank_pattern``/``alpha_pattern`` when a key matches the module name
(PEFT's rule: the key matches a dot-separated suffix of the name, as a regex).

What cannot be expressed as ``W + scaling * B @ A`` is refused with a ``UserError`` naming the
folder and the feature: DoRA and every other LoRA variant, LoRA biases, full tensors
(``modules_to_save``, trained biases, resized embeddings), conv layers, and adapters whose
initialisation (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) changed the base weights and that were saved
without PEFT's conversion.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from orchestrator.errors import UserError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# Saved key suffix -> (module kind, factor).
FACTOR_SUFFIXES: dict[str, tuple[str, str]] = {
    ".lora_A.weight": ("linear", "a"),
    ".lora_B.weight": ("linear", "b"),
    ".lora_embedding_A": ("embedding", "a"),
    ".lora_embedding_B": ("embedding", "b"),
}
# PEFT saves the frozen base weight of a targeted embedding next to its factors.
BASE_COPY_SUFFIX = ".base_layer.weight"

# Config keys that must be falsy: each turns the update into something other than B @ A,
# or makes it unmergeable. Value: how the refusal names the feature.
REFUSED_FEATURES: dict[str, str] = {
    "use_dora": "DoRA (use_dora): its magnitude vector rescales the merged weight per column, "
                "so the update is not scaling * B @ A",
    "lora_bias": "LoRA biases (lora_bias)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens), which PEFT itself cannot merge",
    "use_qalora": "QALoRA (use_qalora)",
    "velora_config": "the VeLoRA variant (velora_config)",
    "monteclora_config": "the MonteCLoRA variant (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "the KaSA variant (kasa_config)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
}
# init_lora_weights values whose factors are relative to the base as trained, not as saved.
SAFE_INITS = ("gaussian", "eva", "orthogonal")  # and True / False


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its two factors and the scaling that multiplies ``B @ A``.

    Attributes:
        module: module name in the base model (``model.layers.0.self_attn.q_proj``).
        kind: ``"linear"`` (``nn.Linear`` or GPT-2 ``Conv1D``) or ``"embedding"``.
        a: ``lora_A`` (r, in_features); for embeddings ``lora_embedding_A`` (r, num_embeddings).
        b: ``lora_B`` (out_features, r); for embeddings ``lora_embedding_B`` (dim, r).
        scaling: ``alpha / r`` or ``alpha / sqrt(r)``.
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D does.
    """

    module: str
    kind: Literal["linear", "embedding"]
    a: Tensor
    b: Tensor
    scaling: float
    fan_in_fan_out: bool = False

    @property
    def param(self) -> str:
        """The base parameter this module updates."""
        return f"{self.module}.weight"

    @property
    def rank(self) -> int:
        """Rank of the update (rows of A)."""
        return int(self.a.shape[0])

    @property
    def transposed(self) -> bool:
        """Whether the base weight is ``(B @ A).T`` (fan_in_fan_out layers, embeddings)."""
        return self.kind == "embedding" or self.fan_in_fan_out

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the base parameter."""
        rows, cols = int(self.b.shape[0]), int(self.a.shape[1])
        return (cols, rows) if self.transposed else (rows, cols)

    def delta(self) -> Tensor:
        """``scaling * B @ A`` in float32, shaped like the base parameter (PEFT's operation order)."""
        prod = self.b.float() @ self.a.float()  # (out, in) in LoRA orientation
        return (prod.T if self.transposed else prod) * self.scaling  # (*param shape)


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter: its modules keyed by base parameter name, and its PEFT config.

    Attributes:
        name: short name (the folder name unless given).
        modules: ``{base parameter name: LoraModule}``.
        config: the PEFT config dict (``adapter_config.json``), used when saving.
        path: the folder it was read from (None for computed adapters).
        base_copies: frozen base weights PEFT saved beside targeted embeddings
            (``{parameter name: tensor}``); they must equal the base's (``check_base_copies``).
    """

    name: str
    modules: dict[str, LoraModule]
    config: dict[str, Any]
    path: Path | None = None
    base_copies: dict[str, Tensor] = field(default_factory=dict)

    @property
    def where(self) -> str:
        """How messages name this adapter."""
        return f"adapter {self.path}" if self.path else f"adapter {self.name!r}"

    def param_names(self) -> list[str]:
        """Base parameter names this adapter updates, in model order."""
        return sorted(self.modules, key=natural_key)

    def delta(self, param: str) -> Tensor:
        """Full update of one base parameter (float32, the parameter's shape)."""
        return self.modules[param].delta()

    def deltas(self) -> dict[str, Tensor]:
        """All full updates: ``{parameter name: delta}``."""
        return {p: self.delta(p) for p in self.param_names()}

    def max_rank(self) -> int:
        """Largest module rank."""
        return max(m.rank for m in self.modules.values())

    def for_base(self, shapes: Mapping[str, Collection[int]],
                 conv1d: Collection[str] | None = None) -> Adapter:
        """Check this adapter against a base and fix each module's orientation for it.

        Like PEFT, the layer type decides ``fan_in_fan_out``, whatever the config says: with
        ``conv1d`` known, exactly the modules named there are transposed; without it, the base
        shape decides, and the config flag only for square weights.

        Args:
            shapes: the base's parameter shapes by name.
            conv1d: names of the base's GPT-2 style ``Conv1D`` modules (None: unknown).

        Raises:
            UserError: a targeted parameter is missing from the base or has another shape.
        """
        fixed = {}
        for param, mod in self.modules.items():
            if param not in shapes:
                raise UserError(f"{self.where} updates {param}, which the base model does not "
                                "have (adapter trained on another architecture?)")
            if mod.kind == "linear":
                mod = replace(mod, fan_in_fan_out=_orientation(mod, tuple(shapes[param]), conv1d))
            if mod.shape != tuple(shapes[param]):
                raise UserError(f"{self.where}: update of {param} has shape {list(mod.shape)} "
                                f"but the base parameter has {list(shapes[param])}")
            fixed[param] = mod
        return replace(self, modules=fixed)

    def check_base_copies(self, base: Mapping[str, Tensor]) -> None:
        """Refuse the adapter if the base weights PEFT saved with it differ from this base's.

        Raises:
            UserError: shape differs (resized vocabulary) or values differ beyond dtype rounding.
        """
        for param, saved in self.base_copies.items():
            if param not in base:
                continue
            ours = base[param]
            if tuple(saved.shape) != tuple(ours.shape) or not torch.allclose(
                    saved.float(), ours.float().to(saved.device), rtol=1e-2, atol=1e-3):
                raise UserError(f"{self.where} was trained with another {param} (shape "
                                f"{list(saved.shape)}, resized vocabulary?) than the base "
                                f"({list(ours.shape)}); full weights cannot be merged as LoRA")


def _orientation(mod: LoraModule, shape: tuple[int, ...], conv1d: Collection[str] | None) -> bool:
    """fan_in_fan_out for one linear module on a base with this parameter shape."""
    if conv1d is not None:
        return mod.module in conv1d
    rows, cols = int(mod.b.shape[0]), int(mod.a.shape[1])
    if rows != cols and shape in ((cols, rows), (rows, cols)):
        return shape == (cols, rows)
    return mod.fan_in_fan_out


def natural_key(name: str) -> tuple:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def is_adapter_folder(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder (has ``adapter_config.json``)."""
    return (Path(path) / CONFIG_FILE).is_file()


def pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: first key matching a name suffix."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scaling(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """``(rank, scaling)`` of one module under a PEFT config, as PEFT computes them."""
    rank = int(pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))
    alpha = pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        return rank, alpha / math.sqrt(rank)
    return rank, alpha / rank


def load_adapter(path: str | Path, *, name: str | None = None) -> Adapter:
    """Read and validate a PEFT LoRA adapter folder.

    Args:
        path: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        name: short name for messages and logs (default: the folder name).

    Raises:
        UserError: missing or unreadable files, or an unsupported adapter (one line naming the
            folder and the feature).
    """
    folder = Path(path)
    where = f"adapter {folder}"
    config = read_adapter_config(folder)
    check_supported(config, where)
    tensors = _read_weights(folder, where)
    modules, copies = _parse_tensors(tensors, config, where)
    return Adapter(name or folder.name, modules, config, folder, copies)


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of ``folder``."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"adapter {folder}: no {CONFIG_FILE} (not a PEFT adapter folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"adapter {folder}: cannot read {CONFIG_FILE}: {err}") from None
    if not isinstance(config, dict):
        raise UserError(f"adapter {folder}: {CONFIG_FILE} is not a JSON object")
    return config


def check_supported(config: Mapping[str, Any], where: str) -> None:
    """Refuse every adapter type and option whose update is not ``scaling * B @ A``."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UserError(f"{where}: peft_type {peft_type} is not supported, only LoRA adapters")
    for key, feature in REFUSED_FEATURES.items():
        if config.get(key):
            raise UserError(f"{where} uses {feature}; not supported (plain LoRA only)")
    init = config.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in SAFE_INITS):
        raise UserError(f"{where} was initialised with init_lora_weights={init!r}, which changes "
                        "the base weights; save it with PEFT's path_initial_model_for_weight_"
                        "conversion to get a plain LoRA adapter, then use that")


def _read_weights(folder: Path, where: str) -> dict[str, Tensor]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        hint = f" (only {PICKLE_FILE}: convert it to safetensors)" if (
            folder / PICKLE_FILE).is_file() else ""
        raise UserError(f"{where}: no {WEIGHTS_FILE}{hint}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"{where}: cannot read {WEIGHTS_FILE}: {err}") from None


def _split_key(key: str) -> tuple[str, str, str] | None:
    """``(module, kind, factor)`` of a LoRA factor key, else None."""
    for suffix, (kind, factor) in FACTOR_SUFFIXES.items():
        if key.endswith(suffix):
            return key.removeprefix(PEFT_PREFIX)[: -len(suffix)], kind, factor
    return None


def _parse_tensors(tensors: Mapping[str, Tensor], config: Mapping[str, Any],
                   where: str) -> tuple[dict[str, LoraModule], dict[str, Tensor]]:
    """Group factor tensors into modules; keep saved base copies; refuse anything else."""
    factors: dict[str, dict[str, Any]] = {}
    others = {}
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            others[key.removeprefix(PEFT_PREFIX)] = tensor
            continue
        module, kind, factor = split
        factors.setdefault(module, {"kind": kind})[factor] = tensor
    if not factors:
        raise UserError(f"{where}: {WEIGHTS_FILE} holds no LoRA factors")
    modules = {}
    for module, parts in factors.items():
        mod = _make_module(module, parts, config, where)
        modules[mod.param] = mod
    return modules, _base_copies(others, factors, config, where)


def _make_module(module: str, parts: Mapping[str, Any], config: Mapping[str, Any],
                 where: str) -> LoraModule:
    if "a" not in parts or "b" not in parts:
        raise UserError(f"{where}: module {module} has only one of its two LoRA factors")
    a, b = parts["a"], parts["b"]
    if a.dim() != 2 or b.dim() != 2:
        raise UserError(f"{where}: module {module} has {a.dim()}-d factors (conv layers are "
                        "not supported, only linear and embedding layers)")
    rank, scaling = module_scaling(config, module)
    if a.shape[0] != rank or b.shape[1] != rank:
        raise UserError(f"{where}: module {module} has factors of rank {a.shape[0]}/{b.shape[1]}"
                        f" but its config (r, rank_pattern) gives rank {rank}")
    return LoraModule(module, parts["kind"], a, b, scaling, bool(config.get("fan_in_fan_out")))


def _base_copies(others: Mapping[str, Tensor], factors: Mapping[str, Any],
                 config: Mapping[str, Any], where: str) -> dict[str, Tensor]:
    """Saved frozen base weights of targeted modules; any other full tensor is refused."""
    copies = {}
    for key, tensor in others.items():
        module = key.removesuffix(BASE_COPY_SUFFIX)
        if key.endswith(BASE_COPY_SUFFIX) and module in factors:
            copies[f"{module}.weight"] = tensor
            continue
        why = ("modules_to_save" if config.get("modules_to_save")
               else f"bias={config.get('bias')!r}" if key.endswith("bias") else "a resized or "
               "fully trained layer")
        raise UserError(f"{where} holds the full tensor {key} ({why}); only LoRA factors can be "
                        "merged, full weights are not supported")
    return copies
