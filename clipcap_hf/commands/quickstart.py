"""`clipcap quickstart`: train a small captioner on built-in synthetic shapes, offline (see `training.quickstart`)."""

from __future__ import annotations

import argparse

from ..training.quickstart import QuickstartConfig, run_quickstart


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="clipcap-quickstart",
                        help="Where the trained model is saved (default: clipcap-quickstart).")
    parser.add_argument("--max-steps", type=int, default=QuickstartConfig.max_steps,
                        help=f"Training steps (default: {QuickstartConfig.max_steps}).")
    parser.add_argument("--seed", type=int, default=QuickstartConfig.seed,
                        help=f"Seed of the data, the model and the training (default: {QuickstartConfig.seed}).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Write the new model's files over those of the ClipCap model in --output-dir (other files "
                             "there stay); a folder with files but no ClipCap config.json is refused either way.")


def run(args: argparse.Namespace) -> int:
    if args.max_steps < 1:  # the Trainer takes these: 0 trains (next to) nothing, a negative value its default epochs
        raise ValueError(f"--max-steps must be at least 1, got {args.max_steps}.")
    config = QuickstartConfig(max_steps=args.max_steps, seed=args.seed)
    run_quickstart(args.output_dir, config, overwrite=args.overwrite)
    return 0
