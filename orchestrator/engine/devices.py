"""Where merges and evaluations compute: ``cpu``, ``cuda`` or ``cuda:N``, checked in one place."""

from __future__ import annotations

import re

import torch

from orchestrator.errors import UserError

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_device_name(device: str) -> None:
    """Raise UserError unless ``device`` is ``cpu``, ``cuda`` or ``cuda:N`` (nothing is probed)."""
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise UserError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device; UserError for a bad name, or CUDA asked for but absent."""
    if not isinstance(device, torch.device):
        check_device_name(device or "cpu")
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} requested but CUDA is not available "
                        f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {device} requested but only {torch.cuda.device_count()} "
                        "CUDA device(s) exist")
    return dev
