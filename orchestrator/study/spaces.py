"""Search spaces: ``search_spaces/<method>.yaml`` -> Optuna ``suggest_*`` -> parameter values.

A space file names a method and declares distributions for its per-model parameters
(``per_model``: suggested once per candidate model), its global parameters (``global``) and
fixed values (``fixed``)::

    method: ties
    per_model:
      weight: {low: 0.1, high: 1.5}
      density: {low: 0.1, high: 1.0}
    global:
      lambda: {low: 0.5, high: 1.5}
    fixed:
      normalize: true

A distribution is ``{low, high}`` (float; ``log: true``, ``step``, ``int: true`` optional),
``{choices: [...]}``, and any numeric one may add ``gradient: K``: K control points
interpolated over the layers (mergekit's gradient list), named ``<param>.0``, ``<param>.1``...
Any one may also add the genome keys of ``genome``: ``layer_groups: K``, ``filters: [...]``,
``smooth: true`` and ``allow_negative: true`` (names ``<param>.g<k>.<filter>``). Every key and
every corner of every range is checked against the method's params dataclasses when the space
is loaded, so a typo or an out-of-range bound fails before the first trial.

A space file may be a variant of a method: ``search_spaces/ties-layers.yaml`` declares
``method: ties-layers``, merges with ``ties`` and is compared as a method of its own
(``merge_method_of``: the name up to the first ``-``; registered names have none, and ``-``
is valid in Optuna, MLflow and Hydra names and in file names, where ``@`` is not in MLflow's). ``method: dataflow`` (or ``dataflow-...``) is a data-flow space
(``dataflow.DataflowSpace``), loaded by ``dataflow.load_any_space``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import UserError, yaml_error
from orchestrator.merge import MergeMethod, get_method
from orchestrator.study.dataflow import parse_dataflow
from orchestrator.study.genome import GENOME_KEYS, Layout, block_ranges, check_layouts, check_negative, parse_layout
from orchestrator.study.genome import with_ranges
from orchestrator.study.options import close_matches

DIST_KEYS = {"low", "high", "log", "step", "int", "choices", "gradient", *GENOME_KEYS}
DATAFLOW = "dataflow"


def merge_method_of(name: str) -> str:
    """The merge method of a study method: ``ties-layers`` -> ``ties`` (a variant's space)."""
    return str(name).partition("-")[0]


@dataclass(frozen=True)
class Distribution:
    """One searchable parameter: a float/int range or a categorical list, optionally a gradient."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    is_int: bool = False
    choices: tuple[Any, ...] | None = None
    gradient: int = 0
    layout: Layout = Layout()
    allow_negative: bool = False

    @classmethod
    def parse(cls, spec: Any, where: str) -> Distribution:
        if not isinstance(spec, Mapping):
            raise UserError(f"{where}: a distribution must be a mapping like {{low: 0, high: 1}} "
                            f"or {{choices: [...]}}, got {spec!r}")
        unknown = set(spec) - DIST_KEYS
        if unknown:
            raise UserError(f"{where}: unknown distribution key(s) {sorted(unknown)}; "
                            f"valid: {sorted(DIST_KEYS)}")
        layout, negative = parse_layout(spec, where)
        if "choices" in spec:
            choices = spec["choices"]
            if not isinstance(choices, Sequence) or isinstance(choices, str) or not choices:
                raise UserError(f"{where}: choices must be a non-empty list, got {choices!r}")
            return cls(choices=tuple(choices), gradient=int(spec.get("gradient", 0)), layout=layout)
        if "low" not in spec or "high" not in spec:
            raise UserError(f"{where}: a range needs both low and high, got {dict(spec)!r}")
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise UserError(f"{where}: low and high must be numbers, got low={low!r} high={high!r}")
        if low > high:
            raise UserError(f"{where}: low must be <= high, got low={low} high={high}")
        if spec.get("log") and low <= 0:
            raise UserError(f"{where}: a log range needs low > 0, got low={low}")
        gradient = int(spec.get("gradient", 0))
        if gradient == 1 or gradient < 0:
            raise UserError(f"{where}: gradient must be 0 (a scalar) or >= 2 control points, got {gradient}")
        return cls(low=low, high=high, log=bool(spec.get("log", False)), step=spec.get("step"),
                   is_int=bool(spec.get("int", False)), choices=None, gradient=gradient, layout=layout,
                   allow_negative=negative)

    def corners(self) -> list[Any]:
        """Extreme values, used to check a range against the params dataclass."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def grid(self, points: int) -> list[Any]:
        """Values for a grid sampler: the choices, or ``points`` evenly spaced values."""
        if self.choices is not None:
            return list(self.choices)
        if points < 2 or self.low == self.high:
            return [self.low]
        span = self.high - self.low
        values = [self.low + span * i / (points - 1) for i in range(points)]
        return sorted({int(round(v)) for v in values}) if self.is_int else values

    def suggest(self, trial: Any, name: str) -> Any:
        """Ask the trial; a gradient returns a list of control points named ``name.i``.

        A genome (layer groups, filters) returns a mergekit setting built from one value per
        name of ``param_names`` (``genome.Layout.assemble``).
        """
        if self.gradient:
            return [self._suggest_one(trial, f"{name}.{i}") for i in range(self.gradient)]
        if not self.layout.trivial:
            return self.layout.assemble([self._suggest_one(trial, n) for n in self.layout.names(name)])
        return self._suggest_one(trial, name)

    def _suggest_one(self, trial: Any, name: str) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(name, list(self.choices))
        if self.is_int:
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1),
                                     log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)

    def param_names(self, name: str) -> list[str]:
        return [f"{name}.{i}" for i in range(self.gradient)] if self.gradient else self.layout.names(name)


