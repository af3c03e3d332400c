"""Chunked elementwise passes: a large tensor is processed one cache-sized slice at a time.

A merge is a handful of elementwise steps over a few inputs. Done tensor by tensor, every step
reads and writes main memory and allocates a full-size temporary (page faults included); done
one slice at a time, the temporaries are a few small buffers that stay in the CPU cache, each
input is read once and the output written once. Elementwise results do not depend on the slice
size, so chunked and whole-tensor code give the same bits; reductions (sums, norms) are
accumulated slice by slice and so depend on ``CPU_CHUNK``, which is why it is one constant.

On an accelerator the whole tensor is one chunk (kernel launches, not cache misses, cost there).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

CPU_CHUNK = 1 << 16  # elements per slice on CPU (256 KiB of float32: a few fit in L2)


def chunk_size(device: torch.device, n: int) -> int:
    """Elements per slice for a tensor of ``n`` elements on ``device`` (at least 1)."""
    return min(CPU_CHUNK, max(n, 1)) if device.type == "cpu" else max(n, 1)


def spans(n: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive slices of ``size`` elements covering ``range(n)``."""
    for start in range(0, n, size):
        yield start, min(n, start + size)


def flat(x: Tensor) -> Tensor:
    """``x`` as a 1-D tensor (a view when contiguous, else a contiguous copy)."""
    return x.reshape(-1)


def buffers(count: int, size: int, device: torch.device, workspace: Workspace | None = None,
            name: str = "chunk") -> list[Tensor]:
    """``count`` float32 scratch buffers of ``size`` elements (from ``workspace`` if given)."""
    return [scratch(workspace, f"{name}{i}", size, torch.float32, device) for i in range(count)]


def sum_into(xs: Sequence[Tensor], out: Tensor) -> Tensor:
    """``xs[0] + xs[1] + ...`` (left to right) into ``out``, which it returns."""
    out.copy_(xs[0])
    for x in xs[1:]:
        out.add_(x)
    return out


def as_float32(x: Tensor, buf: Tensor) -> Tensor:
    """``x`` itself if float32, else ``x`` converted into ``buf[:len(x)]``."""
    return x if x.dtype == torch.float32 else buf[: x.numel()].copy_(x)


class Workspace:
    """Reusable buffers by name, for a caller that merges many tensors one after another.

    Fresh memory costs a page fault per page on first touch (on a VM about as much as the
    merge arithmetic itself); a workspace hands out the same buffers again, grown only when a
    larger tensor comes, so scratch and output memory are faulted in once per merge, not once
    per tensor. A buffer is valid until the next ``get`` of the same name.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu") -> Tensor:
        """A flat buffer of ``numel`` elements (contents undefined)."""
        buf = self._buffers.get(name)
        device = torch.device(device)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or not _same_device(buf, device):
            self._buffers.pop(name, None)  # free the old one before allocating its successor
            buf = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def nbytes(self) -> int:
        """Bytes held."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        """Drop every buffer."""
        self._buffers.clear()


def scratch(workspace: Workspace | None, name: str, numel: int, dtype: torch.dtype,
            device: torch.device) -> Tensor:
    """``workspace.get(...)``, or a new tensor without a workspace."""
    if workspace is None:
        return torch.empty(numel, dtype=dtype, device=device)
    return workspace.get(name, numel, dtype, device)


def _same_device(x: Tensor, device: torch.device) -> bool:
    """Whether ``x`` is on ``device`` (``cuda`` without an index means the current one)."""
    if x.device.type != device.type:
        return False
    if device.index is None:
        return device.type == "cpu" or x.device.index == torch.cuda.current_device()
    return x.device.index == device.index
