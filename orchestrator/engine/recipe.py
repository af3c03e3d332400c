"""Recipe: the description of one merge, in mergekit's YAML schema.

A recipe is a tree of frozen dataclasses parsed from (and dumped back to) a mergekit config:
``models`` or ``slices``, ``base_model``, ``merge_method``, ``parameters`` (scalars, per-layer
gradients, ``{filter, value}`` rules), ``dtype``, ``out_dtype`` and ``tokenizer_source``.

Parsing checks structure only; ``plan.check_recipe`` validates a recipe against
its method without any file, and ``plan.build_plan`` against the models' headers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import UserError, yaml_error

Scalar = bool | int | float | str
Value = Scalar | tuple  # a scalar or a gradient (tuple of scalars)

TOP_LEVEL_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype",
                  "out_dtype", "tokenizer_source")
UNSUPPORTED_KEYS = {"modules": "multi-module configs", "tokenizer": "the 'tokenizer:' block "
                    "(use tokenizer_source)", "chat_template": "chat_template"}
# mergekit keys that change nothing in exact float32 math: accepted and ignored.
NO_OP_KEYS = ("int8_mask",)
DTYPES = ("float32", "float16", "bfloat16")


class FrozenMap(Mapping):
    """An immutable, hashable mapping (parameters inside frozen dataclasses)."""

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping | None = None):
        self._data = dict(data or {})
        self._hash = None

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)

    def __hash__(self):
        if self._hash is None:
            self._hash = hash(tuple(sorted(self._data.items(), key=lambda kv: kv[0])))
        return self._hash

    def __eq__(self, other):
        return isinstance(other, Mapping) and dict(self._data) == dict(other)

    def __repr__(self):
        return f"FrozenMap({self._data!r})"


EMPTY = FrozenMap()


@dataclass(frozen=True)
class Conditional:
    """One ``{filter, value}`` rule: ``value`` applies to tensor names containing ``filter``."""

    value: Value
    filter: str | None = None


Setting = Value | tuple  # scalar, gradient, or tuple of Conditional rules


@dataclass(frozen=True)
class ModelEntry:
    """An entry of ``models:``."""

    model: str
    parameters: FrozenMap = EMPTY


@dataclass(frozen=True)
class SliceSource:
    """A source of a slice: layers ``[start, end)`` of one model."""

    model: str
    layer_range: tuple[int, int]
    parameters: FrozenMap = EMPTY


@dataclass(frozen=True)
class Slice:
    """An output slice: the same number of layers from each source, merged."""

    sources: tuple[SliceSource, ...]
    parameters: FrozenMap = EMPTY
    base_model: str | None = None


@dataclass(frozen=True)
class Recipe:
    """One merge, as in a mergekit YAML config (exactly one of ``models``/``slices``).

    ``source_dir`` is the recipe file's folder, used to resolve relative model paths; it is
    not part of the YAML and not compared.
    """

    merge_method: str
    models: tuple[ModelEntry, ...] = ()
    slices: tuple[Slice, ...] = ()
    base_model: str | None = None
    parameters: FrozenMap = EMPTY
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    source_dir: Path | None = field(default=None, compare=False, repr=False)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source_dir: str | Path | None = None) -> Recipe:
        """Parse a mergekit config dict; UserError on any structural mistake."""
        if not isinstance(data, Mapping):
            raise UserError(f"a recipe must be a mapping of keys, got {type(data).__name__}")
        for key in data:
            if key in UNSUPPORTED_KEYS:
                raise UserError(f"recipe key '{key}' ({UNSUPPORTED_KEYS[key]}) is not supported")
            if key not in TOP_LEVEL_KEYS:
                raise UserError(f"unknown recipe key '{key}'; valid: {', '.join(TOP_LEVEL_KEYS)}")
        if not isinstance(data.get("merge_method"), str):
            raise UserError("recipe needs merge_method (a method name such as ties)")
        models = _parse_list(data.get("models"), "models", _parse_model)
        slices = _parse_list(data.get("slices"), "slices", _parse_slice)
        if bool(models) == bool(slices):
            raise UserError("recipe needs exactly one of 'models' or 'slices' (non-empty)")
        recipe = cls(merge_method=data["merge_method"], models=models, slices=slices,
                     base_model=_opt_model(data.get("base_model"), "base_model"),
                     parameters=parse_parameters(data.get("parameters"), "parameters"),
                     dtype=_opt_str(data.get("dtype"), "dtype"),
                     out_dtype=_opt_str(data.get("out_dtype"), "out_dtype"),
                     tokenizer_source=_opt_model(data.get("tokenizer_source"), "tokenizer_source"),
                     source_dir=Path(source_dir) if source_dir is not None else None)
        for key in ("dtype", "out_dtype"):
            if getattr(recipe, key) is not None and getattr(recipe, key) not in DTYPES:
                raise UserError(f"{key} must be one of {', '.join(DTYPES)}, "
                                f"got {getattr(recipe, key)!r}")
        return recipe

    @classmethod
    def from_yaml(cls, text: str, source_dir: str | Path | None = None, where: str = "recipe") -> Recipe:
        """Parse YAML text (one document); ``where`` names it in errors (the file)."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise yaml_error(where, err, text) from None
        return cls.from_dict(data if data is not None else {}, source_dir)

    # -- dumping ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The mergekit config as plain dicts and lists (defaults left out)."""
        out: dict[str, Any] = {}
        if self.models:
            out["models"] = [_entry_dict(m.model, m.parameters) for m in self.models]
        if self.slices:
            out["slices"] = [_slice_dict(s) for s in self.slices]
        out["merge_method"] = self.merge_method
        for key in ("base_model", "tokenizer_source"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.parameters:
            out["parameters"] = dump_parameters(self.parameters)
        for key in ("dtype", "out_dtype"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def to_yaml(self) -> str:
        """mergekit-compatible YAML; ``Recipe.from_yaml(r.to_yaml()) == r``."""
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False)

    # -- queries and edits -----------------------------------------------------------------
    def referenced_models(self) -> list[str]:
        """Model references in a stable order: base first, then as listed."""
        refs = [self.base_model] if self.base_model else []
        refs += [m.model for m in self.models]
        for sl in self.slices:
            refs += ([sl.base_model] if sl.base_model else []) + [s.model for s in sl.sources]
        if self.tokenizer_source and self.tokenizer_source not in ("base", "union"):
            refs.append(self.tokenizer_source)
        return list(dict.fromkeys(refs))

    def with_parameters(self, parameters: Mapping[str, Any] | None = None,
                        models: Mapping[str, Mapping[str, Any]] | None = None, *,
                        merge_method: str | None = None, replace: bool = False) -> Recipe:
        """A copy with parameters set (for the sweep: one template, one recipe per trial).

        Args:
            parameters: top-level parameters to set (merged over the existing ones).
            models: per-model parameters, by model reference; set on the ``models:`` entry or
                on every slice source of that model.
            merge_method: a new method name.
            replace: replace the existing parameter mappings instead of merging into them.
        """
        def merged(old: FrozenMap, new: Mapping | None, where: str) -> FrozenMap:
            if new is None:
                return old
            parsed = parse_parameters(dict(new), where)
            return parsed if replace else FrozenMap({**old, **parsed})

        models = dict(models or {})
        unknown = set(models) - set(self.referenced_models())
        if unknown:
            raise UserError(f"with_parameters: unknown model(s) {', '.join(sorted(unknown))}")
        new_models = tuple(dataclasses.replace(m, parameters=merged(
            m.parameters, models.get(m.model), f"models[{m.model}]")) for m in self.models)
        new_slices = tuple(dataclasses.replace(sl, sources=tuple(dataclasses.replace(
            s, parameters=merged(s.parameters, models.get(s.model), f"sources[{s.model}]"))
            for s in sl.sources)) for sl in self.slices)
        return dataclasses.replace(
            self, models=new_models, slices=new_slices,
            parameters=merged(self.parameters, parameters, "parameters"),
            merge_method=merge_method or self.merge_method)


# -- parsing helpers --------------------------------------------------------------------------
def _parse_list(raw, where: str, parse) -> tuple:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise UserError(f"{where} must be a list, got {type(raw).__name__}")
    return tuple(parse(item, f"{where}[{i}]") for i, item in enumerate(raw))


def _check_keys(raw, where: str, allowed: tuple[str, ...]) -> None:
    if not isinstance(raw, Mapping):
        raise UserError(f"{where} must be a mapping, got {raw!r}")
    extra = [k for k in raw if k not in allowed]
    if extra:
        raise UserError(f"{where}: unknown key '{extra[0]}'; valid: {', '.join(allowed)}")


def _opt_str(raw, where: str) -> str | None:
    if raw is not None and not isinstance(raw, str):
        raise UserError(f"{where} must be a string, got {raw!r}")
    return raw


def _opt_model(raw, where: str) -> str | None:
    if isinstance(raw, Mapping) and set(raw) == {"model"}:
        raw = raw["model"]  # mergekit's {model: path} form
    if raw is not None and not isinstance(raw, str):
        raise UserError(f"{where} must be a model path or Hub id, got {raw!r}")
    if isinstance(raw, str) and "+" in raw:
        model, _, adapter = raw.partition("+")
        if not model.strip() or not adapter.strip():
            raise UserError(f"{where} '{raw}': a 'model+adapter' reference needs both a model and "
                            "a LoRA adapter folder around the '+'")
        return f"{model.strip()}+{adapter.strip()}"
    return raw.strip() if isinstance(raw, str) else None


def _parse_model(raw, where: str) -> ModelEntry:
    if isinstance(raw, str):
        return ModelEntry(_opt_model(raw, where))
    _check_keys(raw, where, ("model", "parameters"))
    model = _opt_model(raw.get("model"), f"{where}.model")
    if model is None:
        raise UserError(f"{where} needs a model")
    return ModelEntry(model, parse_parameters(raw.get("parameters"), f"{where}.parameters"))


def _parse_source(raw, where: str) -> SliceSource:
    _check_keys(raw, where, ("model", "layer_range", "parameters"))
    model = _opt_model(raw.get("model"), f"{where}.model")
    rng = raw.get("layer_range")
    if model is None:
        raise UserError(f"{where} needs a model")
    if (not isinstance(rng, (list, tuple)) or len(rng) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in rng)):
        raise UserError(f"{where}.layer_range must be [start, end] integers, got {rng!r}")
    if not 0 <= rng[0] < rng[1]:
        raise UserError(f"{where}.layer_range {list(rng)} must satisfy 0 <= start < end")
    return SliceSource(model, (rng[0], rng[1]),
                       parse_parameters(raw.get("parameters"), f"{where}.parameters"))


