"""`clipcap evaluate`: caption a dataset and score it with the COCO caption metrics."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from ..data import DATASET_FORMATS, group_by_image, load_caption_dataset
from ..evaluation.evaluate import (
    METRICS_FILES,
    PREDICTIONS_FILE,
    EvaluationResult,
    UnreadableImagesError,
    caption_images,
    fill_model_card,
    load_model_card,
    markdown_table,
    score_predictions,
    write_evaluation,
    write_predictions,
)
from ..evaluation.gallery import GalleryRecord, write_gallery
from ..evaluation.metrics import CLIP_METRIC_NAMES, METRIC_NAMES, _format_ids, load_coco_predictions
from ..modeling_clipcap import caption_length
from ..utils.file_utils import check_output_folder
from ..utils.loading import check_caption_fits_positions, check_clip_model
from ._utils import (
    DEFAULT_NUM_BEAMS,
    add_caption_options,
    check_gallery_path,
    decoding_kwargs,
    load_model_and_processor,
    positive_int,
)

BATCH_SIZE = 32
# The options that only captioning reads; --predictions scores captions already made, so it refuses those given.
# Each defaults to None ("not given"), even where it has a default (--num-beams, --batch-size), given after the check.
CAPTIONING_OPTIONS = ("model", "num_beams", "max_new_tokens", "batch_size", "device")

DATASET_TYPES = {
    "coco-karpathy": "coco",
    "coco": "coco",
    "nocaps": "nocaps",
    "conceptual-captions": "conceptual_captions",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--metrics", nargs="+", default=list(METRIC_NAMES), choices=[*METRIC_NAMES, *CLIP_METRIC_NAMES],
                        help="Metrics to compute (default: the COCO ones, all but clipscore and refclipscore, which "
                             "need --clip-model).")
    parser.add_argument("--clip-model", default=None,
                        help="The CLIP model (a transformers CLIPModel folder or Hub name) for clipscore and "
                             "refclipscore; published CLIPScores use openai/clip-vit-base-patch32.")
    add_caption_options(parser, batch_size=BATCH_SIZE)
    # "Not given", so that --predictions can refuse them; then DEFAULT_NUM_BEAMS and BATCH_SIZE.
    parser.set_defaults(num_beams=None, batch_size=None)
    parser.add_argument("--limit", type=positive_int, help="Evaluate only the first N images.")
    parser.add_argument("--device", help="Default: cuda when available, else cpu.")
    parser.add_argument("--model-card", help="A model card (model_card.md) to fill with the results.")
    parser.add_argument("--dataset-name", help="Dataset name for the model card (default: from --data).")
    parser.add_argument("--gallery", help="Also write an HTML page of the images, captions, references and scores.")


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
    The images to evaluate, one row per image (`group_by_image`), the split they come from (`None` for a format
    without splits) and the image ids of the whole split (which --limit may cut short).
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
        split_image_ids = set(images["image_id"])
        if args.limit is not None:
            images = images.select(range(min(args.limit, len(images))))
    return images, split, split_image_ids


def _check_arguments(args: argparse.Namespace) -> dict:
    """What would otherwise fail after the captioning, or in the middle of it; returns the `generate` arguments."""
    if not args.model and not args.predictions:
        raise ValueError("Give --model (to caption the images) or --predictions (to score a results file).")
    if args.predictions:
        _refuse_captioning_options(args)
    if args.max_new_tokens is not None:  # from the model's config: not after the split is read and the model loaded
        check_caption_fits_positions(args.model, args.max_new_tokens, "--max-new-tokens")
    if args.num_beams is None:
        args.num_beams = DEFAULT_NUM_BEAMS
    if args.batch_size is None:
        args.batch_size = BATCH_SIZE
    generate_kwargs = decoding_kwargs(args)
    clip_metrics = [name for name in args.metrics if name in CLIP_METRIC_NAMES]
    if clip_metrics and args.clip_model is None:
        raise ValueError(f"--metrics {' '.join(clip_metrics)} score the captions with CLIP: give --clip-model.")
    if args.clip_model is not None and not clip_metrics:
        raise ValueError("--clip-model is for --metrics clipscore and refclipscore: add them, or leave it out.")
    if args.clip_model is not None:  # its config only, read as data: not after the whole split is captioned
        check_clip_model(args.clip_model, "--clip-model")
    check_output_folder(args.output_dir, "--output-dir", "write the predictions and scores to")
    if args.model_card and not Path(args.model_card).is_file():
        raise FileNotFoundError(f"--model-card: {args.model_card} does not exist.")
    if args.model_card and args.limit is not None:
        raise ValueError(
            "--model-card records scores of the whole split, and --limit scores only part of it: leave out one of them."
        )
    if args.model_card:  # read now, so that a card that cannot be filled is named before the captioning and scoring
        try:
            load_model_card(args.model_card)
        except ValueError as error:
            raise ValueError(f"--model-card: {error}") from error
    if args.gallery:
        outputs = [Path(args.output_dir) / name for name in (PREDICTIONS_FILE, *METRICS_FILES)]
        inputs = [path for path in (args.data, args.predictions, args.model_card) if path]
        check_gallery_path(args.gallery, output_dir=args.output_dir, taken=outputs + inputs)
    return generate_kwargs


def _refuse_captioning_options(args: argparse.Namespace) -> None:
    """Refuse the captioning options given with --predictions, which would ignore them."""
    given = ["--" + name.replace("_", "-") for name in CAPTIONING_OPTIONS if getattr(args, name) is not None]
    if not given:
        return
    options, verb, them = (given[0], "applies", "it") if len(given) == 1 else (
        ", ".join(given[:-1]) + " and " + given[-1], "apply", "them")
    raise ValueError(
        f"{options} only {verb} when captioning, but --predictions scores captions already made: leave {them} out, "
        "or leave out --predictions to caption the images with --model."
    )


def _load_predictions(
    args: argparse.Namespace, images, split: str | None, split_image_ids: Collection
) -> dict[Any, str]:
    """
    The --predictions file's captions of the images to evaluate. Captions of images outside the split are left out
    with a warning naming them (those of images --limit leaves out, silently); a warning (an error with
    --model-card) when the captions cover only some of the images evaluated.
    """
    predictions = load_coco_predictions(args.predictions)
    where = args.data if split is None else f"the {split} split of {args.data}"
    outside = [image_id for image_id in predictions if image_id not in split_image_ids]
    if predictions and len(outside) == len(predictions):
        raise ValueError(
            f"{args.predictions}: none of its image ids ({_format_ids(outside, 5)}) is an image of {where}, whose "
            f"image ids are {_format_ids(sorted(split_image_ids, key=str), 5)}; score it against the data it captions."
        )
    if outside:
        warnings.warn(
            f"{args.predictions} has captions of images that are not in {where}, which are not scored: "
            f"{len(outside)} of its {len(predictions)} (image ids: {_format_ids(outside, 5)}).",
            stacklevel=2,
        )
    image_ids = set(images["image_id"])
    loaded = len(predictions)
    predictions = {image_id: caption for image_id, caption in predictions.items() if image_id in image_ids}
    covered = len(predictions)
    if not covered:  # (a file whose captions are all of other images was refused above)
        held = "no caption" if not loaded else f"no caption of the {len(image_ids)} images --limit keeps"
        raise ValueError(
            f"{args.predictions} holds {held}, so there is nothing to score; give captions of the images evaluated "
            f"(image ids {_format_ids(sorted(image_ids, key=str), 5)})."
        )
    if covered < len(image_ids) and args.model_card:
        raise ValueError(
            f"{args.predictions} has captions for {covered} of the {len(image_ids)} images of the split, and "
            "--model-card records scores of the whole split: caption every image, or leave out --model-card."
        )
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
    print(f"Gallery: {write_gallery(records, args.gallery, title=f'Evaluation on {args.data}')}", file=sys.stderr)


def _score_images(
    predictions: Mapping[Any, str], images, metrics: Sequence[str], clip_model: str | None = None
) -> EvaluationResult:
    """[`score_predictions`] against the references (and nocaps domains) of `group_by_image(dataset)`."""
    if clip_model is not None:  # loaded here, so that its errors name the option, not CLIPScorer's argument
        from ..inference.clip_score import CLIPScorer

        clip_model = CLIPScorer(clip_model, option="--clip-model")
    image_ids = images["image_id"]
    domains = dict(zip(image_ids, images["domain"])) if "domain" in images.column_names else None
    image_paths = dict(zip(image_ids, images["image_path"]))
    result = score_predictions(
        predictions, dict(zip(image_ids, images["references"])), domains, metrics, image_paths, clip_model
    )
    result.image_paths = image_paths
    return result


def run(args: argparse.Namespace) -> int:
    generate_kwargs = _check_arguments(args)
    images, split, split_image_ids = _load_split(args)
    output_dir = Path(args.output_dir)
    unreadable = {}
    run_info = {"data": args.data, "data_format": args.data_format, "split": split, "limit": args.limit}
    if args.clip_model is not None:
        run_info["clip_model"] = args.clip_model
    if args.predictions:
        # Re-score a predictions file (COCO results format) without running the model.
        predictions = _load_predictions(args, images, split, split_image_ids)
        run_info["predictions"] = args.predictions
    else:
        model, processor = load_model_and_processor(args.model, args.device)
        max_new_tokens = generate_kwargs.get("max_new_tokens")
        if max_new_tokens is None:  # the caption length the generation config gives, however it sets it
            max_new_tokens = caption_length(model.generation_config, model.config.prefix_length)
        run_info.update(model=args.model, num_beams=args.num_beams, max_new_tokens=max_new_tokens)
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
    result = _score_images(predictions, images, args.metrics, args.clip_model)
    if not result.scores:
        card = f"; {args.model_card} is left as it was" if args.model_card else ""
        raise ValueError(
            f"No metric could be computed: {', '.join(result.skipped_metrics)} cannot run here (see the warnings "
            f"above). No metrics were written{card}."
        )
    # A --predictions file that is the output's predictions.json is left as it is (the scores may cover part of it).
    output = output_dir / PREDICTIONS_FILE
    rewrite = bool(args.predictions) and not (output.exists() and os.path.samefile(args.predictions, output))
    paths = write_evaluation(result, output_dir, with_predictions=rewrite, run=run_info)
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
