"""PyTorch ClipCap: CLIP image embedding -> mapping network -> prefix for a causal language model."""

from __future__ import annotations

import contextlib
import copy
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionModelWithProjection,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.cache_utils import Cache
from transformers.loss.loss_utils import fixed_cross_entropy
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple, logging

from .configuration_clipcap import VISION_BACKENDS, ClipCapConfig, check_mapping_num_heads
from .onednn import onednn_linear
from .open_clip_vision import ClipCapOpenClipVisionModel, resolve_open_clip_model

logger = logging.get_logger(__name__)

# The caption length `generate()` and the pipelines use when the generation config sets none.
DEFAULT_MAX_NEW_TOKENS = 30

# Held while `generate()` lends the language model its generation config (one lock for all models: a lock attribute
# would make models impossible to deep-copy or pickle).
_LANGUAGE_MODEL_GENERATION_LOCK = threading.RLock()

# Language model families whose logits are exactly `lm_head(last_hidden_state)`, with no scaling, soft-capping or
# auxiliary loss after it: only these take the training fast path, which applies the LM head itself at the
# predicting positions. Any other family keeps its own full forward, so its loss is always its own.
PLAIN_LM_HEAD_MODEL_TYPES = frozenset(
    {
        "bloom", "falcon", "gemma", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox", "gptj", "llama", "mistral", "olmo",
        "olmo2", "opt", "phi", "phi3", "qwen2", "qwen3", "smollm3", "stablelm", "starcoder2",
    }
)


