"""ClipCap on one GPU in bf16: training samples/s, captions/s from pixels, embedding images/s from JPEG files, peers.

Runs with torch, transformers and torchvision only (no datasets, evaluate, open_clip, network or downloads: every model
is built from its config at the published size with random weights), in well under 8 minutes on an H200:

- train: both recipes of `bench_train.py` ((a) MLP mapper + fine-tuned GPT-2 small, prefix 10; (b) transformer mapper
  + frozen GPT-2, prefix 40), a plain loop doing what `ClipCapTrainer` does with `--bf16` (bf16 autocast over fp32
  weights, fused AdamW, the model's caption loss, per-batch padding of N(11.5, 2.5)-token captions from cached
  embeddings), at batch 40 and at the largest batch (40 doubled) that fits in memory. `peak_fraction` is the counted
  FLOPs per second (torch's FlopCounterMode over forward and backward) over `--peak-tflops` (H200 dense bf16: 989).
- caption: ClipCap from pixels (CLIP ViT-B/32 tower included) at batch `--caption-batch`, `--new-tokens` tokens,
  greedy and `--beams` beams, in bf16: eager with the dynamic cache, and with a static cache and a compiled decoding
  step (`generate(cache_implementation="static", compile_config=...)`; transformers compiles the greedy loop's step,
  beam search runs eagerly over the static cache). `*_tokens_match` is the fraction of captions equal to eager's.
- embed: CLIP image embeddings from JPEG files on disk (written first), decoded on the CPU or on the GPU
  (`torchvision.io.decode_jpeg(device="cuda")`), resized, cropped and normalized on the GPU.
- peers: the captioners of `bench_peers.py` at the caption settings, eager.

`--smoke` runs every part with tiny models, in float32 on the CPU, in seconds (a test). Prints one JSON line.

    python benchmarks/bench_gpu.py [--smoke] [--parts train caption embed peers]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from _common import synchronize
from bench_peers import (
    BUILDERS,
    CLIPCAP_NAMES,
    Captioner,
    build_clipcap,
    clipcap_config,
    time_captioning,
)
from bench_train import CAPTION_MEAN, CAPTION_SD, RECIPES
from transformers import CompileConfig

H200_DENSE_BF16_TFLOPS = 989.0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------- training


def build_training_model(recipe: dict, small: bool, device: torch.device):
    """The recipe's model, GPT-2 small sized (tiny for `small`); the vision tower is never run here."""
    from clipcap_hf import ClipCapForConditionalGeneration

    settings = {key: value for key, value in recipe.items() if key not in ("mapping_type", "freeze_language_model")}
    torch.manual_seed(0)
    model = ClipCapForConditionalGeneration(clipcap_config(recipe["mapping_type"], small, **settings)).to(device)
    if recipe["freeze_language_model"]:
        model.freeze_language_model()
    return model.train()


def caption_batch(model, batch_size: int, generator: torch.Generator, device: torch.device) -> dict:
    """What `ClipCapDataCollator` gives: image tokens, caption + EOS, right padding, labels; cached embeddings."""
    config = model.config
    prefix, eos = config.prefix_length, config.text_config.eos_token_id
    lengths = (torch.randn(batch_size, generator=generator) * CAPTION_SD + CAPTION_MEAN).round().clamp(min=1).long()
    positions = torch.arange(int(lengths.max()) + 1)
    tokens = torch.randint(0, eos, (batch_size, len(positions)), generator=generator)
    tokens[positions == lengths[:, None]] = eos  # each caption ends with EOS
    caption = positions <= lengths[:, None]
    image_tokens = torch.full((batch_size, prefix), config.image_token_id)
    batch = {
        "input_ids": torch.cat((image_tokens, tokens.masked_fill(~caption, eos)), dim=1),
        "attention_mask": torch.cat((torch.ones_like(image_tokens), caption.long()), dim=1),
        "labels": torch.cat((torch.full_like(image_tokens, -100), tokens.masked_fill(~caption, -100)), dim=1),
        "image_embeds": torch.randn(batch_size, config.prefix_dim, generator=generator),
    }
    return {name: value.to(device) for name, value in batch.items()}


