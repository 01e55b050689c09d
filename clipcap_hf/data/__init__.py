"""Image-caption data for ClipCap training: image sources and loaders, embeddings folders and the data collator.

[`load_image_source`] reads any image source; [`embed_source`] stores each unique image's CLIP embedding once in an
embeddings folder that [`load_embeddings`] reads memory-mapped. For a caption dataset held in memory (a loader gives
one row per caption: `image_id`, `image_path`, `caption`), [`embed_images`] adds each row's `image_index` into its
embedding table. [`ClipCapDataCollator`] turns rows into training batches.

Example:

```python
>>> from clipcap_hf.data import ClipCapDataCollator, embed_images, load_coco_karpathy
>>> splits = load_coco_karpathy("dataset_coco.json", image_root="coco/")
>>> train, train_embeds = embed_images(splits["train"], model, processor.image_processor, cache_dir="cache/")
>>> collator = ClipCapDataCollator(processor, image_embeds=train_embeds, max_caption_length=40)
```
"""

from .collator import ClipCapDataCollator, add_caption_lengths, image_inputs
from .embeddings import (
    ImageEmbeddingCache,
    check_embeddings,
    embed_images,
    embed_source,
    embedding_cache_folder,
    image_cache_key,
    load_embeddings,
    load_embeddings_info,
    vision_fingerprint,
)
from .loaders import (
    DATASET_FORMATS,
    check_images,
    group_by_image,
    load_caption_dataset,
    load_coco_captions,
    load_coco_karpathy,
    load_conceptual_captions,
    load_image_folder,
    load_nocaps,
)
from .prepare import TrainingData, load_training_data
from .sources import decode_image, image_key, load_image_source

__all__ = [
    "ClipCapDataCollator",
    "TrainingData",
    "DATASET_FORMATS",
    "ImageEmbeddingCache",
    "add_caption_lengths",
    "check_embeddings",
    "check_images",
    "decode_image",
    "embed_images",
    "embed_source",
    "embedding_cache_folder",
    "group_by_image",
    "image_cache_key",
    "image_inputs",
    "image_key",
    "load_caption_dataset",
    "load_coco_captions",
    "load_coco_karpathy",
    "load_conceptual_captions",
    "load_embeddings",
    "load_embeddings_info",
    "load_image_folder",
    "load_image_source",
    "load_nocaps",
    "load_training_data",
    "vision_fingerprint",
]
