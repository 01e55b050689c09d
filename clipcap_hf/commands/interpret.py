"""`clipcap interpret IMAGE... --model DIR`: print each prefix vector's nearest language model tokens.

The method itself is `interpretability.py`, which ships with saved models for `trust_remote_code`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..evaluation import UnreadableImagesError
from ..image_processing_clipcap import load_image
from ..utils.file_utils import escape_controls
from ._utils import (
    check_top_k_fits_vocabulary,
    expand_image_paths,
    load_model_and_processor,
    positive_int,
    stdout_is_utf8,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="Image files, folders of images, or glob patterns.")
    parser.add_argument("--model", required=True, help="A ClipCap folder or Hub name.")
    parser.add_argument(
        "--top-k", type=positive_int, default=5, help="Tokens shown per prefix vector, most similar first (default: 5)."
    )
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument(
        "--json", action="store_true", help="Print a JSON list of {image, prefix: [[{token_id, token, similarity}]]}."
    )


def run(args: argparse.Namespace) -> int:
    paths = expand_image_paths(args.images)
    model, processor = load_model_and_processor(args.model, args.device)
    check_top_k_fits_vocabulary(args.top_k, model, processor)

    results, errors = [], []
    try:
        for path in paths:
            try:
                image = load_image(path)
            except ValueError as error:  # like `clipcap caption`: named at the end, the other images still run
                errors.append(str(error))
                results.append({"image": str(path), "prefix": None, "error": str(error)})
                continue
            inputs = processor(images=[image]).to(model.device)
            interpretation = model.interpret_prefix(inputs["pixel_values"], tokenizer=processor, top_k=args.top_k)[0]
            results.append({"image": str(path), "prefix": dataclasses.asdict(interpretation)["matches"]})
            if not args.json:
                print(f"{escape_controls(str(path))}\n{interpretation.format()}", flush=True)
    finally:
        if args.json:  # also when the run fails: the results before it are kept, as valid JSON
            json.dump(results, sys.stdout, indent=2, ensure_ascii=not stdout_is_utf8())
            sys.stdout.write("\n")
    if errors:
        raise UnreadableImagesError(errors, len(paths))
    return 0