class TrainingRun:
    """Training steps as `ClipCapTrainer --bf16` takes them: autocast forward, backward, fused AdamW step."""

    def __init__(self, model, dtype: torch.dtype, device: torch.device):
        self.model, self.dtype, self.device = model, dtype, device
        trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
        self.optimizer = torch.optim.AdamW(trained, lr=2e-5, fused=device.type == "cuda")

    def step(self, batch: dict) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def flops(self, batch: dict) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                loss = self.model(**batch).loss
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def samples_per_second(self, batch_size: int, steps: int) -> tuple[float, float]:
        """Samples/s over `steps` timed steps (after one untimed), and FLOPs per sample."""
        generator = torch.Generator().manual_seed(batch_size)
        batches = [caption_batch(self.model, batch_size, generator, self.device) for _ in range(steps + 1)]
        self.step(batches[0])
        synchronize(self.device)
        start = time.perf_counter()
        for batch in batches[1:]:
            self.step(batch)
        synchronize(self.device)
        seconds = time.perf_counter() - start
        counted = batches[1:4]  # a few batches: counting FLOPs takes as long as the steps
        flops_per_sample = sum(self.flops(batch) for batch in counted) / (len(counted) * batch_size)
        return steps * batch_size / seconds, flops_per_sample

    def fits(self, batch_size: int, headroom: float = 0.9) -> bool:
        """Whether a step at this batch runs within `headroom` of the GPU's memory (batches vary in length)."""
        if self.device.type != "cuda":
            return True
        try:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step(caption_batch(self.model, batch_size, torch.Generator().manual_seed(0), self.device))
            synchronize(self.device)
            total = torch.cuda.get_device_properties(self.device).total_memory
            return torch.cuda.max_memory_allocated(self.device) < headroom * total
        except torch.cuda.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return False


