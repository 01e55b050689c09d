"""`ClipCapCaptioner`: caption a batch dict (images or CLIP embeddings) and return it with captions.

One callable for every batch engine: `datasets.Dataset.map(captioner, batched=True)`, Ray Data's
`map_batches(captioner)`, a Spark pandas UDF around it, or a plain loop. With `num_candidates` and a CLIP scorer it
samples (or beam-searches) several captions per image and keeps the one CLIP scores highest, as LAION-COCO did.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.utils import logging

from ..image_processing_clipcap import load_image, to_rgb_image
from ..onednn import cpu_linear_kernels
from ..utils.bad_images import BadImagePolicy, check_bad_image_policy
from ..utils.loading import load_clipcap, to_device_and_dtype
from ..utils.memory import reuse_freed_memory
from .clip_score import CLIPScorer

logger = logging.get_logger(__name__)


@dataclass
class CaptionBatch:
    """The captions of a batch of images, in order."""

    captions: list[str]
    """Each image's caption (the CLIP-chosen candidate when reranking, else the first returned sequence)."""
    candidates: list[list[str]] | None = None
    """Every caption generated for each image, when more than one was asked for."""
    scores: list[float] | None = None
    """Each chosen caption's CLIPScore, when reranking."""


def decode_image(value: Any) -> PIL.Image.Image:
    """
    A batch's image as the upright 8-bit RGB PIL image the processor makes of it: a PIL image, a file path, encoded
    bytes, a `{"bytes", "path"}` dict (a datasets `Image(decode=False)` value, or how Ray Data reads such a column
    from parquet), or a numpy array or torch tensor of any layout and dtype the processor reads (HWC or CHW; uint8,
    uint16, bool, integers in [0, 255], floats in [0, 1]).
    Raises a ValueError saying why, here rather than in the batch's preprocessing, so that it names one row (and the
    file, for a path).
    """
    path = None
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise ValueError("The image holds neither bytes nor a path.")
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            with PIL.Image.open(io.BytesIO(value)) as image:
                image.load()
                value = image.copy()
        except PIL.UnidentifiedImageError as error:  # its message names a BytesIO object, which says nothing
            raise ValueError(
                f"Cannot decode the image bytes ({len(value)} bytes): no image format PIL reads"
            ) from error
        except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
            raise ValueError(f"Cannot decode the image bytes ({len(value)} bytes): {error}") from error
    elif isinstance(value, (str, os.PathLike)):
        path = value
        value = load_image(value)  # names the file
    if not isinstance(value, (PIL.Image.Image, np.ndarray, torch.Tensor)):
        raise ValueError(f"Cannot read an image from a {type(value).__name__}.")
    # The processor's own conversion, so that an image it would refuse (a float TIFF of [0, 255] values, ...) is
    # refused here; a PIL image not loaded yet (truncated data) fails here with an OSError.
    try:
        return to_rgb_image(value)
    except (OSError, ValueError) as error:
        if path is None and isinstance(error, ValueError):
            raise  # it says why; the caller names the row
        raise ValueError(f"Cannot read {'the image' if path is None else f'image {path}'}: {error}") from error


def _embedding_vector(value: Any, size: int) -> np.ndarray:
    """A batch's CLIP embedding as a float32 vector of `size` numbers. Raises a ValueError saying why not."""
    if value is None:
        raise ValueError("The embedding is missing (None)")
    try:
        vector = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"The embedding is not an array of numbers: {error}") from error
    if vector.shape != (size,):
        raise ValueError(f"The embedding has shape {vector.shape}, expected ({size},): the model's CLIP embedding size "
                         "(config.prefix_dim)")
    if not np.isfinite(vector).all():  # generate would caption it as garbage, or fail to sample from it
        raise ValueError("The embedding holds NaN or infinite values")
    return vector


def _argument_spelling(name: str, value: Any = None) -> str:
    """How [`check_decoding_options`] names an argument by default: `num_beams`, or `num_beams=3` with a value."""
    return name if value is None else f"{name}={value}"


