"""Writing a model folder: sharded safetensors with an index, config, tokenizer, staging.

Outputs are written into a staging folder beside the target and renamed into place at the
end (``staged_output``), so an error never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.engine.weights import (
    CONFIG,
    EXTRA_FILES,
    SAFE_INDEX,
    SAFE_SINGLE,
    ST_NAMES,
    TOKENIZER_FILES,
    itemsize,
    numel,
    read_config,
)
from orchestrator.errors import UserError


# -- writing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Slot:
    shard: int
    start: int  # byte offset of the tensor data inside the shard's data section
    shape: tuple[int, ...]
    dtype: torch.dtype


class ShardedWriter:
    """Streams tensors into safetensors shards whose layout is fixed up front.

    Each shard's header is written when the writer opens; ``write`` then puts a tensor's
    bytes at its offset, in any order. Memory use is one tensor, not one shard.

    Args:
        folder: an existing (staging) folder to write into.
        layout: ``(name, shape, dtype)`` of every tensor, in the order to store them.
        max_shard_bytes: a new shard starts when the next tensor would exceed this.
    """

    def __init__(self, folder: Path, layout: Sequence[tuple[str, Sequence[int], torch.dtype]],
                 max_shard_bytes: int):
        self.folder = Path(folder)
        shards = self._assign(layout, max_shard_bytes)
        self.files = self._file_names(len(shards))
        self.slots: dict[str, _Slot] = {}
        self._data_start: list[int] = []
        self._written: set[str] = set()
        self._fds: list[Any] = []
        self.total_bytes = 0
        for index, entries in enumerate(shards):
            self._open_shard(index, entries)

    @staticmethod
    def _assign(layout, max_bytes: int) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
        shards: list[list] = [[]]
        size = 0
        for name, shape, dtype in layout:
            nbytes = numel(shape) * itemsize(dtype)
            if shards[-1] and size + nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(int(d) for d in shape), dtype))
            size += nbytes
        return shards

    @staticmethod
    def _file_names(count: int) -> list[str]:
        if count == 1:
            return [SAFE_SINGLE]
        return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]

    def _open_shard(self, index: int, entries) -> None:
        # Largest element size first keeps every tensor aligned to its dtype (as safetensors does).
        entries = sorted(entries, key=lambda e: -itemsize(e[2]))
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in entries:
            if dtype not in ST_NAMES:
                raise UserError(f"cannot store tensor {name} as {dtype}")
            end = offset + numel(shape) * itemsize(dtype)
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, end]}
            self.slots[name] = _Slot(index, offset, shape, dtype)
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # pad so the data section starts 8-byte aligned
        fd = open(self.folder / self.files[index], "wb")
        fd.write(struct.pack("<Q", len(raw)) + raw)
        fd.truncate(8 + len(raw) + offset)  # sized up front; sparse until written
        self._fds.append(fd)
        self._data_start.append(8 + len(raw))
        self.total_bytes += offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Store one tensor at its slot (its shape and dtype must match the layout)."""
        slot = self.slots[name]
        if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, layout says "
                             f"{slot.shape} {slot.dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        fd = self._fds[slot.shard]
        fd.seek(self._data_start[slot.shard] + slot.start)
        fd.write(memoryview(data))
        self._written.add(name)

    def close(self) -> list[str]:
        """Flush, check every tensor was written, write the index; returns the file names."""
        for fd in self._fds:
            fd.close()
        self._fds = []
        missing = set(self.slots) - self._written
        if missing:
            raise RuntimeError(f"{len(missing)} tensors never written, e.g. {sorted(missing)[0]}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {n: self.files[s.shard] for n, s in self.slots.items()}}
            (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return list(self.files) + ([SAFE_INDEX] if len(self.files) > 1 else [])

    def abort(self) -> None:
        """Close file handles without checks (the staging folder is deleted anyway)."""
        for fd in self._fds:
            fd.close()
        self._fds = []


def save_state_dict(tensors: Mapping[str, torch.Tensor], folder: Path,
                    max_shard_bytes: int = 5 * 10**9) -> list[str]:
    """Write a whole state dict with ``ShardedWriter`` (for tests and small tools)."""
    writer = ShardedWriter(folder, [(n, t.shape, t.dtype) for n, t in tensors.items()],
                           max_shard_bytes)
    try:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


# -- output folder ----------------------------------------------------------------------
def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """UserError if ``out_dir`` exists with content and ``overwrite`` is off."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"output folder {out_dir} exists and is not empty; pass --overwrite "
                        "to replace it")


@contextmanager
def staged_output(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder beside ``out_dir``; move it into place only on success.

    On any error the staging folder is deleted and ``out_dir`` is left as it was, so a
    failed merge never leaves a half-written model behind.
    """
    out_dir = Path(out_dir).absolute()
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
        _replace_dir(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _replace_dir(stage: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(stage, out_dir)
        return
    # Move the old folder aside first so that a crash never leaves neither in place.
    trash = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out_dir, trash)
    os.replace(stage, out_dir)
    shutil.rmtree(trash, ignore_errors=True)


def write_config(src_folder: Path, out_folder: Path, *, updates: Mapping[str, Any]) -> None:
    """Copy config.json (plus generation_config.json) with ``updates`` applied.

    A ``None`` value in ``updates`` deletes the key.
    """
    config = read_config(src_folder)
    for key, value in updates.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (Path(out_folder) / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in EXTRA_FILES:
        if (Path(src_folder) / name).is_file():
            shutil.copy2(Path(src_folder) / name, Path(out_folder) / name)


def copy_tokenizer(src_folder: Path, out_folder: Path) -> list[str]:
    """Copy the tokenizer files present in ``src_folder``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src_folder) / name).is_file():
            shutil.copy2(Path(src_folder) / name, Path(out_folder) / name)
            copied.append(name)
    return copied


def copy_generation_config(src_folder: Path, out_folder: Path) -> list[str]:
    """Copy ``generation_config.json`` from the tokenizer donor when it has one.

    The EOS ids and chat defaults belong with the tokenizer (an instruct model's, with
    ``tokenizer_source``), not with the config donor (often the base model).
    """
    if not (Path(src_folder) / EXTRA_FILES[0]).is_file():
        return []
    shutil.copy2(Path(src_folder) / EXTRA_FILES[0], Path(out_folder) / EXTRA_FILES[0])
    return [EXTRA_FILES[0]]
