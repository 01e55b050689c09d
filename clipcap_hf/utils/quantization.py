"""Quantized language models: bitsandbytes 8-/4-bit loading (GPU) and int8 weight-only quantization (CPU, torchao).

Only the language model is quantized. The CLIP tower is small next to it and its embedding is what the mapper was
trained on; the mapping network trains in full (QLoRA's `modules_to_save`); the LM head is skipped because GPT-2-style
models tie it to the token embeddings, which the prefix vectors live beside.
"""

from __future__ import annotations

import importlib.metadata
import os

import torch
import transformers
from torch import nn

from ..modeling_clipcap import ClipCapForConditionalGeneration

# Module names (as transformers' quantizers match them: any part of the dotted name) that stay in full precision.
NOT_QUANTIZED_MODULES = ["vision_model", "mapping_network", "lm_head"]

# Set on each module `conv1d_to_linear` and `quantize_int8_weight_only` convert, saying how:
# `ClipCapForConditionalGeneration.save_pretrained` refuses a model holding one, whose files would not load back as
# the model (Linear weights under Conv1D names, transposed; torchao's int8 tensors, which safetensors cannot write).
# The name is written out there too: the model code cannot import this module (see modeling_clipcap.save_pretrained).
CONVERTED_FOR_INFERENCE = "_clipcap_converted_for_inference"

_NEEDS_BITSANDBYTES = "8- and 4-bit loading needs bitsandbytes: pip install bitsandbytes"


def bitsandbytes_config(bits: int, compute_dtype: torch.dtype = torch.bfloat16):
    """
    A `BitsAndBytesConfig` for `from_pretrained(quantization_config=...)`: the language model's linear layers in 8-bit
    (LLM.int8()) or 4-bit NF4 with double quantization (QLoRA's setting), everything else in full precision.
    """
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=NOT_QUANTIZED_MODULES)
    if bits == 4:
        try:
            return BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute_dtype,
                llm_int8_skip_modules=NOT_QUANTIZED_MODULES,
            )
        except importlib.metadata.PackageNotFoundError as error:  # transformers 4.x's reads bitsandbytes' version
            raise ImportError(_NEEDS_BITSANDBYTES) from error
    raise ValueError(f"bits must be 8 or 4 (bitsandbytes' LLM.int8() or NF4), got {bits!r}.")


def load_quantized(
    name_or_path: str | os.PathLike, bits: int, device_map: str | dict = "auto"
) -> ClipCapForConditionalGeneration:
    """A saved ClipCap with its language model loaded in 8 or 4 bits by bitsandbytes (needs a CUDA GPU)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError(_NEEDS_BITSANDBYTES) from error
    if not torch.cuda.is_available():
        raise ValueError("8- and 4-bit loading with bitsandbytes needs a CUDA GPU; on the CPU use "
                         "quantize_int8_weight_only(model).")
    return ClipCapForConditionalGeneration.from_pretrained(
        name_or_path, quantization_config=bitsandbytes_config(bits), device_map=device_map, trust_remote_code=False
    )


def conv1d_to_linear(module: nn.Module) -> nn.Module:
    """
    Replace, in place, every `transformers` Conv1D (GPT-2's linear layers, weight stored (in, out)) under `module` with
    the equal `nn.Linear`, which quantizers know. Returns `module`. For inference only: `save_pretrained` refuses a
    model so converted (`from_pretrained` would read its `nn.Linear` weights as Conv1D ones, transposed); save the
    model before converting it.
    """
    for name, child in list(module.named_children()):
        if isinstance(child, transformers.pytorch_utils.Conv1D):
            linear = nn.Linear(child.weight.shape[0], child.weight.shape[1], device=child.weight.device,
                               dtype=child.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(child.weight.t())
                linear.bias.copy_(child.bias)
            linear.requires_grad_(child.weight.requires_grad)
            setattr(linear, CONVERTED_FOR_INFERENCE, "its Conv1D layers were turned into nn.Linear by conv1d_to_linear")
            setattr(module, name, linear)
        else:
            conv1d_to_linear(child)
    return module


def quantize_int8_weight_only(model: ClipCapForConditionalGeneration) -> ClipCapForConditionalGeneration:
    """
    int8 weight-only quantization of the language model's linear layers (its LM head excepted), in place, with
    torchao: weights stored as int8 with a scale per output channel, activations kept in floating point. For CPU
    inference; GPT-2's Conv1D layers are first turned into `nn.Linear` ([`conv1d_to_linear`]). `save_pretrained`
    refuses the quantized model: save the full-precision one, and quantize it again after loading it.
    """
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as error:
        raise ImportError("int8 weight-only quantization needs torchao: pip install torchao") from error
    language_model = model.language_model
    if hasattr(language_model, CONVERTED_FOR_INFERENCE):  # torchao would fail on its own int8 weights, naming none
        raise ValueError(
            "This model's language model is already quantized (quantize_int8_weight_only): use it as it is."
        )
    conv1d_to_linear(language_model)
    output_layer = model.get_output_embeddings()
    quantize_(
        language_model,
        Int8WeightOnlyConfig(),
        filter_fn=lambda module, _: isinstance(module, nn.Linear) and module is not output_layer,
    )
    setattr(language_model, CONVERTED_FOR_INFERENCE, "its language model was quantized by quantize_int8_weight_only")
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether transformers loaded `model` quantized (bitsandbytes and the like)."""
    return bool(getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None))
