"""LoRA adapters as merge sources: read PEFT adapters, merge their full updates exactly,
combine them into one adapter (cat, svd), reproduce PEFT's ``add_weighted_adapter``, bake them
into a base, and sweep adapter weights on a resident model.

PEFT itself is not imported here: adapters are read from their files (safetensors + JSON).
"""

from orchestrator.lora.adapter import Adapter, LoraModule, is_adapter_folder, load_adapter
from orchestrator.lora.combine import (
    apply_delta,
    bake,
    cat_adapters,
    combine_adapters,
    merge_adapters,
    merge_deltas,
    svd_adapter,
    weighted_sum_deltas,
)
from orchestrator.lora.merger import AdapterMerger, model_layout
from orchestrator.lora.peft_compat import COMBINATION_TYPES, peft_weighted_adapter
from orchestrator.lora.save import save_adapter
from orchestrator.lora.view import BakedWeights

__all__ = [
    "COMBINATION_TYPES", "Adapter", "AdapterMerger", "BakedWeights", "LoraModule", "apply_delta",
    "bake", "cat_adapters", "combine_adapters", "is_adapter_folder", "load_adapter",
    "merge_adapters", "merge_deltas", "model_layout", "peft_weighted_adapter", "save_adapter",
    "svd_adapter", "weighted_sum_deltas",
]
