"""A layer path run in memory: one model whose layer list references the sources' own modules.

``LayerBank`` builds each source model once, with parameters that are the tensors it is given
(the in-memory merger's cached inputs: no copy when the dtypes agree). ``PathModel`` is one
model object (lm-eval's HFLM wraps it once) re-wired per trial from a ``passthrough`` plan:
its embeddings, final norm, lm_head and layer list become the sources' modules, so a path of
any depth costs no weight copy. Per position, only the modules that must differ are cloned,
shallowly (parameters shared): attention modules get the position's ``layer_idx`` (the KV
cache indexes layers by it), and a scaled tensor (passthrough's ``scale``) is multiplied on
the fly inside its module's call (``Scaled``), which gives the values the merge writes to disk.
The config's layer count and ``layer_types`` follow the plan (``MergePlan.config_updates``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from orchestrator.engine.plan import LAYER_KEYS, LAYER_RE, MergePlan
from orchestrator.engine.weights import ModelWeights
from orchestrator.errors import UserError

TensorSource = Callable[[str, str], torch.Tensor]


class Scaled(nn.Module):
    """``inner`` called with some of its own parameters multiplied by a scale (not stored)."""

    def __init__(self, inner: nn.Module, scales: Mapping[str, float]) -> None:
        super().__init__()
        self.inner = inner
        self.scales = dict(scales)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        params = {name: getattr(self.inner, name) * s for name, s in self.scales.items()}
        return torch.func.functional_call(self.inner, params, args, kwargs)


def shallow(module: nn.Module) -> nn.Module:
    """A new module object with the same children, parameters and buffers (nothing copied)."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone


def occurrence(module: nn.Module, index: int, scales: Mapping[str, float], prefix: str = "") -> nn.Module:
    """``module`` at layer position ``index``: the same object unless something must differ.

    ``scales``: ``{tensor suffix in the layer: scale}``; a module holding a scaled tensor is
    wrapped in ``Scaled``, a module with a ``layer_idx`` is cloned with ``index``.
    """
    children = {name: occurrence(child, index, scales, f"{prefix}{name}.")
                for name, child in module.named_children()}
    changed = {n: c for n, c in children.items() if c is not module._modules[n]}
    own = {n: float(scales[prefix + n]) for n, _ in module.named_parameters(recurse=False)
           if scales.get(prefix + n) not in (None, 1.0)}
    if not changed and not own and not hasattr(module, "layer_idx"):
        return module
    clone = shallow(module)
    clone._modules.update(changed)
    if hasattr(module, "layer_idx"):
        clone.layer_idx = index
    return Scaled(clone, own) if own else clone


