"""``python -m orchestrator zoo``: build (or verify, or install) the demo zoo."""

from __future__ import annotations

import argparse

from orchestrator.zoo.build import build_zoo


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the zoo command's options."""
    parser.add_argument("--out", default=None,
                        help="zoo folder (default runs/zoo, or runs/zoo-micro with --micro)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--micro", action="store_true",
                        help="tiny models with little training (seconds), for tests")
    parser.add_argument("--force", action="store_true",
                        help="train even when a valid or committed zoo is available")


def run(args: argparse.Namespace) -> int:
    """Build the zoo and print its score table."""
    out = args.out or ("runs/zoo-micro" if args.micro else "runs/zoo")
    build_zoo(out, seed=args.seed, micro=args.micro, force=args.force)
    return 0
