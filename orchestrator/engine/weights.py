"""Weights I/O: the only code that touches model files.

Reading is lazy: safetensors files are memory-mapped with ``safe_open`` and a tensor is
materialised only when asked for, so names, shapes and dtypes cost a header read. Writing
streams: the layout of every shard (names, shapes, dtypes, offsets) is fixed up front from
the merge plan, each shard's header is written first and every tensor is written to its
offset as soon as it is computed, so no shard is ever buffered in memory. Everything is
written into a staging folder beside the output and renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.errors import UserError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
CONFIG = "config.json"
# Files that make up a tokenizer across tokenizer families (copied when present).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt",
    "merges.txt", "chat_template.jinja", "chat_template.json",
)
EXTRA_FILES = ("generation_config.json",)

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape, dtype and file of one stored tensor (read from headers only)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data."""
        return numel(self.shape) * itemsize(self.dtype)


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dtype_from_name(name: str, where: str = "dtype") -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; UserError naming the valid choices."""
    if name not in DTYPE_NAMES:
        raise UserError(f"{where} must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return DTYPE_NAMES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (as written in config.json)."""
    return str(dtype).removeprefix("torch.")


def parse_size(text: str | int) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"2GiB"`` / ``1000`` -> bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    raw = str(text).strip().upper().replace(" ", "")
    number = raw.rstrip("KMGTIB")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise UserError(f"size must look like 5GB, 500MB or 2GiB, got {text!r}")
    return int(value * units[unit])


def is_model_folder(path: Path) -> bool:
    """Whether ``path`` holds a config.json and some weights."""
    return (path / CONFIG).is_file() and bool(_weight_files(path))


def _weight_files(folder: Path) -> list[str]:
    """Names of the weight entry points present (index, single file or shards)."""
    found = [n for n in (SAFE_INDEX, SAFE_SINGLE, BIN_INDEX, BIN_SINGLE) if (folder / n).is_file()]
    return found or sorted(p.name for p in folder.glob("model-*.safetensors"))


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json as a dict (UserError if missing or malformed)."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise UserError(f"{folder} is not a model folder: it has no {CONFIG}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


