"""Processor for ClipCap: the image processor and the language model's tokenizer in one object."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken
from transformers import AutoTokenizer, BatchEncoding, BatchFeature
from transformers.processing_utils import ProcessorMixin, TextKwargs

from .configuration_clipcap import ClipCapConfig, check_positive_int, local_folder
from .image_processing_clipcap import IMAGE_OPTIONS, ClipCapImageProcessor, is_iterable

# transformers 4.x copies only the direct relative imports of a remote-code module into its cache, but hashes the
# whole import tree; the image processor imports open_clip_vision lazily, so without this line a saved folder's
# processor fails to load with trust_remote_code unless the model was loaded first.
from .open_clip_vision import resolve_open_clip_model  # noqa: F401

# The tokenizer's options for prompts, as transformers' processors name them; less a second text (`text_pair`), a
# target text (`text_target`, which would give labels without the image tokens: training captions go in `captions`)
# and `mm_token_type_ids`, which ClipCap's inputs do not have.
TEXT_OPTIONS = frozenset(TextKwargs.__annotations__) - {
    "return_tensors", "text_pair", "text_target", "text_pair_target", "return_mm_token_type_ids"
}
# What `from_pretrained` passes on to read the model's config beside a folder saved before image tokens existed.
_HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


# A saved tokenizer's vocabulary: one of these files (fast tokenizers, BPE, WordPiece, sentencepiece).
_TOKENIZER_VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")
# The files of a saved processor, each as the alternatives that serve: its settings (a folder saved before
# processor_config.json existed has preprocessor_config.json), the tokenizer's config and its vocabulary.
_PROCESSOR_FILES = (
    ("processor_config.json", "preprocessor_config.json"),
    ("tokenizer_config.json",),
    _TOKENIZER_VOCABULARY_FILES,
)


def check_tokenizer_files(name_or_path, option: str = "text_model_name_or_path", subfolder: str = "") -> None:
    """
    Refuse a local language model folder (given as `option`) that holds no tokenizer: `model.save_pretrained` alone
    writes none, and transformers then builds a GPT-2 tokenizer with an empty vocabulary (5.x: every caption becomes
    one token) or fails on a None path (4.x). Hub names are left to transformers.
    """
    folder = Path(name_or_path, subfolder).expanduser()
    # Its config counts too: a tokenizer with a vocabulary file of another kind (tiktoken, ...) is not refused here;
    # one that loads with no vocabulary is, after loading.
    tokenizer_files = ("tokenizer_config.json", *_TOKENIZER_VOCABULARY_FILES)
    if folder.is_dir() and not any((folder / name).is_file() for name in tokenizer_files):
        raise FileNotFoundError(
            f"{option} {name_or_path} has no tokenizer (none of {', '.join(tokenizer_files)}); save the "
            f"language model's tokenizer there too (tokenizer.save_pretrained({str(name_or_path)!r}))."
        )


def _check_saved_processor_files(name_or_path, subfolder: str = "") -> None:
    """
    A local folder missing a processor file is named with the file, rather than by transformers' messages about
    converting slow tokenizers (sentencepiece, tiktoken) or Hub repositories.
    """
    folder = Path(name_or_path, subfolder)
    if not folder.is_dir():
        return  # a Hub name: transformers says what it cannot download
    for alternatives in _PROCESSOR_FILES:
        if not any((folder / name).is_file() for name in alternatives):
            raise FileNotFoundError(
                f"{folder} has no {' or '.join(alternatives)}, so it holds no complete processor; copy the model "
                "folder again, or save its processor there (processor.save_pretrained)."
            )


def _texts(value: str | Sequence[str], name: str) -> list:
    """A call's prompts or captions (`name`) as a list; each is checked to be a string where it is tokenized."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (bytes, dict)) or not is_iterable(value):  # a number fails bare, a dict gives keys
        raise TypeError(
            f"`{name}` must be a string or a list of strings (one per image), got {type(value).__name__} "
            f"({value!r:.60})."
        )
    return list(value)


