"""ClipCap model configuration."""

from __future__ import annotations

import os
from typing import Any

# transformers 5 checks configs as huggingface_hub's strict dataclasses (in every huggingface_hub that transformers
# 4.57 and 5 take), whose errors are no ValueErrors; 4.57's own checks raise ValueError.
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, CLIPVisionConfig, GPT2Config, PretrainedConfig

from .open_clip_vision import resolve_open_clip_model, vision_part_of_model_cfg

MAPPING_TYPES = ("mlp", "transformer")
VISION_BACKENDS = ("clip", "open_clip")
# The transformers vision towers the "clip" backend takes (by the model_type of their vision config), and the ways
# each gives one image embedding, its default first: "projection" (CLIP's projected embedding, what CLIP's
# `get_image_features` returns), "pooled" (the tower's `pooler_output`: SigLIP's attention-pooling head, ViT's tanh
# pooler), "cls" (the final CLS token) and "cls_mean_patch" (the CLS token followed by the mean patch token, as
# DINOv2's linear probes read it).
VISION_POOLINGS = {
    "clip_vision_model": ("projection",),
    "siglip_vision_model": ("pooled",),
    "siglip2_vision_model": ("pooled",),
    "vit": ("cls", "pooled"),
    "dinov2": ("cls", "cls_mean_patch"),
    "dinov2_with_registers": ("cls", "cls_mean_patch"),
}
# Whole image-text models, whose config holds the vision tower's as `vision_config`.
IMAGE_TEXT_MODEL_TYPES = ("clip", "siglip", "siglip2")


def vision_tower_config(config: dict | PretrainedConfig) -> PretrainedConfig:
    """
    The vision tower's config out of a vision config, or of a whole CLIP/SigLIP config (its vision part), as a
    config or a dict (a dict without `model_type` is a CLIP vision config, as saved before other towers existed).
    """
    if isinstance(config, PretrainedConfig):
        model_type = config.model_type
    elif isinstance(config, dict):
        model_type = config.get("model_type", CLIPVisionConfig.model_type)
    else:
        raise ValueError(f"`vision_config` must be a PretrainedConfig or a dict, got {type(config).__name__}.")
    if model_type in IMAGE_TEXT_MODEL_TYPES:  # e.g. a CLIP checkpoint's config.json
        whole = config if isinstance(config, dict) else config.to_dict()
        vision_part = {**(whole.get("vision_config") or {}), "model_type": f"{model_type}_vision_model"}
        if "projection_dim" in whole:  # a whole CLIP's projection width is its own, not its vision part's
            vision_part["projection_dim"] = whole["projection_dim"]
        return vision_tower_config(vision_part)
    if model_type not in VISION_POOLINGS:
        raise ValueError(
            f"`vision_config` describes a {model_type!r} model, which gives no single image embedding ClipCap knows; "
            f"give a vision tower of one of {sorted(VISION_POOLINGS)} (or a whole {', '.join(IMAGE_TEXT_MODEL_TYPES)} "
            "config), or an open_clip tower (vision_backend='open_clip')."
        )
    if isinstance(config, PretrainedConfig):
        return config
    return _sub_config("vision_config", {**config, "model_type": model_type})


def _sub_config(name: str, fields: dict[str, Any]) -> PretrainedConfig:
    """
    The sub-config `name` built from `fields` (its `model_type` among them). Its own checks' errors are ValueErrors
    naming it on every transformers version: the loading code names the folder of a config.json edited by hand.
    """
    try:
        return AutoConfig.for_model(**fields)
    except StrictDataclassError as error:
        # The check's own words, on one line: hub's message is the validator's name, then the cause indented.
        raise ValueError(f"`{name}`: {error.__cause__ or error}") from error


