"""One generator per output tensor, seeded from ``(seed, tensor name)``.

A random method (DARE, DELLA) draws its masks from the generator of the tensor it merges, so a
merge is byte-identical whatever the order in which tensors are computed, whether the merge is
streamed to disk, written into a resident model, or computed on adapter updates.
"""

from __future__ import annotations

import hashlib

import torch


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed from ``(seed, tensor name)``, stable across processes and platforms."""
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def make_generator(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for one output tensor (independent of the order tensors are merged in)."""
    return torch.Generator(device=device).manual_seed(tensor_seed(seed, name))
