"""Entry point: ``python -m orchestrator <command>`` (also the ``merge-orchestrator`` script).

Each command lives in ``orchestrator/commands/<name>.py`` and exposes ``configure(parser)`` and
``run(args) -> int``; it is imported only when chosen, so ``merge`` never pays for MLflow.
A ``UserError`` (or an ``OSError``: a full disk, a missing file) becomes one line on stderr
and exit code 2, with any URL password masked; SIGINT/SIGTERM exit 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from orchestrator.errors import UserError, redact_text

COMMANDS = {
    "sweep": "Run a merge search study (Hydra overrides as arguments).",
    "compare": "Print the comparison of finished studies and write their report.",
    "ui": "Serve the MLflow UI for the project's store on 127.0.0.1 and print the study's URL.",
    "export": "Write any trial of a study as a model folder (the best by default).",
    "merge": "Merge models from a mergekit-style recipe into a Hugging Face model folder.",
    "eval": "Evaluate a model (folder, Hub id, model+adapter) on lm-eval tasks.",
    "zoo": "Build (or verify) the demo zoo: tiny expert models and local benchmark tasks.",
}
DESCRIPTION = ("Search model merges (linear, SLERP, TIES, DARE, ...) with Optuna, score them with lm-eval, "
               "track them in MLflow. Run `python -m orchestrator COMMAND --help` for a command's options.")

OFFLINE_DEFAULTS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def set_offline_defaults() -> None:
    """Default to offline Hugging Face libraries; an exported value (e.g. 0) wins."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = sys.argv[1] if len(sys.argv) > 1 else None
    for name, help_text in COMMANDS.items():
        cmd_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(f"orchestrator.commands.{name}").configure(cmd_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    set_offline_defaults()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        args = build_parser().parse_args(sys.argv[1:])
        module = importlib.import_module(f"orchestrator.commands.{args.command}")
        return int(module.run(args) or 0)
    except UserError as err:
        return _fail(str(err))
    except OSError as err:
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        return _fail(f"{err.strerror or err}{where}")
    except KeyboardInterrupt as err:
        print(f"interrupted{f' ({err.args[0]})' if err.args else ''}", file=sys.stderr)
        return 130


def _fail(message: str) -> int:
    print(f"error: {redact_text(' '.join(message.split()))}", file=sys.stderr)
    return 2