def resolve_vision_pooling(vision_config: PretrainedConfig, vision_pooling: str | None = None) -> str:
    """
    The way a transformers tower (a config [`vision_tower_config`] gave) gives its one image embedding: `vision_pooling`
    checked against the tower, or when None the tower's default (its first in `VISION_POOLINGS`). The one rule for the
    config and `load_pretrained_vision_model`, which resolves the pooling before it loads any weights.
    """
    poolings = VISION_POOLINGS[vision_config.model_type]
    vision_pooling = poolings[0] if vision_pooling is None else vision_pooling
    if vision_pooling not in poolings:
        raise ValueError(
            f"`vision_pooling` must be one of {poolings} for a {vision_config.model_type!r} tower, got "
            f"{vision_pooling!r}."
        )
    if vision_pooling == "pooled" and getattr(vision_config, "vision_use_head", True) is False:
        raise ValueError(
            f"vision_pooling='pooled' reads the tower's attention-pooling head, and this {vision_config.model_type!r} "
            "config has none (`vision_use_head=False`); give a tower with its head."
        )
    return vision_pooling


def vision_embedding_size(vision_config: PretrainedConfig, vision_pooling: str) -> int:
    """Width of the image embedding a transformers tower gives with a pooling."""
    if vision_pooling == "projection":
        return vision_config.projection_dim
    if vision_pooling == "cls_mean_patch":
        return 2 * vision_config.hidden_size
    if vision_pooling == "pooled" and vision_config.model_type == "vit":  # ViT's pooler may widen the embedding
        return getattr(vision_config, "pooler_output_size", None) or vision_config.hidden_size
    return vision_config.hidden_size


def local_folder(name_or_path: str) -> str:
    """A local folder's path with `~` expanded (transformers does not expand it), else `name_or_path` (a Hub name)."""
    folder = os.path.expanduser(name_or_path)
    return folder if os.path.isdir(folder) else name_or_path


