"""Search spaces bound to the candidates before the study: layer counts and sizes from headers.

Layer groups need the candidates' layer count; a data-flow space needs each source's layers
and their parameter counts (``max_params``) and the folder its PS merges go to. Everything is
read from ``config.json`` and safetensors headers, so a bad space fails before a model loads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.engine.plan import model_layout
from orchestrator.engine.weights import ModelWeights, numel
from orchestrator.errors import UserError
from orchestrator.study.candidates import Candidates
from orchestrator.study.dataflow import PS, DataflowSpace, SourceInfo, bind_dataflow
from orchestrator.study.spaces import MethodSpace

ARCH_KEYS = ("architectures", "model_type", "hidden_size", "vocab_size", "tie_word_embeddings")


def bind_spaces(spaces: Mapping[str, Any], cand: Candidates, ps_root: Path, seed: int) -> dict[str, Any]:
    """Every space bound to the candidates (one-line errors for what does not fit them)."""
    headers: dict[str, ModelWeights] = {}
    out = {}
    for name, space in spaces.items():
        where = f"search space of {name!r}"
        if isinstance(space, DataflowSpace):
            out[name] = bind_flow(space, cand, headers, str(ps_root), seed, where)
        else:
            out[name] = bind_method(space, cand, headers, where)
    return out


def bind_method(space: MethodSpace, cand: Candidates, headers: dict[str, ModelWeights], where: str) -> MethodSpace:
    """A parameter space over the candidates' layer count; every filter must match a tensor."""
    if all(lay.trivial for lay in space.layouts().values()):
        return space
    ref = next(iter(cand.models.values())).partition("+")[0]
    layout = _open(ref, headers, where, cand.allow_pickle)
    for name, lay in space.layouts().items():
        check_filters(lay.filters, headers[ref].names(), f"{where}: {name}.filters")
    return space.bind(layout.num_layers, where)


def check_filters(filters: tuple[str, ...], names: list[str], where: str) -> None:
    """A filter that no tensor name contains is a typo (its values would go nowhere)."""
    for f in filters:
        if not any(f in n for n in names):
            raise UserError(f"{where}: no tensor name of the candidates contains {f!r} "
                            f"(e.g. {names[len(names) // 2]})")


def _open(ref: str, headers: dict[str, ModelWeights], where: str, allow_pickle: bool = False) -> Any:
    if ref not in headers:
        try:
            headers[ref] = ModelWeights(ref, allow_pickle=allow_pickle)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
    return model_layout(headers[ref], ref)


def bind_flow(space: DataflowSpace, cand: Candidates, headers: dict[str, ModelWeights], ps_root: str, seed: int,
              where: str) -> DataflowSpace:
    """A data-flow space over the candidates: sources described, constraints checked."""
    if PS in cand.models:
        raise UserError(f"{where}: a candidate is named {PS!r}, the name of the PS merge's source; rename it")
    adapters = [n for n, ref in cand.models.items() if "+" in ref]
    if adapters:
        raise UserError(f"{where}: data-flow runs full models' layers; candidate(s) {adapters} are LoRA "
                        "adapters (bake them into model folders first)")
    infos = {name: _info(name, ref, headers, where, cand.allow_pickle) for name, ref in cand.models.items()}
    _same_architecture(infos, headers, cand, where)
    first = next(iter(cand.models.values()))
    layout = _open(first, headers, where)
    other = sum(numel(headers[first].info(n).shape) for n in (*layout.pre, *layout.post))
    if space.scale is not None:
        check_filters(space.scale_filters, headers[first].names(), f"{where}: dataflow.scale_filters")
    if space.ps is not None:
        infos[PS] = dataclasses.replace(next(iter(infos.values())), name=PS, ref=None)
        space = dataclasses.replace(space, ps=bind_method(space.ps, cand, headers, f"{where}: ps"))
    return bind_dataflow(space, infos, other, ps_root, seed, where)


def _info(name: str, ref: str, headers: dict[str, ModelWeights], where: str, allow_pickle: bool) -> SourceInfo:
    layout = _open(ref, headers, where, allow_pickle)
    weights = headers[ref]
    sizes = tuple(sum(numel(weights.info(t).shape) for t in layout.layers.get(i, {}).values())
                  for i in range(layout.num_layers))
    return SourceInfo(name, ref, sizes)


def _same_architecture(infos: Mapping[str, SourceInfo], headers: Mapping[str, ModelWeights], cand: Candidates,
                       where: str) -> None:
    """Layers of different architectures cannot follow one another in a path."""
    configs = {n: headers[cand.models[n]].config for n in infos}
    first = next(iter(configs))
    for name, config in configs.items():
        for key in ARCH_KEYS:
            if config.get(key) != configs[first].get(key):
                raise UserError(f"{where}: data-flow sources must share one architecture; {key} is "
                                f"{configs[first].get(key)!r} in {first} but {config.get(key)!r} in {name}")
