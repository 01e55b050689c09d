"""
Convert the paper's released checkpoints (https://github.com/rmokady/CLIP_prefix_caption) into ClipCap folders.

The releases are `torch.save(ClipCaptionModel.state_dict())` pickles: `clip_project.*` (the mapping network) and
`gpt.*` (a GPT-2 `GPT2LMHeadModel`). They record neither the CLIP they were trained with nor decoding settings; a
preset supplies those. The converter checks every key and shape, checks that the converted model computes what the
original code computes from the same tensors, and only then writes a complete folder (config, safetensors weights,
processor, generation config, model card stub, a record of the conversion) that `from_pretrained` and
`push_to_hub` take as is.

    clipcap convert-original coco_weights.pt --output clipcap-coco-mlp --preset coco-mlp
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import pickle
import re
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.errors import HFValidationError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GPT2Config
from transformers.utils import logging

from ..configuration_clipcap import ClipCapConfig
from ..image_processing_clipcap import ClipCapImageProcessor
from ..modeling_clipcap import ClipCapForConditionalGeneration, load_pretrained_vision_model
from ..open_clip_vision import OPEN_CLIP_SCHEMAS
from ..processing_clipcap import ClipCapProcessor
from ..utils.file_utils import check_output_folder, read_json, save_pretrained, write_folder_atomically
from ..utils.loading import can_only_be_a_folder, check_pretrained_source

logger = logging.get_logger(__name__)

# A folder holding any of these holds a tokenizer `AutoTokenizer` may read (GPT-2's older layout has no
# tokenizer_config.json: vocab.json and merges.txt beside a config.json).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "tokenizer.model")

# Attention-mask buffers that GPT-2 saved in its state dict in old transformers versions; current ones have none.
OBSOLETE_GPT2_KEY = re.compile(r"gpt\.transformer\.h\.\d+\.attn\.(bias|masked_bias)")
# Every GPT-2 size (small to xl) uses 64-wide attention heads; a checkpoint does not record the head count.
GPT2_HEAD_DIM = 64
# The official decoders stop at "." and generate at most 67 tokens.
ORIGINAL_STOP_TOKEN = "."
ORIGINAL_MAX_NEW_TOKENS = 67
DEFAULT_TOLERANCE = 1e-4
# Our prefixes -> the original module names.
ORIGINAL_PREFIXES = {"mapping_network.": "clip_project.", "language_model.": "gpt."}
# GPT-2's tensors with a row per token, which the image token lengthens by one row.
VOCABULARY_KEYS = frozenset({"gpt.transformer.wte.weight", "gpt.lm_head.weight"})
OFFICIAL_CODE_URL = "https://github.com/rmokady/CLIP_prefix_caption"
# What a conversion writes beside the model: the source, and the files it wrote with their sha256, which is how
# `overwrite` knows a folder it may replace and the files edited since.
CONVERSION_RECORD = "clipcap_conversion.json"
# A checkpoint's vocabulary may be padded past its tokenizer's size (for faster matrix products): rounded up to a
# multiple of a power of two, up to this one (GPT-2's 50257 to 50304, a multiple of 64, or to 51200, of 1024).
MAX_VOCABULARY_PADDING_MULTIPLE = 1024
# The transformers model types of a CLIP (a whole one, or its vision tower): the only towers the releases can read.
CLIP_MODEL_TYPES = ("clip", "clip_vision_model")


@dataclass(frozen=True)
class OriginalRelease:
    """What a released checkpoint does not say about itself: its CLIP tower, prefix normalisation and data."""

    mapping_type: str
    normalize_prefix: bool
    # vision backend -> (model name, open_clip pretrained tag); the first entry is the default.
    vision_models: Mapping[str, tuple[str, str | None]]
    dataset: str
    mapping_num_heads: int = 8  # hard-coded in the official TransformerMapper

    def vision_tower(self, preset: str, vision_backend: str | None = None) -> tuple[str, str, str | None]:
        """`(backend, model name, open_clip tag)` of the CLIP this release was trained with, in the given backend."""
        default_backend, (default_name, _) = next(iter(self.vision_models.items()))
        backend = vision_backend or default_backend
        if backend not in self.vision_models:
            raise ValueError(
                f"Preset {preset!r} was trained with {default_name}, which vision_backend={backend!r} does not offer; "
                f"use vision_backend={default_backend!r} or name the tower (`vision_model`, --vision-model)."
            )
        return (backend, *self.vision_models[backend])


_VIT_B_32 = {"clip": ("openai/clip-vit-base-patch32", None), "open_clip": ("ViT-B-32", "openai")}
PRESETS: dict[str, OriginalRelease] = {
    "coco-mlp": OriginalRelease("mlp", False, _VIT_B_32, "yerevann/coco-karpathy"),
    "conceptual-mlp": OriginalRelease("mlp", False, _VIT_B_32, "google-research-datasets/conceptual_captions"),
    "coco-transformer": OriginalRelease(
        "transformer", True, {"open_clip": ("RN50x4", "openai")}, "yerevann/coco-karpathy"
    ),
}
DEFAULT_PRESETS = {"mlp": "coco-mlp", "transformer": "coco-transformer"}


@dataclass
class ConversionReport:
    """What [`convert_original_checkpoint`] wrote and measured."""

    output_dir: Path
    preset: str
    config: ClipCapConfig
    dropped_keys: list[str]
    max_logits_delta: float


@dataclass
class OriginalLayout:
    """The architecture a released state dict encodes, read from its key names and shapes."""

    mapping_type: str
    prefix_length: int
    clip_length: int | None
    mapping_num_layers: int
    prefix_dim: int
    gpt2_config: GPT2Config


# ----------------------------------------------------------------------------------------------------------------
# Reading the checkpoint


def load_original_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """
    Load a released checkpoint with `torch.load(weights_only=True)`: tensors only, so a file crafted to run code when
    unpickled is refused instead of executed. A zip-format file is first checked against its checksums
    ([`_check_zip_checksums`]); every tensor must hold floating-point values, but the obsolete GPT-2 buffers that the
    converter drops (`OBSOLETE_GPT2_KEY`).
    """
    path = Path(checkpoint)
    if path.is_dir():
        held = sorted(child for child in path.iterdir() if child.suffix in (".pt", ".pth"))
        example = held[0] if held else "coco_weights.pt"
        raise IsADirectoryError(f"Checkpoint {path} is a folder; give the released .pt file, e.g. {example}.")
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    _check_zip_checksums(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # The weights-only unpickler names the first Python object it would have had to import, e.g. posix.system.
        python_object = re.search(r"GLOBAL ([\w.]+)", str(error))
        if python_object is None:
            reason = _weights_only_reason(error)
            raise ValueError(f"{path} is not a PyTorch checkpoint (torch.load: {reason}).") from error
        raise ValueError(
            f"Refused to load {path}: it holds Python objects ({python_object.group(1)}), not only tensors, and "
            "unpickling those could run code. The released ClipCap checkpoints are plain state dicts; download them "
            f"from the official links ({OFFICIAL_CODE_URL})."
        ) from error
    except Exception as error:  # torch reports corrupt or foreign files with several exception types
        raise ValueError(f"{path} is not a PyTorch checkpoint (torch.load: {_weights_only_reason(error)}).") from error
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{path} holds a {type(state).__name__}, not a state dict (a dict of tensor names to tensors, as "
            "`torch.save(model.state_dict())` writes)."
        )
    if not state:
        raise ValueError(f"{path} holds an empty dict: no tensor to convert.")
    for key, value in state.items():
        if not isinstance(key, str):
            raise ValueError(f"{path} is not a state dict: its key {key!r} is a {type(key).__name__}, not a name.")
        if not isinstance(value, torch.Tensor):
            hint = f"; if it holds the weights, save `checkpoint[{key!r}]` alone" if isinstance(value, Mapping) else ""
            raise ValueError(
                f"{path} is not a state dict: entry {key!r} is a {type(value).__name__}, not a tensor{hint}."
            )
        if value.is_meta:  # a model's state saved before its weights existed
            raise ValueError(
                f"{path}: entry {key!r} holds no values (a meta tensor, as a model built without its weights saves); "
                "convert a checkpoint saved from a trained model."
            )
        if value.layout != torch.strided:
            # Not densified here: a sparse tensor's dense size is whatever shape it declares (a 2 KB file can ask
            # for terabytes), and the released checkpoints hold dense tensors.
            raise ValueError(
                f"{path}: entry {key!r} is a {value.layout} tensor, which the converter does not read; save the "
                "checkpoint's tensors dense (`tensor.to_dense()`)."
            )
        if value.is_quantized:
            raise ValueError(
                f"{path}: entry {key!r} is a quantized tensor ({value.dtype}), which the converter does not read; "
                "convert the checkpoint of float weights (`tensor.dequantize()`)."
            )
        # Not cast: integers, booleans or complex numbers in a weight's place are no weights of a released model.
        if not value.is_floating_point() and not OBSOLETE_GPT2_KEY.fullmatch(key):
            raise ValueError(
                f"{path}: entry {key!r} holds {value.dtype} values, not floating-point weights (the released "
                "checkpoints hold float32 ones); convert the checkpoint as it was released, not one cast by another "
                "tool."
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{path}: entry {key!r} holds NaN or infinite values; the checkpoint is damaged.")
    return dict(state)


def _check_zip_checksums(path: Path) -> None:
    """
    Refuse a damaged zip-format checkpoint (what `torch.save` writes since PyTorch 1.6), which `torch.load` would load
    without checking its CRC-32 checksums: a download damaged inside a tensor's values gives changed weights. Reads the
    whole file once (about a second per gigabyte). A legacy-format file has no checksums, and a file of another format
    is left to `torch.load` to name.
    """
    with open(path, "rb") as file:
        if file.read(4) != b"PK\x03\x04":  # a zip archive's first record
            return
    if not zipfile.is_zipfile(path):
        problem = "it is cut short (it lacks the directory of records that ends a zip archive)"
    else:
        try:
            with zipfile.ZipFile(path) as archive:
                # A file saved with torch's CRC-32 writing off (`torch.serialization.set_crc32_options(False)`)
                # has none to check: all zero.
                unchecked = all(record.CRC == 0 for record in archive.infolist())
                damaged = None if unchecked else archive.testzip()
        except (zipfile.BadZipFile, EOFError, zlib.error) as error:  # a damaged directory or record header
            problem = f"its zip structure is broken ({error})"
        else:
            if damaged is None:
                return
            problem = f"its record {damaged!r} does not match its CRC-32 checksum or its header"
    raise ValueError(
        f"{path} is damaged: {problem}, so it is not the file `torch.save` wrote (an interrupted or corrupted "
        f"download, or a failing disk). Download it again ({OFFICIAL_CODE_URL} links the released files)."
    )


def _weights_only_reason(error: Exception) -> str:
    """The informative line of a torch.load error (the weights-only unpickler wraps it in general advice)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line for line in lines if line.startswith(("Unsupported", "Trying to load"))]
    reason = (reasons or lines or [""])[0]
    # Bytes of another format stop the unpickler at an unknown opcode (`Unsupported operand 110`, a bare `KeyError:
    # 101`), and an empty file with a bare EOFError: nothing worth quoting.
    return "not a file that `torch.save` writes" if re.fullmatch(r"(Unsupported operand )?\d*", reason) else reason


