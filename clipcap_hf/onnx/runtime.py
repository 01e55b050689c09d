"""Caption with an exported ClipCap folder on ONNX Runtime: no PyTorch model, the same tokens as `generate()`.

Greedy decoding and beam search are written out here over numpy, following transformers' `generate()` step for
step (its logits processors that ClipCap's generation configs use, its beam bookkeeping and stopping rule), because
ONNX Runtime's own generation loop (onnxruntime-genai) needs its own model format and cannot start from prefix
embeddings, and transformers' beam search lives inside `generate()` over torch tensors and a PyTorch model (the
standalone `BeamSearchScorer` is gone from transformers 5).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from transformers import GenerationConfig

from ..configuration_clipcap import ClipCapConfig
from ..modeling_clipcap import caption_length, fit_caption_to_positions
from ..processing_clipcap import ClipCapProcessor
from .export import GRAPHS, LOGITS_TO_KEEP, ONNX_SUBFOLDER, POSITION_LIMIT_KEY, QUANTIZED_SUFFIX, past_names

if TYPE_CHECKING:
    import onnxruntime

# The generation config fields this loop follows or that cannot change the tokens; a folder whose generation config
# sets any other field away from transformers' default is refused rather than decoded otherwise than `generate()`.
_IMPLEMENTED_SETTINGS = {
    "max_length", "max_new_tokens", "num_beams", "eos_token_id", "pad_token_id", "suppress_tokens", "length_penalty",
    "early_stopping",
}
_TOKEN_NEUTRAL_SETTINGS = {
    # unused: no BOS is generated, and ClipCap is no encoder-decoder
    "bos_token_id", "decoder_start_token_id",
    # how transformers computes or returns, not what
    "use_cache", "cache_implementation", "cache_config", "max_cache_len", "compile_config", "disable_compile",
    "prefill_chunk_size", "low_memory", "continuous_batching_config", "output_attentions", "output_hidden_states",
    "output_scores", "output_logits", "return_dict_in_generate", "return_legacy_cache",
    # read only with an assistant model, which only a call to `generate()` can give
    "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind",
    "target_lookbehind", "max_matching_ngram_size", "is_assistant",
    # the file's bookkeeping
    "transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash",
}
# Read only when sampling (`do_sample`, itself refused): transformers ignores them in greedy and beam search.
_SAMPLING_SETTINGS = {"temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h"}
_ALLOWED_SETTINGS = _IMPLEMENTED_SETTINGS | _TOKEN_NEUTRAL_SETTINGS | _SAMPLING_SETTINGS
# Values that turn a setting off where transformers 5's default is None (4.x's defaults, which its files may hold).
_OFF_VALUES = {
    "do_sample": False, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "min_length": 0, "num_beam_groups": 1, "diversity_penalty": 0.0,
    "num_return_sequences": 1, "renormalize_logits": False, "remove_invalid_values": False, "token_healing": False,
    "guidance_scale": 1.0,
}
_NEG_INF = np.float32(-np.inf)


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError('The ONNX captioner needs onnxruntime: pip install "clipcap_hf[onnx]"') from error
    return onnxruntime


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass
class DecoderState:
    """What the decoder has read: its key/value cache (one array per name) and the number of positions."""

    past: dict[str, np.ndarray]
    length: int

    def select(self, rows: np.ndarray) -> DecoderState:
        """The state of the given batch rows (beam search's surviving beams), in that order."""
        return DecoderState({name: value[rows] for name, value in self.past.items()}, self.length)


class OnnxCaptioner:
    r"""
    Captions images with the graphs `clipcap export-onnx` wrote.

    Args:
        folder: the exported folder (config.json, generation_config.json, the processor, `onnx/*.onnx`).
        quantized: use the int8 graphs (`onnx/*_quantized.onnx`).
        providers: ONNX Runtime execution providers (default: the CPU's).
        session_options: `onnxruntime.SessionOptions` for every graph's session, e.g. with `intra_op_num_threads` set
            (ONNX Runtime's threads ignore `OMP_NUM_THREADS` and `torch.set_num_threads`). Default: ONNX Runtime's
            defaults, with its warnings about unused initializers silenced.

    Example:

    ```python
    >>> captioner = OnnxCaptioner("clipcap-onnx")
    >>> captioner.caption([PIL.Image.open("photo.jpg")], num_beams=3)
    ```
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        quantized: bool = False,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        session_options: onnxruntime.SessionOptions | None = None,
    ):
        onnxruntime = _import_onnxruntime()
        folder = Path(folder)
        suffix = QUANTIZED_SUFFIX if quantized else ""
        graphs = {name: folder / ONNX_SUBFOLDER / f"{name}{suffix}.onnx" for name in GRAPHS}
        missing = [str(path) for path in graphs.values() if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder} is not a complete ONNX export: {', '.join(missing)} missing; export it again with "
                f"`clipcap export-onnx MODEL --output {folder} --overwrite`"
                + ("" if not quantized else " (without --no-int8)")
            )
        self.config = ClipCapConfig.from_pretrained(folder)
        self.generation_config = GenerationConfig.from_pretrained(folder)
        self.processor = ClipCapProcessor.from_pretrained(folder, trust_remote_code=False)
        options = session_options
        if options is None:
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3  # warnings about unused initializers are not the user's concern
        self.sessions = {
            name: onnxruntime.InferenceSession(str(path), options, providers=list(providers))
            for name, path in graphs.items()
        }
        self._past_names = past_names(self.config.text_config.num_hidden_layers)
        decoder = self.sessions["decoder_model_merged"]
        past_input = next(i for i in decoder.get_inputs() if i.name in self._past_names)
        self._kv_heads, self._head_dim = past_input.shape[1], past_input.shape[3]
        # Exports older than the optional `num_logits_to_keep` input return every position's logits.
        optional_inputs = {initializer.name for initializer in decoder.get_overridable_initializers()}
        self._can_keep_logits = LOGITS_TO_KEEP in optional_inputs
        # The learned position table's size (None: rotary or ALiBi positions, or an export older than the entry).
        limit = decoder.get_modelmeta().custom_metadata_map.get(POSITION_LIMIT_KEY, "none")
        self._position_limit = None if limit == "none" else int(limit)

    # ------------------------------------------------------------------------------------------------ the graphs

    def prefix_embeds(
        self, pixel_values: np.ndarray | None = None, image_embeds: np.ndarray | None = None
    ) -> np.ndarray:
        """The prefix vectors `(batch, prefix_length, hidden)` of images, from pixels or precomputed CLIP embeddings."""
        if (pixel_values is None) == (image_embeds is None):
            raise ValueError("Pass exactly one of `pixel_values` or `image_embeds`.")
        # Checked here: ONNX Runtime's own error for a wrong shape names the graph's input but no fix.
        if pixel_values is not None:
            pixel_values = np.asarray(pixel_values, np.float32)
            side = self.processor.image_processor.crop_size
            if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, side, side):
                raise ValueError(
                    f"`pixel_values` must have shape (batch_size, 3, {side}, {side}) for this export, got "
                    f"{pixel_values.shape}; make them with `captioner.processor`, or pass images to `caption()`."
                )
            return self.sessions["vision_encoder"].run(None, {"pixel_values": pixel_values})[0]
        image_embeds = np.asarray(image_embeds, np.float32)
        if image_embeds.ndim != 2 or image_embeds.shape[1] != self.config.prefix_dim:
            raise ValueError(
                f"`image_embeds` must have shape (batch_size, {self.config.prefix_dim}) for this export "
                f"(config.prefix_dim), got {image_embeds.shape}. Compute them with the vision tower this model was "
                "trained with."
            )
        return self.sessions["mapping_network"].run(None, {"image_embeds": image_embeds})[0]

    def embed_tokens(self, input_ids: np.ndarray) -> np.ndarray:
        """The language model's input embeddings of token ids `(batch, length)`."""
        return self.sessions["embed_tokens"].run(None, {"input_ids": np.asarray(input_ids, np.int64)})[0]

    def empty_state(self, batch_size: int) -> DecoderState:
        """The state before the first step: a key/value cache of length 0 (the merged decoder's first-step input)."""
        empty = np.zeros((batch_size, self._kv_heads, 0, self._head_dim), np.float32)
        return DecoderState(dict.fromkeys(self._past_names, empty), 0)

    def decode(
        self, inputs_embeds: np.ndarray, state: DecoderState, last_logits_only: bool = False
    ) -> tuple[np.ndarray, DecoderState]:
        """
        One decoder call over new positions: the logits at them (at the last one only with `last_logits_only`, which
        spares the language-model head's work at the others), and the state with them read.
        """
        batch, new = inputs_embeds.shape[:2]
        total = state.length + new
        feeds = {
            "inputs_embeds": inputs_embeds.astype(np.float32, copy=False),
            "attention_mask": np.ones((batch, total), np.int64),
            "position_ids": np.broadcast_to(np.arange(state.length, total, dtype=np.int64), (batch, new)),
            **state.past,
        }
        if last_logits_only and self._can_keep_logits:
            feeds[LOGITS_TO_KEEP] = np.array(1, np.int64)
        logits, *present = self.sessions["decoder_model_merged"].run(None, feeds)
        return logits, DecoderState(dict(zip(self._past_names, present)), total)

    # ------------------------------------------------------------------------------------------------ decoding

    def generate(
        self,
        pixel_values: np.ndarray | None = None,
        image_embeds: np.ndarray | None = None,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
    ) -> list[list[int]]:
        """
        The new tokens of each image's caption, as `model.generate(...)[:, prefix_length:]` gives them (greedy rows
        padded with the pad token to the longest; beam search's best sequence per image).
        """
        settings = self._settings(max_new_tokens, num_beams)
        prefix = self.prefix_embeds(pixel_values, image_embeds)
        if not len(prefix):
            return []  # no image: as greedy decoding gives it (beam search's bookkeeping needs a row)
        if settings["num_beams"] == 1:
            return self._greedy(prefix, settings)
        return self._beam_search(prefix, settings)

    def caption(self, images, max_new_tokens: int | None = None, num_beams: int | None = None) -> list[str]:
        """Captions of images (PIL, numpy or torch, as the processor takes them)."""
        pixel_values = self.processor.image_processor(images, return_tensors="np")["pixel_values"]
        tokens = self.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens, num_beams=num_beams)
        return [text.strip() for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]

    def _settings(self, max_new_tokens: int | None, num_beams: int | None) -> dict:
        config = self.generation_config
        defaults = GenerationConfig().to_dict()
        for name, value in config.to_dict().items():
            # (A field this transformers does not know is ignored by its `generate()` too.)
            if name in _ALLOWED_SETTINGS or name not in defaults:
                continue
            if not (value is None or value == defaults[name] or (name in _OFF_VALUES and value == _OFF_VALUES[name])):
                raise ValueError(
                    f"generation_config.json sets {name}={value!r}, which the ONNX captioner does not implement "
                    "(greedy and beam search with a length, stop and pad tokens, suppressed tokens, a length penalty); "
                    "remove it from the exported folder's generation config, or caption with the PyTorch model."
                )
        eos = config.eos_token_id
        for name, value in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"{name}={value!r}: pass a positive integer, or leave it out (None) to use the generation config's."
                )
        # As the PyTorch model loaded from this folder reads the generation config, and fits it to the positions.
        prefix_length = self.config.prefix_length
        if max_new_tokens is None:
            length, option = caption_length(config, prefix_length), "the generation config's caption length"
        else:
            length, option = max_new_tokens, "max_new_tokens"
        return {
            "max_new_tokens": fit_caption_to_positions(self._position_limit, prefix_length, length, option),
            "num_beams": (config.num_beams or 1) if num_beams is None else num_beams,
            "eos": set(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            # transformers pads with the first EOS token where no pad token is set.
            "pad": (
                config.pad_token_id if config.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
            ),
            # As `generate()`: the image token too, whatever the list says, and no ids outside the vocabulary (those
            # past its end are dropped at each step, against the logits' width).
            "suppress": np.array(
                [token for token in {*(config.suppress_tokens or []), self.config.image_token_id}
                 if token is not None and token >= 0],
                np.int64,
            ),
            # transformers 5 leaves unset fields None; these are its defaults.
            "length_penalty": 1.0 if config.length_penalty is None else config.length_penalty,
            "early_stopping": False if config.early_stopping is None else config.early_stopping,
        }

    def _step_log_probs(self, logits: np.ndarray, settings: dict, log_softmax: bool) -> np.ndarray:
        """The last position's scores after the generation config's processors (suppressed tokens at -inf)."""
        scores = logits[:, -1].astype(np.float32)
        if log_softmax:  # beam search processes log-probabilities, greedy search raw logits, as transformers does
            scores = _log_softmax(scores)
        suppress = settings["suppress"]
        scores[:, suppress[suppress < scores.shape[-1]]] = _NEG_INF
        return scores

    def _greedy(self, prefix: np.ndarray, settings: dict) -> list[list[int]]:
        batch = len(prefix)
        logits, state = self.decode(prefix, self.empty_state(batch), last_logits_only=True)
        tokens = np.zeros((batch, 0), np.int64)
        finished = np.zeros(batch, bool)
        for step in range(settings["max_new_tokens"]):
            next_tokens = self._step_log_probs(logits, settings, log_softmax=False).argmax(-1)
            if finished.any():  # (with no EOS nothing finishes, and there may be no pad token either)
                next_tokens = np.where(finished, settings["pad"], next_tokens)
            tokens = np.concatenate((tokens, next_tokens[:, None]), axis=1)
            finished |= np.isin(next_tokens, list(settings["eos"]))
            if finished.all() or step + 1 == settings["max_new_tokens"]:
                break
            logits, state = self.decode(self.embed_tokens(next_tokens[:, None]), state, last_logits_only=True)
        return tokens.tolist()

    def _beam_search(self, prefix: np.ndarray, settings: dict) -> list[list[int]]:
        """
        transformers' beam search (`_beam_search`) for a batch of images: per image the same candidates, scores and
        stopping rule, with the beams of every image still searching in one decoder call per step. An image whose
        search has stopped leaves the batch (transformers keeps computing it until every image has stopped, which
        changes nothing in its result).
        """
        beams, eos, penalty = settings["num_beams"], settings["eos"], settings["length_penalty"]
        max_new = settings["max_new_tokens"]
        keep = max(2, 1 + len(eos)) * beams  # candidates kept per image and step, so that `beams` remain after EOS
        logits, state = self.decode(
            np.repeat(prefix, beams, axis=0), self.empty_state(len(prefix) * beams), last_logits_only=True
        )
        images = np.arange(len(prefix))  # the images still searching, in the decoder's row order (`beams` rows each)
        running = np.zeros((len(prefix), beams, 0), np.int64)  # each running beam's tokens
        running_scores = np.full((len(prefix), beams), -1e9, np.float32)
        running_scores[:, 0] = 0.0  # all beams start alike: only the first one's continuations count
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in prefix]  # per image: (normalised score, tokens)
        for step in range(max_new):
            log_probs = self._step_log_probs(logits, settings, log_softmax=True)
            vocab = log_probs.shape[-1]
            # Each image's candidates: every continuation of every beam, numbered beam * vocab + token.
            log_probs = log_probs.reshape(len(images), beams, vocab) + running_scores[..., None]
            log_probs = log_probs.reshape(len(images), beams * vocab)
            top = _top_k(log_probs, keep)
            scores = np.take_along_axis(log_probs, top, axis=1)
            sources, tokens = np.divmod(top, vocab)
            candidates = np.concatenate((np.take_along_axis(running, sources[..., None], axis=1), tokens[..., None]), 2)
            # A candidate ends with an EOS token or at the length limit; only the best `beams` may be kept as ended.
            # (An image whose captions can no longer change has left the batch: see `_search_is_over`.)
            last_step = step + 1 == max_new
            ends = np.isin(tokens, list(eos)) | last_step
            for row, image in enumerate(images):
                ended = [(float(scores[row, rank]) / (step + 1) ** penalty, candidates[row, rank].tolist())
                         for rank in range(beams) if ends[row, rank]]
                finished[image] = sorted(finished[image] + ended, key=lambda item: -item[0])[:beams]
            if last_step:
                break
            # The best `beams` candidates that do not end run on (argsort is stable: they stay in score order).
            continuing = np.argsort(ends, axis=1, kind="stable")[:, :beams]
            running = np.take_along_axis(candidates, continuing[..., None], axis=1)
            running_scores = np.take_along_axis(scores, continuing, axis=1)
            # The decoder rows whose caches the running beams extend (each image's beams are `beams` rows in a row).
            cache_rows = np.arange(len(images))[:, None] * beams + np.take_along_axis(sources, continuing, axis=1)
            searching = ~ends.all(axis=1) & [
                not self._search_is_over(finished[image], best, step, settings)
                for image, best in zip(images, running_scores[:, 0])
            ]
            if not searching.any():
                break
            images, running, running_scores = images[searching], running[searching], running_scores[searching]
            next_tokens = running[:, :, -1].reshape(-1, 1)
            state = state.select(cache_rows[searching].reshape(-1))
            logits, state = self.decode(self.embed_tokens(next_tokens), state, last_logits_only=True)
        return [captions[0][1] for captions in finished]

    @staticmethod
    def _search_is_over(
        finished: list[tuple[float, list[int]]], best_running: float, step: int, settings: dict
    ) -> bool:
        """
        transformers' stopping rule for one image: once it holds `beams` ended captions, stop (early_stopping=True),
        or stop when its best running beam cannot beat the worst of them, scored at its current length (at the length
        limit with early_stopping="never" and a positive length penalty, which favours longer captions).
        """
        if len(finished) < settings["num_beams"]:
            return False
        if settings["early_stopping"] is True:
            return True
        penalty = settings["length_penalty"]
        never = settings["early_stopping"] == "never" and penalty > 0
        hypothetical_length = settings["max_new_tokens"] if never else step + 1
        return best_running / hypothetical_length**penalty <= finished[-1][0]


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """The indices of each row's `k` largest scores, largest first (equal scores: the lower index first)."""
    top = np.sort(np.argpartition(-scores, k - 1, axis=-1)[..., :k], axis=-1)
    order = np.argsort(-np.take_along_axis(scores, top, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(top, order, axis=-1)


def caption_agreement(first: Sequence[str | list[int]], second: Sequence[str | list[int]]) -> float:
    """The fraction of images whose two captions are the same (as texts, or as token lists)."""
    return sum(a == b for a, b in zip(first, second, strict=True)) / len(first)

