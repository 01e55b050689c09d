"""Processor for ClipCap: the image processor and the language model's tokenizer in one object."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import transformers
from transformers import AutoTokenizer, BatchEncoding, BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_clipcap import ClipCapImageProcessor

# transformers 4.x copies only the direct relative imports of a remote-code module into its cache, but hashes the
# whole import tree; the image processor imports open_clip_vision lazily, so without this line a saved folder's
# processor fails to load with trust_remote_code unless the model was loaded first.
from .open_clip_vision import resolve_open_clip_model  # noqa: F401


class ClipCapProcessor(ProcessorMixin):
    r"""
    Wraps a [`ClipCapImageProcessor`] and the language model's tokenizer.

    - `processor(images=...)` gives `pixel_values` for [`ClipCapForConditionalGeneration.generate`];
    - `processor(images=..., text=prompts)` adds left-padded prompt tokens that the caption continues;
    - `processor(images=..., captions=...)` gives training inputs: right-padded caption tokens ending in the
      tokenizer's EOS (so a trained model learns to stop), and `labels` with -100 on padding;
    - `processor.batch_decode(generated_ids, skip_special_tokens=True)` turns generated tokens into captions.

    A tokenizer without a padding token (GPT-2's) gets its EOS token as padding; padded positions are always
    masked out, so this never teaches the model anything about EOS.
    """

    attributes = ["image_processor", "tokenizer"]
    if int(transformers.__version__.split(".")[0]) < 5:  # transformers 5 finds these through the Auto classes
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor: ClipCapImageProcessor | None = None, tokenizer=None, **kwargs):
        if image_processor is None:
            image_processor = ClipCapImageProcessor()
        if tokenizer is None:
            raise ValueError("ClipCapProcessor needs the language model's tokenizer.")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model_name_or_path: str,
        text_model_name_or_path: str,
        vision_backend: str = "clip",
        open_clip_pretrained: str | None = None,
        **kwargs,
    ) -> ClipCapProcessor:
        """
        A processor for a new ClipCap built with [`ClipCapForConditionalGeneration.from_vision_text_pretrained`]:
        the CLIP checkpoint's preprocessing (sizes, mean, std) and the language model's tokenizer. With
        `vision_backend="open_clip"`, the preprocessing open_clip uses for that model and `open_clip_pretrained` tag.
        """
        image_processor = ClipCapImageProcessor.from_vision_pretrained(
            vision_model_name_or_path, vision_backend, open_clip_pretrained
        )
        tokenizer = AutoTokenizer.from_pretrained(text_model_name_or_path, **kwargs)
        return cls(image_processor=image_processor, tokenizer=tokenizer)

    def __call__(
        self,
        images=None,
        text: str | Sequence[str] | None = None,
        captions: str | Sequence[str] | None = None,
        return_tensors: str | None = "pt",
        max_caption_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            images: one image or a list (PIL, numpy or torch).
            text: generation prompts, one per image (or one for all); left-padded.
            captions: training captions, one per image; tokenized by [`~ClipCapProcessor.tokenize_captions`].
            return_tensors: "pt" (default), "np" or None.
            max_caption_length: captions longer than this many tokens (EOS included) are cut; at least 1.
            kwargs: tokenizer options for the `text` prompts (`truncation`, `max_length`, `padding`, ...).
        """
        if images is None and text is None and captions is None:
            raise ValueError("Pass `images`, `text` (prompts) or `captions`.")
        if text is not None and captions is not None:
            raise ValueError("Pass `text` (generation prompts) or `captions` (training targets), not both.")
        if kwargs and text is None:
            raise ValueError(
                f"Got options {sorted(kwargs)}, which are tokenizer options for `text` prompts, but no `text`. "
                "Captions take `max_caption_length`; image preprocessing is set on the image processor when it is "
                "created."
            )
        data = {}
        num_images = None
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors))
            num_images = len(data["pixel_values"])
        if text is not None:
            prompts = [text] if isinstance(text, str) else list(text)
            if num_images is not None and len(prompts) == 1 and num_images > 1:
                prompts = prompts * num_images
            if num_images is not None and len(prompts) != num_images:
                raise ValueError(
                    f"Got {num_images} images but {len(prompts)} prompts; give one prompt per image, or one for all."
                )
            data.update(self.tokenize_prompts(prompts, return_tensors=return_tensors, **kwargs))
        if captions is not None:
            captions = [captions] if isinstance(captions, str) else list(captions)
            if num_images is not None and len(captions) != num_images:
                raise ValueError(f"Got {num_images} images but {len(captions)} captions; give one caption per image.")
            encoded = self.tokenize_captions(captions, max_length=max_caption_length, return_tensors=return_tensors)
            encoded.pop("num_truncated")  # a count, not a model input
            data.update(encoded)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def tokenize_prompts(
        self, prompts: Sequence[str], return_tensors: str | None = "pt", **tokenizer_kwargs
    ) -> BatchEncoding:
        """
        Left-padded prompt tokens without special tokens, ready for `generate`; `tokenizer_kwargs` (e.g.
        `truncation=True, max_length=...`) go to the tokenizer and override those defaults.
        """
        options = {"padding": True, "padding_side": "left", "add_special_tokens": False, **tokenizer_kwargs}
        return self.tokenizer(list(prompts), return_tensors=return_tensors, **options)

    def tokenize_captions(
        self, captions: Sequence[str], max_length: int | None = None, return_tensors: str | None = "pt"
    ) -> dict:
        """
        Training inputs for captions: tokens + EOS, right-padded to the longest caption of the batch.

        Returns `input_ids`, `attention_mask`, `labels` (a copy of `input_ids` with -100 on padding) and
        `num_truncated`, the number of captions cut to `max_length` tokens (EOS included).
        """
        # 0 would give empty captions (a NaN loss) and a negative length would silently drop the EOS.
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_caption_length (max_length) must be at least 1 (EOS included), got {max_length}.")
        token_lists = []
        num_truncated = 0
        for index, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise ValueError(
                    f"Caption {index} must be a string, got {type(caption).__name__} ({caption!r}); for several "
                    "captions per image, repeat the image once per caption."
                )
            if not caption.strip():
                raise ValueError(f"Caption {index} is empty ({caption!r}); every caption needs some text.")
            tokens = self.tokenizer(caption, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            if max_length is not None and len(tokens) > max_length:
                tokens = tokens[:max_length]
                num_truncated += 1
            token_lists.append(tokens)
        longest = max(len(tokens) for tokens in token_lists)
        pad_id = self.tokenizer.pad_token_id
        input_ids = [tokens + [pad_id] * (longest - len(tokens)) for tokens in token_lists]
        attention_mask = [[1] * len(tokens) + [0] * (longest - len(tokens)) for tokens in token_lists]
        labels = [tokens + [-100] * (longest - len(tokens)) for tokens in token_lists]
        encoded = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if return_tensors == "pt":
            encoded = {key: torch.tensor(value, dtype=torch.long) for key, value in encoded.items()}
        encoded["num_truncated"] = num_truncated
        return encoded

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Used by the image-text-to-text pipeline: decoded captions, stripped of surrounding spaces."""
        texts = self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
        return [text.strip() for text in texts]


__all__ = ["ClipCapProcessor"]
