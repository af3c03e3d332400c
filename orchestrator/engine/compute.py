"""Engine: run a merge plan, streaming to disk or into a resident model.

Both paths share ``compute_tensor``: inputs are read (or taken from a cache) in float32 on
the compute device, task vectors are ``x - base`` in float32, random methods get a generator
seeded from ``(seed, output tensor name)`` through a stable hash, so a merge is byte-identical
whatever the order in which tensors are computed, and the in-memory merge equals the on-disk
one bit for bit.

Streaming reads one tensor from each input, merges, writes and drops it. Float32 safetensors
inputs are memory-mapped views (page cache, not the process's own memory), and task-vector
methods compute ``x - base`` a slice at a time inside the merge (``merge.task_arithmetic.
merge_models``) instead of holding every task vector: peak memory is about the largest tensor
(times a small factor for methods with scratch: TIES' magnitude ranks, DARE's masks), not the
model size or the number of inputs. Output and scratch buffers come from a ``Workspace``
reused tensor after tensor (and merge after merge in memory): fresh memory costs a page fault
per page on first touch, as much as the merge arithmetic itself on a VM.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orchestrator.errors import UserError
from orchestrator.merge.chunks import Workspace
from orchestrator.merge.seeding import make_generator
from orchestrator.modelcard import render_model_card
from orchestrator.plan import (
    MergePlan,
    TensorRef,
    TensorTask,
    VocabAlign,
    build_plan,
    check_recipe,
)
from orchestrator.recipe import Recipe
from orchestrator.weights import (
    ModelWeights,
    ShardedWriter,
    check_output_dir,
    copy_tokenizer,
    folder_bytes,
    parse_size,
    resolve_model_path,
    staged_output,
    write_config,
)

RECIPE_FILE = "mergekit_config.yml"
CARD_FILE = "README.md"


# -- setup -----------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"``; UserError if CUDA is asked for but absent."""
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} requested but CUDA is not available "
                        f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {device} requested but only {torch.cuda.device_count()} "
                        "CUDA device(s) exist")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device must be cpu or cuda, got {device!r}")
    return dev


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
        _close(opened)
        raise
    return opened


def resolve_reference(ref: str, source_dir: Path | None = None) -> tuple[Path, Path | None]:
    """A model reference -> ``(folder, None)``, or ``(model folder, adapter folder)`` for
    ``model+adapter`` (checked: the model is no adapter, the adapter is one).

    A plain reference may itself name an adapter folder; the caller decides what base it goes on.
    """
    from orchestrator.lora import is_adapter_folder

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
    from orchestrator.lora import BakedWeights, is_adapter_folder, load_adapter

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
    from orchestrator.recipe import load_recipe

    return load_recipe(recipe)


# -- readers ---------------------------------------------------------------------------------
class StreamReader:
    """Reads tensors on demand; keeps only the current task's base tensor.

    ``fused``: task-vector methods get the models' own tensors and subtract the base a slice at
    a time (``merge_models``) instead of receiving whole task vectors.
    """

    fused = True

    def __init__(self, weights: Mapping[str, ModelWeights], device: torch.device):
        self.weights = weights
        self.device = device
        self._memo: dict[TensorRef, torch.Tensor] = {}

    def begin(self, task: TensorTask | None = None) -> None:
        """Forget the previous task's tensors; align this task's vocabulary rows if needed."""
        self._memo.clear()
        if task is not None and task.align is not None:
            self._align(task)

    def _align(self, task: TensorTask) -> None:
        refs = [*task.inputs, *([task.base] if task.base else [])]
        if all(ref in self._memo for ref in refs):
            return
        self._memo.update(align_rows({ref: self._read(ref) for ref in refs}, task.align))

    def raw(self, ref: TensorRef) -> torch.Tensor:
        """The tensor as stored (dtype and device untouched)."""
        return self.weights[ref.model].get(ref.name)

    def stored(self, ref: TensorRef) -> torch.Tensor:
        """This task's aligned float32 tensor, else the tensor as stored, on the device.

        No float32 copy is made: a float32 safetensors tensor on CPU is a view of the mapped
        file (read-only use only).
        """
        x = self._memo.get(ref)
        return x if x is not None else self.weights[ref.model].get(ref.name, device=self.device)

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        """The tensor in float32 on the device (kept for the current task)."""
        if ref not in self._memo:
            self._memo[ref] = self._read(ref)
        return self._memo[ref]

    def delta(self, ref: TensorRef, base: TensorRef) -> torch.Tensor:
        """The task vector ``ref - base`` in float32."""
        return self._source(ref) - self.tensor(base)

    def _source(self, ref: TensorRef) -> torch.Tensor:
        """The (aligned) tensor if this task prepared one, else a fresh read that is not kept."""
        x = self._memo.get(ref)
        return self._read(ref) if x is None else x

    def _read(self, ref: TensorRef) -> torch.Tensor:
        return self.weights[ref.model].get(ref.name, device=self.device, dtype=torch.float32)