def _parse_slice(raw, where: str) -> Slice:
    _check_keys(raw, where, ("sources", "parameters", "base_model", "residual_weight"))
    sources = _parse_list(raw.get("sources"), f"{where}.sources", _parse_source)
    if not sources:
        raise UserError(f"{where} needs sources")
    lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
    if len(lengths) > 1:
        ranges = ", ".join(f"{s.model} {list(s.layer_range)}" for s in sources)
        raise UserError(f"{where}: all sources must span the same number of layers, got {ranges}")
    return Slice(sources, parse_parameters(raw.get("parameters"), f"{where}.parameters"),
                 _opt_model(raw.get("base_model"), f"{where}.base_model"))


def _scalar(raw, where: str) -> Scalar:
    if isinstance(raw, (bool, int, float, str)):
        return raw
    raise UserError(f"{where}: expected a number, bool or string, got {raw!r}")


def _value(raw, where: str) -> Value:
    if isinstance(raw, list):
        if not raw:
            raise UserError(f"{where}: a gradient needs at least one value")
        return tuple(_scalar(v, where) for v in raw)
    return _scalar(raw, where)


def parse_setting(raw, where: str) -> Setting:
    """A scalar, a gradient (list of values) or ``{filter, value}`` rules."""
    if isinstance(raw, Mapping) or (isinstance(raw, list) and raw
                                    and all(isinstance(r, Mapping) for r in raw)):
        rules = []
        for i, rule in enumerate(raw if isinstance(raw, list) else [raw]):
            _check_keys(rule, f"{where}[{i}]", ("filter", "value"))
            if "value" not in rule:
                raise UserError(f"{where}[{i}] needs a value")
            rules.append(Conditional(_value(rule["value"], f"{where}[{i}].value"),
                                     _opt_str(rule.get("filter"), f"{where}[{i}].filter")))
        return tuple(rules)
    return _value(raw, where)