class ModelWeights:
    """Lazy, read-only access to one model folder's weights.

    Args:
        folder: a Hugging Face model folder (config.json plus safetensors, single or sharded).
        allow_pickle: also accept ``pytorch_model.bin`` checkpoints, loaded with
            ``torch.load(weights_only=True)``; refused otherwise, as pickles can run code.
    """

    def __init__(self, folder: str | Path, *, allow_pickle: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"model folder not found: {self.folder}")
        self.config = read_config(self.folder)
        self.allow_pickle = allow_pickle
        self._handles: dict[Path, Any] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self.infos: dict[str, TensorInfo] = self._scan()

    # -- discovery ----------------------------------------------------------------------
    def _scan(self) -> dict[str, TensorInfo]:
        files = _weight_files(self.folder)
        if not files:
            raise UserError(f"{self.folder} is not a model folder: no {SAFE_SINGLE}, "
                            f"{SAFE_INDEX} or {BIN_SINGLE} in it")
        if SAFE_INDEX in files:
            return self._scan_files(self._index_files(SAFE_INDEX), self._safetensors_infos)
        if SAFE_SINGLE in files or files[0].endswith(".safetensors"):
            names = [SAFE_SINGLE] if SAFE_SINGLE in files else files
            return self._scan_files([self.folder / n for n in names], self._safetensors_infos)
        if not self.allow_pickle:
            raise UserError(f"{self.folder} has only pickle weights ({files[0]}); pickles can "
                            "run code when loaded: convert to safetensors or pass --allow-pickle")
        shards = self._index_files(BIN_INDEX) if BIN_INDEX in files else [self.folder / BIN_SINGLE]
        return self._scan_files(shards, self._pickle_infos)

    def _index_files(self, index_name: str) -> list[Path]:
        path = self.folder / index_name
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
            shards = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"cannot read shard index {path}: {err!r}") from None
        missing = [s for s in shards if not (self.folder / s).is_file()]
        if missing:
            raise UserError(f"shard index {path} lists missing file(s): {', '.join(missing)}")
        return [self.folder / s for s in shards]

    @staticmethod
    def _scan_files(files: Iterable[Path], scan) -> dict[str, TensorInfo]:
        infos: dict[str, TensorInfo] = {}
        for file in files:
            for info in scan(file):
                infos.setdefault(info.name, info)
        return infos

    def _safetensors_infos(self, file: Path) -> list[TensorInfo]:
        handle = self._handle(file)
        out = []
        for name in handle.keys():
            sl = handle.get_slice(name)
            dtype = ST_DTYPES.get(sl.get_dtype())
            if dtype is None:
                raise UserError(f"{file}: tensor {name} has unsupported dtype {sl.get_dtype()}")
            out.append(TensorInfo(name, tuple(sl.get_shape()), dtype, file))
        return out

    def _pickle_infos(self, file: Path) -> list[TensorInfo]:
        state = self._unpickle(file)
        return [TensorInfo(n, tuple(t.shape), t.dtype, file) for n, t in state.items()]

    def _handle(self, file: Path):
        if file not in self._handles:
            from safetensors import SafetensorError, safe_open

            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError) as err:
                raise UserError(f"cannot read {file}: corrupt or truncated safetensors "
                                f"file ({err})") from None
        return self._handles[file]

    def _unpickle(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._pickled:
            try:
                # mmap keeps tensor data on disk until used; weights_only refuses code.
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # torch raises many types for a bad pickle
                raise UserError(f"cannot read {file}: {type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''}") from None
            if not isinstance(state, Mapping):
                raise UserError(f"{file} does not hold a state dict")
            self._pickled[file] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        return self._pickled[file]

    # -- access ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names, in file order."""
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def info(self, name: str) -> TensorInfo:
        """Header facts about one tensor (no data read)."""
        try:
            return self.infos[name]
        except KeyError:
            raise UserError(f"tensor {name} not found in {self.folder}") from None

    def get(self, name: str, *, device: str | torch.device | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor (only its bytes), optionally moved and cast."""
        info = self.info(name)
        if info.file.suffix == ".safetensors":
            from safetensors import SafetensorError

            try:
                tensor = self._handle(info.file).get_tensor(name)
            except (SafetensorError, OSError) as err:
                raise UserError(f"cannot read tensor {name} from {info.file}: {err}") from None
        else:
            tensor = self._unpickle(info.file)[name]
        if device is not None or dtype is not None:
            tensor = tensor.to(device=device, dtype=dtype)
        return tensor

    def nbytes(self) -> int:
        """Total bytes of all tensors (from headers)."""
        return sum(i.nbytes for i in self.infos.values())

    def close(self) -> None:
        """Drop file handles and mappings."""
        self._handles.clear()
        self._pickled.clear()

    def __enter__(self) -> ModelWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- model references -----------------------------------------------------------------------
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_model_path(ref: str, source_dir: Path | None = None) -> Path:
    """A model reference -> local folder.

    Relative paths resolve against the recipe's folder, then the working directory. A
    reference that is no local folder but looks like a Hub id (``org/name[@revision]``) is
    downloaded with ``huggingface_hub.snapshot_download``; with the Hub offline it is taken
    from the Hugging Face cache when it is there.
    """
    expanded = Path(os.path.expanduser(ref))
    candidates = [expanded] if expanded.is_absolute() else (
        ([source_dir / expanded] if source_dir else []) + [Path.cwd() / expanded])
    for candidate in candidates:
        if candidate.exists():
            if not candidate.is_dir():
                raise UserError(f"model '{ref}' is not a model folder: {candidate} is a file")
            return candidate.resolve()
    looked = " and ".join(str(c) for c in candidates)
    if expanded.is_absolute() or ref.startswith(".") or not HUB_ID.match(ref):
        raise UserError(f"model '{ref}' not found: no folder at {looked}")
    if _offline():
        cached = _cached_snapshot(ref)
        if cached is not None:
            return cached
        raise UserError(f"model '{ref}' is not a local folder ({looked}) nor in the Hugging Face "
                        "cache, and the Hub is offline (HF_HUB_OFFLINE=1); download it first or set "
                        "HF_HUB_OFFLINE=0")
    return _download(ref)


def _cached_snapshot(ref: str) -> Path | None:
    """The Hugging Face cache's snapshot of a Hub id (``org/name[@revision]``), if it has one."""
    from huggingface_hub import snapshot_download

    repo, _, revision = ref.partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or a broken cache entry): the caller says so
        return None


def _download(ref: str) -> Path:
    from huggingface_hub import snapshot_download

    repo, _, revision = ref.partition("@")
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=patterns))
    except Exception as err:  # network, auth and not-found errors all end the same way
        raise UserError(f"cannot download model '{ref}' from the Hub: "
                        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                        ) from None


def read_vocab(folder: Path) -> dict[str, int]:
    """The tokenizer's vocabulary (token -> id, added tokens included) of a model folder."""
    from transformers import AutoTokenizer

    try:
        return dict(AutoTokenizer.from_pretrained(str(folder)).get_vocab())
    except Exception as err:  # missing files, unknown tokenizer classes, bad JSON...
        raise UserError(f"cannot load the tokenizer of {folder} (needed to align vocabularies "
                        f"for tokenizer_source): {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from None


def folder_bytes(folder: Path) -> int:
    """Total size of the files in ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