@dataclass(frozen=True)
class MethodSpace:
    """The searchable parameters of one merge method.

    ``method`` is the study's name for it (``ties``, or a variant ``ties-layers``) and the
    prefix of its Optuna names (``prefix`` overrides it, for a space nested in another);
    ``n_layers``: the candidates' layer count, bound before the study (``bind``), which
    discrete layer groups need.
    """

    method: str
    per_model: Mapping[str, Distribution] = field(default_factory=dict)
    global_: Mapping[str, Distribution] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    n_layers: int | None = None
    prefix: str | None = None

    @property
    def merge_method(self) -> str:
        return merge_method_of(self.method)

    @property
    def spec(self) -> MergeMethod:
        return get_method(self.merge_method)

    @property
    def name_prefix(self) -> str:
        return self.prefix or self.method

    def is_empty(self) -> bool:
        return not self.per_model and not self.global_

    def layouts(self) -> dict[str, Layout]:
        return {f"{label}.{k}": d.layout for label, dists in (("per_model", self.per_model), ("global", self.global_))
                for k, d in dists.items()}

    def bind(self, n_layers: int, where: str = "search space") -> MethodSpace:
        """This space over candidates of ``n_layers`` layers (layer groups checked against it)."""
        for name, layout in self.layouts().items():
            block_ranges(n_layers, layout.groups, f"{where}: {name}")
        return dataclasses.replace(self, n_layers=n_layers)

    def suggest(self, trial: Any, model_names: Sequence[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """Suggest values: (global parameters, {model: per-model parameters})."""
        prefix = self.name_prefix
        global_values = dict(self.fixed)
        for key, dist in self.global_.items():
            global_values[key] = self._ranged(dist, dist.suggest(trial, f"{prefix}.{key}"))
        per_model = {name: {key: self._ranged(dist, dist.suggest(trial, f"{prefix}.{name}.{key}"))
                            for key, dist in self.per_model.items()}
                     for name in model_names}
        return global_values, per_model

    def _ranged(self, dist: Distribution, value: Any) -> Any:
        if not dist.layout.discrete:
            return value
        if self.n_layers is None:
            raise UserError(f"search space of {self.method!r}: layer groups need the candidates' layer count "
                            "(MethodSpace.bind before suggesting)")
        return with_ranges(value, block_ranges(self.n_layers, dist.layout.groups))

    def param_grid(self, model_names: Sequence[str], points: int) -> dict[str, list[Any]]:
        """Every Optuna parameter name of this space with its grid values."""
        grid: dict[str, list[Any]] = {}
        prefix = self.name_prefix
        for key, dist in self.global_.items():
            for pname in dist.param_names(f"{prefix}.{key}"):
                grid[pname] = dist.grid(points)
        for name, (key, dist) in itertools.product(model_names, self.per_model.items()):
            for pname in dist.param_names(f"{prefix}.{name}.{key}"):
                grid[pname] = dist.grid(points)
        return grid


def parse_space(data: Mapping[str, Any], where: str, method: str | None = None) -> Any:
    """Build and validate a ``MethodSpace`` (a ``DataflowSpace`` for dataflow) from a mapping."""
    if not isinstance(data, Mapping):
        raise UserError(f"{where}: a search space must be a mapping, got {type(data).__name__}")
    name = data.get("method", method)
    if method is not None and name != method:
        raise UserError(f"{where}: declares method {name!r} but is used for method {method!r}")
    if merge_method_of(str(name)) == DATAFLOW:
        return parse_dataflow(data, where, str(name), parse_space)
    unknown = set(data) - {"method", "per_model", "global", "fixed"}
    if unknown:
        raise UserError(f"{where}: unknown section(s) {sorted(unknown)}; valid: method, per_model, global, fixed")
    try:
        spec = get_method(merge_method_of(str(name)))
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    per_model = _parse_section(data.get("per_model") or {}, spec.model_keys(), "per_model", spec, where)
    global_ = _parse_section(data.get("global") or {}, spec.global_keys(), "global", spec, where)
    fixed = dict(data.get("fixed") or {})
    valid_fixed = set(spec.model_keys()) | set(spec.global_keys())
    for key in fixed:
        if key not in valid_fixed:
            raise UserError(f"{where}: fixed parameter {key!r} is not a parameter of method "
                            f"{spec.name!r}{close_matches(key, sorted(valid_fixed))}; valid: {sorted(valid_fixed)}")
    space = MethodSpace(method=str(name), per_model=per_model, global_=global_, fixed=fixed)
    check_layouts(space.layouts(), where)
    _check_against_dataclasses(space, spec, where)
    return space


def _parse_section(section: Any, valid: Sequence[str], label: str, spec: MergeMethod,
                   where: str) -> dict[str, Distribution]:
    if not isinstance(section, Mapping):
        raise UserError(f"{where}: {label} must be a mapping of parameter -> distribution")
    out = {}
    for key, dist in section.items():
        if key not in valid:
            raise UserError(f"{where}: {key!r} is not a {label.replace('_', '-')} parameter of method "
                            f"{spec.name!r}{close_matches(key, valid)}; valid: {list(valid) or 'none'}")
        out[key] = Distribution.parse(dist, f"{where}: {label}.{key}")
        check_negative(key, out[key].low, out[key].allow_negative, f"{where}: {label}.{key}")
    return out


def _check_against_dataclasses(space: MethodSpace, spec: MergeMethod, where: str) -> None:
    """Every corner of every range must build the method's params dataclasses."""
    fixed_model = {k: v for k, v in space.fixed.items() if k in spec.model_keys()}
    fixed_global = {k: v for k, v in space.fixed.items() if k in spec.global_keys()}
    missing = [k for k in spec.required_model_keys() if k not in space.per_model and k not in fixed_model]
    missing += [k for k in spec.required_global_keys() if k not in space.global_ and k not in fixed_global]
    if missing:
        raise UserError(f"{where}: method {spec.name!r} needs {missing}: add them to the space or to fixed")
    for label, dists, fixed, make in (("per_model", space.per_model, fixed_model, spec.make_model_params),
                                      ("global", space.global_, fixed_global, spec.make_params)):
        for key, dist in dists.items():
            for value in dist.corners():
                try:
                    make({**_defaults_from(dists), **fixed, key: value})
                except (ValueError, TypeError) as err:
                    raise UserError(f"{where}: {label}.{key} range {dist.corners()} is invalid for "
                                    f"method {spec.name!r}: {err}") from None


def _defaults_from(dists: Mapping[str, Distribution]) -> dict[str, Any]:
    """A valid-looking value for every distribution (its low end or first choice)."""
    return {k: d.corners()[0] for k, d in dists.items()}


def load_space(path: str | Path, method: str | None = None) -> Any:
    """Read and validate a search-space YAML file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"search space file not found: {path}")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise yaml_error(str(path), err, text) from None
    return parse_space(data or {}, str(path), method)


def check_model_count(space: Any, n_models: int) -> None:
    """Refuse a method that cannot merge this many candidate models (data flow: its PS merge)."""
    if not isinstance(space, MethodSpace):
        if space.ps is not None:
            check_model_count(space.ps, n_models)
        return
    spec = space.spec
    slots = n_models - 1 if uses_first_as_base(spec, n_models) else n_models
    if slots < spec.min_models or (spec.max_models is not None and slots > spec.max_models):
        limit = f"{spec.min_models}" + (f"..{spec.max_models}" if spec.max_models != spec.min_models else "")
        raise UserError(f"method {spec.name!r} merges {limit} model(s) besides its base, "
                        f"but the candidates have {n_models}")


def uses_first_as_base(spec: MergeMethod, n_models: int) -> bool:
    """SLERP-like methods interpolate between two candidates: the first plays the base."""
    return spec.needs_base and spec.max_models == 1 and n_models == 2


def space_as_dict(space: Any) -> dict[str, Any]:
    """Plain-data view of a space, for logging and the study's fingerprint (every key that
    changes what is searched; a data-flow space gives its own, ``as_dict``)."""
    if not isinstance(space, MethodSpace):
        return space.as_dict(space_as_dict)
    out = {"method": space.method, "per_model": {k: dist_as_dict(v) for k, v in space.per_model.items()},
           "global": {k: dist_as_dict(v) for k, v in space.global_.items()}, "fixed": dict(space.fixed)}
    if space.n_layers is not None and any(d.layout.discrete for d in (*space.per_model.values(),
                                                                     *space.global_.values())):
        out["n_layers"] = space.n_layers
    return out


def dist_as_dict(d: Distribution) -> dict[str, Any]:
    """One distribution as plain data; flags at their defaults are left out."""
    data = {k: v for k, v in dataclasses.asdict(d).items() if v is not None and k != "layout"}
    if d.choices is not None:  # a categorical: no bounds
        data.pop("low", None), data.pop("high", None)
    for key in ("log", "is_int", "gradient", "allow_negative"):  # flags at their defaults say nothing
        if not data.get(key):
            data.pop(key, None)
    if d.layout.groups > 1:
        data["layer_groups"] = d.layout.groups
    if d.layout.filters:
        data["filters"] = list(d.layout.filters)
    if d.layout.smooth:
        data["smooth"] = True
    return data
