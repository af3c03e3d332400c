"""Data-flow search: a trial is a path through the candidates' layers (Sakana's DFS).

A space file with ``method: dataflow`` (or a variant, ``dataflow-ps``)::

    method: dataflow
    dataflow:
      sources: [knowledge, commonsense]   # candidates (and ``ps``), in slot order; default: all
      repeats: 2                           # r: the slots are the sources' layers, repeated r times
      scale: {low: 0.5, high: 1.5}         # optional: a scale per slot on its output projections
      scale_filters: [o_proj, down_proj]   # the tensors the scale multiplies (default)
      min_depth: 2                         # constraints, checked before the study starts
      max_depth: 6
      fix_first: true                      # the path starts with the first slot (or: a source name)
      fix_last: true                       # the path ends with the last slot (or: a source name)
      max_params: 1.5x                     # at most this many parameters (an int, or x the first source)
    ps:                                    # PS+DFS: a parameter-space merge as the source ``ps``
      method: task_arithmetic
      per_model: {weight: {low: 0.0, high: 1.5}}

The slots are ``for r in repeats: for source in sources: for layer in source``; each slot is
an on/off integer ``<method>.r<r>.<source>.L<layer>`` (0/1, so CMA-ES with margin handles it)
with an optional float ``<...>.scale``; the path is the slots that are on, in order.
``fix_first: true`` keeps the first slot on; ``fix_first: ps`` keeps source ``ps``'s first
slot (repeat 0, layer 0) on and the slots before it off (so the path starts there);
``fix_last`` likewise with the last slot or a source's last slot (last repeat, last layer).
Fixed and excluded slots are not searched. A path outside ``[min_depth, max_depth]`` is
repaired deterministically: the optional slots that are on are dropped from the last one
back, or the first slots that are off are switched on.

The trial's recipe is a mergekit ``passthrough`` recipe: one slice per run of consecutive
layers of one source, and a one-layer slice with ``parameters: {scale: [{filter: o_proj,
value: s}, {filter: down_proj, value: s}, {value: 1}]}`` per scaled layer. The ``ps`` source
is a model folder ``<runs>/<study>/ps/<method>-<key>``, merged from the PS recipe stored
beside it (``<folder>.yml``); the resident evaluator merges it in memory, and writes it to
disk only when a trial is confirmed (so the exported recipe runs with ``mergekit-yaml``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import UserError
from orchestrator.merge import MergeMethod, get_method

PS = "ps"
DATAFLOW_KEYS = ("sources", "repeats", "scale", "scale_filters", "min_depth", "max_depth", "fix_first",
                 "fix_last", "max_params")
_PS_RECIPES: dict[str, dict[str, Any]] = {}


@dataclass(frozen=True)
class Constraints:
    """What every path must satisfy (``max_params``: an int, or ``"1.5x"`` the first source's)."""

    min_depth: int = 1
    max_depth: int | None = None
    fix_first: bool | str = False
    fix_last: bool | str = False
    max_params: int | str | None = None


@dataclass(frozen=True)
class SourceInfo:
    """A source as bound before the study: its reference and each layer's parameter count."""

    name: str
    ref: str | None
    layer_numel: tuple[int, ...]

    @property
    def n_layers(self) -> int:
        return len(self.layer_numel)


@dataclass(frozen=True)
class Bound:
    """What a data-flow space needs from the candidates, fixed before the study starts."""

    sources: tuple[SourceInfo, ...]
    other_numel: int
    max_depth: int
    ps_root: str | None = None
    seed: int = 0


@dataclass(frozen=True)
class Step:
    """One layer of a path: layer ``layer`` of source ``source``, output projections x ``scale``."""

    source: str
    layer: int
    scale: float | None = None


@dataclass(frozen=True)
class DataflowChoice:
    """A trial's path, and the PS merge's suggested values when ``ps`` is a source."""

    steps: tuple[Step, ...]
    ps: tuple[Mapping[str, Any], Mapping[str, Mapping[str, Any]]] | None = None
    ps_method: str | None = None
    ps_root: str | None = None
    seed: int = 0
    scale_filters: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataflowSpace:
    """The data-flow space of one study method (see the module doc)."""

    method: str
    sources: tuple[str, ...] | None = None
    repeats: int = 1
    scale: tuple[float, float] | None = None
    scale_filters: tuple[str, ...] = ("o_proj", "down_proj")
    constraints: Constraints = Constraints()
    ps: Any = None  # a spaces.MethodSpace: the PS merge, searched in the same trial
    bound: Bound | None = field(default=None, compare=False)

    @property
    def spec(self) -> MergeMethod:
        return get_method("passthrough")

    def is_empty(self) -> bool:
        return False

    # -- slots ------------------------------------------------------------------------------
    def slots(self) -> list[tuple[int, SourceInfo, int]]:
        """(repeat, source, layer) of every slot, in order."""
        return [(r, s, layer) for r in range(self.repeats) for s in self._bound().sources
                for layer in range(s.n_layers)]

    def slot_name(self, repeat: int, source: str, layer: int) -> str:
        return f"{self.method}.r{repeat}.{source}.L{layer}"

    def ends(self) -> tuple[int | None, int | None]:
        """The slots the path must start and end with (fix_first, fix_last), or None."""
        slots, c = self.slots(), self.constraints
        first = last = None
        if c.fix_first:
            first = 0 if c.fix_first is True else next(i for i, (r, s, layer) in enumerate(slots)
                                                        if s.name == c.fix_first and layer == 0)
        if c.fix_last:
            last = len(slots) - 1 if c.fix_last is True else max(
                i for i, (r, s, layer) in enumerate(slots) if s.name == c.fix_last and layer == s.n_layers - 1)
        return first, last

    def forced(self) -> set[int]:
        return {i for i in self.ends() if i is not None}

    def searched(self) -> list[int]:
        """The slots with an on/off parameter: between the fixed ends, the ends excluded."""
        first, last = self.ends()
        lo, hi = (first if first is not None else -1), (last if last is not None else len(self.slots()))
        return [i for i in range(len(self.slots())) if lo < i < hi]

    def _bound(self) -> Bound:
        if self.bound is None:
            raise UserError(f"data-flow space {self.method!r} is not bound to the candidates (bind_dataflow)")
        return self.bound

    # -- Optuna -----------------------------------------------------------------------------
    def suggest(self, trial: Any, model_names: Sequence[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """({"path": DataflowChoice}, {}): the slots that are on (repaired), their scales, the PS values."""
        bound, slots, forced, searched = self._bound(), self.slots(), self.forced(), set(self.searched())
        names = [self.slot_name(r, s.name, layer) for r, s, layer in slots]
        on = [i in forced or (i in searched and bool(trial.suggest_int(n, 0, 1))) for i, n in enumerate(names)]
        live = forced | searched
        scales = [trial.suggest_float(f"{n}.scale", *self.scale) if self.scale and i in live else None
                  for i, n in enumerate(names)]
        keep = repair(on, forced, self.constraints.min_depth, bound.max_depth, live)
        steps = tuple(Step(slots[i][1].name, slots[i][2], scales[i]) for i in keep)
        ps = self.ps.suggest(trial, model_names) if self.ps is not None else None
        choice = DataflowChoice(steps, ps, self.ps.merge_method if self.ps is not None else None,
                                bound.ps_root, bound.seed, self.scale_filters)
        return {"path": choice}, {}

    def param_grid(self, model_names: Sequence[str], points: int) -> dict[str, list[Any]]:
        grid: dict[str, list[Any]] = {}
        forced, searched = self.forced(), set(self.searched())
        for i, (r, s, layer) in enumerate(self.slots()):
            name = self.slot_name(r, s.name, layer)
            if i in searched:
                grid[name] = [0, 1]
            if self.scale and (i in searched or i in forced):
                lo, hi = self.scale
                grid[f"{name}.scale"] = [lo + (hi - lo) * k / max(1, points - 1) for k in range(max(1, points))]
        if self.ps is not None:
            grid.update(self.ps.param_grid(model_names, points))
        return grid

    def as_dict(self, nested: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        """Plain data for logging and the fingerprint (every key that changes the search)."""
        out: dict[str, Any] = {"method": self.method, "sources": list(self.sources) if self.sources else None,
                               "repeats": self.repeats, "scale": list(self.scale) if self.scale else None,
                               "scale_filters": list(self.scale_filters),
                               "constraints": dict(vars(self.constraints))}
        if self.ps is not None:
            out["ps"] = nested(self.ps)
        if self.bound is not None:
            out["slots"] = len(self.slots())
            out["max_depth_effective"] = self.bound.max_depth
        return out


def repair(on: Sequence[bool], forced: set[int], min_depth: int, max_depth: int,
           allowed: set[int] | None = None) -> list[int]:
    """The slots that are on, within ``[min_depth, max_depth]`` (only ``allowed`` slots added).

    Too deep: the optional slots that are on are dropped from the last one back. Too shallow:
    the first slots that are off are switched on. Deterministic, so one genotype is one path.
    """
    chosen = [i for i, x in enumerate(on) if x]
    droppable = [i for i in reversed(chosen) if i not in forced]
    while len(chosen) > max_depth and droppable:
        chosen.remove(droppable.pop(0))
    off = [i for i, x in enumerate(on) if not x and (allowed is None or i in allowed)]
    while len(chosen) < min_depth and off:
        chosen.append(off.pop(0))
    return sorted(chosen)


# -- parsing ----------------------------------------------------------------------------------
def parse_dataflow(data: Mapping[str, Any], where: str, name: str,
                   parse_space: Callable[..., Any]) -> DataflowSpace:
    """A data-flow space from a space file's mapping; ``parse_space`` parses its ``ps`` section."""
    unknown = set(data) - {"method", "dataflow", "ps"}
    if unknown:
        raise UserError(f"{where}: unknown section(s) {sorted(unknown)} in a data-flow space; valid: method, "
                        "dataflow, ps")
    section = data.get("dataflow") or {}
    if not isinstance(section, Mapping):
        raise UserError(f"{where}: dataflow must be a mapping of {', '.join(DATAFLOW_KEYS)}")
    bad = set(section) - set(DATAFLOW_KEYS)
    if bad:
        raise UserError(f"{where}: unknown dataflow key(s) {sorted(bad)}; valid: {', '.join(DATAFLOW_KEYS)}")
    sources = _sources(section.get("sources"), where)
    ps = None
    if data.get("ps") is not None:
        if not isinstance(data["ps"], Mapping) or "method" not in data["ps"]:
            raise UserError(f"{where}: ps must be a search space with a method (the parameter-space merge)")
        ps = replace(parse_space(data["ps"], f"{where}: ps"), prefix=f"{name}.{PS}")
    if (ps is not None) != (sources is not None and PS in sources):
        raise UserError(f"{where}: a ps section and the source 'ps' in dataflow.sources go together "
                        f"(sources {list(sources) if sources else 'all candidates'}, ps "
                        f"{'given' if ps is not None else 'missing'})")
    return DataflowSpace(name, sources, _int(section, "repeats", 1, 1, where), _scale(section, where),
                         _filters(section, where), _constraints(section, where), ps)


def _int(section: Mapping[str, Any], key: str, default: int | None, low: int, where: str) -> int | None:
    value = section.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{where}: dataflow.{key} must be an integer >= {low}, got {value!r}")
    return value


def _sources(raw: Any, where: str) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw or not all(isinstance(s, str) for s in raw) or len(set(raw)) < len(raw):
        raise UserError(f"{where}: dataflow.sources must be a list of distinct candidate names (or ps), got {raw!r}")
    return tuple(raw)


def _scale(section: Mapping[str, Any], where: str) -> tuple[float, float] | None:
    raw = section.get("scale")
    if raw is None:
        return None
    ok = isinstance(raw, Mapping) and set(raw) == {"low", "high"} and all(
        isinstance(raw[k], (int, float)) and not isinstance(raw[k], bool) for k in ("low", "high"))
    if not ok or not 0 <= raw["low"] <= raw["high"]:
        raise UserError(f"{where}: dataflow.scale must be {{low, high}} with 0 <= low <= high, got {raw!r}")
    return float(raw["low"]), float(raw["high"])


def _filters(section: Mapping[str, Any], where: str) -> tuple[str, ...]:
    raw = section.get("scale_filters", ["o_proj", "down_proj"])
    if not isinstance(raw, list) or not raw or not all(isinstance(f, str) and f.strip() for f in raw):
        raise UserError(f"{where}: dataflow.scale_filters must be a non-empty list of tensor-name substrings, "
                        f"got {raw!r}")
    return tuple(raw)


def _constraints(section: Mapping[str, Any], where: str) -> Constraints:
    lo = _int(section, "min_depth", 1, 1, where)
    hi = _int(section, "max_depth", None, 1, where)
    if hi is not None and hi < lo:
        raise UserError(f"{where}: dataflow.min_depth {lo} > max_depth {hi}")
    flags = {k: section.get(k, False) for k in ("fix_first", "fix_last")}
    if not all(isinstance(v, (bool, str)) for v in flags.values()):
        raise UserError(f"{where}: dataflow.fix_first and fix_last must be true, false or a source name, "
                        f"got {flags}")
    cap = section.get("max_params")
    if cap is not None and not _is_cap(cap):
        raise UserError(f"{where}: dataflow.max_params must be a positive integer or a ratio like '1.5x', "
                        f"got {cap!r}")
    return Constraints(lo, hi, flags["fix_first"], flags["fix_last"], cap)


def _is_cap(cap: Any) -> bool:
    if isinstance(cap, int) and not isinstance(cap, bool):
        return cap > 0
    return isinstance(cap, str) and re.fullmatch(r"\d+(\.\d+)?x", cap.strip()) is not None and float(cap[:-1]) > 0


# -- binding (before the study) ----------------------------------------------------------------
def bind_dataflow(space: DataflowSpace, infos: Mapping[str, SourceInfo], other_numel: int,
                  ps_root: str | None, seed: int, where: str) -> DataflowSpace:
    """The space over these sources; every constraint checked (one-line errors)."""
    names = space.sources or tuple(n for n in infos if n != PS)
    missing = [n for n in names if n not in infos]
    if missing:
        raise UserError(f"{where}: dataflow.sources {missing} are not candidates; valid: "
                        f"{', '.join(n for n in infos if n != PS)}")
    sources = tuple(infos[n] for n in names)
    for key in ("fix_first", "fix_last"):
        value = getattr(space.constraints, key)
        if isinstance(value, str) and value not in names:
            raise UserError(f"{where}: dataflow.{key} {value!r} is not a source; valid: {', '.join(names)}")
    bound = Bound(sources, other_numel, 0, ps_root, seed)
    space = replace(space, bound=bound)
    depth = effective_max_depth(space, where)
    return replace(space, bound=replace(bound, max_depth=depth))


def effective_max_depth(space: DataflowSpace, where: str) -> int:
    """max_depth, the number of slots and max_params as one depth bound, checked to be feasible."""
    c, n = space.constraints, len(space.slots())
    bound = space._bound()
    limits = {"slots": n, **({"max_depth": c.max_depth} if c.max_depth is not None else {})}
    if c.max_params is not None:
        cap = param_cap(c.max_params, bound)
        widest = max(max(s.layer_numel) for s in bound.sources)
        limits[f"max_params {c.max_params} ({cap:,} parameters)"] = max(0, (cap - bound.other_numel) // widest)
    first, last = space.ends()
    if first is not None and last is not None and first > last:
        raise UserError(f"{where}: dataflow.fix_first {c.fix_first!r} comes after fix_last {c.fix_last!r} "
                        "in the slot order (repeats x sources x layers)")
    limits["slots between the fixed ends"] = len(space.searched()) + len(space.forced())
    depth = min(limits.values())
    need = max(c.min_depth, len(space.forced()))
    if depth < need:
        why = ", ".join(f"{k} {v}" for k, v in limits.items())
        raise UserError(f"{where}: no path fits: it needs at least {need} layers (min_depth {c.min_depth}, "
                        f"fix_first/fix_last {len(space.forced())}) but at most {depth} are allowed ({why})")
    return depth


def param_cap(cap: int | str, bound: Bound) -> int:
    """``max_params`` in parameters (a ratio is of the first source's size)."""
    if isinstance(cap, int):
        return cap
    first = bound.sources[0]
    return int(float(cap.strip()[:-1]) * (bound.other_numel + sum(first.layer_numel)))


def path_params(steps: Sequence[Step], bound: Bound) -> int:
    """Parameters of the model a path makes."""
    size = {s.name: s.layer_numel for s in bound.sources}
    return bound.other_numel + sum(size[s.source][s.layer] for s in steps)


# -- the recipe ---------------------------------------------------------------------------------
def path_recipe(choice: DataflowChoice, refs: Mapping[str, str], dtype: str | None,
                tokenizer_source: str | None = None) -> dict[str, Any]:
    """The mergekit ``passthrough`` recipe of a path (``refs``: source name -> model folder)."""
    slices: list[dict[str, Any]] = []
    last: tuple[str, int] | None = None
    for step in choice.steps:
        scaled = step.scale is not None and float(step.scale) != 1.0
        run = slices[-1]["sources"][0] if slices and not scaled and last == (step.source, step.layer) else None
        if run is not None and "parameters" not in run:
            run["layer_range"][1] += 1
        else:
            src: dict[str, Any] = {"model": refs[step.source], "layer_range": [step.layer, step.layer + 1]}
            if scaled:
                rules = [{"filter": f, "value": float(step.scale)} for f in choice.scale_filters]
                src["parameters"] = {"scale": [*rules, {"value": 1.0}]}
            slices.append({"sources": [src]})
        last = (step.source, step.layer + 1)
    recipe: dict[str, Any] = {"merge_method": "passthrough", "slices": slices}
    if dtype:
        recipe["dtype"] = dtype
    if tokenizer_source:
        recipe["tokenizer_source"] = tokenizer_source
    return recipe


def ps_folder(ps_root: str, method: str, key: str) -> str:
    return str(Path(ps_root) / f"{method}-{key}")


def register_ps(folder: str, recipe: Mapping[str, Any]) -> None:
    """Keep the PS recipe of a ``ps`` folder (in this process and as ``<folder>.yml``)."""
    _PS_RECIPES[folder] = dict(recipe)
    side = Path(f"{folder}.yml")
    if side.is_file():
        return
    side.parent.mkdir(parents=True, exist_ok=True)
    tmp = side.with_name(f".{side.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(dict(recipe), sort_keys=False), encoding="utf-8")
    tmp.replace(side)


def ps_recipe_of(folder: str) -> dict[str, Any] | None:
    """The PS recipe that makes ``folder`` (None: it is no ``ps`` folder of a data-flow study)."""
    if folder not in _PS_RECIPES:
        side = Path(f"{folder}.yml")
        if not side.is_file():
            return None
        _PS_RECIPES[folder] = yaml.safe_load(side.read_text(encoding="utf-8"))
    return dict(_PS_RECIPES[folder])
