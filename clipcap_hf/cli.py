"""The `clipcap` command line: `clipcap caption IMAGE... --model DIR` and the other subcommands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from .cli_interpret import add_interpret_parser
from .cli_utils import (
    add_caption_options,
    check_caption_options,
    check_gallery_path,
    expand_image_paths,
    load_model_and_processor,
    stdout_is_utf8,
)
from .convert_original import add_convert_parser
from .demo import add_demo_parser
from .evaluation import UnreadableImagesError, add_evaluate_parser, iter_captions
from .gallery import GalleryRecord, write_gallery
from .quickstart import add_quickstart_parser
from .training import add_train_parser


def caption_command(args: argparse.Namespace) -> int:
    generate_kwargs = check_caption_options(args)
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
                        # One line per image: a newline or tab in a caption would break the PATH<TAB>CAPTION lines.
                        print(f"{result.path}\t{' '.join(result.caption.split())}", flush=True)
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


def add_caption_parser(subparsers) -> None:
    parser = subparsers.add_parser("caption", help="Caption image files, folders or glob patterns.")
    parser.add_argument("images", nargs="+", help="Image files, folders of images, or glob patterns.")
    parser.add_argument("--model", required=True, help="A ClipCap folder or Hub name.")
    add_caption_options(parser, num_beams=1, batch_size=16)
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--json", action="store_true",
                        help="Print a JSON list of {image, caption}, one per image in order; an image that cannot "
                             "be read has caption null and an error.")
    parser.add_argument("--gallery", default=None, help="Also write an HTML page of the images and their captions.")
    parser.set_defaults(handler=caption_command)


# Each subcommand module contributes one `add_*_parser(subparsers)`; listed here so `clipcap --help` shows all.
PARSER_BUILDERS: list[Callable] = [
    add_caption_parser,
    add_convert_parser,
    add_evaluate_parser,
    add_interpret_parser,
    add_demo_parser,
    add_quickstart_parser,
    add_train_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipcap", description="ClipCap image captioning with Hugging Face.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_parser in PARSER_BUILDERS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        # A file name or caption that stdout's encoding cannot show (cp1252 on Windows) is escaped, not fatal.
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        return args.handler(args)
    except BrokenPipeError:
        # The reader went away (`clipcap caption ... | head -1`): stop quietly, with the exit status of a program
        # ended by SIGPIPE (128 + 13), as `cat` would give. Python would report the pipe again when it flushes
        # stdout at exit, so stdout now points at devnull (see the `signal` module's documentation).
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (AttributeError, OSError, ValueError):  # stdout is no real file (replaced by a caller)
            pass
        return 141
    except (ValueError, OSError, ImportError) as error:
        # An ImportError here is a missing optional extra (gradio, pycocoevalcap); its message says what to install.
        # An OSError covers missing files and a --model folder that does not exist or holds no weights.
        print(f"clipcap {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
