"""Captioning at scale: a batch captioner for `datasets.map` and Ray Data, CLIP reranking and CLIPScore, and a
sharded, resumable parquet writer.

Needs only torch and transformers to import; the parquet writer imports `datasets` and `pyarrow` when it runs.

Example:

```python
>>> from clipcap_hf.inference import ClipCapCaptioner, caption_dataset_to_parquet
>>> captioner = ClipCapCaptioner("path/to/clipcap", do_sample=True, top_p=0.9, num_candidates=5,
...                              reranker="openai/clip-vit-base-patch32")
>>> captioned = dataset.map(captioner, batched=True, batch_size=32)
>>> caption_dataset_to_parquet(captioner, dataset, "captions/")
```
"""

from .captioner import (
    CaptionBatch,
    ClipCapCaptioner,
    captioning_run,
    check_decoding_options,
    decode_image,
)
from .clip_score import CLIPSCORE_PROMPT, CLIPSCORE_WEIGHT, CLIPScorer
from .sharded import (
    CaptionRunSummary,
    caption_dataset_to_parquet,
    distributed_rank,
    shard_file_name,
)

__all__ = [
    "CLIPSCORE_PROMPT",
    "CLIPSCORE_WEIGHT",
    "CLIPScorer",
    "CaptionBatch",
    "CaptionRunSummary",
    "ClipCapCaptioner",
    "caption_dataset_to_parquet",
    "captioning_run",
    "check_decoding_options",
    "decode_image",
    "distributed_rank",
    "shard_file_name",
]
