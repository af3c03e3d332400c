"""The models a study merges: references resolved, checked, and the recipes built over them.

``resolve_candidates`` turns the configured references (folders, Hub ids, ``model+adapter``,
bare adapters on the base) into absolute references, checked, before any model is loaded;
``recipe_builder`` and ``baseline_recipes`` make the mergekit recipes of trials and baselines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.engine.sources import resolve_reference
from orchestrator.engine.weights import TOKENIZER_FILES, is_model_folder
from orchestrator.errors import UserError
from orchestrator.lora import is_adapter_folder
from orchestrator.merge import get_method
from orchestrator.study.dataflow import PS, DataflowChoice, path_recipe, ps_folder, register_ps
from orchestrator.study.genome import has_blocks, to_slices
from orchestrator.study.records import recipe_key
from orchestrator.study.spaces import DATAFLOW, merge_method_of, uses_first_as_base


@dataclass(frozen=True)
class Candidates:
    """The models to merge, ``name -> reference`` in order, the base, and how to load them."""

    models: Mapping[str, str] = field(default_factory=dict)
    base: str | None = None
    dtype: str = "float32"
    tokenizer_source: str | None = None
    allow_pickle: bool = False
    knots: bool = False  # adapter candidates: merge in their joint SVD basis (KnOTS)

    def adapters(self) -> dict[str, str] | None:
        """``{name: adapter folder}`` when every candidate is ``base+adapter`` on the base."""
        prefix = f"{self.base}+" if self.base else None
        if prefix is None or not all(ref.startswith(prefix) for ref in self.models.values()):
            return None
        return {name: ref[len(prefix):] for name, ref in self.models.items()}


def resolve_candidates(cand: Candidates) -> Candidates:
    """Absolute references, each checked: a model folder, or ``model+adapter``."""
    if not cand.models:
        raise UserError("candidates.models is empty: name the models to merge")
    base = _resolve(cand.base, "candidates.base", None)
    if base is not None and "+" in base:
        raise UserError(f"candidates.base must be a plain model folder, got {cand.base!r}")
    models = {k: _resolve(v, f"candidates.models.{k}", base, adapter_ok=True) for k, v in cand.models.items()}
    return dataclasses.replace(cand, models=models, base=base,
                               tokenizer_source=_resolve(cand.tokenizer_source, "candidates.tokenizer_source", None))


def _resolve(ref: str | None, where: str, base: str | None, adapter_ok: bool = False) -> str | None:
    """An absolute model folder; a LoRA adapter becomes ``base+adapter`` (adapter_ok)."""
    if ref is None:
        return None
    try:
        path, adapter = resolve_reference(ref)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    if adapter is None and adapter_ok and is_adapter_folder(path):
        if base is None:
            raise UserError(f"{where}: {path} is a LoRA adapter; set candidates.base to the model "
                            f"it was trained on, or write MODEL+{ref}")
        path, adapter = Path(base), path
    if not is_model_folder(path):
        raise UserError(f"{where}: {path} is not a model folder (no config.json and weights)")
    return f"{path}+{adapter}" if adapter is not None else str(path)


def check_tokenizer(cand: Candidates) -> None:
    """The folder the evaluator takes the tokenizer from must have one."""
    where, folder = next((w, f) for w, f in (("candidates.tokenizer_source", cand.tokenizer_source),
                                               ("candidates.base", cand.base),
                                               ("candidates.models", next(iter(cand.models.values()))))
                         if f)
    folder = folder.partition("+")[0]
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{where}: {folder} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}); "
                        "set candidates.tokenizer_source to a folder that has one")


def base_as_candidate(cand: Candidates, methods: Sequence[str]) -> str | None:
    """A warning when a candidate is the base itself and some method merges task vectors.

    Its task vector is zero, so under task arithmetic, TIES or DARE its weight changes nothing
    (a parameter the search wastes trials on); linear and slerp do use it.
    """
    delta = [m for m in methods if merge_method_of(m) != DATAFLOW and get_method(merge_method_of(m)).merges_deltas]
    same = [name for name, ref in cand.models.items() if cand.base and ref == cand.base]
    if not delta or not same:
        return None
    return (f"warning: candidates.models.{same[0]} is candidates.base itself: under {', '.join(delta)} its "
            "task vector is zero and its weight does nothing; drop it from candidates.models for those "
            "methods (linear and slerp do use it)")


def build_recipe(method: str, global_values: Mapping[str, Any], per_model: Mapping[str, Mapping[str, Any]],
                 cand: Candidates) -> dict[str, Any]:
    """A mergekit-format recipe dict for one trial over the candidates (in order).

    ``method`` may be a variant (``ties-layers``: merged with ``ties``); per-block values of
    discrete layer groups make it a ``slices:`` recipe (``genome.to_slices``); ``dataflow``
    makes the ``passthrough`` recipe of the suggested path (``dataflow_recipe``).
    """
    method = merge_method_of(method)
    if method == DATAFLOW:
        return dataflow_recipe(global_values["path"], cand)
    spec = get_method(method)
    names = list(cand.models)
    recipe: dict[str, Any] = {"merge_method": method, "dtype": cand.dtype}
    if uses_first_as_base(spec, len(names)):
        recipe["base_model"] = cand.models[names[0]]
    elif spec.base != "none" and cand.base is not None:
        recipe["base_model"] = cand.base
    recipe["models"] = [{"model": cand.models[n], **({"parameters": dict(per_model[n])} if per_model.get(n) else {})}
                        for n in names]
    if global_values or cand.knots:
        recipe["parameters"] = {**global_values, **({"knots": True} if cand.knots else {})}
    if cand.tokenizer_source:
        recipe["tokenizer_source"] = cand.tokenizer_source
    return to_slices(recipe) if has_blocks(global_values, per_model) else recipe


def dataflow_recipe(choice: DataflowChoice, cand: Candidates) -> dict[str, Any]:
    """The passthrough recipe of a path; its ``ps`` source is the folder of its PS recipe."""
    refs = dict(cand.models)
    if choice.ps is not None:
        ps = build_recipe(choice.ps_method, choice.ps[0], choice.ps[1], cand)
        if choice.ps_root is None:
            raise UserError("a PS+DFS path needs the folder its PS merges go to (bind_dataflow's ps_root)")
        refs[PS] = ps_folder(choice.ps_root, choice.ps_method, recipe_key(ps, choice.seed))
        register_ps(refs[PS], ps)
    return path_recipe(choice, refs, cand.dtype, cand.tokenizer_source)


def recipe_builder(cand: Candidates) -> Callable[[str, Mapping[str, Any], Mapping[str, Mapping[str, Any]]],
                                                 dict[str, Any]]:
    """``build_recipe`` over these candidates (what the objective calls)."""
    return lambda method, global_values, per_model: build_recipe(method, global_values, per_model, cand)


def union_recipe(cand: Candidates) -> dict[str, Any]:
    """A recipe naming every candidate (and the base): fixes the in-memory merger's model set."""
    weights = {k: {"weight": 1.0} for k in cand.models}
    return build_recipe("task_arithmetic" if cand.base else "linear", {}, weights, cand)


def baseline_recipes(cand: Candidates) -> dict[str, dict[str, Any]]:
    """Each parent model alone (``parent:<name>``), and their uniform average."""
    out = {}
    cand = dataclasses.replace(cand, knots=False)
    for name in cand.models:
        alone = dataclasses.replace(cand, models={name: cand.models[name]}, base=None)
        out[f"parent:{name}"] = build_recipe("linear", {}, {name: {"weight": 1.0}}, alone)
    out["uniform average"] = build_recipe("linear", {"normalize": True}, {k: {"weight": 1.0} for k in cand.models},
                                          dataclasses.replace(cand, base=None))
    return out