class LayerBank:
    """Each source's model, built once from its tensors and never run whole.

    Args:
        weights: the sources' open headers (``ref -> ModelWeights``).
        tensor: ``(ref, tensor name) -> tensor`` (float32 values; shared when ``dtype`` is float32).
        like: a loaded model of the same architecture: its dtype, and the modules that hold
            buffers computed from the config (rotary embeddings) are taken from it.
    """

    def __init__(self, weights: Mapping[str, ModelWeights], tensor: TensorSource, like: nn.Module) -> None:
        self.weights = weights
        self.tensor = tensor
        self.like = like
        self.dtype = next(like.parameters()).dtype
        self.models: dict[str, nn.Module] = {}

    def add(self, ref: str, model: nn.Module) -> None:
        """A source that is a loaded model (a parameter-space merge)."""
        self.models[ref] = model

    def model(self, ref: str) -> nn.Module:
        if ref not in self.models:
            self.models[ref] = self._build(ref)
        return self.models[ref]

    def _build(self, ref: str) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        if ref not in self.weights:
            raise UserError(f"data-flow source {ref} is not among the loaded models ({', '.join(self.weights)})")
        config = AutoConfig.from_pretrained(self.weights[ref].folder)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        names = self.weights[ref].names()
        expected = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        for name in names:
            if name in expected:
                put(model, name, self.tensor(ref, name).to(self.dtype))
        if getattr(config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        _adopt_buffers(model, self.like)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise UserError(f"data-flow cannot build {ref} from its tensors: the checkpoint has no {left[0]} "
                            "(its tensor names differ from the model's)")
        return model.eval()


def put(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Set parameter or buffer ``name`` to ``tensor`` itself (no copy)."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def _adopt_buffers(model: nn.Module, like: nn.Module) -> None:
    """Modules whose buffers are still on meta (computed from the config) are ``like``'s."""
    for path, module in list(model.named_modules()):
        if path and any(b.is_meta for b in module.buffers(recurse=False)):
            set_module(model, path, like.get_submodule(path))


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    owner, _, leaf = path.rpartition(".")
    root.get_submodule(owner)._modules[leaf] = module


class PathModel:
    """One model object whose modules are the bank's, re-wired per plan (see the module doc).

    Args:
        bank: the sources' models.
        first: the source whose model is the template (config, class, the modules no path sets).
    """

    def __init__(self, bank: LayerBank, first: str) -> None:
        self.bank = bank
        donor = bank.model(first)
        self.model = shallow(donor)
        self.config = copy.deepcopy(donor.config)
        self.stack = _stack_path(donor)
        self._owned: set[int] = {id(self.model)}
        self.model.config = self.config
        for path in _ancestors(self.stack):
            module = self._own(path)
            if getattr(module, "config", None) is donor.config:
                module.config = self.config

    def _own(self, path: str) -> nn.Module:
        """The module at ``path`` in this model, cloned (once) so that it can be re-wired."""
        module = self.model.get_submodule(path)
        if id(module) not in self._owned:
            module = shallow(module)
            set_module(self.model, path, module)
            self._owned.add(id(module))
        return module

    def wire(self, plan: MergePlan) -> nn.Module:
        """Make this model the plan's path: layers, embeddings, norm and lm_head set by reference."""
        layers, others = split_plan(plan)
        modules = [occurrence(self.bank.model(ref).get_submodule(self.stack)[j], i, scales)
                   for i, (ref, j, scales) in enumerate(layers)]
        owner = self._own(self.stack.rpartition(".")[0]) if "." in self.stack else self.model
        owner._modules[self.stack.rpartition(".")[2]] = nn.ModuleList(modules)
        for path, (ref, scales) in others.items():
            module = self.bank.model(ref).get_submodule(path)
            for parent in _ancestors(path):
                self._own(parent)
            set_module(self.model, path, Scaled(module, scales) if scales else module)
        self._tie(others)
        for key, value in plan.config_updates.items():
            if key in (*LAYER_KEYS, "layer_types"):
                setattr(self.config, key, value)
        return self.model

    def _tie(self, others: Mapping[str, tuple[str, dict[str, float]]]) -> None:
        """Tied embeddings: lm_head is the embedding source's (not a tensor of the plan)."""
        if not getattr(self.config, "tie_word_embeddings", False):
            return
        emb = self.model.get_input_embeddings()
        path = next(p for p, m in self.model.named_modules() if m is emb)
        ref, scales = others[path]
        if scales:
            raise UserError("a scale on tied embeddings is not supported in a data-flow path")
        out = self.bank.model(ref).get_output_embeddings()
        out_path = next(p for p, m in self.bank.model(ref).named_modules() if m is out)
        for parent in _ancestors(out_path):
            self._own(parent)
        set_module(self.model, out_path, out)


def split_plan(plan: MergePlan) -> tuple[list[tuple[str, int, dict[str, float]]], dict[str, tuple[str, dict[str, float]]]]:
    """Per output layer (source, source layer, {suffix: scale}); per other module (source, scales)."""
    layers: dict[int, tuple[str, int, dict[str, float]]] = {}
    others: dict[str, tuple[str, dict[str, float]]] = {}
    for task in plan.tasks:
        if len(task.inputs) != 1 or task.base is not None:
            raise UserError(f"a data-flow path takes each tensor from one source; {task.name} merges "
                            f"{len(task.inputs)} (use merge_method: passthrough with one source per slice)")
        ref, scale = task.inputs[0], getattr(task.model_params[0], "scale", None) if task.model_params else None
        out, src = LAYER_RE.match(task.name), LAYER_RE.match(ref.name)
        if out is None:
            owner, _, leaf = task.name.rpartition(".")
            entry = others.setdefault(owner, (ref.model, {}))
            _scale(entry[1], leaf, scale)
            continue
        entry = layers.setdefault(int(out["index"]), (ref.model, int(src["index"]), {}))
        if entry[:2] != (ref.model, int(src["index"])):
            raise UserError(f"output layer {out['index']} mixes two source layers: not a layer path")
        _scale(entry[2], out["suffix"], scale)
    if sorted(layers) != list(range(len(layers))):
        raise UserError("the plan's output layers are not numbered 0..n-1")
    return [layers[i] for i in range(len(layers))], others


def _scale(scales: dict[str, float], name: str, value: Any) -> None:
    if value is not None and float(value) != 1.0:
        scales[name] = float(value)


def _stack_path(model: nn.Module) -> str:
    """The dotted path of the model's decoder-layer list (``model.layers``)."""
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and LAYER_RE.match(f"{path}.0.x"):
            return path
    raise UserError(f"{type(model).__name__} has no layer list that data-flow can re-wire")


def _ancestors(path: str) -> list[str]:
    """``a.b.c`` -> ``["a", "a.b"]`` (the modules above it; the root is always owned)."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def storages(model: nn.Module) -> set[int]:
    """The data pointers of every parameter's storage (to count what a model really holds)."""
    return {p.untyped_storage().data_ptr() for p in model.parameters()}
