"""ONNX export (`clipcap export-onnx`) and the ONNX Runtime captioner: the graphs against the PyTorch model."""

import json
import logging
import os
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
import transformers
from conftest import PREFIX_LENGTH, captioning_model, random_images, tiny_model, tiny_processor

from clipcap_hf.commands import main
from clipcap_hf.modeling_clipcap import CACHE_NAME

onnxruntime = pytest.importorskip("onnxruntime", reason='onnxruntime is not installed (pip install -e ".[onnx]")')
pytest.importorskip("onnxscript", reason='onnxscript is not installed (pip install -e ".[onnx]")')

from clipcap_hf.onnx import GRAPHS, OnnxCaptioner, caption_agreement, export_onnx
from clipcap_hf.onnx.export import (
    MergedDecoder,
    cache_shape,
    past_names,
    quantize_graphs,
)

TOLERANCE = 1e-4
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def captioner(onnx_export):
    return OnnxCaptioner(onnx_export[2])


@pytest.fixture(scope="module")
def test_pixels(processor):
    return processor(images=random_images(8, seed=1))["pixel_values"]


def test_export_writes_the_transformers_js_layout(onnx_export):
    import onnx

    model, _, exported = onnx_export
    for name in GRAPHS:
        assert (exported / "onnx" / f"{name}.onnx").is_file()
        assert (exported / "onnx" / f"{name}_quantized.onnx").is_file()
    for name in ("config.json", "generation_config.json", "processor_config.json", "tokenizer.json"):
        assert (exported / name).is_file(), name
    assert not list(exported.glob("*.safetensors"))  # the weights are in the graphs only
    assert json.loads((exported / "config.json").read_text())["prefix_length"] == model.config.prefix_length

    decoder = onnxruntime.InferenceSession(str(exported / "onnx" / "decoder_model_merged.onnx"))
    num_layers = model.config.text_config.num_hidden_layers
    inputs = {graph_input.name: graph_input.shape for graph_input in decoder.get_inputs()}
    assert list(inputs) == ["inputs_embeds", "attention_mask", "position_ids", *past_names(num_layers)]
    assert inputs["past_key_values.0.key"][2] == "past_sequence_length"  # one graph for every step
    assert [output.name for output in decoder.get_outputs()] == ["logits", *past_names(num_layers, "present")]
    # transformers.js's optional input, left out of the inputs a caller must feed (it has a default), in both graphs.
    for graph in ("decoder_model_merged.onnx", "decoder_model_merged_quantized.onnx"):
        initializers = onnx.load(str(exported / "onnx" / graph)).graph.initializer
        default = next(initializer for initializer in initializers if initializer.name == "num_logits_to_keep")
        assert onnx.numpy_helper.to_array(default) == 0  # every position's logits, as before the input existed
    assert [i.name for i in decoder.get_overridable_initializers()] == ["num_logits_to_keep"]


@torch.no_grad()
def test_image_graphs_match_pytorch(onnx_export, captioner, test_pixels):
    model = onnx_export[0]
    expected = model.get_prefix_embeds(pixel_values=test_pixels).numpy()
    np.testing.assert_allclose(captioner.prefix_embeds(pixel_values=test_pixels.numpy()), expected, atol=TOLERANCE)
    image_embeds = model.get_image_embeds(test_pixels)
    expected = model.get_prefix_embeds(image_embeds=image_embeds).numpy()
    np.testing.assert_allclose(captioner.prefix_embeds(image_embeds=image_embeds.numpy()), expected, atol=TOLERANCE)
    input_ids = torch.tensor([[5, 17, 2], [40, 0, 299]])
    expected = model.get_input_embeddings()(input_ids).numpy()
    np.testing.assert_allclose(captioner.embed_tokens(input_ids.numpy()), expected, atol=TOLERANCE)


@torch.no_grad()
def test_decoder_logits_match_pytorch_at_the_first_and_cached_steps(onnx_export, captioner, processor, test_pixels):
    model = onnx_export[0]
    tokens = torch.tensor([[7, 31, 120]] * len(test_pixels))
    image_tokens = torch.full((len(test_pixels), PREFIX_LENGTH), model.config.image_token_id)
    expected = model(input_ids=torch.cat((image_tokens, tokens), 1), pixel_values=test_pixels).logits.numpy()

    prefix = captioner.prefix_embeds(pixel_values=test_pixels.numpy())
    # Without `num_logits_to_keep` fed (as the browser page and transformers.js call it), every position's logits.
    logits, state = captioner.decode(prefix, captioner.empty_state(len(prefix)))  # first step: empty past
    np.testing.assert_allclose(logits, expected[:, :PREFIX_LENGTH], atol=TOLERANCE)
    last_logits, last_state = captioner.decode(prefix, captioner.empty_state(len(prefix)), last_logits_only=True)
    np.testing.assert_allclose(last_logits, expected[:, PREFIX_LENGTH - 1 : PREFIX_LENGTH], atol=TOLERANCE)
    for name, value in state.past.items():
        np.testing.assert_array_equal(last_state.past[name], value)
    logits, state = captioner.decode(captioner.embed_tokens(tokens[:, :2].numpy()), state)  # two positions at once
    np.testing.assert_allclose(logits, expected[:, PREFIX_LENGTH : PREFIX_LENGTH + 2], atol=TOLERANCE)
    logits, state = captioner.decode(captioner.embed_tokens(tokens[:, 2:].numpy()), state)
    np.testing.assert_allclose(logits, expected[:, -1:], atol=TOLERANCE)
    assert state.length == PREFIX_LENGTH + 3


def test_num_logits_to_keep_past_the_positions_keeps_them_all_in_every_decoder(onnx_export, captioner, test_pixels):
    # As transformers' `logits_to_keep`; the graph had wrapped the positions round ([2, 3, 0, 1, 2, 3] for 6 of 4).
    prefix = captioner.prefix_embeds(pixel_values=test_pixels.numpy())
    length = prefix.shape[1]
    feeds = {"inputs_embeds": prefix, "attention_mask": np.ones(prefix.shape[:2], np.int64),
             "position_ids": np.broadcast_to(np.arange(length), prefix.shape[:2]).copy(),
             **captioner.empty_state(len(prefix)).past}
    for quantized in (False, True):
        decoder = OnnxCaptioner(onnx_export[2], quantized=quantized).sessions["decoder_model_merged"]
        every = decoder.run(["logits"], {**feeds, "num_logits_to_keep": np.array(0, np.int64)})[0]
        assert every.shape[1] == length
        for keep in (length + 1, length + 2):
            logits = decoder.run(["logits"], {**feeds, "num_logits_to_keep": np.array(keep, np.int64)})[0]
            np.testing.assert_array_equal(logits, every)


def test_inputs_of_the_wrong_shape_are_named_with_the_shape_meant(captioner, test_pixels):
    side = test_pixels.shape[-1]
    for bad in (test_pixels[0].numpy(), test_pixels[:, :, 1:].numpy()):
        with pytest.raises(ValueError) as error:
            captioner.generate(pixel_values=bad)
        assert str(error.value) == (
            f"`pixel_values` must have shape (batch_size, 3, {side}, {side}) for this export, got {bad.shape}; make "
            "them with `captioner.processor`, or pass images to `caption()`."
        )
    for bad in (np.zeros(24, np.float32), np.zeros((2, 23), np.float32)):
        with pytest.raises(ValueError) as error:
            captioner.generate(image_embeds=bad, num_beams=2)
        assert str(error.value) == (
            f"`image_embeds` must have shape (batch_size, 24) for this export (config.prefix_dim), got {bad.shape}. "
            "Compute them with the vision tower this model was trained with."
        )


