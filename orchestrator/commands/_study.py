"""What the commands that read a finished study share: where it is, and opening it read-only."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError, redact_text


def add_study_args(parser: argparse.ArgumentParser, many: bool = False) -> None:
    if many:
        parser.add_argument("--study", action="append", required=True, metavar="NAME",
                            help="a study's name (repeatable: several studies, e.g. the same methods on "
                                 "other seeds)")
    else:
        parser.add_argument("--study", required=True, metavar="NAME", help="the study's name (study.name)")
    parser.add_argument("--runs-dir", default="runs", help="the sweep's runs_dir (default: runs)")
    parser.add_argument("--storage", default=None,
                        help="the study's storage URL (default: sqlite:///RUNS_DIR/optuna.db)")


def open_study_group(name: str, runs_dir: Path, storage: str | None) -> Any:
    """The study, read from its storage; one line if it is not there."""
    from orchestrator.study.group import load_group
    from orchestrator.study.storage import check_storage, make_storage, storage_url

    url = storage_url(storage, runs_dir)
    if storage is None and not (runs_dir / "optuna.db").is_file():
        raise UserError(f"no study storage in {runs_dir} (no optuna.db); pass --runs-dir or --storage")
    check_storage(url)
    try:
        return load_group(make_storage(url), name)
    except KeyError:
        raise UserError(f"no study {name!r} in {redact_text(url)}") from None
