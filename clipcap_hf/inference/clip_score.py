"""CLIPScore and RefCLIPScore (Hessel et al., 2021) with a full transformers `CLIPModel`, and reranking by CLIPScore.

CLIPScore(c, v) = w * max(cos(E_c, E_v), 0) with w = 2.5, where E_v is CLIP's image embedding and E_c the text
embedding of "A photo depicts" followed by the caption (the paper's prompt). RefCLIPScore is the harmonic mean of
CLIPScore and max(max_r cos(E_c, E_r), 0) over the reference captions r (embedded with the same prompt).

Written here rather than taken from torchmetrics' `CLIPScore`: that metric returns only the mean over a batch (the
gallery and the reranker need each caption's score), clamps the mean instead of each score, has no RefCLIPScore, and
on transformers 5 fails on `get_image_features` returning an output object instead of a tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch

from ..configuration_clipcap import check_positive_int
from ..image_processing_clipcap import ClipCapImageProcessor
from ..modeling_clipcap import quick_gelu_in_place
from ..utils.loading import check_clip_model, local_folder, to_device_and_dtype

CLIPSCORE_WEIGHT = 2.5
"""The paper's w: it stretches CLIPScore over about [0, 1] for ViT-B/32 on captioning data."""
CLIPSCORE_PROMPT = "A photo depicts"
"""The paper's prompt before every caption, which it found to raise correlation with human judgements a little."""


