"""`clipcap caption IMAGE... --model DIR`: print a caption for each image (needs neither `datasets` nor `evaluate`)."""

from __future__ import annotations

import argparse
import json
import sys

from ..evaluation import UnreadableImagesError, iter_captions
from ..evaluation.gallery import GalleryRecord, write_gallery
from ..utils.file_utils import escape_controls
from ._utils import (
    add_caption_options,
    check_gallery_path,
    decoding_kwargs,
    expand_image_paths,
    load_model_and_processor,
    stdout_is_utf8,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="Image files, folders of images, or glob patterns.")
    parser.add_argument("--model", required=True, help="A ClipCap folder or Hub name.")
    add_caption_options(parser, batch_size=16)
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--json", action="store_true",
                        help="Print a JSON list of {image, caption}, one per image in order; an image that cannot "
                             "be read has caption null and an error.")
    parser.add_argument("--gallery", default=None, help="Also write an HTML page of the images and their captions.")


def run(args: argparse.Namespace) -> int:
    generate_kwargs = decoding_kwargs(args)
    paths = expand_image_paths(args.images)
    if args.gallery:
        check_gallery_path(args.gallery, taken=paths)
    model, processor = load_model_and_processor(args.model, args.device)

    results = []
    try:
        for batch in iter_captions(model, processor, paths, args.batch_size, **generate_kwargs):
            if not args.json:  # print as we go, so that a failure later on loses none of the captions before it
                for result in batch:
                    if result.error is None:
                        # One line per image: a newline or tab in a caption or file name would break the
                        # PATH<TAB>CAPTION lines; the caption's whitespace is collapsed, the name's escaped.
                        caption = " ".join(result.caption.split())
                        print(f"{escape_controls(str(result.path))}\t{caption}", flush=True)
            results.extend(batch)
    finally:
        if args.json:  # also when the run fails: the captions made before are kept, as valid JSON
            entries = [
                {"image": str(result.path), "caption": result.caption}
                if result.error is None
                else {"image": str(result.path), "caption": None, "error": result.error}
                for result in results
            ]
            json.dump(entries, sys.stdout, indent=2, ensure_ascii=not stdout_is_utf8())
            sys.stdout.write("\n")
        if args.gallery and results:  # likewise the gallery; an unreadable image shows its name and the error
            records = [GalleryRecord(result.path, result.caption or "") for result in results]
            gallery = write_gallery(records, args.gallery, title=f"Captions by {args.model}")
            print(f"Gallery: {gallery}", file=sys.stderr)
    errors = [result.error for result in results if result.error is not None]
    if errors:  # after the other images' captions, JSON and gallery
        raise UnreadableImagesError(errors, len(results))
    return 0
