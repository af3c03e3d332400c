"""Rank selection (``orchestrator.merge.selection``) against a stable full sort.

The reference ranks ``|delta|`` with a stable argsort, i.e. ties by position: exactly the rule
``rank_window`` promises, so the masks must be equal, also on bf16-like task vectors where
hundreds of thousands of entries tie at a threshold.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from orchestrator.merge.selection import order_statistics, rank_window


def reference_window(delta: torch.Tensor, start: int, stop: int, order=None) -> torch.Tensor:
    if order is None:
        order = torch.argsort(delta.abs().reshape(-1), stable=True)  # ties by position
    mask = torch.zeros(delta.numel())
    mask[order[max(start, 0):stop]] = 1.0
    return mask.view(delta.shape)


@lru_cache(maxsize=4)
def bf16_case(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16-like task vector and its stable ascending order (computed once per module)."""
    delta = bf16_task_vector(n, seed)
    return delta, torch.argsort(delta.abs(), stable=True)


def bf16_task_vector(n: int, seed: int) -> torch.Tensor:
    """``ft - base`` of bf16 weights: few distinct magnitudes, many ties and zeros."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    fine_tuned = (base.float() + 1e-3 * torch.randn(n, generator=g)).bfloat16()
    return fine_tuned.float() - base.float()


@pytest.mark.parametrize("kind", ["continuous", "bf16"])
def test_order_statistics_match_sorting(kind):
    values = torch.randn(10_000) if kind == "continuous" else bf16_task_vector(10_000, 0).abs()
    ranks = [0, 17, 5_000, 9_999]
    expected = torch.sort(values).values[ranks]
    assert torch.equal(torch.stack(order_statistics(values.clone(), ranks)), expected)


@pytest.mark.parametrize(("n", "seed"), [(50, 0), (1_200_000, 1)])  # the big one spans 2 tie chunks
@pytest.mark.parametrize("window", [(0.7, 1.0), (0.0, 0.3), (0.2, 0.95), (0.5, 0.5 + 1e-6)])
def test_rank_window_equals_stable_sort(n, seed, window):
    delta, order = bf16_case(n, seed)
    start, stop = int(window[0] * n), int(window[1] * n)
    work = delta.abs()
    rank_window(work, delta, start, stop)
    assert torch.equal(work, reference_window(delta, start, stop, order))


def test_rank_window_on_a_strided_delta():
    delta = bf16_task_vector(600, 2).view(20, 30).t()  # (30, 20), not contiguous
    work = torch.empty(delta.shape)
    torch.abs(delta, out=work)
    rank_window(work, delta, 100, 500)
    assert torch.equal(work, reference_window(delta, 100, 500))
