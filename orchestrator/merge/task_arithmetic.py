"""Generalized task arithmetic: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

One function (mergekit's ``GeneralizedTaskArithmeticMerge``), configured per method by a
sparsification method and whether signs are elected. Its inputs are task vectors
``delta_i = x_i - base`` and it returns the merged delta:

1. sparsify each delta (``sparsify.py``), optionally rescaling what is kept;
2. weight: ``w_i * delta_i``;
3. with consensus, elect a sign per entry and keep agreeing deltas (``consensus.py``),
   dividing by the agreeing weights; without, sum all, dividing by ``sum_i w_i``;
4. divide if ``normalize``; multiply by ``lambda``.

References: Ilharco et al. 2022, https://arxiv.org/abs/2212.04089 (task arithmetic);
Yadav et al. 2023, https://arxiv.org/abs/2306.01708 (TIES); Yu et al. 2023,
https://arxiv.org/abs/2311.03099 (DARE); Davari & Belilovsky 2023,
https://arxiv.org/abs/2312.06795 (Model Breadcrumbs); Deep et al. 2024,
https://arxiv.org/abs/2406.11617 (DELLA).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, make_dataclass
from typing import Any

import torch
from torch import Tensor

from orchestrator.merge import chunks
from orchestrator.merge.base import check_bool, check_choice, check_range
from orchestrator.merge.consensus import disjoint_merge
from orchestrator.merge.sparsify import Sparsification, TaskVectors
from orchestrator.merge.sparsify import sparsifiers

RESCALE_MODES = ("l1", "density")
SIGN_METHODS = ("weighted_sum", "sum")


# Per-model parameters --------------------------------------------------------------------------

@dataclass(frozen=True)
class DeltaParams:
    """Per-model parameters of task_arithmetic, ties and dare_*.

    Attributes:
        weight: the task vector's coefficient (any finite number; negative subtracts it).
        density: fraction of the task vector kept, in (0, 1] (task_arithmetic ignores it).
    """

    weight: float
    density: float = 1.0

    def __post_init__(self) -> None:
        check_range("weight", self.weight, None, None)
        check_range("density", self.density, 0, 1, low_open=True)


@dataclass(frozen=True)
class BreadcrumbsModelParams(DeltaParams):
    """Per-model parameters of breadcrumbs*: ``gamma`` is the fraction of largest entries dropped.

    Attributes:
        gamma: fraction of the largest ``|delta|`` dropped as outliers, in [0, 1].
    """

    gamma: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("gamma", self.gamma, 0, 1)


@dataclass(frozen=True)
class DellaModelParams(DeltaParams):
    """Per-model parameters of della*: keep probabilities span ``density ± epsilon``.

    Attributes:
        epsilon: half-width of the keep-probability range; with ``density < 1``,
            ``density - epsilon`` and ``density + epsilon`` must lie in (0, 1).
    """

    epsilon: float = 0.15

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("epsilon", self.epsilon, 0, 1, high_open=True)
        if self.density < 1 and not 0 < self.density - self.epsilon < self.density + self.epsilon < 1:
            raise ValueError("density - epsilon and density + epsilon must be in (0, 1), got "
                             f"density={self.density!r}, epsilon={self.epsilon!r}")


# Global parameters: mergekit's keys and per-method defaults, plus two opt-in paper variants --

# str, not Literal, for the choices: OmegaConf structured configs reject Literal annotations.
_GTA_FIELDS: dict[str, tuple[type, str]] = {  # key: (type, meaning)
    "normalize": (bool, "divide by the sum of the (agreeing) weights"),
    "rescale": (bool, "rescale what sparsification keeps, as rescale_mode says"),
    "lambda_": (float, "multiply the merged delta by this (recipe key ``lambda``)"),
    "int8_mask": (bool, "accepted for mergekit recipes; no effect (a memory option there)"),
    "rescale_mode": (str, '"l1" (mergekit): match the task vector\'s L1 norm; "density" '
                     "(papers, PEFT): divide by the keep probability (1/density; DELLA: per entry)"),
    "sign_method": (str, '"weighted_sum" (mergekit): elect sign(sum_i w_i delta_i), divide '
                    'by the agreeing weights; "sum" (paper, PEFT): elect sign(sum_i delta_i), '
                    "divide by the agreeing count"),
}


def _check_gta(p: Any) -> None:
    for name in ("normalize", "rescale", "int8_mask"):
        check_bool(name, getattr(p, name))
    check_range("lambda", p.lambda_, None, None)
    if hasattr(p, "rescale_mode"):
        check_choice("rescale_mode", p.rescale_mode, RESCALE_MODES)
    if hasattr(p, "sign_method"):
        check_choice("sign_method", p.sign_method, SIGN_METHODS)


def _gta_params(name: str, methods: str, *, normalize: bool, rescale: bool, sparse: bool,
                consensus: bool) -> type:
    """A frozen params dataclass with mergekit's defaults for ``methods``, documented field by field."""
    defaults: dict[str, Any] = {"normalize": normalize, "rescale": rescale, "lambda_": 1.0,
                                "int8_mask": False}
    if sparse:
        defaults["rescale_mode"] = "l1"
    if consensus:
        defaults["sign_method"] = "weighted_sum"
    doc = f"Global parameters of {methods}.\n\nAttributes:\n" + "".join(
        f"    {k}: {_GTA_FIELDS[k][1]} (default {v!r}).\n" for k, v in defaults.items())
    return make_dataclass(name, [(k, _GTA_FIELDS[k][0], field(default=v)) for k, v in defaults.items()],
                          frozen=True, namespace={"__post_init__": _check_gta, "__doc__": doc,
                                                  "__module__": __name__})


