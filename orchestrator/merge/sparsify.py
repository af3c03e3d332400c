"""Sparsification of task vectors: which entries of a delta survive, and how they are rescaled.

Four methods, named as in mergekit (``mergekit/sparsify.py``), all keeping ``delta`` whole when
``density >= 1``:

* ``magnitude`` (TIES): keep the ``k = max(1, int(density * n))`` largest ``|delta|``.
* ``random`` (DARE): keep each entry with probability ``density``.
* ``magnitude_outliers`` (Model Breadcrumbs): drop the ``int(gamma * n)`` largest ``|delta|``
  and then the smallest, keeping ``int(density * n)`` entries (possibly none, as mergekit).
* ``della_magprune`` (DELLA): keep each entry with a probability that grows with its magnitude
  rank in its row, from ``density - epsilon`` to ``density + epsilon``.

Magnitude pruning selects by rank without a full sort and keeps exactly the requested count,
ties broken by position (``selection.py``). Random draws come only from the ``generator``
passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from orchestrator.merge import chunks
from orchestrator.merge.selection import (
    SAMPLE,
    Window,
    nth_equal,
    rank_window,
    row_order,
    window_from,
    window_of,
)

Sparsification = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]
RescaleMode = Literal["l1", "density"]

_L1_EPS = 1e-7  # mergekit: no L1 rescale when either norm is below this


def magnitude(delta: Tensor, model: Any, generator: torch.Generator | None, out: Tensor) -> float:
    """Mask (into ``out``) the ``max(1, int(density * n))`` largest ``|delta|``."""
    n = delta.numel()
    k = max(1, int(model.density * n))
    torch.abs(delta, out=out)
    rank_window(out, delta, n - k, n)
    return model.density


def magnitude_outliers(delta: Tensor, model: Any, generator: torch.Generator | None,
                       out: Tensor) -> float:
    """Mask (into ``out``) ``int(density * n)`` entries below the ``int(gamma * n)`` largest.

    Ranks ``[n_bot, n_bot + target)`` in ascending ``|delta|``, as mergekit 0.1.5's
    ``magnitude_outliers``; when ``gamma`` leaves too few entries, fewer outliers are dropped.
    (mergekit <= 0.1.4 sliced ``[n_bot:-n_top]``, empty when ``n_top == 0``, so gamma=0 or
    tensors under ``1/gamma`` entries lost their whole task vector; we keep the band.)
    """
    n = delta.numel()
    target, n_top = int(model.density * n), int(model.gamma * n)
    n_bot = max(0, n - target - n_top)
    torch.abs(delta, out=out)
    rank_window(out, delta, n_bot, n_bot + target)
    return model.density


def bernoulli(delta: Tensor, model: Any, generator: torch.Generator | None, out: Tensor) -> float:
    """Mask (into ``out``) each entry with probability ``density`` (DARE's Bernoulli drop)."""
    out.uniform_(generator=_required(generator)).lt_(model.density)
    return model.density


def della_magprune(delta: Tensor, model: Any, generator: torch.Generator | None,
                   out: Tensor) -> Tensor:
    """Mask (into ``out``) entries with rank-dependent probabilities; returns them.

    Ranks run along dim 1 (a matrix's rows; a vector is one row): the smallest ``|delta|`` is
    kept with probability ``density - epsilon``, the largest with ``density + epsilon``,
    linearly in rank between. Equal magnitudes rank by position (a stable sort; mergekit's
    order among them is its unstable sort's). A row of one entry uses ``density`` (mergekit
    computes 0/0 there and torch.bernoulli raises).
    """
    mags = delta.abs() if delta.dim() > 1 else delta.abs().unsqueeze(0)  # (r, c, ...)
    n = mags.shape[1]
    order = row_order(mags)  # (r, c, ...) ascending, ties by position (a stable sort)
    steps = torch.arange(n, dtype=mags.dtype, device=mags.device)
    steps = steps.view(1, n, *([1] * (mags.dim() - 2))).expand_as(order)
    probs = mags.scatter_(1, order, steps)  # (r, c, ...) rank 0..n-1 of each entry
    if n > 1:  # p = density - epsilon + 2 epsilon rank / (n - 1)
        probs.mul_(2 * model.epsilon / (n - 1)).add_(model.density - model.epsilon)
    else:
        probs.fill_(model.density)
    probs = probs.view(delta.shape)
    out.uniform_(generator=_required(generator)).lt_(probs)
    return probs


MASKS: dict[str, Callable[[Tensor, Any, torch.Generator | None, Tensor], float | Tensor]] = {
    "magnitude": magnitude,
    "random": bernoulli,
    "magnitude_outliers": magnitude_outliers,
    "della_magprune": della_magprune,
}


def sparsify(delta: Tensor, model: Any, method: Sparsification | None, *,
             rescale: RescaleMode | None, generator: torch.Generator | None,
             out: Tensor | None = None) -> Tensor:
    """Sparsify (and rescale) one task vector.

    Args:
        delta: the task vector (float32); never modified.
        model: per-model params with ``density`` (and ``gamma`` / ``epsilon`` as the method needs).
        method: one of ``MASKS``, or ``None`` for no sparsification.
        rescale: ``None``; ``"l1"`` to match the L1 norm of ``delta`` (mergekit); or
            ``"density"`` to divide kept entries by their keep probability (DARE/DELLA papers).
        generator: the random source of ``random`` and ``della_magprune``.
        out: a float32 buffer of ``delta``'s shape to write into (allocated if ``None``).

    Returns:
        ``delta`` itself when nothing is dropped (``method`` is None or ``density >= 1``),
        else ``out`` holding the sparsified delta.
    """
    if method is None or model.density >= 1 or delta.numel() == 0:
        return delta
    if out is None:  # contiguous even when delta is a strided view
        out = torch.empty(delta.shape, dtype=torch.float32, device=delta.device)
    keep_prob = MASKS[method](delta, model, generator, out)  # out: 0/1 mask
    out.mul_(delta)  # (*shape) kept entries
    if rescale == "l1":
        before, after = (float(torch.linalg.vector_norm(t, ord=1)) for t in (delta, out))
        if before >= _L1_EPS and after >= _L1_EPS:
            out.mul_(before / after)
    elif rescale == "density":
        out.div_(keep_prob)
    return out


def _required(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        raise ValueError("this merge method is random and needs a seeded torch.Generator "
                         "(the global RNG is never used)")
    return generator


# -- chunked: task vectors read a slice at a time, sparsified without full-size temporaries ------

class TaskVectors:
    """The task vectors of one tensor, read a slice at a time.

    Either stored (``xs`` are the task vectors) or computed per slice as ``x_i - base`` from
    the models' own tensors, in float32 whatever their stored dtype, without ever holding a
    whole task vector. Both give the same bits: the subtraction is elementwise.

    Args:
        xs: the task vectors, or (with ``base``) the models' tensors; never modified.
        base: the base tensor when ``xs`` are the models' tensors.
        workspace: where scratch buffers come from (``chunks.Workspace``; default: new ones).
    """

    def __init__(self, xs: Sequence[Tensor], base: Tensor | None = None,
                 workspace: chunks.Workspace | None = None):
        self.workspace = workspace
        self.shape = xs[0].shape
        self.device = xs[0].device
        self.xs = [chunks.flat(x) for x in xs]
        self.base = None if base is None else chunks.flat(base)
        self.n = self.xs[0].numel()
        self.size = chunks.chunk_size(self.device, self.n)
        self._base_buf: Tensor | None = None
        self._base_span: tuple[int, int] | None = None

    def base_chunk(self, start: int, stop: int) -> Tensor:
        """``base[start:stop]`` in float32 (converted once per slice)."""
        b = self.base[start:stop]
        if b.dtype == torch.float32:
            return b
        if self._base_span != (start, stop):
            if self._base_buf is None:
                self._base_buf = self.scratch("base", self.size)
            self._base_buf[: stop - start].copy_(b)
            self._base_span = (start, stop)
        return self._base_buf[: stop - start]

    def scratch(self, name: str, numel: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """A buffer on this tensor's device (reused across tensors when there is a workspace)."""
        return chunks.scratch(self.workspace, name, numel, dtype, self.device)

    def buffers(self, name: str, count: int) -> list[Tensor]:
        """``count`` slice-sized float32 buffers."""
        return chunks.buffers(count, self.size, self.device, self.workspace, name)

    def read(self, j: int, start: int, stop: int, buf: Tensor) -> Tensor:
        """Task vector ``j`` on ``[start, stop)`` in float32: a read-only view when one is
        stored, else computed into ``buf``."""
        x = self.xs[j][start:stop]
        if self.base is None:
            return x if x.dtype == torch.float32 else buf[: stop - start].copy_(x)
        out = buf[: stop - start]
        if x.dtype == torch.float32:
            return torch.sub(x, self.base_chunk(start, stop), out=out)
        return out.copy_(x).sub_(self.base_chunk(start, stop))

    def sample(self, j: int, count: int) -> np.ndarray:
        """``|task vector j|`` at about ``count`` evenly spaced positions (float32, owned)."""
        step = max(1, self.n // count)
        x = self.xs[j][::step].float()
        d = x - self.base[::step].float() if self.base is not None else x.clone()
        return d.abs_().cpu().numpy()

    def whole(self, j: int) -> Tensor:
        """Task vector ``j`` whole, shaped like the tensor (a new tensor unless stored float32)."""
        if self.base is None:
            return self.xs[j].float().view(self.shape)
        out = torch.empty(self.n, dtype=torch.float32, device=self.device)
        for start, stop in chunks.spans(self.n, self.size):
            self.read(j, start, stop, out[start:stop])
        return out.view(self.shape)


class Sparsifier:
    """How one task vector is sparsified, decided over the whole tensor, applied per slice.

    ``apply(delta, out, start, tmp)`` returns the sparsified and rescaled slice: ``delta`` itself
    (read-only) when nothing changes, else ``out`` (``delta`` may alias ``out``).
    """

    def apply(self, delta: Tensor, out: Tensor, start: int, tmp: Tensor) -> Tensor:
        return delta


class _Scaled(Sparsifier):
    """Base of sparsifiers that rescale what they keep (``mul`` by an L1 ratio, ``div`` by density)."""

    scale: tuple[str, float] | None = None

    def _rescale(self, out: Tensor) -> Tensor:
        if self.scale is None:
            return out
        op, value = self.scale
        return out.mul_(value) if op == "mul" else out.div_(value)


class WindowSparsifier(_Scaled):
    """Magnitude ranks as thresholds (``selection.Window``): no mask is stored."""

    def __init__(self, window: Window):
        self.window = window

    def apply(self, delta: Tensor, out: Tensor, start: int, tmp: Tensor) -> Tensor:
        return self._rescale(self.window.apply(delta, out[: delta.numel()], start, tmp))


class MaskSparsifier(_Scaled):
    """A stored keep mask (bool, one byte per entry), e.g. DARE's random draw."""

    def __init__(self, mask: Tensor):
        self.mask = mask  # (n,) bool

    def apply(self, delta: Tensor, out: Tensor, start: int, tmp: Tensor) -> Tensor:
        n = delta.numel()
        mask = self.mask[start:start + n]
        if mask.device.type == "cpu":  # bool -> float through numpy: 2.3x faster (ops_bench)
            np.copyto(tmp[:n].numpy(), mask.numpy())
            mask = tmp[:n]
        return self._rescale(torch.mul(delta, mask, out=out[:n]))


class StoredSparsifier(Sparsifier):
    """The sparsified task vector computed whole (DELLA: per-row ranks), sliced."""

    def __init__(self, kept: Tensor):
        self.kept = chunks.flat(kept)

    def apply(self, delta: Tensor, out: Tensor, start: int, tmp: Tensor) -> Tensor:
        return self.kept[start:start + delta.numel()]


def sparsifiers(tv: TaskVectors, models: Sequence[Any], method: Sparsification | None, *,
          rescale: RescaleMode | None, generator: torch.Generator | None) -> list[Sparsifier]:
    """One sparsifier per task vector, in order (random masks are drawn model after model).

    Gives the same kept entries and random draws as ``sparsify`` on each whole task vector;
    rescale factors are the same ratios, with the L1 norms summed slice by slice.
    """
    scratch: list[Tensor] = []  # |delta| for magnitude ranks, allocated once, shared
    out = []
    for j, model in enumerate(models):
        if method is None or model.density >= 1 or tv.n == 0:
            out.append(Sparsifier())
        elif method in ("magnitude", "magnitude_outliers"):
            out.append(_window_sparsifier(tv, j, model, method, rescale, scratch))
        elif method == "random":
            out.append(_mask_sparsifier(tv, j, model, rescale, generator))
        else:  # della_magprune: ranks per row; computed whole, as sparsify does
            out.append(StoredSparsifier(sparsify(tv.whole(j), model, method, rescale=rescale,
                                           generator=generator)))
    return out


def _window_sparsifier(tv: TaskVectors, j: int, model: Any, method: str, rescale: RescaleMode | None,
                 scratch: list[Tensor]) -> Sparsifier:
    n = tv.n
    if method == "magnitude":  # the same ranks as magnitude() / magnitude_outliers()
        start, stop = n - max(1, int(model.density * n)), n
    else:
        target, n_top = int(model.density * n), int(model.gamma * n)
        start = max(0, n - target - n_top)
        stop = start + target
    if stop <= start or start >= n:
        window = Window(empty=True)
    elif start <= 0 and stop >= n:  # e.g. one entry: kept, and still rescaled like sparsify
        window = Window()
    else:
        window = _window(tv, j, start, stop, scratch)
    sparsifier = WindowSparsifier(window)
    sparsifier.scale = _l1_scale(tv, j, sparsifier) if rescale == "l1" else (
        ("div", model.density) if rescale == "density" else None)
    return sparsifier


def _window(tv: TaskVectors, j: int, start: int, stop: int, scratch: list[Tensor]) -> Window:
    (buf,) = tv.buffers("read", 1)

    def abs_chunk(a: int, b: int) -> Tensor:
        return torch.abs(tv.read(j, a, b, buf), out=buf[: b - a])

    if tv.device.type == "cpu":  # counting passes over the slices, no |delta| copy
        found = window_from(abs_chunk, tv.n, tv.size, start, stop, tv.sample(j, SAMPLE))
    else:  # accelerators: |delta| whole, then kthvalue
        if not scratch:
            scratch.append(tv.scratch("abs", tv.n))
        values = scratch[0]
        for a, b in chunks.spans(tv.n, tv.size):
            torch.abs(tv.read(j, a, b, buf), out=values[a:b])
        found = window_of(values, start, stop)
    lo, hi, drop_lo, drop_hi = found
    if hi == 0:  # only zeros are kept
        return Window(empty=True)
    lo_cut, hi_cut = -1, 1 << 62
    if lo is not None and drop_lo > 0 and lo > 0:  # ties by position: first ones drop
        lo_cut = nth_equal(abs_chunk, tv.n, tv.size, lo, drop_lo, from_end=False)
    if hi is not None and drop_hi > 0:  # last ones drop
        hi_cut = nth_equal(abs_chunk, tv.n, tv.size, hi, drop_hi, from_end=True)
    return Window(lo=None if lo == 0 else lo, hi=hi, lo_cut=lo_cut, hi_cut=hi_cut)


def _mask_sparsifier(tv: TaskVectors, j: int, model: Any, rescale: RescaleMode | None,
               generator: torch.Generator | None) -> Sparsifier:
    """DARE: keep each entry where ``uniform(0, 1) < density``, drawn slice by slice (the same
    stream as one ``uniform_`` over the whole tensor); L1 norms in the same pass."""
    gen = _required(generator)
    mask = tv.scratch(f"mask{j}", tv.n, torch.bool)
    u_buf, read_buf, abs_buf = tv.buffers("uniform", 3)
    cpu = tv.device.type == "cpu"
    density = np.float32(model.density)  # torch compares float32 with the density as float32
    before = after = 0.0
    for a, b in chunks.spans(tv.n, tv.size):
        u = u_buf[: b - a].uniform_(generator=gen)
        keep = mask[a:b]
        if cpu:  # numpy's float32 comparison: 3.9x faster than torch's into bool (ops_bench)
            np.less(u.numpy(), density, out=keep.numpy())
        else:
            torch.lt(u, model.density, out=keep)
        if rescale == "l1":  # sum |delta| and sum |delta| over kept entries
            magnitude = torch.abs(tv.read(j, a, b, read_buf), out=abs_buf[: b - a])
            before += float(magnitude.sum())
            if cpu:
                np.copyto(u.numpy(), keep.numpy())  # u becomes the 0/1 mask
            else:
                u.copy_(keep)
            after += float(torch.dot(magnitude, u))
    sparsifier = MaskSparsifier(mask)
    if rescale == "l1":
        big = before >= _L1_EPS and after >= _L1_EPS
        sparsifier.scale = ("mul", before / after) if big else None
    elif rescale == "density":
        sparsifier.scale = ("div", model.density)
    return sparsifier


def _l1_scale(tv: TaskVectors, j: int, sparsifier: Sparsifier) -> tuple[str, float] | None:
    """mergekit's L1 rescale: ``sum |delta| / sum |kept|`` (none when either is tiny)."""
    buf, kept, tmp = tv.buffers("l1_", 3)
    before = after = 0.0
    for a, b in chunks.spans(tv.n, tv.size):
        d = tv.read(j, a, b, buf)
        after += float(torch.abs(sparsifier.apply(d, kept, a, tmp), out=kept[: b - a]).sum())
        before += float(torch.abs(d, out=tmp[: b - a]).sum())
    if before >= _L1_EPS and after >= _L1_EPS:
        return ("mul", before / after)
    return None
