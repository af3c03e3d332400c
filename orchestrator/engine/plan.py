"""Plan: which source tensors, which method and which parameters make each output tensor.

``validate.check_recipe`` validates a recipe against its method without touching any file;
``build_plan`` then reads only headers and configs (names, shapes, dtypes, layer counts,
vocabularies) and resolves the parameters of every output tensor, so every mistake surfaces
before the first tensor is read. The plan is pure data: the engine streams it to disk, the
in-memory merger writes it into a resident model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.engine.recipe import MISSING, Recipe, resolve
from orchestrator.engine.validate import (
    NormSlice,
    Source,
    build_model_params,
    build_params,
    check_recipe,
    normalize,
)
from orchestrator.engine.weights import DTYPE_NAMES, ModelWeights, dtype_name, read_vocab
from orchestrator.errors import UserError

LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|block|layer))\.(?P<index>\d+)\."
                      r"(?P<suffix>.+)$")
PRE_RE = re.compile(r"embed|wte|wpe|tok_embeddings|word_embeddings")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


# -- model layout --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """How one model's tensor names split into layers and the rest."""

    prefix: str | None
    layers: Mapping[int, Mapping[str, str]]  # layer index -> suffix -> tensor name
    pre: tuple[str, ...]    # embeddings (taken from the first slice)
    post: tuple[str, ...]   # final norm, lm_head... (taken from the last slice)
    num_layers: int


def model_layout(weights: ModelWeights, key: str) -> Layout:
    """Split tensor names by layer (``model.layers.<i>.<suffix>``)."""
    layers: dict[int, dict[str, str]] = {}
    others: list[str] = []
    prefixes = set()
    config_layers = next((weights.config[k] for k in LAYER_KEYS
                          if isinstance(weights.config.get(k), int)), None)
    for name in weights.names():
        m = LAYER_RE.match(name)
        index = int(m["index"]) if m else -1
        if m and (config_layers is None or index < config_layers):
            prefixes.add(m["prefix"])
            layers.setdefault(index, {})[m["suffix"]] = name
        else:
            others.append(name)
    if len(prefixes) > 1:
        raise UserError(f"model '{key}' has several layer stacks ({', '.join(sorted(prefixes))}); "
                        "only single-stack models are supported")
    num_layers = config_layers if config_layers is not None else len(layers)
    return Layout(next(iter(prefixes), None), layers,
                  tuple(n for n in others if PRE_RE.search(n)),
                  tuple(n for n in others if not PRE_RE.search(n)), num_layers)


# -- the plan -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorRef:
    """One tensor of one model (``vocab``: rows re-ordered to that tokenizer donor's vocab)."""

    model: str
    name: str
    vocab: str | None = None


@dataclass(frozen=True, eq=False)
class VocabAlign:
    """Row maps that put every model's embedding rows in the output tokenizer's order.

    ``index[model][row]`` is the model's row for the output token at ``row``, or -1 where the
    model lacks the token; such rows take the base's row when the base has the token, else the
    mean of the models that have it, else the mean row of the tokenizer donor.
    """

    rows: int
    index: Mapping[str, torch.Tensor]
    base: str | None
    donor: str


