"""Caption image files with a ClipCap model, score captions with the COCO caption metrics, write the results."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard
from tqdm.auto import tqdm

from ..utils.file_utils import escape_controls, write_text_atomically
from .metrics import (
    CLIP_METRIC_NAMES,
    CLIP_SCORE_KEYS,
    METRIC_NAMES,
    SCORE_KEYS,
    caption_tokenization,
    compute_caption_metrics,
    compute_clip_metrics,
)

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
    "CLIPScore": "CLIPScore",
    "RefCLIPScore": "RefCLIPScore",
}
# The model card's `model-index` names metrics by their Hub metric id (the variant, e.g. BLEU-4, goes in `name`),
# and the task as the paper's rows in model_card.md do.
METRIC_TYPES = {key: metric for metric, keys in SCORE_KEYS.items() for key in keys} | {
    key: metric for metric, key in CLIP_SCORE_KEYS.items()
}
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
    """How the captions were tokenized (see `clipcap_hf.evaluation.metrics.caption_tokenization`)."""
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
    candidates: list[str] | None = None
    """Every caption generated for the image, when more than one was asked for."""
    clip_score: float | None = None
    """The caption's CLIPScore, when CLIP chose it among candidates."""


class UnreadableImagesError(ValueError):
    """Some image files could not be read; `errors` holds one message per file, naming it and the reason."""

    def __init__(self, errors: Sequence[str], total: int, consequence: str = ""):
        self.errors = list(errors)
        # One line per file, even for a file name holding a newline.
        listed = "".join(f"\n  {escape_controls(error)}" for error in self.errors[:_MAX_LISTED])
        if len(self.errors) > _MAX_LISTED:
            listed += f"\n  ... and {len(self.errors) - _MAX_LISTED} more"
        message = f"{len(self.errors)} of {total} images could not be read:{listed}"
        super().__init__(f"{message}\n{consequence}" if consequence else message)


