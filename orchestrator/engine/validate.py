"""Checking a recipe against its method without reading any file.

``check_recipe`` validates the method name, the base model, model counts, parameter keys (per
model vs global) and every value written (each gradient point and rule value) against the
method's params dataclasses; ``normalize`` gives the slices the plan is built from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.engine.recipe import EMPTY, NO_OP_KEYS, FrozenMap, Recipe, leaves
from orchestrator.errors import UserError
from orchestrator.merge import get_method


# -- normalised structure ---------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One model's contribution to an output slice (``layer_range`` None: all layers)."""

    model: str
    layer_range: tuple[int, int] | None
    parameters: FrozenMap


@dataclass(frozen=True)
class NormSlice:
    """A slice with the base resolved and the method's inputs (base excluded) listed."""

    where: str
    sources: tuple[Source, ...]
    parameters: FrozenMap
    base: str | None          # model key of the base, when the method uses one
    inputs: tuple[Source, ...]  # the ``xs`` of the method, in recipe order


def normalize(recipe: Recipe, method) -> list[NormSlice]:
    """``models:`` -> one slice over all layers (base appended, as mergekit does); check bases."""
    if recipe.models:
        sources = [Source(m.model, None, m.parameters) for m in recipe.models]
        if recipe.base_model and recipe.base_model not in [s.model for s in sources]:
            sources.append(Source(recipe.base_model, None, EMPTY))
        raw = [("models", tuple(sources), EMPTY, recipe.base_model)]
    else:
        raw = [(f"slices[{i}]", tuple(Source(s.model, s.layer_range, s.parameters)
                                      for s in sl.sources),
                sl.parameters, sl.base_model or recipe.base_model)
               for i, sl in enumerate(recipe.slices)]
    return [_norm_slice(method, *item) for item in raw]


def _norm_slice(method, where: str, sources: tuple[Source, ...], params: FrozenMap,
                base: str | None) -> NormSlice:
    names = [s.model for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"{where}: model '{dupes[0]}' is listed twice")
    if method.base == "required" and not base:
        raise UserError(f"method '{method.name}' needs a base_model")
    if method.base == "none":
        base = None
    if base is not None and base not in names:
        raise UserError(f"{where}: base_model '{base}' is not among its sources "
                        f"({', '.join(names)})")
    inputs = tuple(s for s in sources if s.model != base)
    n = len(inputs)
    besides = " besides the base" if base else ""
    if n < method.min_models:
        raise UserError(f"method '{method.name}' needs at least {method.min_models} model(s)"
                        f"{besides}, got {n} in {where}")
    if method.max_models is not None and n > method.max_models:
        raise UserError(f"method '{method.name}' takes at most {method.max_models} model(s)"
                        f"{besides}, got {n} in {where}: {', '.join(s.model for s in inputs)}")
    return NormSlice(where, sources, params, base, inputs)


# -- static checks ------------------------------------------------------------------------------
def check_recipe(recipe: Recipe):
    """Validate a recipe against its method without reading any file; returns the method.

    Checks the method name, the base model, model counts, parameter keys (per model vs
    global) and every value written (each gradient point and rule value) against the
    method's params dataclasses.
    """
    method = get_method(recipe.merge_method)
    slices = normalize(recipe, method)
    _check_keys(recipe, method, slices)
    _check_global_values(recipe, method, slices)
    for sl in slices:
        for src in sl.inputs:
            _check_model_values(recipe, method, sl, src)
    return method


def _valid_keys_text(method) -> str:
    per_model = ", ".join(method.model_keys()) or "none"
    glob = ", ".join(method.global_keys()) or "none"
    return f"valid: {per_model} (per model); {glob} (global)"


def _check_keys(recipe: Recipe, method, slices: list[NormSlice]) -> None:
    known = set(method.global_keys()) | set(method.model_keys()) | set(NO_OP_KEYS)
    scopes = [("", recipe.parameters)] + [(f" in {sl.where}", sl.parameters) for sl in slices]
    for where, params in scopes:
        for key in params:
            if key not in known:
                raise UserError(f"unknown parameter '{key}'{where} in method '{method.name}'; "
                                f"{_valid_keys_text(method)}")
    for sl in slices:
        for src in sl.sources:
            for key in src.parameters:
                where = f"for model '{src.model}' in method '{method.name}'"
                if key in method.global_keys() and key not in method.model_keys():
                    raise UserError(f"parameter '{key}' {where} is global (one value for all "
                                    "models): set it under the top-level parameters")
                if key not in known:
                    raise UserError(f"unknown parameter '{key}' {where}; "
                                    f"{_valid_keys_text(method)}")


def _first_leaves(scopes: Sequence[Mapping], keys: Sequence[str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for scope in reversed(scopes):  # highest precedence last so it wins
        for key in keys:
            if key in scope:
                found[key] = next(leaves(scope[key]))
    return found


def _check_global_values(recipe: Recipe, method, slices: list[NormSlice]) -> None:
    keys = method.global_keys()
    for sl in slices:
        scopes = (sl.parameters, recipe.parameters)
        baseline = _first_leaves(scopes, keys)
        for key in method.required_global_keys():
            if key not in baseline:
                raise UserError(f"method '{method.name}' needs parameter '{key}' "
                                f"(under parameters)")
        for scope in scopes:
            for key in (k for k in keys if k in scope):
                for leaf in leaves(scope[key]):
                    build_params(method, {**baseline, key: leaf}, f" in method '{method.name}'")


def _check_model_values(recipe: Recipe, method, sl: NormSlice, src: Source) -> None:
    keys = method.model_keys()
    scopes = (src.parameters, sl.parameters, recipe.parameters)
    baseline = _first_leaves(scopes, keys)
    where = f" for model '{src.model}' in method '{method.name}'"
    for key in method.required_model_keys():
        if key not in baseline:
            hint = (" (base_model is an input of this method; give it a weight or drop it)"
                    if src.model == recipe.base_model else "")
            raise UserError(f"missing parameter '{key}'{where}{hint}")
    for scope in scopes:
        for key in (k for k in keys if k in scope):
            for leaf in leaves(scope[key]):
                build_model_params(method, {**baseline, key: leaf}, where)


def build_params(method, values: Mapping[str, Any], where: str):
    """``method.make_params`` with ValueError/TypeError re-raised as UserError + where."""
    try:
        return method.make_params(dict(values))
    except (ValueError, TypeError) as err:
        raise UserError(f"{_msg(err)}{where}") from None


def build_model_params(method, values: Mapping[str, Any], where: str):
    """``method.make_model_params`` with errors re-raised as UserError + where."""
    try:
        return method.make_model_params(dict(values))
    except (ValueError, TypeError) as err:
        raise UserError(f"{_msg(err)}{where}") from None


def _msg(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__
