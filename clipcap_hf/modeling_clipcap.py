"""PyTorch ClipCap: CLIP image embedding -> mapping network -> prefix for a causal language model."""

# No `from __future__ import annotations`: transformers reads the forward's annotations (`Unpack[TransformersKwargs]`).
import copy
import inspect
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    MODEL_MAPPING,
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    CLIPVisionModelWithProjection,
    GenerationConfig,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.activations import ACT2FN, NewGELUActivation, QuickGELUActivation
from transformers.cache_utils import Cache
from transformers.generation import LogitsProcessorList, SuppressTokensLogitsProcessor

try:  # transformers 5: initialisers that skip weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # 4.57 initialises only the modules whose weights are missing
    from torch.nn import init
from transformers.loss.loss_utils import fixed_cross_entropy
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple, logging

from .configuration_clipcap import (
    ClipCapConfig,
    check_mapping_num_heads,
    check_vision_backend,
    local_folder,
    resolve_vision_pooling,
    vision_embedding_size,
    vision_tower_config,
)
from .onednn import cpu_linear_kernels
from .open_clip_vision import ClipCapOpenClipVisionModel, resolve_open_clip_model

logger = logging.get_logger(__name__)

# The caption length `generate()` and the pipelines use when the generation config sets none.
DEFAULT_MAX_NEW_TOKENS = 30


def caption_length_unset(generation_config: GenerationConfig) -> bool:
    """
    Whether a generation config leaves the caption length unchosen (ClipCap then captions `DEFAULT_MAX_NEW_TOKENS`
    tokens): no `max_new_tokens`, and `max_length` unset or transformers' default (20 on 4.x, None on 5), which counts
    the image tokens (40 of them leave no room at all) and would let pipelines fall back to their own default.
    """
    return generation_config.max_new_tokens is None and generation_config.max_length in (
        None,
        GenerationConfig().max_length,
    )


def caption_length(generation_config: GenerationConfig, prefix_length: int) -> int:
    """
    The most caption tokens ClipCap's `generate` gives under `generation_config` (what `clipcap evaluate` records
    and the ONNX captioner uses): its `max_new_tokens`; else its `max_length` less the `prefix_length` image
    tokens it counts; `DEFAULT_MAX_NEW_TOKENS` when it chooses no length ([`caption_length_unset`]).
    """
    if caption_length_unset(generation_config):
        return DEFAULT_MAX_NEW_TOKENS
    if generation_config.max_new_tokens is not None:
        return generation_config.max_new_tokens
    return generation_config.max_length - prefix_length


def fit_caption_to_positions(context: int | None, input_length: int, new_tokens: int, option: str) -> int:
    """
    The most new tokens to generate after `input_length` positions (image tokens and prompt) in a language model
    with a learned position table of `context` positions (None: rotary or ALiBi positions, no limit), which would
    fail midway with a bare index error. A length that runs past it is refused when the caller gave it (`option`
    `"max_new_tokens"` or `"max_length"`), else (a generation config's, such as a pipeline's default) cut to the
    positions left, with a warning. Shared by `generate()` and the ONNX captioner.
    """
    if context is None or input_length + new_tokens <= context:
        return new_tokens
    room = context - input_length
    if option in ("max_new_tokens", "max_length"):
        by_length = option == "max_length"
        value = input_length + new_tokens if by_length else new_tokens
        fix = f"max_length <= {context}" if by_length else f"max_new_tokens <= {room}"
        raise ValueError(
            f"`{option}={value}` needs {input_length + new_tokens} positions (the input's {input_length}: image "
            f"tokens and prompt, then the new tokens), but the language model has {context} "
            f"(max_position_embeddings), room for {room} new tokens; give {fix}."
        )
    logger.warning(
        f"{option} asks for {new_tokens} new tokens, but the language model has room for {room} after the "
        f"input's {input_length} positions (max_position_embeddings={context}): generating at most {room}."
    )
    return room


# transformers 5.2x renamed the key/value cache argument and output field `past_key_values` to `cache` (the old name
# goes in 5.40); 4.57 knows only `past_key_values`. Every model of one transformers version uses the same name.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# transformers 5 tells `prepare_inputs_for_generation` which step is the first; 4.57 gives `cache_position` instead.
_GENERATION_MARKS_FIRST_ITERATION = "is_first_iteration" in inspect.signature(
    GenerationMixin.prepare_inputs_for_generation
).parameters

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
class ClipCapImageOutput(BaseModelOutputWithPooling):
    r"""
    Output of [`ClipCapForConditionalGeneration.get_image_features`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_patches, hidden_size)`, *optional*):
            The vision tower's last hidden states (`None` for open_clip towers and for `image_embeds` inputs).
        pooler_output (`torch.FloatTensor` of shape `(batch_size, prefix_length, text_embedding_size)`):
            The image features the language model reads: the prefix vectors the mapping network made.
        hidden_states, attentions (`tuple(torch.FloatTensor)`, *optional*):
            The vision tower's, when `output_hidden_states` / `output_attentions` are set.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, prefix_dim)`):
            The CLIP image embedding the mapping network read.
    """

    image_embeds: torch.FloatTensor | None = None


@dataclass
class ClipCapCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    Output of [`ClipCapForConditionalGeneration`]: a causal LM's output (`loss`, `logits`, the key/value cache,
    `hidden_states`, `attentions`, all over the positions of `input_ids`, image tokens included) and, as transformers'
    vision-language models give it, `image_outputs`: what [`~ClipCapForConditionalGeneration.get_image_features`]
    returned for the images (the prefix vectors written at the image tokens in its `pooler_output`, the CLIP
    embeddings in its `image_embeds`).

    `logits` is `None` when the model is in training mode and `labels` are given: the loss is then computed from the
    scores at the caption positions only, and the full tensor is never materialized; nor is a key/value cache built
    unless `use_cache=True` is passed. Put the model in eval mode (`model.eval()`) to get both the loss and the
    logits.

    Args:
        image_outputs ([`ClipCapImageOutput`], *optional*):
            The image features, when an image was given.
    """

    image_outputs: ClipCapImageOutput | None = None


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


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention over `(batch, heads, length, head_dim)` inputs, laid out as transformers' kernels."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class ClipCapAttention(nn.Module):
    """
    Multi-head self-attention laid out as in the paper's code (one query projection, one fused key/value one),
    computed by the attention implementation the model is set to (`attn_implementation`), as the towers' are.
    """

    def __init__(self, config: ClipCapConfig, hidden_size: int):
        super().__init__()
        self.config = config
        self.num_heads = config.mapping_num_heads
        self.head_dim = hidden_size // self.num_heads
        self.is_causal = False  # every position attends to every other, as in the original mapper
        self.to_queries = nn.Linear(hidden_size, hidden_size, bias=False)
        # Output rows [0, h) are the keys and [h, 2h) the values, once reshaped to (..., 2, heads, head_dim).
        self.to_keys_values = nn.Linear(hidden_size, 2 * hidden_size, bias=False)
        self.project = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden_states.shape
        queries = self.to_queries(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        keys_values = self.to_keys_values(hidden_states).view(batch, length, 2, self.num_heads, self.head_dim)
        keys, values = keys_values.permute(2, 0, 3, 1, 4).unbind(0)
        # Looked up as each transformers line expects to find it in a model's source before letting
        # `set_attn_implementation` switch it: `get_interface` (5.x), indexing (4.57).
        attention = eager_attention_forward
        if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        elif self.config._attn_implementation != "eager":
            attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        attended, _ = attention(self, queries, keys, values, None, scaling=self.head_dim**-0.5, dropout=0.0)
        return self.project(attended.reshape(batch, length, width))


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
    checkpointed with the model's gradient (activation) checkpointing, like the language model's layers.
    """

    def __init__(self, config: ClipCapConfig, hidden_size: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = ClipCapAttention(config, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = ClipCapMLP(hidden_size, 2 * hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states))
        return hidden_states + self.mlp(self.norm2(hidden_states))


class ClipCapTransformer(nn.Module):
    def __init__(self, config: ClipCapConfig, hidden_size: int):
        super().__init__()
        self.layers = nn.ModuleList(
            ClipCapTransformerLayer(config, hidden_size) for _ in range(config.mapping_num_layers)
        )

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
        self.clip_length = config.clip_length
        self.linear = nn.Linear(config.prefix_dim, config.clip_length * hidden_size)
        self.prefix_const = nn.Parameter(torch.randn(config.prefix_length, hidden_size))
        self.transformer = ClipCapTransformer(config, hidden_size)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        batch = image_embeds.shape[0]
        projected = self.linear(image_embeds).view(batch, self.clip_length, -1)
        constants = self.prefix_const.unsqueeze(0).expand(batch, -1, -1)
        mixed = self.transformer(torch.cat((projected, constants), dim=1))
        return mixed[:, self.clip_length :]


def _deprecated_cache_name(forward):
    """On transformers 5.2x, `past_key_values` is deprecated for `cache`, as in its own models; 4.57 knows only it."""
    if CACHE_NAME == "past_key_values":
        return forward
    from transformers.utils.deprecation import deprecate_kwarg

    return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)


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

    _can_compile_fullgraph = True

    @classmethod
    def is_custom_code(cls) -> bool:
        # Written to transformers' conventions (initialisation that leaves loaded weights alone), so transformers can
        # treat it as its own models: a weight missing from a checkpoint gets initialised, not left as it was in memory.
        return False

    def _init_weights(self, module: nn.Module) -> None:
        # Only the mapper is ours to initialise, with PyTorch's defaults as the paper's code does. The vision tower and
        # the language model are initialised by their own classes (open_clip's tower in its constructor), and may
        # hold pretrained weights already.
        if not isinstance(module, (ClipCapMLPMapper, ClipCapTransformerMapper)):
            return
        if isinstance(module, ClipCapTransformerMapper):
            init.normal_(module.prefix_const)
        for layer in module.modules():
            if isinstance(layer, nn.Linear):  # what `nn.Linear.reset_parameters` does
                init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
                if layer.bias is not None:
                    bound = 1 / math.sqrt(layer.in_features)
                    init.uniform_(layer.bias, -bound, bound)
            elif isinstance(layer, nn.LayerNorm):
                init.ones_(layer.weight)
                init.zeros_(layer.bias)


