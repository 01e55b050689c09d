"""`clipcap export-onnx MODEL --output DIR`: the model as ONNX graphs, for ONNX Runtime and the browser page."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..configuration_clipcap import local_folder
from ..utils.loading import WEIGHT_FILE_PATTERNS, load_clipcap


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="A ClipCap folder or Hub name.")
    parser.add_argument("--output", required=True, help="The folder to write (config, processor, onnx/*.onnx).")
    parser.add_argument("--no-int8", dest="int8", action="store_false",
                        help="Write only the fp32 graphs, not their int8 copies (onnx/*_quantized.onnx).")
    parser.add_argument("--int8-per-tensor", dest="int8_per_channel", action="store_false",
                        help="Quantize each int8 weight matrix with one scale, not one per output channel (the "
                        "default, which changes fewer tokens at the same speed: docs/onnx.md).")
    parser.add_argument("--overwrite", action="store_true", help="Write into --output even when it holds files.")


def check_not_an_export(name_or_path: str, option: str) -> None:
    """
    Refuse an ONNX export given as the model (`option`): its config.json is a ClipCap model's, but it holds no
    weights, which transformers would report in its own words only.
    """
    from ..onnx.export import ONNX_SUBFOLDER

    folder = Path(local_folder(name_or_path))
    if (folder / ONNX_SUBFOLDER / "decoder_model_merged.onnx").is_file() and not any(
        next(folder.glob(pattern), None) for pattern in WEIGHT_FILE_PATTERNS
    ):
        raise ValueError(
            f"{option}: {name_or_path} is an ONNX export (no weights); give the ClipCap model folder it was exported "
            "from."
        )


def run(args: argparse.Namespace) -> int:
    from ..onnx import export_onnx
    from ..onnx.export import check_export_dependencies, check_export_folder

    # Before the model loads: a refusal then costs no loading time.
    check_export_dependencies(args.int8)
    check_export_folder(args.output, args.overwrite, "--output", "--overwrite")
    check_not_an_export(args.model, "MODEL")
    model, processor = load_clipcap(args.model, "MODEL")
    # Written whole or not at all: a failed export leaves --output as it was, so a retry is not refused.
    paths = export_onnx(model, processor, args.output, quantize=args.int8, per_channel=args.int8_per_channel,
                        overwrite=args.overwrite)
    for path in paths.values():
        print(path)
    return 0
