"""`clipcap interpret IMAGE... --model DIR [--compare OTHER]`: print each prefix vector's nearest language model
tokens; with `--compare`, two models side by side (the paper's comparison of a frozen and a fine-tuned language model),
in text, JSON or an HTML gallery.

The method itself is `interpretability.py`, which ships with saved models for `trust_remote_code`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from ..evaluation import UnreadableImagesError
from ..inference.captioner import decode_image
from ..interpretability import PrefixInterpretation, interpret_prefix_embeds
from ..modeling_clipcap import ClipCapForConditionalGeneration
from ..processing_clipcap import ClipCapProcessor
from ..utils.file_utils import escape_controls
from ..utils.loading import load_clipcap
from ._utils import (
    check_gallery_path,
    check_top_k_fits_vocabulary,
    expand_image_paths,
    positive_int,
    resolve_device,
    stdout_is_utf8,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="Image files, folders of images, or glob patterns.")
    parser.add_argument("--model", required=True, help="A ClipCap folder or Hub name.")
    parser.add_argument(
        "--compare", default=None, metavar="OTHER_MODEL",
        help="A second ClipCap model, shown beside --model with its caption (e.g. a frozen and a fine-tuned language "
             "model, as the paper compares them).",
    )
    parser.add_argument(
        "--top-k", type=positive_int, default=5, help="Tokens shown per prefix vector, most similar first (default: 5)."
    )
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument(
        "--json", action="store_true",
        help="Print a JSON list of {image, prefix: [[{token_id, token, similarity}]]}; with --compare, of "
             "{image, models: [{model, caption, prefix}]}.",
    )
    parser.add_argument("--gallery", default=None,
                        help="Also write an HTML page of the images beside each model's caption and prefix words.")


@dataclasses.dataclass
class _Reading:
    """One model's reading of one image."""

    model: str
    interpretation: PrefixInterpretation
    caption: str | None = None


def run(args: argparse.Namespace) -> int:
    paths = expand_image_paths(args.images)
    if args.compare is not None and _same_model(args.model, args.compare):
        raise ValueError(f"--compare names the same model as --model ({args.model}); name another one.")
    if args.gallery:
        check_gallery_path(args.gallery, taken=paths)
    device = resolve_device(args.device)
    names = [args.model] + ([args.compare] if args.compare is not None else [])
    models = []
    for name, option in zip(names, ("--model", "--compare")):
        model, processor = load_clipcap(name, option)  # errors name the option
        check_top_k_fits_vocabulary(args.top_k, model, processor)
        models.append((name, model.to(device).eval(), processor))
    comparing = len(models) > 1

    # The gallery's rows: paths, not images (it reads each image again for its thumbnail, as `clipcap caption`'s
    # does), so that a long run holds one decoded image at a time.
    results, errors, gallery_rows = [], [], []
    for path in paths:
        try:  # converted as the processor would, so that a file it refuses (a float TIFF of [0, 255] values) is named
            image = decode_image(path)
        except ValueError as error:  # like `clipcap caption`: named at the end, the other images still run
            errors.append(str(error))
            results.append({"image": str(path), ("models" if comparing else "prefix"): None, "error": str(error)})
            if args.gallery:  # shown with its name and the error
                gallery_rows.append((path, []))
            continue
        image_readings = [_read(name, model, processor, image, args.top_k, caption=comparing or bool(args.gallery))
                          for name, model, processor in models]
        if args.gallery:
            gallery_rows.append((path, image_readings))
        results.append(_json_result(path, image_readings, comparing))
        if not args.json:
            text = _side_by_side(image_readings) if comparing else image_readings[0].interpretation.format()
            print(f"{escape_controls(str(path))}\n{text}", flush=True)
    # Only a run that went through every image (unreadable ones included) writes them: one stopped by Ctrl-C or a
    # crash would replace a complete earlier gallery with part of one, and print a JSON list that looks complete.
    if args.json:
        json.dump(results, sys.stdout, indent=2, ensure_ascii=not stdout_is_utf8())
        sys.stdout.write("\n")
    if args.gallery:
        _write_gallery(args.gallery, gallery_rows, names)
    if errors:
        raise UnreadableImagesError(errors, len(paths))
    return 0


