"""Evaluating ClipCap: captioning image files and scoring the captions (`evaluate`), the COCO caption metrics
(`metrics`; `coco_metric` wraps them as an `evaluate` metric) and the HTML caption gallery (`gallery`).

None of these modules but `coco_metric` needs `datasets` or `evaluate`, so `clipcap caption` runs without them.
"""

from .evaluate import (
    CaptionedImage,
    EvaluationResult,
    UnreadableImagesError,
    caption_images,
    fill_model_card,
    generate_captions,
    iter_captions,
    markdown_table,
    score_predictions,
    write_evaluation,
    write_predictions,
)

__all__ = [
    "CaptionedImage",
    "EvaluationResult",
    "UnreadableImagesError",
    "caption_images",
    "fill_model_card",
    "generate_captions",
    "iter_captions",
    "markdown_table",
    "score_predictions",
    "write_evaluation",
    "write_predictions",
]
