"""Options of registry entries (samplers, pruners) and close-match hints for mistyped names."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.errors import UserError


def close_matches(word: str, options: Sequence[str]) -> str:
    """A hint like " (did you mean 'x'?)" when word is close to one of options, else ""."""
    matches = difflib.get_close_matches(str(word), list(options), n=3)
    return f" (did you mean {', '.join(repr(m) for m in matches)}?)" if matches else ""


def build_params(params: type, values: Mapping[str, Any], where: str, what: str,
                 others: Sequence[str] = ()) -> Any:
    """``params(**values)`` with unknown keys and bad values as one-line UserErrors.

    Keys in ``others`` (options of another entry of the same registry, e.g. an experiment's
    TPE settings when the sampler is switched to random) are ignored, not refused.
    """
    valid = [f.name for f in dataclasses.fields(params)]
    for key in values:
        if key not in valid and key not in others:
            known = sorted(set(valid) | set(others))
            raise UserError(f"unknown key {where}.{key} for {what}{close_matches(key, known)}; "
                            f"valid: {', '.join(valid) or 'none'}")
    try:
        built = params(**{k: v for k, v in values.items() if k in valid})
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: {err} ({what})") from None
    for f in dataclasses.fields(params):
        value, default = getattr(built, f.name), f.default
        if default is not dataclasses.MISSING and type(default) is not type(value) \
                and not (isinstance(default, float) and isinstance(value, int)):
            raise UserError(f"{where}.{f.name} must be a {type(default).__name__}, got {value!r} ({what})")
    return built
