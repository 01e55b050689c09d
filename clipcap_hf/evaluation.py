"""Caption a dataset with a ClipCap model and score it with the COCO caption metrics (`clipcap evaluate`)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .metrics import METRIC_NAMES, compute_caption_metrics, load_coco_predictions

# Display order and names of the metrics in tables and model cards.
METRIC_LABELS = {
    "Bleu_1": "BLEU-1",
    "Bleu_2": "BLEU-2",
    "Bleu_3": "BLEU-3",
    "Bleu_4": "BLEU-4",
    "METEOR": "METEOR",
    "ROUGE_L": "ROUGE-L",
    "CIDEr": "CIDEr",
    "SPICE": "SPICE",
}
RESULTS_START = "<!-- clipcap-results-start -->"
RESULTS_END = "<!-- clipcap-results-end -->"


@dataclass
class EvaluationResult:
    """Scores of one evaluation run, with what they were computed from."""

    scores: dict[str, float]
    predictions: dict[Any, str]
    references: dict[Any, list[str]]
    per_image: dict[Any, dict[str, float]] = field(default_factory=dict)
    image_paths: dict[Any, str] = field(default_factory=dict)
    domain_scores: dict[str, dict[str, float]] = field(default_factory=dict)


@torch.no_grad()
def iter_captions(
    model, processor, image_paths: Sequence[str | os.PathLike], batch_size: int = 32, **generate_kwargs
) -> Iterator[tuple[list[str | os.PathLike], list[str]]]:
    """
    Caption image files in batches, with a progress bar, yielding each batch's paths and captions as soon as they
    are ready. An unreadable file stops the run with an error that names it.
    """
    from .image_processing_clipcap import load_image

    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
    device = next(model.parameters()).device
    with tqdm(total=len(image_paths), unit="image", desc="Captioning", disable=len(image_paths) <= batch_size) as bar:
        for start in range(0, len(image_paths), batch_size):
            paths = list(image_paths[start : start + batch_size])
            images = [load_image(path) for path in paths]
            generated = model.generate(**processor(images=images).to(device), **generate_kwargs)
            captions = [text.strip() for text in processor.batch_decode(generated, skip_special_tokens=True)]
            bar.update(len(paths))
            yield paths, captions


def generate_captions(
    model, processor, image_paths: Sequence[str | os.PathLike], batch_size: int = 32, **generate_kwargs
) -> list[str]:
    """Caption image files in batches (see [`iter_captions`]); returns one caption per file, in order."""
    batches = iter_captions(model, processor, image_paths, batch_size, **generate_kwargs)
    return [caption for _, captions in batches for caption in captions]


def score_predictions(
    predictions: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    domains: Mapping[Any, str] | None = None,
    metrics: Sequence[str] = METRIC_NAMES,
) -> EvaluationResult:
    """
    Score predictions (one caption per image id) against references; with `domains` (nocaps' in-domain,
    near-domain, out-domain per image) also score each domain on its own images, as the nocaps evaluation does.
    """
    scores, per_image = compute_caption_metrics(predictions, references, metrics=metrics, return_per_image=True)
    domain_scores = {}
    for domain in sorted(set((domains or {}).values())):
        subset = {image_id: caption for image_id, caption in predictions.items() if domains[image_id] == domain}
        domain_scores[domain] = compute_caption_metrics(subset, references, metrics=metrics)
    return EvaluationResult(
        scores=scores,
        predictions=dict(predictions),
        references={image_id: list(references[image_id]) for image_id in predictions},
        per_image=per_image,
        domain_scores=domain_scores,
    )


def caption_images(model, processor, images, batch_size: int = 32, **generate_kwargs) -> dict[Any, str]:
    """Caption each image of `group_by_image(dataset)` (one row per image) once; returns image id -> caption."""
    image_ids = images["image_id"]
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("The dataset gives one image_id to several image files; image ids must be unique.")
    captions = generate_captions(model, processor, images["image_path"], batch_size=batch_size, **generate_kwargs)
    return dict(zip(image_ids, captions))


def _score_images(predictions: Mapping[Any, str], images, metrics: Sequence[str]) -> EvaluationResult:
    """[`score_predictions`] against the references (and nocaps domains) of `group_by_image(dataset)`."""
    image_ids = images["image_id"]
    domains = dict(zip(image_ids, images["domain"])) if "domain" in images.column_names else None
    result = score_predictions(predictions, dict(zip(image_ids, images["references"])), domains, metrics)
    result.image_paths = dict(zip(image_ids, images["image_path"]))
    return result


def evaluate_dataset(
    model,
    processor,
    dataset,
    batch_size: int = 32,
    metrics: Sequence[str] = METRIC_NAMES,
    **generate_kwargs,
) -> EvaluationResult:
    """
    Caption every image of a caption dataset (one row per caption, as the loaders of `clipcap_hf.data` return)
    once, and score the captions against all of each image's captions.
    """
    from .data import group_by_image

    images = group_by_image(dataset)
    return _score_images(caption_images(model, processor, images, batch_size, **generate_kwargs), images, metrics)


def markdown_table(result: EvaluationResult) -> str:
    """The scores as a markdown table (x100, as captioning papers report them), one row per domain if any."""
    keys = [key for key in METRIC_LABELS if key in result.scores]
    rows = [("overall", result.scores)] + list(result.domain_scores.items())
    lines = ["| | " + " | ".join(METRIC_LABELS[key] for key in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, scores in rows:
        lines.append(f"| {name} | " + " | ".join(f"{100 * scores[key]:.2f}" for key in keys) + " |")
    return "\n".join(lines) + "\n"


def write_predictions(predictions: Mapping[Any, str], output_dir: str | os.PathLike) -> Path:
    """Write `predictions.json` (COCO results format) into `output_dir`; returns its path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "predictions.json"
    entries = [{"image_id": image_id, "caption": caption} for image_id, caption in predictions.items()]
    path.write_text(json.dumps(entries, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def write_evaluation(result: EvaluationResult, output_dir: str | os.PathLike) -> dict[str, Path]:
    """
    Write `predictions.json` (COCO results format), `metrics.json` and `metrics.md` into `output_dir`.

    Returns the paths written, by kind.
    """
    output_dir = Path(output_dir)
    paths = {
        "predictions": write_predictions(result.predictions, output_dir),
        "metrics": output_dir / "metrics.json",
        "table": output_dir / "metrics.md",
    }
    metrics = {"scores": result.scores, "domains": result.domain_scores, "num_images": len(result.predictions)}
    paths["metrics"].write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    paths["table"].write_text(markdown_table(result), encoding="utf-8")
    return paths


def fill_model_card(
    card_path: str | os.PathLike,
    result: EvaluationResult,
    dataset_name: str,
    dataset_type: str,
    dataset_split: str | None,
    model_name: str | None = None,
) -> None:
    """
    Put an evaluation run into a model card: its markdown table between the `<!-- clipcap-results-start -->` and
    `<!-- clipcap-results-end -->` markers, and its metrics into the YAML `model-index` (replacing earlier results
    for the same dataset and split, keeping the others). `dataset_split` is `None` for a dataset without splits.
    """
    from huggingface_hub import EvalResult, ModelCard

    card = ModelCard.load(card_path)
    if RESULTS_START not in card.text or RESULTS_END not in card.text:
        raise ValueError(
            f"{card_path} has no results section to fill: add the lines {RESULTS_START} and {RESULTS_END} "
            "where the evaluation table belongs."
        )
    before, rest = card.text.split(RESULTS_START, 1)
    after = rest.split(RESULTS_END, 1)[1]
    split = f"{dataset_split}, " if dataset_split else ""
    table = f"Measured with `clipcap evaluate` on {dataset_name} ({split}{len(result.predictions)} images):\n\n"
    card.text = f"{before}{RESULTS_START}\n{table}{markdown_table(result)}{RESULTS_END}{after}"

    new_results = [
        EvalResult(
            task_type="image-to-text",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=dataset_split,
            metric_type=key.lower(),
            metric_name=METRIC_LABELS[key],
            metric_value=round(100 * value, 2),
        )
        for key, value in result.scores.items()
        if key in METRIC_LABELS
    ]
    kept = [
        old
        for old in card.data.eval_results or []
        if (old.dataset_name, old.dataset_split) != (dataset_name, dataset_split)
    ]
    card.data.eval_results = kept + new_results
    card.data.model_name = card.data.model_name or model_name or Path(card_path).resolve().parent.name
    card.save(card_path)


# ---------------------------------------------------------------------------------------------------------------------
# `clipcap evaluate`

DATASET_TYPES = {"coco-karpathy": "coco", "coco": "coco", "nocaps": "nocaps", "conceptual-captions": "conceptual_captions"}


def _load_split(args: argparse.Namespace):
    """The images to evaluate, and the split they come from (`None` for a format without splits)."""
    from .data import load_caption_dataset

    data = load_caption_dataset(args.data_format, args.data, args.image_root)
    split = None
    if hasattr(data, "keys"):  # a DatasetDict (the Karpathy file holds all splits)
        split = args.split or "test"
        if split not in data:
            raise ValueError(f"{args.data} has no split {split!r}; it has {sorted(data.keys())}.")
        data = data[split]
    elif args.split is not None:
        raise ValueError(f"--split: the {args.data_format} format has no splits; {args.data} is evaluated whole.")
    if args.limit is not None:
        from .data import group_by_image

        keep = set(group_by_image(data)["image_id"][: args.limit])
        data = data.filter(lambda image_id: image_id in keep, input_columns="image_id")
    return data, split


def _check_arguments(args: argparse.Namespace) -> dict:
    """What would otherwise fail after the captioning, or in the middle of it; returns the `generate` arguments."""
    from .cli import check_caption_options, check_gallery_path

    if not args.model and not args.predictions:
        raise ValueError("Give --model (to caption the images) or --predictions (to score a results file).")
    generate_kwargs = check_caption_options(args)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}.")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise NotADirectoryError(f"--output-dir: {args.output_dir} is a file, not a folder.")
    if args.model_card and not Path(args.model_card).is_file():
        raise FileNotFoundError(f"--model-card: {args.model_card} does not exist.")
    if args.gallery:
        check_gallery_path(args.gallery, output_dir=args.output_dir)
    return generate_kwargs


def evaluate_command(args: argparse.Namespace) -> int:
    from .data import group_by_image

    generate_kwargs = _check_arguments(args)
    dataset, split = _load_split(args)
    images = group_by_image(dataset)
    if args.predictions:
        # Re-score a predictions file (COCO results format) without running the model.
        predictions = load_coco_predictions(args.predictions)
        if args.limit is not None:  # only the images that --limit kept
            kept = set(images["image_id"])
            predictions = {image_id: caption for image_id, caption in predictions.items() if image_id in kept}
    else:
        from .cli import load_model_and_processor

        model, processor = load_model_and_processor(args.model, args.device)
        predictions = caption_images(model, processor, images, batch_size=args.batch_size, **generate_kwargs)
        # Written before scoring, so that a scoring failure (no Java, a bad reference) keeps the captions.
        write_predictions(predictions, args.output_dir)
    result = _score_images(predictions, images, args.metrics)
    paths = write_evaluation(result, args.output_dir)
    if args.gallery:
        from .gallery import GalleryRecord, write_gallery

        records = [
            GalleryRecord(
                image=result.image_paths[image_id],
                caption=caption,
                references=result.references[image_id],
                scores=result.per_image.get(image_id),
                name=str(image_id),
            )
            for image_id, caption in result.predictions.items()
        ]
        print(f"Gallery: {write_gallery(records, args.gallery, title=f'Evaluation on {args.data}')}")
    print(markdown_table(result), end="")
    print(f"Predictions: {paths['predictions']}\nMetrics: {paths['metrics']}")
    if args.model_card:
        dataset_name = args.dataset_name or f"{args.data_format} {Path(args.data).name}"
        dataset_type = DATASET_TYPES.get(args.data_format, args.data_format)
        fill_model_card(args.model_card, result, dataset_name, dataset_type, split)
        print(f"Model card updated: {args.model_card}")
    return 0


def add_evaluate_parser(subparsers) -> None:
    from .cli import add_caption_options

    parser = subparsers.add_parser("evaluate", help="Caption a dataset and score it with the COCO caption metrics.")
    parser.add_argument("--model", help="A ClipCap folder or Hub name (required unless --predictions is given).")
    parser.add_argument("--data", required=True, help="The annotation file (or image folder for imagefolder).")
    parser.add_argument(
        "--data-format",
        default="coco-karpathy",
        choices=["coco-karpathy", "coco", "nocaps", "conceptual-captions", "imagefolder"],
        help="Annotation format (default: coco-karpathy).",
    )
    parser.add_argument("--image-root", help="The folder the annotation file's image paths are relative to.")
    parser.add_argument("--split", help="Split to evaluate, for coco-karpathy, the one format with splits "
                                        "(default: test).")
    parser.add_argument("--output-dir", required=True, help="Where predictions.json, metrics.json, metrics.md go.")
    parser.add_argument("--predictions", help="Score this COCO results file instead of captioning.")
    parser.add_argument("--metrics", nargs="+", default=list(METRIC_NAMES), choices=list(METRIC_NAMES),
                        help="Metrics to compute (default: all of them).")
    add_caption_options(parser, num_beams=5, batch_size=32)
    parser.add_argument("--limit", type=int, help="Evaluate only the first N images.")
    parser.add_argument("--device", help="Default: cuda when available, else cpu.")
    parser.add_argument("--model-card", help="A model card (model_card.md) to fill with the results.")
    parser.add_argument("--dataset-name", help="Dataset name for the model card (default: from --data).")
    parser.add_argument("--gallery", help="Also write an HTML page of the images, captions, references and scores.")
    parser.set_defaults(handler=evaluate_command)


__all__ = [
    "EvaluationResult",
    "caption_images",
    "evaluate_dataset",
    "fill_model_card",
    "generate_captions",
    "iter_captions",
    "markdown_table",
    "score_predictions",
    "write_evaluation",
    "write_predictions",
]
