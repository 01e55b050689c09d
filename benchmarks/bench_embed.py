"""CLIP embedding throughput: the embedding cache against one vision forward per caption.

The paper's preprocessing (`parse_coco.py`) opens, preprocesses and encodes the image of every caption, one at a time,
so an image with 5 captions is encoded 5 times. `embed_images` encodes each unique image once, in batches, with
decoding in DataLoader workers, and stores the result. Both runs use the same CLIP ViT-B/32 vision tower (random
weights: speed does not depend on them) on JPEG files of COCO's typical size (640x480), and are counted in unique
images per second. Prints one JSON line.

    python benchmarks/bench_embed.py [--images 48] [--captions-per-image 5] [--batch-size 32] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from transformers import CLIPVisionConfig, GPT2Config

from clipcap_hf import ClipCapConfig, ClipCapForConditionalGeneration, ClipCapImageProcessor
from clipcap_hf.data import embed_images, load_image_folder
from clipcap_hf.image_processing_clipcap import load_image


def write_dataset(folder: Path, images: int, captions_per_image: int) -> None:
    rng = np.random.default_rng(0)
    lines = []
    for index in range(images):
        # Smooth random images compress like photos; pure noise would make JPEG decoding unusually slow.
        small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        PIL.Image.fromarray(small).resize((640, 480), PIL.Image.BICUBIC).save(folder / f"{index}.jpg", quality=90)
        texts = [f"caption {j} of image {index}" for j in range(captions_per_image)]
        lines.append(json.dumps({"file_name": f"{index}.jpg", "text": texts}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


@torch.no_grad()
def one_forward_per_caption(model, image_processor, dataset) -> None:
    """What the paper's preprocessing does: for each caption, open its image and encode it alone."""
    for path in dataset["image_path"]:
        pixel_values = image_processor(load_image(path), return_tensors="pt")["pixel_values"]
        model.get_image_embeds(pixel_values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers decoding images for the cache.")
    args = parser.parse_args()

    model = ClipCapForConditionalGeneration(
        ClipCapConfig(vision_config=CLIPVisionConfig(), text_config=GPT2Config(n_layer=1))
    )
    model.eval()
    image_processor = ClipCapImageProcessor()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        write_dataset(folder, args.images, args.captions_per_image)
        dataset = load_image_folder(folder)

        # Warm up both paths (thread pools, allocator) on a few images.
        one_forward_per_caption(model, image_processor, dataset.select(range(min(2, len(dataset)))))
        start = time.perf_counter()
        one_forward_per_caption(model, image_processor, dataset)
        per_caption_seconds = time.perf_counter() - start

        start = time.perf_counter()
        _, table = embed_images(
            dataset,
            model,
            image_processor,
            Path(tmp) / "cache",
            batch_size=args.batch_size,
            device="cpu",
            num_workers=args.workers,
        )
        cache_seconds = time.perf_counter() - start

        start = time.perf_counter()
        embed_images(dataset, model, image_processor, Path(tmp) / "cache", device="cpu")
        reuse_seconds = time.perf_counter() - start

    per_caption = args.images / per_caption_seconds
    cached = args.images / cache_seconds
    print(
        json.dumps(
            {
                "images": args.images,
                "captions_per_image": args.captions_per_image,
                "batch_size": args.batch_size,
                "workers": args.workers,
                "threads": torch.get_num_threads(),
                "embedding_dim": int(table.shape[1]),
                "per_caption_images_per_second": round(per_caption, 2),
                "cache_images_per_second": round(cached, 2),
                "speedup": round(cached / per_caption, 2),
                "target": 6.0,
                "cached_rerun_seconds": round(reuse_seconds, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
