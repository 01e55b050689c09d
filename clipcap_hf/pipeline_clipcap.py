"""An "image-captioning" pipeline task: image-text-to-text where the text is optional."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sized
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import AutoModelForImageTextToText, GenerationConfig
from transformers.image_utils import is_valid_image
from transformers.pipelines import PIPELINE_REGISTRY, ImageTextToTextPipeline
from transformers.processing_utils import TextKwargs

from .image_processing_clipcap import _is_batched_array, is_iterable, load_image, to_rgb_image

# Options given to the call itself that are generation settings (num_return_sequences=3, num_beams=...): they go into
# `generate_kwargs`, as `max_new_tokens` does, rather than to the processor. `max_length` stays the prompts'
# tokenizer option.
_GENERATION_OPTIONS = frozenset(
    name for name in GenerationConfig().to_dict() if not name.startswith("_") and name != "transformers_version"
) - set(TextKwargs.__annotations__) - {"max_new_tokens"}


def _is_one_input(value: Any) -> bool:
    """An image (PIL, array, tensor, path or URL) or an `{"images": ..., "text": ...}` dict."""
    is_image_dict = isinstance(value, dict) and "images" in value
    return isinstance(value, (str, os.PathLike)) or is_valid_image(value) or is_image_dict


def _as_item(image: Any, prompt: str) -> dict[str, Any]:
    """The `{"images", "text"}` item image-text-to-text preprocesses, its image converted as the processor converts
    images (`_loadable`); a dict keeps its own text if it has one."""
    if isinstance(image, dict):
        if "images" not in image:  # e.g. {"image": ...}, or a dataset's rows rather than its image column
            raise ValueError(
                f"Got a dict with keys {sorted(image)} and no 'images': give an image (PIL image, array, tensor, path "
                "or URL), an {'images': image, 'text': prompt} dict, or a list, generator or dataset of these."
            )
        return {"text": prompt, **image, "images": _loadable(image["images"])}
    return {"images": _loadable(image), "text": prompt}


def _loadable(image: Any) -> Any:
    """
    An image as the processor would convert it (transparency on white, 16-bit scaled, EXIF orientation): a local file
    opened here, a PIL image, array or tensor converted. transformers' image loading, which the pipeline applies
    next, would convert them with a plain `convert("RGB")`, and arrays not at all. A URL is left to it.
    """
    if isinstance(image, os.PathLike) or (isinstance(image, str) and os.path.isfile(image)):
        image = load_image(image)
    if isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor)):
        return to_rgb_image(image)
    return image


def _check_no_stray_entry(images: list | tuple) -> None:
    """Refuse a list of images with an entry that is none (`None`, a number, bytes), naming it: image-text-to-text
    would take the list for chat messages and fail on the first image with an error that names neither."""
    if any(_is_one_input(image) for image in images):
        index, entry = next((index, entry) for index, entry in enumerate(images) if not _is_one_input(entry))
        raise ValueError(
            f"images[{index}] is {type(entry).__name__} {entry!r:.60}, not an image: give PIL images, arrays, tensors, "
            "paths or URLs (or {'images': image, 'text': prompt} dicts), and leave out entries without an image."
        )


def _one_item_per_image(images: Iterable, text: str | list[str] | None) -> Iterator[dict[str, Any]]:
    """An item per image: `text` is one prompt for every image (None: no prompt) or a list of one per image."""
    if isinstance(text, (list, tuple)):
        if not isinstance(images, Sized) or len(text) != len(images):
            count = len(images) if isinstance(images, Sized) else "a stream of"
            raise ValueError(
                f"Got {len(text)} prompts for {count} images: give one prompt per image in a list of the images' "
                "length, or one prompt (a string) for all of them."
            )
        prompts = text
    else:
        prompts = itertools.repeat("" if text is None else text)
    return (_as_item(image, prompt) for image, prompt in zip(images, prompts))


class ImageCaptioningPipeline(ImageTextToTextPipeline):
    """
    Captions images with any image-text-to-text model; an image alone gets a caption.

    transformers 5 routes the "image-to-text" task to "image-text-to-text", which asks for a text argument. This
    task fills in an empty prompt, so `pipeline("image-captioning", model=...)(image)` needs nothing else; a
    `text=` prompt (one for all images, or a list with one per image) is still passed through for the caption to
    continue.

    One image gives a list of captions (`num_return_sequences` of them, one by default). A list of images, a generator
    or a dataset gives one such list per image, in `batch_size` batches: a list at once, the others as an iterator.
    An image is a PIL image, an array, a tensor, a path (a string or a `pathlib.Path`) or a URL; a 4-D array or tensor,
    `(N, H, W, C)` or `(N, C, H, W)`, is a batch of N images, as for the processor. Generation options
    (`num_beams=3`, `num_return_sequences=2`, ...) are taken by the call itself as well as in `generate_kwargs`.

    Example:

    ```python
    >>> import clipcap_hf
    >>> from transformers import pipeline
    >>> captioner = pipeline("image-captioning", model="path/to/clipcap")
    >>> captioner("photo.jpg", max_new_tokens=20)
    [{'input_text': '', 'generated_text': 'A dog runs on the beach.'}]
    >>> captioner(["photo.jpg", "cat.jpg"], max_new_tokens=20, batch_size=8)
    [[{'input_text': '', 'generated_text': 'A dog runs on the beach.'}],
     [{'input_text': '', 'generated_text': 'A cat sleeps on a sofa.'}]]
    ```
    """

    # No pipeline defaults: the model's generation config decides the caption length. (image-text-to-text's own
    # 256-token default would override it on transformers 4.x.)
    _default_generation_config = GenerationConfig()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The collator of batch_size > 1 pads prompts on the tokenizer's side, and a caption continues a prompt's last
        # token: left, as transformers 5 sets it itself for decoder-only models (4.57 right-pads them).
        if self.tokenizer is not None and not getattr(self.model.config, "is_encoder_decoder", False):
            self.tokenizer.padding_side = "left"

    def __call__(self, images=None, text=None, **kwargs):
        # A copy: transformers 4.57 writes max_new_tokens into the caller's dict.
        generate_kwargs = dict(kwargs.get("generate_kwargs") or {})
        for name in _GENERATION_OPTIONS & set(kwargs):
            if name in generate_kwargs:
                raise ValueError(f"`{name}` was given both as an option and in `generate_kwargs`; give it once.")
            generate_kwargs[name] = kwargs.pop(name)
        if generate_kwargs or "generate_kwargs" in kwargs:
            kwargs["generate_kwargs"] = generate_kwargs
        if images is None:
            plain_text = isinstance(text, str) or (
                isinstance(text, (list, tuple)) and all(isinstance(prompt, str) for prompt in text)
            )
            if text is None or plain_text:
                # Image-text-to-text would generate from the text alone; a caption needs its image tokens' image.
                got = "nothing" if text is None else "text alone"
                raise ValueError(
                    f"The image-captioning pipeline captions images, and got {got}: give `images` (a path, URL, "
                    "PIL image, array or tensor, or a list, generator or dataset of them), with `text` as the start "
                    "of each caption if you like."
                )
            return super().__call__(images=images, text=text, **kwargs)  # chats, which hold their images
        if not isinstance(text, (str, type(None))):
            if isinstance(text, (bytes, dict)) or not is_iterable(text):
                raise TypeError(
                    f"`text` must be a prompt (a string) for every image or a list of one per image, got "
                    f"{type(text).__name__} ({text!r:.60})."
                )
            text = list(text)  # a dataset's column or a generator of prompts: one per image, as a list is
        if isinstance(images, bytes) or not (_is_one_input(images) or is_iterable(images)):
            raise TypeError(
                f"`images` must be an image (a path, URL, PIL image, array or tensor), an {{'images': image, 'text': "
                f"prompt}} dict, or a list, generator or dataset of these; got {type(images).__name__} "
                f"({images!r:.60})."
            )
        if _is_batched_array(images):  # N images, as the processor reads it, not one image of 4 dimensions
            images = list(images)
        if _is_one_input(images) or isinstance(images, dict):
            return super().__call__(_as_item(images, "" if text is None else text), **kwargs)
        is_list = isinstance(images, (list, tuple))
        if is_list and not all(_is_one_input(image) for image in images):  # chats, and what it refuses
            _check_no_stray_entry(images)
            return super().__call__(images=images, text=text, **kwargs)
        # A list, a generator or a dataset goes through image-text-to-text's generator path, an item per image.
        outputs = super().__call__(_one_item_per_image(images, text), **kwargs)
        return list(outputs) if is_list else outputs  # a list at once, the others lazily

    def _forward(self, model_inputs, generate_kwargs=None):
        outputs = super()._forward(model_inputs, generate_kwargs)
        # Sequences grouped per input, (inputs, sequences per input, length), so that a batch splits into its inputs
        # with all their num_return_sequences sequences; transformers 5 does so only when there are several.
        sequences, input_ids = outputs["generated_sequence"], outputs["input_ids"]
        if sequences.ndim == 2:
            outputs["generated_sequence"] = sequences.reshape(len(input_ids), -1, sequences.shape[-1])
        return outputs

    def postprocess(self, model_outputs, **kwargs):
        # One prompt (and its ids) per sequence: transformers 4.57's postprocess pairs them one to one.
        sequences = model_outputs["generated_sequence"]
        per_input = sequences.shape[1]
        prompts = model_outputs["prompt_text"]
        prompts = prompts if isinstance(prompts, (list, tuple)) else [prompts]
        model_outputs = {
            **model_outputs,
            "generated_sequence": sequences.flatten(0, 1),
            "prompt_text": [prompt for prompt in prompts for _ in range(per_input)],
            "input_ids": model_outputs["input_ids"].repeat_interleave(per_input, dim=0),
        }
        return super().postprocess(model_outputs, **kwargs)


PIPELINE_REGISTRY.register_pipeline(
    "image-captioning",
    pipeline_class=ImageCaptioningPipeline,
    pt_model=AutoModelForImageTextToText,
    type="multimodal",
)

__all__ = ["ImageCaptioningPipeline"]
