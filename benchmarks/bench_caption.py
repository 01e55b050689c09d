"""`clipcap caption --output` throughput: a parquet source captioned by one and by two processes (torchrun), from
pixels and from an embeddings folder, with each run's peak memory; and a check that the captions equal
`model.generate`'s for the same settings.

The model has the paper's shapes (CLIP ViT-B/32 vision tower, GPT-2 small, MLP mapper) with random weights: speed does
not depend on them. Images are 320x240 JPEGs in a parquet file (a datasets Image column). images/s counts from the
first process starting to caption (after start-up, imports, model and source loading) to the last one finishing;
images_per_s_with_startup counts the whole command. Two processes share the machine's cores (OMP_NUM_THREADS split
between them), as two GPU processes would share a node. Prints one JSON line.

    python benchmarks/bench_caption.py [--images 64] [--batch-size 16] [--shard-size 16] [--max-new-tokens 20]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import word_tokenizer

# Runs `clipcap ARGS...` and writes, to $RECORD_DIR/<rank> when it exits, its peak resident memory (MiB) and when
# its captioning (caption_dataset_to_parquet, after start-up, imports and loading) began and ended.
RUN_CLIPCAP = r"""
import atexit, json, os, resource, sys, time
import clipcap_hf.inference as inference
times = {}
real_caption = inference.caption_dataset_to_parquet
def timed_caption(*args, **kwargs):
    times["start"] = time.time()
    try:
        return real_caption(*args, **kwargs)
    finally:
        times["end"] = time.time()
inference.caption_dataset_to_parquet = timed_caption
def record():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    with open(os.path.join(os.environ["RECORD_DIR"], os.environ.get("RANK", "0")), "w") as file:
        json.dump({"peak_mib": peak, **times}, file)
