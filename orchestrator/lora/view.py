"""A base model with adapters baked in, read lazily like a model folder.

``BakedWeights`` wraps the base's ``ModelWeights`` and answers the same questions (names,
headers, config, folder, ``get``), adding ``sum_i w_i delta W_i`` to the tensors the adapters
target as they are read. A recipe model ``base+adapter`` can thus enter any merge method, the
full-tensor ones (slerp, model_stock...) included, without writing the baked model to disk.
Values are base + update in float32, rounded once to the dtype asked for (a baked model saved
to disk in 16 bits would be rounded there already).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from orchestrator.lora.adapter import Adapter


class BakedWeights:
    """Lazy view of ``base + sum_i w_i delta W_i`` over a ``ModelWeights``-like base.

    Args:
        base: the base's weights (``names``, ``info``, ``get``, ``config``, ``folder``...).
        adapters: the adapters to bake in, checked against the base's shapes.
        weights: one coefficient per adapter (default: 1 each).
    """

    def __init__(self, base: Any, adapters: Sequence[Adapter], weights: Sequence[float] | None = None):
        shapes = {n: base.info(n).shape for n in base.names()}
        self.base = base
        self.adapters = [a.for_base(shapes) for a in adapters]
        self.weights = list(weights) if weights is not None else [1.0] * len(adapters)
        self.config = base.config
        self.folder = base.folder
        self.infos = base.infos
        for adapter in self.adapters:
            adapter.check_base_copies({n: base.get(n) for n in adapter.base_copies if n in base})

    def names(self) -> list[str]:
        """Tensor names, as the base's."""
        return self.base.names()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def info(self, name: str) -> Any:
        """Header facts of the base tensor (same name, shape and dtype)."""
        return self.base.info(name)

    def nbytes(self) -> int:
        """Bytes of the base's tensors."""
        return self.base.nbytes()

    def get(self, name: str, *, device: str | torch.device | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor with the adapters' updates added (float32 sum, cast to ``dtype``)."""
        parts = [(a, w) for a, w in zip(self.adapters, self.weights) if name in a.modules]
        if not parts:
            return self.base.get(name, device=device, dtype=dtype)
        out = self.base.get(name, device=device, dtype=torch.float32).clone()
        for adapter, w in parts:
            out.add_(adapter.delta(name).to(out.device), alpha=w)
        return out.to(dtype or self.base.info(name).dtype)

    def close(self) -> None:
        """Close the base."""
        self.base.close()

    def __enter__(self) -> BakedWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
