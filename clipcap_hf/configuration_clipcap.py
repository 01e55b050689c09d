"""ClipCap model configuration."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, CLIPVisionConfig, GPT2Config, PretrainedConfig

MAPPING_TYPES = ("mlp", "transformer")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return value


class ClipCapConfig(PretrainedConfig):
    r"""
    Configuration of a [`ClipCapForConditionalGeneration`]: a CLIP image encoder, a mapping network that turns the
    CLIP image embedding into `prefix_length` vectors in the language model's embedding space, and a causal language
    model that reads those vectors as a prefix.

    The defaults describe the paper's MLP variant: CLIP ViT-B/32 (512-d embedding), an MLP mapper, a prefix of 10
    vectors and GPT-2 small.

    Args:
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            The CLIP vision tower. Defaults to ViT-B/32 (`CLIPVisionConfig()`).
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
            Transformer mapper only: attention heads; must divide the language model's hidden size.
        prefix_dim (`int`, *optional*):
            Width of the CLIP image embedding the mapper reads. Defaults to `vision_config.projection_dim`.
        normalize_prefix (`bool`, *optional*, defaults to `False`):
            Divide the image embedding by its L2 norm before the mapper (the paper's transformer release does).

    Example:

    ```python
    >>> from transformers import CLIPVisionConfig, GPT2Config
    >>> from clipcap_hf import ClipCapConfig, ClipCapForConditionalGeneration

    >>> config = ClipCapConfig(mapping_type="transformer", prefix_length=40, clip_length=40)
    >>> model = ClipCapForConditionalGeneration(config)
    ```
    """

    model_type = "clipcap"
    sub_configs = {"vision_config": CLIPVisionConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config: dict | CLIPVisionConfig | None = None,
        text_config: dict | PretrainedConfig | None = None,
        mapping_type: str = "mlp",
        prefix_length: int = 10,
        clip_length: int | None = None,
        mapping_num_layers: int = 8,
        mapping_num_heads: int = 8,
        prefix_dim: int | None = None,
        normalize_prefix: bool = False,
        **kwargs,
    ):
        if vision_config is None:
            vision_config = CLIPVisionConfig()
        elif isinstance(vision_config, dict):
            vision_config = CLIPVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        elif not isinstance(vision_config, CLIPVisionConfig):
            raise ValueError(
                f"`vision_config` must be a CLIPVisionConfig or a dict, got {type(vision_config).__name__}."
            )

        if text_config is None:
            text_config = GPT2Config()
        elif isinstance(text_config, dict):
            if "model_type" not in text_config:
                raise ValueError("`text_config` given as a dict needs a `model_type` key, e.g. {'model_type': 'gpt2'}.")
            text_config = AutoConfig.for_model(**text_config)
        elif not isinstance(text_config, PretrainedConfig):
            raise ValueError(f"`text_config` must be a PretrainedConfig or a dict, got {type(text_config).__name__}.")

        if mapping_type not in MAPPING_TYPES:
            raise ValueError(f"`mapping_type` must be one of {MAPPING_TYPES}, got {mapping_type!r}.")
        _positive_int("prefix_length", prefix_length)
        _positive_int("mapping_num_layers", mapping_num_layers)
        _positive_int("mapping_num_heads", mapping_num_heads)
        if mapping_type == "transformer":
            clip_length = _positive_int("clip_length", prefix_length if clip_length is None else clip_length)
            if text_config.hidden_size % mapping_num_heads:
                raise ValueError(
                    f"`mapping_num_heads` ({mapping_num_heads}) must divide the language model's hidden size "
                    f"({text_config.hidden_size})."
                )
        elif clip_length is not None:
            raise ValueError("`clip_length` is only used by mapping_type='transformer'; leave it None for 'mlp'.")
        prefix_dim = _positive_int("prefix_dim", vision_config.projection_dim if prefix_dim is None else prefix_dim)
        if not isinstance(normalize_prefix, bool):
            raise ValueError(f"`normalize_prefix` must be True or False, got {normalize_prefix!r}.")

        self.vision_config = vision_config
        self.text_config = text_config
        self.mapping_type = mapping_type
        self.prefix_length = prefix_length
        self.clip_length = clip_length
        self.mapping_num_layers = mapping_num_layers
        self.mapping_num_heads = mapping_num_heads
        self.prefix_dim = prefix_dim
        self.normalize_prefix = normalize_prefix
        super().__init__(**kwargs)


__all__ = ["ClipCapConfig"]
