"""Caption a dataset with a ClipCap model and score it with the COCO caption metrics (`clipcap evaluate`)."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from huggingface_hub import EvalResult, ModelCard
from tqdm.auto import tqdm

from .cli_utils import add_caption_options, check_caption_options, check_gallery_path, load_model_and_processor
from .data import DATASET_FORMATS, group_by_image, load_caption_dataset
from .file_utils import write_text_atomically
from .gallery import GalleryRecord, write_gallery
from .image_processing_clipcap import load_image
from .metrics import METRIC_NAMES, SCORE_KEYS, caption_tokenization, compute_caption_metrics, load_coco_predictions

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
# The model card's `model-index` names metrics by their Hub metric id (the variant, e.g. BLEU-4, goes in `name`),
# and the task as the paper's rows in model_card.md do.
METRIC_TYPES = {key: metric for metric, keys in SCORE_KEYS.items() for key in keys}
TASK_NAME = "Image captioning"
RESULTS_START = "<!-- clipcap-results-start -->"
RESULTS_END = "<!-- clipcap-results-end -->"

PREDICTIONS_FILE = "predictions.json"
METRICS_FILES = ("metrics.json", "metrics.md")
# Unreadable files named in an error message; the rest are counted.
_MAX_LISTED = 20


@dataclass
class EvaluationResult:
    """Scores of one evaluation run, with what they were computed from."""

    scores: dict[str, float]
    predictions: dict[Any, str]
    references: dict[Any, list[str]]
    per_image: dict[Any, dict[str, float]] = field(default_factory=dict)
    image_paths: dict[Any, str] = field(default_factory=dict)
    domain_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    tokenization: str = "ptb"
    """How the captions were tokenized (see `clipcap_hf.metrics.caption_tokenization`)."""
    skipped_metrics: list[str] = field(default_factory=list)
    """Requested metrics that could not run here (the warnings at scoring time say why)."""


@dataclass
class CaptionedImage:
    """One image file's caption, or why the file could not be read."""

    path: str | os.PathLike
    caption: str | None
    """The generated caption; `None` when the file could not be read."""
    error: str | None = None
    """Why the file could not be read (the message names it); `None` when it was captioned."""


class UnreadableImagesError(ValueError):
    """Some image files could not be read; `errors` holds one message per file, naming it and the reason."""

    def __init__(self, errors: Sequence[str], total: int, consequence: str = ""):
        self.errors = list(errors)
        listed = "".join(f"\n  {error}" for error in self.errors[:_MAX_LISTED])
        if len(self.errors) > _MAX_LISTED:
            listed += f"\n  ... and {len(self.errors) - _MAX_LISTED} more"
        message = f"{len(self.errors)} of {total} images could not be read:{listed}"
        super().__init__(f"{message}\n{consequence}" if consequence else message)