# mergekit's table (generalized_task_arithmetic.py): normalize and rescale defaults per method.
TaskArithmeticParams = _gta_params("TaskArithmeticParams", "task_arithmetic",
                                   normalize=False, rescale=False, sparse=False, consensus=False)
TiesParams = _gta_params("TiesParams", "ties",
                         normalize=True, rescale=False, sparse=True, consensus=True)
DareTiesParams = _gta_params("DareTiesParams", "dare_ties",
                             normalize=False, rescale=True, sparse=True, consensus=True)
DareLinearParams = _gta_params("DareLinearParams", "dare_linear and della_linear",
                               normalize=False, rescale=True, sparse=True, consensus=False)
BreadcrumbsParams = _gta_params("BreadcrumbsParams", "breadcrumbs",
                                normalize=False, rescale=False, sparse=True, consensus=False)
BreadcrumbsTiesParams = _gta_params("BreadcrumbsTiesParams", "breadcrumbs_ties",
                                    normalize=False, rescale=False, sparse=True, consensus=True)
DellaParams = _gta_params("DellaParams", "della",
                          normalize=True, rescale=True, sparse=True, consensus=True)


# The merge -------------------------------------------------------------------------------------

def generalized_task_arithmetic(xs: Sequence[Tensor], base: Tensor | None,
                                models: Sequence[DeltaParams], params: Any,
                                generator: torch.Generator | None, *,
                                sparsification: Sparsification | None = None,
                                consensus: bool = False, out: Tensor | None = None,
                                workspace: chunks.Workspace | None = None) -> Tensor:
    """Merge task vectors ``xs`` into one delta (see the module docstring for the steps).

    ``sparsification`` and ``consensus`` are fixed per method by the registry (``functools.partial``).
    A caller merging many tensors may pass ``out`` (a float32 tensor of the inputs' shape, which
    is then returned) and a ``workspace`` for scratch memory, both reused across calls.
    """
    return _merge(TaskVectors(xs, workspace=workspace), models, params, generator, sparsification,
                  consensus, out=out)


def merge_models(xs: Sequence[Tensor], base: Tensor, models: Sequence[DeltaParams], params: Any,
                 generator: torch.Generator | None, *, sparsification: Sparsification | None = None,
                 consensus: bool = False, out: Tensor | None = None,
                 workspace: chunks.Workspace | None = None) -> Tensor:
    """The same merge from the models' own tensors: returns ``base + merged delta``.

    ``xs`` and ``base`` may be stored in any float dtype (each slice is converted to float32).
    The task vectors ``x_i - base`` are computed a slice at a time and never held whole, so
    the result equals ``generalized_task_arithmetic([x - base for x in xs], ...) + base`` bit
    for bit, in a fraction of the memory and time. Neither input is modified. ``out`` and
    ``workspace`` as for ``generalized_task_arithmetic``.
    """
    return _merge(TaskVectors(xs, base, workspace), models, params, generator, sparsification,
                  consensus, out=out, add_base=True)


def _merge(tv: TaskVectors, models: Sequence[DeltaParams], params: Any,
           generator: torch.Generator | None, sparsification: Sparsification | None,
           consensus: bool, *, out: Tensor | None = None, add_base: bool = False) -> Tensor:
    """Steps 1-4 (module docstring), then ``+ base`` when ``add_base``, a slice at a time.

    Sparsification is decided per task vector over the whole tensor first (magnitude
    thresholds, random masks, L1 norms); everything after is elementwise and runs per slice in
    a few cache-sized buffers, so the only full-size allocations are the result, one byte per
    entry per random mask, and (magnitude ranks off CPU only) one ``|delta|`` scratch: on CPU
    the ranks come from counting passes over the slices (``selection.py``).
    """
    rescale = getattr(params, "rescale_mode", "l1") if params.rescale else None  # task_arithmetic: none
    weights = [m.weight for m in models]
    # 1. Sparsify: decide what each task vector keeps (drawing random masks model by model).
    trims = sparsifiers(tv, models, sparsification, rescale=rescale, generator=generator)
    result = torch.empty(tv.shape, dtype=torch.float32, device=tv.device) if out is None else out
    flat_out = result.view(-1)  # (n,) the merged tensor
    size = tv.size
    bufs = tv.buffers("trim", len(models))  # one per task vector
    tmp, elected, total = tv.buffers("merge", 3)
    weight_sum = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0  # mergekit: ~0 -> 1
    for start, stop in chunks.spans(tv.n, size):
        o = flat_out[start:stop]
        m = stop - start
        trimmed = [trim.apply(tv.read(j, start, stop, buf), buf[:m], start, tmp)
                   for j, (trim, buf) in enumerate(zip(trims, bufs))]
        if consensus:
            # 2-3. Elect signs, sum the agreeing weighted deltas.
            mixed, divisor = disjoint_merge(trimmed, weights, params.sign_method,
                                            divisor=params.normalize, work=[b[:m] for b in bufs],
                                            out=o, elected=elected[:m], total=total[:m])
        else:
            # 2-3. Sum the weighted deltas.
            mixed, divisor = _weighted_into(trimmed, weights, o), weight_sum
        # 4. Normalize and scale.
        if params.normalize:
            mixed.div_(divisor)
        if params.lambda_ != 1:
            mixed.mul_(params.lambda_)
        if add_base:
            mixed.add_(tv.base_chunk(start, stop))
    return result


def _weighted_into(xs: Sequence[Tensor], weights: Sequence[float], out: Tensor) -> Tensor:
    """``sum_i w_i x_i`` into ``out``."""
    torch.mul(xs[0], weights[0], out=out)
    for x, w in zip(xs[1:], weights[1:]):
        out.add_(x, alpha=w)
    return out
