"""Per-layer-group and per-filter values of one searched parameter (mergekit-evolve's genome).

A distribution of a search space may add, for any per-model or global parameter::

    weight: {low: 0.0, high: 1.2, layer_groups: 3, filters: [self_attn, mlp]}
    density: {low: 0.2, high: 1.0, layer_groups: 4, smooth: true}
    weight: {low: -0.5, high: 1.0, allow_negative: true}

* ``layer_groups: K``: a value per contiguous block of layers (K blocks of near-equal size;
  block ``b`` holds layers ``[b*L//K, (b+1)*L//K)``).
* ``filters: [self_attn, mlp]``: a value per filter group (tensor names containing the
  filter) and one more for the rest (``rest``: norms, embeddings, lm_head).
* ``smooth: true``: the K values are control points of a mergekit gradient, interpolated over
  the layers; otherwise each block is constant.
* ``allow_negative: true``: a ``weight`` range may go below 0 (refused otherwise).

Optuna names: ``<prefix>.g<k>.<filter>`` (``ties.knowledge.weight.g2.mlp``,
``ties.lambda.g0.rest``); ``.g<k>`` is left out when K is 1, the filter part when there are
no filters.

The recipe is an ordinary mergekit recipe. Filters become ``[{filter: self_attn, value: v},
{filter: mlp, value: v}, {value: v}]``. Smooth groups become K-point gradients in ``models:``
syntax. Discrete groups (K > 1, not smooth) become ``slices:``, one per block, each source
with its own parameters: what mergekit-evolve's discrete genome writes
(``mergekit/evo/genome.py``, ``_discrete_config_slices``), so each block's values are exact
(no gradient position ``t*(n-1)`` rounding between repeated points) and the non-layer tensors
get what mergekit gives them (embeddings: the first block's values; final norm and lm_head:
the last block's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import UserError

REST = "rest"
GENOME_KEYS = ("layer_groups", "filters", "smooth", "allow_negative")


@dataclass(frozen=True)
class Layout:
    """How one distribution expands: K layer groups, filter groups, smooth or per block."""

    groups: int = 1
    filters: tuple[str, ...] = ()
    smooth: bool = False

    @property
    def trivial(self) -> bool:
        return self.groups == 1 and not self.filters

    @property
    def discrete(self) -> bool:
        """One value per block of layers: the recipe needs one slice per block."""
        return self.groups > 1 and not self.smooth

    def names(self, base: str) -> list[str]:
        """Optuna parameter names, group-major then filter group."""
        groups = [f".g{k}" for k in range(self.groups)] if self.groups > 1 else [""]
        sets = [f".{f}" for f in (*self.filters, REST)] if self.filters else [""]
        return [f"{base}{g}{s}" for g in groups for s in sets]

    def assemble(self, values: Sequence[Any]) -> Any:
        """Suggested values (in ``names`` order) -> a mergekit setting, or ``PerBlock``."""
        width = len(self.filters) + 1 if self.filters else 1
        rows = [list(values[k * width:(k + 1) * width]) for k in range(self.groups)]
        if self.smooth:
            return self._rules([[row[i] for row in rows] for i in range(width)])
        blocks = tuple(self._rules(row) for row in rows)
        return PerBlock(blocks) if self.groups > 1 else blocks[0]

    def _rules(self, per_set: Sequence[Any]) -> Any:
        """One value (or gradient) per filter group -> ``[{filter, value}..., {value}]``."""
        if not self.filters:
            return per_set[0]
        return [{"filter": f, "value": v} for f, v in zip(self.filters, per_set)] + [{"value": per_set[-1]}]


@dataclass(frozen=True)
class PerBlock:
    """A parameter's setting per block of layers (``ranges``: each block's layer range)."""

    values: tuple[Any, ...]
    ranges: tuple[tuple[int, int], ...] = ()


def parse_layout(spec: Mapping[str, Any], where: str) -> tuple[Layout, bool]:
    """The genome keys of one distribution: (layout, allow_negative); one-line errors."""
    groups = spec.get("layer_groups", 1)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise UserError(f"{where}: layer_groups must be an integer >= 1, got {groups!r}")
    filters = spec.get("filters") or []
    if not isinstance(filters, list) or not all(isinstance(f, str) and f.strip() for f in filters):
        raise UserError(f"{where}: filters must be a list of tensor-name substrings like [self_attn, mlp], "
                        f"got {filters!r}")
    if len(set(filters)) != len(filters) or REST in filters:
        raise UserError(f"{where}: filters must be distinct and not {REST!r} (the name of the remaining "
                        f"tensors' group), got {filters}")
    flags = {k: spec.get(k, False) for k in ("smooth", "allow_negative")}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise UserError(f"{where}: {key} must be true or false, got {value!r}")
    if flags["smooth"] and groups < 2:
        raise UserError(f"{where}: smooth: true interpolates between layer groups; set layer_groups >= 2 "
                        f"(got {groups})")
    if spec.get("gradient") and (groups > 1 or filters or flags["smooth"]):
        raise UserError(f"{where}: gradient: K is layer_groups: K with smooth: true; use one or the other")
    return Layout(groups, tuple(filters), flags["smooth"]), flags["allow_negative"]


def check_negative(key: str, low: Any, allow_negative: bool, where: str) -> None:
    """A weight range below 0 needs ``allow_negative: true`` (it subtracts a task vector)."""
    if key == "weight" and isinstance(low, (int, float)) and low < 0 and not allow_negative:
        raise UserError(f"{where}: weight range low={low} < 0 subtracts the model's task vector; set "
                        "allow_negative: true to search negative weights, or raise low to 0")


def check_layouts(layouts: Mapping[str, Layout], where: str) -> None:
    """One slice layout per space: discrete groups agree on K and do not mix with gradients."""
    discrete = {k: lay.groups for k, lay in layouts.items() if lay.discrete}
    if len(set(discrete.values())) > 1:
        raise UserError(f"{where}: discrete layer_groups must be the same for every parameter (one slice "
                        f"per block), got {discrete}; or set smooth: true")
    smooth = [k for k, lay in layouts.items() if lay.smooth]
    if discrete and smooth:
        raise UserError(f"{where}: {smooth[0]} is smooth (a gradient) but {next(iter(discrete))} has discrete "
                        "layer groups (one slice per block, where a gradient would restart); make both smooth "
                        "or both discrete")


def block_ranges(n_layers: int, groups: int, where: str = "search space") -> tuple[tuple[int, int], ...]:
    """Contiguous blocks of near-equal size: block b is ``[b*L//K, (b+1)*L//K)``."""
    if groups > n_layers:
        raise UserError(f"{where}: layer_groups {groups} > {n_layers}, the candidates' layer count")
    return tuple((b * n_layers // groups, (b + 1) * n_layers // groups) for b in range(groups))


def with_ranges(value: Any, ranges: tuple[tuple[int, int], ...]) -> Any:
    """``value`` with the block ranges attached, if it is per block."""
    return PerBlock(value.values, ranges) if isinstance(value, PerBlock) else value


def has_blocks(global_values: Mapping[str, Any], per_model: Mapping[str, Mapping[str, Any]]) -> bool:
    values = [*global_values.values(), *(v for params in per_model.values() for v in params.values())]
    return any(isinstance(v, PerBlock) for v in values)


def to_slices(recipe: dict[str, Any]) -> dict[str, Any]:
    """A ``models:`` recipe whose settings hold ``PerBlock`` values -> one slice per block.

    As mergekit-evolve writes its discrete genome: every slice lists the models over the
    block's layers with their block's parameters, plus the base (when it is not a model);
    per-block global values go to the slice's parameters, the others stay at the top.
    """
    ranges = _ranges(recipe)
    models = recipe.pop("models")
    names = [m["model"] for m in models]
    base = recipe.get("base_model")
    top = dict(recipe.pop("parameters", {}) or {})
    blocked = {k: v for k, v in top.items() if isinstance(v, PerBlock)}
    slices = []
    for b, rng in enumerate(ranges):
        sources = [_source(m["model"], rng, m.get("parameters") or {}, b) for m in models]
        if base is not None and base not in names:
            sources.append({"model": base, "layer_range": list(rng)})
        sl: dict[str, Any] = {"sources": sources}
        if blocked:
            sl["parameters"] = {k: v.values[b] for k, v in blocked.items()}
        slices.append(sl)
    recipe["slices"] = slices
    rest = {k: v for k, v in top.items() if k not in blocked}
    if rest:
        recipe["parameters"] = rest
    return recipe


def _source(model: str, rng: tuple[int, int], params: Mapping[str, Any], block: int) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model, "layer_range": list(rng)}
    if params:
        out["parameters"] = {k: v.values[block] if isinstance(v, PerBlock) else v for k, v in params.items()}
    return out


def _ranges(recipe: Mapping[str, Any]) -> tuple[tuple[int, int], ...]:
    found = [v.ranges for v in _settings(recipe) if isinstance(v, PerBlock)]
    if not found or not found[0] or any(r != found[0] for r in found):
        raise UserError("per-block values need the candidates' layer count: bind the search space first "
                        "(MethodSpace.bind) so every parameter has the same blocks")
    return found[0]


def _settings(recipe: Mapping[str, Any]) -> list[Any]:
    values = list((recipe.get("parameters") or {}).values())
    for model in recipe.get("models") or []:
        values += list((model.get("parameters") or {}).values())
    return values