def check_positive_int(name: str, value: Any) -> int:
    """`value` of the config field `name`, which must be a positive integer (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return value


def _text_embedding_size(text_config: PretrainedConfig) -> int:
    # Usually `hidden_size`; OPT (e.g. opt-350m: `word_embed_proj_dim`) and ELECTRA-style configs (`embedding_size`)
    # embed tokens narrower than the hidden states and project them up inside the model.
    for name in ("word_embed_proj_dim", "embedding_size"):
        if isinstance(getattr(text_config, name, None), int):
            return getattr(text_config, name)
    return text_config.hidden_size


def check_vision_backend(vision_backend: str, vision_pooling: str | None = None, **open_clip_fields: Any) -> None:
    """
    `vision_backend` is a known one, `vision_pooling` is given only with transformers towers, and the open_clip
    fields (`open_clip_pretrained`, ...) among `open_clip_fields` only with the open_clip backend. Shared by the config
    and `load_pretrained_vision_model`, which both take these from users.
    """
    if vision_backend not in VISION_BACKENDS:
        raise ValueError(f"`vision_backend` must be one of {VISION_BACKENDS}, got {vision_backend!r}.")
    if vision_backend == "open_clip" and vision_pooling is not None:
        raise ValueError(
            f"`vision_pooling` ({vision_pooling!r}) applies to transformers towers; an open_clip tower gives its "
            "projected embedding. Leave it None with vision_backend='open_clip'."
        )
    given = [name for name, value in open_clip_fields.items() if value is not None]
    if vision_backend == "clip" and given:
        raise ValueError(
            f"vision_backend='clip' does not use {', '.join(f'`{name}`' for name in given)}; set "
            f"vision_backend='open_clip' or leave {'it' if len(given) == 1 else 'them'} None."
        )


def check_mapping_num_heads(mapping_num_heads: int, text_embedding_size: int) -> None:
    if text_embedding_size % mapping_num_heads:
        raise ValueError(
            f"`mapping_num_heads` ({mapping_num_heads}) must divide the language model's token-embedding width "
            f"({text_embedding_size})."
        )


class ClipCapConfig(PretrainedConfig):
    r"""
    Configuration of a [`ClipCapForConditionalGeneration`]: a CLIP image encoder, a mapping network that turns the
    CLIP image embedding into `prefix_length` vectors in the language model's embedding space, and a causal language
    model that reads those vectors as a prefix.

    The defaults describe the paper's MLP variant: CLIP ViT-B/32 (512-d embedding), an MLP mapper, a prefix of 10
    vectors and GPT-2 small.

    The image encoder is a transformers vision tower (`vision_backend="clip"`, described by `vision_config`: CLIP, or
    SigLIP, SigLIP2, ViT or DINOv2, whose one image embedding `vision_pooling` names) or an open_clip image tower
    (`vision_backend="open_clip"`, described by the `open_clip_*` fields), e.g. the RN50x4 of the paper's transformer
    release, which transformers does not have. Either way its weights are part of the ClipCap checkpoint.

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*):
            The vision tower of the `"clip"` backend: a CLIP, SigLIP, SigLIP2, ViT, DINOv2 (or DINOv2 with registers)
            vision config; of a whole CLIP or SigLIP config, its vision part; a dict needs a `model_type` unless it
            describes CLIP. Defaults to CLIP ViT-B/32 (`CLIPVisionConfig()`); must be `None` with the `"open_clip"`
            backend.
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Any causal language model config; a dict needs a `model_type` key. Defaults to GPT-2 small.
        mapping_type (`str`, *optional*, defaults to `"mlp"`):
            `"mlp"` (Linear - Tanh - Linear, as in the paper's fine-tuned-LM variant) or `"transformer"` (the paper's
            frozen-LM variant).
        prefix_length (`int`, *optional*, defaults to 10):
            Number of prefix vectors `k` handed to the language model.
        clip_length (`int`, *optional*):
            Transformer mapper only: number of vectors the CLIP embedding is first projected to. Defaults to
            `prefix_length`. Must be `None` for the MLP mapper, which has no such stage.
        mapping_num_layers (`int`, *optional*, defaults to 8):
            Transformer mapper only: number of transformer layers.
        mapping_num_heads (`int`, *optional*, defaults to 8):
            Transformer mapper only: attention heads; must divide the language model's token-embedding width.
        prefix_dim (`int`, *optional*):
            Width of the image embedding the mapper reads. Defaults to the vision tower's:
            `vision_config.projection_dim` (CLIP), `hidden_size` (twice it for `"cls_mean_patch"`), or
            `open_clip_model_cfg["embed_dim"]`.
        normalize_prefix (`bool`, *optional*, defaults to `False`):
            Divide the image embedding by its L2 norm before the mapper (the paper's transformer release does).
        vision_backend (`str`, *optional*, defaults to `"clip"`):
            `"clip"` (a transformers vision tower: `CLIPVisionModelWithProjection`, or the `AutoModel` of another
            `vision_config`) or `"open_clip"` (needs `open_clip_torch`).
        vision_pooling (`str`, *optional*):
            `"clip"` backend: how the tower's output becomes one image embedding: `"projection"` (CLIP, the only
            choice there), `"pooled"` (the tower's `pooler_output`: SigLIP, SigLIP2, ViT), `"cls"` (the final CLS
            token: ViT, DINOv2) or `"cls_mean_patch"` (the CLS token and the mean patch token, concatenated: DINOv2).
            Defaults to the tower's first: projection, pooled, cls, cls. Must be `None` with `"open_clip"`.
        open_clip_model_name (`str`, *optional*):
            open_clip backend: the model, e.g. `"RN50x4"`, `"ViT-B-32"`, `"local-dir:PATH"` or `"hf-hub:ORG/REPO"`.
            Used to resolve `open_clip_model_cfg` when that is not given, and kept as a record.
        open_clip_pretrained (`str`, *optional*):
            open_clip backend: the pretrained tag the tower's weights came from (e.g. `"openai"`). With a built-in
            model name it picks the tag's activation (QuickGELU for OpenAI's weights). Nothing is downloaded because
            of it: the weights are in the ClipCap checkpoint.
        open_clip_model_cfg (`dict`, *optional*):
            open_clip backend: the tower's architecture, `{"embed_dim", "vision_cfg", "quick_gelu"}` as in open_clip's
            model configs. Resolved from `open_clip_model_name` and `open_clip_pretrained` when not given; give it
            for a custom tower.
        image_token_id (`int`, *optional*):
            The token that stands for a prefix position in `input_ids`: the processor writes `prefix_length` of them
            in front of the text, and the model replaces their embeddings with the prefix vectors. Defaults to the
            first id after the language model's vocabulary (`text_config.vocab_size`), the id a tokenizer gives a
            newly added token; the model grows the language model's embeddings to hold it. A folder saved before
            image tokens existed has none, and `from_pretrained` adds it.

    Example:

    ```python
    >>> from transformers import CLIPVisionConfig, GPT2Config
    >>> from clipcap_hf import ClipCapConfig, ClipCapForConditionalGeneration

    >>> config = ClipCapConfig(mapping_type="transformer", prefix_length=40, clip_length=40)
    >>> model = ClipCapForConditionalGeneration(config)

    >>> # The paper's transformer release: open_clip's RN50x4 (640-d embeddings), normalized
    >>> config = ClipCapConfig(
    ...     vision_backend="open_clip", open_clip_model_name="RN50x4", open_clip_pretrained="openai",
    ...     mapping_type="transformer", prefix_length=40, clip_length=40, normalize_prefix=True,
    ... )
    >>> config.prefix_dim
    640
    ```
    """

    model_type = "clipcap"

    def __init__(
        self,
        vision_config: dict | PretrainedConfig | None = None,
        text_config: dict | PretrainedConfig | None = None,
        mapping_type: str = "mlp",
        prefix_length: int = 10,
        clip_length: int | None = None,
        mapping_num_layers: int = 8,
        mapping_num_heads: int = 8,
        prefix_dim: int | None = None,
        normalize_prefix: bool = False,
        vision_backend: str = "clip",
        vision_pooling: str | None = None,
        open_clip_model_name: str | None = None,
        open_clip_pretrained: str | None = None,
        open_clip_model_cfg: dict[str, Any] | None = None,
        image_token_id: int | None = None,
        **kwargs,
    ):
        check_vision_backend(
            vision_backend,
            vision_pooling,
            open_clip_model_name=open_clip_model_name,
            open_clip_pretrained=open_clip_pretrained,
            open_clip_model_cfg=open_clip_model_cfg,
        )
        if vision_backend == "open_clip":
            if vision_config is not None:
                raise ValueError(
                    "`vision_config` describes the 'clip' backend's tower; leave it None with "
                    "vision_backend='open_clip' and name the tower with `open_clip_model_name`."
                )
            if open_clip_model_cfg is not None:
                open_clip_model_cfg = vision_part_of_model_cfg(open_clip_model_cfg, source="`open_clip_model_cfg`")
            elif open_clip_model_name is not None:
                open_clip_model_cfg = resolve_open_clip_model(open_clip_model_name, open_clip_pretrained)[0]
            else:
                raise ValueError(
                    "vision_backend='open_clip' needs `open_clip_model_name` (e.g. 'RN50x4') or `open_clip_model_cfg`."
                )
            embedding_dim = open_clip_model_cfg["embed_dim"]
        else:
            vision_config = CLIPVisionConfig() if vision_config is None else vision_tower_config(vision_config)
            vision_pooling = resolve_vision_pooling(vision_config, vision_pooling)
            embedding_dim = vision_embedding_size(vision_config, vision_pooling)

        if text_config is None:
            text_config = GPT2Config()
        elif isinstance(text_config, dict):
            if "model_type" not in text_config:
                raise ValueError("`text_config` given as a dict needs a `model_type` key, e.g. {'model_type': 'gpt2'}.")
            text_config = _sub_config("text_config", text_config)
        elif not isinstance(text_config, PretrainedConfig):
            raise ValueError(f"`text_config` must be a PretrainedConfig or a dict, got {type(text_config).__name__}.")

        if mapping_type not in MAPPING_TYPES:
            raise ValueError(f"`mapping_type` must be one of {MAPPING_TYPES}, got {mapping_type!r}.")
        check_positive_int("prefix_length", prefix_length)
        positions = getattr(text_config, "max_position_embeddings", None)
        if isinstance(positions, int) and prefix_length >= positions:
            raise ValueError(
                f"`prefix_length` ({prefix_length}) leaves no position for text: the language model has {positions} "
                "(text_config.max_position_embeddings). Use a smaller prefix_length."
            )
        check_positive_int("mapping_num_layers", mapping_num_layers)
        check_positive_int("mapping_num_heads", mapping_num_heads)
        if mapping_type == "transformer":
            clip_length = check_positive_int("clip_length", prefix_length if clip_length is None else clip_length)
            check_mapping_num_heads(mapping_num_heads, _text_embedding_size(text_config))
        elif clip_length is not None:
            raise ValueError("`clip_length` is only used by mapping_type='transformer'; leave it None for 'mlp'.")
        prefix_dim = check_positive_int("prefix_dim", embedding_dim if prefix_dim is None else prefix_dim)
        if prefix_dim != embedding_dim:  # the mapper reads the tower's embeddings: the first image would fail
            raise ValueError(
                f"`prefix_dim` ({prefix_dim}) differs from the width of the vision tower's image embeddings "
                f"({embedding_dim}{f', vision_pooling={vision_pooling!r}' if vision_pooling else ''}), which the "
                "mapping network reads; leave "
                "prefix_dim unset (it defaults to that width), or give the vision config of the tower that made your "
                "embeddings."
            )
        if not isinstance(normalize_prefix, bool):
            raise ValueError(f"`normalize_prefix` must be True or False, got {normalize_prefix!r}.")
        if image_token_id is None and "transformers_version" not in kwargs:
            # A new config; one read from a folder saved before image tokens existed keeps None (see the docstring).
            image_token_id = text_config.vocab_size
        elif image_token_id is not None and (
            isinstance(image_token_id, bool) or not isinstance(image_token_id, int) or image_token_id < 0
        ):
            raise ValueError(f"`image_token_id` must be a token id (an integer >= 0), got {image_token_id!r}.")
        if image_token_id is not None:
            # Shared with EOS, generation could never end (the image token is suppressed); with padding, pads would
            # count as image tokens.
            names = ("bos_token_id", "eos_token_id", "pad_token_id")
            special_ids = {name: getattr(text_config, name, None) for name in names}
            clashes = [f"{name} ({ids})" for name, ids in special_ids.items()
                       if ids is not None and image_token_id in (ids if isinstance(ids, (list, tuple)) else [ids])]
            if clashes:
                raise ValueError(
                    f"`image_token_id` ({image_token_id}) is also the language model's {' and '.join(clashes)}; the "
                    "image token needs an id of its own (add e.g. '<image>' to the tokenizer and pass its id)."
                )

        self.vision_config = vision_config
        self.text_config = text_config
        self.mapping_type = mapping_type
        self.prefix_length = prefix_length
        self.clip_length = clip_length
        self.mapping_num_layers = mapping_num_layers
        self.mapping_num_heads = mapping_num_heads
        self.prefix_dim = prefix_dim
        self.normalize_prefix = normalize_prefix
        self.vision_backend = vision_backend
        self.vision_pooling = vision_pooling
        self.open_clip_model_name = open_clip_model_name
        self.open_clip_pretrained = open_clip_pretrained
        self.open_clip_model_cfg = open_clip_model_cfg
        self.image_token_id = image_token_id
        super().__init__(**kwargs)

    @property
    def text_embedding_size(self) -> int:
        """Width of the language model's token embeddings, which each prefix vector has."""
        return _text_embedding_size(self.text_config)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        # A saved ClipCap config always holds its parts' configs; without them __init__ would build default-size parts,
        # which then fail on the weights with a shape error.
        needed = ["text_config"] + (["vision_config"] if config_dict.get("vision_backend", "clip") == "clip" else [])
        missing = [key for key in needed if key not in config_dict]
        if config_dict.get("model_type") == cls.model_type and missing:
            raise ValueError(
                f"{pretrained_model_name_or_path}: config.json has no {' and no '.join(missing)}; a saved ClipCap "
                "config describes its parts. Restore the config.json saved with the model."
            )
        return config_dict, kwargs

    @property
    def sub_configs(self) -> dict[str, type]:
        # The open_clip backend has no `vision_config`; transformers would try to serialise a listed None sub-config.
        if getattr(self, "vision_config", None) is None:
            return {"text_config": AutoConfig}
        return {"vision_config": AutoConfig, "text_config": AutoConfig}


__all__ = ["ClipCapConfig"]
