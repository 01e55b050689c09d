"""Quantized language models: int8 weight-only on the CPU (torchao), bitsandbytes 8-/4-bit and QLoRA (CUDA only)."""

import importlib.util

import pytest
import torch
import transformers
from conftest import PREFIX_LENGTH, captioning_model, random_images
from transformers import BitsAndBytesConfig
from transformers.pytorch_utils import Conv1D

from clipcap_hf.utils.quantization import (
    NOT_QUANTIZED_MODULES,
    bitsandbytes_config,
    conv1d_to_linear,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes 8-/4-bit needs a CUDA GPU")


@pytest.fixture
def pixel_values(processor):
    return processor(images=random_images(6, seed=3))["pixel_values"]


@torch.no_grad()
def test_conv1d_to_linear_keeps_the_logits(tokenizer, pixel_values):
    model = captioning_model(tokenizer)
    input_ids = torch.tensor([[model.config.image_token_id] * PREFIX_LENGTH + [5, 9]] * len(pixel_values))
    expected = model(input_ids=input_ids, pixel_values=pixel_values).logits
    conv1d_to_linear(model.language_model)
    assert not any(isinstance(module, Conv1D) for module in model.modules())
    torch.testing.assert_close(model(input_ids=input_ids, pixel_values=pixel_values).logits, expected)


@torch.no_grad()
def test_int8_weight_only_quantizes_only_the_language_model_layers(tokenizer, pixel_values):
    pytest.importorskip("torchao", reason="torchao is not installed (pip install torchao)")
    from clipcap_hf.utils.quantization import quantize_int8_weight_only

    model = captioning_model(tokenizer)
    reference = captioning_model(tokenizer)
    quantize_int8_weight_only(model)
    quantized = {name for name, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear) and type(module.weight) is not torch.nn.Parameter}
    assert quantized and all(name.startswith("language_model.transformer.h.") for name in quantized)
    assert len(quantized) == 4 * model.config.text_config.n_layer  # c_attn, c_proj, c_fc, mlp.c_proj per block
    image_tokens = torch.full((len(pixel_values), PREFIX_LENGTH), model.config.image_token_id)
    logits = model(input_ids=image_tokens, pixel_values=pixel_values).logits
    expected = reference(input_ids=image_tokens, pixel_values=pixel_values).logits
    assert not torch.equal(logits, expected)
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()
    generated = model.generate(pixel_values=pixel_values, do_sample=False, max_new_tokens=8)
    assert generated.shape[0] == len(pixel_values) and (generated[:, PREFIX_LENGTH:] >= 0).all()
    with pytest.raises(ValueError) as error:  # a second call (a notebook cell run again): torchao failed bare
        quantize_int8_weight_only(model)
    assert str(error.value) == (
        "This model's language model is already quantized (quantize_int8_weight_only): use it as it is."
    )
    assert torch.equal(model(input_ids=image_tokens, pixel_values=pixel_values).logits, logits)


# What save_pretrained says of a model converted for inference, after naming the conversion.
NOT_SAVED = (r" \(clipcap_hf\.utils\.quantization\), and from_pretrained would not load its saved weights back\. Save "
             r"the full-precision model, before converting it, and convert it again after loading it\.$")


def test_a_model_with_linear_layers_for_conv1d_is_not_saved(tokenizer, tmp_path):
    # Saved, its nn.Linear weights, stored (out, in), would be read back as Conv1D's (in, out): refused, unwritten.
    model = conv1d_to_linear(captioning_model(tokenizer))
    with pytest.raises(ValueError, match="^Cannot save this model: its Conv1D layers were turned into nn.Linear by "
                                         "conv1d_to_linear" + NOT_SAVED):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_an_int8_quantized_model_is_not_saved(tokenizer, tmp_path):
    pytest.importorskip("torchao", reason="torchao is not installed (pip install torchao)")
    from clipcap_hf.utils.quantization import quantize_int8_weight_only

    model = quantize_int8_weight_only(captioning_model(tokenizer))
    with pytest.raises(ValueError, match="^Cannot save this model: its language model was quantized by "
                                         "quantize_int8_weight_only" + NOT_SAVED):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_bitsandbytes_config_quantizes_the_language_model_only():
    if int(transformers.__version__.split(".")[0]) < 5:  # 4.57's config reads the installed version
        pytest.importorskip("bitsandbytes", reason="transformers 4.57's BitsAndBytesConfig needs bitsandbytes")
    config = bitsandbytes_config(4)
    assert isinstance(config, BitsAndBytesConfig) and config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.llm_int8_skip_modules == NOT_QUANTIZED_MODULES
    assert bitsandbytes_config(8).load_in_8bit
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        bitsandbytes_config(2)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_without_bitsandbytes_the_config_and_loading_name_the_package_to_install(tokenizer, tmp_path):
    from clipcap_hf.utils.quantization import load_quantized

    message = r"^8- and 4-bit loading needs bitsandbytes: pip install bitsandbytes$"
    if int(transformers.__version__.split(".")[0]) < 5:  # 4.57's 4-bit config reads the installed version
        with pytest.raises(ImportError, match=message):
            bitsandbytes_config(4)
    else:
        assert bitsandbytes_config(4).load_in_4bit
    assert bitsandbytes_config(8).load_in_8bit  # read by loading alone
    captioning_model(tokenizer).save_pretrained(tmp_path)
    with pytest.raises(ImportError, match=message):
        load_quantized(tmp_path, 4)


@needs_cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_loading_captions_like_full_precision(bits, tokenizer, processor, pixel_values, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")
    from clipcap_hf.utils.quantization import load_quantized

    model = captioning_model(tokenizer)
    model.save_pretrained(tmp_path)
    quantized = load_quantized(tmp_path, bits, device_map={"": 0})
    kinds = {type(module).__name__ for module in quantized.language_model.modules()}
    assert ("Linear8bitLt" if bits == 8 else "Linear4bit") in kinds
    assert type(quantized.mapping_network.model[0]) is torch.nn.Linear  # not quantized
    with torch.no_grad():
        expected = model.cuda().generate(pixel_values=pixel_values.cuda(), do_sample=False, max_new_tokens=8)
        generated = quantized.generate(pixel_values=pixel_values.cuda(), do_sample=False, max_new_tokens=8)
    agreement = (generated[:, PREFIX_LENGTH:] == expected[:, PREFIX_LENGTH:]).float().mean()
    assert agreement > 0.5, f"only {agreement:.0%} of the {bits}-bit model's tokens match full precision"


@needs_cuda
def test_qlora_trains_adapters_and_mapper_only(tokenizer, processor, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")
    from clipcap_hf.training.arguments import ModelArguments
    from clipcap_hf.training.lora import add_lora
    from clipcap_hf.utils.quantization import load_quantized

    captioning_model(tokenizer).save_pretrained(tmp_path)
    model = add_lora(load_quantized(tmp_path, 4, device_map={"": 0}), ModelArguments(use_lora=True))
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name or "mapping_network" in name for name in trainable)
    batch = processor(images=random_images(2), captions=["A dog runs.", "Two cats sleep!"]).to("cuda")
    before = {name: p.detach().clone() for name, p in model.named_parameters() if name in trainable}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if name in before and not torch.equal(p, before[name])}
    assert any("lora_B" in name for name in changed) and any("mapping_network" in name for name in changed)