atexit.register(record)
from clipcap_hf.commands import main
sys.exit(main(sys.argv[1:]))
"""


def build_model_folder(folder: Path) -> None:
    from transformers import CLIPVisionConfig, GPT2Config

    from clipcap_hf import (
        ClipCapConfig,
        ClipCapForConditionalGeneration,
        ClipCapImageProcessor,
        ClipCapProcessor,
    )

    tokenizer = word_tokenizer()
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    config = ClipCapConfig(
        vision_config=CLIPVisionConfig(projection_dim=512),
        text_config=GPT2Config(vocab_size=len(tokenizer), bos_token_id=50256, eos_token_id=50256),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = ClipCapForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    ClipCapProcessor(ClipCapImageProcessor(), tokenizer, num_image_tokens=config.prefix_length).save_pretrained(folder)


def write_source(path: Path, count: int) -> list[bytes]:
    import datasets

    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(count):
        # Smooth random images compress like photos; pure noise would make JPEG decoding unusually slow.
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        PIL.Image.fromarray(small).resize((320, 240), PIL.Image.BICUBIC).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": [{"bytes": data, "path": None} for data in encoded]}, features=features)\
        .to_parquet(path)
    return encoded


def run_clipcap(args: list[str], processes: int, work: Path) -> dict:
    """Seconds the command took end to end, seconds from the first process starting to caption to the last one
    finishing, and the largest peak memory (MiB) of its processes."""
    script = work / "run_clipcap.py"
    script.write_text(RUN_CLIPCAP)
    records = Path(tempfile.mkdtemp(dir=work))
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "RECORD_DIR": str(records), "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(script)]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   "--master_port=0", str(script)]
    start = time.perf_counter()
    result = subprocess.run(
        [*command, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"`clipcap {' '.join(args)}` failed:\n{result.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    ranks = [json.loads(path.read_text()) for path in records.iterdir()]
    return {
        "seconds": seconds,
        "caption_seconds": max(rank["end"] for rank in ranks) - min(rank["start"] for rank in ranks),
        "peak_mib": max(rank["peak_mib"] for rank in ranks),
    }


def read_captions(output: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    captions = {}
    for shard in sorted(output.glob("captions-*.parquet")):
        table = pq.read_table(shard).to_pydict()
        captions.update(zip(table["image_key"], table["caption"]))
    return captions


@torch.no_grad()
def generate_captions(model_dir: Path, encoded: list[bytes], embeddings, batch_size: int, max_new_tokens: int):
    """What model.generate gives: from the images (keyed as load_image_source keys bytes), and from the embeddings."""
    import hashlib

    from clipcap_hf import ClipCapForConditionalGeneration, ClipCapProcessor

    model = ClipCapForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = ClipCapProcessor.from_pretrained(model_dir)
    from_pixels, from_embeddings = {}, {}
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        images = [PIL.Image.open(io.BytesIO(data)) for data in chunk]
        generated = model.generate(**processor(images=images), max_new_tokens=max_new_tokens)
        keys = ["sha256:" + hashlib.sha256(data).hexdigest() for data in chunk]
        from_pixels.update(zip(keys, processor.post_process_image_text_to_text(generated)))
    for start in range(0, len(embeddings), batch_size):
        rows = embeddings[start : start + batch_size]
        generated = model.generate(image_embeds=torch.tensor(rows["embedding"]), max_new_tokens=max_new_tokens)
        from_embeddings.update(zip(rows["image_key"], processor.post_process_image_text_to_text(generated)))
    return from_pixels, from_embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    args = parser.parse_args()

    from clipcap_hf import ClipCapForConditionalGeneration, ClipCapProcessor
    from clipcap_hf.data.embeddings import embed_source, load_embeddings
    from clipcap_hf.data.sources import load_image_source

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, source, embeddings_dir = work / "model", work / "images.parquet", work / "embeddings"
        build_model_folder(model_dir)
        encoded = write_source(source, args.images)
        model = ClipCapForConditionalGeneration.from_pretrained(model_dir).eval()
        processor = ClipCapProcessor.from_pretrained(model_dir)
        embed_source(load_image_source(data_files=str(source)), model, processor.image_processor, embeddings_dir)
        embeddings = load_embeddings(embeddings_dir)
        del model

        common = ["--model", str(model_dir), "--batch-size", str(args.batch_size), "--shard-size",
                  str(args.shard_size), "--max-new-tokens", str(args.max_new_tokens)]
        results, outputs = {}, {}
        for name, source_args in (("pixels", ["--data-files", str(source)]),
                                  ("embeddings", ["--embeddings", str(embeddings_dir)])):
            for processes in (1, 2):
                output = work / f"captions-{name}-{processes}"
                command = ["caption", *source_args, *common, "--output", str(output)]
                timing = run_clipcap(command, processes, work)
                results[f"{name}_{processes}proc"] = {
                    "images_per_s": round(args.images / timing["caption_seconds"], 2),
                    "images_per_s_with_startup": round(args.images / timing["seconds"], 2),
                    "seconds": round(timing["seconds"], 2),
                    "peak_rss_mib_per_process": round(timing["peak_mib"], 1),
                }
                outputs[(name, processes)] = read_captions(output)

        from_pixels, from_embeddings = generate_captions(
            model_dir, encoded, embeddings, args.batch_size, args.max_new_tokens
        )
        print(json.dumps({
            "benchmark": "clipcap caption --output",
            "images": args.images,
            "batch_size": args.batch_size,
            "shard_size": args.shard_size,
            "max_new_tokens": args.max_new_tokens,
            "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.is_available(),
            "model": "CLIP ViT-B/32 vision tower + GPT-2 small, MLP mapper, random weights",
            **results,
            "captions_equal_generate": {
                "pixels": all(outputs[("pixels", n)] == from_pixels for n in (1, 2)),
                "embeddings": all(outputs[("embeddings", n)] == from_embeddings for n in (1, 2)),
            },
        }))


if __name__ == "__main__":
    main()
