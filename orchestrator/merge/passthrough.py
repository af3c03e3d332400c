"""Passthrough: copy one model's tensor, optionally scaled (for slice-stacking recipes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from orchestrator.merge.base import NoParams, check_range


@dataclass(frozen=True)
class ScaleParams:
    """Per-model parameters of passthrough.

    Attributes:
        scale: multiply the tensor by this (``None``: copy it unchanged).
    """

    scale: float | None = None

    def __post_init__(self) -> None:
        if self.scale is not None:
            check_range("scale", self.scale, None, None)


def passthrough(xs: Sequence[Tensor], base: Tensor | None, models: Sequence[ScaleParams],
                params: NoParams, generator: torch.Generator | None) -> Tensor:
    """The single input, times ``scale`` if given (always a new tensor)."""
    scale = models[0].scale
    return xs[0].float().clone() if scale is None else torch.mul(xs[0].float(), scale)
