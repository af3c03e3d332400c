"""NearSwap: take the other model's value where it is already near the base's.

Reference: mergekit 0.1.5's ``nearswap`` (alchemonaut,
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001), whose semantics this follows.

Per entry, with ``delta = x - base`` (one model besides the base):

    w = clamp(t / max(|delta|, 1e-6), 0, 1),   result = base + w * delta

(mergekit writes ``w x + (1 - w) base``, the same value). Entries that differ by at most ``t``
take the model's value; larger differences move only ``t`` towards it, so ``t`` is in the units
of the weights (mergekit's example uses 1e-4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from orchestrator.merge.base import NoParams, check_range

ABSDIFF_MIN = 1e-6  # mergekit clamps |delta| to at least this before dividing


@dataclass(frozen=True)
class NearswapParams:
    """Global parameters of nearswap.

    Attributes:
        t: the distance under which the model's value is taken whole, in [0, inf) (required;
            a negative ``t`` would always give the base).
    """

    t: float

    def __post_init__(self) -> None:
        check_range("t", self.t, 0, None)


def nearswap(xs: Sequence[Tensor], base: Tensor | None, models: Sequence[NoParams],
             params: NearswapParams, generator: torch.Generator | None) -> Tensor:
    """The merged delta ``w * delta`` of the one task vector ``xs[0]`` (module docstring)."""
    delta = xs[0].float()  # (*shape)
    weight = (params.t / delta.abs().clamp_(min=ABSDIFF_MIN)).clamp_(0, 1)  # (*shape)
    return weight.mul_(delta)
