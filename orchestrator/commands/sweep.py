"""``python -m orchestrator sweep [hydra overrides...]``: run a merge search study.

Run the same command on N processes or machines with a shared ``study.storage`` URL
(``postgresql+psycopg2://...`` or ``journal:///shared/fs/study.log``) and they work on one
study. SIGINT/SIGTERM abandon the running trial (it is queued again for a restart) and exit 130.
"""

from __future__ import annotations

import argparse
import sys

from orchestrator.config import load_config
from orchestrator.errors import UserError, redact_text

MULTIRUN = ("-m", "--multirun")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Hydra overrides, e.g. method=ties study.n_trials=50 eval=mmlu_hellaswag")
    parser.add_argument("--config-dir", default=None, help="folder holding config.yaml (default: conf/)")
    parser.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    if any(arg in MULTIRUN for arg in sys.argv[2:]):
        raise UserError("sweep has no Hydra multirun (-m): one study already searches the methods and their "
                        "parameters; start one sweep per setting (e.g. a different study.name each), or several "
                        "workers on one study (README, 'Many workers, one study')")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from orchestrator.sweep.run import run_sweep

    cfg = load_config(args.overrides, args.config_dir)
    if args.cfg:
        print(redact_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)))
        return 0
    quiet_libraries()
    outcome = run_sweep(cfg, args.overrides)
    if outcome.best_dir is not None:
        print(f"best merge: {outcome.best_dir}" + (f" (registered as {outcome.registered})" if outcome.registered else ""))
    if outcome.ui:
        print(outcome.ui)
    return 0


def quiet_libraries() -> None:
    """Keep the progress lines readable: libraries log at WARNING/ERROR, no progress bars.

    Set through the environment and logger names, so nothing heavy is imported before the
    cheap checks have run (a typo fails in about two seconds).
    """
    import logging
    import os
    import warnings

    for key, value in (("TOKENIZERS_PARALLELISM", "false"), ("MLFLOW_LOGGING_LEVEL", "WARNING"),
                       ("TRANSFORMERS_VERBOSITY", "error"), ("DATASETS_VERBOSITY", "error"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(key, value)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("lm-eval", "lm_eval", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