def _same_model(name: str, other: str) -> bool:
    """Whether two names load one model: the same folder however spelt (`q_a`, `./q_a`, a link), or one Hub name."""
    if os.path.isdir(name) and os.path.isdir(other):
        return os.path.samefile(name, other)
    return name == other


def _read(
    name: str,
    model: ClipCapForConditionalGeneration,
    processor: ClipCapProcessor,
    image: PIL.Image.Image,
    top_k: int,
    caption: bool,
) -> _Reading:
    """One model's prefix interpretation of one image, and its caption when `caption`."""
    inputs = processor(images=[image]).to(model.device)
    # The prefix is computed once and read both ways: from the pixels, `generate` would run the vision tower and the
    # mapping network again.
    with torch.no_grad():
        prefix_embeds = model.get_prefix_embeds(pixel_values=inputs.pop("pixel_values"))
    interpretation = interpret_prefix_embeds(
        prefix_embeds, model.get_input_embeddings().weight, processor, top_k, [model.config.image_token_id]
    )[0]
    text = None
    if caption:  # greedy, as `clipcap caption` by default
        generated = model.generate(**inputs, prefix_embeds=prefix_embeds, num_beams=1, do_sample=False)
        text = processor.post_process_image_text_to_text(generated)[0]
    return _Reading(name, interpretation, text)


def _json_result(path: Path, readings: list[_Reading], comparing: bool) -> dict[str, Any]:
    """One image's JSON record: its prefix matches, or with `--compare` each model's caption and matches."""
    if not comparing:
        return {"image": str(path), "prefix": dataclasses.asdict(readings[0].interpretation)["matches"]}
    models = [
        {"model": reading.model, "caption": reading.caption,
         "prefix": dataclasses.asdict(reading.interpretation)["matches"]}
        for reading in readings
    ]
    return {"image": str(path), "models": models}


def _side_by_side(readings: list[_Reading]) -> str:
    """Each model's caption, then one line per prefix position with each model's nearest tokens in its own column."""
    lines = [f"  caption ({escape_controls(reading.model)}): {escape_controls(reading.caption)}"
             for reading in readings]
    columns = [reading.interpretation.format_matches() for reading in readings]
    width = max(len(cell) for cell in columns[0]) if columns[0] else 0
    for position in range(max(len(column) for column in columns)):
        cells = [column[position] if position < len(column) else "" for column in columns]
        lines.append(f"{position:>3}: {cells[0]:<{width}}  |  {cells[1]}".rstrip())
    return "\n".join(lines)


def _write_gallery(path: str, rows: list[tuple[Path, list[_Reading]]], names: list[str]) -> None:
    """
    The HTML page: each image, the first model's caption, then each model's prefix words and the others' captions.
    An image without readings (unreadable) shows its name and the error in place of the thumbnail.
    """
    from ..evaluation.gallery import write_gallery

    records = []
    for image_path, image_readings in rows:
        if not image_readings:
            records.append({"image": image_path, "caption": ""})
            continue
        first, *others = image_readings
        columns = {f"prefix ({first.model})": _prefix_words(first.interpretation)}
        for reading in others:
            columns[f"caption ({reading.model})"] = reading.caption
            columns[f"prefix ({reading.model})"] = _prefix_words(reading.interpretation)
        records.append({"image": image_path, "caption": first.caption, "columns": columns})
    title = "Prefix interpretability: " + " vs ".join(names)
    written = write_gallery(records, path, title=title, caption_title=f"caption ({names[0]})")
    print(f"Gallery: {written}", file=sys.stderr)


def _prefix_words(interpretation: PrefixInterpretation) -> str:
    """The nearest token of each prefix vector, quoted, as the paper reads a prefix."""
    return " ".join(position[0].label for position in interpretation.matches)