@contextlib.contextmanager
def captioning_run(model: torch.nn.Module) -> Iterator[None]:
    """
    What a loop that captions many batches with `model` in one process holds around the loop, as
    `caption_dataset_to_parquet`, `iter_captions` and the Trainer's caption evaluation do. On the CPU in fp32, each
    weight that oneDNN computes is packed once for the whole loop (`clipcap_hf.onednn.cpu_linear_kernels(model,
    prepack=True)`; the packed copies, as large as the weights, are freed when the block ends), and on the CPU the
    memory a batch frees stays in the process's heap for the next batch instead of being handed back to the system
    and faulted in again (`clipcap_hf.utils.memory.reuse_freed_memory()`, with glibc). Elsewhere it changes nothing.
    Enter it once the model is on its device and in its dtype: they decide the kernels.

    The memory switches are glibc's, for the whole process: while the block runs, whatever the main thread frees stays
    in the heap (the loop's own work too), so the process's memory stays near its peak until the block ends, and only
    the main thread gains (see `clipcap_hf.utils.memory`).

    ```python
    >>> with torch.no_grad(), captioning_run(captioner.model):
    ...     for batch in batches:
    ...         captions.extend(captioner(batch)["caption"])
    ```
    """
    # The memory block outside: it ends last, so the packed copies are freed before the heap is handed back.
    with (
        reuse_freed_memory() if model.device.type == "cpu" else contextlib.nullcontext(),
        cpu_linear_kernels(model, prepack=True),
    ):
        yield