class CachedReader(StreamReader):
    """Keeps every tensor and task vector it computed (float32, on the device) across tasks."""

    fused = False  # the cached task vectors are what makes repeated merges cheap

    def __init__(self, weights: Mapping[str, ModelWeights], device: torch.device):
        super().__init__(weights, device)
        self._deltas: dict[tuple[TensorRef, TensorRef], torch.Tensor] = {}

    def begin(self, task: TensorTask | None = None) -> None:
        """Align this task's vocabulary rows if needed (the cache outlives tasks)."""
        if task is not None and task.align is not None:
            self._align(task)

    def delta(self, ref: TensorRef, base: TensorRef) -> torch.Tensor:
        """The task vector ``ref - base``, computed once."""
        key = (ref, base)
        if key not in self._deltas:
            # Same op on the same values as StreamReader: results stay bit-identical.
            self._deltas[key] = self._source(ref) - self.tensor(base)
        return self._deltas[key]

    def cached(self, refs) -> list[torch.Tensor]:
        """The tensors and task vectors held for ``refs`` (what a merge of them reads)."""
        wanted = set(refs)
        return [*(t for r, t in self._memo.items() if r in wanted),
                *(t for (r, b), t in self._deltas.items() if r in wanted or b in wanted)]

    def cache_bytes(self) -> int:
        """Bytes held (float32 inputs on CPU may be views of the memory-mapped files)."""
        return sum(t.numel() * t.element_size()
                   for t in [*self._memo.values(), *self._deltas.values()])

    def clear(self) -> None:
        """Drop every cached tensor."""
        self._memo.clear()
        self._deltas.clear()