@pytest.mark.parametrize("num_beams", [1, 3])
def test_no_image_gives_no_caption(captioner, num_beams):
    assert captioner.generate(image_embeds=np.zeros((0, 24), np.float32), num_beams=num_beams) == []


def test_greedy_tokens_equal_generate(onnx_export, captioner, test_pixels):
    model = onnx_export[0]
    expected = model.generate(pixel_values=test_pixels, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    tokens = captioner.generate(pixel_values=test_pixels.numpy(), max_new_tokens=MAX_NEW_TOKENS)
    assert tokens == expected[:, PREFIX_LENGTH:].tolist()
    # Random pixels barely move a tiny random CLIP's embedding; random embeddings give each image its own caption.
    image_embeds = torch.randn(8, model.config.prefix_dim, generator=torch.Generator().manual_seed(0))
    expected = model.generate(image_embeds=image_embeds, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    tokens = captioner.generate(image_embeds=image_embeds.numpy(), max_new_tokens=MAX_NEW_TOKENS)
    assert tokens == expected[:, PREFIX_LENGTH:].tolist()
    assert len({tuple(row) for row in tokens}) > 1


@pytest.mark.parametrize(("early_stopping", "length_penalty"), [(False, 1.0), (True, 1.0), ("never", 0.5)])
def test_beam_search_equals_generate_with_captions_ending_early(onnx_export, early_stopping, length_penalty):
    model, _, exported = onnx_export
    image_embeds = torch.randn(6, model.config.prefix_dim, generator=torch.Generator().manual_seed(1))
    settings = {"early_stopping": early_stopping, "length_penalty": length_penalty, "max_new_tokens": MAX_NEW_TOKENS}
    eos = eos_ending_captions_at_different_steps(model, image_embeds, **settings)  # images' searches stop apart
    captioner = OnnxCaptioner(exported)
    captioner.generation_config.update(eos_token_id=eos, early_stopping=early_stopping, length_penalty=length_penalty)
    decoder_batches = record_decoder_batches(captioner)
    for num_beams in (2, 4):
        expected = model.generate(
            image_embeds=image_embeds, num_beams=num_beams, do_sample=False, eos_token_id=eos, **settings
        )
        expected = captions_cut_at_eos(expected[:, PREFIX_LENGTH:].tolist(), eos)
        decoder_batches.clear()
        tokens = captioner.generate(image_embeds=image_embeds.numpy(), num_beams=num_beams,
                                    max_new_tokens=MAX_NEW_TOKENS)
        assert tokens == expected
        assert any(row[-1] in eos and len(row) < MAX_NEW_TOKENS for row in tokens)
        # All images' beams go through the decoder together, one call per step; an image whose search is over
        # leaves the batch.
        assert decoder_batches[0] == len(image_embeds) * num_beams and len(decoder_batches) <= MAX_NEW_TOKENS
        assert decoder_batches == sorted(decoder_batches, reverse=True) and decoder_batches[-1] % num_beams == 0


def captions_cut_at_eos(rows: list[list[int]], eos: list[int]) -> list[list[int]]:
    """Each row up to its first EOS token, included (what follows is padding)."""
    return [row[: min(row.index(token) for token in eos if token in row) + 1] if set(eos) & set(row) else row
            for row in rows]


def eos_ending_captions_at_different_steps(model, image_embeds, **settings) -> list[int]:
    """
    Two EOS tokens with which PyTorch's beam search ends the captions of `image_embeds` before the length limit and
    at different lengths: a token greedy decoding emits late, and the first of the one greedy caption starts with
    that gives them. (A tiny random model's captions differ little, so which tokens do depends on its weights.)
    """
    greedy = model.generate(image_embeds=image_embeds, do_sample=False, max_new_tokens=settings["max_new_tokens"])
    greedy = greedy[:, PREFIX_LENGTH:].tolist()
    for first in dict.fromkeys(row[0] for row in greedy):
        eos = [greedy[0][-3], first]
        captions = model.generate(image_embeds=image_embeds, num_beams=2, do_sample=False, eos_token_id=eos, **settings)
        if len({len(row) for row in captions_cut_at_eos(captions[:, PREFIX_LENGTH:].tolist(), eos)}) > 1:
            return eos
    raise AssertionError("no EOS tokens end the test captions at different steps: change the test's image embeddings")


def record_decoder_batches(captioner: OnnxCaptioner) -> list[int]:
    """Makes `captioner` record the batch size of each of its decoder calls in the list returned."""
    batches, session = [], captioner.sessions["decoder_model_merged"]

    class Recorder:
        def run(self, output_names, feeds):
            batches.append(len(feeds["inputs_embeds"]))
            return session.run(output_names, feeds)

    captioner.sessions["decoder_model_merged"] = Recorder()
    return batches


def test_caption_decodes_like_the_pipeline(onnx_export, captioner, processor):
    model = onnx_export[0]
    images = random_images(3, seed=2)
    generated = model.generate(**processor(images=images), do_sample=False)
    expected = [text.strip() for text in processor.batch_decode(generated, skip_special_tokens=True)]
    assert captioner.caption(images) == expected


@torch.no_grad()
def test_int8_graphs_are_per_channel_and_agree_with_pytorch(onnx_export, captioner, test_pixels):
    import onnx

    model, _, exported = onnx_export
    graph = onnx.load(str(exported / "onnx" / "decoder_model_merged_quantized.onnx")).graph
    initializers = {initializer.name: initializer for initializer in graph.initializer}
    matmuls = [node for node in graph.node if node.op_type == "MatMulInteger"]
    assert len(matmuls) >= 4 * model.config.text_config.num_hidden_layers + 1  # 4 per block, and the LM head
    for node in matmuls:  # the default: a zero point (and scale) per output column of each weight matrix
        weight, zero_point = initializers[node.input[1]], initializers[node.input[3]]
        assert list(zero_point.dims) == [weight.dims[1]]

    quantized = OnnxCaptioner(exported, quantized=True)
    fp32 = captioner.prefix_embeds(pixel_values=test_pixels.numpy())
    int8 = quantized.prefix_embeds(pixel_values=test_pixels.numpy())
    assert not np.array_equal(fp32, int8)
    assert np.abs(fp32 - int8).max() < 0.1 * np.abs(fp32).max()

    # Against PyTorch's fp32 model, fed its greedy captions: the int8 graphs' logits within 5% of fp32's (int8
    # weights moved them by 1.2% of their norm here, 2.4% on a GPT-2 small sized model), and their next token the same
    # at >= 80% of the positions. A token changes only where the two best logits are closer than that error: here
    # 100% were kept on transformers 5 and 88% on 4.57, whose tiny random model gives every image the same later
    # tokens, so that one near tie changed a position in all 16 captions. Misread scales or zero points would change
    # nearly every token.
    image_embeds = torch.randn(16, model.config.prefix_dim, generator=torch.Generator().manual_seed(0))
    generated = model.generate(image_embeds=image_embeds, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    expected = model(input_ids=generated[:, :-1], image_embeds=image_embeds).logits[:, PREFIX_LENGTH - 1 :].numpy()
    logits, state = quantized.decode(quantized.prefix_embeds(image_embeds=image_embeds.numpy()),
                                     quantized.empty_state(16), last_logits_only=True)
    tokens = generated[:, PREFIX_LENGTH:-1].numpy()
    logits = np.concatenate((logits, quantized.decode(quantized.embed_tokens(tokens), state)[0]), axis=1)
    assert (expected.argmax(-1) == generated[:, PREFIX_LENGTH:].numpy()).all()  # no EOS and padding in them
    assert np.linalg.norm(logits - expected) < 0.05 * np.linalg.norm(expected)
    assert (logits.argmax(-1) == generated[:, PREFIX_LENGTH:].numpy()).mean() >= 0.8


@torch.no_grad()
@pytest.mark.parametrize("takes_logits_to_keep", [True, False], ids=["language model slices", "sliced after it"])
def test_merged_decoder_keeps_the_last_logits(onnx_export, takes_logits_to_keep):
    model = onnx_export[0]
    decoder = MergedDecoder(model)
    decoder.takes_logits_to_keep = takes_logits_to_keep  # False: as for a 4.x language model without the argument
    inputs_embeds = torch.randn(2, 5, model.config.text_embedding_size, generator=torch.Generator().manual_seed(0))
    heads, head_dim = cache_shape(model)
    empty = [torch.zeros(2, heads, 0, head_dim)] * (2 * decoder.num_layers)
    args = (inputs_embeds, torch.ones(2, 5, dtype=torch.long), torch.arange(5).expand(2, -1))
    expected = model.language_model(inputs_embeds=inputs_embeds).logits
    for keep, positions in ((0, slice(None)), (1, slice(-1, None)), (3, slice(-3, None))):
        logits, *present = decoder(*args, torch.tensor(keep), *empty)
        torch.testing.assert_close(logits, expected[:, positions])
        assert present[0].shape[2] == 5


def test_a_decoder_exported_without_num_logits_to_keep_still_captions(onnx_export, tmp_path):
    import onnx

    model, _, exported = onnx_export
    folder = tmp_path / "older-export"
    shutil.copytree(exported, folder, ignore=shutil.ignore_patterns("*_quantized.onnx"))
    path = folder / "onnx" / "decoder_model_merged.onnx"
    graph = onnx.load(str(path))
    # As exports before the input: no such input (a constant 0 instead: every position's logits).
    graph.graph.input.remove(next(i for i in graph.graph.input if i.name == "num_logits_to_keep"))
    onnx.save(graph, str(path))
    captioner = OnnxCaptioner(folder)
    assert not captioner.sessions["decoder_model_merged"].get_overridable_initializers()
    image_embeds = torch.randn(4, model.config.prefix_dim, generator=torch.Generator().manual_seed(2))
    expected = model.generate(image_embeds=image_embeds, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    assert captioner.generate(image_embeds=image_embeds.numpy(), max_new_tokens=MAX_NEW_TOKENS) == (
        expected[:, PREFIX_LENGTH:].tolist()
    )


def test_caption_agreement():
    assert caption_agreement(["a dog", "a cat", "a car"], ["a dog", "a cat", "a bus"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        caption_agreement(["a dog"], [])


@torch.no_grad()
def assert_export_matches_pytorch(folder, model, pixel_values):
    """The exported prefix embeddings and greedy tokens equal the model's."""
    captioner = OnnxCaptioner(folder)
    expected = model.get_prefix_embeds(pixel_values=pixel_values).numpy()
    np.testing.assert_allclose(captioner.prefix_embeds(pixel_values=pixel_values.numpy()), expected, atol=TOLERANCE)
    expected = model.generate(pixel_values=pixel_values, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    assert captioner.generate(pixel_values=pixel_values.numpy(), max_new_tokens=MAX_NEW_TOKENS) == (
        expected[:, PREFIX_LENGTH:].tolist()
    )


@torch.no_grad()
def test_transformer_mapper_exports(tmp_path, tokenizer, processor, test_pixels):
    model = captioning_model(tokenizer, "transformer")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(model, tiny_processor(tokenizer), tmp_path, quantize=False)
    # The batch axis is one `Dim` shared by several inputs, as meant: the exporter's notice about it is not shown.
    assert not [warning for warning in caught if "The axis name" in str(warning.message)]
    assert not list((tmp_path / "onnx").glob("*_quantized.onnx"))
    assert_export_matches_pytorch(tmp_path, model, test_pixels)


def test_a_siglip2_tower_exports_and_its_graphs_match_pytorch(tmp_path, tokenizer, test_pixels):
    from transformers import Siglip2VisionConfig

    from clipcap_hf import ClipCapConfig, ClipCapForConditionalGeneration

    # Its tower asserts its patch grid with an operator (`aten._is_all_true`) the exporter had no function for.
    vision_config = Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, patch_size=8, num_patches=16)  # fmt: skip
    torch.manual_seed(0)
    text_config = captioning_model(tokenizer).config.text_config
    config = ClipCapConfig(vision_config=vision_config, text_config=text_config, prefix_length=PREFIX_LENGTH,
                           image_token_id=captioning_model(tokenizer).config.image_token_id)  # fmt: skip
    model = ClipCapForConditionalGeneration(config).eval()
    if int(transformers.__version__.split(".")[0]) < 5:
        with pytest.raises(ValueError, match=r"A SigLIP2 vision tower exports with transformers 5 or later: "):
            export_onnx(model, tiny_processor(tokenizer), tmp_path, quantize=False)
        assert not (tmp_path / "onnx").exists()
        return
    export_onnx(model, tiny_processor(tokenizer), tmp_path, quantize=False)
    assert_export_matches_pytorch(tmp_path, model, test_pixels)


def test_a_graph_gets_a_weights_file_of_its_own_by_its_own_weights_size(onnx_export, tmp_path, tokenizer,
                                                                        monkeypatch):
    import clipcap_hf.onnx.export

    model = captioning_model(tokenizer)  # the fixture's model
    image_graph_bytes = sum(p.numel() * 4 for part in (model.vision_model, model.mapping_network)
                            for p in part.parameters())  # fmt: skip
    assert sum(p.numel() * 4 for p in model.parameters()) > image_graph_bytes
    # Every wrapper module holds the whole model: its size split the small image graphs of a large language model.
    monkeypatch.setattr(clipcap_hf.onnx.export, "_SINGLE_FILE_LIMIT", image_graph_bytes + 1)
    export_onnx(model, tiny_processor(tokenizer), tmp_path)
    split = {name: (tmp_path / "onnx" / f"{name}.onnx.data").exists() for name in GRAPHS}
    assert split == {"vision_encoder": False, "mapping_network": False, "embed_tokens": False,
                     "decoder_model_merged": True}  # fmt: skip
    assert OnnxCaptioner(tmp_path).generate(pixel_values=np.zeros((1, 3, 32, 32), np.float32), max_new_tokens=2)
    # The int8 copy of a split graph is split too (ONNX Runtime saves one file otherwise, which fails past 2 GB), and
    # captions as the fixture's single-file int8 graphs do.
    split = {name: (tmp_path / "onnx" / f"{name}_quantized.onnx.data").exists() for name in GRAPHS}
    assert split == {"vision_encoder": False, "mapping_network": False, "embed_tokens": False,
                     "decoder_model_merged": True}  # fmt: skip
    image_embeds = torch.randn(4, model.config.prefix_dim, generator=torch.Generator().manual_seed(8)).numpy()
    tokens = OnnxCaptioner(tmp_path, quantized=True).generate(image_embeds=image_embeds)
    assert tokens == OnnxCaptioner(onnx_export[2], quantized=True).generate(image_embeds=image_embeds)
    assert len(tokens) == 4 and all(tokens)


def test_incomplete_export_and_unsupported_settings_are_named(onnx_export, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"decoder_model_merged_quantized\.onnx"):
        OnnxCaptioner(onnx_export[1], quantized=True)  # the PyTorch folder: no onnx/ graphs
    captioner = OnnxCaptioner(onnx_export[2])
    captioner.generation_config.repetition_penalty = 1.3
    with pytest.raises(ValueError, match="repetition_penalty=1.3"):
        captioner.generate(image_embeds=np.zeros((1, 24), np.float32))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("begin_suppress_tokens", [5]), ("forced_bos_token_id", 5), ("forced_eos_token_id", 0),
        ("sequence_bias", {(5,): -10.0}), ("exponential_decay_length_penalty", (2, 1.5)), ("renormalize_logits", True),
        ("penalty_alpha", 0.6), ("stop_strings", ["dog"]), ("max_time", 5.0), ("num_return_sequences", 2),
        ("do_sample", True), ("min_new_tokens", 3), ("guidance_scale", 2.0),
    ],
)
def test_generation_settings_the_captioner_does_not_implement_are_refused_by_name(onnx_export, name, value):
    captioner = OnnxCaptioner(onnx_export[2])
    setattr(captioner.generation_config, name, value)
    with pytest.raises(ValueError, match=rf"generation_config\.json sets {name}=.*does not implement"):
        captioner.generate(image_embeds=np.zeros((1, 24), np.float32), max_new_tokens=3)


def test_a_folder_saved_by_the_package_or_with_every_field_written_captions_as_generate(onnx_export, tmp_path):
    from transformers import GenerationConfig

    model, _, exported = onnx_export
    image_embeds = torch.randn(2, model.config.prefix_dim, generator=torch.Generator().manual_seed(8))
    expected = model.generate(image_embeds=image_embeds, max_new_tokens=6)[:, PREFIX_LENGTH:].tolist()
    assert OnnxCaptioner(exported).generate(image_embeds=image_embeds.numpy(), max_new_tokens=6) == expected
    # Every field written, with this transformers' defaults and with 4.x's (which transformers 5 leaves None), and
    # sampling knobs that greedy search ignores.
    folder = tmp_path / "export"
    shutil.copytree(exported, folder, ignore=shutil.ignore_patterns("*_quantized.onnx"))
    config = GenerationConfig.from_pretrained(exported)
    config.to_json_file(folder / "generation_config.json", use_diff=False)
    full = json.loads((folder / "generation_config.json").read_text())
    transformers_4_defaults = {
        "do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0,
        "num_beam_groups": 1, "diversity_penalty": 0.0, "num_return_sequences": 1, "renormalize_logits": False,
        "remove_invalid_values": False, "length_penalty": 1.0, "early_stopping": False, "use_cache": True,
        "output_scores": False, "return_dict_in_generate": False, "num_assistant_tokens": 20,
    }
    sampling_knobs = {"temperature": 0.5, "top_k": 3, "top_p": 0.8, "typical_p": 0.9}
    (folder / "generation_config.json").write_text(json.dumps({**full, **transformers_4_defaults, **sampling_knobs}))
    assert OnnxCaptioner(folder).generate(image_embeds=image_embeds.numpy(), max_new_tokens=6) == expected


def test_caption_lengths_beyond_the_learned_position_table_are_refused_or_cut_as_generate_does(onnx_export, caplog):
    # The tiny GPT-2 has 128 learned positions, 4 of them the image tokens: an explicit length past them is refused
    # before decoding (not a Gather index error in ONNX Runtime), a generation config's is cut with a warning.
    model, _, exported = onnx_export
    image_embeds = torch.randn(1, model.config.prefix_dim, generator=torch.Generator().manual_seed(9)).numpy()
    for quantized in (False, True):  # (the int8 graphs carry the table's size too)
        captioner = OnnxCaptioner(exported, quantized=quantized)
        captioner.generation_config.eos_token_id = None  # every caption runs to its full length
        with pytest.raises(ValueError, match=r"`max_new_tokens=125` needs 129 positions .* room for 124 new tokens"):
            captioner.generate(image_embeds=image_embeds, max_new_tokens=125)
        captioner.generation_config.max_new_tokens = 200
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="clipcap_hf.modeling_clipcap"):
            tokens = captioner.generate(image_embeds=image_embeds)
        assert len(tokens[0]) == 124
        assert "caption length asks for 200 new tokens, but the language model has room for 124" in caplog.text
        if not quantized:
            expected = model.generate(
                image_embeds=torch.from_numpy(image_embeds), max_new_tokens=124, eos_token_id=None
            )
            assert tokens == expected[:, PREFIX_LENGTH:].tolist()


def test_cli_refuses_a_non_empty_output_folder_and_one_under_a_file_before_loading(
    onnx_export, tmp_path, monkeypatch, capsys
):
    import clipcap_hf.commands.export_onnx

    _, saved, exported = onnx_export
    assert main(["export-onnx", str(saved), "--output", str(exported)]) == 2
    assert "is not empty" in capsys.readouterr().err
    monkeypatch.setattr(clipcap_hf.commands.export_onnx, "load_clipcap", None)  # refused before the model loads
    (tmp_path / "notes.txt").write_text("")
    assert main(["export-onnx", str(saved), "--output", str(tmp_path / "notes.txt" / "onnx")]) == 2
    assert capsys.readouterr().err == (
        f"clipcap export-onnx: error: --output: {tmp_path / 'notes.txt' / 'onnx'} cannot be created: "
        f"{tmp_path / 'notes.txt'} is a file; name a folder to write the export to.\n"
    )


def test_export_onnx_refuses_a_folder_holding_files_unless_overwrite_which_replaces_the_graphs_folder_whole(
    onnx_export, tokenizer, tmp_path, monkeypatch
):
    import clipcap_hf.onnx.export

    model, _, exported = onnx_export
    target = tmp_path / "project"
    (target / "onnx").mkdir(parents=True)
    (target / "config.json").write_text('{"my_tool": "settings"}')
    (target / "onnx" / "my_other_model.onnx").write_bytes(b"another model")
    (target / "notes.txt").write_text("mine")
    before = {str(path.relative_to(target)): path.read_bytes() for path in target.rglob("*") if path.is_file()}
    with pytest.raises(FileExistsError) as error:
        export_onnx(model, tiny_processor(tokenizer), target, quantize=False)
    assert str(error.value) == f"output_dir: {target} is not empty; name a new folder, or pass overwrite=True."
    assert {str(path.relative_to(target)): path.read_bytes() for path in target.rglob("*")
            if path.is_file()} == before  # fmt: skip
    assert sorted(path.name for path in target.iterdir()) == ["config.json", "notes.txt", "onnx"]  # no staging

    # With overwrite: the export's files replace their namesakes, its graphs the whole onnx/ folder (no graph of
    # another model is left among them), and the user's other files stay. (The fixture's graphs, not exported again.)
    def copy_the_exported_graphs(model, folder, image_size):
        shutil.copytree(exported / "onnx", folder, ignore=shutil.ignore_patterns("*_quantized.onnx"))
        return {name: folder / f"{name}.onnx" for name in GRAPHS}

    monkeypatch.setattr(clipcap_hf.onnx.export, "export_graphs", copy_the_exported_graphs)
    export_onnx(model, tiny_processor(tokenizer), target, quantize=False, overwrite=True)
    assert sorted(path.name for path in (target / "onnx").iterdir()) == sorted(f"{name}.onnx" for name in GRAPHS)
    assert json.loads((target / "config.json").read_text())["model_type"] == "clipcap"
    assert (target / "notes.txt").read_text() == "mine"
    OnnxCaptioner(target)


def test_a_missing_onnxruntime_is_named_with_the_fp32_only_export_before_any_export_work(
    onnx_export, tokenizer, tmp_path, monkeypatch, capsys
):
    import sys

    import clipcap_hf.commands.export_onnx
    import clipcap_hf.onnx.export

    model, saved, _ = onnx_export
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)  # as if onnxruntime were not installed
    exported = []
    monkeypatch.setattr(clipcap_hf.onnx.export, "export_graphs", lambda *args: exported.append(args))
    monkeypatch.setattr(clipcap_hf.commands.export_onnx, "load_clipcap", None)  # refused before the model loads
    assert main(["export-onnx", str(saved), "--output", str(tmp_path / "cli")]) == 2
    assert capsys.readouterr().err == (
        'clipcap export-onnx: error: int8 export needs onnxruntime: pip install "clipcap_hf[onnx]", or export the '
        "fp32 graphs only (`clipcap export-onnx --no-int8`, `export_onnx(..., quantize=False)`).\n"
    )
    with pytest.raises(ImportError, match=r"export_onnx\(\.\.\., quantize=False\)"):
        export_onnx(model, tiny_processor(tokenizer), tmp_path / "api")
    assert exported == [] and not list(tmp_path.iterdir())


def test_an_onnx_export_given_as_the_model_is_named_before_loading(onnx_export, tmp_path, monkeypatch, capsys):
    import clipcap_hf.commands.export_onnx
    import clipcap_hf.onnx

    _, saved, exported = onnx_export
    # A model folder holding an export of itself has its weights: it loads.
    both = tmp_path / "model-and-export"
    shutil.copytree(saved, both)
    shutil.copytree(exported / "onnx", both / "onnx")
    loaded = []
    monkeypatch.setattr(clipcap_hf.onnx, "export_onnx", lambda model, *args, **kwargs: loaded.append(model) or {})
    assert main(["export-onnx", str(both), "--output", str(tmp_path / "out")]) == 0
    assert len(loaded) == 1
    capsys.readouterr()  # (transformers' loading progress)

    monkeypatch.setattr(clipcap_hf.commands.export_onnx, "load_clipcap", None)  # refused before the model loads
    assert main(["export-onnx", str(exported), "--output", str(tmp_path / "out2")]) == 2
    assert capsys.readouterr().err == (
        f"clipcap export-onnx: error: MODEL: {exported} is an ONNX export (no weights); give the ClipCap model "
        "folder it was exported from.\n"
    )
    assert not (tmp_path / "out2").exists()


def test_a_bitsandbytes_model_or_one_off_the_cpu_is_refused_by_name_and_a_torchao_one_is_not(tokenizer, tmp_path):
    from types import SimpleNamespace

    from transformers import BitsAndBytesConfig

    processor = tiny_processor(tokenizer)
    model = captioning_model(tokenizer)
    # As `from_pretrained(quantization_config=BitsAndBytesConfig(...))` marks the model it loads.
    model.hf_quantizer = SimpleNamespace(quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    with pytest.raises(ValueError) as error:
        export_onnx(model, processor, tmp_path / "bitsandbytes", quantize=False)
    assert str(error.value) == (
        "model: it was loaded quantized by bitsandbytes, whose 8- and 4-bit layers have no ONNX form; load it in "
        "full precision (without `quantization_config`) to export it: the int8 graphs (quantize=True) are ONNX "
        "Runtime's own quantization."
    )
    with pytest.raises(ValueError) as error:
        export_onnx(captioning_model(tokenizer).to("meta"), processor, tmp_path / "meta", quantize=False)
    assert str(error.value) == (
        "model: its weights are on meta; the export runs on the CPU: move the model there first (model.to('cpu'))."
    )
    assert not list(tmp_path.iterdir())
    pytest.importorskip("torchao", reason="torchao is not installed (pip install torchao)")
    from clipcap_hf.onnx.export import check_exportable_model
    from clipcap_hf.utils.quantization import quantize_int8_weight_only

    check_exportable_model(quantize_int8_weight_only(captioning_model(tokenizer)))  # its graphs are fp32's


def test_int8_per_tensor_on_request(onnx_export, tmp_path, monkeypatch):
    import onnx

    import clipcap_hf.onnx

    _, saved, exported = onnx_export
    calls = []
    monkeypatch.setattr(clipcap_hf.onnx, "export_onnx", lambda *args, **kwargs: calls.append(kwargs) or {})
    assert main(["export-onnx", str(saved), "--output", str(tmp_path / "out"), "--int8-per-tensor"]) == 0
    assert calls == [{"quantize": True, "per_channel": False, "overwrite": False}]

    fp32 = tmp_path / "decoder_model_merged.onnx"
    shutil.copy(exported / "onnx" / fp32.name, fp32)
    graph = onnx.load(str(quantize_graphs({"decoder_model_merged": fp32}, per_channel=False)["decoder_model_merged"]))
    zero_points = {node.input[3] for node in graph.graph.node if node.op_type == "MatMulInteger"}
    assert zero_points and all(list(i.dims) == [] for i in graph.graph.initializer if i.name in zero_points)


def test_a_generation_config_with_only_max_length_counts_the_image_tokens_as_generate_does(onnx_export):
    model, _, exported = onnx_export
    image_embeds = torch.randn(2, model.config.prefix_dim, generator=torch.Generator().manual_seed(3))
    captioner = OnnxCaptioner(exported)
    captioner.generation_config.update(max_new_tokens=None, max_length=PREFIX_LENGTH + 5)
    expected = model.generate(image_embeds=image_embeds, do_sample=False, max_length=PREFIX_LENGTH + 5)
    tokens = captioner.generate(image_embeds=image_embeds.numpy())
    assert tokens == expected[:, PREFIX_LENGTH:].tolist() and len(tokens[0]) == 5


def test_greedy_without_eos_or_pad_token_runs_to_the_length_limit_in_integers(onnx_export):
    model, _, exported = onnx_export
    image_embeds = torch.randn(2, model.config.prefix_dim, generator=torch.Generator().manual_seed(4))
    captioner = OnnxCaptioner(exported)
    captioner.generation_config.update(eos_token_id=None, pad_token_id=None)
    tokens = captioner.generate(image_embeds=image_embeds.numpy(), max_new_tokens=6)
    expected = model.generate(image_embeds=image_embeds, do_sample=False, max_new_tokens=6, min_new_tokens=6)
    assert tokens == expected[:, PREFIX_LENGTH:].tolist()
    assert all(type(token) is int for row in tokens for token in row)


def test_session_options_reach_every_graph_and_change_no_token(onnx_export, captioner):
    import onnxruntime

    model, _, exported = onnx_export
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    single_thread = OnnxCaptioner(exported, session_options=options)
    assert set(single_thread.sessions) == set(GRAPHS)
    assert all(session.get_session_options().intra_op_num_threads == 1 for session in single_thread.sessions.values())
    assert all(session.get_session_options().intra_op_num_threads == 0 for session in captioner.sessions.values())
    image_embeds = torch.randn(3, model.config.prefix_dim, generator=torch.Generator().manual_seed(5)).numpy()
    assert single_thread.generate(image_embeds=image_embeds) == captioner.generate(image_embeds=image_embeds)


def test_quantizing_logs_no_pre_processing_advice_and_leaves_logging_as_it_was(onnx_export, tmp_path, caplog):
    graph = tmp_path / "embed_tokens.onnx"
    shutil.copy(onnx_export[2] / "onnx" / graph.name, graph)
    root_filters = list(logging.getLogger().filters)
    with caplog.at_level(logging.WARNING):
        quantize_graphs({"embed_tokens": graph})
        assert not [record for record in caplog.records if "pre-processing" in record.getMessage()]
        logging.warning("Please consider to run pre-processing before quantization")  # after it, logged again
    assert logging.getLogger().filters == root_filters
    assert [record.getMessage() for record in caplog.records if "pre-processing" in record.getMessage()] == [
        "Please consider to run pre-processing before quantization"
    ]


def test_exporting_over_an_export_removes_its_graphs_that_this_export_does_not_write(
    onnx_export, tmp_path, monkeypatch
):
    _, saved, exported = onnx_export
    folder = tmp_path / "previous-export"
    shutil.copytree(exported, folder)
    (folder / "onnx" / "old_graph.onnx.data").write_bytes(b"stale weights")
    assert main(["export-onnx", str(saved), "--output", str(folder), "--overwrite", "--no-int8"]) == 0
    assert sorted(path.name for path in (folder / "onnx").iterdir()) == sorted(f"{name}.onnx" for name in GRAPHS)
    with pytest.raises(FileNotFoundError, match=r"_quantized\.onnx") as missing:
        OnnxCaptioner(folder, quantized=True)

    # The command the error suggests is accepted on that folder, and asks for the int8 graphs.
    import clipcap_hf.onnx

    suggested = re.search(r"`clipcap (export-onnx MODEL [^`]*)`", str(missing.value)).group(1).split()
    assert suggested == ["export-onnx", "MODEL", "--output", str(folder), "--overwrite"]
    calls = []
    monkeypatch.setattr(clipcap_hf.onnx, "export_onnx", lambda *args, **kwargs: calls.append(kwargs) or {})
    assert main([str(saved) if part == "MODEL" else part for part in suggested]) == 0
    assert calls == [{"quantize": True, "per_channel": True, "overwrite": True}]


@pytest.mark.parametrize(
    ("argument", "value"),
    [("max_new_tokens", 0), ("max_new_tokens", -1), ("max_new_tokens", True), ("max_new_tokens", 2.0),
     ("num_beams", 0), ("num_beams", -2)],
)
def test_generate_and_caption_name_a_length_or_beam_count_that_is_not_a_positive_integer(
    captioner, argument, value
):
    with pytest.raises(ValueError, match=rf"{argument}={value!r}: pass a positive integer"):
        captioner.generate(image_embeds=np.zeros((1, 24), np.float32), **{argument: value})
    with pytest.raises(ValueError, match=rf"{argument}={value!r}: pass a positive integer"):
        captioner.caption(random_images(1), **{argument: value})


def test_a_failed_export_names_the_missing_extra_and_leaves_no_folder_behind(
    onnx_export, tmp_path, monkeypatch, capsys
):
    import sys

    import clipcap_hf.onnx.export

    _, saved, exported = onnx_export
    output = tmp_path / "export"
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    assert main(["export-onnx", str(saved), "--output", str(output), "--no-int8"]) == 2
    assert 'onnxscript: pip install "clipcap_hf[onnx]"' in capsys.readouterr().err
    assert not output.exists()

    # A failure after the first files are written removes the folder too, so that a retry is not refused.
    def fail_midway(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.delitem(sys.modules, "onnxscript")
    monkeypatch.setattr(clipcap_hf.onnx.export, "export_graphs", fail_midway)
    assert main(["export-onnx", str(saved), "--output", str(output), "--no-int8"]) == 2
    assert not output.exists()
    output.mkdir()  # a folder the user made is left in place, empty
    assert main(["export-onnx", str(saved), "--output", str(output), "--no-int8"]) == 2
    assert output.is_dir() and not list(output.iterdir())
    # An export that fails over an earlier one (--overwrite) leaves it whole: its old graphs were deleted first.
    earlier = tmp_path / "earlier"
    shutil.copytree(exported, earlier)
    before = sorted(str(path.relative_to(earlier)) for path in earlier.rglob("*"))
    assert main(["export-onnx", str(saved), "--output", str(earlier), "--overwrite"]) == 2
    assert sorted(str(path.relative_to(earlier)) for path in earlier.rglob("*")) == before
    assert not list(earlier.glob(".export-*"))  # nor the staging folder (the listing above holds hidden files too)
    OnnxCaptioner(earlier)


def test_a_failed_export_removes_the_parent_folders_it_created_and_keeps_what_others_wrote(
    onnx_export, tmp_path, monkeypatch
):
    import clipcap_hf.onnx.export

    _, saved, _ = onnx_export
    output = tmp_path / "new" / "exports" / "clipcap-onnx"

    def fail_midway(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(clipcap_hf.onnx.export, "export_graphs", fail_midway)
    assert main(["export-onnx", str(saved), "--output", str(output), "--no-int8"]) == 2
    assert sorted(tmp_path.iterdir()) == []  # `new` and `exports` too

    # A parent folder that another process wrote into meanwhile stays, with its files; the ones above it too.
    def fail_after_another_process_wrote_beside(*args, **kwargs):
        (output.parent / "other.txt").write_text("not the export's")
        raise OSError("disk full")

    monkeypatch.setattr(clipcap_hf.onnx.export, "export_graphs", fail_after_another_process_wrote_beside)
    assert main(["export-onnx", str(saved), "--output", str(output), "--no-int8"]) == 2
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == [
        "new", "new/exports", "new/exports/other.txt"
    ]


def test_a_failed_export_keeps_what_another_export_finished_in_the_folder_it_created(
    onnx_export, tmp_path, monkeypatch
):
    import clipcap_hf.onnx.export

    _, saved, exported = onnx_export
    output = tmp_path / "export"

    def fail_after_another_export_finished(*args, **kwargs):  # into the folder this one created
        for path in exported.iterdir():
            if path.is_file():
                shutil.copy(path, output / path.name)
        shutil.copytree(exported / "onnx", output / "onnx")
        raise OSError("disk full")

    monkeypatch.setattr(clipcap_hf.onnx.export, "export_graphs", fail_after_another_export_finished)
    assert main(["export-onnx", str(saved), "--output", str(output), "--no-int8"]) == 2
    assert sorted(path.name for path in output.iterdir()) == sorted(path.name for path in exported.iterdir())
    OnnxCaptioner(output)


def test_an_export_stopped_while_moving_in_puts_the_earlier_export_back(onnx_export, tmp_path, monkeypatch):
    _, saved, exported = onnx_export
    earlier = tmp_path / "earlier"
    shutil.copytree(exported, earlier)
    before = {str(path.relative_to(earlier)): path.read_bytes() for path in earlier.rglob("*") if path.is_file()}
    other = tmp_path / "other-model"  # a model whose export differs in its generation config
    shutil.copytree(saved, other)
    generation = json.loads((other / "generation_config.json").read_text())
    (other / "generation_config.json").write_text(json.dumps({**generation, "max_new_tokens": 7}))
    replace, moved_in = os.replace, []

    def stopped_on_moving_the_graphs_in(source, target):  # once the new top-level files are in place (as it was)
        new_entry = os.path.dirname(source).endswith(".partial")  # not the staging folder itself, not a put-back
        if new_entry and os.path.dirname(target) == str(earlier):
            moved_in.append(os.path.basename(target))
            if os.path.basename(target) == "onnx":
                raise KeyboardInterrupt
        replace(source, target)

    monkeypatch.setattr(os, "replace", stopped_on_moving_the_graphs_in)
    with pytest.raises(KeyboardInterrupt):
        main(["export-onnx", str(other), "--output", str(earlier), "--overwrite", "--no-int8"])
    monkeypatch.undo()
    assert "onnx" in moved_in
    after = {str(path.relative_to(earlier)): path.read_bytes() for path in earlier.rglob("*") if path.is_file()}
    assert after == before  # the staging folder gone too
    OnnxCaptioner(earlier)


def test_an_export_that_cannot_put_the_earlier_one_back_names_and_keeps_it(onnx_export, tmp_path, monkeypatch,
                                                                            capsys):
    from clipcap_hf.onnx.export import abandoned_exports

    _, saved, exported = onnx_export
    earlier = tmp_path / "earlier"
    shutil.copytree(exported, earlier)
    replace = os.replace

    def stopped_then_unable_to_put_back(source, target):
        if os.path.dirname(source).endswith(".partial") and os.path.basename(target) == "onnx":
            raise KeyboardInterrupt  # the new graphs moving in
        if os.path.basename(os.path.dirname(source)) == "previous":
            raise OSError(5, "Input/output error")  # the earlier files going back
        replace(source, target)

    monkeypatch.setattr(os, "replace", stopped_then_unable_to_put_back)
    assert main(["export-onnx", str(saved), "--output", str(earlier), "--overwrite", "--no-int8"]) == 2
    monkeypatch.undo()
    assert re.search(r"Could not put back the entries of .*earlier after KeyboardInterrupt .*: they are in "
                     r".*previous; move them back by hand", capsys.readouterr().err)
    staging = next(earlier.glob(".export-*.partial"))
    assert (staging / "previous" / "onnx").is_dir() and (staging / "EARLIER_FILES_NOT_PUT_BACK").exists()
    assert abandoned_exports(earlier) == []  # no later export deletes them


def test_earlier_files_a_failed_move_could_not_put_back_are_never_cleared(tmp_path):
    import socket
    import subprocess
    import sys

    from clipcap_hf.onnx.export import abandoned_exports

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, dead_pid = socket.gethostname(), int(ended.stdout)
    # Killed after its files moved in: the replaced earlier export waits in `previous` to be deleted with the folder.
    done = tmp_path / f".export-{host}-{dead_pid}-0123abcd.partial"
    (done / "previous" / "onnx").mkdir(parents=True)
    # A failed move could not put the earlier export back: marked, and kept for the user.
    kept = tmp_path / f".export-{host}-{dead_pid}-4567abcd.partial"
    (kept / "previous" / "onnx").mkdir(parents=True)
    (kept / "EARLIER_FILES_NOT_PUT_BACK").touch()
    assert abandoned_exports(tmp_path) == [done]


def test_an_export_killed_part_way_is_cleared_by_the_next_one_and_a_running_one_is_kept(onnx_export, tmp_path):
    import socket
    import subprocess
    import sys

    _, saved, _ = onnx_export
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, dead_pid = socket.gethostname(), int(ended.stdout)
    output = tmp_path / "export"
    killed = output / f".export-{host}-{dead_pid}-0123abcd.partial"
    (killed / "onnx").mkdir(parents=True)
    (killed / "onnx" / "decoder_model_merged.onnx").write_bytes(b"half a graph")
    # Only a killed export's folder there: the folder counts as empty (no --overwrite needed), and it is removed.
    assert main(["export-onnx", str(saved), "--output", str(output), "--no-int8"]) == 0
    assert not killed.exists()
    assert sorted(path.name for path in output.glob(".*")) == []
    OnnxCaptioner(output)

    # A running export's folder (this process's), and another machine's (its process cannot be probed), are kept.
    running = output / f".export-{host}-{os.getpid()}-0123abcd.partial"
    elsewhere = output / f".export-{host}x-{dead_pid}-0123abcd.partial"
    for folder in (running, elsewhere):
        folder.mkdir()
    assert main(["export-onnx", str(saved), "--output", str(output), "--no-int8", "--overwrite"]) == 0
    assert running.is_dir() and elsewhere.is_dir()


def test_a_staging_folder_left_by_an_export_killed_while_making_it_is_cleared_by_the_next_one(
    onnx_export, tmp_path
):
    import socket
    import subprocess
    import sys

    from clipcap_hf.onnx.export import abandoned_exports

    _, saved, _ = onnx_export
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, dead_pid = socket.gethostname(), int(ended.stdout)
    output = tmp_path / "export"
    # Killed before the rename to `.partial`: right after making the folder, or once its lock was taken.
    unlocked = output / f".export-{host}-{dead_pid}-0123abcd.partial.new"
    locked = output / f".export-{host}-{dead_pid}-4567abcd.partial.new"
    unlocked.mkdir(parents=True)
    locked.mkdir()
    (locked / ".export.lock").touch()
    # Without its lock, a folder just made may be another container's export about to lock it: kept for a minute.
    assert abandoned_exports(output) == [locked]
    made = unlocked.stat().st_mtime - 61
    os.utime(unlocked, (made, made))
    assert sorted(abandoned_exports(output)) == [unlocked, locked]
    # They do not count as content (no --overwrite needed), and the export removes them.
    assert main(["export-onnx", str(saved), "--output", str(output), "--no-int8"]) == 0
    assert sorted(path.name for path in output.glob(".*")) == []
    OnnxCaptioner(output)

    running = output / f".export-{host}-{os.getpid()}-0123abcd.partial.new"  # this process's: being made
    running.mkdir()
    assert abandoned_exports(output) == []


# Another process's export, as a container sharing this machine's host name but not its processes runs it: it holds
# its staging folder's lock (until the test closes its input), under a process ID that looks ended from here.
HOLD_STAGING_LOCK = """
import sys
from filelock import FileLock
lock = FileLock(sys.argv[1])  # kept: a lock released when garbage-collected
lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""


def test_a_staging_folder_whose_lock_is_held_is_kept_though_its_process_looks_ended_and_removed_once_free(
    onnx_export, tmp_path, capsys
):
    import socket
    import subprocess
    import sys

    from clipcap_hf.onnx.export import abandoned_exports

    _, saved, _ = onnx_export
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    output = tmp_path / "export"
    staging = output / f".export-{socket.gethostname()}-{int(ended.stdout)}-0123abcd.partial"
    (staging / "onnx").mkdir(parents=True)
    (staging / "onnx" / "decoder_model_merged.onnx").write_bytes(b"half a graph")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_STAGING_LOCK, str(staging / ".export.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert abandoned_exports(output) == []
        # A running export's folder is content: the CLI refuses the folder as not empty, and leaves it as it was.
        assert main(["export-onnx", str(saved), "--output", str(output), "--no-int8"]) == 2
        assert "is not empty" in capsys.readouterr().err
        assert (staging / "onnx" / "decoder_model_merged.onnx").read_bytes() == b"half a graph"
    finally:
        holder.communicate("", timeout=60)
    # Its process gone, the lock is free: a killed export's folder, removed by the next export (no --overwrite).
    assert abandoned_exports(output) == [staging]
    assert main(["export-onnx", str(saved), "--output", str(output), "--no-int8"]) == 0
    assert not staging.exists() and sorted(path.name for path in output.glob(".*")) == []
    OnnxCaptioner(output)


def test_a_running_export_holds_its_staging_folder_s_lock_for_a_cleaner_that_cannot_see_its_process(
    onnx_export, tmp_path, monkeypatch
):
    import psutil

    import clipcap_hf.onnx.export
    from clipcap_hf.onnx.export import abandoned_exports, export_graphs

    _, saved, _ = onnx_export
    output = tmp_path / "export"
    seen = {}

    def export_graphs_and_look(*args, **kwargs):
        seen["staging"] = list(output.glob(".export-*"))
        seen["abandoned"] = abandoned_exports(output)  # as a cleaner in another container would judge mid-export
        return export_graphs(*args, **kwargs)

    monkeypatch.setattr(psutil, "pid_exists", lambda pid: False)  # every process ID looks ended from there
    monkeypatch.setattr(clipcap_hf.onnx.export, "export_graphs", export_graphs_and_look)
    assert main(["export-onnx", str(saved), "--output", str(output), "--no-int8"]) == 0
    assert len(seen["staging"]) == 1 and seen["staging"][0].name.endswith(".partial")
    assert seen["abandoned"] == []
    assert sorted(path.name for path in output.glob(".*")) == []  # the lock file left with its staging folder
    OnnxCaptioner(output)


def test_a_generation_config_without_a_length_captions_as_many_tokens_as_the_model_loaded_from_it(
    onnx_export, tmp_path
):
    from clipcap_hf import ClipCapForConditionalGeneration

    model, saved, exported = onnx_export
    # No length and no EOS token: both run to the length the folder leaves to their defaults.
    no_length = json.dumps({"suppress_tokens": model.generation_config.suppress_tokens})
    torch_folder, onnx_folder = tmp_path / "model", tmp_path / "export"
    shutil.copytree(saved, torch_folder)
    shutil.copytree(exported, onnx_folder, ignore=shutil.ignore_patterns("*_quantized.onnx"))
    for folder in (torch_folder, onnx_folder):
        (folder / "generation_config.json").write_text(no_length)
    image_embeds = torch.randn(2, model.config.prefix_dim, generator=torch.Generator().manual_seed(6))
    loaded = ClipCapForConditionalGeneration.from_pretrained(torch_folder, trust_remote_code=False)
    with torch.no_grad():
        expected = loaded.generate(image_embeds=image_embeds, do_sample=False)[:, PREFIX_LENGTH:].tolist()
    assert OnnxCaptioner(onnx_folder).generate(image_embeds=image_embeds.numpy()) == expected
    assert len(expected[0]) == 30  # ClipCap's default caption length


def test_export_onnx_loads_a_model_folder_named_from_the_home_folder(onnx_export, monkeypatch):
    import clipcap_hf.onnx

    model, saved, _ = onnx_export
    monkeypatch.setenv("HOME", str(saved.parent))
    loaded = []
    monkeypatch.setattr(clipcap_hf.onnx, "export_onnx", lambda model, *args, **kwargs: loaded.append(model) or {})
    assert main(["export-onnx", f"~/{saved.name}", "--output", str(saved.parent / "from-home")]) == 0
    torch.testing.assert_close(loaded[0].state_dict(), model.state_dict())


@torch.no_grad()
def test_an_open_clip_tower_exports_and_its_graphs_match_pytorch(tmp_path, tokenizer, test_pixels):
    pytest.importorskip("open_clip", reason="open_clip is not installed (pip install open_clip_torch)")
    from conftest import TINY_OPEN_CLIP_CFGS, tiny_open_clip

    from clipcap_hf import ClipCapConfig, ClipCapForConditionalGeneration, ClipCapOpenClipVisionModel

    # No `vision_config` with this backend: the export once read its model type there.
    captioning = captioning_model(tokenizer)
    config = ClipCapConfig(vision_backend="open_clip", open_clip_model_cfg=TINY_OPEN_CLIP_CFGS["vit"],
                           text_config=captioning.config.text_config, prefix_length=PREFIX_LENGTH,
                           image_token_id=captioning.config.image_token_id)  # fmt: skip
    tower = ClipCapOpenClipVisionModel(config.open_clip_model_cfg, visual=tiny_open_clip("vit").visual)
    model = ClipCapForConditionalGeneration(config, vision_model=tower).eval()
    # The captioning model's mapper and language model (the same sizes), whose captions differ from token to token.
    model.mapping_network.load_state_dict(captioning.mapping_network.state_dict())
    model.language_model.load_state_dict(captioning.language_model.state_dict())
    export_onnx(model, tiny_processor(tokenizer), tmp_path, quantize=False)
    assert_export_matches_pytorch(tmp_path, model, test_pixels)


@torch.no_grad()
@pytest.mark.parametrize(
    "layout",
    [{}, {"multi_query": False}, {"new_decoder_architecture": True, "num_kv_heads": 2}],
    ids=["multi-query (falcon-7b, the default)", "a key and value per head", "new decoder architecture"],
)
def test_cache_shape_is_the_shape_of_falcon_s_cache(tokenizer, layout):
    from transformers import FalconConfig

    text_config = FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=len(tokenizer),
                               **layout)  # fmt: skip
    model = tiny_model(tokenizer, text_config=text_config)
    cache = getattr(model.language_model(inputs_embeds=torch.randn(1, 3, 32), use_cache=True), CACHE_NAME)
    assert cache_shape(model) == (cache.layers[0].keys.shape[1], cache.layers[0].keys.shape[3])


def test_a_multi_query_falcon_exports_and_captions_as_generate(tmp_path, tokenizer):
    from transformers import FalconConfig

    # FalconConfig's default (falcon-7b's layout): one key/value head, which transformers 4.57's config does not say.
    text_config = FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=len(tokenizer),
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    assert text_config.multi_query and not text_config.new_decoder_architecture
    model = tiny_model(tokenizer, text_config=text_config)
    export_onnx(model, tiny_processor(tokenizer), tmp_path, quantize=False)
    image_embeds = torch.randn(4, model.config.prefix_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.generate(image_embeds=image_embeds, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    tokens = OnnxCaptioner(tmp_path).generate(image_embeds=image_embeds.numpy(), max_new_tokens=MAX_NEW_TOKENS)
    assert tokens == expected[:, PREFIX_LENGTH:].tolist()


@torch.no_grad()
def test_the_image_token_is_suppressed_whatever_suppress_tokens_says_as_generate_does(onnx_export):
    model, _, exported = onnx_export
    image_token = model.config.image_token_id

    def favour_the_image_token(logits):  # its logit (0: its head row is zeros) made 1 above the best other token's
        logits[..., image_token] = -np.inf
        logits[..., image_token] = logits.max(-1) + 1
        return logits

    captioner = OnnxCaptioner(exported)
    # A list of one's own replaces the saved one (the image token); generate() still never emits the image token.
    captioner.generation_config.suppress_tokens = [5]
    session = captioner.sessions["decoder_model_merged"]

    class Favouring:
        def run(self, output_names, feeds):
            logits, *present = session.run(output_names, feeds)
            return [favour_the_image_token(logits), *present]

    def favour_the_image_token_in_pytorch(module, args, logits):
        return torch.from_numpy(favour_the_image_token(logits.numpy()))

    captioner.sessions["decoder_model_merged"] = Favouring()
    hook = model.get_output_embeddings().register_forward_hook(favour_the_image_token_in_pytorch)
    image_embeds = torch.randn(3, model.config.prefix_dim, generator=torch.Generator().manual_seed(0))
    try:
        for num_beams in (1, 2):
            expected = model.generate(image_embeds=image_embeds, do_sample=False, max_new_tokens=8,
                                      num_beams=num_beams, suppress_tokens=[5])[:, PREFIX_LENGTH:].tolist()  # fmt: skip
            tokens = captioner.generate(image_embeds=image_embeds.numpy(), max_new_tokens=8, num_beams=num_beams)
            assert tokens == expected and not any(image_token in row for row in tokens)
    finally:
        hook.remove()


@torch.no_grad()
def test_suppressed_ids_outside_the_vocabulary_are_ignored_as_generate_does(onnx_export):
    model, _, exported = onnx_export
    image_embeds = torch.randn(2, model.config.prefix_dim, generator=torch.Generator().manual_seed(0))
    expected = model.generate(image_embeds=image_embeds, do_sample=False, max_new_tokens=4)[:, PREFIX_LENGTH:]
    # An id past the vocabulary, and a negative one that, counted from the vocabulary's end, names a token generated.
    vocab = model.get_output_embeddings().weight.shape[0]
    captioner = OnnxCaptioner(exported)
    suppressed = [*captioner.generation_config.suppress_tokens, vocab + 10, int(expected[0, 0]) - vocab]
    captioner.generation_config.suppress_tokens = suppressed
    expected = model.generate(image_embeds=image_embeds, do_sample=False, max_new_tokens=4, suppress_tokens=suppressed)
    assert captioner.generate(image_embeds=image_embeds.numpy(), max_new_tokens=4) == (
        expected[:, PREFIX_LENGTH:].tolist()
    )
