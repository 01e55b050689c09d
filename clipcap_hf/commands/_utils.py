"""What the `clipcap` subcommands share: image paths, model loading, and argparse types that check option values."""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import PIL.Image
import torch

from ..interpretability import count_candidate_tokens
from ..utils.loading import load_clipcap

PIL.Image.init()  # registers every format plugin, so that the extensions below are complete
# Every extension PIL can open (.avif, .jfif, .ppm, ...), not a fixed list that misses some of them.
IMAGE_SUFFIXES = frozenset(ext for ext, fmt in PIL.Image.registered_extensions().items() if fmt in PIL.Image.OPEN)


def positive_int(text: str) -> int:
    """An argparse `type`: a whole number of at least 1, so that a bad value stops the command before any work."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def port_number(text: str) -> int:
    """An argparse `type`: a TCP port, 1 to 65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be between 1 and 65535, got {value}")
    return value


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def expand_image_paths(patterns: Sequence[str]) -> list[Path]:
    """
    Files, folders (their images, sorted) and glob patterns, in the order given, without duplicates: a file named
    several ways (`a.png`, `dir/../a.png`, its absolute path, a link to it) is kept once, as first named.
    """
    paths: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            # Hidden files are skipped, as glob skips them: macOS writes a `._photo.jpg` beside each photo it copies
            # to a foreign disk, which is no image.
            found = sorted(p for p in path.iterdir() if not p.name.startswith(".") and _is_image_file(p))
        elif path.exists():
            found = [path]
        else:
            # Like a folder, a pattern such as 'dir/*' gives only its images, not notes or sub-folders
            found = sorted(p for p in map(Path, glob.glob(pattern, recursive=True)) if _is_image_file(p))
            if not found:
                raise FileNotFoundError(f"No image matches {pattern!r}.")
        paths.extend(found)
    first_named: dict[Path, Path] = {}
    for path in paths:
        first_named.setdefault(path.resolve(), path)
    unique = list(first_named.values())
    if not unique:
        raise FileNotFoundError(f"No images found in {', '.join(patterns)}.")
    return unique


def resolve_device(device: str | None) -> torch.device:
    """
    The `--device` to run on, checked before any model is loaded: cpu, cuda[:N], mps, or another type whose torch
    backend says it is available (`torch.xpu.is_available()`); never meta. Default: cuda when available, else cpu.
    Under `torchrun` or `accelerate launch` (WORLD_SIZE > 1), `cuda` (given or by default) is each process's own GPU.
    """
    if device is None:
        return _process_gpu() if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device: {device!r} is not a device; use cpu, cuda, cuda:N or mps.") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "meta":  # shapes without data: the model would load, then fail on the first image
        raise ValueError(f"--device {device}: the meta device holds no data, so it cannot run a model; "
                         "use --device cpu.")
    if resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {device}: MPS is not available here; use --device cpu.")
        return resolved
    # cuda and the other accelerators (xpu, hpu, ...): taken where torch's module for them says one is here.
    backend = getattr(torch, resolved.type, None)
    what = "CUDA GPU" if resolved.type == "cuda" else f"{resolved.type} device"
    if not (callable(getattr(backend, "is_available", None)) and backend.is_available()):
        raise ValueError(f"--device {device}: no {what} is available here; use --device cpu.")
    count = backend.device_count() if callable(getattr(backend, "device_count", None)) else None
    if resolved.index is not None and count is not None and resolved.index >= count:
        raise ValueError(f"--device {device}: there are only {count} {what}s "
                         f"({resolved.type}:0 to {resolved.type}:{count - 1}).")
    return _process_gpu() if resolved == torch.device("cuda") else resolved


def _process_gpu() -> torch.device:
    """
    This process's GPU: under `torchrun` or `accelerate launch` (WORLD_SIZE > 1) its own (LOCAL_RANK, modulo the GPUs
    here), since a bare `cuda` is the current GPU, 0 unless set, for every process alike; else `cuda`.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cuda")


def load_model_and_processor(model_name_or_path: str, device: str | None = None):
    """A ClipCap model in eval mode on `device` (default: cuda when available, else cpu), and its processor."""
    resolved = resolve_device(device)
    model, processor = load_clipcap(model_name_or_path, "--model")
    return model.to(resolved).eval(), processor


def check_top_k_fits_vocabulary(top_k: int, model, processor) -> None:
    """Say that `--top-k` is too large before any image is read, naming the option rather than `top_k`."""
    # `interpret_prefix` chooses among the tokenizer's tokens that have an embedding row, the image token excepted.
    candidates = count_candidate_tokens(
        model.get_input_embeddings().num_embeddings, processor, [model.config.image_token_id]
    )
    if top_k > candidates:
        raise ValueError(
            f"--top-k must be at most the vocabulary size less the image token ({candidates}), got {top_k}."
        )


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


def decoding_kwargs(args: argparse.Namespace) -> dict:
    """
    The decoding options of `add_caption_options` (and `add_sampling_options`, where the command has them) as
    `ClipCapCaptioner` arguments. Which of them go together, the captioner decides (`check_decoding_options`).
    """
    kwargs = {"num_beams": args.num_beams, "do_sample": getattr(args, "do_sample", False)}
    # Those not given are left out: the model's generation config decides the length, and the settings a
    # `clipcap caption --output` run records stay those of earlier runs.
    for name in ("max_new_tokens", "top_p", "temperature"):
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


# `clipcap caption` and `clipcap evaluate` decode alike unless told otherwise: greedy, as training's evaluation does.
DEFAULT_NUM_BEAMS = 1


def add_caption_options(parser: argparse.ArgumentParser, batch_size: int) -> None:
    parser.add_argument("--num-beams", type=positive_int, default=DEFAULT_NUM_BEAMS,
                        help=f"Beams for beam search, e.g. 5 (default: {DEFAULT_NUM_BEAMS}, greedy decoding, for both "
                             "`clipcap caption` and `clipcap evaluate`).")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help="Longest caption in tokens (default: the model's generation config: 30 for models "
                             "built here, 67 for converted paper checkpoints).")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size,
                        help=f"Images per batch (default: {batch_size}).")


def positive_float(text: str) -> float:
    """An argparse `type`: a finite number above 0 (a sampling temperature)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def probability(text: str) -> float:
    """An argparse `type`: a probability in (0, 1] (nucleus sampling's top-p)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {text}")
    return value


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(text: str) -> torch.dtype:
    """An argparse `type`: one of `TORCH_DTYPES`' names."""
    if text not in TORCH_DTYPES:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(TORCH_DTYPES)}, got {text!r}")
    return TORCH_DTYPES[text]


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """Sampling instead of greedy or beam search; `decoding_kwargs` turns them into captioner arguments."""
    parser.add_argument("--do-sample", action="store_true",
                        help="Sample the captions instead of taking the likeliest tokens (see --top-p, --temperature).")
    parser.add_argument("--top-p", type=probability, default=None,
                        help="With --do-sample: sample from the smallest set of tokens whose probability reaches P "
                             "(nucleus sampling), e.g. 0.9.")
    parser.add_argument("--temperature", type=positive_float, default=None,
                        help="With --do-sample: divide the logits by T before sampling (below 1: safer captions).")


def stdout_is_utf8() -> bool:
    """Whether stdout can show any text; else JSON output escapes what is not ASCII (`ensure_ascii`)."""
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    return encoding.lower().replace("-", "").replace("_", "") in ("utf8", "utf8sig")

