"""The `clipcap` command line: `clipcap caption IMAGE... --model DIR` and the other subcommands."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .convert_original import add_convert_parser
from .evaluation import add_evaluate_parser
from .cli_interpret import add_interpret_parser
from .demo import add_demo_parser
from .quickstart import add_quickstart_parser
from .training import add_train_parser

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def expand_image_paths(patterns: Sequence[str]) -> list[Path]:
    """Files, folders (their images, sorted) and glob patterns, in the order given, without duplicates."""
    paths: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            found = [path]
        else:
            # Like a folder, a pattern such as 'dir/*' gives only its images, not notes or sub-folders
            matches = (Path(match) for match in glob.glob(pattern, recursive=True))
            found = sorted(p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"No image matches {pattern!r}.")
        paths.extend(found)
    unique = list(dict.fromkeys(paths))
    if not unique:
        raise FileNotFoundError(f"No images found in {', '.join(patterns)}.")
    return unique


def load_model_and_processor(model_name_or_path: str, device: str | None = None):
    """A ClipCap model in eval mode on `device` (default: cuda when available, else cpu), and its processor."""
    import torch
    from transformers import AutoProcessor

    from .modeling_clipcap import ClipCapForConditionalGeneration

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = ClipCapForConditionalGeneration.from_pretrained(model_name_or_path).to(device).eval()
    return model, AutoProcessor.from_pretrained(model_name_or_path)


def check_top_k_fits_vocabulary(top_k: int, model, processor) -> None:
    """Say that `--top-k` is too large before any image is read, naming the option rather than `top_k`."""
    # `interpret_prefix` chooses among the tokenizer's tokens that have an embedding row.
    vocab_size = min(len(processor.tokenizer), model.get_input_embeddings().num_embeddings)
    if top_k > vocab_size:
        raise ValueError(f"--top-k must be at most the vocabulary size ({vocab_size}), got {top_k}.")


def check_gallery_path(gallery: str, output_dir: str | None = None, taken: Iterable[str | os.PathLike] = ()) -> None:
    """
    Say before any work, not after it, that `--gallery` cannot or must not be written. It must name an .html or .htm
    file, other than the files the command reads or writes (`taken`), so that it never replaces an image or a
    result. Its folder must exist, or be `output_dir`, which the command creates.
    """
    path = Path(gallery)
    if path.is_dir():
        raise IsADirectoryError(f"--gallery: {gallery} is a folder; name the HTML file to write.")
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"--gallery: {gallery} is not an .html file name; name the HTML page to write, "
                         "e.g. gallery.html.")
    target = path.resolve()
    for other in taken:
        if Path(other).resolve() == target:
            raise ValueError(f"--gallery: {gallery} is also a file this command reads or writes ({other}); "
                             "name another HTML file.")
    folder = path.parent
    if not folder.is_dir() and not (output_dir is not None and folder.resolve() == Path(output_dir).resolve()):
        raise FileNotFoundError(f"--gallery: folder {folder} does not exist.")


def check_caption_options(args: argparse.Namespace) -> dict:
    """Check the decoding options shared by caption and evaluate; return them as `generate` arguments."""
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    if args.num_beams < 1:
        raise ValueError(f"--num-beams must be at least 1, got {args.num_beams}.")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}.")
    generate_kwargs = {"num_beams": args.num_beams, "do_sample": False}
    if args.max_new_tokens is not None:  # otherwise the model's generation config decides
        generate_kwargs["max_new_tokens"] = args.max_new_tokens
    return generate_kwargs


def add_caption_options(parser: argparse.ArgumentParser, num_beams: int, batch_size: int) -> None:
    parser.add_argument("--num-beams", type=int, default=num_beams,
                        help=f"Beams for beam search; 1 is greedy decoding (default: {num_beams}).")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="Longest caption in tokens (default: the model's generation config: 30 for models "
                             "built here, 67 for converted paper checkpoints).")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"Images per batch (default: {batch_size}).")


def caption_command(args: argparse.Namespace) -> int:
    from .evaluation import UnreadableImagesError, iter_captions

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
                        print(f"{result.path}\t{result.caption}", flush=True)
            results.extend(batch)
    finally:
        if args.json:  # also when the run fails: the captions made before are kept, as valid JSON
            entries = [
                {"image": str(result.path), "caption": result.caption}
                if result.error is None
                else {"image": str(result.path), "caption": None, "error": result.error}
                for result in results
            ]
            json.dump(entries, sys.stdout, indent=2, ensure_ascii=False)
            sys.stdout.write("\n")
        if args.gallery and results:  # likewise the gallery; an unreadable image shows its name and the error
            from .gallery import GalleryRecord, write_gallery

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
    try:
        return args.handler(args)
    except (ValueError, OSError, ImportError) as error:
        # An ImportError here is a missing optional extra (gradio, pycocoevalcap); its message says what to install.
        # An OSError covers missing files and a --model folder that does not exist or holds no weights.
        print(f"clipcap {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