def bench_training(args, device: torch.device, dtype: torch.dtype) -> dict:
    results = {}
    for name, recipe in RECIPES.items():
        run = TrainingRun(build_training_model(recipe, args.smoke, device), dtype, device)
        largest = args.train_batch
        while 2 * largest <= args.max_train_batch and run.fits(2 * largest):
            largest *= 2
        for batch_size in dict.fromkeys((args.train_batch, largest)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            samples_per_second, flops_per_sample = run.samples_per_second(batch_size, args.train_steps)
            entry = {
                "batch": batch_size,
                "samples_per_s": round(samples_per_second, 1),
                "gflops_per_sample": round(flops_per_sample / 1e9, 2),
                "peak_fraction": round(samples_per_second * flops_per_sample / (args.peak_tflops * 1e12), 4),
            }
            if device.type == "cuda":
                entry["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            results[f"train_{name}_batch{batch_size}"] = entry
        results[f"train_{name}_largest_batch"] = largest
        del run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------- captioning from pixels


def on_device(captioner: Captioner, device: torch.device, dtype: torch.dtype) -> Captioner:
    captioner.model.to(device, dtype)
    return captioner


def tokens_match(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float((a == b).all(dim=1).float().mean()), 4) if a.shape == b.shape else 0.0


def compile_config(args) -> CompileConfig:
    # CUDA graphs ("reduce-overhead", transformers' default) where the backend is inductor on a GPU.
    mode = "reduce-overhead" if args.compile_backend == "inductor" and not args.smoke else None
    config = CompileConfig(fullgraph=True, backend=args.compile_backend, mode=mode)
    # transformers compiles on accelerators only; its own switch traces the step in the CPU smoke run too.
    config._compile_all_devices = args.smoke or None
    return config


def bench_captioning(args, device: torch.device, dtype: torch.dtype) -> dict:
    results = {}
    for name in CLIPCAP_NAMES:
        captioner = on_device(build_clipcap(name.removeprefix("clipcap_"), small=args.smoke), device, dtype)
        pixel_values = captioner.pixels(args.caption_batch)
        for mode, beams in (("greedy", 1), ("beam", args.beams)):
            seconds, eager = time_captioning(captioner, pixel_values, args.new_tokens, beams)
            results[f"{name}_{mode}_captions_per_s"] = round(args.caption_batch / seconds, 1)
            if name != "clipcap_mlp":
                continue
            start = time.perf_counter()  # the warm-up call inside compiles
            seconds, fast = time_captioning(
                captioner, pixel_values, args.new_tokens, beams,
                cache_implementation="static", compile_config=compile_config(args),
            )
            results[f"{name}_{mode}_static_compiled_warmup_s"] = round(time.perf_counter() - start - seconds, 1)
            results[f"{name}_{mode}_static_compiled_captions_per_s"] = round(args.caption_batch / seconds, 1)
            results[f"{name}_{mode}_static_compiled_tokens_match"] = tokens_match(fast, eager)
        del captioner
    return results


def bench_peers(args, device: torch.device, dtype: torch.dtype) -> dict:
    results = {}
    for name, build in BUILDERS.items():
        if name in CLIPCAP_NAMES:
            continue
        captioner = on_device(build(small=args.smoke), device, dtype)
        pixel_values = captioner.pixels(args.caption_batch)
        for mode, beams in (("greedy", 1), ("beam", args.beams)):
            seconds, _ = time_captioning(captioner, pixel_values, args.new_tokens, beams)
            results[f"{name}_{mode}_captions_per_s"] = round(args.caption_batch / seconds, 1)
        del captioner
    return results


# ---------------------------------------------------------------- embeddings from JPEG files


def write_jpegs(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """Smooth random photos-like images (noise would not compress like photographs), as JPEG files."""
    from torchvision.io import encode_jpeg, write_file

    generator = torch.Generator().manual_seed(0)
    paths = []
    for index in range(count):
        coarse = torch.rand(1, 3, 8, 8, generator=generator)
        image = torch.nn.functional.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
        path = folder / f"{index:05d}.jpg"
        write_file(str(path), encode_jpeg((image[0].clamp(0, 1) * 255).to(torch.uint8), quality=90))
        paths.append(path)
    return paths


def preprocess(images: list[torch.Tensor], size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """CLIP's preprocessing on the device: shorter side to `size` (bicubic), centre crop, scale and normalize."""
    from torchvision.transforms.v2 import functional as TF

    batch = []
    for image in images:
        image = TF.resize(image.to(device), size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        batch.append(TF.center_crop(image, size))
    pixels = torch.stack(batch).float() / 255
    mean = torch.tensor(CLIP_MEAN, device=device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=device)[:, None, None]
    return ((pixels - mean) / std).to(dtype)


def bench_embedding(args, device: torch.device, dtype: torch.dtype) -> dict:
    from torchvision.io import decode_jpeg, read_file

    model = on_device(build_clipcap("mlp", small=args.smoke), device, dtype).model
    size = model.config.vision_config.image_size
    decoders = {"cpu_decode": "cpu"} | ({"gpu_decode": device} if device.type == "cuda" else {})
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        paths = write_jpegs(Path(folder), args.jpeg_images, (args.jpeg_height, args.jpeg_width))

        @torch.no_grad()
        def embed_all(decode_device) -> None:
            for start in range(0, len(paths), args.caption_batch):
                data = [read_file(str(path)) for path in paths[start : start + args.caption_batch]]
                images = decode_jpeg(data, device=decode_device)
                model.get_image_embeds(preprocess(images, size, device, dtype))
            synchronize(device)

        for name, decode_device in decoders.items():
            embed_all(decode_device)  # warm-up: kernels, the decoder's state, files into the page cache
            start = time.perf_counter()
            embed_all(decode_device)
            results[f"embed_{name}_images_per_s"] = round(len(paths) / (time.perf_counter() - start), 1)
    return results


PARTS = {"train": bench_training, "caption": bench_captioning, "embed": bench_embedding, "peers": bench_peers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="Tiny models, float32 on the CPU (a test).")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--train-batch", type=int, default=40)
    parser.add_argument("--max-train-batch", type=int, default=40 * 2**8, help="Largest batch the search tries.")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--caption-batch", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--jpeg-images", type=int, default=2048)
    parser.add_argument("--jpeg-height", type=int, default=480)
    parser.add_argument("--jpeg-width", type=int, default=640)
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend for the fast path.")
    parser.add_argument("--peak-tflops", type=float, default=H200_DENSE_BF16_TFLOPS, help="The GPU's dense peak.")
    args = parser.parse_args()
    if args.smoke:
        args.train_batch, args.max_train_batch, args.train_steps = 4, 8, 2
        args.caption_batch, args.new_tokens, args.beams = 3, 4, 2
        args.jpeg_images, args.jpeg_height, args.jpeg_width = 4, 40, 48
        if args.compile_backend == "inductor":
            args.compile_backend = "eager"  # traces the same graph without compiling C++ for the CPU
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU here: run with --smoke for the CPU smoke test")
        device, dtype = torch.device("cuda"), torch.bfloat16

    start = time.perf_counter()
    report = {"benchmark": "gpu", "smoke": args.smoke, "dtype": str(dtype).removeprefix("torch.")}
    for part in args.parts:
        report.update(PARTS[part](args, device, dtype))
    report.update(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        peak_tflops=args.peak_tflops,
        torch=torch.__version__,
        transformers=__import__("transformers").__version__,
        total_s=round(time.perf_counter() - start, 1),
        goals={"train_samples_per_s": 5000, "captions_per_s": 5000},
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