class ClipCapProcessor(ProcessorMixin):
    r"""
    Wraps a [`ClipCapImageProcessor`] and the language model's tokenizer, and writes the image tokens.

    Every row of `input_ids` starts with `num_image_tokens` image tokens (`image_token`, the model's
    `config.prefix_length` and `config.image_token_id`), where the model writes the prefix vectors:

    - `processor(images=...)`: `pixel_values` and the image tokens, for `generate`;
    - `processor(images=..., text=prompts)`: the image tokens and prompt tokens the caption continues, left-padded;
    - `processor(images=..., captions=...)`: training inputs: the image tokens and caption tokens ending in the
      tokenizer's EOS (so a trained model learns to stop), right-padded, and `labels` with -100 on the image tokens
      and padding;
    - `processor.batch_decode(generated_ids, skip_special_tokens=True)`: the prompts and captions (image tokens
      are special tokens, so they are skipped).

    Options are passed as transformers' processors take them: image preprocessing options (`size`, `crop_size`,
    `resample`, `image_mean`, `image_std`) go to the image processor and tokenizer options (`padding`,
    `truncation`, `max_length`, ...) to the tokenizer, as keywords or in `images_kwargs={...}` / `text_kwargs={...}`;
    any other option is an error. `return_tensors` defaults to `"pt"`.

    A tokenizer without a padding token (GPT-2's) gets its EOS token as padding; padded positions are always
    masked out, so this never teaches the model anything about EOS. A tokenizer without the image token gets it.

    Args:
        image_processor ([`ClipCapImageProcessor`], *optional*): defaults to CLIP's preprocessing at 224 pixels.
        tokenizer: the language model's tokenizer.
        num_image_tokens (`int`): image tokens per row: the model's `config.prefix_length`.
        image_token (`str`, *optional*, defaults to `"<image>"`): the image token's text.
    """

    attributes = ["image_processor", "tokenizer"]
    if int(transformers.__version__.split(".")[0]) < 5:  # transformers 5 finds these through the Auto classes
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    # Defaults of the options a call leaves unset. Prompts are left-padded so that every row ends in its last real
    # token, which predicts the first caption token.
    default_return_tensors = "pt"
    default_text_kwargs = {"padding": True, "padding_side": "left", "add_special_tokens": False}

    def __init__(
        self,
        image_processor: ClipCapImageProcessor | None = None,
        tokenizer=None,
        num_image_tokens: int | None = None,
        image_token: str = "<image>",
        **kwargs,
    ):
        if image_processor is None:
            image_processor = ClipCapImageProcessor()
        if tokenizer is None:
            raise ValueError("ClipCapProcessor needs the language model's tokenizer.")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        added = tokenizer.added_tokens_decoder.get(tokenizer.get_vocab().get(image_token))
        if added is None or not added.special:
            # New, or held as ordinary text: made special (keeping its id), so that decoding skips the image tokens.
            tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
        # None only while loading a folder saved before image tokens existed (see `from_pretrained`).
        if num_image_tokens is not None:
            check_positive_int("num_image_tokens", num_image_tokens)
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        super().__init__(image_processor, tokenizer, **kwargs)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    def save_pretrained(self, save_directory, **kwargs):
        # transformers records the `auto_map` on the object while it copies the code files: a saved processor must
        # still equal one loaded from its folder.
        recorded = "auto_map" in self.__dict__
        try:
            return super().save_pretrained(save_directory, **kwargs)
        finally:
            if not recorded:
                self.__dict__.pop("auto_map", None)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> ClipCapProcessor:
        # No code of the folder (a tokenizer's `auto_map`) runs unless asked for: transformers' default would ask at a
        # terminal.
        kwargs.setdefault("trust_remote_code", False)
        _check_saved_processor_files(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if processor.num_image_tokens is None:
            # Saved before image tokens existed; the model's config beside it has the prefix length.
            hub_options = {key: kwargs[key] for key in _HUB_OPTIONS if key in kwargs}
            config = ClipCapConfig.from_pretrained(pretrained_model_name_or_path, **hub_options)
            processor.num_image_tokens = config.prefix_length
        return processor

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model_name_or_path: str,
        text_model_name_or_path: str,
        num_image_tokens: int = 10,
        vision_backend: str = "clip",
        open_clip_pretrained: str | None = None,
        **kwargs,
    ) -> ClipCapProcessor:
        """
        A processor for a new ClipCap built with [`ClipCapForConditionalGeneration.from_vision_text_pretrained`]:
        the CLIP checkpoint's preprocessing (sizes, mean, std), the language model's tokenizer, and the model's
        `prefix_length` as `num_image_tokens`. With `vision_backend="open_clip"`, the preprocessing open_clip uses for
        that model and `open_clip_pretrained` tag.
        """
        vision_model_name_or_path, text_model_name_or_path = map(
            local_folder, (vision_model_name_or_path, text_model_name_or_path)
        )
        image_processor = ClipCapImageProcessor.from_vision_pretrained(
            vision_model_name_or_path, vision_backend, open_clip_pretrained
        )
        check_tokenizer_files(text_model_name_or_path, subfolder=kwargs.get("subfolder") or "")
        # No code from the folder runs unless the caller asks (trust_remote_code=True in kwargs).
        tokenizer = AutoTokenizer.from_pretrained(text_model_name_or_path, **{"trust_remote_code": False, **kwargs})
        if len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens):
            # A Hub model without tokenizer files: transformers 5 builds an empty tokenizer from the config's type.
            raise ValueError(
                f"text_model_name_or_path {text_model_name_or_path} gave a tokenizer with no vocabulary (only its "
                f"special tokens): the model has no tokenizer files. Use a language model saved with its tokenizer."
            )
        return cls(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=num_image_tokens)

    def __call__(
        self,
        images=None,
        text: str | Sequence[str] | None = None,
        captions: str | Sequence[str] | None = None,
        max_caption_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            images: one image or a list (PIL, numpy or torch).
            text: generation prompts, one per image (or one for all); left-padded.
            captions: training captions, one per image; tokenized by [`~ClipCapProcessor.tokenize_captions`].
            max_caption_length: captions longer than this many tokens (EOS included) are cut; at least 1.
            kwargs: `return_tensors` ("pt", "np" or None for lists), image processor options, tokenizer options for
                the prompts, or `images_kwargs` / `text_kwargs` dicts of them.
        """
        if images is None and text is None and captions is None:
            raise ValueError("Pass `images`, `text` (prompts) or `captions`.")
        if text is not None and captions is not None:
            raise ValueError("Pass `text` (generation prompts) or `captions` (training targets), not both.")
        if max_caption_length is not None and captions is None:
            raise ValueError(
                "`max_caption_length` applies to `captions` (training targets); prompts (`text`) take "
                "`truncation=True, max_length=...`."
            )
        return_tensors, images_kwargs, text_kwargs = self._split_options(kwargs)
        data = {}
        num_images = None
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors, **images_kwargs))
            num_images = len(data["pixel_values"])
        elif images_kwargs:
            raise ValueError(f"Got image options {sorted(images_kwargs)} but no `images`.")
        if captions is not None:
            if text_kwargs:
                raise ValueError(
                    f"Got tokenizer options {sorted(text_kwargs)}, which apply to `text` prompts; captions take "
                    "`max_caption_length`."
                )
            captions = _texts(captions, "captions")
            if num_images is not None and len(captions) != num_images:
                raise ValueError(f"Got {num_images} images but {len(captions)} captions; give one caption per image.")
            encoded = self.tokenize_captions(captions, max_length=max_caption_length, return_tensors=return_tensors)
            encoded.pop("num_truncated")  # a count, not a model input
            data.update(encoded)
        else:
            prompts = [""] * (num_images or 1) if text is None else _texts(text, "text")
            if num_images is not None and len(prompts) == 1 and num_images > 1:
                prompts = prompts * num_images
            if num_images is not None and len(prompts) != num_images:
                raise ValueError(
                    f"Got {num_images} images but {len(prompts)} prompts; give one prompt per image, or one for all."
                )
            data.update(self.tokenize_prompts(prompts, return_tensors=return_tensors, **text_kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _split_options(self, kwargs: dict) -> tuple[str | None, dict, dict]:
        """`return_tensors`, the image processor's options and the tokenizer's, from a call's keywords."""
        images_kwargs = dict(kwargs.pop("images_kwargs", None) or {})
        text_kwargs = dict(kwargs.pop("text_kwargs", None) or {})
        common_kwargs = dict(kwargs.pop("common_kwargs", None) or {})
        return_tensors = text_kwargs.pop("return_tensors", self.default_return_tensors)
        return_tensors = kwargs.pop("return_tensors", common_kwargs.pop("return_tensors", return_tensors))
        images_kwargs.pop("return_tensors", None)
        given_twice = sorted(set(kwargs) & (set(images_kwargs) | set(text_kwargs)))
        if given_twice:
            raise ValueError(
                f"Options {given_twice} were passed twice: as keywords and in `images_kwargs`/`text_kwargs`."
            )
        for name, value in {**common_kwargs, **kwargs}.items():
            if name in IMAGE_OPTIONS:
                images_kwargs[name] = value
            elif name in TEXT_OPTIONS:
                text_kwargs[name] = value
            else:
                raise TypeError(
                    f"ClipCapProcessor got an unknown option {name!r}. Image options: {sorted(IMAGE_OPTIONS)}; "
                    f"tokenizer options for prompts: {sorted(TEXT_OPTIONS)}; captions take `max_caption_length`."
                )
        unknown = sorted(set(images_kwargs) - IMAGE_OPTIONS)
        if unknown:
            raise TypeError(f"ClipCapImageProcessor takes no option {unknown}; it takes {sorted(IMAGE_OPTIONS)}.")
        return return_tensors, images_kwargs, text_kwargs

    def tokenize_prompts(
        self, prompts: Sequence[str], return_tensors: str | None = "pt", **tokenizer_kwargs
    ) -> BatchEncoding:
        """
        The image tokens and the prompt tokens (without special tokens), left-padded, ready for `generate`. A prompt's
        image token (`processor.image_token`, at most one) is expanded to `num_image_tokens` in its place, as LLaVA's
        processor does; a prompt without one gets them in front. `tokenizer_kwargs` (e.g. `truncation=True,
        max_length=...`, which count the image tokens) go to the tokenizer and override those defaults; truncation
        cuts the prompt text only (on the tokenizer's `truncation_side`), never an image token.
        """
        image_tokens = self.image_token * self._num_image_tokens()
        if not prompts:
            raise ValueError("Got an empty list of prompts (`text`); give one prompt per image, or one for all.")
        expanded = []
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"Prompt {index} must be a string, got {type(prompt).__name__} ({prompt!r}).")
            placeholders = prompt.count(self.image_token)
            if placeholders > 1:
                raise ValueError(
                    f"Prompt {index} holds {placeholders} image tokens {self.image_token!r}; ClipCap reads one image "
                    "per prompt: write the image token once (where the prefix goes), or not at all (in front)."
                )
            expanded.append(prompt.replace(self.image_token, image_tokens) if placeholders else image_tokens + prompt)
        options = {**self.default_text_kwargs, **tokenizer_kwargs}
        if options.get("truncation") in (None, False, "do_not_truncate"):
            return self.tokenizer(expanded, return_tensors=return_tensors, **options)
        return self._tokenize_truncating_text(expanded, return_tensors, options)

    def _tokenize_truncating_text(self, prompts: list[str], return_tensors: str | None, options: dict) -> BatchEncoding:
        """
        Tokenize prompts that hold their image tokens, cutting only text tokens to `max_length`: the tokenizer's own
        truncation would cut image tokens too (all of them on the left), and the model needs every one.
        """
        num_image_tokens = self._num_image_tokens()
        options = dict(options)
        del options["truncation"]
        max_length = options.get("max_length")
        if max_length is None:
            max_length = self.tokenizer.model_max_length
        if max_length < num_image_tokens:
            raise ValueError(
                f"max_length={max_length} cannot hold the prompt's {num_image_tokens} image tokens, which it counts; "
                f"give at least {num_image_tokens} plus the prompt tokens to keep."
            )
        padding_options = ("padding", "pad_to_multiple_of", "padding_side", "return_attention_mask")
        padding = {name: options.pop(name) for name in padding_options if name in options}
        if options.pop("max_length", None) is not None and padding.get("padding") == "max_length":
            padding["max_length"] = max_length
        if options.get("return_overflowing_tokens"):
            raise ValueError(
                "return_overflowing_tokens is not supported with prompt truncation, which cuts the prompt text only."
            )
        encoded = self.tokenizer(prompts, **options)  # lists, neither cut nor padded
        kept = {self.image_token_id, *self.tokenizer.all_special_ids}  # image tokens, and BOS/EOS as transformers keeps
        from_left = self.tokenizer.truncation_side == "left"
        for row, ids in enumerate(encoded["input_ids"]):
            text_positions = [index for index, token in enumerate(ids) if token not in kept]
            text_budget = max(max_length - (len(ids) - len(text_positions)), 0)
            excess = len(text_positions) - text_budget
            if excess <= 0:
                continue
            cut = set(text_positions[:excess] if from_left else text_positions[text_budget:])
            for values in encoded.values():  # every per-token field (attention mask, offsets...) alike
                if isinstance(values[row], list) and len(values[row]) == len(ids):
                    values[row] = [value for index, value in enumerate(values[row]) if index not in cut]
            if "length" in encoded:  # return_length
                encoded["length"][row] = len(encoded["input_ids"][row])
        # transformers 4.x advises fast tokenizers against `pad` after tokenizing; it is the only way here, as
        # transformers' data collators find (they silence the advice the same way).
        warned = getattr(self.tokenizer, "deprecation_warnings", {})
        advised = warned.get("Asking-to-pad-a-fast-tokenizer", False)
        warned["Asking-to-pad-a-fast-tokenizer"] = True
        try:
            return self.tokenizer.pad(encoded, return_tensors=return_tensors, **padding)
        finally:
            warned["Asking-to-pad-a-fast-tokenizer"] = advised

    def _num_image_tokens(self) -> int:
        if self.num_image_tokens is None:
            raise ValueError(
                "This processor does not know how many image tokens to write: create it with "
                "`num_image_tokens=model.config.prefix_length`."
            )
        return self.num_image_tokens

    def tokenize_captions(
        self,
        captions: Sequence[str],
        max_length: int | None = None,
        return_tensors: str | None = "pt",
        first_index: int = 0,
    ) -> dict:
        """
        Training inputs for captions: the image tokens, the caption's tokens and EOS, right-padded to the longest
        caption of the batch. The text of a special token in a caption (`<|endoftext|>`) is tokenized as text: only
        the EOS added here ends a caption. The image token's text is refused.

        Returns `input_ids`, `attention_mask`, `labels` (a copy of `input_ids` with -100 on the image tokens and
        padding) and `num_truncated`, the number of captions cut to `max_length` tokens (EOS included). Errors number
        the captions from `first_index` (the batch's first row in a dataset).
        """
        # 0 would give empty captions (a NaN loss) and a negative length would silently drop the EOS.
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_caption_length (max_length) must be at least 1 (EOS included), got {max_length}.")
        if not captions:
            raise ValueError("Got an empty list of captions; give one caption per image.")
        token_lists = []
        num_truncated = 0
        for index, caption in enumerate(captions, start=first_index):
            if not isinstance(caption, str):
                raise ValueError(
                    f"Caption {index} must be a string, got {type(caption).__name__} ({caption!r}); for several "
                    "captions per image, repeat the image once per caption."
                )
            if not caption.strip():
                raise ValueError(f"Caption {index} is empty ({caption!r}); every caption needs some text.")
            if self.image_token in caption:  # it would become an extra image token, which the model refuses
                raise ValueError(
                    f"Caption {index} holds the image token {self.image_token!r} ({caption!r}); captions are text "
                    "only (the processor writes the image tokens): remove it from the caption."
                )
            # Else the text "<|endoftext|>" would become an EOS label mid-caption, teaching the model to stop there.
            tokens = self.tokenizer(caption, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            tokens.append(self.tokenizer.eos_token_id)
            if max_length is not None and len(tokens) > max_length:
                tokens = tokens[:max_length]
                num_truncated += 1
            token_lists.append(tokens)
        longest = max(len(tokens) for tokens in token_lists)
        pad_id = self.tokenizer.pad_token_id
        image_tokens = [self.image_token_id] * self._num_image_tokens()
        input_ids = [image_tokens + tokens + [pad_id] * (longest - len(tokens)) for tokens in token_lists]
        attention_mask = [
            [1] * (len(image_tokens) + len(tokens)) + [0] * (longest - len(tokens)) for tokens in token_lists
        ]
        labels = [
            [-100] * len(image_tokens) + tokens + [-100] * (longest - len(tokens)) for tokens in token_lists
        ]
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