def parse_parameters(raw, where: str) -> FrozenMap:
    """Parse a ``parameters:`` mapping into a FrozenMap of settings."""
    if raw is None:
        return EMPTY
    if not isinstance(raw, Mapping):
        raise UserError(f"{where} must be a mapping, got {raw!r}")
    return FrozenMap({str(k): parse_setting(v, f"{where}.{k}") for k, v in raw.items()})


def _dump_value(value: Value):
    return list(value) if isinstance(value, tuple) else value


def dump_setting(setting: Setting):
    """Inverse of ``parse_setting``."""
    if isinstance(setting, tuple) and setting and isinstance(setting[0], Conditional):
        return [({"filter": r.filter} if r.filter is not None else {})
                | {"value": _dump_value(r.value)} for r in setting]
    return _dump_value(setting)


def dump_parameters(params: Mapping[str, Setting]) -> dict[str, Any]:
    """Inverse of ``parse_parameters``."""
    return {k: dump_setting(v) for k, v in params.items()}


def _entry_dict(model: str, params: FrozenMap, **extra) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model, **extra}
    if params:
        out["parameters"] = dump_parameters(params)
    return out


def _slice_dict(sl: Slice) -> dict[str, Any]:
    out: dict[str, Any] = {"sources": [_entry_dict(s.model, s.parameters,
                                                   layer_range=list(s.layer_range))
                                       for s in sl.sources]}
    if sl.base_model:
        out["base_model"] = sl.base_model
    if sl.parameters:
        out["parameters"] = dump_parameters(sl.parameters)
    return out


