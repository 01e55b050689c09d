"""`clipcap export-onnx MODEL --output DIR`: the model as ONNX graphs, for ONNX Runtime and the browser page."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..utils.file_utils import check_output_folder
from ..utils.loading import load_clipcap


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="A ClipCap folder or Hub name.")
    parser.add_argument("--output", required=True, help="The folder to write (config, processor, onnx/*.onnx).")
    parser.add_argument("--no-int8", dest="int8", action="store_false",
                        help="Write only the fp32 graphs, not their int8 copies (onnx/*_quantized.onnx).")
    parser.add_argument("--int8-per-tensor", dest="int8_per_channel", action="store_false",
                        help="Quantize each int8 weight matrix with one scale, not one per output channel (the "
                        "default, which changes fewer tokens at the same speed: docs/onnx.md).")
    parser.add_argument("--overwrite", action="store_true", help="Write into --output even when it holds files.")


def run(args: argparse.Namespace) -> int:
    from ..onnx import export_onnx
    from ..onnx.export import abandoned_exports

    output = Path(args.output)
    check_output_folder(output, "--output", "write the export to")
    # What a killed export left there does not count: the export removes it.
    abandoned = abandoned_exports(output)
    if output.is_dir() and any(path not in abandoned for path in output.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--output: {output} is not empty; name a new folder, or pass --overwrite.")
    model, processor = load_clipcap(args.model, "MODEL")
    # Written whole or not at all: a failed export leaves --output as it was, so a retry is not refused.
    paths = export_onnx(model, processor, output, quantize=args.int8, per_channel=args.int8_per_channel)
    for path in paths.values():
        print(path)
    return 0
