"""``export --study NAME [--trial N] OUT_DIR``: any trial of a study as a model folder.

The trial's recipe is merged through the engine, with the study's merge seed (for the best
trial of a random method, the confirm seed the study saved in ``best/``), and written with its
model card and ``mergekit_config.yml``. Without ``--trial`` it is the study's best merge.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.commands._study import add_study_args, open_study_group
from orchestrator.errors import UserError


def configure(parser: argparse.ArgumentParser) -> None:
    add_study_args(parser)
    parser.add_argument("out_dir", help="output model folder (must not exist, or be empty)")
    parser.add_argument("--trial", type=int, default=None, help="the trial number (default: the best trial)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")


def run(args: argparse.Namespace) -> int:
    from orchestrator.engine.adapter_output import merge_recipe_to_disk
    from orchestrator.engine.writing import check_output_dir
    from orchestrator.study.records import State
    from orchestrator.sweep.finish import best_of, stored_rows

    check_output_dir(Path(args.out_dir), args.overwrite)
    group = open_study_group(args.study, Path(args.runs_dir), args.storage)
    records = {r.number: r for r in group.records() if r.recipe is not None}
    best = best_of(stored_rows(group.notes))
    number = args.trial if args.trial is not None else (best.trial if best else None)
    if number is None:
        raise UserError(f"study {args.study!r} has no best trial yet (it has not concluded); pass --trial N")
    record = records.get(number)
    if record is None:
        raise UserError(f"study {args.study!r} has no trial {number}; its trials: "
                        f"{', '.join(map(str, sorted(records))) or 'none'}")
    if record.state is not State.COMPLETE:
        print(f"note: trial {number} ended {record.state.value}; exporting its recipe anyway")
    seed = int((group.notes.fingerprint() or {}).get("study.seed", 0))
    if best is not None and best.trial == number and group.notes.best_seed() is not None:
        seed = group.notes.best_seed()
    result = merge_recipe_to_disk(record.recipe, args.out_dir, seed=seed, overwrite=args.overwrite,
                           card_title=f"{args.out_dir} (trial {number} of study {args.study})")
    print(f"exported trial {number} ({record.method}, seed {seed}) -> {result.out_dir}")
    return 0