def _vision_tower_class(vision_config: PretrainedConfig, vision_pooling: str) -> tuple[type, dict[str, Any]]:
    """The class that builds a transformers vision tower, and the constructor options the pooling asks for."""
    if vision_config.model_type == "clip_vision_model":
        return CLIPVisionModelWithProjection, {}  # AutoModel would build CLIP's tower without its projection
    if vision_config.model_type == "vit":
        # ViT's pooler only when it is read: image-classification checkpoints have none.
        return AutoModel, {"add_pooling_layer": vision_pooling == "pooled"}
    return AutoModel, {}


_BUILD_FROM_TOWER = (
    "Build the config from this tower (ClipCapConfig(vision_config=vision_model.config, ...)), or load one with "
    "ClipCapForConditionalGeneration.from_vision_text_pretrained."
)


def _check_given_vision_model(vision_model: nn.Module, config: ClipCapConfig) -> None:
    """
    Refuse a ready-made tower that does not give the image embedding the config's mapping network reads (the backend,
    `vision_pooling`, `prefix_dim`): it would fail at its first image, and the folder saved with it would not load
    (or load another tower).
    """
    if config.vision_backend == "open_clip":
        if not isinstance(vision_model, ClipCapOpenClipVisionModel):
            raise ValueError(
                f"The given vision_model is a {type(vision_model).__name__}, and the config's vision_backend is "
                "'open_clip': give a ClipCapOpenClipVisionModel, or a config of the transformers tower given. "
                f"{_BUILD_FROM_TOWER}"
            )
        if json.dumps(vision_model.model_cfg, sort_keys=True) != json.dumps(config.open_clip_model_cfg, sort_keys=True):
            raise ValueError(
                "The given open_clip vision_model was built from another model config than the config's "
                "`open_clip_model_cfg`; the folder saved with it would not load. Give the tower's own "
                "(ClipCapConfig(vision_backend='open_clip', open_clip_model_cfg=vision_model.model_cfg, ...))."
            )
        return
    if isinstance(vision_model, ClipCapOpenClipVisionModel):
        raise ValueError(
            "The given vision_model is an open_clip tower, and the config's vision_backend is 'clip': give a config "
            "with vision_backend='open_clip' and the tower's open_clip_model_cfg (vision_model.model_cfg)."
        )
    tower_config = vision_tower_config(vision_model.config)
    try:
        resolve_vision_pooling(tower_config, config.vision_pooling)
    except ValueError as error:
        raise ValueError(f"The given vision_model does not fit the config: {error} {_BUILD_FROM_TOWER}") from None
    model_class, options = _vision_tower_class(tower_config, config.vision_pooling)
    # The class loading the saved folder builds: a model with a head (ViTForImageClassification) or a whole SigLIP
    # would otherwise be taken, fail at its first image, and come back as a tower without its weights.
    # (By model type: a config subclass of the user's own loads back as the type's config and tower.)
    tower_class = MODEL_MAPPING[CONFIG_MAPPING[tower_config.model_type]] if model_class is AutoModel else model_class
    if not isinstance(vision_model, tower_class):
        raise ValueError(
            f"The given vision_model is a {type(vision_model).__name__}, and vision_pooling="
            f"{config.vision_pooling!r} reads a {tower_class.__name__}'s image embeddings: give a "
            f"{tower_class.__name__} (an image classifier's is its `.vit` or `.dinov2`; compile or wrap the whole "
            "model, not its tower). " + _BUILD_FROM_TOWER
        )
    if options.get("add_pooling_layer") and getattr(vision_model, "pooler", None) is None:
        raise ValueError(
            f"The given vision_model has no pooler, which vision_pooling={config.vision_pooling!r} reads: build it "
            "with add_pooling_layer=True, or use vision_pooling='cls'."
        )
    size = vision_embedding_size(tower_config, config.vision_pooling)
    if size != config.prefix_dim:
        raise ValueError(
            f"The given vision_model gives {size}-d image embeddings (vision_pooling={config.vision_pooling!r}), but "
            f"the mapping network reads config.prefix_dim={config.prefix_dim}. {_BUILD_FROM_TOWER}"
        )


def build_vision_tower(vision_config: PretrainedConfig, vision_pooling: str) -> PreTrainedModel:
    """A transformers vision tower with random weights, as the config describes it (the checkpoint fills them)."""
    model_class, options = _vision_tower_class(vision_config, vision_pooling)
    if model_class is AutoModel:
        return AutoModel.from_config(vision_config, **options)
    return model_class(vision_config, **options)


def load_pretrained_vision_model(
    vision_model_name_or_path: str,
    vision_backend: str = "clip",
    open_clip_pretrained: str | None = None,
    vision_pooling: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, dict[str, Any]]:
    r"""
    A pretrained image tower in `dtype` (not the checkpoint's own, which transformers 5 keeps by default), and the
    [`ClipCapConfig`] fields that describe it.

    Args:
        vision_model_name_or_path (`str`):
            `"clip"` backend: a transformers checkpoint on the Hub or on disk of a CLIP, SigLIP, SigLIP2, ViT or DINOv2
            (`"openai/clip-vit-base-patch32"`, `"google/siglip-base-patch16-224"`, `"facebook/dinov2-small"`; a whole
            CLIP or SigLIP gives its vision tower). `"open_clip"` backend: an open_clip model name (`"RN50x4"`,
            `"local-dir:PATH"`, `"hf-hub:ORG/REPO"`).
        vision_backend (`str`, *optional*, defaults to `"clip"`):
            `"clip"` or `"open_clip"`.
        open_clip_pretrained (`str`, *optional*):
            `"open_clip"` backend with a built-in model name: the pretrained tag (`"openai"`) or a weights file.
        vision_pooling (`str`, *optional*):
            `"clip"` backend: how the tower gives one image embedding ([`ClipCapConfig`]); defaults to the tower's.
    """
    check_vision_backend(vision_backend, vision_pooling, open_clip_pretrained=open_clip_pretrained)
    if vision_backend == "clip":
        _check_local_path(vision_model_name_or_path, "vision model")
        vision_model_name_or_path = local_folder(vision_model_name_or_path)
        try:
            vision_config = vision_tower_config(
                AutoConfig.from_pretrained(vision_model_name_or_path, trust_remote_code=False)
            )
            vision_pooling = resolve_vision_pooling(vision_config, vision_pooling)  # before any weights load
        except ValueError as error:
            raise ValueError(f"{vision_model_name_or_path!r}: {error}") from error
        model_class, options = _vision_tower_class(vision_config, vision_pooling)
        vision_model, loading_info = model_class.from_pretrained(
            vision_model_name_or_path, config=vision_config, output_loading_info=True, dtype=dtype, **options
        )
        # transformers builds the tower from any checkpoint and only reports the weights it lacked; a tower without its
        # pretrained weights would then be frozen at random.
        if loading_info["missing_keys"]:
            missing = sorted(loading_info["missing_keys"])
            raise ValueError(
                f"{vision_model_name_or_path!r} is not a pretrained {vision_config.model_type!r} tower for "
                f"vision_pooling={vision_pooling!r}: {len(missing)} of the tower's weights are missing from it (e.g. "
                f"{missing[0]!r}). Give a pretrained vision model such as 'openai/clip-vit-base-patch32'"
                + (", or vision_pooling='cls'." if vision_config.model_type == "vit" else ".")
            )
        return vision_model, {"vision_config": vision_model.config, "vision_pooling": vision_pooling}
    model_cfg = resolve_open_clip_model(vision_model_name_or_path, open_clip_pretrained)[0]
    vision_model = ClipCapOpenClipVisionModel.from_open_clip_pretrained(
        vision_model_name_or_path, open_clip_pretrained, model_cfg
    ).to(dtype)
    vision_fields = {
        "vision_backend": "open_clip",
        "open_clip_model_name": vision_model_name_or_path,
        "open_clip_pretrained": open_clip_pretrained,
        "open_clip_model_cfg": model_cfg,
    }
    return vision_model, vision_fields


