"""Merge to disk: a Hugging Face model folder written tensor by tensor.

Streaming reads one tensor from each input, merges, writes and drops it. Float32 safetensors
inputs are memory-mapped views (page cache, not the process's own memory): peak memory is
about the largest tensor (times a small factor for methods with scratch: TIES' magnitude ranks,
DARE's masks), not the model size or the number of inputs. Output and scratch buffers come
from a ``Workspace`` reused tensor after tensor: fresh memory costs a page fault per page on
first touch, as much as the merge arithmetic itself on a VM.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orchestrator.engine.compute import StreamReader, cast, compute_tensor
from orchestrator.engine.devices import resolve_device
from orchestrator.engine.modelcard import render_model_card
from orchestrator.engine.plan import MergePlan
from orchestrator.engine.recipe import Recipe
from orchestrator.engine.sources import as_recipe, close_all, prepare
from orchestrator.engine.weights import ModelWeights, folder_bytes, parse_size
from orchestrator.engine.writing import (
    ShardedWriter,
    check_output_dir,
    copy_generation_config,
    copy_tokenizer,
    staged_output,
    write_config,
)
from orchestrator.errors import UserError
from orchestrator.merge.chunks import Workspace

RECIPE_FILE = "mergekit_config.yml"
CARD_FILE = "README.md"


@dataclass(frozen=True)
class MergeResult:
    """What a merge to disk produced."""

    out_dir: Path
    tensors: int
    seconds: float
    bytes: int
    files: tuple[str, ...] = field(default=())


def merge_to_disk(recipe: Recipe | Mapping[str, Any], out_dir: str | Path, *, seed: int = 0,
                  device: str | torch.device = "cpu", allow_pickle: bool = False,
                  shard_size: str | int = "5GB", overwrite: bool = False,
                  progress: Callable[[int, int, str], None] | None = None,
                  card_title: str | None = None, card_path: str | None = None,
                  before_commit: Callable[[Path], None] | None = None) -> MergeResult:
    """Merge to a Hugging Face model folder, streaming tensor by tensor.

    Everything is validated before any tensor is read; the folder is written into a staging
    folder and renamed into place at the end, so an error leaves nothing behind.

    Args:
        recipe: a Recipe or a mergekit config dict.
        out_dir: the output folder (must not exist or be empty unless ``overwrite``).
        seed: seed for random methods (DARE, DELLA...).
        device: where to compute: ``cpu`` or ``cuda``.
        allow_pickle: accept ``pytorch_model.bin`` inputs.
        shard_size: largest shard, e.g. ``"5GB"``.
        overwrite: replace an existing output folder.
        progress: called with ``(done, total, tensor name)`` after each tensor.
        card_title: the model card's title (default: the output folder's name).
        card_path: the folder the card's usage snippet loads (default: ``out_dir`` as given).
        before_commit: called with the staging folder once everything is written, before it
            is renamed to ``out_dir`` (to add files that belong with the merge).
    """
    start = time.perf_counter()
    recipe = as_recipe(recipe)
    max_bytes = parse_size(shard_size)
    dev = resolve_device(device)
    check_output_dir(Path(out_dir), overwrite)
    plan, weights = prepare(recipe, allow_pickle=allow_pickle)
    try:
        _check_not_an_input(Path(out_dir), weights)
        with staged_output(Path(out_dir), overwrite) as stage:
            files = _stream(plan, weights, stage, dev, seed, max_bytes, progress)
            files += write_extras(plan, weights, stage, name=card_title or Path(out_dir).name, seed=seed,
                                  path=card_path or str(out_dir))
            if before_commit is not None:
                before_commit(stage)
    finally:
        close_all(weights)
    out = Path(out_dir).absolute()
    return MergeResult(out, len(plan.tasks), time.perf_counter() - start, folder_bytes(out),
                       tuple(files))


def _check_not_an_input(out_dir: Path, weights: Mapping[str, ModelWeights]) -> None:
    target = out_dir.resolve()
    for ref, w in weights.items():
        if w.folder.resolve() == target:
            raise UserError(f"output folder {out_dir} is the input model '{ref}'; choose another")


def _stream(plan: MergePlan, weights, stage: Path, device: torch.device, seed: int,
            max_bytes: int, progress) -> list[str]:
    writer = ShardedWriter(stage, plan.layout(), max_bytes)
    reader = StreamReader(weights, device)
    workspace = Workspace()  # output and scratch buffers, reused tensor after tensor
    try:
        with torch.no_grad():
            for i, task in enumerate(plan.tasks):
                out = compute_tensor(task, plan.method, reader, seed, workspace)
                writer.write(task.name, cast(out, task.dtype, workspace))
                del out
                if progress:
                    progress(i + 1, len(plan.tasks), task.name)
        reader.begin()  # drop the last task's tensors
    except BaseException:
        writer.abort()
        raise
    finally:
        workspace.clear()
    return writer.close()


def write_extras(plan: MergePlan, weights: Mapping[str, ModelWeights], folder: Path, *,
                 name: str = "merged-model", seed: int | None = None, path: str | None = None) -> list[str]:
    """config.json, tokenizer, model card and the recipe, next to the tensors."""
    write_config(weights[plan.config_donor].folder, folder, updates=plan.config_updates)
    files = ["config.json"]
    files += copy_tokenizer(weights[plan.tokenizer_donor].folder, folder)
    if plan.tokenizer_donor != plan.config_donor:
        copy_generation_config(weights[plan.tokenizer_donor].folder, folder)
    (folder / RECIPE_FILE).write_text(plan.recipe.to_yaml(), encoding="utf-8")
    extra = {"seed": seed} if seed is not None and plan.method.random else {}
    hub_ids = list(dict.fromkeys(part for ref in weights for part in ref.split("+")
                                 if not _is_local(part, plan.recipe)))
    card = render_model_card(plan.recipe, name, description=plan.method.description,
                             reference_url=getattr(plan.method, "reference_url", ""),
                             hub_ids=hub_ids, extra=extra, path=path)
    (folder / CARD_FILE).write_text(card, encoding="utf-8")
    return files + [RECIPE_FILE, CARD_FILE]


def _is_local(part: str, recipe: Recipe) -> bool:
    """Whether a model reference (one side of ``model+adapter``) names a local folder."""
    roots = [recipe.source_dir, Path.cwd()] if recipe.source_dir else [Path.cwd()]
    return any((root / Path(part).expanduser()).is_dir() for root in roots)