def _require_matrix(state: Mapping[str, torch.Tensor], key: str, meaning: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"The checkpoint lacks {key!r} ({meaning}); it is not a released ClipCap checkpoint.")
    # The layout is read from these tensors' rows and columns.
    if state[key].ndim != 2:
        raise ValueError(
            f"The checkpoint's {key!r} ({meaning}) has shape {tuple(state[key].shape)}, not a matrix; it is not a "
            "released ClipCap checkpoint."
        )
    return state[key]


def _layer_count(state: Mapping[str, torch.Tensor], prefix: str, meaning: str) -> int:
    """
    Number of layers `prefix{i}.*`, whose indices must be exactly 0 to n - 1: a model is built with that many layers,
    so one stray key (`prefix3000.*`) must be refused here, not after building a model 3000 layers deep.
    """
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(match.group(1)) for key in state if (match := pattern.match(key))}
    if indices and max(indices) >= len(indices):  # a gap: the first one is at most len(indices)
        gap = next(index for index in range(len(indices) + 1) if index not in indices)
        raise ValueError(
            f"The checkpoint's {meaning} ('{prefix}N.*') are numbered up to {max(indices)}, but layer {gap} is missing "
            f"(no '{prefix}{gap}.*' keys); is the file complete, and a released ClipCap checkpoint?"
        )
    return len(indices)