# transformers 5 holds a SigLIP or SigLIP2 tower's weights without the `vision_model.` of its checkpoints (and of
# transformers 4's module), and adds it back on saving only where its loading removed it: a model built, or loaded from
# a folder it saved, was saved under names that transformers 4 does not read (it left the tower random, with a
# warning). Saved under the checkpoint names, which both versions load (transformers 5 still loads its own names). The
# other towers are saved under their checkpoint names already (clipcap_hf.data.embeddings has the whole table).
_PREFIXED_TOWERS = ("siglip_vision_model", "siglip2_vision_model")
_UNPREFIXED_TOWER_KEY = re.compile(r"^vision_model\.(?!vision_model\.)")


def _check_local_path(name_or_path: str, what: str) -> None:
    """A path-like name that does not exist: say so, rather than transformers' "Repo id must be in the form"."""
    if (os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))) and not os.path.exists(
        os.path.expanduser(name_or_path)
    ):
        raise FileNotFoundError(f"The {what} {name_or_path!r} does not exist.")


def _fuse_gelu_new(language_model: nn.Module) -> None:
    """
    Replace GPT-2's `gelu_new` activations (transformers' `NewGELUActivation`: seven elementwise operations, each kept
    for the backward pass) by PyTorch's fused tanh-GELU (transformers' `gelu_pytorch_tanh`): the same formula in one
    kernel, equal within float rounding. On the CPU a training step of GPT-2 small at batch 40 took about a quarter
    less time, and a decoding step at 16 rows about 2 ms less. The language model's config is left as it is, so saved
    folders are unchanged. Activations of other classes, subclasses included, are kept.
    """
    replace_modules(language_model, NewGELUActivation, lambda: ACT2FN["gelu_pytorch_tanh"])


