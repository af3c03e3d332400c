"""Recipes over LoRA adapters written as one combined adapter (``merge --adapter``).

A recipe whose models are all PEFT LoRA adapters on one base (bare adapter folders on
``base_model``, or ``base_model+adapter``) can be written as a single adapter instead of a
full model. Three keys of ``parameters`` belong to this mode and are taken out before the
method sees the rest:

- ``rank``: the rank of the result for ``svd`` and for engine methods (truncated by SVD;
  default: the sum of the adapters' largest ranks, exact for any linear combination);
- ``peft_compatible: true``: reproduce PEFT's ``add_weighted_adapter`` for the combination
  type named by ``merge_method`` (linear, cat, svd, ties, dare_linear, dare_ties,
  magnitude_prune and their ``_svd`` forms); the remaining ``parameters`` are its keyword
  arguments (``density``, ``majority_sign_method``, ``svd_rank``...);
- ``knots: true``: align each module's updates in their joint SVD basis and merge them there
  with ``merge_method`` (KnOTS, Stoica et al. 2024, arXiv 2410.19735), then truncate to
  ``rank``: TIES and DARE then trim and elect signs on shared directions, not raw entries.

Otherwise ``merge_method`` is ``cat`` (exact, rank r1+r2+...), ``svd``, or any engine method
that merges updates (task_arithmetic, ties, dare_*, della*, breadcrumbs*, linear), applied to
the adapters' full updates exactly as a full-model merge of the baked models would.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.engine.sources import as_recipe, resolve_reference
from orchestrator.engine.recipe import Recipe
from orchestrator.engine.weights import ModelWeights, resolve_model_path
from orchestrator.engine.writing import check_output_dir, staged_output
from orchestrator.errors import UserError
from orchestrator.lora import combine_adapters, is_adapter_folder, load_adapter, save_adapter

ADAPTER_KEYS = ("rank", "peft_compatible", "knots")


@dataclass(frozen=True)
class AdapterJob:
    """A recipe read as a combination of adapters."""

    base: str  # as written (recorded as the adapter's base_model_name_or_path)
    base_dir: Path
    adapters: tuple[str, ...]
    method: str
    model_params: tuple[dict[str, Any], ...]
    params: dict[str, Any] = field(default_factory=dict)
    rank: int | None = None
    peft_compatible: bool = False
    knots: bool = False


def uses_adapter_keys(recipe: Recipe) -> bool:
    """Whether ``parameters`` holds a key of adapter output (``rank``, ``peft_compatible``)."""
    return any(k in recipe.parameters for k in ADAPTER_KEYS)


def _plain(value: Any, where: str) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise UserError(f"{where}: a combined adapter takes plain values, got {value!r} "
                    "(gradients and filters need a full-model merge)")


def adapter_job(recipe: Recipe) -> AdapterJob:
    """Check that ``recipe`` combines adapters on one base and read its settings."""
    if recipe.slices:
        raise UserError("a combined adapter is made from models:, not slices")
    params = {k: _plain(v, f"parameters.{k}") for k, v in recipe.parameters.items()}
    rank, peft, knots = params.pop("rank", None), params.pop("peft_compatible", False), params.pop("knots", False)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise UserError(f"parameters.rank must be a positive integer, got {rank!r}")
    for key, value in (("peft_compatible", peft), ("knots", knots)):
        if not isinstance(value, bool):
            raise UserError(f"parameters.{key} must be true or false, got {value!r}")
    if knots and (peft or recipe.merge_method in ("cat", "svd")):
        raise UserError(f"parameters.knots aligns adapters before an update-merging method; it does not apply "
                        f"to {'peft_compatible' if peft else recipe.merge_method}")
    base = recipe.base_model
    if base is not None and "+" in base:
        raise UserError(f"base_model '{base}' must be a plain model folder")
    base_dir = resolve_model_path(base, recipe.source_dir) if base is not None else None
    adapters = []
    for i, entry in enumerate(recipe.models):
        where = f"models[{i}] '{entry.model}'"
        path, adapter = resolve_reference(entry.model, recipe.source_dir)
        if adapter is None:  # a bare entry must be an adapter (on base_model)
            if not is_adapter_folder(path):
                raise UserError(f"{where} is not a LoRA adapter folder (no adapter_config.json); a "
                                "combined adapter is made from adapters only")
            adapter = path
        elif base_dir is not None and path != base_dir:
            raise UserError(f"{where}: its model is not base_model '{base}'; a combined adapter "
                            "needs adapters of one base")
        else:  # model+adapter without base_model: that model is the base
            base, base_dir = entry.model.partition("+")[0].strip(), path
        adapters.append(str(adapter))
    if base is None or base_dir is None:
        raise UserError("a combined adapter needs base_model: the model the adapters were trained on")
    model_params = tuple({k: _plain(v, f"models[{i}].parameters.{k}") for k, v in e.parameters.items()}
                         for i, e in enumerate(recipe.models))
    return AdapterJob(base, base_dir, tuple(adapters), recipe.merge_method, model_params, params, rank, peft, knots)


@dataclass
class AdapterResult:
    """What ``write_combined_adapter`` wrote."""

    out_dir: Path
    modules: int
    rank: int
    seconds: float


def write_combined_adapter(recipe: Recipe | Mapping[str, Any], out_dir: str | Path, *, seed: int = 0,
                           overwrite: bool = False) -> AdapterResult:
    """Combine the recipe's adapters into one PEFT adapter folder at ``out_dir``.

    Everything is checked before anything is written (the adapters against the base's tensor
    headers); the folder is staged and renamed into place, with the recipe beside the adapter
    as ``mergekit_config.yml``.
    """
    start = time.perf_counter()
    recipe = as_recipe(recipe)
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    job = adapter_job(recipe)
    with ModelWeights(job.base_dir) as base:
        shapes = {n: base.info(n).shape for n in base.names()}
    adapters = [load_adapter(p).for_base(shapes) for p in job.adapters]
    combined = combine_adapters(adapters, job.method, list(job.model_params), job.params or None,
                                seed=seed, rank=job.rank, peft_compatible=job.peft_compatible,
                                name=out.name, knots=job.knots)
    with staged_output(out, overwrite) as stage:
        save_adapter(combined, stage, base_model_name_or_path=job.base, overwrite=True)
        (stage / "mergekit_config.yml").write_text(recipe.to_yaml(), encoding="utf-8")
    return AdapterResult(out.absolute(), len(combined.modules), combined.max_rank(),
                         time.perf_counter() - start)


def uses_knots(recipe: Recipe) -> bool:
    """Whether a recipe over adapters asks for KnOTS (``parameters.knots: true``)."""
    return recipe.parameters.get("knots") is True


def merge_knots_to_disk(recipe: Recipe | Mapping[str, Any], out_dir: str | Path, *, seed: int = 0,
                        overwrite: bool = False, **options: Any) -> Any:
    """A full model from a KnOTS recipe over adapters: the base with the KnOTS update baked in.

    The engine's per-tensor methods see full tensors, not an adapter's factors, so the KnOTS
    update is written first as one combined adapter of exact rank (the sum of the adapters'
    ranks: the merged update lives in their joint basis), then baked into the base through the
    engine (``base+combined``), exactly as the resident ``AdapterMerger`` applies it up to float32
    rounding. The recipe itself is kept as ``knots_recipe.yml`` beside the model.
    """
    import tempfile

    from orchestrator.engine.streaming import merge_to_disk

    recipe = as_recipe(recipe)
    job = adapter_job(recipe)
    if not job.knots:
        raise UserError("merge_knots_to_disk needs parameters.knots: true")
    user_commit = options.pop("before_commit", None)

    def keep_recipe(stage: Path) -> None:
        (stage / "knots_recipe.yml").write_text(recipe.to_yaml(), encoding="utf-8")
        if user_commit is not None:
            user_commit(stage)

    with tempfile.TemporaryDirectory(prefix="knots-") as tmp:
        combined = write_combined_adapter(recipe, Path(tmp) / "combined", seed=seed).out_dir
        bake = {"merge_method": "linear", "dtype": recipe.dtype or "float32",
                "models": [{"model": f"{job.base_dir}+{combined}", "parameters": {"weight": 1.0}}]}
        if recipe.out_dtype:
            bake["out_dtype"] = recipe.out_dtype
        if recipe.tokenizer_source:
            bake["tokenizer_source"] = recipe.tokenizer_source
        return merge_to_disk(bake, out_dir, seed=seed, overwrite=overwrite, before_commit=keep_recipe, **options)


def merge_recipe_to_disk(recipe: Recipe | Mapping[str, Any], out_dir: str | Path, **options: Any) -> Any:
    """``merge_to_disk``, or ``merge_knots_to_disk`` for a KnOTS recipe over adapters."""
    from orchestrator.engine.streaming import merge_to_disk

    recipe = as_recipe(recipe)
    return (merge_knots_to_disk if uses_knots(recipe) else merge_to_disk)(recipe, out_dir, **options)
