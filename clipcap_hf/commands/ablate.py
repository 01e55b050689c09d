"""`clipcap ablate --output-dir DIR`: train a grid of ClipCap variants (prefix length, mapper, frozen or fine-tuned
language model, vision tower) with the same budget each, and write their scores as a table and figures (see
`training.ablation`)."""

from __future__ import annotations

import argparse

from ..data import DATASET_FORMATS
from ..training.ablation import (
    LANGUAGE_MODES,
    MAPPING_TYPES,
    PLOTTABLE_SCORES,
    AblationConfig,
    caption_task,
    run_ablation,
)
from ..training.quickstart import QuickstartConfig
from ._utils import positive_float, positive_int
from .quickstart import seed_value

DEFAULTS = AblationConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", required=True,
                        help="Where the runs, results.csv, results.md and the figures go; a rerun skips finished "
                             "runs.")
    grid = parser.add_argument_group("the grid")
    grid.add_argument("--prefix-lengths", type=positive_int, nargs="+", default=list(DEFAULTS.prefix_lengths),
                      help=f"Prefix lengths (default: {' '.join(map(str, DEFAULTS.prefix_lengths))}).")
    grid.add_argument("--mapping-types", nargs="+", choices=MAPPING_TYPES, default=list(DEFAULTS.mapping_types),
                      help="Mappers (default: both).")
    grid.add_argument("--language-models", nargs="+", choices=LANGUAGE_MODES, default=list(DEFAULTS.language_models),
                      help="Train the language model with the mapper (finetuned) or not (frozen) (default: both).")
    grid.add_argument("--vision-models", nargs="+", default=[],
                      help="Pretrained vision towers: CLIP, SigLIP, SigLIP2, ViT or DINOv2 checkpoints (Hub names or "
                           "folders). Needs --text-model and --train-file. Default: the synthetic task's own tower.")
    grid.add_argument("--text-model", default=None, help="The pretrained causal language model, e.g. gpt2.")
    data = parser.add_argument_group("the dataset (default: the quickstart's synthetic shapes, offline)")
    data.add_argument("--train-file", default=None, help="Training captions (see `clipcap train`'s formats).")
    data.add_argument("--validation-file", default=None, help="Evaluation captions (default: the Karpathy file's).")
    data.add_argument("--dataset-format", default=None, choices=sorted(DATASET_FORMATS),
                      help="The training (and validation) file's format (default: coco-karpathy).")
    data.add_argument("--image-root", default=None, help="The folder the dataset's image paths start from.")
    budget = parser.add_argument_group("the budget of every run")
    budget.add_argument("--max-steps", type=positive_int, default=DEFAULTS.max_steps,
                        help=f"Training steps per run (default: {DEFAULTS.max_steps}).")
    budget.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size,
                        help=f"Captions per step (default: {DEFAULTS.batch_size}).")
    budget.add_argument("--learning-rate", type=positive_float, default=DEFAULTS.learning_rate,
                        help=f"Peak learning rate (default: {DEFAULTS.learning_rate}).")
    budget.add_argument("--mapping-num-layers", type=positive_int, default=DEFAULTS.mapping_num_layers,
                        help=f"Transformer mapper layers (default: {DEFAULTS.mapping_num_layers}; the paper's: 8).")
    budget.add_argument("--base-steps", type=positive_int, default=None,
                        help="Synthetic task: steps of the quickstart run that trains its pretrained tower and "
                             f"language model (default: {DEFAULTS.shapes.max_steps}).")
    budget.add_argument("--seed", type=seed_value, default=DEFAULTS.seed, help=f"Seed (default: {DEFAULTS.seed}).")
    parser.add_argument("--plot-metrics", nargs="+", default=list(DEFAULTS.plot_metrics), choices=PLOTTABLE_SCORES,
                        metavar="METRIC",
                        help="Scores drawn against the prefix length, one figure each: any of "
                             f"{', '.join(PLOTTABLE_SCORES)} (default: CIDEr Bleu_4).")
    parser.add_argument("--quiet", action="store_true", help="No progress bars or training logs.")


def run(args: argparse.Namespace) -> int:
    own_data = args.train_file is not None
    if own_data != bool(args.vision_models) or own_data != (args.text_model is not None):
        raise ValueError(
            "--train-file, --vision-models and --text-model go together (a dataset of your own with pretrained parts); "
            "leave all three out for the synthetic task."
        )
    # The dataset options default to None ("not given"), so that one the chosen dataset cannot use is refused.
    dataset_options = {"--validation-file": args.validation_file, "--dataset-format": args.dataset_format,
                       "--image-root": args.image_root}
    given = [option for option, value in dataset_options.items() if value is not None]
    if given and not own_data:
        raise ValueError(
            f"{', '.join(given)} describe a dataset of your own, which needs --train-file (with --vision-models and "
            "--text-model); leave them out for the synthetic task."
        )
    if own_data and args.base_steps is not None:
        raise ValueError(
            "--base-steps sets the synthetic task's base run, which a dataset of your own (--train-file) does not "
            "have: leave it out."
        )
    config = AblationConfig(
        prefix_lengths=args.prefix_lengths, mapping_types=args.mapping_types, language_models=args.language_models,
        vision_models=args.vision_models, text_model=args.text_model, max_steps=args.max_steps,
        batch_size=args.batch_size, learning_rate=args.learning_rate, mapping_num_layers=args.mapping_num_layers,
        plot_metrics=args.plot_metrics, seed=args.seed,
        shapes=QuickstartConfig(max_steps=args.base_steps or DEFAULTS.shapes.max_steps, seed=args.seed),
    )
    data = None
    if own_data:
        data = caption_task(
            args.dataset_format or "coco-karpathy", args.train_file, validation_file=args.validation_file,
            image_root=args.image_root,
        )
    run_ablation(args.output_dir, config, data, verbose=not args.quiet)
    print(f"Wrote {args.output_dir}/results.md, results.csv and prefix_length_*.png.")
    return 0
