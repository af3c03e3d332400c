"""The merge-method contract: one spec per method, one registry.

A method is a pure per-tensor function plus two frozen dataclasses:

* ``params``: global parameters, one value shared by all models (``normalize``, ``t``,
  ``lambda_``...). Field names are mergekit's keys; a trailing underscore is dropped
  (``lambda_`` is written ``lambda`` in recipes and search spaces).
* ``model_params``: per-model parameters (``weight``, ``density``, ``gamma``, ``epsilon``...),
  one instance per input model.

Both check their ranges in ``__post_init__`` and raise ``ValueError`` stating the rule and the
value ("density must be in (0, 1], got 1.5"); the recipe layer adds where (model, method).

The function signature is the same for every method::

    fn(xs, base, models, params, generator) -> Tensor

* ``xs``: the input tensors (float32, same shape), one per model, in recipe order, the base
  model excluded. For ``inputs == "deltas"`` methods they are task vectors ``x_i - base`` and
  the function returns the merged *delta* (the caller adds the base back; LoRA merging uses the
  delta directly). For ``inputs == "tensors"`` methods they are the raw tensors and the function
  returns the merged tensor.
* ``base``: the base model's tensor, or ``None`` where the method does not use one.
* ``models``: one ``model_params`` instance per entry of ``xs``.
* ``params``: the ``params`` instance.
* ``generator``: a seeded ``torch.Generator`` for methods with ``random=True`` (never the
  global RNG), else ``None``. It must live on the tensors' device.

Every function computes in float32, never modifies its inputs and returns a new tensor (never
one of its inputs), so callers may modify the result in place.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

MergeFn = Callable[[Sequence[Tensor], Tensor | None, Sequence[Any], Any, torch.Generator | None], Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """Registry entry for one merge method.

    Attributes:
        name: registry key, as written in recipes (``merge_method: ties``).
        fn: the pure per-tensor function (see module docstring).
        params: frozen dataclass of global parameters.
        model_params: frozen dataclass of per-model parameters.
        base: ``"required"``, ``"optional"`` or ``"none"`` (base model ignored / not allowed).
        inputs: ``"tensors"`` or ``"deltas"`` (what ``xs`` holds, and what ``fn`` returns).
        random: whether ``fn`` draws from ``generator``.
        min_models: fewest entries in ``xs``.
        max_models: most entries in ``xs`` (None: no limit).
        description: one line for ``--help`` and model cards.
        reference_url: the paper or page the method implements (model cards).
        fused: the models-in variant of a task-vector method (``fused(models' tensors, base,
            ...) -> base + merged delta``, task vectors computed a slice at a time, same bits as
            ``fn`` on whole task vectors plus the base); None where there is none. The
            streaming engine uses it to avoid holding any task vector.
        keywords: optional keywords ``fn`` (and ``fused``) accept: ``out`` (a float32 tensor
            of the output's shape to write into and return) and ``workspace`` (a
            ``chunks.Workspace`` of scratch buffers reused across calls).
        updates: whether the method merges adapter updates (``delta W = B A``) on their own:
            ``always`` (task-vector methods), ``when_normalized`` (it commutes with adding a
            shared base only when ``normalize_key`` is true) or ``never`` (full tensors).
        normalize_key: the global parameter that divides by the sum of the weights, if any
            (weights that always sum to zero cannot be searched with it on).
        any_dtype: ``fn`` converts its inputs to float32 itself, a slice at a time, so the
            streaming engine passes the tensors as stored (bf16 included) instead of whole
            float32 copies; the result is the same bits (bf16 to float32 is exact).
    """

    name: str
    fn: MergeFn
    params: type
    model_params: type
    base: Literal["required", "optional", "none"] = "none"
    inputs: Literal["tensors", "deltas"] = "tensors"
    random: bool = False
    min_models: int = 1
    max_models: int | None = None
    description: str = ""
    reference_url: str = ""
    fused: MergeFn | None = None
    keywords: frozenset[str] = frozenset()
    updates: Literal["always", "when_normalized", "never"] = "never"
    normalize_key: str | None = None
    any_dtype: bool = False

    def __post_init__(self) -> None:
        if self.fused is not None and self.inputs != "deltas":
            raise ValueError(f"method {self.name}: a fused (models-in) variant needs inputs='deltas'")
        unknown = set(self.keywords) - {"out", "workspace"}
        if unknown:
            raise ValueError(f"method {self.name}: unknown optional keywords {sorted(unknown)}")
        if self.any_dtype and self.inputs == "deltas":
            raise ValueError(f"method {self.name}: any_dtype is for methods over whole tensors "
                             "(task-vector methods have a fused variant instead)")
        if self.updates == "never" and self.inputs == "deltas":
            raise ValueError(f"method {self.name}: a method over task vectors merges updates")

    @property
    def needs_base(self) -> bool:
        """Whether a recipe must name a ``base_model``."""
        return self.base == "required"

    @property
    def merges_deltas(self) -> bool:
        """Whether ``fn`` takes task vectors and returns the merged delta."""
        return self.inputs == "deltas"

    def merges_updates(self, params: Any = None) -> bool:
        """Whether the method can merge adapter updates ``delta W_i`` alone, without their base.

        True for task-vector methods, and for methods that commute with adding a shared base
        (``linear`` with ``normalize``), given their global ``params`` (None: the defaults).
        """
        if self.updates != "when_normalized":
            return self.updates == "always"
        params = self.params() if params is None else params
        return bool(getattr(params, self.normalize_key or "", False))

    def global_keys(self) -> tuple[str, ...]:
        """Recipe keys of the global parameters."""
        return tuple(param_key(f.name) for f in dataclasses.fields(self.params))

    def model_keys(self) -> tuple[str, ...]:
        """Recipe keys of the per-model parameters."""
        return tuple(param_key(f.name) for f in dataclasses.fields(self.model_params))

    def required_model_keys(self) -> tuple[str, ...]:
        """Per-model keys without a default (e.g. ``weight`` for linear)."""
        return tuple(
            param_key(f.name)
            for f in dataclasses.fields(self.model_params)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )

    def required_global_keys(self) -> tuple[str, ...]:
        """Global keys without a default (e.g. ``t`` for slerp)."""
        return tuple(
            param_key(f.name)
            for f in dataclasses.fields(self.params)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )

    def make_params(self, values: dict[str, Any]) -> Any:
        """Build the global params dataclass from recipe keys."""
        return self.params(**{field_name(k): v for k, v in values.items()})

    def make_model_params(self, values: dict[str, Any]) -> Any:
        """Build one per-model params dataclass from recipe keys."""
        return self.model_params(**{field_name(k): v for k, v in values.items()})


@dataclass(frozen=True)
class NoParams:
    """For methods without global or per-model parameters."""


def param_key(name: str) -> str:
    """Dataclass field name -> recipe key (``lambda_`` -> ``lambda``)."""
    return name.rstrip("_")


def field_name(key: str) -> str:
    """Recipe key -> dataclass field name (``lambda`` -> ``lambda_``)."""
    return f"{key}_" if key in {"lambda"} else key


def check_range(name: str, value: float, low: float | None, high: float | None,
                *, low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is finite and ``low (<|<=) value (<|<=) high``.

    For ``__post_init__``; ``None`` bounds are open-ended.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {value!r}")


def check_int(name: str, value: int, low: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


def check_bool(name: str, value: bool) -> None:
    """Raise ``ValueError`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