def _vectors_of_width(weight: torch.Tensor, key: str, width: int, meaning: str) -> int:
    """How many `width`-wide vectors the output rows of `weight` (`state[key]`) hold: a positive whole number."""
    rows = weight.shape[0]
    count, remainder = divmod(rows, width)
    if remainder or count == 0:
        raise ValueError(f"{key!r} has {rows} rows, not a multiple of GPT-2's width {width}: {meaning}.")
    return count


def infer_original_layout(state: Mapping[str, torch.Tensor], lm_num_heads: int | None = None) -> OriginalLayout:
    """
    Read the mapper type, prefix length, CLIP embedding width and GPT-2 size from a released state dict.

    Args:
        state: the checkpoint's tensors.
        lm_num_heads: GPT-2's attention heads, which no tensor shape records; defaults to `n_embd // 64` (true of
            every GPT-2 size).
    """
    if lm_num_heads is not None and lm_num_heads < 1:
        raise ValueError(f"`lm_num_heads` (--lm-num-heads) must be at least 1, got {lm_num_heads}.")
    wte = _require_matrix(state, "gpt.transformer.wte.weight", "GPT-2's token embeddings")
    wpe = _require_matrix(state, "gpt.transformer.wpe.weight", "GPT-2's position embeddings")
    vocab_size, n_embd = wte.shape
    n_layer = _layer_count(state, "gpt.transformer.h.", "GPT-2 layers")
    if n_layer == 0:
        raise ValueError(
            "The checkpoint has no GPT-2 layers ('gpt.transformer.h.0.*'); it is not a ClipCap checkpoint."
        )
    if lm_num_heads is not None and n_embd % lm_num_heads:
        raise ValueError(
            f"`lm_num_heads` (--lm-num-heads) {lm_num_heads} does not divide GPT-2's width {n_embd} (the "
            "checkpoint's); give a divisor of it."
        )
    if lm_num_heads is None:
        if n_embd % GPT2_HEAD_DIM:
            raise ValueError(
                f"GPT-2 width {n_embd} is not a multiple of {GPT2_HEAD_DIM}, so the number of attention heads cannot "
                "be inferred; pass it (`lm_num_heads`, --lm-num-heads)."
            )
        lm_num_heads = n_embd // GPT2_HEAD_DIM
    lm_head = _require_matrix(state, "gpt.lm_head.weight", "GPT-2's output layer")
    gpt2_config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=wpe.shape[0],
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=lm_num_heads,
        n_inner=_require_matrix(state, "gpt.transformer.h.0.mlp.c_fc.weight", "GPT-2's first MLP").shape[1],
        # Set from the tokenizer by the caller.
        bos_token_id=None,
        eos_token_id=None,
        # The releases tie GPT-2's output layer to its embeddings; keep them apart only if the file does.
        tie_word_embeddings=lm_head.shape == wte.shape and torch.equal(lm_head, wte),
    )

    if "clip_project.model.0.weight" in state:
        first = _require_matrix(state, "clip_project.model.0.weight", "the MLP mapper's input layer")
        last = _require_matrix(state, "clip_project.model.2.weight", "the MLP mapper's output layer")
        prefix_length = _vectors_of_width(
            last, "clip_project.model.2.weight", n_embd, "the MLP mapper must output prefix_length x n_embd values"
        )
        return OriginalLayout("mlp", prefix_length, None, 0, first.shape[1], gpt2_config)
    if "clip_project.linear.weight" in state:
        linear = _require_matrix(state, "clip_project.linear.weight", "the transformer mapper's input projection")
        prefix_const = _require_matrix(state, "clip_project.prefix_const", "the transformer mapper's learned prefix")
        clip_length = _vectors_of_width(
            linear,
            "clip_project.linear.weight",
            n_embd,
            "the transformer mapper projects to clip_length x n_embd values",
        )
        num_layers = _layer_count(state, "clip_project.transformer.layers.", "transformer mapper's layers")
        if num_layers == 0:
            raise ValueError(
                "The checkpoint's transformer mapper has no layers ('clip_project.transformer.layers.0.*')."
            )
        prefix_length = prefix_const.shape[0]
        return OriginalLayout("transformer", prefix_length, clip_length, num_layers, linear.shape[1], gpt2_config)
    raise ValueError(
        "The checkpoint has no mapping network: expected 'clip_project.model.0.weight' (MLP mapper) or "
        "'clip_project.linear.weight' (transformer mapper)."
    )


def _check_keys_and_shapes(
    checkpoint: str | Path, original: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size]
) -> None:
    """Every expected tensor is in the checkpoint with its shape, and nothing else is."""
    problems = []
    missing = [key for key in expected if key not in original]
    if missing:
        problems.append(f"missing {_listing(missing)}")
    unexpected = [key for key in original if key not in expected]
    if unexpected:
        problems.append(f"unexpected {_listing(unexpected)}")
    wrong = [
        f"{key!r} has shape {tuple(original[key].shape)}, expected {tuple(shape)}"
        for key, shape in expected.items()
        if key in original and original[key].shape != shape
    ]
    if wrong:
        problems.append("; ".join(wrong[:5]) + (f"; and {len(wrong) - 5} more" if len(wrong) > 5 else ""))
    if problems:
        raise ValueError(
            f"{checkpoint}: The checkpoint does not match the architecture its shapes describe: "
            f"{'. '.join(problems)}. Is the file complete, and a released ClipCap checkpoint?"
        )


def _listing(keys: list[str]) -> str:
    return f"key{'s' if len(keys) > 1 else ''} {_names(keys)}"


