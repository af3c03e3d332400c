"""``merge RECIPE.yml OUT_DIR``: run a mergekit-style recipe into a Hugging Face model folder."""

from __future__ import annotations

import argparse
import sys

from orchestrator.engine.recipe import load_recipe
from orchestrator.errors import UserError


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the merge command's arguments."""
    parser.add_argument("recipe", help="mergekit-style YAML recipe")
    parser.add_argument("out_dir", help="output model folder (must not exist, or be empty)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for random methods (dare_*, della*); default 0")
    parser.add_argument("--device", default="cpu",
                        help="where to compute: cpu (default) or cuda[:N]")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept pytorch_model.bin inputs (loaded with weights_only=True)")
    parser.add_argument("--shard-size", default="5GB",
                        help="largest output shard, e.g. 5GB, 500MB (default 5GB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR if it exists")
    parser.add_argument("--adapter", action="store_true",
                        help="write one combined PEFT LoRA adapter instead of a model (every model "
                             "of the recipe must be an adapter on base_model; see README, LoRA)")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")


def run(args: argparse.Namespace) -> int:
    """Merge, then print a one-line summary (tensors, seconds, output size)."""
    from orchestrator.engine.adapter_output import merge_recipe_to_disk, uses_knots

    recipe = load_recipe(args.recipe)
    if args.adapter:
        return _adapter(recipe, args)
    if any(k in recipe.parameters for k in ("rank", "peft_compatible")):
        raise UserError(f"{args.recipe}: parameters rank/peft_compatible describe a combined adapter; "
                        "pass --adapter to write one")
    if uses_knots(recipe) and (args.device != "cpu" or args.allow_pickle):
        raise UserError("a KnOTS recipe (parameters.knots) merges adapters on cpu from safetensors: drop "
                        "--device and --allow-pickle")
    extra = {} if uses_knots(recipe) else {"device": args.device, "allow_pickle": args.allow_pickle}
    result = merge_recipe_to_disk(recipe, args.out_dir, seed=args.seed, shard_size=args.shard_size,
                                  overwrite=args.overwrite, **extra)
    if not args.quiet:
        print(f"merged {result.tensors} tensors with {recipe.merge_method} in "
              f"{result.seconds:.1f}s -> {result.out_dir} ({_size(result.bytes)})",
              file=sys.stdout)
    return 0


def _adapter(recipe, args: argparse.Namespace) -> int:
    from orchestrator.engine.adapter_output import write_combined_adapter

    if args.device != "cpu" or args.allow_pickle or args.shard_size != "5GB":
        raise UserError("--adapter takes no --device, --allow-pickle or --shard-size (adapters are small "
                        "and merged on cpu)")
    result = write_combined_adapter(recipe, args.out_dir, seed=args.seed, overwrite=args.overwrite)
    if not args.quiet:
        print(f"combined {len(recipe.models)} adapters with {recipe.merge_method} in {result.seconds:.1f}s "
              f"-> {result.out_dir} (LoRA adapter, {result.modules} modules, rank {result.rank})")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