class _Dumper(yaml.SafeDumper):
    """Gradients in flow style (``[0, 0.5, 1]``), as mergekit writes them."""


def _represent_list(dumper, data):
    flow = all(isinstance(v, (int, float, bool, str)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file; relative model paths resolve against its folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot read recipe {path}: {err.strerror or err}") from None
    return Recipe.from_yaml(text, source_dir=path.absolute().parent, where=str(path))


# -- evaluation of settings -----------------------------------------------------------------
MISSING = object()


def evaluate_value(value: Value, t: float):
    """A scalar as is; a gradient interpolated piecewise-linearly at ``t`` in [0, 1]."""
    if not isinstance(value, tuple):
        return value
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not numeric:  # bools and strings select, they do not interpolate
        return value[int(t * (len(value) - 1))]
    scaled = t * (len(value) - 1)
    i0 = int(scaled)
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * value[i0] + frac * value[i1]


def evaluate_setting(setting: Setting, tensor_name: str, t: float):
    """Value of a setting for one tensor at layer position ``t``; MISSING if no rule matches.

    Rules are tried in order and the first whose filter is a substring of the tensor name
    (or is absent or ``*``) wins; MISSING lets a lower-precedence scope decide.
    """
    if isinstance(setting, tuple) and setting and isinstance(setting[0], Conditional):
        for rule in setting:
            if rule.filter in (None, "*") or rule.filter in tensor_name:
                return evaluate_value(rule.value, t)
        return MISSING
    return evaluate_value(setting, t)


def resolve(key: str, scopes: tuple[Mapping[str, Setting], ...], tensor_name: str, t: float):
    """First value of ``key`` over scopes, highest precedence first; MISSING if none."""
    for scope in scopes:
        if key in scope:
            value = evaluate_setting(scope[key], tensor_name, t)
            if value is not MISSING:
                return value
    return MISSING


def leaves(setting: Setting) -> Iterator[Scalar]:
    """Every scalar written in a setting (rule values and gradient points)."""
    values = [r.value for r in setting] if (isinstance(setting, tuple) and setting and
                                            isinstance(setting[0], Conditional)) else [setting]
    for value in values:
        yield from (value if isinstance(value, tuple) else (value,))