@torch.no_grad()
def iter_captions(
    model, processor, image_paths: Sequence[str | os.PathLike], batch_size: int = 32, **generate_kwargs
) -> Iterator[list[CaptionedImage]]:
    """
    Caption image files in batches, with a progress bar, yielding each batch's results, in order, as soon as they
    are ready. A file that cannot be read does not stop the run: its result holds the error instead of a caption.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
    device = next(model.parameters()).device
    with tqdm(total=len(image_paths), unit="image", desc="Captioning", disable=len(image_paths) <= batch_size) as bar:
        for start in range(0, len(image_paths), batch_size):
            paths = list(image_paths[start : start + batch_size])
            images, errors = {}, {}
            for index, path in enumerate(paths):
                try:
                    images[index] = load_image(path)
                except ValueError as error:  # its message names the file and the reason
                    errors[index] = str(error)
            captions = {}
            if images:
                generated = model.generate(**processor(images=list(images.values())).to(device), **generate_kwargs)
                captions = dict(zip(images, processor.post_process_image_text_to_text(generated)))
            bar.update(len(paths))
            yield [CaptionedImage(path, captions.get(index), errors.get(index)) for index, path in enumerate(paths)]


def generate_captions(
    model, processor, image_paths: Sequence[str | os.PathLike], batch_size: int = 32, **generate_kwargs
) -> list[str]:
    """
    Caption image files in batches (see [`iter_captions`]); returns one caption per file, in order. Raises
    [`UnreadableImagesError`], naming every file that could not be read, once the others are captioned.
    """
    batches = iter_captions(model, processor, image_paths, batch_size, **generate_kwargs)
    results = list(itertools.chain.from_iterable(batches))
    errors = [result.error for result in results if result.error is not None]
    if errors:
        raise UnreadableImagesError(errors, len(results))
    return [result.caption for result in results]


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
        with warnings.catch_warnings():  # the overall scoring has warned of everything (empty captions, no Java...)
            warnings.simplefilter("ignore")
            domain_scores[domain] = compute_caption_metrics(subset, references, metrics=metrics)
    return EvaluationResult(
        scores=scores,
        predictions=dict(predictions),
        references={image_id: list(references[image_id]) for image_id in predictions},
        per_image=per_image,
        domain_scores=domain_scores,
        tokenization=caption_tokenization(),
        skipped_metrics=[name for name in METRIC_NAMES if name in metrics and SCORE_KEYS[name][0] not in scores],
    )


def caption_images(
    model, processor, images, batch_size: int = 32, **generate_kwargs
) -> tuple[dict[Any, str], dict[Any, str]]:
    """
    Caption each image of `group_by_image(dataset)` (one row per image) once. Returns the captions by image id, and
    the error (naming the file) of each image id whose file could not be read.
    """
    image_ids = images["image_id"]
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("The dataset gives one image_id to several image files; image ids must be unique.")
    batches = iter_captions(model, processor, images["image_path"], batch_size, **generate_kwargs)
    results = dict(zip(image_ids, itertools.chain.from_iterable(batches)))
    captions = {image_id: result.caption for image_id, result in results.items() if result.error is None}
    unreadable = {image_id: result.error for image_id, result in results.items() if result.error is not None}
    return captions, unreadable


def _score_images(predictions: Mapping[Any, str], images, metrics: Sequence[str]) -> EvaluationResult:
    """[`score_predictions`] against the references (and nocaps domains) of `group_by_image(dataset)`."""
    image_ids = images["image_id"]
    domains = dict(zip(image_ids, images["domain"])) if "domain" in images.column_names else None
    result = score_predictions(predictions, dict(zip(image_ids, images["references"])), domains, metrics)
    result.image_paths = dict(zip(image_ids, images["image_path"]))
    return result


def markdown_table(result: EvaluationResult) -> str:
    """The scores as a markdown table (x100, as captioning papers report them), one row per domain if any."""
    keys = [key for key in METRIC_LABELS if key in result.scores]
    rows = [("overall", result.scores)] + list(result.domain_scores.items())
    lines = ["| | " + " | ".join(METRIC_LABELS[key] for key in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, scores in rows:
        lines.append(f"| {name} | " + " | ".join(f"{100 * scores[key]:.2f}" for key in keys) + " |")
    return "\n".join(lines) + "\n"


def write_predictions(predictions: Mapping[Any, str], output_dir: str | os.PathLike) -> Path:
    """
    Write `predictions.json` (COCO results format) into `output_dir`; returns its path. The `metrics.json` and
    `metrics.md` of earlier predictions there are removed, so that the folder never pairs captions with the scores
    of other captions.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in METRICS_FILES:
        (output_dir / name).unlink(missing_ok=True)
    path = output_dir / PREDICTIONS_FILE
    entries = [{"image_id": image_id, "caption": caption} for image_id, caption in predictions.items()]
    write_text_atomically(path, json.dumps(entries, indent=1, ensure_ascii=False) + "\n")
    return path