def iter_captions(
    model, processor, image_paths: Sequence[str | os.PathLike], batch_size: int = 32, **captioner_kwargs
) -> Iterator[list[CaptionedImage]]:
    """
    Caption image files in batches, with a progress bar, yielding each batch's results, in order, as soon as they
    are ready. A file that cannot be read does not stop the run: its result holds the error instead of a caption.
    `captioner_kwargs` are [`~clipcap_hf.inference.ClipCapCaptioner`]'s: decoding options, and `num_candidates`
    with a `reranker`. One caption per image (not the generation config's `num_return_sequences`, which would
    decode captions that are dropped).

    Until the generator is exhausted or closed, it holds one [`~clipcap_hf.inference.captioning_run`] block: on the
    CPU, each weight that oneDNN computes is packed once for all the batches, the model's layers stay routed (and
    the packed copies kept) between batches, and the memory one batch frees serves the next (glibc's switches, for
    the whole process: the consumer's own work between batches keeps what it frees too); a consumer that stops early
    should close it (`contextlib.closing`) to end the block at once.
    """
    from ..inference import ClipCapCaptioner, captioning_run
    from ..inference.captioner import decode_image

    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
    captioner = ClipCapCaptioner(model, processor, **{"num_return_sequences": 1, **captioner_kwargs})
    with (
        tqdm(total=len(image_paths), unit="image", desc="Captioning", disable=len(image_paths) <= batch_size) as bar,
        # Over all the batches, not per batch: each weight is packed once. Entered after the captioner has moved the
        # model to its device and dtype, which decide the kernels.
        captioning_run(captioner.model),
    ):
        for start in range(0, len(image_paths), batch_size):
            paths = list(image_paths[start : start + batch_size])
            images, errors = {}, {}
            for index, path in enumerate(paths):
                try:  # converted as the processor would, so that a file it refuses is named here
                    images[index] = decode_image(path)
                except ValueError as error:  # its message names the file and the reason
                    errors[index] = str(error)
            result = captioner.caption(images=list(images.values()))
            positions = {index: position for position, index in enumerate(images)}
            bar.update(len(paths))
            yield [
                CaptionedImage(path, None, errors[index])
                if index in errors
                else CaptionedImage(
                    path,
                    result.captions[positions[index]],
                    candidates=None if result.candidates is None else result.candidates[positions[index]],
                    clip_score=None if result.scores is None else result.scores[positions[index]],
                )
                for index, path in enumerate(paths)
            ]


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
    image_paths: Mapping[Any, str | os.PathLike] | None = None,
    clip_model=None,
) -> EvaluationResult:
    """
    Score predictions (one caption per image id) against references; with `domains` (nocaps' in-domain,
    near-domain, out-domain per image) also score each domain on its own images, as the nocaps evaluation does.
    `metrics` may name the COCO metrics and `"clipscore"`, `"refclipscore"`; those two need `image_paths` and
    `clip_model` (see [`~clipcap_hf.evaluation.metrics.compute_clip_metrics`]).
    """
    coco_metrics = [name for name in metrics if name not in CLIP_METRIC_NAMES]
    clip_metrics = [name for name in metrics if name in CLIP_METRIC_NAMES]
    scores, per_image = {}, {image_id: {} for image_id in predictions}
    if coco_metrics:
        scores, per_image = compute_caption_metrics(
            predictions, references, metrics=coco_metrics, return_per_image=True
        )
    if clip_metrics:
        if image_paths is None or clip_model is None:
            raise ValueError(f"{', '.join(clip_metrics)} need the images (`image_paths`) and a CLIP model.")
        with warnings.catch_warnings():
            if coco_metrics:  # the same input checks have warned already (empty captions)
                warnings.simplefilter("ignore")
            clip_scores, clip_per_image = compute_clip_metrics(
                predictions, image_paths, clip_model, references=references, metrics=clip_metrics
            )
        scores.update(clip_scores)
        for image_id, image_scores in clip_per_image.items():
            per_image[image_id].update(image_scores)
    domain_scores = {}
    if domains is not None:
        # A None domain would be a domain of its own, or fail to sort among the others naming no image.
        without_domain = [image_id for image_id in predictions if not isinstance(domains.get(image_id), str)]
        if without_domain:
            raise ValueError(
                f"`domains` has no domain for the predicted image ids {without_domain[:10]}; give every predicted "
                "image its domain (a string), or no `domains`."
            )
    # The domains of the predicted images: a predictions file may cover some domains only.
    for domain in sorted({domains[image_id] for image_id in predictions} if domains is not None else ()):
        subset = {image_id: caption for image_id, caption in predictions.items() if domains[image_id] == domain}
        domain_scores[domain] = {}
        if coco_metrics:
            with warnings.catch_warnings():  # the overall scoring has warned of everything (empty captions, ...)
                warnings.simplefilter("ignore")
                domain_scores[domain] = compute_caption_metrics(subset, references, metrics=coco_metrics)
        for name in clip_metrics:  # CLIP scores are means over images: the domain's mean
            key = CLIP_SCORE_KEYS[name]
            domain_scores[domain][key] = sum(per_image[image_id][key] for image_id in subset) / len(subset)
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
        repeated = next(image_id for image_id, count in Counter(image_ids).items() if count > 1)
        raise ValueError(
            f"image_id {repeated!r} is on several rows of `images`, which must hold one row per image: give "
            "group_by_image(dataset) (each image once, with its references)."
        )
    batches = iter_captions(model, processor, images["image_path"], batch_size, **generate_kwargs)
    # Closed when done: `zip` stops at the last image id without running the generator to its end.
    with contextlib.closing(batches):
        results = dict(zip(image_ids, itertools.chain.from_iterable(batches)))
    captions = {image_id: result.caption for image_id, result in results.items() if result.error is None}
    unreadable = {image_id: result.error for image_id, result in results.items() if result.error is not None}
    return captions, unreadable


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


def load_model_card(card_path: str | os.PathLike) -> ModelCard:
    """
    The model card [`fill_model_card`] fills, checked first: a ValueError naming the card and what to correct when
    its YAML header does not parse or is not model card metadata, or the results markers are missing.
    """
    header = "its YAML header (the lines between the --- lines at the top)"
    try:
        card = ModelCard.load(card_path)
    except yaml.YAMLError as error:
        mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
        if mark is None or not problem:
            problem, where = " ".join(str(error).split()), ""
        else:  # yaml's own message spans several lines, quoting the header
            where = f" (line {mark.line + 1}, column {mark.column + 1} of the header)"
        raise ValueError(f"{card_path}: {header} is not valid YAML: {problem}{where}. Correct the header.") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{card_path} is not UTF-8 text ({error}); save it as UTF-8.") from error
    except (TypeError, ValueError) as error:  # huggingface_hub's: a header that is not a mapping of names, a bad field
        # Its advice (`ignore_metadata_errors=True`) is for its own API, and would lose the metadata here.
        reason = str(error).split(" Pass `ignore_metadata_errors", 1)[0].rstrip(".")
        raise ValueError(f"{card_path}: {header} is not model card metadata: {reason}. Correct the header.") from error
    if RESULTS_START not in card.text or RESULTS_END not in card.text.split(RESULTS_START, 1)[1]:
        raise ValueError(
            f"{card_path} has no results section to fill: add the lines {RESULTS_START} and {RESULTS_END} (in this "
            "order) where the evaluation table belongs."
        )
    return card


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
    card = load_model_card(card_path)
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
    # Through a temporary file, as the other outputs: `card.save` rewrites the file in place, so a write failing part
    # way (a full disk) would leave the user's only copy cut short. `str(card)` is what `card.save` writes.
    write_text_atomically(card_path, str(card))