class QuickGELUInPlace(QuickGELUActivation):
    """
    CLIP's `quick_gelu`, x * sigmoid(1.702 x), written into one new tensor when no gradient flows through it (inference,
    or a frozen tower in training): transformers' `QuickGELUActivation` makes three (1.702 x, its sigmoid, the
    product). On the CPU, glibc maps each block above 32 MB afresh and the kernel hands it over zeroed: at 64 images
    (the embedding cache's batch) CLIP's MLP activations are 39 MB. The same operations in the same order, so the same
    values. With a gradient to compute, it is transformers' activation.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.requires_grad and torch.is_grad_enabled():
            return super().forward(input)
        return (input * 1.702).sigmoid_().mul_(input)


def quick_gelu_in_place(model: nn.Module) -> None:
    """
    Replace the `quick_gelu` activations of a transformers CLIP tower (or a whole CLIP model) by `QuickGELUInPlace`.
    On a 2-core AMD EPYC, CLIP ViT-B/32's tower took 8% less time on 64 images (3.73 s against 4.07, the median of five
    alternating rounds); at 16 images, whose activations glibc keeps for reuse, it made no measurable difference.
    """
    replace_modules(model, QuickGELUActivation, QuickGELUInPlace)


def replace_modules(root: nn.Module, kind: type[nn.Module], make: Callable[[], nn.Module]) -> None:
    """Replace every module of exactly class `kind` under `root` (not `root` itself) by a new `make()`."""
    found = [
        (parent, name) for parent in root.modules() for name, child in parent.named_children() if type(child) is kind
    ]
    for parent, name in found:
        setattr(parent, name, make())


class _SuppressTokensByIndex(SuppressTokensLogitsProcessor):
    """
    transformers' `SuppressTokensLogitsProcessor` with one `index_fill` per step, where it builds a vocabulary-wide
    mask (`arange`, `isin`, `where`: about 1 ms of a 25 ms decoding step of GPT-2 small at 16 rows on the CPU). Ids
    outside the vocabulary are left out, as there.
    """

    def __init__(self, suppress_tokens, device: str | torch.device = "cpu"):
        super().__init__(suppress_tokens, device)
        self._kept_tokens, self._kept_for = None, None  # the ids within the vocabulary, for (vocabulary size, device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._kept_for != (scores.shape[-1], scores.device):  # once per call of `generate`
            tokens = self.suppress_tokens.to(scores.device, torch.long)  # an empty list makes a float tensor
            self._kept_tokens = tokens[(tokens >= 0) & (tokens < scores.shape[-1])]
            self._kept_for = (scores.shape[-1], scores.device)
        return scores.index_fill(-1, self._kept_tokens, -math.inf)


def _main_input(given: torch.Tensor | None, inputs: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """The model's main input for `generate`, given by its name or as transformers' `inputs`."""
    if inputs is None:
        return given
    if given is not None:
        raise ValueError(f"`inputs` is `{name}` for this model: pass one of them, not both.")
    return inputs


class ClipCapForConditionalGeneration(ClipCapPreTrainedModel, GenerationMixin):
    r"""
    ClipCap: a frozen CLIP image encoder, a mapping network that turns its image embedding into `prefix_length`
    prefix vectors, and a causal language model that continues the prefix with a caption.

    The vision tower is frozen on construction (`freeze_vision_model`); the language model trains unless
    [`~ClipCapForConditionalGeneration.freeze_language_model`] is called. GPT-2's `gelu_new` activations are computed
    fused (`gelu_pytorch_tanh`, equal within float rounding): a `language_model` passed in has its `NewGELUActivation`
    modules replaced in place, and hooks registered on them no longer run. Frozen parts stay in eval mode when the
    model is put in training mode, so a frozen language model runs without dropout.
    """

    # The image goes in at its image tokens in `input_ids`, as for LLaVA and BLIP-2.
    main_input_name = "input_ids"

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
                vision_model = build_vision_tower(config.vision_config, config.vision_pooling)
        else:
            _check_given_vision_model(vision_model, config)
            if config.vision_backend == "clip":
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
        if config.mapping_type == "transformer":  # the config checked its own width; a given language model has its own
            check_mapping_num_heads(config.mapping_num_heads, embedding_size)
        self.vision_model = vision_model
        mapper_class = ClipCapMLPMapper if config.mapping_type == "mlp" else ClipCapTransformerMapper
        self.mapping_network = mapper_class(config)
        self.language_model = language_model
        _fuse_gelu_new(language_model)
        quick_gelu_in_place(vision_model)
        self.post_init()
        self.freeze_vision_model()
        if config.image_token_id is not None:  # None only while loading a folder saved before image tokens existed
            self._make_room_for_image_token()
        # The loss is `_caption_loss`, which skips the LM head where no caption token is predicted.
        self.loss_type = None
        self._set_generation_defaults()

    def _make_room_for_image_token(self) -> None:
        """Grow the language model's vocabulary to hold `config.image_token_id`, with zero embeddings for new rows."""
        old_size = self.get_input_embeddings().num_embeddings
        if self.config.image_token_id < old_size:
            return
        # Zeros rather than transformers' random mean-resizing, so that the result is deterministic (the image token's
        # input embedding is always replaced by a prefix vector, and it is never generated: `suppress_tokens`).
        self.language_model.resize_token_embeddings(self.config.image_token_id + 1, mean_resizing=False)
        with torch.no_grad():
            self.get_input_embeddings().weight[old_size:] = 0
            output_embeddings = self.get_output_embeddings()
            if output_embeddings is not None:
                output_embeddings.weight[old_size:] = 0
        self.config.text_config = self.language_model.config

    def _set_generation_defaults(self) -> None:
        """Caption decoding defaults, where the generation config leaves them unset."""
        generation_config = self.generation_config
        if generation_config.pad_token_id is None:
            # Batched captions end at different lengths; pad them with EOS, as GPT-2-style models have no pad token.
            eos_token_id = generation_config.eos_token_id
            generation_config.pad_token_id = eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
        image_token_id = self.config.image_token_id
        if image_token_id is not None and image_token_id not in (generation_config.suppress_tokens or []):
            generation_config.suppress_tokens = [*(generation_config.suppress_tokens or []), image_token_id]
        if caption_length_unset(generation_config):
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
        dtype: torch.dtype = torch.float32,
        **config_kwargs,
    ) -> "ClipCapForConditionalGeneration":
        r"""
        Build a new ClipCap, ready to train, from a pretrained vision tower and a pretrained causal language model;
        only the mapping network starts from random weights. The whole model is in `dtype`.

        Args:
            vision_model_name_or_path (`str`):
                A vision checkpoint on the Hub or on disk: CLIP (`"openai/clip-vit-base-patch32"`, a full CLIP or a
                `CLIPVisionModelWithProjection`), SigLIP or SigLIP2 (`"google/siglip-base-patch16-224"`), ViT or DINOv2
                (`"facebook/dinov2-small"`), loaded with the Auto classes; `vision_pooling=` (in `config_kwargs`)
                chooses how a ViT or DINOv2 gives its one embedding. With `vision_backend="open_clip"`, an open_clip
                model name such as `"RN50x4"`.
            text_model_name_or_path (`str`):
                A causal LM checkpoint, e.g. `"gpt2"`.
            vision_backend (`str`, *optional*, defaults to `"clip"`):
                `"clip"` (transformers' CLIP) or `"open_clip"`.
            open_clip_pretrained (`str`, *optional*):
                open_clip backend: the pretrained tag, e.g. `"openai"`.
            dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
                The dtype of the whole model. Each part is loaded in it, not in its checkpoint's own dtype (which
                transformers 5 keeps by default: a bf16 tower beside an fp32 mapper saved a model that loaded back
                all in bf16).
            mapping_type, prefix_length, **config_kwargs:
                The remaining [`ClipCapConfig`] fields (`clip_length`, `mapping_num_layers`, `normalize_prefix`...).
                `image_token_id` defaults to the first id after the language model's vocabulary, the id
                [`ClipCapProcessor.from_vision_text_pretrained`] gives the image token when the tokenizer is as large
                as the vocabulary (GPT-2's); otherwise pass `image_token_id=processor.image_token_id`.

        Example:

        ```python
        >>> model = ClipCapForConditionalGeneration.from_vision_text_pretrained(
        ...     "openai/clip-vit-base-patch32", "gpt2", mapping_type="transformer", prefix_length=40
        ... )
        >>> processor = ClipCapProcessor.from_vision_text_pretrained(
        ...     "openai/clip-vit-base-patch32", "gpt2", num_image_tokens=model.config.prefix_length
        ... )

        >>> # open_clip's RN50x4, as in the paper's transformer release
        >>> model = ClipCapForConditionalGeneration.from_vision_text_pretrained(
        ...     "RN50x4", "gpt2", vision_backend="open_clip", open_clip_pretrained="openai", mapping_type="transformer",
        ...     prefix_length=40, normalize_prefix=True,
        ... )
        ```
        """
        vision_model, vision_fields = load_pretrained_vision_model(
            vision_model_name_or_path,
            vision_backend,
            open_clip_pretrained,
            config_kwargs.pop("vision_pooling", None),
            dtype=dtype,
        )
        _check_local_path(text_model_name_or_path, "language model")
        text_model_name_or_path = local_folder(text_model_name_or_path)
        language_model = AutoModelForCausalLM.from_pretrained(
            text_model_name_or_path, trust_remote_code=False, dtype=dtype
        )
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
        return cls(config, vision_model=vision_model, language_model=language_model).to(dtype)  # the mapper too

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> "ClipCapForConditionalGeneration":
        # No code of the folder runs unless asked for: transformers' default would ask at a terminal.
        kwargs.setdefault("trust_remote_code", False)
        name = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        asked_for_loading_info = kwargs.get("output_loading_info", False)
        kwargs["output_loading_info"] = True  # its missing keys are read below
        try:
            model, loading_info = super().from_pretrained(*args, **kwargs)
        except SafetensorError as error:  # a weights file cut short (an interrupted download or copy) or corrupt
            raise OSError(
                f"{name}: the weights (model.safetensors) cannot be read ({error}); the file is truncated or corrupt. "
                "Download or copy the model again."
            ) from error
        except RuntimeError as error:  # transformers 5: "ignore_mismatched_sizes"; 4.57: "size mismatch for ..."
            if "size mismatch" not in str(error) and "ignore_mismatched_sizes" not in str(error):
                raise
            raise ValueError(
                f"{name}: the weights do not fit config.json (a layer's shape differs: was prefix_dim, the mapper "
                "or a sub-config edited?). Restore the config.json saved with these weights."
            ) from error
        except ValueError as error:  # the config's own checks (a config.json edited by hand): named with the folder
            if str(name) in str(error):
                raise
            raise ValueError(f"{name}: {error}") from error
        # An open_clip tower's computed buffers a folder lacks (saved before they were saved, or with a tower given
        # ready-made) would stay uninitialised on transformers 5: computed again.
        if isinstance(model.vision_model, ClipCapOpenClipVisionModel):
            missing = {key.removeprefix("vision_model.") for key in loading_info["missing_keys"]}
            if uncomputed := sorted(missing & model.vision_model.computed_buffers):
                model.vision_model.recompute_buffers(uncomputed)
        # Loading replaces the parameters (with requires_grad=True); the vision tower stays frozen by default.
        if model.config.image_token_id is None:
            # Saved before image tokens existed: the token takes the first free id, the one the processor's tokenizer
            # gives it when it adds the token (their vocabularies are the same size).
            model.config.image_token_id = model.get_input_embeddings().num_embeddings
            model._make_room_for_image_token()
            logger.info("This folder predates image tokens; added one (id %d). Save the model to upgrade the folder.",
                        model.config.image_token_id)
        model.freeze_vision_model()
        model._set_generation_defaults()  # a saved generation config replaced the one __init__ completed
        return (model, loading_info) if asked_for_loading_info else model

    def save_pretrained(
        self, save_directory: str | os.PathLike, *args, state_dict: dict[str, torch.Tensor] | None = None, **kwargs
    ) -> None:
        # A model that utils/quantization.py converted for inference (its CONVERTED_FOR_INFERENCE, written out: this
        # file is saved with the model and imports nothing of the package) would not load back: refused.
        marks = (getattr(module, "_clipcap_converted_for_inference", None) for module in self.modules())
        converted = next((how for how in marks if how), None)
        if converted is not None:
            raise ValueError(
                f"Cannot save this model: {converted} (clipcap_hf.utils.quantization), and from_pretrained would not "
                "load its saved weights back. Save the full-precision model, before converting it, and convert it "
                "again after loading it."
            )
        # `register_for_auto_class` records one Auto class (AutoModel) in the saved `auto_map`; the image-text-to-text
        # (and, on transformers 4.x, image-to-text) pipelines load through their own Auto classes, so name those too.
        module = type(self).__module__.rsplit(".", 1)[-1]
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.setdefault("AutoModelForImageTextToText", f"{module}.ClipCapForConditionalGeneration")
        auto_map.setdefault("AutoModelForVision2Seq", f"{module}.ClipCapForImageToText")
        self.config.auto_map = auto_map
        super().save_pretrained(save_directory, *args, state_dict=self._state_dict_to_save(state_dict), **kwargs)

    def _state_dict_to_save(self, state_dict: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """
        The weights to save (`state_dict`, else the model's), with a SigLIP tower's under its checkpoint names (see
        `_PREFIXED_TOWERS`); None, for transformers to take the model's, where no name changes.
        """
        vision_config = self._transformers_vision_config
        # Adapters (peft) are saved under the names the model holds, and an offloaded tower's weights are found from
        # them (transformers 5 reads them back from the offload folder by name).
        if (
            getattr(vision_config, "model_type", None) not in _PREFIXED_TOWERS
            or getattr(self, "_hf_peft_config_loaded", False)
            or any(tensor.device.type == "meta" for tensor in self.vision_model.state_dict().values())
        ):
            return state_dict
        given = state_dict if state_dict is not None else self.state_dict()
        renamed = {
            _UNPREFIXED_TOWER_KEY.sub("vision_model.vision_model.", key): tensor for key, tensor in given.items()
        }
        return renamed if renamed.keys() != given.keys() else state_dict

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

    def train(self, mode: bool = True) -> "ClipCapForConditionalGeneration":
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

    def get_image_embeds(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """
        The vision tower's image embedding, shape `(batch, prefix_dim)`: CLIP's projected one (what OpenAI CLIP's
        `encode_image` returns), or the one `config.vision_pooling` names.
        """
        outputs = self.vision_model(**self._vision_inputs(pixel_values))
        return outputs if self.config.vision_backend == "open_clip" else self._pool(outputs)

    @property
    def _transformers_vision_config(self) -> PretrainedConfig | None:
        """The config of a transformers vision tower; None for an open_clip tower (configured by name)."""
        return self.config.vision_config if self.config.vision_backend == "clip" else None

    def _siglip2_patch_size(self) -> int | None:
        """The patch size of a SigLIP2 (NaFlex) tower, which reads a sequence of flattened patches; None for others."""
        vision_config = self._transformers_vision_config
        siglip2 = getattr(vision_config, "model_type", None) == "siglip2_vision_model"
        return vision_config.patch_size if siglip2 else None

    def _check_pixel_values(self, pixel_values: torch.FloatTensor) -> None:
        """
        Refuse what is not a batch of images `(batch, channels, height, width)` as the processor makes them, where
        pixel values enter the model (`_vision_inputs`, and `generate` reading their batch size): the towers would fail
        naming no input, and integer pixels (an image's 0..255, not normalised) would be captioned, wrongly.
        """
        vision_config = self._transformers_vision_config
        channels = getattr(vision_config, "num_channels", 3)  # open_clip's towers read RGB
        patch = self._siglip2_patch_size() or 1
        if not (
            isinstance(pixel_values, torch.Tensor)
            and pixel_values.is_floating_point()
            and pixel_values.dim() == 4
            and pixel_values.shape[1] == channels
            and pixel_values.shape[2] % patch == pixel_values.shape[3] % patch == 0
        ):
            given = (
                f"a {str(pixel_values.dtype).removeprefix('torch.')} tensor of shape {tuple(pixel_values.shape)}"
                if isinstance(pixel_values, torch.Tensor)
                else type(pixel_values).__name__
            )
            sides = f" with sides that are multiples of the SigLIP2 tower's patch size ({patch})" if patch > 1 else ""
            raise ValueError(
                f"`pixel_values` must be a floating-point torch tensor of shape (batch_size, {channels}, height, "
                f"width){sides}, normalised as the vision tower reads them; got {given}. Make them with this model's "
                "processor (ClipCapProcessor / AutoProcessor): `processor(images=images)`."
            )
        # transformers towers interpolate or patch other sizes, or name the size themselves; open_clip's fail naming
        # no input.
        size = self.vision_model.fixed_image_size if self.config.vision_backend == "open_clip" else None
        if size is not None and tuple(pixel_values.shape[2:]) != size:
            raise ValueError(
                f"`pixel_values` must be images of {size[0]}x{size[1]} pixels (height x width), the size of this "
                "model's open_clip vision tower (config.open_clip_model_cfg['vision_cfg']['image_size']); got "
                f"{pixel_values.shape[2]}x{pixel_values.shape[3]}. Make them with this model's processor "
                "(ClipCapProcessor / AutoProcessor), which resizes and crops to that size: `processor(images=images)`."
            )

    def _vision_inputs(self, pixel_values: torch.FloatTensor) -> dict[str, torch.Tensor]:
        """The tower's inputs for a batch of images `(batch, channels, height, width)`, checked here."""
        self._check_pixel_values(pixel_values)
        pixel_values = pixel_values.to(self.vision_model.dtype)
        # SigLIP2 (NaFlex) reads a sequence of flattened patches, cut here from the square image.
        patch = self._siglip2_patch_size()
        if patch is None:
            return {"pixel_values": pixel_values}
        # Row by row, each patch's pixels channels-last, as SigLIP2's image processor lays them out; every patch of
        # the square image is real (no padding).
        batch, channels, height, width = pixel_values.shape
        patches = pixel_values.reshape(batch, channels, height // patch, patch, width // patch, patch)
        patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // patch) * (width // patch), -1)
        spatial_shapes = torch.tensor([[height // patch, width // patch]], device=pixel_values.device)
        return {
            "pixel_values": patches,
            "pixel_attention_mask": torch.ones(patches.shape[:2], dtype=torch.long, device=pixel_values.device),
            "spatial_shapes": spatial_shapes.expand(batch, 2),
        }

    def _pool(self, vision_outputs: ModelOutput) -> torch.FloatTensor:
        """The one image embedding `config.vision_pooling` names, from a transformers tower's output."""
        pooling = self.config.vision_pooling
        if pooling == "projection":
            return vision_outputs.image_embeds
        if pooling == "pooled":
            return vision_outputs.pooler_output
        states = vision_outputs.last_hidden_state  # after the tower's final norm
        if pooling == "cls":
            return states[:, 0]
        # cls_mean_patch: the patch tokens follow the CLS token and any register tokens (DINOv2 with registers).
        first_patch = 1 + getattr(self.config.vision_config, "num_register_tokens", 0)
        return torch.cat([states[:, 0], states[:, first_patch:].mean(dim=1)], dim=-1)

    def get_prefix_embeds(
        self, pixel_values: torch.FloatTensor | None = None, image_embeds: torch.FloatTensor | None = None
    ) -> torch.FloatTensor:
        """The prefix vectors for a batch of images, shape `(batch, prefix_length, config.text_embedding_size)`."""
        features = self.get_image_features(pixel_values=pixel_values, image_embeds=image_embeds, return_dict=True)
        return features.pooler_output

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ClipCapImageOutput:
        r"""
        The image features the language model reads, as transformers' vision-language models return them: the
        prefix vectors in `pooler_output`, the vision tower's states beside them.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`, *optional*):
                Images from the processor; runs the vision tower.
            image_embeds (`torch.FloatTensor` of shape `(batch_size, prefix_dim)`, *optional*):
                Precomputed CLIP image embeddings (e.g. from an embedding cache), instead of `pixel_values`.
            output_hidden_states, output_attentions (`bool`, *optional*):
                Return the vision tower's hidden states or attentions (transformers' CLIP towers).
        """
        if (pixel_values is None) == (image_embeds is None):
            raise ValueError(
                "Pass exactly one of `pixel_values` (images through the processor) or `image_embeds` "
                f"(precomputed CLIP embeddings); got {'both' if pixel_values is not None else 'neither'}."
            )
        vision_outputs = None
        if pixel_values is not None and self.config.vision_backend == "clip":
            # Flags left unset stay unset: the tower's config decides (transformers 5 reads an explicit None as False).
            flags = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
            vision_outputs = self.vision_model(
                **self._vision_inputs(pixel_values),
                **{name: value for name, value in flags.items() if value is not None},
            )
            image_embeds = self._pool(vision_outputs)
        elif pixel_values is not None:
            image_embeds = self.get_image_embeds(pixel_values)
        elif image_embeds.ndim != 2 or image_embeds.shape[-1] != self.config.prefix_dim:
            raise ValueError(
                f"`image_embeds` must have shape (batch_size, {self.config.prefix_dim}) for this model "
                f"(config.prefix_dim), got {tuple(image_embeds.shape)}. Compute them with the vision tower this model "
                "was trained with."
            )
        mapper_input = image_embeds
        if self.config.normalize_prefix:
            mapper_input = mapper_input / mapper_input.norm(p=2, dim=-1, keepdim=True)
        mapper_dtype = next(self.mapping_network.parameters()).dtype
        return ClipCapImageOutput(
            last_hidden_state=None if vision_outputs is None else vision_outputs.last_hidden_state,
            pooler_output=self.mapping_network(mapper_input.to(mapper_dtype)),
            hidden_states=None if vision_outputs is None else vision_outputs.hidden_states,
            attentions=None if vision_outputs is None else vision_outputs.attentions,
            image_embeds=image_embeds,
        )

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
            pixel_values / image_embeds: the images, as for [`~ClipCapForConditionalGeneration.get_image_features`].
            tokenizer (*optional*):
                The tokenizer (or processor) that decodes the tokens; without it only the token ids are given.
            top_k (`int`, *optional*, defaults to 5):
                How many tokens to keep per prefix vector.

        Returns:
            `list[PrefixInterpretation]` (from `clipcap_hf.interpretability`): one per image; its `tokens` are the
            nearest token of each prefix vector and its `matches` hold the ids, tokens and similarities. The image
            placeholder token (`config.image_token_id`), which no text holds, is never among them.

        Example:

        ```python
        >>> interpretation = model.interpret_prefix(pixel_values=pixel_values, tokenizer=processor)[0]
        >>> print(interpretation.format())
        ```
        """
        from .interpretability import interpret_prefix_embeds

        prefix_embeds = self.get_prefix_embeds(pixel_values=pixel_values, image_embeds=image_embeds)
        return interpret_prefix_embeds(
            prefix_embeds, self.get_input_embeddings().weight, tokenizer, top_k, [self.config.image_token_id]
        )

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.FloatTensor
    ) -> torch.BoolTensor:
        """Where the image tokens are, `(batch, length)`: read from `input_ids`, or found in `inputs_embeds`."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_token = torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        return (inputs_embeds == self.get_input_embeddings()(image_token)).all(-1)

    def _write_prefix(
        self,
        inputs_embeds: torch.FloatTensor,
        image_mask: torch.BoolTensor,
        prefix_embeds: torch.FloatTensor,
        found_by_embedding: bool = False,
    ) -> torch.FloatTensor:
        """Put each image's prefix vectors at its row's image tokens (`found_by_embedding`: in `inputs_embeds`)."""
        if not torch.compiler.is_compiling():
            if prefix_embeds.ndim != 3 or prefix_embeds.shape[2] != inputs_embeds.shape[2]:
                raise ValueError(
                    f"The prefix vectors must have shape (images, {self.config.prefix_length}, "
                    f"{inputs_embeds.shape[2]}) (config.prefix_length, the language model's width), got "
                    f"{tuple(prefix_embeds.shape)}: compute them with this model's `get_prefix_embeds`."
                )
            counts = image_mask.sum(dim=1)
            if prefix_embeds.shape[0] != image_mask.shape[0] or bool((counts != prefix_embeds.shape[1]).any()):
                raise ValueError(
                    f"Got {prefix_embeds.shape[0]} images for {image_mask.shape[0]} text rows holding "
                    f"{counts.tolist()} image tokens (id {self.config.image_token_id}); each row needs exactly "
                    f"{prefix_embeds.shape[1]} (config.prefix_length). Prepare inputs with the model's processor, "
                    "which writes them in front of the text."
                    + (
                        " Without `input_ids`, the image tokens are found in `inputs_embeds` by the image token's "
                        "embedding, which other tokens may share (a zero padding row): pass `input_ids` instead."
                        if found_by_embedding else ""
                    )
                )
        prefix_embeds = prefix_embeds.to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), prefix_embeds)

    def _check_no_image_tokens(self, input_ids: torch.LongTensor | None, past_length: int) -> None:
        """Image tokens without an image would reach the language model as a zero embedding: refused."""
        # Not checked on decoding steps that continue a cache (the image came with its first step) nor in a compiled
        # graph: a device sync.
        if input_ids is None or past_length > 0 or torch.compiler.is_compiling():
            return
        if bool((input_ids == self.config.image_token_id).any()):
            raise ValueError(
                "`input_ids` hold image tokens but no image was given: pass `pixel_values` (images through the "
                "processor), `image_embeds` (precomputed CLIP embeddings) or `prefix_embeds` (the prefix vectors)."
            )

    def _inputs_from_labels(self, labels: torch.LongTensor) -> tuple[torch.LongTensor, torch.Tensor]:
        """
        `input_ids` and `attention_mask` given back from `labels` alone (as Seq2SeqTrainer's evaluation batches give
        them, so that `generate` gets no caption): the processor's labels hold -100 at the image tokens, then the
        caption, then -100 as right padding, as VisionEncoderDecoder derives its decoder inputs from `labels`.
        """
        prefix_length = self.config.prefix_length
        ignored = labels == -100
        caption_ignored = ignored[:, prefix_length:]
        if not bool(ignored[:, :prefix_length].all()) or not bool(
            (caption_ignored[:, 1:] | ~caption_ignored[:, :-1]).all()
        ):
            raise ValueError(
                "`labels` without `input_ids` must be the processor's: -100 at the image tokens, the caption, then "
                "-100 as right padding. Otherwise pass `input_ids` too (`processor(images=..., captions=...)` gives "
                "both)."
            )
        input_ids = labels.masked_fill(ignored, self.generation_config.pad_token_id or 0)
        input_ids[:, :prefix_length] = self.config.image_token_id
        attention_mask = ~ignored
        attention_mask[:, :prefix_length] = True
        return input_ids, attention_mask.long()

    # ----------------------------------------------------------------------------------------------------------
    # Forward and generation

    @can_return_tuple
    @_deprecated_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        prefix_embeds: torch.FloatTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ClipCapCausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Tokens, with `config.prefix_length` image tokens (`config.image_token_id`) per image, where the prefix
                vectors go: the processor writes them in front of the prompt or caption.
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`, *optional*):
                Images from [`ClipCapImageProcessor`]. Give this, `image_embeds` or `prefix_embeds`, or none when
                continuing from a cache.
            image_embeds (`torch.FloatTensor` of shape `(batch_size, prefix_dim)`, *optional*):
                Precomputed CLIP image embeddings; skips the vision tower (the fast training path).
            cache ([`~cache_utils.Cache`], *optional*):
                The key/value cache. `past_key_values` is its name on transformers 4.57; on 5.x that name is
                deprecated (with a warning), as for transformers' own models.
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden)`, *optional*):
                Instead of `input_ids`; with an image, the image tokens' embeddings mark where the prefix goes.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Targets aligned with `input_ids`, -100 where no loss is wanted; image tokens are never targets (with
                Trainer's `num_items_in_batch`, which counts the labels, they must be -100 already, as the
                processor writes them). The loss is next-token cross-entropy. In training mode the LM head is
                applied only at the positions that predict a label, `logits` is `None`, and no cache is built unless
                `use_cache=True`. Given alone (no `input_ids`, no `attention_mask`), the inputs are read back from the
                processor's labels.
            attention_mask, position_ids, use_cache, **kwargs:
                As for any causal LM, over the same positions as `input_ids`.
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0):
                Compute logits for the last `logits_to_keep` positions only (0: all). With `labels`, it must keep
                every position that predicts a label.
            prefix_embeds (`torch.FloatTensor` of shape `(batch_size, prefix_length, hidden)`, *optional*):
                The prefix vectors themselves (the mapping network's output, as `get_prefix_embeds` returns them),
                instead of `pixel_values` or `image_embeds`: beam search computes them once per image and copies them
                to the beams, as Idefics passes its `image_hidden_states`.

        Example:

        ```python
        >>> inputs = processor(images=images, captions=captions, return_tensors="pt")
        >>> outputs = model(**inputs)  # input_ids with image tokens, attention_mask, labels, pixel_values
        >>> outputs.loss.backward()
        ```
        """
        cache = cache if cache is not None else past_key_values
        if input_ids is None and inputs_embeds is None and labels is not None and attention_mask is None:
            input_ids, attention_mask = self._inputs_from_labels(labels)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        past_length = 0
        if not torch.compiler.is_compiling():  # a static cache's length is a tensor there: no data-dependent branch
            past_length = int(cache.get_seq_length()) if isinstance(cache, Cache) else 0
            new_length = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
            self._check_input_fits_positions(past_length + new_length)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        # Trainer adds `num_items_in_batch` for the loss; the language model must not see it.
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        image_outputs = None
        if pixel_values is not None or image_embeds is not None:
            if prefix_embeds is not None:
                raise ValueError(
                    "Pass `prefix_embeds` (the prefix vectors, from `get_prefix_embeds`) instead of `pixel_values` or "
                    "`image_embeds`, not with them."
                )
            image_outputs = self.get_image_features(
                pixel_values=pixel_values,
                image_embeds=image_embeds,
                output_hidden_states=kwargs.get("output_hidden_states"),
                output_attentions=kwargs.get("output_attentions"),
                return_dict=True,
            )
            prefix_embeds = image_outputs.pooler_output
        if prefix_embeds is not None:
            image_mask = self.get_placeholder_mask(input_ids, inputs_embeds)
            inputs_embeds = self._write_prefix(
                inputs_embeds, image_mask, prefix_embeds, found_by_embedding=input_ids is None
            )
            if labels is not None:  # image tokens are never targets
                image_mask = image_mask.to(labels.device)
                if num_items_in_batch is not None:
                    self._check_image_tokens_not_counted(labels, image_mask)
                labels = labels.masked_fill(image_mask, -100)
        else:
            self._check_no_image_tokens(input_ids, past_length)

        lm_inputs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, **kwargs, "return_dict": True}
        for name, value in (("position_ids", position_ids), (CACHE_NAME, cache), ("use_cache", use_cache)):
            if value is not None:  # unset stays unset: the language model's own defaults apply
                lm_inputs[name] = value

        if labels is not None and self.training and self._lm_head_is_plain_projection():
            # Training needs LM-head scores only where a caption token is predicted: skip the image and padding
            # positions, which would otherwise cost a vocabulary-wide matmul and softmax each. Nor does it read a
            # key/value cache back, which language models build by default (copying every layer's keys and values).
            if cache is None:
                lm_inputs.setdefault("use_cache", False)
            outputs = self.language_model.base_model(**lm_inputs)
            loss = self._caption_loss(
                outputs.last_hidden_state, labels, num_items_in_batch, self.get_output_embeddings()
            )
            return self._output(loss, None, outputs, image_outputs)

        if not isinstance(logits_to_keep, int) or logits_to_keep != 0:
            lm_inputs["logits_to_keep"] = logits_to_keep  # 0 (every position) is the default; not every 4.x LM takes it
        outputs = self.language_model(**lm_inputs)
        if isinstance(logits_to_keep, int) and 0 < logits_to_keep < outputs.logits.shape[1]:
            outputs.logits = outputs.logits[:, -logits_to_keep:]  # a 4.57 language model that ignores it (OPT)
        loss = None
        if labels is not None:
            labels = self._labels_for_kept_logits(labels, outputs.logits, logits_to_keep)
            loss = self._caption_loss(outputs.logits, labels, num_items_in_batch)
        return self._output(loss, outputs.logits, outputs, image_outputs)

    @staticmethod
    def _check_image_tokens_not_counted(labels: torch.LongTensor, image_mask: torch.BoolTensor) -> None:
        """
        Refuse labels that make image tokens targets when Trainer divides the loss by `num_items_in_batch`: it
        counted them, summed over its accumulation steps and devices, so masking them here cannot set the count right
        and the loss would come out too small.
        """
        if torch.compiler.is_compiling():  # a device sync
            return
        if bool((labels[image_mask] != -100).any()):
            raise ValueError(
                "`labels` make image tokens targets, and `num_items_in_batch` (Trainer's count of labels) counts them, "
                "so the loss would be divided by too many items. Put -100 on the image tokens in `labels`, as the "
                "processor's `labels` do."
            )

    def _output(self, loss, logits, outputs, image_outputs) -> ClipCapCausalLMOutputWithPast:
        return ClipCapCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=image_outputs,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )

    @staticmethod
    def _labels_for_kept_logits(labels: torch.LongTensor, logits: torch.FloatTensor, logits_to_keep) -> torch.Tensor:
        """The labels of the positions `logits_to_keep` kept, which must include every one that predicts a label."""
        if isinstance(logits_to_keep, torch.Tensor):
            raise ValueError("With `labels`, `logits_to_keep` must be a number of last positions, not indices.")
        dropped = labels.shape[1] - logits.shape[1]
        if (labels[:, 1 : dropped + 1] != -100).any():
            raise ValueError(
                f"`logits_to_keep={logits_to_keep}` drops logits the loss needs: with `labels`, keep at least the "
                "caption tokens plus one (the last image token predicts the first caption token), or leave it at 0."
            )
        return labels[:, dropped:]

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

    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs: torch.LongTensor | None = None,
        **kwargs,
    ):
        r"""
        [`~generation.GenerationMixin.generate`] over this model's forward: every decoding strategy, cache and
        output option applies, and `sequences` count the same positions as the scores, attentions and cache.
        `inputs` (transformers' name for the model's main input) is `input_ids`.

        Images alone need no `input_ids`: the image tokens are written here, as BLIP-2 does. The returned sequences
        start with the input tokens (image tokens and prompt); `processor.batch_decode(..., skip_special_tokens=True)`
        gives the prompt and caption. `labels` are ignored, as encoder-decoder models ignore them here
        (Seq2SeqTrainer(predict_with_generate=True) passes its evaluation batches as they are).
        """
        kwargs.pop("labels", None)
        input_ids = _main_input(input_ids, inputs, "input_ids")
        if input_ids is not None and not isinstance(input_ids, torch.Tensor):  # e.g. processor(return_tensors="np")
            raise TypeError(
                f"`input_ids` must be a torch tensor, got {type(input_ids).__name__}: call the processor with "
                'return_tensors="pt" (its default), or pass torch tensors.'
            )
        if input_ids is not None and input_ids.is_floating_point():  # `generate(pixel_values)`, as for BLIP
            raise ValueError(
                f"`input_ids` (generate's first argument) holds floats, shape {tuple(input_ids.shape)}: pass images by "
                "name, `generate(pixel_values=...)`, or use ClipCapForImageToText, whose first argument they are."
            )
        images = next((x for x in (pixel_values, image_embeds, kwargs.get("prefix_embeds")) if x is not None), None)
        if input_ids is None and kwargs.get("inputs_embeds") is None and images is not None:
            if images is pixel_values:  # read before the forward checks them
                self._check_pixel_values(pixel_values)
            input_ids = torch.full((images.shape[0], self.config.prefix_length), self.config.image_token_id,
                                   device=images.device)
            attention_mask = torch.ones_like(input_ids)
        prompt = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if hasattr(kwargs.get("tokenizer"), "tokenizer"):  # a processor given for `stop_strings`: its tokenizer
            kwargs["tokenizer"] = kwargs["tokenizer"].tokenizer
        if input_ids is not None:
            self._guide_without_the_image(input_ids, kwargs)
        if prompt is not None:
            if images is not None:
                self._check_no_chunked_prefill(kwargs)
            new_tokens, option = self._length_as_new_tokens(prompt.shape[1], kwargs)
            self._check_input_fits_positions(prompt.shape[1], generating=True)
            self._fit_generation_to_positions(prompt.shape[1], new_tokens, option, kwargs)
        # On the CPU, fp32 linear layers run through oneDNN where it measured faster than PyTorch's default (onednn.py).
        with cpu_linear_kernels(self):
            return super().generate(
                input_ids=input_ids,
                pixel_values=pixel_values,
                image_embeds=image_embeds,
                attention_mask=attention_mask,
                **kwargs,
            )

    def _guide_without_the_image(self, input_ids: torch.LongTensor, kwargs: dict) -> None:
        """
        Classifier-free guidance (`guidance_scale`) reads each row's last input token alone unless given
        `negative_prompt_ids`: a row without a prompt ends with an image token, which the model refuses without its
        image. The start token (BOS, else the first EOS) stands in for it, so that such a row's caption is guided
        against a caption of no image.
        """
        generation_config = kwargs.get("generation_config") or self.generation_config
        scale = kwargs.get("guidance_scale", generation_config.guidance_scale)
        if scale is None or scale == 1 or kwargs.get("negative_prompt_ids") is not None:
            return
        start = generation_config.bos_token_id
        if start is None:
            eos = generation_config.eos_token_id
            start = eos[0] if isinstance(eos, list) and eos else eos
        if start is not None:
            last = input_ids[:, -1:]
            # One row per row of the input as transformers expands it (beams, returned sequences), as it expands
            # the rows it reads when it takes them itself.
            rows_per_input = max(
                kwargs.get("num_beams", generation_config.num_beams) or 1,
                kwargs.get("num_return_sequences", generation_config.num_return_sequences) or 1,
            )
            unconditional = last.masked_fill(last == self.config.image_token_id, start)
            kwargs["negative_prompt_ids"] = unconditional.repeat_interleave(rows_per_input, dim=0)

    def _check_no_chunked_prefill(self, kwargs: dict) -> None:
        """
        Refuse `prefill_chunk_size` with an image: the prefix vectors are written in one pass, and a chunk can hold
        part of the image tokens (transformers 4.57 chunks all but the last input token, whatever the chunk size).
        """
        generation_config = kwargs.get("generation_config") or self.generation_config
        chunk_size = kwargs.get("prefill_chunk_size", getattr(generation_config, "prefill_chunk_size", None))
        if chunk_size:
            raise ValueError(
                f"prefill_chunk_size={chunk_size} splits the first pass over the input into chunks, and ClipCap "
                "writes an image's prefix vectors in one pass: leave prefill_chunk_size unset when generating from "
                "an image."
            )

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # Beam search and `num_return_sequences` copy each image's inputs `expand_size` times: the vision tower and the
        # mapping network run here, once per image, and the prefix vectors are copied instead of the pixels or
        # embeddings (else each of 5 beams ran the tower, most of a greedy caption's time from pixels, and the
        # transformer mapper).
        images = {name: model_kwargs.get(name) for name in ("pixel_values", "image_embeds")}
        has_images = any(value is not None for value in images.values())
        if expand_size > 1 and has_images and model_kwargs.get("prefix_embeds") is None:
            for name in images:
                model_kwargs.pop(name, None)
            model_kwargs["prefix_embeds"] = self.get_prefix_embeds(**images)
        return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)

    def _get_logits_processor(self, generation_config: GenerationConfig, *args, **kwargs) -> LogitsProcessorList:
        # The image token is never generated, whatever `suppress_tokens` the caller gives: theirs replaces the saved
        # list (`_set_generation_defaults`), so the token joins it here. Suppressed by index, rather than through
        # transformers' vocabulary-wide mask.
        image_token_id = self.config.image_token_id
        suppressed = list(generation_config.suppress_tokens or [])
        if image_token_id is not None and image_token_id not in suppressed:
            generation_config = copy.copy(generation_config)
            generation_config.suppress_tokens = [*suppressed, image_token_id]
        processors = super()._get_logits_processor(generation_config, *args, **kwargs)
        for index, processor in enumerate(processors):
            if type(processor) is SuppressTokensLogitsProcessor:
                tokens = processor.suppress_tokens
                processors[index] = _SuppressTokensByIndex(tokens.tolist(), tokens.device)
        return processors

    def _learned_position_limit(self) -> int | None:
        """
        The size of the language model's learned position table (GPT-2's, OPT's), past which it fails with a bare
        IndexError; None for rotary or ALiBi positions, which go on past `max_position_embeddings` as transformers lets
        them. Found as an embedding table of that size beside the token embeddings; cached per language model.
        """
        cached = getattr(self, "_position_limit_of", None)
        if cached is not None and cached[0] is self.language_model:
            return cached[1]
        context = getattr(self.config.text_config, "max_position_embeddings", None)
        token_embeddings = self.get_input_embeddings()
        learned = isinstance(context, int) and any(
            isinstance(module, nn.Embedding) and module is not token_embeddings
            and context <= module.num_embeddings <= context + 2  # OPT's table holds 2 offset rows
            for module in self.language_model.modules()
        )
        self._position_limit_of = (self.language_model, context if learned else None)
        return self._position_limit_of[1]

    def _check_input_fits_positions(self, length: int, generating: bool = False) -> None:
        """
        Refuse `length` positions (cached and new) beyond the language model's learned position table, or an input to
        `generate` that leaves no position to generate in: the table would fail with a bare IndexError.
        """
        context = self._learned_position_limit()
        if context is not None and length + int(generating) > context:
            room = context - self.config.prefix_length - generating
            raise ValueError(
                f"The input has {length} positions ({self.config.prefix_length} image tokens, the prompt or caption, "
                f"and any cached ones), but the language model has {context} (max_position_embeddings)"
                + (" and needs one left to generate" if generating else "")
                + f"; shorten the prompt or caption to at most {room} tokens (the processor's `max_caption_length` "
                "cuts captions)."
            )

    def _fit_generation_to_positions(self, input_length: int, new_tokens: int, option: str, kwargs: dict) -> None:
        """The call's caption length fitted to the learned position table ([`fit_caption_to_positions`])."""
        fitted = fit_caption_to_positions(self._learned_position_limit(), input_length, new_tokens, option)
        if fitted != new_tokens:
            self._set_new_tokens(kwargs, fitted)

    @staticmethod
    def _set_new_tokens(kwargs: dict, new_tokens: int) -> None:
        """
        Set this call's `max_new_tokens`: in a copy of its generation config when it gives one (transformers
        deprecates a config together with generation arguments), else as an argument. The copy's `max_length` goes
        back to transformers' default: `max_new_tokens` now says the length, and transformers would warn that both
        were set.
        """
        given = kwargs.get("generation_config")
        if given is None:
            kwargs["max_new_tokens"] = new_tokens
        else:
            kwargs["generation_config"] = given = copy.deepcopy(given)
            given.max_new_tokens = new_tokens
            given.max_length = GenerationConfig().max_length

    def _length_as_new_tokens(self, input_length: int, kwargs: dict) -> tuple[int, str]:
        """
        The most tokens this call generates, and the option that set it. A caller's `max_length` becomes a number of
        new tokens: transformers would let the saved caption length (`max_new_tokens`, which a `max_length` cannot
        express for every prompt length) win over it.
        """
        given = kwargs.get("generation_config")
        if kwargs.get("max_new_tokens") is not None:
            return kwargs["max_new_tokens"], "max_new_tokens"
        if kwargs.get("max_length") is not None:
            kwargs["max_new_tokens"] = self._new_tokens_from_max_length(kwargs.pop("max_length"), input_length)
            return kwargs["max_new_tokens"], "max_length"
        if given is not None and given.max_new_tokens is not None:
            return given.max_new_tokens, "generation_config.max_new_tokens"
        if given is not None and "max_length" in given.to_diff_dict():
            new_tokens = self._new_tokens_from_max_length(given.max_length, input_length)
            self._set_new_tokens(kwargs, new_tokens)
            return new_tokens, "generation_config.max_length"
        saved = self.generation_config
        if caption_length_unset(saved):  # ClipCap's default, which `caption_length` reports too
            self._set_new_tokens(kwargs, DEFAULT_MAX_NEW_TOKENS)
            return DEFAULT_MAX_NEW_TOKENS, "the default caption length"
        if saved.max_new_tokens is not None:
            return saved.max_new_tokens, "model.generation_config.max_new_tokens"
        return saved.max_length - input_length, "model.generation_config.max_length"

    @staticmethod
    def _new_tokens_from_max_length(max_length: int, input_length: int) -> int:
        if max_length <= input_length:
            raise ValueError(
                f"`max_length={max_length}` leaves no room to generate: it counts the input's {input_length} tokens "
                f"(image tokens and prompt); give max_length > {input_length}, or max_new_tokens."
            )
        return max_length - input_length

    def prepare_inputs_for_generation(
        self, input_ids, pixel_values=None, image_embeds=None, inputs_embeds=None, prefix_embeds=None, **kwargs
    ):
        # `inputs_embeds` is named: GenerationMixin reads this signature to accept `generate(inputs_embeds=...)`.
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        # The image goes in with the step that holds its image tokens: the first one, or every one without a cache.
        if _GENERATION_MARKS_FIRST_ITERATION:  # transformers 5
            # An assistant's first pass is not marked first, but starts from an empty cache.
            cache = kwargs.get(CACHE_NAME)
            first_step = (
                kwargs.get("is_first_iteration", False)
                or not kwargs.get("use_cache", True)
                or (cache is not None and cache.get_seq_length() == 0)
            )
            if first_step and kwargs.get("use_cache", True) and cache is not None and cache.get_seq_length() > 0:
                # A call continuing a cache that read the image already (marked first all the same): the image goes
                # in only if this step holds image tokens.
                step_ids = model_inputs.get("input_ids")
                first_step = step_ids is not None and bool((step_ids == self.config.image_token_id).any())
        else:  # transformers 4.57 counts positions from 0 on every step without a cache
            cache_position = kwargs.get("cache_position")
            first_step = cache_position is None or int(cache_position[0]) == 0
        if first_step:
            model_inputs.update(pixel_values=pixel_values, image_embeds=image_embeds, prefix_embeds=prefix_embeds)
        return model_inputs


class ClipCapForImageToText(ClipCapForConditionalGeneration):
    """
    ClipCap for transformers 4.x's "image-to-text" pipeline (`AutoModelForVision2Seq`), which hands the model the
    image processor's output as its main input (`generate(pixel_values, ...)`), as for BLIP. Decoding is the same:
    the image goes to the forward, and generation starts from the image tokens. A prompt (the pipeline's `prompt=`)
    comes as the tokenizer's `input_ids`, without image tokens: they are written in front of it, as BLIP-2 does, in
    place of the BOS token that a tokenizer may add there (the processor's prompts have none).
    (transformers 5 routes that task to "image-text-to-text", which uses the processor.)
    """

    main_input_name = "pixel_values"

    def generate(self, pixel_values=None, input_ids=None, inputs=None, **kwargs):
        pixel_values = _main_input(pixel_values, inputs, "pixel_values")
        images = pixel_values if pixel_values is not None else kwargs.get("image_embeds")
        if images is None or kwargs.get("inputs_embeds") is not None:
            raise ValueError(
                "ClipCapForImageToText (the class of transformers 4.x's image-to-text pipeline) captions images: pass "
                "`pixel_values` or `image_embeds`, and any prompt as `input_ids`. For text alone or `inputs_embeds`, "
                "use ClipCapForConditionalGeneration."
            )
        if input_ids is not None and not bool((input_ids == self.config.image_token_id).any()):
            input_ids, attention_mask = self._without_tokenizer_bos(input_ids, kwargs.get("attention_mask"))
            input_ids, kwargs["attention_mask"] = self._prepend_image_tokens(input_ids, attention_mask)
        return super().generate(input_ids=input_ids, pixel_values=pixel_values, **kwargs)

    def _without_tokenizer_bos(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        """
        The prompt rows less the BOS token that a tokenizer such as OPT's or Llama's adds in front: the pipeline
        tokenizes the prompt with special tokens, the processor without, and the image tokens must be followed by the
        prompt alone, as there. Each row's BOS becomes padding, and the columns that are padding in every row are
        dropped from the front: the rows the processor writes, padded alike.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        bos_token_id = self.config.text_config.bos_token_id
        if bos_token_id is None:
            return input_ids, attention_mask
        first = attention_mask.ne(0).int().argmax(1, keepdim=True)  # each row's first attended token
        is_bos = input_ids.gather(1, first).eq(bos_token_id) & attention_mask.gather(1, first).ne(0)
        attention_mask = attention_mask.scatter(1, first, attention_mask.gather(1, first).masked_fill(is_bos, 0))
        kept = attention_mask.ne(0).any(0).cumsum(0) > 0  # from the first column any row attends to
        return input_ids[:, kept], attention_mask[:, kept]

    def _prepend_image_tokens(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        """The prompt rows with `prefix_length` image tokens in front, as the processor writes them."""
        image_tokens = torch.full(
            (input_ids.shape[0], self.config.prefix_length), self.config.image_token_id,
            dtype=input_ids.dtype, device=input_ids.device,
        )
        image_mask = torch.ones_like(image_tokens, dtype=attention_mask.dtype)
        return torch.cat((image_tokens, input_ids), 1), torch.cat((image_mask, attention_mask), 1)

    def _prepare_model_inputs(self, inputs=None, bos_token_id=None, model_kwargs=None):
        # Decoding starts from the `input_ids` that `generate` wrote (image tokens and any prompt); the pixels, this
        # class's main input (`inputs`, taken by `generate` already), stay a model keyword as for the parent class,
        # and with `image_embeds` there are none.
        model_kwargs = dict(model_kwargs)
        return model_kwargs.pop("input_ids"), "input_ids", model_kwargs


__all__ = [
    "ClipCapCausalLMOutputWithPast",
    "ClipCapForConditionalGeneration",
    "ClipCapForImageToText",
    "ClipCapImageOutput",
    "ClipCapMLPMapper",
    "ClipCapPreTrainedModel",
    "ClipCapTransformerMapper",
    "load_pretrained_vision_model",
]