def _names(names: list[str], limit: int = 5) -> str:
    """The first `limit` of `names`, quoted, and how many more there are."""
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _to_original_name(name: str) -> str:
    for ours, original in ORIGINAL_PREFIXES.items():
        if name.startswith(ours):
            return original + name[len(ours) :]
    raise ValueError(f"No original name for {name!r}.")



# ----------------------------------------------------------------------------------------------------------------
# The original computation, straight from the checkpoint's tensors


def original_prefix(
    state: Mapping[str, torch.Tensor], layout: OriginalLayout, image_embeds: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """
    `ClipCaptionModel.clip_project(image_embeds)` of the official code, written with plain torch ops on the
    `clip_project.*` tensors: shape `(batch, prefix_length, n_embd)`.
    """
    batch = image_embeds.shape[0]

    def weight(name: str) -> torch.Tensor:
        return state["clip_project." + name].to(image_embeds.dtype)

    if layout.mapping_type == "mlp":
        hidden = torch.tanh(F.linear(image_embeds, weight("model.0.weight"), weight("model.0.bias")))
        return F.linear(hidden, weight("model.2.weight"), weight("model.2.bias")).view(batch, layout.prefix_length, -1)

    width = weight("prefix_const").shape[1]
    head_dim = width // num_heads
    projected = F.linear(image_embeds, weight("linear.weight"), weight("linear.bias")).view(batch, -1, width)
    hidden = torch.cat((projected, weight("prefix_const").expand(batch, -1, -1)), dim=1)
    length = hidden.shape[1]
    for index in range(layout.mapping_num_layers):
        layer = f"transformer.layers.{index}."
        normed = F.layer_norm(hidden, (width,), weight(layer + "norm1.weight"), weight(layer + "norm1.bias"))
        queries = F.linear(normed, weight(layer + "attn.to_queries.weight")).view(batch, length, num_heads, head_dim)
        keys_values = F.linear(normed, weight(layer + "attn.to_keys_values.weight"))
        keys, values = keys_values.view(batch, length, 2, num_heads, head_dim).unbind(dim=2)
        attention = (torch.einsum("bnhd,bmhd->bnmh", queries, keys) * head_dim**-0.5).softmax(dim=2)
        attended = torch.einsum("bnmh,bmhd->bnhd", attention, values).reshape(batch, length, width)
        hidden = hidden + F.linear(attended, weight(layer + "attn.project.weight"), weight(layer + "attn.project.bias"))
        normed = F.layer_norm(hidden, (width,), weight(layer + "norm2.weight"), weight(layer + "norm2.bias"))
        inner = F.relu(F.linear(normed, weight(layer + "mlp.fc1.weight"), weight(layer + "mlp.fc1.bias")))
        hidden = hidden + F.linear(inner, weight(layer + "mlp.fc2.weight"), weight(layer + "mlp.fc2.bias"))
    return hidden[:, layout.clip_length :]


@torch.no_grad()
def original_logits(
    state: Mapping[str, torch.Tensor],
    layout: OriginalLayout,
    image_embeds: torch.Tensor,
    input_ids: torch.LongTensor,
    normalize_prefix: bool,
    num_heads: int,
) -> torch.Tensor:
    """
    The official `ClipCaptionModel` forward in float64: the prefix from [`original_prefix`], then a `GPT2LMHeadModel`
    holding the checkpoint's `gpt.*` tensors, fed `[prefix; wte(input_ids)]` as `inputs_embeds`.
    """
    image_embeds = image_embeds.double()
    if normalize_prefix:  # the transformer release divides CLIP features by their norm when extracting them
        image_embeds = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
    prefix = original_prefix(state, layout, image_embeds, num_heads)
    gpt = AutoModelForCausalLM.from_config(layout.gpt2_config, attn_implementation="eager")
    gpt.load_state_dict({key[len("gpt.") :]: value for key, value in state.items() if key.startswith("gpt.")})
    gpt = gpt.double().eval()
    embeds = torch.cat((prefix, gpt.transformer.wte(input_ids)), dim=1)
    return gpt(inputs_embeds=embeds).logits


@torch.no_grad()
def _max_logits_delta(
    model: ClipCapForConditionalGeneration,
    state: Mapping[str, torch.Tensor],
    layout: OriginalLayout,
    num_heads: int,
) -> float:
    """Largest |logit difference| between our model and the original computation, on random inputs, in float64."""
    generator = torch.Generator().manual_seed(0)
    image_embeds = torch.randn(2, layout.prefix_dim, generator=generator, dtype=torch.float64)
    input_ids = torch.randint(0, layout.gpt2_config.vocab_size, (2, 6), generator=generator)
    expected = original_logits(state, layout, image_embeds, input_ids, model.config.normalize_prefix, num_heads)
    # float64 on both sides, so that any difference beyond rounding means a different computation. The round trip
    # float32 -> float64 -> float32 is exact.
    parts = (model.mapping_network, model.language_model)
    for part in parts:
        part.double()
    image_tokens = torch.full((2, layout.prefix_length), model.config.image_token_id)
    try:
        ours = model(image_embeds=image_embeds, input_ids=torch.cat((image_tokens, input_ids), dim=1)).logits
    finally:
        for part in parts:
            part.float()
    # On the original vocabulary: the image token's column is ours alone (and never generated).
    return (ours[..., : layout.gpt2_config.vocab_size] - expected).abs().max().item()


# ----------------------------------------------------------------------------------------------------------------
# Conversion


def convert_original_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    preset: str | None = None,
    *,
    vision_backend: str | None = None,
    vision_model: str | None = None,
    open_clip_pretrained: str | None = None,
    tokenizer: str = "gpt2",
    normalize_prefix: bool | None = None,
    mapping_num_heads: int | None = None,
    lm_num_heads: int | None = None,
    overwrite: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ConversionReport:
    r"""
    Convert a released ClipCap checkpoint into a ClipCap folder, after checking that the converted model computes what
    the original code computes.

    The mapper type, prefix length, `clip_length`, mapper depth, CLIP embedding width and GPT-2 size are read from the
    checkpoint's shapes. The preset supplies what the file does not record: the CLIP tower, `normalize_prefix` and
    the mapper's head count. Nothing is written unless every check passes; the folder appears at once, complete.

    Args:
        checkpoint (`str` or `Path`):
            The released `.pt` file, e.g. `coco_weights.pt`.
        output_dir (`str` or `Path`):
            Folder to create.
        preset (`str`, *optional*):
            `"coco-mlp"`, `"conceptual-mlp"` or `"coco-transformer"`. Defaults to `"coco-mlp"` or
            `"coco-transformer"`, after the checkpoint's mapper type.
        vision_backend (`str`, *optional*):
            `"clip"` (transformers' CLIP) or `"open_clip"`. Defaults to `"open_clip"` when `open_clip_pretrained` or a
            `"local-dir:"`/`"hf-hub:"` `vision_model` is given (neither means anything to HF CLIP), else to the
            preset's: HF CLIP ViT-B/32 for the MLP releases, open_clip RN50x4 for the transformer release.
        vision_model (`str`, *optional*):
            The vision tower, instead of the preset's: a CLIP checkpoint name or folder (`"clip"`), or an open_clip
            model name, `"local-dir:PATH"` or `"hf-hub:ORG/REPO"` (`"open_clip"`).
        open_clip_pretrained (`str`, *optional*):
            The open_clip pretrained tag for a built-in open_clip model name; selects the open_clip backend. Defaults
            to the preset's (`"openai"`) when `vision_model` is not given or names the preset's open_clip model;
            another built-in name needs it.
        tokenizer (`str`, *optional*, defaults to `"gpt2"`):
            The tokenizer name or folder.
        normalize_prefix (`bool`, *optional*):
            Override the preset's prefix normalisation.
        mapping_num_heads (`int`, *optional*):
            Override the transformer mapper's head count (8 in the official code); transformer mappers only.
        lm_num_heads (`int`, *optional*):
            GPT-2's head count, for a non-standard LM width (defaults to `n_embd // 64`).
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace an existing `output_dir` that an earlier conversion wrote, that holds nothing else and none of
            whose files was changed since (its `clipcap_conversion.json` lists what it wrote, with their sha256);
            never the current folder, one of its parents or a folder holding `checkpoint`. An empty `output_dir` is
            written without it.
        tolerance (`float`, *optional*, defaults to 1e-4):
            Largest |logit difference| allowed between the converted model and the original computation.

    Returns:
        [`ConversionReport`]: the folder, the config, the dropped obsolete keys and the measured logit difference.
    """
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, Path(checkpoint), overwrite)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")

    original = load_original_state_dict(checkpoint)
    dropped_keys = sorted(key for key in original if OBSOLETE_GPT2_KEY.fullmatch(key))
    for key in dropped_keys:
        del original[key]
    try:
        layout = infer_original_layout(original, lm_num_heads)
    except ValueError as error:
        raise ValueError(f"{checkpoint}: {error}") from None

    preset = preset or DEFAULT_PRESETS[layout.mapping_type]
    release = PRESETS[preset]
    if release.mapping_type != layout.mapping_type:
        matching = sorted(name for name, other in PRESETS.items() if other.mapping_type == layout.mapping_type)
        raise ValueError(
            f"{checkpoint}: Preset {preset!r} is a {release.mapping_type} release but the checkpoint has a "
            f"{layout.mapping_type} mapper; use one of {matching}."
        )
    # An open_clip pretrained tag, or a 'local-dir:' or 'hf-hub:' name, only makes sense for the open_clip backend,
    # whatever the preset's backend is.
    implies_open_clip = open_clip_pretrained is not None or (vision_model or "").startswith(OPEN_CLIP_SCHEMAS)
    backend = vision_backend or ("open_clip" if implies_open_clip else None)
    if vision_model is None:
        backend, vision_name, vision_tag = release.vision_tower(preset, backend)
        vision_tag = open_clip_pretrained or vision_tag
    else:
        backend = backend or release.vision_tower(preset)[0]
        vision_name, vision_tag = vision_model, open_clip_pretrained
        if backend == "open_clip" and vision_tag is None and not vision_name.startswith(OPEN_CLIP_SCHEMAS):
            vision_tag = _preset_open_clip_tag(preset, release, vision_name)
    num_heads = release.mapping_num_heads if mapping_num_heads is None else mapping_num_heads
    if mapping_num_heads is not None:  # checked before anything is loaded
        if layout.mapping_type != "transformer":
            raise ValueError(
                f"`mapping_num_heads` (--mapping-num-heads) sets a transformer mapper's heads, and {checkpoint} has an "
                "MLP mapper; leave it out."
            )
        width = layout.gpt2_config.n_embd
        if not isinstance(mapping_num_heads, int) or mapping_num_heads < 1 or width % mapping_num_heads:
            raise ValueError(
                f"`mapping_num_heads` (--mapping-num-heads) must be a positive integer that divides the width of "
                f"{checkpoint}'s mapper ({width}), got {mapping_num_heads!r}; the official code uses "
                f"{release.mapping_num_heads}."
            )

    # The tokenizer first: it is small, and checked against the checkpoint before the vision tower is downloaded.
    # (A folder with some of a tokenizer's files makes AutoTokenizer raise one of several kinds, naming nothing.)
    tokenizer_errors = (ValueError, TypeError, KeyError)
    check_pretrained_source(tokenizer, "`tokenizer` (--tokenizer)", TOKENIZER_FILES)
    with _naming_failed_part("tokenizer", tokenizer, "`tokenizer` (--tokenizer)", also=tokenizer_errors):
        text_tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=False)
    stop_token_ids = _original_stop_token_ids(text_tokenizer, tokenizer, layout.gpt2_config)
    if backend == "clip" and vision_name.startswith(OPEN_CLIP_SCHEMAS):
        raise ValueError(
            f"The vision model {vision_name!r} names an open_clip model, which vision_backend='clip' "
            "(--vision-backend clip) does not read; leave the backend out, or set it to 'open_clip'."
        )
    if backend == "clip":  # open_clip names are no Hub ids (open_clip downloads its own weights)
        check_pretrained_source(vision_name, "`vision_model` (--vision-model)")
    with _naming_failed_part("vision model", vision_name, "`vision_model` (--vision-model)"):
        if backend == "clip":
            _require_clip_tower(vision_name, preset, release)  # before its weights are downloaded
        vision_tower, config_fields = load_pretrained_vision_model(vision_name, backend, vision_tag)
        image_processor = ClipCapImageProcessor.from_vision_pretrained(vision_name, backend, vision_tag)
    processor = ClipCapProcessor(image_processor, text_tokenizer, num_image_tokens=layout.prefix_length)
    # What the source tower makes of some pixels; the written folder must reproduce it (`_check_reload`).
    side = image_processor.crop_size
    pixel_values = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(2))
    source_image_embeds = _tower_image_embeds(vision_tower.eval(), pixel_values)
    if layout.mapping_type == "transformer":
        config_fields.update(
            clip_length=layout.clip_length, mapping_num_layers=layout.mapping_num_layers, mapping_num_heads=num_heads
        )
    config = ClipCapConfig(
        **config_fields,
        text_config=copy.deepcopy(layout.gpt2_config),  # the model lengthens its vocabulary by the image token
        mapping_type=layout.mapping_type,
        prefix_length=layout.prefix_length,
        normalize_prefix=release.normalize_prefix if normalize_prefix is None else normalize_prefix,
        image_token_id=processor.image_token_id,
    )
    if config.prefix_dim != layout.prefix_dim:
        raise ValueError(
            f"The checkpoint's mapper reads {layout.prefix_dim}-d CLIP embeddings but the vision tower {vision_name!r} "
            f"produces {config.prefix_dim}-d ones; use the tower the checkpoint was trained with (preset "
            f"{preset!r}: {release.vision_tower(preset)[1]})."
        )

    model = ClipCapForConditionalGeneration(config, vision_model=vision_tower).eval()
    # The model's vocabulary holds the image token after GPT-2's (zero embeddings); the file's has GPT-2's alone.
    vocab_size = layout.gpt2_config.vocab_size
    ours = {_to_original_name(name): tensor for name, tensor in model.state_dict().items()
            if not name.startswith("vision_model.")}
    expected = {name: tensor[:vocab_size].shape if name in VOCABULARY_KEYS else tensor.shape
                for name, tensor in ours.items()}
    _check_keys_and_shapes(checkpoint, original, expected)
    with torch.no_grad():
        for name, tensor in ours.items():
            source = original.get(name)
            if source is not None:  # GPT-2's tied `lm_head.weight` is the same tensor as `wte`
                tensor[: source.shape[0]].copy_(source)

    delta = _max_logits_delta(model, original, layout, num_heads)
    if not delta <= tolerance:  # also catches NaN
        raise ValueError(
            f"Verification failed: the converted model's logits differ from the original computation by up to "
            f"{delta:.3g} (> {tolerance:g}); nothing was written. A checkpoint damaged in its download can hold "
            "weights large enough for this (the legacy format has no checksums to tell): download it again. If it "
            "fails again, the converter is at fault: please report it, naming the checkpoint."
        )

    eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=eos_token_id,
        eos_token_id=stop_token_ids,
        pad_token_id=eos_token_id,
        max_new_tokens=ORIGINAL_MAX_NEW_TOKENS,
    )
    checkpoint_sha256 = _sha256(Path(checkpoint))
    card = _model_card(Path(checkpoint), checkpoint_sha256, preset, release, config, vision_name, vision_tag, delta,
                       stop_token_ids[0])
    record = {"checkpoint": Path(checkpoint).name, "checkpoint_sha256": checkpoint_sha256, "preset": preset,
              "max_logits_delta": delta}
    _write_atomically(
        output_dir,
        model,
        processor,
        card,
        record,
        verify=lambda folder: _check_reload(folder, model, tolerance, pixel_values, source_image_embeds),
    )
    return ConversionReport(output_dir, preset, config, dropped_keys, delta)