@dataclass
class ClipCapCausalLMOutputWithPast(ModelOutput):
    r"""
    Output of [`ClipCapForConditionalGeneration`].

    Args:
        loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `labels` is provided):
            Next-token cross-entropy over the caption tokens (prefix and padding excluded).
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`, *optional*):
            Language model scores. When an image is given, `sequence_length` counts the prefix positions first.
            `None` when the model is in training mode and `labels` are given: the loss is then computed from the
            scores at the caption positions only, and the full tensor is never materialized. Put the model in eval
            mode (`model.eval()`) to get both the loss and the logits.
        past_key_values (`Cache`, *optional*):
            The language model's key/value cache, for fast decoding.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            The language model's hidden states, when `output_hidden_states=True`.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            The language model's attention weights, when `output_attentions=True`.
        prefix_embeds (`torch.FloatTensor` of shape `(batch_size, prefix_length, text_embedding_size)`, *optional*):
            The prefix vectors the mapping network produced from the image.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    prefix_embeds: torch.FloatTensor | None = None


def _is_right_padding(mask: torch.Tensor) -> bool:
    """Whether every row of a boolean `(batch, length)` mask is False, then True to its end."""
    return bool((mask[:, 1:] | ~mask[:, :-1]).all())


class ClipCapMLPMapper(nn.Module):
    """The paper's MLP mapper: Linear(d, k*h/2) - Tanh - Linear(k*h/2, k*h), viewed as k vectors of width h."""

    def __init__(self, config: ClipCapConfig):
        super().__init__()
        hidden_size = config.text_embedding_size
        self.prefix_length = config.prefix_length
        total = config.prefix_length * hidden_size
        # `model.0` / `model.2` match the released checkpoints' `clip_project.model.{0,2}` one to one.
        self.model = nn.Sequential(nn.Linear(config.prefix_dim, total // 2), nn.Tanh(), nn.Linear(total // 2, total))

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.model(image_embeds).view(image_embeds.shape[0], self.prefix_length, -1)


class ClipCapAttention(nn.Module):
    """Multi-head self-attention laid out as in the paper's code: one query projection, one fused key/value one."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_queries = nn.Linear(hidden_size, hidden_size, bias=False)
        # Output rows [0, h) are the keys and [h, 2h) the values, once reshaped to (..., 2, heads, head_dim).
        self.to_keys_values = nn.Linear(hidden_size, 2 * hidden_size, bias=False)
        self.project = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden_states.shape
        head_dim = width // self.num_heads
        queries = self.to_queries(hidden_states).view(batch, length, self.num_heads, head_dim).transpose(1, 2)
        keys_values = self.to_keys_values(hidden_states).view(batch, length, 2, self.num_heads, head_dim)
        keys, values = keys_values.permute(2, 0, 3, 1, 4).unbind(0)
        # No mask: every position attends to every other, as in the original mapper.
        attended = F.scaled_dot_product_attention(queries, keys, values)
        return self.project(attended.transpose(1, 2).reshape(batch, length, width))


class ClipCapMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(hidden_states)))


class ClipCapTransformerLayer(GradientCheckpointingLayer):
    """
    Pre-norm transformer layer (LayerNorm -> attention, LayerNorm -> ReLU MLP with ratio 2), as in the paper. It is
    checkpointed with `gradient_checkpointing_enable()`, like the language model's layers.
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = ClipCapAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = ClipCapMLP(hidden_size, 2 * hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states))
        return hidden_states + self.mlp(self.norm2(hidden_states))


class ClipCapTransformer(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(ClipCapTransformerLayer(hidden_size, num_heads) for _ in range(num_layers))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


class ClipCapTransformerMapper(nn.Module):
    """
    The paper's transformer mapper: the image embedding is projected to `clip_length` vectors, `prefix_length`
    learned constants are appended, a transformer mixes them, and the outputs at the constants' positions are the
    prefix.
    """

    def __init__(self, config: ClipCapConfig):
        super().__init__()
        hidden_size = config.text_embedding_size
        # Checked again here: a language model given to the model's constructor may have changed the width.
        check_mapping_num_heads(config.mapping_num_heads, hidden_size)
        self.clip_length = config.clip_length
        self.linear = nn.Linear(config.prefix_dim, config.clip_length * hidden_size)
        self.prefix_const = nn.Parameter(torch.randn(config.prefix_length, hidden_size))
        self.transformer = ClipCapTransformer(hidden_size, config.mapping_num_heads, config.mapping_num_layers)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        batch = image_embeds.shape[0]
        projected = self.linear(image_embeds).view(batch, self.clip_length, -1)
        constants = self.prefix_const.unsqueeze(0).expand(batch, -1, -1)
        mixed = self.transformer(torch.cat((projected, constants), dim=1))
        return mixed[:, self.clip_length :]


class ClipCapPreTrainedModel(PreTrainedModel):
    config_class = ClipCapConfig
    config: ClipCapConfig
    base_model_prefix = "clipcap"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # A mapper layer adds its input to its sub-layers' outputs, so `device_map="auto"` must keep it on one device
    # (the towers' own layers are listed by their classes).
    _no_split_modules = ["ClipCapTransformerLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]

    def _init_weights(self, module: nn.Module) -> None:
        # Only the mapper is ours to initialise, with PyTorch's defaults as the paper's code does. The vision tower and
        # the language model are initialised by their own classes (open_clip's tower in its constructor), and may
        # hold pretrained weights already.
        if isinstance(module, ClipCapTransformerMapper):
            nn.init.normal_(module.prefix_const)
        if isinstance(module, (ClipCapMLPMapper, ClipCapTransformerMapper)):
            for layer in module.modules():
                if isinstance(layer, (nn.Linear, nn.LayerNorm)):
                    layer.reset_parameters()


def load_pretrained_vision_model(
    vision_model_name_or_path: str, vision_backend: str = "clip", open_clip_pretrained: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    r"""
    A pretrained CLIP image tower, and the [`ClipCapConfig`] fields that describe it.

    Args:
        vision_model_name_or_path (`str`):
            `"clip"` backend: a transformers CLIP checkpoint on the Hub or on disk (`"openai/clip-vit-base-patch32"`).
            `"open_clip"` backend: an open_clip model name (`"RN50x4"`, `"local-dir:PATH"`, `"hf-hub:ORG/REPO"`).
        vision_backend (`str`, *optional*, defaults to `"clip"`):
            `"clip"` or `"open_clip"`.
        open_clip_pretrained (`str`, *optional*):
            `"open_clip"` backend with a built-in model name: the pretrained tag (`"openai"`) or a weights file.
    """
    if vision_backend not in VISION_BACKENDS:
        raise ValueError(f"`vision_backend` must be one of {VISION_BACKENDS}, got {vision_backend!r}.")
    if vision_backend == "clip":
        if open_clip_pretrained is not None:
            raise ValueError("`open_clip_pretrained` only applies to vision_backend='open_clip'.")
        _check_local_path(vision_model_name_or_path, "vision model")
        vision_model, loading_info = CLIPVisionModelWithProjection.from_pretrained(
            vision_model_name_or_path, output_loading_info=True
        )
        # transformers builds a default CLIP tower from any checkpoint and only reports the weights it lacked; a
        # tower without its pretrained weights would then be frozen at random.
        if loading_info["missing_keys"]:
            missing = sorted(loading_info["missing_keys"])
            raise ValueError(
                f"{vision_model_name_or_path!r} is not a CLIP vision checkpoint: {len(missing)} of the tower's weights "
                f"are missing from it (e.g. {missing[0]!r}). Give a CLIP model such as "
                "'openai/clip-vit-base-patch32'."
            )
        return vision_model, {"vision_config": vision_model.config}
    model_cfg = resolve_open_clip_model(vision_model_name_or_path, open_clip_pretrained)[0]
    vision_model = ClipCapOpenClipVisionModel.from_open_clip_pretrained(
        vision_model_name_or_path, open_clip_pretrained, model_cfg
    )
    vision_fields = {
        "vision_backend": "open_clip",
        "open_clip_model_name": vision_model_name_or_path,
        "open_clip_pretrained": open_clip_pretrained,
        "open_clip_model_cfg": model_cfg,
    }
    return vision_model, vision_fields


def _check_local_path(name_or_path: str, what: str) -> None:
    """A path-like name that does not exist: say so, rather than transformers' "Repo id must be in the form"."""
    if (os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))) and not os.path.exists(
        os.path.expanduser(name_or_path)
    ):
        raise FileNotFoundError(f"The {what} {name_or_path!r} does not exist.")


class ClipCapForConditionalGeneration(ClipCapPreTrainedModel, GenerationMixin):
    r"""
    ClipCap: a frozen CLIP image encoder, a mapping network that turns its image embedding into `prefix_length`
    prefix vectors, and a causal language model that continues the prefix with a caption.

    The vision tower is frozen on construction (`freeze_vision_model`); the language model trains unless
    [`~ClipCapForConditionalGeneration.freeze_language_model`] is called. Frozen parts stay in eval mode when the
    model is put in training mode, so a frozen language model runs without dropout.
    """

    # The image is the main input, as for BLIP and VisionEncoderDecoder; pipelines read this name.
    main_input_name = "pixel_values"

    def __init__(
        self,
        config: ClipCapConfig,
        vision_model: PreTrainedModel | ClipCapOpenClipVisionModel | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        # Parts given ready-made bring their own configs, which replace the config's: it must describe the parts it is
        # saved with, or loading the folder would build other ones.
        if vision_model is None:
            # An open_clip tower is built from its config with random weights; the checkpoint fills them, so loading a
            # saved model never downloads open_clip weights.
            if config.vision_backend == "open_clip":
                vision_model = ClipCapOpenClipVisionModel(config.open_clip_model_cfg)
            else:
                vision_model = CLIPVisionModelWithProjection(config.vision_config)
        elif config.vision_backend == "clip":
            config.vision_config = vision_model.config
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        else:
            config.text_config = language_model.config
        embedding_size = language_model.get_input_embeddings().embedding_dim
        if embedding_size != config.text_embedding_size:
            raise ValueError(
                f"The language model's token embeddings are {embedding_size}-d, but its config gives "
                f"{config.text_embedding_size}-d (`config.text_embedding_size`, read from `config.text_config`); the "
                "prefix vectors must have the width of the token embeddings."
            )
        self.vision_model = vision_model
        mapper_class = ClipCapMLPMapper if config.mapping_type == "mlp" else ClipCapTransformerMapper
        self.mapping_network = mapper_class(config)
        self.language_model = language_model
        self.post_init()
        self.freeze_vision_model()
        # Every non -100 label is a prediction target (the first caption token is predicted by the last prefix
        # vector). The "ForConditionalGeneration" loss type would make Trainer count only `labels[:, 1:]` for
        # `num_items_in_batch`, one token short per caption; the loss is computed by `_caption_loss` instead.
        self.loss_type = None
        self._set_generation_defaults()

    def _set_generation_defaults(self) -> None:
        """Caption decoding defaults, where the generation config leaves them unset."""
        generation_config = self.generation_config
        if generation_config.pad_token_id is None:
            # Batched captions end at different lengths; pad them with EOS, as GPT-2-style models have no pad token.
            eos_token_id = generation_config.eos_token_id
            generation_config.pad_token_id = eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
        if generation_config.max_new_tokens is None and generation_config.max_length == GenerationConfig().max_length:
            # No length chosen: transformers would count the prefix into its default `max_length=20` (a 40-vector
            # prefix leaves no room at all) and pipelines would fall back to their own longer default, so a plain
            # `generate()` and a plain pipeline call would caption differently.
            generation_config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model_name_or_path: str,
        text_model_name_or_path: str,
        mapping_type: str = "mlp",
        prefix_length: int = 10,
        vision_backend: str = "clip",
        open_clip_pretrained: str | None = None,
        **config_kwargs,
    ) -> ClipCapForConditionalGeneration:
        r"""
        Build a new ClipCap, ready to train, from a pretrained CLIP and a pretrained causal language model; only the
        mapping network starts from random weights.

        Args:
            vision_model_name_or_path (`str`):
                A CLIP checkpoint on the Hub or on disk, e.g. `"openai/clip-vit-base-patch32"` (a full CLIP or a
                `CLIPVisionModelWithProjection` checkpoint); with `vision_backend="open_clip"`, an open_clip model
                name such as `"RN50x4"`.
            text_model_name_or_path (`str`):
                A causal LM checkpoint, e.g. `"gpt2"`.
            vision_backend (`str`, *optional*, defaults to `"clip"`):
                `"clip"` (transformers' CLIP) or `"open_clip"`.
            open_clip_pretrained (`str`, *optional*):
                open_clip backend: the pretrained tag, e.g. `"openai"`.
            mapping_type, prefix_length, **config_kwargs:
                The remaining [`ClipCapConfig`] fields (`clip_length`, `mapping_num_layers`, `normalize_prefix`...).

        Example:

        ```python
        >>> model = ClipCapForConditionalGeneration.from_vision_text_pretrained(
        ...     "openai/clip-vit-base-patch32", "gpt2", mapping_type="transformer", prefix_length=40
        ... )
        >>> processor = ClipCapProcessor.from_vision_text_pretrained("openai/clip-vit-base-patch32", "gpt2")

        >>> # open_clip's RN50x4, as in the paper's transformer release
        >>> model = ClipCapForConditionalGeneration.from_vision_text_pretrained(
        ...     "RN50x4", "gpt2", vision_backend="open_clip", open_clip_pretrained="openai", mapping_type="transformer",
        ...     prefix_length=40, normalize_prefix=True,
        ... )
        ```
        """
        vision_model, vision_fields = load_pretrained_vision_model(
            vision_model_name_or_path, vision_backend, open_clip_pretrained
        )
        _check_local_path(text_model_name_or_path, "language model")
        language_model = AutoModelForCausalLM.from_pretrained(text_model_name_or_path)
        # Building a composite config resets its sub-configs' attention implementation (transformers 4.x); the parts
        # are built already and keep theirs.
        attn_implementation = {"text_config": language_model.config._attn_implementation}
        if "vision_config" in vision_fields:
            attn_implementation["vision_config"] = vision_model.config._attn_implementation
        config = ClipCapConfig(
            **vision_fields,
            text_config=language_model.config,
            mapping_type=mapping_type,
            prefix_length=prefix_length,
            attn_implementation=attn_implementation,
            **config_kwargs,
        )
        return cls(config, vision_model=vision_model, language_model=language_model)

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> ClipCapForConditionalGeneration:
        loaded = super().from_pretrained(*args, **kwargs)
        # Loading replaces the parameters (with requires_grad=True); the vision tower stays frozen by default.
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # a tuple with output_loading_info=True
        model.freeze_vision_model()
        model._set_generation_defaults()  # a saved generation config replaced the one __init__ completed
        return loaded

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        # `register_for_auto_class` records one Auto class (AutoModel) in the saved `auto_map`; the image-text-to-text
        # (and, on transformers 4.x, image-to-text) pipelines load through their own Auto classes, so name those too.
        class_reference = f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        for auto_class in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
            auto_map.setdefault(auto_class, class_reference)
        self.config.auto_map = auto_map
        super().save_pretrained(save_directory, *args, **kwargs)

    # ----------------------------------------------------------------------------------------------------------
    # Freezing

    def freeze_vision_model(self, freeze: bool = True) -> None:
        """Stop (or restart, with `freeze=False`) gradients for the CLIP vision tower."""
        self.vision_model.requires_grad_(not freeze)
        self.train(self.training)

    def freeze_language_model(self, freeze: bool = True) -> None:
        """Stop (or restart, with `freeze=False`) gradients for the language model (the paper's transformer variant)."""
        self.language_model.requires_grad_(not freeze)
        self.train(self.training)

    def train(self, mode: bool = True) -> ClipCapForConditionalGeneration:
        super().train(mode)
        # A frozen part must behave as at inference: no dropout, no batch-norm statistics updates.
        for part in (self.vision_model, self.language_model):
            if not any(parameter.requires_grad for parameter in part.parameters()):
                part.eval()
        if mode and not self.language_model.training:
            if any(getattr(module, "gradient_checkpointing", False) for module in self.language_model.modules()):
                logger.warning_once(
                    "Gradient checkpointing does not apply to the frozen language model: transformers checkpoints "
                    "only layers in training mode, and a frozen language model runs in eval mode (no dropout). Its "
                    "activations are kept for the backward pass to the prefix."
                )
        return self

    # ----------------------------------------------------------------------------------------------------------
    # Embedding accessors used by transformers (resize_token_embeddings, tying, peft)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.language_model.set_output_embeddings(new_embeddings)

    # ----------------------------------------------------------------------------------------------------------
    # Image -> prefix

    def get_image_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """CLIP's projected image embedding (what OpenAI CLIP's `encode_image` returns), shape `(batch, prefix_dim)`."""
        if self.config.vision_backend == "open_clip":
            return self.vision_model(pixel_values)
        return self.vision_model(pixel_values=pixel_values).image_embeds

    def get_prefix_embeds(
        self, pixel_values: torch.FloatTensor | None = None, image_embeds: torch.FloatTensor | None = None
    ) -> torch.FloatTensor:
        """
        The prefix vectors for a batch of images, shape `(batch, prefix_length, config.text_embedding_size)`.

        Give exactly one of `pixel_values` (runs the vision tower) or `image_embeds` (precomputed CLIP embeddings of
        width `config.prefix_dim`, e.g. from an embedding cache).
        """
        if (pixel_values is None) == (image_embeds is None):
            raise ValueError(
                "Pass exactly one of `pixel_values` (images through the processor) or `image_embeds` "
                f"(precomputed CLIP embeddings); got {'both' if pixel_values is not None else 'neither'}."
            )
        if pixel_values is not None:
            if pixel_values.ndim != 4 or pixel_values.shape[0] == 0 or pixel_values.shape[1] != 3:
                raise ValueError(
                    "`pixel_values` must have shape (batch_size, 3, height, width) with at least one image, got "
                    f"{tuple(pixel_values.shape)}. Prepare images with the model's processor."
                )
            image_embeds = self.get_image_features(pixel_values.to(self.vision_model.dtype))
            if image_embeds.shape[-1] != self.config.prefix_dim:
                raise ValueError(
                    f"The vision tower gives {image_embeds.shape[-1]}-d image embeddings but the mapping network "
                    f"takes {self.config.prefix_dim}-d ones (config.prefix_dim); set prefix_dim to the tower's "
                    "embedding size, or caption from `image_embeds` of the size the mapping network was trained on."
                )
        elif image_embeds.ndim != 2 or image_embeds.shape[0] == 0 or image_embeds.shape[-1] != self.config.prefix_dim:
            raise ValueError(
                f"`image_embeds` must have shape (batch_size, {self.config.prefix_dim}) with at least one image for "
                f"this model (config.prefix_dim={self.config.prefix_dim}), got {tuple(image_embeds.shape)}. Compute "
                "them with the vision tower this model was trained with."
            )
        if self.config.normalize_prefix:
            image_embeds = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
        mapper_dtype = next(self.mapping_network.parameters()).dtype
        return self.mapping_network(image_embeds.to(mapper_dtype))

    @torch.no_grad()
    def interpret_prefix(
        self,
        pixel_values: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        tokenizer=None,
        top_k: int = 5,
    ) -> list:
        r"""
        Read each image's prefix back as words, as in the paper: every prefix vector's `top_k` nearest tokens by
        cosine similarity to the language model's input embeddings.

        Args:
            pixel_values / image_embeds: the images, as for [`~ClipCapForConditionalGeneration.get_prefix_embeds`].
            tokenizer (*optional*):
                The tokenizer (or processor) that decodes the tokens; without it only the token ids are given.
            top_k (`int`, *optional*, defaults to 5):
                How many tokens to keep per prefix vector.

        Returns:
            `list[PrefixInterpretation]` (from `clipcap_hf.interpretability`): one per image; its `tokens` are the
            nearest token of each prefix vector and its `matches` hold the ids, tokens and similarities.

        Example:

        ```python
        >>> interpretation = model.interpret_prefix(**processor(images=image), tokenizer=processor)[0]
        >>> print(interpretation.format())
        ```
        """
        from .interpretability import interpret_prefix_embeds

        prefix_embeds = self.get_prefix_embeds(pixel_values=pixel_values, image_embeds=image_embeds)
        return interpret_prefix_embeds(prefix_embeds, self.get_input_embeddings().weight, tokenizer, top_k)

    def _prepend_prefix(
        self,
        prefix_embeds: torch.FloatTensor,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        labels: torch.LongTensor | None = None,
    ) -> tuple[torch.FloatTensor, torch.Tensor, torch.LongTensor | None]:
        """Build `[prefix; text]` embeddings, with the attention mask and labels (-100 on the prefix) to match."""
        batch, prefix_length = prefix_embeds.shape[:2]
        embeds_dtype = self.get_input_embeddings().weight.dtype
        inputs_embeds = prefix_embeds.to(embeds_dtype)
        prefix_mask = torch.ones(batch, prefix_length, dtype=torch.long, device=prefix_embeds.device)
        if input_ids is not None:
            if input_ids.shape[0] != batch:
                raise ValueError(
                    f"Got {batch} images but {input_ids.shape[0]} text sequences; give one text sequence per image."
                )
            inputs_embeds = torch.cat((inputs_embeds, self.get_input_embeddings()(input_ids)), dim=1)
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            attention_mask = torch.cat((prefix_mask, attention_mask.to(prefix_mask.dtype)), dim=1)
        else:
            attention_mask = prefix_mask
        if labels is not None:
            ignored = torch.full((batch, prefix_length), -100, dtype=labels.dtype, device=labels.device)
            labels = torch.cat((ignored, labels), dim=1)
        return inputs_embeds, attention_mask, labels

    # ----------------------------------------------------------------------------------------------------------
    # Forward and generation

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ClipCapCausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, text_length)`, *optional*):
                Caption (or prompt) tokens that follow the prefix.
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`, *optional*):
                Images from [`ClipCapImageProcessor`]. Give this or `image_embeds`, or neither when continuing from a
                cache during generation.
            image_embeds (`torch.FloatTensor` of shape `(batch_size, prefix_dim)`, *optional*):
                Precomputed CLIP image embeddings; skips the vision tower (the fast training path).
            attention_mask (`torch.Tensor` of shape `(batch_size, text_length)`, *optional*):
                Mask over `input_ids`; the prefix positions are always attended. When continuing from
                `past_key_values` without an image, the mask covers the cached positions (the prefix included) and
                `input_ids`, as the language model expects.
            labels (`torch.LongTensor` of shape `(batch_size, text_length)`, *optional*):
                Targets aligned with `input_ids` (usually a copy of them), -100 where no loss is wanted (padding).
                The loss is next-token cross-entropy over the caption tokens only. In training mode the LM head is
                applied only at the positions that predict a label, and `logits` is returned as `None`. Given
                without `input_ids` and `attention_mask`, and with -100 only as right padding, the caption tokens
                are read from `labels`.
            position_ids, past_key_values, use_cache, **kwargs:
                Passed to the language model, as for any causal LM; `past_key_values` (a [`~cache_utils.Cache`])
                holds the prefix positions too.
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, length, text_embedding_size)`, *optional*):
                Ready-made language model inputs, instead of an image and `input_ids` (e.g. to continue a cache).
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0):
                Compute logits for the last `logits_to_keep` positions only (0: all), as for causal LMs. With
                `labels`, it must keep every position that predicts a caption token.

        Example:

        ```python
        >>> outputs = model(pixel_values=pixel_values, input_ids=input_ids, labels=input_ids)
        >>> outputs.loss.backward()
        ```
        """
        prefix_embeds = None
        if pixel_values is not None or image_embeds is not None:
            if inputs_embeds is not None:
                raise ValueError("Pass `inputs_embeds` or an image (`pixel_values`/`image_embeds`), not both.")
            labels_alone = labels is not None and input_ids is None and attention_mask is None
            if labels_alone and _is_right_padding(labels == -100):
                # Labels alone (as Seq2SeqTrainer's evaluation batches give them, so that `generate` gets no
                # prompt): the caption tokens are read from them, the trailing -100s becoming masked padding, as
                # VisionEncoderDecoder derives its decoder inputs from `labels`. A -100 before a caption token
                # stands for an input that is not a target (a prompt), which labels cannot give back.
                attention_mask = (labels != -100).long()
                input_ids = labels.masked_fill(labels == -100, 0)
            if labels is not None and (input_ids is None or labels.shape != input_ids.shape):
                got = "no `input_ids`" if input_ids is None else f"`input_ids` of shape {tuple(input_ids.shape)}"
                raise ValueError(
                    f"`labels` of shape {tuple(labels.shape)} need `input_ids` of the same shape, got {got}: the "
                    "caption tokens go in as `input_ids` and, with -100 on padding, as `labels` (the processor's "
                    "`captions=` gives both)."
                )
            prefix_embeds = self.get_prefix_embeds(pixel_values=pixel_values, image_embeds=image_embeds)
            inputs_embeds, attention_mask, labels = self._prepend_prefix(
                prefix_embeds, input_ids, attention_mask, labels
            )
            input_ids = None
        elif inputs_embeds is None and past_key_values is None:
            raise ValueError(
                "Pass exactly one of `pixel_values` (images through the processor) or `image_embeds` (precomputed "
                "CLIP embeddings); got neither. Text without an image only continues from `past_key_values`; for "
                "plain language modelling call `model.language_model`."
            )
        elif attention_mask is not None and past_key_values is not None:
            cached = past_key_values.get_seq_length()
            new = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            if attention_mask.shape[1] != cached + new:
                raise ValueError(
                    f"`attention_mask` covers {attention_mask.shape[1]} positions, but the cache holds {cached} (the "
                    f"prefix included) and {new} are new: continuing from `past_key_values`, the mask covers them all."
                )

        # Trainer adds `num_items_in_batch` for the loss; the language model must not see it.
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        lm_inputs = {
            "input_ids": input_ids,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "past_key_values": past_key_values,
            "use_cache": use_cache,
            **kwargs,
            "return_dict": True,
        }
        if labels is not None and self.training and self._lm_head_is_plain_projection():
            # Training needs LM-head scores only where a caption token is predicted: skip the prefix and padding
            # positions, which would otherwise cost a vocabulary-wide matmul and softmax each.
            outputs = self.language_model.base_model(**lm_inputs)
            return ClipCapCausalLMOutputWithPast(
                loss=self._caption_loss(
                    outputs.last_hidden_state, labels, num_items_in_batch, self.get_output_embeddings()
                ),
                logits=None,
                past_key_values=outputs.past_key_values,
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
                prefix_embeds=prefix_embeds,
            )

        if not isinstance(logits_to_keep, int) or logits_to_keep != 0:
            lm_inputs["logits_to_keep"] = logits_to_keep  # 0 (every position) is the default; not every 4.x LM takes it
        outputs = self.language_model(**lm_inputs)
        logits = outputs.logits

        loss = None
        if labels is not None:
            # Logits may cover only the last `logits_to_keep` positions; they must include every position that
            # predicts a label (the one before it).
            if isinstance(logits_to_keep, torch.Tensor):
                raise ValueError("With `labels`, `logits_to_keep` must be a number of last positions, not indices.")
            dropped = labels.shape[1] - logits.shape[1]
            if (labels[:, 1 : dropped + 1] != -100).any():
                raise ValueError(
                    f"`logits_to_keep={logits_to_keep}` drops logits the loss needs: with `labels`, keep at least the "
                    "caption tokens plus one (the last prefix position predicts the first token), or leave it at 0."
                )
            loss = self._caption_loss(logits, labels[:, dropped:], num_items_in_batch)

        return ClipCapCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            prefix_embeds=prefix_embeds,
        )

    def _lm_head_is_plain_projection(self) -> bool:
        """Whether the language model's logits are exactly `output_embeddings(last_hidden_state)`."""
        return (
            self.language_model.config.model_type in PLAIN_LM_HEAD_MODEL_TYPES
            and self.get_output_embeddings() is not None
        )

    def _caption_loss(
        self,
        states: torch.FloatTensor,
        labels: torch.LongTensor,
        num_items_in_batch: torch.Tensor | int | None = None,
        output_embeddings: nn.Module | None = None,
    ) -> torch.FloatTensor:
        """
        Next-token cross-entropy over the positions whose next label is not -100. `states` are logits, or hidden
        states when `output_embeddings` is given: it is then applied at those positions only.
        """
        labels = labels.to(states.device)
        targets = labels[:, 1:]  # position t predicts token t + 1
        predicting = targets != -100
        scores = states[:, :-1][predicting]
        if output_embeddings is not None:
            scores = output_embeddings(scores)
        return fixed_cross_entropy(scores.float(), targets[predicting], num_items_in_batch=num_items_in_batch)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        r"""
        Caption a batch of images. Every option of [`~generation.GenerationMixin.generate`] works: greedy, beam
        search, sampling, `num_return_sequences`, `max_new_tokens`, a `GenerationConfig`, ...

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`, *optional*):
                Images from the processor.
            image_embeds (`torch.FloatTensor` of shape `(batch_size, prefix_dim)`, *optional*):
                Precomputed CLIP image embeddings, instead of `pixel_values`.
            input_ids (`torch.LongTensor` of shape `(batch_size, prompt_length)`, *optional*):
                A text prompt the caption must continue; batched prompts are padded (the processor pads them on the
                left), and an empty prompt in the batch means none for that image.
            attention_mask (`torch.Tensor` of shape `(batch_size, prompt_length)`, *optional*):
                Mask over the prompt.

        Returns:
            `torch.LongTensor` of shape `(batch_size * num_return_sequences, length)`: the prompt tokens (if any)
            followed by the generated caption tokens; the prefix is not part of it. Decode with
            `processor.batch_decode(..., skip_special_tokens=True)`.
        """
        # Decoding runs in the language model's own `generate`, as BLIP delegates to its text decoder: the prefix
        # goes in as `inputs_embeds`, and every decoding strategy and cache of the language model applies. The
        # caller's settings are merged here over ours (the decoding defaults saved with the model).
        # `labels` are ignored, as encoder-decoder models ignore them here: Seq2SeqTrainer(predict_with_generate=True)
        # passes its evaluation batches (image and labels) to `generate` as they are.
        generate_kwargs.pop("labels", None)
        caller_config = generate_kwargs.pop("generation_config", None)
        requested = caller_config.to_diff_dict() if caller_config is not None else {}  # what the caller set
        requested.pop("transformers_version", None)
        if "max_length" in generate_kwargs and "max_new_tokens" not in generate_kwargs:
            requested.pop("max_new_tokens", None)  # a length passed as an argument beats the config's (4.57 pipelines)
        requested.update(generate_kwargs)
        max_new_tokens = requested.get("max_new_tokens")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}.")
        generation_config = copy.deepcopy(self.generation_config)
        if "max_length" in requested and "max_new_tokens" not in requested:
            generation_config.max_new_tokens = None  # transformers lets max_new_tokens win; the caller's wins
        generate_kwargs = generation_config.update(**requested)  # returns the non-generation kwargs
        if (pixel_values is None) == (image_embeds is None):
            got = "both" if pixel_values is not None else "neither"
            if pixel_values is None and input_ids is not None:
                # Also what a pipeline sends when it reads a lone image path as a text prompt.
                got = "only text (`input_ids`); for text generation without an image call `model.language_model`"
            raise ValueError(f"Pass exactly one of `pixel_values` or `image_embeds` to caption images; got {got}.")
        if input_ids is not None and input_ids.shape[1] == 0:
            input_ids = attention_mask = None  # an empty prompt (the pipeline sends one) means no prompt
        prompt_length = 0 if input_ids is None else input_ids.shape[1]
        if generation_config.max_new_tokens is None and generation_config.max_length is not None:
            # A `max_length` counts the prefix, the prompt and the caption. transformers, given the prefix and the
            # prompt as `inputs_embeds` and the prompt again as `input_ids`, would count the prompt twice, so the
            # length goes in as new tokens.
            used = self.config.prefix_length + prompt_length
            if generation_config.max_length <= used:
                raise ValueError(
                    f"`max_length` ({generation_config.max_length}) counts the {self.config.prefix_length} prefix "
                    f"positions and the {prompt_length} prompt tokens, which leaves no room for a caption; set "
                    "`max_new_tokens` instead."
                )
            generation_config.max_new_tokens = generation_config.max_length - used
            generation_config.max_length = GenerationConfig().max_length  # unset, so that transformers does not warn

        # On the CPU, fp32 linear layers run through oneDNN, faster there than PyTorch's default, MKL (onednn.py).
        on_cpu_in_fp32 = self.device.type == "cpu" and self.dtype == torch.float32
        with onednn_linear() if on_cpu_in_fp32 else contextlib.nullcontext():
            prefix_embeds = self.get_prefix_embeds(pixel_values=pixel_values, image_embeds=image_embeds)
            inputs_embeds, attention_mask, _ = self._prepend_prefix(prefix_embeds, input_ids, attention_mask)
            if not bool(attention_mask.all()):
                # The prompts' padding moves in front of the prefix, so that every row ends in its last real
                # position, which predicts the first caption token: an empty prompt in a batch (all padding) or a
                # right-padded prompt would otherwise leave padding there.
                order = torch.argsort(attention_mask, dim=1, stable=True)  # 0s first, each part in its order
                inputs_embeds = inputs_embeds.gather(1, order[..., None].expand_as(inputs_embeds))
                attention_mask = attention_mask.gather(1, order)
            # The language model's `generate` fills every setting left unset (None) from its own generation config,
            # which is the language model checkpoint's (it may sample, or stop at another token), not ours: it reads
            # ours for the call. The lock keeps concurrent calls in threads from restoring each other's.
            language_model = self.language_model
            with _LANGUAGE_MODEL_GENERATION_LOCK:
                own_generation_config = language_model.generation_config
                language_model.generation_config = generation_config
                try:
                    # With a prompt, the output starts with the prompt's tokens; without, only the new tokens.
                    return language_model.generate(
                        input_ids=input_ids,
                        inputs_embeds=inputs_embeds,
                        attention_mask=attention_mask,
                        generation_config=generation_config,
                        **generate_kwargs,
                    )
                finally:
                    language_model.generation_config = own_generation_config


__all__ = [
    "ClipCapCausalLMOutputWithPast",
    "ClipCapForConditionalGeneration",
    "ClipCapMLPMapper",
    "ClipCapPreTrainedModel",
    "ClipCapTransformerMapper",
    "load_pretrained_vision_model",
]
