"""`clipcap embed --model MODEL --train_file DATA --output DIR`: every unique image of a source embedded once.

Takes the source options of `clipcap train` (`--dataset_name`, `--train_file`, `--image_column`, `--caption_column`,
`--dataset_format`, `--streaming`, ...). Under `torchrun` or `accelerate launch` every process embeds its own share
and writes its own shards; a rerun after a crash completes the folder. `clipcap train --embeddings DIR` trains
from the folder.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # No option of its own (prefix '+'), so every `--flag`, `--help` included, reaches the HfArgumentParser.
    parser.add_argument("arguments", nargs=argparse.REMAINDER)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import embed_source
    from ..data.prepare import load_source
    from ..training.arguments import ClipCapArgumentParser, EmbedArguments
    from ..utils.loading import load_clipcap
    from ._utils import resolve_device

    parser = ClipCapArgumentParser(EmbedArguments, prog="clipcap embed")
    (embed_args,) = parser.parse_args_into_dataclasses(args=args.arguments, look_for_args_file=False)
    device = resolve_device(embed_args.device)
    _join_process_group(device)
    is_main_process = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    model, processor = load_clipcap(embed_args.model, "--model")
    source = load_source(embed_args, "train", captions_required=False)
    keep_columns = [name.strip() for name in (embed_args.keep_columns or "").split(",") if name.strip()]
    try:
        info = embed_source(
            source,
            model,
            processor.image_processor,
            embed_args.output,
            batch_size=embed_args.batch_size,
            device=device,
            num_workers=embed_args.preprocessing_num_workers,
            on_bad_image=embed_args.on_bad_image,
            keep_columns=keep_columns,
            source_name=embed_args.dataset_name or embed_args.train_file,
            check_source=True,  # a folder to train from: its captions must be this source's
        )
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if is_main_process:
        summary = {name: info.get(name) for name in ("num_images", "num_shards", "num_skipped", "embedding_dim")}
        print(json.dumps({"output": embed_args.output, **summary}))
    return 0


def _join_process_group(device) -> None:
    """
    Join the process group of `torchrun` / `accelerate launch` (their environment names the rank and world size):
    NCCL on this process's GPU `device`, else gloo.
    """
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
