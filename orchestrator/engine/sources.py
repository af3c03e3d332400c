"""The models a recipe names: references resolved, weights opened lazily, the plan built.

A model reference is a local folder, a Hub id ``org/name[@revision]``, ``model+adapter``
(mergekit's form: the model with a LoRA adapter baked in) or a bare adapter folder, which is
applied to the recipe's ``base_model``. Adapters are read through ``orchestrator.lora.BakedWeights``
and never written to disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.engine.plan import MergePlan, build_plan
from orchestrator.engine.validate import check_recipe
from orchestrator.engine.recipe import Recipe, load_recipe
from orchestrator.engine.weights import ModelWeights, resolve_model_path
from orchestrator.errors import UserError
from orchestrator.lora import BakedWeights, is_adapter_folder, load_adapter


def open_models(recipe: Recipe, *, allow_pickle: bool = False) -> dict[str, ModelWeights]:
    """Resolve every model reference and open its weights lazily (headers only).

    A LoRA adapter may stand wherever a model does: ``model+adapter`` (mergekit's form) is
    the model with the adapter baked in, and a bare adapter folder is ``base_model+adapter``.
    Both are read through ``orchestrator.lora.BakedWeights``, never written to disk.
    """
    opened: dict[str, Any] = {}
    try:
        for ref in recipe.referenced_models():
            opened[ref] = open_model(ref, recipe, allow_pickle=allow_pickle)
    except BaseException:
        close_all(opened)
        raise
    return opened


def resolve_reference(ref: str, source_dir: Path | None = None) -> tuple[Path, Path | None]:
    """A model reference -> ``(folder, None)``, or ``(model folder, adapter folder)`` for
    ``model+adapter`` (checked: the model is no adapter, the adapter is one).

    A plain reference may itself name an adapter folder; the caller decides what base it goes on.
    """
    model_ref, plus, adapter_ref = ref.partition("+")
    path = resolve_model_path(model_ref.strip(), source_dir)
    if not plus:
        return path, None
    if is_adapter_folder(path):
        raise UserError(f"model '{ref}': {path} is a LoRA adapter, not a model; "
                        "write 'model+adapter' with the model first")
    adapter = resolve_model_path(adapter_ref.strip(), source_dir)
    if not is_adapter_folder(adapter):
        raise UserError(f"model '{ref}': {adapter} is not a LoRA adapter folder (no adapter_config.json)")
    return path, adapter


def open_model(ref: str, recipe: Recipe, *, allow_pickle: bool = False) -> Any:
    """The weights of one model reference of ``recipe`` (a ``ModelWeights`` or ``BakedWeights``)."""
    path, adapter = resolve_reference(ref, recipe.source_dir)
    if adapter is not None:
        return _baked(BakedWeights, ModelWeights(path, allow_pickle=allow_pickle), load_adapter(adapter), ref)
    if not is_adapter_folder(path):
        return ModelWeights(path, allow_pickle=allow_pickle)
    base = recipe.base_model
    if not base or base == ref:
        raise UserError(f"model '{ref}' is a LoRA adapter but the recipe has no base_model to apply "
                        f"it to; set base_model, or write 'MODEL+{ref}'")
    base_path, base_adapter = resolve_reference(base, recipe.source_dir)
    if base_adapter is not None or is_adapter_folder(base_path):
        raise UserError(f"model '{ref}' is a LoRA adapter on base_model '{base}', which is not a "
                        "plain model folder; write 'MODEL+ADAPTER' for this entry")
    adapter_weights = load_adapter(path)
    return _baked(BakedWeights, ModelWeights(base_path, allow_pickle=allow_pickle), adapter_weights, ref)


def _baked(baked_cls: Any, base: ModelWeights, adapter: Any, ref: str) -> Any:
    """``base`` with ``adapter`` baked in; the base is closed if the adapter does not fit it."""
    try:
        return baked_cls(base, [adapter])
    except UserError as err:
        base.close()
        raise UserError(f"model '{ref}': {err}") from None
    except BaseException:
        base.close()
        raise


def as_recipe(recipe: Recipe | Mapping[str, Any] | str | Path,
              source_dir: Path | None = None) -> Recipe:
    """A Recipe from a Recipe, a mergekit config dict, or a YAML file path."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(recipe, source_dir)
    return load_recipe(recipe)


def prepare(recipe: Recipe, *, allow_pickle: bool = False) -> tuple[MergePlan, dict[str, ModelWeights]]:
    """Validate a recipe fully (static checks, then headers) and build its plan."""
    check_recipe(recipe)  # before any path is resolved or downloaded
    weights = open_models(recipe, allow_pickle=allow_pickle)
    try:
        return build_plan(recipe, weights), weights
    except BaseException:
        close_all(weights)
        raise


def close_all(weights: Mapping[str, ModelWeights]) -> None:
    for w in weights.values():
        w.close()