# `generate` options that change only how sampling draws: greedy and beam search ignore them, with a mere warning.
SAMPLING_OPTIONS = ("top_p", "temperature", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def check_decoding_options(
    num_candidates: int = 1,
    reranker: CLIPScorer | str | os.PathLike | None = None,
    *,
    spelling: Callable[..., str] = _argument_spelling,
    **generate_kwargs,
) -> None:
    """
    Refuse [`ClipCapCaptioner`] arguments that do not go together, saying which to change: sampling options without
    `do_sample=True`, more captions per image (`num_return_sequences`, `num_candidates`) than greedy decoding or the
    beams give (sampled beam search too keeps one caption per beam), `num_candidates` without a `reranker` or the
    other way round, and `num_candidates` with `num_return_sequences`. `do_sample` and `num_beams` not given count as
    greedy decoding.

    The one home of these rules: the captioner applies them, and `clipcap caption` applies them before it loads any
    model, with `spelling(name, value=None)` naming its options (`--num-beams 3` rather than `num_beams=3`; a value of
    `True` is a flag's).
    """
    sampling = bool(generate_kwargs.get("do_sample"))
    num_beams = generate_kwargs.get("num_beams") or 1
    num_sequences = generate_kwargs.get("num_return_sequences") or 1

    def check_enough_captions(name: str, count: int) -> None:
        if count <= num_beams or (sampling and num_beams == 1):
            return
        if num_beams > 1:  # beam search, sampled or not, keeps one caption per beam
            without_beams = "" if sampling else f", or {spelling('do_sample', True)} without {spelling('num_beams')}"
            raise ValueError(f"{spelling(name, count)} needs {spelling('num_beams', count)} or more{without_beams}: "
                             f"{num_beams} beams give at most {num_beams}, with or without sampling.")
        raise ValueError(f"{spelling(name, count)} needs {spelling('do_sample', True)}, or "
                         f"{spelling('num_beams', count)} or more: greedy decoding gives one.")

    if not sampling:
        given = [spelling(name) for name in SAMPLING_OPTIONS if generate_kwargs.get(name) is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} only apply when sampling: add {spelling('do_sample', True)}.")
    if num_candidates < 1:
        raise ValueError(f"{spelling('num_candidates')} must be at least 1, got {num_candidates}.")
    if num_candidates > 1:
        if reranker is None:
            raise ValueError(f"{spelling('num_candidates', num_candidates)} needs a CLIP model to choose among the "
                             f"captions: give {spelling('reranker')}.")
        if num_sequences > 1:
            raise ValueError(f"Give {spelling('num_candidates')} or {spelling('num_return_sequences')}, not both: "
                             f"{spelling('num_candidates')} sets how many captions each image gets.")
        check_enough_captions("num_candidates", num_candidates)
    elif reranker is not None:
        raise ValueError(f"{spelling('reranker')} chooses among candidate captions: give "
                         f"{spelling('num_candidates', 'N')} (N > 1) with it.")
    check_enough_captions("num_return_sequences", num_sequences)


class ClipCapCaptioner:
    """
    Caption batches of images with a ClipCap model: call it on a dict of columns, get the dict back with a caption
    column added.

    Args:
        model: a ClipCap model, or the folder or Hub name of one (its processor is loaded with it).
        processor: the model's processor (needed with an in-memory model).
        device, dtype: where and in which precision the model runs (default: the model's own).
        image_column: the column of images (PIL images, paths, bytes, `{"bytes", "path"}` dicts, numpy arrays or
            torch tensors: see [`decode_image`]).
        embedding_column: the column of precomputed CLIP image embeddings (from `clipcap embed`), used when the
            batch has no `image_column`: the vision tower does not run.
        caption_column: the column the captions go in.
        key_column: the column that names each row in error messages (absent: the row's position in the batch).
        num_candidates: generate this many captions per image and keep the one `reranker` scores highest; needs
            sampling (`do_sample=True`) without beams, or beam search (sampled or not) with at least as many beams.
        reranker: a [`CLIPScorer`], or the folder or Hub name of the CLIP model to build one from.
        on_bad_image: what to do with a row whose image cannot be read or is one the processor refuses (a float
            image outside [0, 1], ...), or whose embedding is missing or of the wrong size: `"error"` raises naming
            the row; `"skip"` gives it a `None` caption and logs a warning.
        **generate_kwargs: decoding options for `model.generate` (`max_new_tokens`, `num_beams`, `do_sample`,
            `top_p`, `temperature`, `num_return_sequences`, ...).

    Options that do not go together are refused here, by [`check_decoding_options`].

    The returned batch has `caption_column`, plus `candidates` (all captions of each image) when more than one is
    generated per image, and `clip_score` when reranking.

    Each call is one batch. A caller looping over many batches in one process can wrap the loop in
    [`captioning_run`]`(captioner.model)`, as `caption_dataset_to_parquet` does: on the CPU, each weight is then
    packed for oneDNN once for the whole loop instead of the plain weights being reordered at every product, and the
    memory one batch frees serves the next.

    Example:

    ```python
    >>> captioner = ClipCapCaptioner("path/to/clipcap", max_new_tokens=20)
    >>> dataset = dataset.map(captioner, batched=True, batch_size=32)   # datasets
    >>> dataset = ray_dataset.map_batches(captioner, batch_size=32)     # Ray Data
    ```
    """

    def __init__(
        self,
        model,
        processor=None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        image_column: str = "image",
        embedding_column: str = "embedding",
        caption_column: str = "caption",
        key_column: str = "image_key",
        num_candidates: int = 1,
        reranker: CLIPScorer | str | os.PathLike | None = None,
        on_bad_image: BadImagePolicy = "error",
        **generate_kwargs,
    ):
        check_bad_image_policy(on_bad_image)
        if isinstance(model, (str, os.PathLike)):
            model, processor = load_clipcap(str(model), "model")
        if processor is None:
            raise ValueError("Give the model's processor with an in-memory model (`processor=`).")
        # What is not given, the generation config decides (as in `generate`: the one passed, else the model's).
        generation_config = generate_kwargs.get("generation_config") or model.generation_config
        defaults = {"do_sample": generation_config.do_sample, "num_beams": generation_config.num_beams}
        if num_candidates == 1:  # with candidates, their number is the one that counts
            defaults["num_return_sequences"] = generation_config.num_return_sequences
        options = {**defaults, **generate_kwargs}
        check_decoding_options(num_candidates, reranker, **options)
        if num_candidates > 1:
            generate_kwargs["num_return_sequences"] = num_candidates
        self.model = to_device_and_dtype(model, device, dtype).eval()
        self.processor = processor
        if isinstance(reranker, (str, os.PathLike)):
            reranker = CLIPScorer(str(reranker), device=self.model.device)
        self.reranker = reranker
        self.image_column = image_column
        self.embedding_column = embedding_column
        self.caption_column = caption_column
        self.key_column = key_column
        self.on_bad_image = on_bad_image
        self.generate_kwargs = generate_kwargs
        self.do_sample = bool(options["do_sample"])
        # Captions per image that `generate` returns, to group them by image.
        self.num_sequences = generate_kwargs.get("num_return_sequences") or generation_config.num_return_sequences or 1

    @torch.no_grad()
    def caption(
        self,
        images: Sequence[PIL.Image.Image] | None = None,
        image_embeds: torch.Tensor | np.ndarray | Sequence | None = None,
    ) -> CaptionBatch:
        """Caption PIL images, or precomputed CLIP embeddings (shape `(batch, prefix_dim)`)."""
        if (images is None) == (image_embeds is None):
            raise ValueError("Give images or image_embeds (exactly one).")
        if isinstance(images, PIL.Image.Image):
            raise TypeError("`images` is a list of images: caption one image with `caption([image])`.")
        if images is None and self.reranker is not None:  # before generating captions that could not be chosen
            raise ValueError("Reranking with CLIP needs the images, not only their embeddings.")
        if len(images if images is not None else image_embeds) == 0:
            return CaptionBatch([], [] if self.num_sequences > 1 else None, [] if self.reranker else None)
        if images is not None:
            inputs = {"pixel_values": self.processor(images=list(images), return_tensors="pt")["pixel_values"]}
        else:
            embeds = image_embeds
            if not isinstance(embeds, torch.Tensor):
                embeds = torch.as_tensor(np.asarray(embeds))
            inputs = {"image_embeds": embeds}
        inputs = {name: tensor.to(self.model.device) for name, tensor in inputs.items()}
        generated = self.model.generate(**inputs, **self.generate_kwargs)
        texts = self.processor.post_process_image_text_to_text(generated)
        if self.num_sequences == 1:
            return CaptionBatch(texts)
        candidates = [texts[start : start + self.num_sequences] for start in range(0, len(texts), self.num_sequences)]
        if self.reranker is None:
            return CaptionBatch([texts[0] for texts in candidates], candidates)
        best, scores = self.reranker.rerank(images, candidates)
        return CaptionBatch([texts[index] for texts, index in zip(candidates, best)], candidates, scores)

    def caption_batch(self, batch: Mapping[str, Sequence]) -> tuple[dict[str, list], dict[int, str]]:
        """
        The batch with captions added, and each unreadable row's error (by position); those rows get `None`. What
        [`__call__`] does without applying `on_bad_image`, for callers that name rows their own way.
        """
        output = {
            name: values if isinstance(values, np.ndarray) else list(values) for name, values in batch.items()
        }
        if self.image_column in batch:
            column, read = self.image_column, decode_image
        elif self.embedding_column in batch:
            dim = self.model.config.prefix_dim
            column, read = self.embedding_column, lambda value: _embedding_vector(value, dim)
        else:
            raise ValueError(
                f"The batch has neither an {self.image_column!r} column of images nor an {self.embedding_column!r} "
                f"column of CLIP embeddings; it has {sorted(batch)}. Set image_column or embedding_column."
            )
        inputs, errors = {}, {}
        for row, value in enumerate(batch[column]):
            try:
                inputs[row] = read(value)
            except ValueError as error:
                errors[row] = str(error)
        if column == self.image_column:
            result = self.caption(images=list(inputs.values()))
        else:
            result = self.caption(image_embeds=np.stack(list(inputs.values())) if inputs else np.empty((0, dim)))
        rows, size = list(inputs), len(batch[column])

        def spread(values: list) -> list:  # back to one entry per row, None for the unreadable ones
            by_row = dict(zip(rows, values))
            return [by_row.get(row) for row in range(size)]

        output[self.caption_column] = spread(result.captions)
        if result.candidates is not None:
            output["candidates"] = spread(result.candidates)
        if result.scores is not None:
            output["clip_score"] = spread(result.scores)
        return output, errors

    def row_name(self, batch: Mapping[str, Sequence], row: int) -> str:
        """How an error message names a row: its key, else its position in the batch."""
        if self.key_column in batch:
            key = batch[self.key_column][row]
            if isinstance(key, np.generic):  # Ray Data's numpy batches: np.str_('a.jpg') is not how users name it
                key = key.item()
            return f"key {key!r}"
        return f"row {row} of the batch"

    def __call__(self, batch: Mapping[str, Sequence]) -> dict[str, list]:
        output, errors = self.caption_batch(batch)
        if errors:
            report = "; ".join(f"{self.row_name(batch, row)}: {error}" for row, error in errors.items())
            if self.on_bad_image == "error":
                raise ValueError(
                    f"{len(errors)} image(s) of the batch cannot be read ({report}). Fix or remove them, or skip "
                    "them (on_bad_image='skip')."
                )
            logger.warning(f"Skipped {len(errors)} unreadable image(s), captioned None: {report}")
        return output


__all__ = ["BadImagePolicy", "CaptionBatch", "ClipCapCaptioner", "check_decoding_options", "decode_image"]
