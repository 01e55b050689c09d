"""Captions per second on the CPU: ONNX Runtime (fp32 graphs, and int8 graphs with a weight scale per output channel,
the default, or per matrix) against PyTorch's `generate()` (fp32 and int8 weight-only with torchao), on the same
images, greedy or with `--num-beams`.

The model is GPT-2 small sized with random weights and no EOS (as in bench_generate.py), so every caption runs the
full length and every side makes the same number of decoder steps; it reads 512-d CLIP embeddings (the
`mapping_network.onnx` entry), so the timings are the language model's. Token agreement: the fraction of images whose
caption tokens equal PyTorch fp32's (fp32 ONNX must give 1.0; int8 shows what quantization changes). ONNX Runtime
runs with as many threads as PyTorch (`torch.get_num_threads()`).

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime
import torch
from _common import cpu_name
from transformers import GPT2Config

from clipcap_hf import ClipCapConfig, ClipCapForConditionalGeneration, ClipCapProcessor
from clipcap_hf.onnx import GRAPHS, OnnxCaptioner, caption_agreement, export_onnx
from clipcap_hf.onnx.export import QUANTIZED_SUFFIX, quantize_graphs
from clipcap_hf.utils.quantization import quantize_int8_weight_only


def captions_per_second(run: Callable[[], list], images: int) -> tuple[float, list]:
    """Captions per second of one `run()` of `images` images after an untimed one, and its tokens."""
    run()  # warm-up: the first call maps memory and picks kernels
    start = time.perf_counter()
    tokens = run()
    return images / (time.perf_counter() - start), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--num-beams", type=int, default=1)
    args = parser.parse_args()

    torch.manual_seed(0)
    text_config = GPT2Config(bos_token_id=None, eos_token_id=None)  # GPT-2 small: 124M parameters
    model = ClipCapForConditionalGeneration(ClipCapConfig(text_config=text_config)).eval()
    image_embeds = torch.randn(args.images, model.config.prefix_dim)
    prefix_length = model.config.prefix_length

    def torch_run():
        with torch.no_grad():
            generated = model.generate(
                image_embeds=image_embeds, max_new_tokens=args.new_tokens, num_beams=args.num_beams, do_sample=False
            )
        return generated[:, prefix_length:].tolist()

    results = {}
    results["torch_fp32"], reference = captions_per_second(torch_run, args.images)
    with tempfile.TemporaryDirectory() as folder:
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        # A stand-in tokenizer: the export saves a processor, and no GPT-2 tokenizer is reachable offline.
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<eos>": 0}, "<eos>")),
                                            eos_token="<eos>")
        processor = ClipCapProcessor(tokenizer=tokenizer, num_image_tokens=prefix_length)
        start = time.perf_counter()
        export_onnx(model, processor, folder)
        export_s = time.perf_counter() - start
        per_tensor_folder = Path(folder) / "int8_per_tensor"  # the same export, its int8 graphs one scale per matrix
        shutil.copytree(folder, per_tensor_folder, ignore=shutil.ignore_patterns(f"*{QUANTIZED_SUFFIX}.onnx"))
        quantize_graphs({name: per_tensor_folder / "onnx" / f"{name}.onnx" for name in GRAPHS}, per_channel=False)
        tokens = {}
        embeds = image_embeds.numpy()
        # ONNX Runtime's thread pool ignores OMP_NUM_THREADS: as many threads as PyTorch's, for a like comparison.
        session_options = onnxruntime.SessionOptions()
        session_options.intra_op_num_threads = torch.get_num_threads()
        session_options.log_severity_level = 3
        for name, captioner_folder, quantized in (
            ("onnx_fp32", folder, False), ("onnx_int8", folder, True), ("onnx_int8_per_tensor", per_tensor_folder, True)
        ):
            captioner = OnnxCaptioner(captioner_folder, quantized=quantized, session_options=session_options)
            results[name], tokens[name] = captions_per_second(
                lambda captioner=captioner: captioner.generate(
                    image_embeds=embeds, max_new_tokens=args.new_tokens, num_beams=args.num_beams
                ),
                args.images,
            )
    quantize_int8_weight_only(model)
    results["torch_int8_weight_only"], tokens["torch_int8_weight_only"] = captions_per_second(torch_run, args.images)

    print(
        json.dumps(
            {
                "benchmark": "onnx",
                "images": args.images,
                "new_tokens": args.new_tokens,
                "num_beams": args.num_beams,
                **{f"{name}_captions_per_s": round(value, 2) for name, value in results.items()},
                "onnx_fp32_speedup": round(results["onnx_fp32"] / results["torch_fp32"], 2),
                "onnx_int8_speedup": round(results["onnx_int8"] / results["torch_fp32"], 2),
                "onnx_int8_per_tensor_speedup": round(results["onnx_int8_per_tensor"] / results["torch_fp32"], 2),
                "torch_int8_weight_only_speedup": round(results["torch_int8_weight_only"] / results["torch_fp32"], 2),
                **{f"{name}_token_agreement": caption_agreement(value, reference) for name, value in tokens.items()},
                "export_s": round(export_s, 1),
                "torch_threads": torch.get_num_threads(),
                "machine": platform.machine(),
                "cpu": cpu_name(),
            }
        )
    )


if __name__ == "__main__":
    main()
