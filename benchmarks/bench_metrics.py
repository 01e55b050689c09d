"""Time the COCO caption metrics on the 4,800-image reference set (../shared/reference/coco_val2014_loo).

Prints one JSON line: the seconds of a full `compute_caption_metrics` call, and of its parts (tokenization, then
each metric on the tokenized captions). Metrics that cannot run here (SPICE without its models, METEOR without
Java) are listed under "skipped"; "tokenization" says whether the captions were PTB-tokenized ("ptb", with Java) or
by the Python approximation ("python-approximation", without Java, when "java" is null).

    python benchmarks/bench_metrics.py [--data-dir PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import time
import warnings
from pathlib import Path

from clipcap_hf.evaluation.metrics import (
    METRIC_NAMES,
    caption_tokenization,
    compute_caption_metrics,
    load_coco_predictions,
    load_coco_references,
    tokenize_captions,
)

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "coco_val2014_loo"


def _java_version() -> str | None:
    if shutil.which("java") is None:
        return None
    # `java -version` prints to stderr, e.g. 'openjdk version "17.0.15" 2025-04-15'.
    first_line = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0]
    return first_line.split('"')[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    args = parser.parse_args()
    if not (args.data_dir / "references.json").is_file() or not (args.data_dir / "predictions.json").is_file():
        parser.error(
            f"--data-dir: {args.data_dir} does not hold references.json and predictions.json (COCO format); the "
            "default is the reference set next to the repository, ../shared/reference/coco_val2014_loo."
        )

    references = load_coco_references(args.data_dir / "references.json")
    predictions = load_coco_predictions(args.data_dir / "predictions.json")
    image_ids = list(predictions)
    n_references = sum(len(references[image_id]) for image_id in image_ids)

    with warnings.catch_warnings():
        # The skipped metrics are reported in the JSON line instead.
        warnings.simplefilter("ignore")

        start = time.perf_counter()
        scores = compute_caption_metrics(predictions, references)
        total = time.perf_counter() - start

        captions = [predictions[image_id] for image_id in image_ids]
        captions += [ref for image_id in image_ids for ref in references[image_id]]
        start = time.perf_counter()
        tokenized = iter(tokenize_captions(captions))
        seconds = {"tokenize": time.perf_counter() - start}
        tokenized_predictions = {image_id: next(tokenized) for image_id in image_ids}
        tokenized_references = {image_id: [next(tokenized) for _ in references[image_id]] for image_id in image_ids}

        skipped = []
        for metric in METRIC_NAMES:
            start = time.perf_counter()
            metric_scores = compute_caption_metrics(
                tokenized_predictions, tokenized_references, metrics=metric, tokenize=False
            )
            if metric_scores:
                seconds[metric] = time.perf_counter() - start
            else:
                skipped.append(metric)

    result = {
        "benchmark": "coco_caption_metrics",
        "n_images": len(image_ids),
        "n_references": n_references,
        "total_s": round(total, 3),
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
        "skipped": skipped,
        "tokenization": caption_tokenization(),
        "scores": {name: round(value, 6) for name, value in scores.items()},
        "java": _java_version(),
        "python": platform.python_version(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
