"""One output tensor at a time: read the inputs (or take them from a cache), merge, cast.

Both the streaming merge and the resident merge call ``compute_tensor``: inputs in float32 on
the compute device, task vectors ``x - base`` in float32, and a generator per output tensor
seeded from ``(seed, tensor name)`` (``merge.seeding``), so a merge is byte-identical whatever
the order in which tensors are computed, and the in-memory merge equals the on-disk one bit
for bit. Task-vector methods with a fused variant (the registry's ``fused``) compute
``x - base`` a slice at a time instead of holding whole task vectors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from orchestrator.engine.plan import TensorRef, TensorTask, VocabAlign
from orchestrator.engine.weights import ModelWeights
from orchestrator.errors import UserError
from orchestrator.merge.chunks import Workspace
from orchestrator.merge.seeding import make_generator


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

    def refs(self) -> set[TensorRef]:
        """Every tensor reference held (inputs, and both sides of each task vector)."""
        return {*self._memo, *(r for pair in self._deltas for r in pair)}

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
        else:  # whole tensors: float32 copies, or as stored where the method converts slices
            read = reader.stored if method.any_dtype and reader.fused else reader.tensor
            base = read(task.base) if task.base is not None else None
            xs = [read(ref) for ref in task.inputs]
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


def cast(out: torch.Tensor, dtype: torch.dtype, workspace: Workspace | None = None) -> torch.Tensor:
    """``out.to(dtype)``, into a reused workspace buffer when converting."""
    if out.dtype == dtype or workspace is None:
        return out.to(dtype)
    buf = workspace.get(f"cast_{dtype}", out.numel(), dtype, out.device)
    return buf.view(out.shape).copy_(out)
