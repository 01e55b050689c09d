"""The data collator: caption rows to a ClipCap training batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import pyarrow.compute as pc
import torch

from ..image_processing_clipcap import load_image
from ..processing_clipcap import ClipCapProcessor
from .sources import decode_image, describe_image_error


@dataclass
class ClipCapDataCollator:
    r"""
    Turns caption rows into a training batch for [`ClipCapForConditionalGeneration`].

    Captions are tokenized by [`ClipCapProcessor.tokenize_captions`]: the tokenizer's EOS is appended (so a trained
    model stops by itself), the batch is right-padded to its longest caption only, `labels` are -100 on padding and
    on the image tokens (so that Trainer's count of labels counts caption tokens only), and captions longer than
    `max_caption_length` tokens are cut (see [`add_caption_lengths`] to count them). A tokenizer without a padding
    token pads with EOS; padded positions are masked either way.

    The image comes from, in this order: `image_index` into `image_embeds` (the embedding cache: no vision
    forward), a preprocessed `pixel_values` column, an `image` column (PIL images, e.g. a `datasets.Image` feature,
    or undecoded `{"bytes", "path"}` values), or `image_path` (files opened here).

    Args:
        processor: the model's processor.
        image_embeds: the embedding table: a tensor from [`embed_images`], or an embeddings folder
            ([`load_embeddings`]) in torch format (`.select_columns("embedding").with_format("torch")`), read
            row by row from its memory-mapped files.
        max_caption_length: the most caption tokens kept, EOS included.
    """

    processor: ClipCapProcessor
    image_embeds: torch.Tensor | None = None
    max_caption_length: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.processor.tokenize_captions(
            [feature["caption"] for feature in features], max_length=self.max_caption_length
        )
        batch.pop("num_truncated")  # a count, not a model input; add_caption_lengths counts the whole dataset
        batch.update(image_inputs(features, self.processor.image_processor, self.image_embeds))
        return batch


def image_inputs(
    features: Sequence[dict[str, Any]], image_processor, image_embeds: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """
    The model's image input for a list of rows: `image_embeds` looked up by `image_index` when an embedding table
    is given, else `pixel_values` from a preprocessed `pixel_values` column, an `image` column or `image_path` files.
    """
    if image_embeds is not None:
        missing = next((row for row, feature in enumerate(features) if "image_index" not in feature), None)
        if missing is not None:
            raise ValueError(
                f"Row {missing} of the batch has no `image_index` (columns {sorted(features[missing])}), which the "
                "collator's `image_embeds` are looked up by: give every row one, or leave `image_embeds` out."
            )
        indices = [int(feature["image_index"]) for feature in features]
        if isinstance(image_embeds, datasets.Dataset):  # a memory-mapped embeddings folder (torch format)
            return {"image_embeds": image_embeds[indices]["embedding"]}
        return {"image_embeds": image_embeds[torch.tensor(indices)]}
    if features[0].get("pixel_values") is not None:
        return {"pixel_values": torch.stack([torch.as_tensor(feature["pixel_values"]) for feature in features])}
    images = []
    for row, feature in enumerate(features):
        if isinstance(feature.get("image"), dict):  # an undecoded datasets.Image value
            try:
                images.append(decode_image(feature["image"]))
            except (OSError, ValueError) as error:
                raise ValueError(
                    f"Row {row} of the batch: its image cannot be decoded ({describe_image_error(error)})."
                ) from error
        elif feature.get("image") is not None:
            images.append(feature["image"])
        elif feature.get("image_path") is not None:
            images.append(load_image(feature["image_path"]))
        else:
            raise ValueError(
                "A row has no image: give `image_embeds` (rows with `image_index`), or rows with `pixel_values`, an "
                f"`image` or an `image_path`. Got columns {sorted(feature)}."
            )
    return {"pixel_values": image_processor(images, return_tensors="pt")["pixel_values"]}


def add_caption_lengths(
    dataset: datasets.Dataset, processor: ClipCapProcessor, max_length: int | None = None, batch_size: int = 1000
) -> tuple[datasets.Dataset, int]:
    """
    Add a `length` column, each caption's token count as the collator gives it (EOS included, at most `max_length`),
    which `TrainingArguments(group_by_length=True)` uses to batch captions of similar length. Also returns how many
    captions the collator will cut to `max_length`. The lengths are written like any `map` (to the datasets cache for
    a dataset on disk), not collected in memory.
    """
    if "length" in dataset.column_names:
        dataset = dataset.remove_columns("length")
    dataset = dataset.map(
        _caption_lengths,
        input_columns="caption",
        with_indices=True,
        batched=True,
        batch_size=batch_size,
        fn_kwargs={"processor": processor, "max_length": max_length},
        desc="Counting caption tokens",
    )
    num_truncated = pc.sum(dataset.select_columns("truncated").with_format("arrow")[:]["truncated"]).as_py() or 0
    return dataset.remove_columns("truncated"), num_truncated


def _caption_lengths(
    captions: list[str], indices: list[int], processor: ClipCapProcessor, max_length: int | None
) -> dict[str, list]:
    encoded = processor.tokenize_captions(captions, max_length=None, return_tensors=None, first_index=indices[0])
    full = [sum(mask) - processor.num_image_tokens for mask in encoded["attention_mask"]]
    cut = [min(length, max_length) if max_length is not None else length for length in full]
    return {"length": cut, "truncated": [length > kept for length, kept in zip(full, cut)]}