def write_evaluation(
    result: EvaluationResult,
    output_dir: str | os.PathLike,
    with_predictions: bool = True,
    run: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """
    Write `predictions.json` (COCO results format, unless `with_predictions=False`: when it is already there),
    `metrics.json` and `metrics.md` into `output_dir`, each replaced atomically. `metrics.json` holds the scores,
    the per-domain scores, the number of images, the tokenization (`"ptb"`: the COCO tokenizer, run with Java;
    `"python-approximation"`: without Java), the requested metrics that could not run and, under `"run"`, what
    `run` says produced the captions (model, data, decoding), so that the numbers can be reproduced.

    Returns the paths written, by kind.
    """
    output_dir = Path(output_dir)
    if with_predictions:
        write_predictions(result.predictions, output_dir)
    paths = {
        "predictions": output_dir / PREDICTIONS_FILE,
        "metrics": output_dir / METRICS_FILES[0],
        "table": output_dir / METRICS_FILES[1],
    }
    metrics = {
        "scores": result.scores,
        "domains": result.domain_scores,
        "num_images": len(result.predictions),
        "tokenization": result.tokenization,
        "skipped_metrics": result.skipped_metrics,
        "run": dict(run or {}),
    }
    write_text_atomically(paths["metrics"], json.dumps(metrics, indent=2) + "\n")
    write_text_atomically(paths["table"], markdown_table(result))
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
            task_name=TASK_NAME,
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=dataset_split,
            metric_type=METRIC_TYPES[key],
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

DATASET_TYPES = {
    "coco-karpathy": "coco",
    "coco": "coco",
    "nocaps": "nocaps",
    "conceptual-captions": "conceptual_captions",
}


@contextlib.contextmanager
def _without_datasets_progress_bars() -> Iterator[None]:
    """Hide the bars `datasets` shows for quick table operations ("Flattening the indices"), which say nothing here."""
    enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _load_split(args: argparse.Namespace):
    """
    The images to evaluate, one row per image (`group_by_image`), and the split they come from (`None` for a format
    without splits).
    """
    data = load_caption_dataset(args.data_format, args.data, args.image_root)
    split = None
    if hasattr(data, "keys"):  # a DatasetDict (the Karpathy file holds all splits)
        split = args.split or "test"
        if split not in data:
            raise ValueError(f"{args.data} has no split {split!r}; it has {sorted(data.keys())}.")
        data = data[split]
    elif args.split is not None:
        raise ValueError(f"--split: the {args.data_format} format has no splits; {args.data} is evaluated whole.")
    with _without_datasets_progress_bars():
        images = group_by_image(data)
        if args.limit is not None:
            images = images.select(range(min(args.limit, len(images))))
    return images, split


def _check_arguments(args: argparse.Namespace) -> dict:
    """What would otherwise fail after the captioning, or in the middle of it; returns the `generate` arguments."""
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
        outputs = [Path(args.output_dir) / name for name in (PREDICTIONS_FILE, *METRICS_FILES)]
        inputs = [path for path in (args.data, args.predictions, args.model_card) if path]
        check_gallery_path(args.gallery, output_dir=args.output_dir, taken=outputs + inputs)
    return generate_kwargs


def _load_predictions(args: argparse.Namespace, images) -> dict[Any, str]:
    """The --predictions file's captions of the images to evaluate, with a warning when it covers only some."""
    predictions = load_coco_predictions(args.predictions)
    image_ids = set(images["image_id"])
    if args.limit is not None:  # only the images that --limit kept
        predictions = {image_id: caption for image_id, caption in predictions.items() if image_id in image_ids}
    covered = len(image_ids & predictions.keys())
    if covered < len(image_ids):
        warnings.warn(
            f"{args.predictions} has captions for {covered} of the {len(image_ids)} images evaluated: the scores "
            "cover only those, so do not report them as scores of the whole split.",
            stacklevel=2,
        )
    return predictions


def _write_gallery(
    args: argparse.Namespace, images, predictions: Mapping, per_image: Mapping, unreadable: Collection = ()
) -> None:
    """The --gallery page: each image with a caption (and its scores, if any), and the error of each image id in
    `unreadable`."""
    records = [
        GalleryRecord(
            image=path,
            caption=predictions.get(image_id, ""),
            references=references,
            scores=per_image.get(image_id),
            name=str(image_id),
        )
        for image_id, path, references in zip(images["image_id"], images["image_path"], images["references"])
        if image_id in predictions or image_id in unreadable
    ]
    print(f"Gallery: {write_gallery(records, args.gallery, title=f'Evaluation on {args.data}')}")


def evaluate_command(args: argparse.Namespace) -> int:
    generate_kwargs = _check_arguments(args)
    images, split = _load_split(args)
    output_dir = Path(args.output_dir)
    unreadable = {}
    run = {"data": args.data, "data_format": args.data_format, "split": split, "limit": args.limit}
    if args.predictions:
        # Re-score a predictions file (COCO results format) without running the model.
        predictions = _load_predictions(args, images)
        run["predictions"] = args.predictions
    else:
        model, processor = load_model_and_processor(args.model, args.device)
        max_new_tokens = generate_kwargs.get("max_new_tokens", model.generation_config.max_new_tokens)
        run.update(model=args.model, num_beams=args.num_beams, max_new_tokens=max_new_tokens)
        predictions, unreadable = caption_images(model, processor, images, args.batch_size, **generate_kwargs)
        # Written before scoring, so that a scoring failure (no Java, a bad reference) keeps the captions; this also
        # removes the metrics of earlier captions.
        write_predictions(predictions, output_dir)
    if unreadable:
        if args.gallery:
            _write_gallery(args, images, predictions, {}, unreadable)
        raise UnreadableImagesError(
            list(unreadable.values()),
            len(images),
            "Nothing was scored, since scores over part of a split are not comparable with published ones. The "
            f"captions of the other images are in {output_dir / PREDICTIONS_FILE}.",
        )
    result = _score_images(predictions, images, args.metrics)
    if not result.scores:
        card = f"; {args.model_card} is left as it was" if args.model_card else ""
        raise ValueError(
            f"No metric could be computed: {', '.join(result.skipped_metrics)} cannot run here (see the warnings "
            f"above). No metrics were written{card}."
        )
    # A --predictions file that is the output's predictions.json is left as it is (the scores may cover part of it).
    output = output_dir / PREDICTIONS_FILE
    rewrite = bool(args.predictions) and not (output.exists() and os.path.samefile(args.predictions, output))
    paths = write_evaluation(result, output_dir, with_predictions=rewrite, run=run)
    if args.gallery:
        _write_gallery(args, images, result.predictions, result.per_image)
    print(markdown_table(result), end="")
    print(f"Predictions: {paths['predictions']}\nMetrics: {paths['metrics']}")
    if args.model_card:
        dataset_name = args.dataset_name or f"{args.data_format} {Path(args.data).name}"
        dataset_type = DATASET_TYPES.get(args.data_format, args.data_format)
        fill_model_card(args.model_card, result, dataset_name, dataset_type, split)
        print(f"Model card updated: {args.model_card}")
    return 0


def add_evaluate_parser(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="Caption a dataset and score it with the COCO caption metrics.")
    parser.add_argument("--model", help="A ClipCap folder or Hub name (required unless --predictions is given).")
    parser.add_argument("--data", required=True, help="The annotation file (or image folder for imagefolder).")
    parser.add_argument(
        "--data-format",
        default="coco-karpathy",
        choices=list(DATASET_FORMATS),
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
    "CaptionedImage",
    "EvaluationResult",
    "UnreadableImagesError",
    "caption_images",
    "fill_model_card",
    "generate_captions",
    "iter_captions",
    "markdown_table",
    "score_predictions",
    "write_evaluation",
    "write_predictions",
]
