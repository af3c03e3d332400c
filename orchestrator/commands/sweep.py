"""``python -m orchestrator sweep [hydra overrides...]``: run a merge search study."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Hydra overrides, e.g. method=ties study.n_trials=50 eval=mmlu_hellaswag")
    parser.add_argument("--config-dir", default=None, help="folder holding config.yaml (default: conf/)")
    parser.add_argument("--cfg", action="store_true", help="print the composed config and exit")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from orchestrator.config import load_config
    from orchestrator.sweep import run_sweep

    cfg = load_config(args.overrides, args.config_dir)
    if args.cfg:
        print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        return 0
    quiet_libraries()
    outcome = run_sweep(cfg, args.overrides)
    if outcome.best_dir is not None:
        print(f"best merge: {outcome.best_dir}")
    return 0


def quiet_libraries() -> None:
    """Keep the progress lines readable: lm-eval, Optuna and datasets log at WARNING."""
    import logging
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import optuna

    import warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for name in ("lm-eval", "lm_eval", "datasets", "transformers", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