def _preset_open_clip_tag(preset: str, release: OriginalRelease, model_name: str) -> str:
    """The pretrained tag of a built-in open_clip `model_name`: the preset's, if it is the preset's open_clip model."""
    preset_name, preset_tag = release.vision_models.get("open_clip", (None, None))
    if model_name != preset_name or preset_tag is None:
        raise ValueError(
            f"The open_clip model {model_name!r} needs a pretrained tag, which only the preset's own open_clip model "
            f"({preset!r}: {preset_name or 'none'}) has by default; pass `open_clip_pretrained` "
            "(--open-clip-pretrained), e.g. openai, or name a 'local-dir:' or 'hf-hub:' model."
        )
    return preset_tag


@contextlib.contextmanager
def _naming_failed_part(part: str, name: str, option: str, also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """
    Re-raise a failure to load a part (transformers' offline error, for one, names neither the part nor the option
    that chooses it) with the part, its name and the option; the original message stays in the text. `also`: more
    kinds of error to name so.
    """
    try:
        yield
    # transformers 4.57 lets huggingface_hub's ValueError for a name that is neither a folder nor a repo id through.
    except (OSError, HFValidationError, *also) as error:
        # The nearest built-in OSError class (FileNotFoundError, PermissionError...), for callers that catch it;
        # library subclasses may not take a plain message.
        error_type = next((kind for kind in type(error).__mro__ if kind.__module__ == "builtins"), OSError)
        error_type = error_type if issubclass(error_type, OSError) else OSError
        offline_advice = "" if can_only_be_a_folder(name) else "; without network access, give a local folder"
        raise error_type(
            f"Could not load the {part} {name!r}: {str(error).strip().rstrip('.')}. Choose the {part} with "
            f"{option}{offline_advice}."
        ) from error


def _require_clip_tower(vision_name: str, preset: str, release: OriginalRelease) -> None:
    """
    Refuse a transformers tower that is not a CLIP (SigLIP, ViT, DINOv2...). The released mappers were trained on CLIP's
    projected image embeddings; another tower's embeddings mean nothing to them, even where the widths happen to
    match, so such a conversion could only produce nonsense captions.
    """
    model_type = AutoConfig.from_pretrained(vision_name, trust_remote_code=False).model_type
    if model_type not in CLIP_MODEL_TYPES:
        raise ValueError(
            f"The vision tower {vision_name!r} is a {model_type!r} model, not a CLIP: the released mappers read the "
            f"embeddings of the CLIP they were trained with (preset {preset!r}: {release.vision_tower(preset)[1]}), "
            "and another tower's embeddings mean nothing to them. Give that CLIP with `vision_model` "
            "(--vision-model); to caption with another tower, train a ClipCap model on it (clipcap train)."
        )


@torch.no_grad()
def _tower_image_embeds(tower: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projected image embedding from a CLIP tower [`load_pretrained_vision_model`] returned, of either backend."""
    output = tower(pixel_values=pixel_values)
    return output if isinstance(output, torch.Tensor) else output.image_embeds


def _original_stop_token_ids(tokenizer, tokenizer_name: str, gpt2_config: GPT2Config) -> list[int]:
    """
    The '.' token the original decoders stop at, then the end-of-text token, which we also stop at. Sets the GPT-2
    config's BOS/EOS to the tokenizer's, and checks that the tokenizer fits the checkpoint's vocabulary: as large, or
    smaller by no more than padding explains ([`_padding_explains`]).
    """
    if len(tokenizer) > gpt2_config.vocab_size:
        raise ValueError(
            f"The tokenizer {tokenizer_name!r} has {len(tokenizer)} tokens but the checkpoint's GPT-2 embeds only "
            f"{gpt2_config.vocab_size}; use the tokenizer the checkpoint was trained with (GPT-2's)."
        )
    if not _padding_explains(len(tokenizer), gpt2_config.vocab_size):
        raise ValueError(
            f"The tokenizer {tokenizer_name!r} has {len(tokenizer)} tokens but the checkpoint's GPT-2 embeds "
            f"{gpt2_config.vocab_size}, more than padding its vocabulary (to a multiple of 64, say) would add: the "
            "checkpoint was trained with another tokenizer. Use that one (GPT-2's, for the released checkpoints)."
        )
    if len(tokenizer) < gpt2_config.vocab_size:
        logger.warning(
            f"The checkpoint's GPT-2 embeds {gpt2_config.vocab_size} tokens and the tokenizer {tokenizer_name!r} has "
            f"{len(tokenizer)}: the image token takes row {len(tokenizer)}, which no token of this tokenizer uses. If "
            "the checkpoint was trained with a larger tokenizer, use that one."
        )
    stop_ids = tokenizer(ORIGINAL_STOP_TOKEN, add_special_tokens=False)["input_ids"]
    if len(stop_ids) != 1:
        raise ValueError(
            f"The tokenizer {tokenizer_name!r} splits {ORIGINAL_STOP_TOKEN!r} into {stop_ids}; the original decoders "
            "stop at a single '.' token (GPT-2's id 13). Use GPT-2's tokenizer."
        )
    gpt2_config.bos_token_id = gpt2_config.eos_token_id = tokenizer.eos_token_id
    return stop_ids if tokenizer.eos_token_id is None else [stop_ids[0], tokenizer.eos_token_id]


def _padding_explains(tokens: int, vocab_size: int) -> bool:
    """
    Whether a vocabulary of `vocab_size` rows can be that of a `tokens`-token tokenizer: the same size, or that size
    rounded up to a multiple of a power of two of at most `MAX_VOCABULARY_PADDING_MULTIPLE`.
    """
    largest_power_of_two = vocab_size & -vocab_size  # that divides `vocab_size`
    return 0 <= vocab_size - tokens < min(largest_power_of_two, MAX_VOCABULARY_PADDING_MULTIPLE)


def _check_output_dir(output_dir: Path, checkpoint: Path, overwrite: bool) -> None:
    """
    A new or empty `output_dir` is written. An existing one is replaced only with `overwrite`, and only if an earlier
    conversion wrote it, nothing else was put there since and none of its files was changed (a model card edited
    for publishing, say): a folder that merely holds a ClipCap model may be a training run's, with checkpoints and notes
    that replacing it would delete. The files of a conversion whose record has no sha256 (by an earlier version) are
    replaced as they are.
    """
    # Checked before the work: the folder is written whole beside itself at the end (`write_folder_atomically`).
    check_output_folder(output_dir, "`output_dir` (--output)", "write the converted model to", written_beside=True)
    if not output_dir.exists():
        return
    resolved, cwd = output_dir.resolve(), Path.cwd()
    if resolved == cwd or resolved in cwd.parents:  # replaced whole, it would be pulled from under the shell too
        raise ValueError(
            f"Refusing to write {output_dir}: it is the current folder or one of its parents, and the converted model "
            "replaces the folder whole; name a new folder (e.g. --output clipcap-model)."
        )
    entries = sorted(child.name for child in output_dir.iterdir())
    if not entries:  # e.g. made beforehand: as good as a new folder
        return
    if not overwrite:
        raise ValueError(f"{output_dir} already exists; remove it or pass overwrite=True (--overwrite).")
    if resolved in checkpoint.resolve().parents:
        raise ValueError(f"Refusing to replace {output_dir}: it holds the checkpoint {checkpoint}.")
    record = _conversion_record(output_dir)
    if record is None:
        raise ValueError(
            f"Refusing to replace {output_dir}: overwrite=True (--overwrite) only replaces a folder that an earlier "
            f"conversion wrote, and it has no {CONVERSION_RECORD} (the conversion's list of its files); it holds "
            f"{_names(entries)}. Remove it yourself or choose another folder."
        )
    written, sha256 = record
    unexpected = [name for name in entries if name not in written]
    if unexpected:
        raise ValueError(
            f"Refusing to replace {output_dir}: it holds {_names(unexpected)}, which the earlier conversion did not "
            "write and replacing the folder would delete. Move them elsewhere or choose another folder."
        )
    # A file removed since is not lost: the conversion writes it again.
    changed = [name for name in entries if name in sha256 and _changed(output_dir / name, sha256[name])]
    if changed:
        them = "it" if len(changed) == 1 else "them"
        raise ValueError(
            f"Refusing to replace {output_dir}: {_names(changed)} changed since the earlier conversion wrote {them}, "
            f"and replacing the folder would lose the changes. Move {them} out of the folder to keep {them} (or delete "
            f"{them} to discard the changes), then convert again; or choose another folder."
        )


def _conversion_record(folder: Path) -> tuple[set[str], dict[str, str]] | None:
    """
    The names that the conversion which wrote `folder` put there, and the sha256 of each of its files (none in the
    record of an earlier version), from its record; None without a valid record.
    """
    try:
        record = read_json(folder / CONVERSION_RECORD)
        files, sha256 = record["files"], record.get("sha256", {})
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # no record, not JSON, not the record's shape
        return None
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return None
    if not isinstance(sha256, dict) or not all(isinstance(digest, str) for digest in sha256.values()):
        return None
    return {*files, CONVERSION_RECORD}, sha256


def _changed(path: Path, sha256: str) -> bool:
    """Whether the entry `path`, a file a conversion wrote with this sha256, was changed since (it writes no links)."""
    return path.is_symlink() or not path.is_file() or _sha256(path) != sha256


def _write_atomically(
    output_dir: Path,
    model: ClipCapForConditionalGeneration,
    processor: ClipCapProcessor,
    card: str,
    record: dict[str, Any],
    verify: Callable[[Path], None],
) -> None:
    """
    Write the model, the processor, the model card and `record` (to which the folder's files and their sha256 are
    added, for a later `overwrite`), `verify` them, and only then put them in place as `output_dir`
    (`write_folder_atomically`: an earlier conversion there, or an empty folder, stays until then, and stays if
    anything fails).
    """

    def write(staging: Path) -> None:
        save_pretrained(staging, model, processor)
        (staging / "README.md").write_text(card, encoding="utf-8")
        files = sorted(child.name for child in staging.iterdir())
        sha256 = {name: _sha256(staging / name) for name in files}
        (staging / CONVERSION_RECORD).write_text(
            json.dumps({**record, "files": files, "sha256": sha256}, indent=2) + "\n", encoding="utf-8"
        )
        verify(staging)

    write_folder_atomically(output_dir, write)  # `_check_output_dir` checked it: empty, or replaced with `overwrite`


@torch.no_grad()
def _check_reload(
    folder: Path,
    model: ClipCapForConditionalGeneration,
    tolerance: float,
    pixel_values: torch.Tensor,
    source_image_embeds: torch.Tensor,
) -> None:
    """
    The written folder loads back into the same model (e.g. no weight lost to tying or sharding), and its vision tower
    still embeds `pixel_values` as the source tower did (`source_image_embeds`), which the logits check, fed image
    embeddings, cannot see.
    """
    reloaded = ClipCapForConditionalGeneration.from_pretrained(folder, trust_remote_code=False).eval()
    image_embeds = torch.randn(1, model.config.prefix_dim, generator=torch.Generator().manual_seed(1))
    input_ids = torch.tensor([[model.config.image_token_id] * model.config.prefix_length + [0, 1, 2]])
    delta = (reloaded(image_embeds=image_embeds, input_ids=input_ids).logits
             - model(image_embeds=image_embeds, input_ids=input_ids).logits).abs().max().item()
    if not delta <= tolerance:
        raise ValueError(
            f"The written folder {folder} does not load back into the converted model (|delta| {delta:.3g})."
        )
    vision_delta = (reloaded.get_image_embeds(pixel_values) - source_image_embeds).abs().max().item()
    if not vision_delta <= tolerance:
        raise ValueError(
            f"The written folder {folder} does not reproduce the source vision tower: its image embeddings differ by "
            f"up to {vision_delta:.3g} (> {tolerance:g}); nothing was written."
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_card(
    checkpoint: Path,
    checkpoint_sha256: str,
    preset: str,
    release: OriginalRelease,
    config: ClipCapConfig,
    vision_name: str,
    vision_tag: str | None,
    delta: float,
    stop_id: int,
) -> str:
    """A model card stub for the converted folder; model_card.md in the clipcap_hf repository is the full card."""
    tower = f"{vision_name} ({config.vision_backend}{', ' + vision_tag if vision_tag else ''})"
    mapper = f"{config.mapping_type}, prefix length {config.prefix_length}"
    if config.mapping_type == "transformer":
        mapper += f", clip_length {config.clip_length}, {config.mapping_num_layers} layers"
    return f"""---
library_name: transformers
pipeline_tag: image-to-text
license: mit
tags:
- clipcap
- image-captioning
- clip
- gpt2
datasets:
- {release.dataset}
---

# ClipCap ({preset}), converted from the original release

The `{preset}` checkpoint of [ClipCap: CLIP Prefix for Image Captioning](https://arxiv.org/abs/2111.09734)
({OFFICIAL_CODE_URL}), converted with `clipcap convert-original` from the `clipcap_hf` package.

- Source file: `{checkpoint.name}`, sha256 `{checkpoint_sha256}`
- CLIP image encoder: {tower}; prefix normalisation: {config.normalize_prefix}
- Mapping network: {mapper}
- Language model: GPT-2, {config.text_config.n_layer} layers, width {config.text_config.n_embd}
- Verified before writing: the converted model's logits equal the original computation from the same tensors
  within {delta:.2g} (float64, random inputs).

## Usage

```python
import clipcap_hf  # registers ClipCap with the transformers Auto classes
from PIL import Image
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("REPO_ID").eval()
processor = AutoProcessor.from_pretrained("REPO_ID")
inputs = processor(images=[Image.open("photo.jpg")])
print(processor.batch_decode(model.generate(**inputs), skip_special_tokens=True))
```

Without the package installed, pass `trust_remote_code=True`: the folder carries the model code.

## Decoding

The generation config follows the original greedy decoder: at most {ORIGINAL_MAX_NEW_TOKENS} new tokens, stopping
at "." (token {stop_id}) or at the end-of-text token. The original beam search is closest to
`model.generate(**inputs, num_beams=5, length_penalty=1.0, eos_token_id={stop_id})`; the two rank unfinished beams
differently, so captions can differ.
"""


__all__ = ["PRESETS", "ConversionReport", "convert_original_checkpoint", "load_original_state_dict"]