@dataclass(frozen=True)
class TensorTask:
    """How to make one output tensor."""

    name: str
    inputs: tuple[TensorRef, ...]   # ``xs`` of the method, in recipe order
    base: TensorRef | None
    params: Any
    model_params: tuple[Any, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype              # output dtype
    merge: bool = True              # False: copy the first input (non-float tensors)
    align: VocabAlign | None = None  # embedding/lm_head rows to re-order (tokenizer_source)


@dataclass(frozen=True)
class MergePlan:
    """Every output tensor's task, plus what the output folder needs besides tensors."""

    recipe: Recipe
    method: Any
    tasks: tuple[TensorTask, ...]
    config_donor: str
    tokenizer_donor: str
    config_updates: Mapping[str, Any]

    def layout(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """``(name, shape, dtype)`` of every output tensor, for the writer."""
        return [(t.name, t.shape, t.dtype) for t in self.tasks]

    def models(self) -> list[str]:
        """Model keys whose tensors the plan reads."""
        refs = {r.model for t in self.tasks for r in (*t.inputs, *([t.base] if t.base else []))}
        return sorted(refs)


class _Planner:
    """Builds a MergePlan; caches params objects by value across tensors."""

    def __init__(self, recipe: Recipe, weights: Mapping[str, ModelWeights]):
        self.recipe = recipe
        self.weights = weights
        self.method = check_recipe(recipe)
        self.slices = normalize(recipe, self.method)
        self.layouts = {k: model_layout(weights[k], k) for k in recipe.referenced_models()}
        self._cache: dict[Any, Any] = {}
        self.out_dtype = (DTYPE_NAMES[recipe.out_dtype or recipe.dtype]
                          if (recipe.out_dtype or recipe.dtype) else None)
        self.align: VocabAlign | None = None
        # dataclasses.fields is slow enough to matter when resolving every tensor of a sweep.
        self.keys = {"global": self.method.global_keys(), "model": self.method.model_keys(),
                     "required_global": self.method.required_global_keys(),
                     "required_model": self.method.required_model_keys()}

    def plan(self) -> MergePlan:
        """Check the models against each other, then make one task per output tensor."""
        self._check_models()
        if self.recipe.tokenizer_source:
            self.align = self._vocab_alignment()
        first, last = self.slices[0], self.slices[-1]
        tasks: list[TensorTask] = []
        for name in self.layouts[self._lead(first)].pre:
            tasks.append(self._task(first, name, {s.model: name for s in first.sources}, 0.0))
        offset = 0
        for sl in self.slices:
            tasks += self._slice_tasks(sl, offset)
            offset += self._span(sl)
        for name in self.layouts[self._lead(last)].post:
            tasks.append(self._task(last, name, {s.model: name for s in last.sources}, 0.0))
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise UserError("the recipe produces the same output tensor twice")
        return MergePlan(self.recipe, self.method, tuple(tasks), self._config_donor(),
                         self._tokenizer_donor(), self._config_updates(offset))

    # -- checks ---------------------------------------------------------------------------
    def _check_models(self) -> None:
        keys = self.recipe.referenced_models()
        archs = {k: tuple(self.weights[k].config.get("architectures") or ()) for k in keys}
        ref = keys[0]
        for k in keys[1:]:
            if archs[k] != archs[ref]:
                raise UserError(f"architecture mismatch: '{ref}' is {'/'.join(archs[ref]) or '?'}"
                                f", '{k}' is {'/'.join(archs[k]) or '?'}")
        vocab = {k: self.weights[k].config.get("vocab_size") for k in keys}
        for k in keys[1:]:
            if vocab[k] != vocab[ref] and not self.recipe.tokenizer_source:
                raise UserError(f"vocab size mismatch: '{ref}' has {vocab[ref]} tokens, '{k}' has "
                                f"{vocab[k]}; set tokenizer_source (base or a model) to merge "
                                "models with different vocabularies")
        others = {k: set(self.layouts[k].pre + self.layouts[k].post) for k in keys}
        for k in keys[1:]:
            extra = sorted(others[k] ^ others[ref])
            if extra:
                has, lacks = (k, ref) if extra[0] in others[k] else (ref, k)
                raise UserError(f"architecture mismatch: '{has}' has tensor {extra[0]} but "
                                f"'{lacks}' does not")
        for sl in self.slices:
            for src in sl.sources:
                n = self.layouts[src.model].num_layers
                if src.layer_range is not None and src.layer_range[1] > n:
                    raise UserError(f"{sl.where}: layer_range {list(src.layer_range)} for model "
                                    f"'{src.model}' is out of bounds: it has {n} layers")

    # -- tasks ----------------------------------------------------------------------------
    def _lead(self, sl: NormSlice) -> str:
        return sl.base or sl.sources[0].model

    def _range(self, src: Source) -> tuple[int, int]:
        return src.layer_range or (0, self.layouts[src.model].num_layers)

    def _span(self, sl: NormSlice) -> int:
        lo, hi = self._range(sl.sources[0])
        spans = {self._range(s)[1] - self._range(s)[0] for s in sl.sources}
        if len(spans) > 1:
            counts = ", ".join(f"{s.model}: {self.layouts[s.model].num_layers}" for s in sl.sources)
            raise UserError(f"{sl.where}: models have different layer counts ({counts})")
        return hi - lo

    def _slice_tasks(self, sl: NormSlice, offset: int) -> list[TensorTask]:
        tasks = []
        span = self._span(sl)
        lead = sl.sources[0]
        lead_layout = self.layouts[lead.model]
        for i in range(span):
            t = i / (span - 1) if span > 1 else 1.0  # gradient position restarts per slice
            lead_layer = lead_layout.layers.get(self._range(lead)[0] + i, {})
            for suffix in lead_layer:
                names = {}
                for src in sl.sources:
                    layer = self.layouts[src.model].layers.get(self._range(src)[0] + i, {})
                    if suffix not in layer:
                        raise UserError(f"architecture mismatch: model '{src.model}' has no "
                                        f"tensor {lead_layer[suffix]} (layer "
                                        f"{self._range(src)[0] + i}, .{suffix})")
                    names[src.model] = layer[suffix]
                    extra = sorted(set(layer) - set(lead_layer))
                    if extra:
                        raise UserError(f"architecture mismatch: model '{src.model}' has tensor "
                                        f"{layer[extra[0]]} that '{lead.model}' lacks")
                out = f"{lead_layout.prefix}.{offset + i}.{suffix}"
                tasks.append(self._task(sl, out, names, t))
        return tasks

    def _task(self, sl: NormSlice, out: str, names: Mapping[str, str], t: float) -> TensorTask:
        infos = {}
        for src in sl.sources:
            if names[src.model] not in self.weights[src.model]:
                raise UserError(f"architecture mismatch: model '{src.model}' has no tensor "
                                f"{names[src.model]}")
            infos[src.model] = self.weights[src.model].info(names[src.model])
        lead = self._lead(sl)
        align = self.align if self._is_vocab(infos) else None
        skip = 1 if align else 0  # vocab rows may differ; alignment makes them agree
        for model, info in infos.items():
            if info.shape[skip:] != infos[lead].shape[skip:]:
                raise UserError(f"shape mismatch for tensor {info.name}: {list(infos[lead].shape)}"
                                f" in '{lead}' but {list(info.shape)} in '{model}'")
        shape = (align.rows, *infos[lead].shape[1:]) if align else infos[lead].shape
        floating = all(i.dtype.is_floating_point for i in infos.values())
        dtype = self.out_dtype if (self.out_dtype and floating) else infos[lead].dtype
        vocab = align.donor if align else None
        inputs = tuple(TensorRef(s.model, names[s.model], vocab) for s in sl.inputs)
        base = TensorRef(sl.base, names[sl.base], vocab) if sl.base else None
        if not floating:  # integer buffers are copied from the base (or first model)
            return TensorTask(out, (TensorRef(lead, names[lead]),), None, None, (),
                              infos[lead].shape, dtype, merge=False)
        params = self._global_params(sl, out, t)
        model_params = tuple(self._model_params(sl, s, names[s.model], t) for s in sl.inputs)
        return TensorTask(out, inputs, base, params, model_params, shape, dtype, align=align)

    def _is_vocab(self, infos) -> bool:
        """Embedding-like: one row per token in every model (so rows follow the tokenizer)."""
        return self.align is not None and all(
            info.shape and info.shape[0] == self.weights[m].config.get("vocab_size")
            for m, info in infos.items())

    def _vocab_alignment(self) -> VocabAlign | None:
        """Row maps from each model's vocabulary to the tokenizer donor's (None: identical)."""
        donor = self._tokenizer_donor()
        keys = self.recipe.referenced_models()
        vocabs = {k: read_vocab(self.weights[k].folder) for k in keys}
        sizes = {k: self.weights[k].config.get("vocab_size") or len(vocabs[k]) for k in keys}
        rows = max(sizes[donor], max(vocabs[donor].values(), default=-1) + 1)
        tokens: list[str | None] = [None] * rows
        for token, i in vocabs[donor].items():
            tokens[i] = token
        index = {}
        for k in keys:
            ids = [vocabs[k].get(tok, -1) if tok is not None else r for r, tok in enumerate(tokens)]
            index[k] = torch.tensor([i if 0 <= i < sizes[k] else -1 for i in ids], dtype=torch.long)
        identity = torch.arange(rows)
        if all(sizes[k] == rows and torch.equal(index[k], identity) for k in keys):
            return None
        return VocabAlign(rows, index, self.recipe.base_model, donor)

    def _global_params(self, sl: NormSlice, tensor: str, t: float):
        scopes = (sl.parameters, self.recipe.parameters)
        values = self._resolve_all(self.keys["global"], scopes, tensor, t)
        for key in self.keys["required_global"]:
            if key not in values:
                raise UserError(f"method '{self.method.name}' has no value of '{key}' for tensor "
                                f"{tensor} (no filter matched)")
        return self._cached("g", values, lambda: build_params(
            self.method, values, f" in method '{self.method.name}' (tensor {tensor})"))

    def _model_params(self, sl: NormSlice, src: Source, tensor: str, t: float):
        scopes = (src.parameters, sl.parameters, self.recipe.parameters)
        values = self._resolve_all(self.keys["model"], scopes, tensor, t)
        where = f" for model '{src.model}' in method '{self.method.name}'"
        for key in self.keys["required_model"]:
            if key not in values:
                raise UserError(f"missing parameter '{key}'{where} (tensor {tensor}: no filter "
                                "matched)")
        return self._cached("m", values, lambda: build_model_params(
            self.method, values, f"{where} (tensor {tensor})"))

    @staticmethod
    def _resolve_all(keys, scopes, tensor: str, t: float) -> dict[str, Any]:
        values = {}
        for key in keys:
            value = resolve(key, scopes, tensor, t)
            if value is not MISSING:
                values[key] = value
        return values

    def _cached(self, kind: str, values: Mapping[str, Any], make):
        # type() keeps 1 and 1.0 (equal, same hash) from sharing an object with True.
        key = (kind, tuple(sorted((k, type(v).__name__, v) for k, v in values.items())))
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # -- output folder ----------------------------------------------------------------------
    def _config_donor(self) -> str:
        return self.recipe.base_model or self.recipe.referenced_models()[0]

    def _tokenizer_donor(self) -> str:
        src = self.recipe.tokenizer_source
        if src == "union":
            raise UserError("tokenizer_source: union is not supported; use base or a model")
        if src == "base" and not self.recipe.base_model:
            raise UserError("tokenizer_source: base needs a base_model")
        if src and src != "base":
            return src
        return self._config_donor()

    def _config_updates(self, total_layers: int) -> dict[str, Any]:
        donor = self.weights[self._config_donor()].config
        updates: dict[str, Any] = {}
        if self.align is not None:
            updates["vocab_size"] = self.align.rows
        if self.out_dtype is not None:
            updates["dtype"] = dtype_name(self.out_dtype)
            if "torch_dtype" in donor:
                updates["torch_dtype"] = dtype_name(self.out_dtype)
        if self.recipe.slices:
            key = next((k for k in LAYER_KEYS if isinstance(donor.get(k), int)), LAYER_KEYS[0])
            updates[key] = total_layers
            types = self._sliced_layer_types()
            if types is not None:
                updates["layer_types"] = types
        return updates

    def _sliced_layer_types(self) -> list | None:
        """Per-layer config lists (``layer_types``) follow their layers into the output."""
        out = []
        for sl in self.slices:
            src = sl.sources[0]
            types = self.weights[src.model].config.get("layer_types")
            if not isinstance(types, list) or len(types) != self.layouts[src.model].num_layers:
                return None
            lo, hi = self._range(src)
            out += types[lo:hi]
        return out


def build_plan(recipe: Recipe, weights: Mapping[str, ModelWeights]) -> MergePlan:
    """Validate ``recipe`` against the models' headers and resolve every output tensor.

    Args:
        recipe: the merge.
        weights: an open ``ModelWeights`` for every reference in ``recipe.referenced_models()``.
    """
    missing = [k for k in recipe.referenced_models() if k not in weights]
    if missing:
        raise UserError(f"model(s) not loaded: {', '.join(missing)}")
    return _Planner(recipe, weights).plan()
