"""Data at scale: embedding throughput with one and two processes, and memory that does not grow with the dataset.

Writes parquet shards of N synthetic tiny images (16x16 PNG bytes, one caption each) and a tiny ClipCap model (a
2-layer CLIP tower on 32x32 inputs, a 1-layer GPT-2), then runs, each in its own process:

- `clipcap embed` on the shards, with one process and with two (`torchrun`, gloo on the CPU): images per second of
  the embedding pass (the model loaded, the source read; start-up not counted);
- `clipcap train --embeddings DIR` for 100 steps: training start-up plus 100 steps;

for N = each of `--sizes`, and reports the peak anonymous memory of each (`RssAnon` in `/proc/<pid>/status`,
sampled every 20 ms: memory-mapped Arrow pages are shared and reclaimable, so they do not count), with the slope
between the smallest and the largest size in MB per 100k images. Target: below 50 MB per 100k images. Linux only.
Prints one JSON line.

    python benchmarks/bench_data.py [--sizes 20000,200000] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import PIL.Image

REPO = Path(__file__).resolve().parents[1]
# `clipcap ARGS...` in a child process; `embed` writes the seconds its embedding pass took to $RECORD_DIR/<rank>. Not
# printed: the ranks of a torchrun share one output pipe, where their lines can interleave (PYTHONUNBUFFERED splits a
# print into the text and its newline).
CLIPCAP = """
import json, os, sys, time
import clipcap_hf.data
real_embed_source = clipcap_hf.data.embed_source
def timed_embed_source(*args, **kwargs):
    start = time.perf_counter()
    info = real_embed_source(*args, **kwargs)
    seconds = time.perf_counter() - start
    with open(os.path.join(os.environ["RECORD_DIR"], os.environ.get("RANK", "0")), "w") as file:
        json.dump({"embedding_seconds": seconds}, file)
    return info
clipcap_hf.data.embed_source = timed_embed_source  # what `clipcap embed` calls
from clipcap_hf.commands import main
sys.exit(main(sys.argv[1:]))
"""


def write_source(folder: Path, images: int, shard_size: int = 10_000) -> list[str]:
    """
    Parquet shards of `images` distinct 16x16 PNGs with one caption each, in row groups of 1000 rows as img2dataset
    writes them (a reader holds one row group at a time: one group per file would make memory grow with the file).
    """
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    rng = np.random.default_rng(0)
    files = []
    for start in range(0, images, shard_size):
        rows = {"image": [], "caption": []}
        for index in range(start, min(start + shard_size, images)):
            buffer = io.BytesIO()
            PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "PNG")
            rows["image"].append({"bytes": buffer.getvalue(), "path": None})
            rows["caption"].append(f"A small picture number {index}.")
        path = folder / f"part-{start // shard_size:05d}.parquet"
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path), batch_size=1000)
        files.append(str(path))
    return files


def write_model(folder: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import CLIPVisionConfig, GPT2Config, GPT2TokenizerFast

    from clipcap_hf import ClipCapConfig, ClipCapForConditionalGeneration, ClipCapImageProcessor, ClipCapProcessor

    bpe = ByteLevelBPETokenizer()
    corpus = ["A small picture number 0123456789."] * 10
    bpe.train_from_iterator(corpus, vocab_size=300, special_tokens=["<|endoftext|>"])
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
        projection_dim=24,
    )  # fmt: skip
    eos = tokenizer.eos_token_id
    text = GPT2Config(n_layer=1, n_embd=32, n_head=4, n_positions=64, vocab_size=len(tokenizer), bos_token_id=eos,
                      eos_token_id=eos)  # fmt: skip
    config = ClipCapConfig(
        vision_config=vision,
        text_config=text,
        prefix_length=4,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    ClipCapForConditionalGeneration(config).save_pretrained(folder)
    image_processor = ClipCapImageProcessor(size=32, crop_size=32)
    ClipCapProcessor(image_processor, tokenizer, num_image_tokens=4).save_pretrained(folder)


def rss_anon_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def descendants(pid: int) -> list[int]:
    """The processes under `pid`; a process that ends while they are listed has none (its /proc entry is gone)."""
    children = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []
    for task in tasks:
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return children + [grandchild for child in children for grandchild in descendants(child)]


def run(command: list[str], cwd: Path) -> tuple[float, list[dict]]:
    """Run a command; return the peak RssAnon (MB) of its largest process and what each process recorded."""
    records = Path(tempfile.mkdtemp(dir=cwd))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "RECORD_DIR": str(records)}  # fmt: skip
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0.0
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    while process.poll() is None:
        for pid in [process.pid] + descendants(process.pid):
            try:
                peak = max(peak, rss_anon_mb(pid))
            except OSError:  # ended between the listing and the read
                pass
        time.sleep(0.02)
    reader.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed:\n{''.join(output)[-3000:]}")
    return peak, [json.loads(path.read_text()) for path in sorted(records.iterdir())]


def embedding_seconds(records: list[dict], processes: int) -> float:
    """The slowest of the `processes` processes' embedding passes (each records its own)."""
    if len(records) != processes:
        raise RuntimeError(f"{processes} processes embedded, but {len(records)} recorded their embedding seconds.")
    return max(record["embedding_seconds"] for record in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="20000,200000", help="Comma-separated numbers of images.")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=100)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]

    result: dict[str, object] = {"sizes": sizes}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_model(tmp / "model")
        script = tmp / "clipcap_timed.py"
        script.write_text(CLIPCAP)
        python = [sys.executable, str(script)]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
        for size in sizes:
            (tmp / str(size)).mkdir()
            files = ",".join(write_source(tmp / str(size), size))
            embed = ["embed", "--model", str(tmp / "model"), "--train_file", files, "--caption_column", "caption",
                     "--batch_size", str(args.batch_size)]  # fmt: skip
            peak, records = run([*python, *embed, "--output", str(tmp / f"emb-{size}")], tmp)
            result[f"embed_images_per_s_1proc_{size}"] = round(size / embedding_seconds(records, 1), 1)
            result[f"embed_peak_rss_anon_mb_{size}"] = round(peak, 1)
            _, records = run([*torchrun, *embed, "--output", str(tmp / f"emb2-{size}")], tmp)
            result[f"embed_images_per_s_2proc_{size}"] = round(size / embedding_seconds(records, 2), 1)
            train = ["train", "--model_name_or_path", str(tmp / "model"), "--embeddings", str(tmp / f"emb-{size}"),
                     "--output_dir", str(tmp / f"out-{size}"), "--do_train", "--max_steps", str(args.train_steps),
                     "--per_device_train_batch_size", "32", "--save_strategy", "no", "--use_cpu", "--report_to",
                     "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0"]  # fmt: skip
            peak, _ = run([*python, *train], tmp)
            result[f"train_peak_rss_anon_mb_{size}"] = round(peak, 1)
    if len(sizes) > 1:
        small, large = min(sizes), max(sizes)
        per_100k = 100_000 / (large - small)
        for phase in ("embed", "train"):
            growth = result[f"{phase}_peak_rss_anon_mb_{large}"] - result[f"{phase}_peak_rss_anon_mb_{small}"]
            result[f"{phase}_rss_anon_mb_per_100k_images"] = round(growth * per_100k, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