def compute_tensor(task: TensorTask, method, reader: StreamReader, seed: int,
                   workspace: Workspace | None = None, *,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Merge one output tensor in float32 (non-float tensors are copied as stored).

    With a ``workspace`` the result may live in it (valid until the next call with the same
    workspace) and the method's scratch memory is reused from call to call. ``out`` (float32,
    contiguous, the task's shape, sharing no memory with any input) is written into and
    returned when the method accepts one.
    """
    reader.begin(task)
    if not task.merge:
        return reader.raw(task.inputs[0])
    gen = make_generator(seed, task.name, reader.device) if method.random else None
    fused = method.fused if reader.fused and task.base is not None else None
    extra: dict[str, Any] = {}
    accepted = method.keywords
    if "out" in accepted and out is not None:
        extra["out"] = out
    elif "out" in accepted and workspace is not None:
        extra["out"] = workspace.get("out", math.prod(task.shape), torch.float32,
                                     reader.device).view(task.shape)
    if "workspace" in accepted and workspace is not None:
        extra["workspace"] = workspace
    try:
        if fused:  # base + merged delta, task vectors computed per slice (same bits)
            xs = [reader.stored(ref) for ref in task.inputs]
            merged = fused(xs, reader.stored(task.base), task.model_params, task.params, gen,
                           **extra)
        elif method.merges_deltas and task.base is not None:
            base = reader.tensor(task.base)
            xs = [reader.delta(ref, task.base) for ref in task.inputs]
            # The method returns a new tensor (the registry contract) or `out`: add in place.
            merged = method.fn(xs, base, task.model_params, task.params, gen, **extra).add_(base)
        else:
            base = reader.tensor(task.base) if task.base is not None else None
            xs = [reader.tensor(ref) for ref in task.inputs]
            merged = method.fn(xs, base, task.model_params, task.params, gen, **extra)
    except ValueError as err:  # methods raise ValueError for values they cannot merge with
        raise UserError(f"{' '.join(str(err).split())} (method '{method.name}', tensor "
                        f"{task.name})") from None
    if tuple(merged.shape) != task.shape:
        raise RuntimeError(f"method {method.name} returned shape {tuple(merged.shape)} for "
                           f"{task.name}, expected {task.shape}")
    return merged


def align_rows(raw: Mapping[TensorRef, torch.Tensor], align: VocabAlign) -> dict[TensorRef, torch.Tensor]:
    """Re-order each model's rows to the output vocabulary, filling rows a model lacks.

    A missing row takes the base's row when the base has the token, else the mean of the rows
    of the models that have it, else (padding rows) the donor's mean row.
    """
    gathered, present = {}, {}
    for ref, x in raw.items():
        idx = align.index[ref.model].to(x.device)
        present[ref] = (idx >= 0).unsqueeze(1)  # (rows, 1)
        gathered[ref] = x[idx.clamp(min=0)]  # (rows, *rest)
    count = sum(p.float() for p in present.values())  # (rows, 1)
    total = sum(gathered[r] * present[r] for r in raw)  # (rows, *rest)
    donor = next((r for r in raw if r.model == align.donor), next(iter(raw)))
    fallback = torch.where(count > 0, total / count.clamp(min=1), raw[donor].mean(0, keepdim=True))
    base = next((r for r in raw if r.model == align.base), None)
    if base is not None:
        fallback = torch.where(present[base], gathered[base], fallback)
    return {ref: torch.where(present[ref], gathered[ref], fallback) for ref in raw}


# -- on disk ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergeResult:
    """What a merge to disk produced."""

    out_dir: Path
    tensors: int
    seconds: float
    bytes: int
    files: tuple[str, ...] = field(default=())


def prepare(recipe: Recipe, *, allow_pickle: bool = False) -> tuple[MergePlan, dict[str, ModelWeights]]:
    """Validate a recipe fully (static checks, then headers) and build its plan."""
    check_recipe(recipe)  # before any path is resolved or downloaded
    weights = open_models(recipe, allow_pickle=allow_pickle)
    try:
        return build_plan(recipe, weights), weights
    except BaseException:
        _close(weights)
        raise


def _close(weights: Mapping[str, ModelWeights]) -> None:
    for w in weights.values():
        w.close()


def merge_to_disk(recipe: Recipe | Mapping[str, Any], out_dir: str | Path, *, seed: int = 0,
                  device: str | torch.device = "cpu", allow_pickle: bool = False,
                  shard_size: str | int = "5GB", overwrite: bool = False,
                  progress: Callable[[int, int, str], None] | None = None) -> MergeResult:
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
            files += write_extras(plan, weights, stage, name=Path(out_dir).name, seed=seed)
    finally:
        _close(weights)
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


def cast(out: torch.Tensor, dtype: torch.dtype, workspace: Workspace | None = None) -> torch.Tensor:
    """``out.to(dtype)``, into a reused workspace buffer when converting."""
    if out.dtype == dtype or workspace is None:
        return out.to(dtype)
    buf = workspace.get(f"cast_{dtype}", out.numel(), dtype, out.device)
    return buf.view(out.shape).copy_(out)


def write_extras(plan: MergePlan, weights: Mapping[str, ModelWeights], folder: Path, *,
                 name: str = "merged-model", seed: int | None = None) -> list[str]:
    """config.json, tokenizer, model card and the recipe, next to the tensors."""
    write_config(weights[plan.config_donor].folder, folder, updates=plan.config_updates)
    files = ["config.json"]
    files += copy_tokenizer(weights[plan.tokenizer_donor].folder, folder)
    (folder / RECIPE_FILE).write_text(plan.recipe.to_yaml(), encoding="utf-8")
    extra = {"seed": seed} if seed is not None and plan.method.random else {}
    hub_ids = list(dict.fromkeys(part for ref in weights for part in ref.split("+")
                                 if not _is_local(part, plan.recipe)))
    card = render_model_card(plan.recipe, name, description=plan.method.description,
                             reference_url=getattr(plan.method, "reference_url", ""),
                             hub_ids=hub_ids, extra=extra)
    (folder / CARD_FILE).write_text(card, encoding="utf-8")
    return files + [RECIPE_FILE, CARD_FILE]


def _is_local(part: str, recipe: Recipe) -> bool:
    """Whether a model reference (one side of ``model+adapter``) names a local folder."""
    roots = [recipe.source_dir, Path.cwd()] if recipe.source_dir else [Path.cwd()]
    return any((root / Path(part).expanduser()).is_dir() for root in roots)


# -- in memory ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergeStats:
    """What one in-memory merge did."""

    tensors: int
    seconds: float
    cache_bytes: int


class InMemoryMerger:
    """Merges into a resident model's parameters, caching inputs across merges.

    Source tensors and task vectors are read and computed once (float32, on ``device``) and
    reused by every later merge with the same model set, so a sweep trial costs only the
    merge math. Merged values are written with ``param.copy_`` under ``no_grad``: parameter
    objects (and tied weights) stay the same, so a wrapper around the model (lm-eval's HFLM)
    keeps working.

    Args:
        recipe: the template recipe (Recipe, dict or YAML path); it fixes the model set.
        model: the resident model (may also be given per call).
        device: where to cache and compute; defaults to the model's device, else cpu.
        seed: default seed for random methods.
        allow_pickle: accept ``pytorch_model.bin`` inputs.

    Memory: the cache holds each model's tensors once and, for task-vector methods, each
    task vector once: up to about (2 x models) x model size in float32 on ``device``.
    """

    def __init__(self, recipe: Recipe | Mapping[str, Any] | str | Path,
                 model: torch.nn.Module | None = None, *, device: str | torch.device | None = None,
                 seed: int = 0, allow_pickle: bool = False):
        self.template = as_recipe(recipe)
        check_recipe(self.template)
        if device is None and model is not None:
            device = next(model.parameters()).device
        self.device = resolve_device(device)
        self.model = model
        self.seed = seed
        self.weights = open_models(self.template, allow_pickle=allow_pickle)
        self._reader = CachedReader(self.weights, self.device)
        self._workspace = Workspace()  # output and scratch buffers, reused across merges
        self.plan(self.template)  # validate the template against the headers now

    def plan(self, recipe: Recipe | Mapping[str, Any] | None = None) -> MergePlan:
        """Validate a recipe over this merger's model set and build its plan."""
        recipe = self.template if recipe is None else as_recipe(recipe, self.template.source_dir)
        unknown = [m for m in recipe.referenced_models() if m not in self.weights]
        if unknown:
            raise UserError(f"recipe uses model(s) outside this merger's set: {', '.join(unknown)}"
                            f" (set: {', '.join(self.weights)})")
        return build_plan(recipe, self.weights)

    def merge_into(self, recipe: Recipe | Mapping[str, Any] | None = None,
                   model: torch.nn.Module | None = None, *, seed: int | None = None) -> MergeStats:
        """Merge ``recipe`` (default: the template) into ``model``'s parameters in place."""
        start = time.perf_counter()
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("merge_into needs a model (here or in the constructor)")
        plan = self.plan(recipe)
        targets = _targets(model, plan)
        seed = self.seed if seed is None else seed
        done: set[int] = set()
        with torch.no_grad():
            for task in plan.tasks:
                param = targets[task.name]
                if id(param) in done:  # tied weights: written once
                    continue
                direct = _writable_target(param, task, self._reader)
                out = compute_tensor(task, plan.method, self._reader, seed, self._workspace,
                                     out=direct)
                if direct is None or out is not direct:
                    # Round through the output dtype first, as a merge saved to disk would
                    # (copy_ then converts to the parameter's dtype).
                    param.copy_(cast(out, task.dtype, self._workspace))
                done.add(id(param))
        return MergeStats(len(done), time.perf_counter() - start, self._reader.cache_bytes())

    def cache_bytes(self) -> int:
        """Bytes held by the tensor and task-vector cache."""
        return self._reader.cache_bytes()

    def close(self) -> None:
        """Drop the cache, the scratch buffers and the file handles."""
        self._reader.clear()
        self._workspace.clear()
        _close(self.weights)


def _writable_target(param: torch.Tensor, task: TensorTask,
                     reader: CachedReader) -> torch.Tensor | None:
    """``param.data`` when the merge can be computed straight into it, else ``None``.

    That needs float32 output and parameter (no rounding step in between), a contiguous
    parameter on the compute device, and no memory shared with the task's inputs (a
    parameter that is a view of a cached source tensor must not be overwritten mid-merge).
    """
    if not (task.merge and task.dtype == torch.float32 and param.dtype == torch.float32
            and param.is_contiguous() and param.device == reader.device):
        return None
    refs = [*task.inputs, *([task.base] if task.base is not None else [])]
    storage = param.untyped_storage()
    lo, hi = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    for x in reader.cached(refs):
        s = x.untyped_storage()
        if s.data_ptr() < hi and lo < s.data_ptr() + s.nbytes():
            return None
    return param.data


def _targets(model: torch.nn.Module, plan: MergePlan) -> dict[str, torch.Tensor]:
    """Output tensor name -> the model's parameter/buffer; UserError on any mismatch."""
    state = model.state_dict(keep_vars=True)
    targets = {}
    for task in plan.tasks:
        if task.name not in state:
            raise UserError(f"the resident model has no parameter {task.name} (the merge output "
                            "has another architecture, e.g. a different layer count)")
        target = state[task.name]
        if tuple(target.shape) != task.shape:
            raise UserError(f"shape mismatch for {task.name}: merge gives {list(task.shape)}, "
                            f"resident model has {list(target.shape)}")
        targets[task.name] = target
    written = {id(t) for t in targets.values()}
    stale = [n for n, p in model.named_parameters() if id(p) not in written]
    if stale:
        raise UserError(f"the merge does not produce parameter(s) {', '.join(stale[:3])} of the "
                        "resident model; they would keep stale values")
    return targets