def _features(output) -> torch.Tensor:
    """`get_image_features`/`get_text_features`' projected embeddings: a tensor on transformers 4.57, the output's
    `pooler_output` on transformers 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _clipcap_image_processor(image_processor, model_config) -> ClipCapImageProcessor:
    """
    The CLIP processor's preprocessing as a [`ClipCapImageProcessor`], so that CLIP sees the pixels the captioner
    does: EXIF orientation applied, transparency on white, the same resize on every transformers line (transformers'
    own processors differ there). Settings it cannot apply are refused.
    """
    settings = json.loads(image_processor.to_json_string())  # what `save_pretrained` would write
    try:
        return ClipCapImageProcessor.from_transformers_settings(settings, lambda: model_config)
    except ValueError as error:
        raise ValueError(f"CLIPScorer cannot apply the CLIP processor's image settings: {error}") from None


def _check_captions(captions: Sequence[str]) -> None:
    """Refuse a single string given as the captions: it would be read as one caption per character."""
    if isinstance(captions, str):
        raise TypeError(f"`captions` must be a list of strings, one per image; got the str {captions!r:.200}.")


def _check_one_per_image(images: Sequence | torch.Tensor, texts: Sequence, what: str) -> None:
    """Refuse `texts` (captions, or a list of texts per image) unless there is one per image: checked before CLIP's
    towers run, so that a mismatched call costs nothing."""
    if len(images) != len(texts):
        raise ValueError(f"Got {len(images)} images and {len(texts)} {what}; give one per image.")


def _check_texts_per_image(name: str, texts_per_image: Sequence[Sequence[str]], needs: str) -> None:
    """
    Refuse `texts_per_image` (`references`, `candidates`) unless it holds a non-empty list of strings for each
    image: a str in its place would be read as one text per character, and scored without a word. A list is any
    sequence but a str: a tuple, or a NumPy array of strings, as pandas reads a list column of parquet (its np.str_
    elements are str).
    """
    if isinstance(texts_per_image, str):
        raise TypeError(f"`{name}` must be a list with a list of strings for each image; got the str "
                        f"{texts_per_image!r:.200}.")
    for index, texts in enumerate(texts_per_image):
        if isinstance(texts, str):
            raise TypeError(f"`{name}[{index}]` must be a list of strings (the texts of image {index}), got the "
                            f"str {texts!r:.200}; for a single one give [{texts!r:.200}].")
        # A NumPy array is no registered Sequence; a 0-d one cannot be iterated, a 2-d one holds arrays.
        listed = isinstance(texts, Sequence) or (isinstance(texts, np.ndarray) and texts.ndim == 1)
        if not listed or not all(isinstance(text, str) for text in texts):
            raise TypeError(f"`{name}[{index}]` must be a list of strings (the texts of image {index}), got "
                            f"{texts!r:.200}.")
        if len(texts) == 0:  # not `not texts`: an array of several has no truth value
            raise ValueError(f"`{name}[{index}]` is empty: {needs}.")


class CLIPScorer:
    """
    Score captions against images (and reference captions) with a CLIP model, batch by batch.

    Args:
        model: a transformers `CLIPModel` (both towers are needed), or the folder or Hub name of one.
        processor: its processor (a `CLIPProcessor`: image processor and tokenizer); loaded from `model`'s name when
            `model` is a name. Its image settings are applied by a [`ClipCapImageProcessor`], as the captioner's
            are: upright, transparency on white, the same pixels on every transformers line.
        device, dtype: where and in which precision CLIP runs (default: the model's own).
        prompt: the text put before every caption (the paper's "A photo depicts"; "" for none).
        text_batch_size: captions embedded at once (a positive integer).
        option: how errors about a `model` name that cannot be loaded call it (a command passes its option's name).

    Example:

    ```python
    >>> scorer = CLIPScorer("openai/clip-vit-base-patch32")
    >>> scorer.clip_score([image], ["a dog on a beach"])
    tensor([0.7712])
    ```
    """

    def __init__(
        self,
        model,
        processor=None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        prompt: str = CLIPSCORE_PROMPT,
        text_batch_size: int = 256,
        option: str = "CLIPScorer's `model` argument",
    ):
        check_positive_int("text_batch_size", text_batch_size)  # before the model loads
        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoProcessor, CLIPModel

            model = str(model)  # a Path too
            check_clip_model(model, option)
            model = local_folder(model)
            processor = processor or AutoProcessor.from_pretrained(model, trust_remote_code=False)
            model = CLIPModel.from_pretrained(model, trust_remote_code=False)
            quick_gelu_in_place(model)  # the scorer's own model, which no gradient flows through: as ClipCap's tower
        if processor is None:
            raise ValueError("Give the CLIP model's processor with an in-memory model (`processor=`).")
        if not (hasattr(model, "get_text_features") and hasattr(model, "get_image_features")):
            raise ValueError(
                f"The CLIP model must have both towers (a transformers CLIPModel), got {type(model).__name__}."
            )
        self.model = to_device_and_dtype(model, device, dtype).eval()
        self.processor = processor
        self.image_processor = _clipcap_image_processor(processor.image_processor, model.config)
        self.prompt = prompt
        self.text_batch_size = text_batch_size
        config = getattr(model.config, "text_config", None)
        self.max_text_length = getattr(config, "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        """Unit-length CLIP image embeddings, shape `(len(images), projection_dim)`, in float32."""
        pixel_values = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        pixel_values = pixel_values.to(self.device, self.model.dtype)
        embeddings = _features(self.model.get_image_features(pixel_values=pixel_values)).float()
        return torch.nn.functional.normalize(embeddings, dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length CLIP text embeddings of the prompt and each text, in float32 (texts longer than CLIP's
        context are truncated)."""
        prompted = [f"{self.prompt} {text}".strip() for text in texts]
        chunks = []
        for start in range(0, len(prompted), self.text_batch_size):
            tokens = self.processor(
                text=prompted[start : start + self.text_batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_text_length,
                return_tensors="pt",
            ).to(self.device)
            output = self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
            chunks.append(_features(output).float())
        if not chunks:
            return torch.empty(0, self.model.config.projection_dim, device=self.device)
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)

    def clip_score(
        self, images: Sequence[PIL.Image.Image] | torch.Tensor, captions: Sequence[str]
    ) -> torch.Tensor:
        """Each caption's CLIPScore against its image (one caption per image, or image embeddings from
        [`image_embeddings`]); a float32 tensor on the CPU."""
        _check_captions(captions)
        _check_one_per_image(images, captions, "captions")
        return _clip_scores(self._cosines(images, self.text_embeddings(captions))).cpu()

    def _cosines(
        self, images: Sequence[PIL.Image.Image] | torch.Tensor, caption_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """Each caption's cosine similarity to its image (or image embedding), before CLIPScore clips it at 0; the
        captions given as their [`text_embeddings`], which a caller may use again. The public methods have checked
        that there is one caption per image."""
        image_embeddings = images if isinstance(images, torch.Tensor) else self.image_embeddings(images)
        return (image_embeddings * caption_embeddings).sum(-1)

    def ref_clip_score(
        self,
        images: Sequence[PIL.Image.Image],
        captions: Sequence[str],
        references: Sequence[Sequence[str]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each caption's CLIPScore and RefCLIPScore (harmonic mean of CLIPScore and the caption's largest cosine
        similarity to a reference of its image, clipped at 0). `references` holds a list of strings for each image."""
        _check_captions(captions)
        _check_texts_per_image("references", references, "RefCLIPScore needs at least one reference per image")
        _check_one_per_image(images, captions, "captions")
        _check_one_per_image(images, references, "reference lists")
        # The captions' embeddings serve both scores: CLIP's text tower runs once over them.
        caption_embeddings = self.text_embeddings(captions)
        clip_scores = _clip_scores(self._cosines(images, caption_embeddings)).cpu()
        caption_embeddings = caption_embeddings.cpu()
        flat = [reference for image_references in references for reference in image_references]
        reference_embeddings = self.text_embeddings(flat).cpu()
        best = []
        start = 0
        for index, image_references in enumerate(references):
            cosines = reference_embeddings[start : start + len(image_references)] @ caption_embeddings[index]
            best.append(cosines.max().clamp(min=0))
            start += len(image_references)
        text_scores = torch.stack(best)
        total = clip_scores + text_scores
        # The harmonic mean, 0 where both are 0 (rather than 0/0).
        ref_scores = torch.where(total > 0, 2 * clip_scores * text_scores / total.clamp(min=1e-12), 0.0)
        return clip_scores, ref_scores

    def rerank(
        self, images: Sequence[PIL.Image.Image], candidates: Sequence[Sequence[str]]
    ) -> tuple[list[int], list[float]]:
        """For each image, the index of its candidate caption with the highest CLIPScore, and that score: the
        candidate most similar to the image, also where every candidate's score is clipped to 0 (the first candidate
        wins a tie). `candidates` holds a non-empty list of strings for each image."""
        _check_texts_per_image("candidates", candidates, "rerank needs at least one candidate per image")
        _check_one_per_image(images, candidates, "candidate lists")
        image_embeddings = self.image_embeddings(images)
        counts = [len(texts) for texts in candidates]
        repeated = image_embeddings.repeat_interleave(torch.tensor(counts, device=image_embeddings.device), dim=0)
        cosines = self._cosines(repeated, self.text_embeddings([text for texts in candidates for text in texts])).cpu()
        scores = _clip_scores(cosines)
        # Chosen by cosine: the clipped scores of candidates all dissimilar to the image would all tie at 0.
        best = [int(image_cosines.argmax()) for image_cosines in cosines.split(counts)]
        return best, [float(image_scores[index]) for image_scores, index in zip(scores.split(counts), best)]


def _clip_scores(cosines: torch.Tensor) -> torch.Tensor:
    """CLIPScore from image-caption cosine similarities: weighted, clipped at 0."""
    return CLIPSCORE_WEIGHT * cosines.clamp(min=0)


__all__ = ["CLIPSCORE_PROMPT", "CLIPSCORE_WEIGHT", "CLIPScorer"]
