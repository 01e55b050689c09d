"""`clipcap quickstart`: train a small captioner on built-in synthetic shapes, offline (see `training.quickstart`)."""

from __future__ import annotations

import argparse

from ..training.quickstart import QuickstartConfig, run_quickstart
from ._utils import positive_int

MAX_SEED = 2**32 - 1  # numpy's seeds, which the data generator and the Trainer's `set_seed` take, end here


def seed_value(text: str) -> int:
    """An argparse `type`: a random seed, a whole number from 0 to 2**32 - 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_SEED} (2**32 - 1), got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="clipcap-quickstart",
                        help="Where the trained model is saved (default: clipcap-quickstart).")
    # At least 1: the Trainer takes 0 as (next to) no training and a negative value as "use the epochs".
    parser.add_argument("--max-steps", type=positive_int, default=QuickstartConfig.max_steps,
                        help=f"Training steps (default: {QuickstartConfig.max_steps}).")
    parser.add_argument("--seed", type=seed_value, default=QuickstartConfig.seed,
                        help=f"Seed of the data, the model and the training (default: {QuickstartConfig.seed}).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Write the new model's files over those of the ClipCap model in --output-dir (other files "
                             "there stay); a folder with files but no ClipCap config.json is refused either way.")


def run(args: argparse.Namespace) -> int:
    config = QuickstartConfig(max_steps=args.max_steps, seed=args.seed)
    run_quickstart(args.output_dir, config, overwrite=args.overwrite)
    return 0
