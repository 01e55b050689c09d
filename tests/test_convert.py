"""Converting the paper's released checkpoints, on synthetic checkpoints with the official key names and shapes."""

import hashlib
import json
import os
import pickle
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_tokenizer, random_images, save_open_clip_local_dir
from huggingface_hub import ModelCard
from torch import nn
from transformers import (
    AutoModel,
    AutoProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    GPT2Config,
    GPT2LMHeadModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import clipcap_hf.conversion.convert_original as convert_original
from clipcap_hf import (
    ClipCapForConditionalGeneration,
    ClipCapMLPMapper,
    convert_original_checkpoint,
)
from clipcap_hf.commands import build_parser, main

N_EMBD = 64  # one 64-wide head, so GPT-2's head count is inferred as for the real releases
N_LAYER = 2
PREFIX_DIM = 24  # the tiny CLIP towers' embedding width
PREFIX_LENGTH = {"mlp": 5, "transformer": 4}
CLIP_LENGTH = 3
MAPPER_LAYERS = 2
MAPPER_HEADS = 8  # hard-coded in the official transformer mapper


# ---------------------------------------------------------------- the official model's layout, re-created


class OriginalAttention(nn.Module):
    def __init__(self, width, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.to_queries = nn.Linear(width, width, bias=False)
        self.to_keys_values = nn.Linear(width, 2 * width, bias=False)
        self.project = nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        queries = self.to_queries(x).reshape(b, n, self.num_heads, c // self.num_heads)
        keys_values = self.to_keys_values(x).reshape(b, n, 2, self.num_heads, c // self.num_heads)
        keys, values = keys_values[:, :, 0], keys_values[:, :, 1]
        attention = (torch.einsum("bnhd,bmhd->bnmh", queries, keys) * (c // self.num_heads) ** -0.5).softmax(dim=2)
        return self.project(torch.einsum("bnmh,bmhd->bnhd", attention, values).reshape(b, n, c))


class OriginalMlp(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class OriginalTransformerLayer(nn.Module):
    def __init__(self, width, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = OriginalAttention(width, num_heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = OriginalMlp(width)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class OriginalTransformer(nn.Module):
    def __init__(self, width, num_heads, num_layers):
        super().__init__()
        self.layers = nn.ModuleList(OriginalTransformerLayer(width, num_heads) for _ in range(num_layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class OriginalTransformerMapper(nn.Module):
    def __init__(self, dim_clip, width, prefix_length, clip_length, num_layers):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = OriginalTransformer(width, MAPPER_HEADS, num_layers)
        self.linear = nn.Linear(dim_clip, clip_length * width)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, width))

    def forward(self, x):
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        prefix = self.prefix_const.unsqueeze(0).expand(x.shape[0], *self.prefix_const.shape)
        return self.transformer(torch.cat((x, prefix), dim=1))[:, self.clip_length :]


class OriginalClipCaptionModel(nn.Module):
    """The official `ClipCaptionModel`: module names, shapes and forward, at tiny widths and with random weights."""

    def __init__(self, mapping_type, vocab_size, n_embd=N_EMBD, n_head=None):
        super().__init__()
        self.prefix_length = PREFIX_LENGTH[mapping_type]
        config = GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=n_embd, n_layer=N_LAYER,
                            n_head=n_head or n_embd // 64, bos_token_id=0, eos_token_id=0)
        self.gpt = GPT2LMHeadModel(config).eval()
        if mapping_type == "mlp":
            hidden = n_embd * self.prefix_length
            self.clip_project = nn.Sequential()
            self.clip_project.model = nn.Sequential(
                nn.Linear(PREFIX_DIM, hidden // 2), nn.Tanh(), nn.Linear(hidden // 2, hidden)
            )
            self.clip_project.forward = self.clip_project.model.forward
        else:
            self.clip_project = OriginalTransformerMapper(PREFIX_DIM, n_embd, self.prefix_length, CLIP_LENGTH,
                                                          MAPPER_LAYERS)

    def prefix(self, image_embeds):
        return self.clip_project(image_embeds).view(-1, self.prefix_length, self.gpt.config.n_embd)

    @torch.no_grad()
    def forward(self, tokens, image_embeds):
        embeds = torch.cat((self.prefix(image_embeds), self.gpt.transformer.wte(tokens)), dim=1)
        return self.gpt(inputs_embeds=embeds).logits

    @torch.no_grad()
    def greedy(self, image_embeds, stop_token_id, entry_length=67):
        """The official greedy decoder: no cache, the whole sequence recomputed each step, argmax, stop at '.'."""
        generated = self.prefix(image_embeds)
        tokens = []
        for _ in range(entry_length):
            next_token = int(self.gpt(inputs_embeds=generated).logits[0, -1].argmax())
            tokens.append(next_token)
            generated = torch.cat((generated, self.gpt.transformer.wte(torch.tensor([[next_token]]))), dim=1)
            if next_token == stop_token_id:
                break
        return tokens


def make_original(mapping_type, tokenizer, seed=0, **kwargs):
    torch.manual_seed(seed)
    original = OriginalClipCaptionModel(mapping_type, len(tokenizer), **kwargs).eval()
    # A random GPT-2 repeats one token forever. Smaller token embeddings give varied tokens, and a pull towards '.'
    # that grows with the position ends captions after about ten tokens, as trained models do.
    with torch.no_grad():
        embeddings = original.gpt.transformer.wte.weight
        embeddings.mul_(0.35)
        towards_period = embeddings[period_id(tokenizer)] / embeddings[period_id(tokenizer)].norm()
        positions = original.gpt.transformer.wpe.weight
        steps = (torch.arange(positions.shape[0]) - original.prefix_length - 3).clamp(min=0)
        positions.add_(0.015 * steps[:, None] * towards_period)
    return original


def save_release(original, path):
    """`torch.save(model.state_dict())` as the official training script did, with old GPT-2's attention buffers."""
    state = original.state_dict()
    positions = original.gpt.config.n_positions
    for index in range(original.gpt.config.n_layer):
        state[f"gpt.transformer.h.{index}.attn.bias"] = torch.tril(torch.ones(positions, positions, dtype=torch.uint8))
        state[f"gpt.transformer.h.{index}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, path)
    return path


def release_state(mapping_type, tokenizer):
    return make_original(mapping_type, tokenizer).state_dict()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer():
    """A released model's tokenizer: GPT-2's scheme, without the image token (the converter adds it)."""
    return build_tokenizer(image_token=False)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("release_tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


def with_image_tokens(model, tokens):
    """`tokens` after the image tokens, as the processor writes them."""
    image_tokens = torch.full((tokens.shape[0], model.config.prefix_length), model.config.image_token_id)
    return torch.cat((image_tokens, tokens), dim=1)


def captions(model, sequences):
    return sequences[:, model.config.prefix_length :]


@pytest.fixture(scope="module")
def clip_vision_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip_vision")
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=PREFIX_DIM)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def open_clip_name(tmp_path_factory):
    return save_open_clip_local_dir(tmp_path_factory.mktemp("open_clip") / "rn", "resnet")[0]


@pytest.fixture(scope="module")
def local_parts(clip_vision_dir, open_clip_name, tokenizer_dir):
    """Conversion options that take the vision tower and tokenizer from local folders, per mapper type."""
    return {
        "mlp": {"vision_model": str(clip_vision_dir), "tokenizer": str(tokenizer_dir)},
        "transformer": {"vision_model": open_clip_name, "tokenizer": str(tokenizer_dir)},
    }


@pytest.fixture(scope="module", params=["mlp", "transformer"])
def converted(request, tmp_path_factory, tokenizer, local_parts):
    mapping_type = request.param
    folder = tmp_path_factory.mktemp(f"converted_{mapping_type}")
    original = make_original(mapping_type, tokenizer)
    checkpoint = save_release(original, folder / "release.pt")
    report = convert_original_checkpoint(checkpoint, folder / "clipcap", **local_parts[mapping_type])
    model = AutoModel.from_pretrained(folder / "clipcap").eval()
    return {"mapping_type": mapping_type, "original": original, "report": report, "model": model,
            "folder": folder / "clipcap"}


def period_id(tokenizer):
    return tokenizer(".", add_special_tokens=False)["input_ids"][0]


def image_embeds(count, seed=0):
    return torch.randn(count, PREFIX_DIM, generator=torch.Generator().manual_seed(seed)) * 4


def normalized_if(model, embeds):
    return embeds / embeds.norm(dim=-1, keepdim=True) if model.config.normalize_prefix else embeds


def assert_nothing_written(output):
    assert not output.exists()
    assert not [path.name for path in output.parent.iterdir() if path.name.endswith(".partial")]


# ---------------------------------------------------------------- parity with the original model


def test_converted_logits_equal_the_original_model(converted, tokenizer):
    model, original = converted["model"], converted["original"]
    assert converted["report"].max_logits_delta < 1e-9  # measured in float64 by the converter
    x = image_embeds(3)
    tokens = torch.randint(0, len(tokenizer), (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(image_embeds=x, input_ids=with_image_tokens(model, tokens)).logits
    expected = original(tokens, normalized_if(model, x))
    length = PREFIX_LENGTH[converted["mapping_type"]] + tokens.shape[1]
    # The image token follows the original vocabulary; the original's logits are compared on that vocabulary.
    assert model.config.image_token_id == len(tokenizer)
    assert ours.shape == (3, length, len(tokenizer) + 1) and expected.shape == (3, length, len(tokenizer))
    torch.testing.assert_close(ours[..., : len(tokenizer)], expected, atol=1e-4, rtol=0)


def test_greedy_captions_equal_the_original_decoder(converted, tokenizer):
    model, original = converted["model"], converted["original"]
    stop = period_id(tokenizer)
    x = image_embeds(4, seed=1)
    stopped_early = 0
    for row in range(4):
        expected = original.greedy(normalized_if(model, x[row : row + 1]), stop)
        # The original options: stop at '.' only, at most 67 tokens, no cache.
        ours = captions(model, model.generate(image_embeds=x[row : row + 1], eos_token_id=stop, max_new_tokens=67))
        ours = ours[0].tolist()
        assert ours == expected
        stopped_early += len(expected) < 67
        # The saved defaults stop at '.' or EOS: the same caption, up to the first EOS.
        default = captions(model, model.generate(image_embeds=x[row : row + 1]))[0].tolist()
        eos = tokenizer.eos_token_id
        assert default == (expected[: expected.index(eos) + 1] if eos in expected else expected)
    assert stopped_early  # the '.' stop was exercised


def test_captions_from_pixels_use_the_converted_vision_tower(converted):
    processor = AutoProcessor.from_pretrained(converted["folder"])
    model = converted["model"]
    pixel_values = processor(images=random_images(2, size=(70, 50)))["pixel_values"]
    with torch.no_grad():
        embeds = model.get_image_embeds(pixel_values)
    assert embeds.shape == (2, PREFIX_DIM)
    assert torch.equal(model.generate(pixel_values=pixel_values, max_new_tokens=6),
                       model.generate(image_embeds=embeds, max_new_tokens=6))


def test_converted_vision_tower_equals_the_source_tower(converted, clip_vision_dir, open_clip_name):
    """The saved and reloaded tower computes what the tower that was asked for computes, loaded by its own library."""
    pixel_values = AutoProcessor.from_pretrained(converted["folder"])(images=random_images(2, seed=3))["pixel_values"]
    with torch.no_grad():
        if converted["mapping_type"] == "mlp":
            source = CLIPVisionModelWithProjection.from_pretrained(clip_vision_dir).eval()
            expected = source(pixel_values=pixel_values).image_embeds
        else:
            import open_clip

            expected = open_clip.create_model(open_clip_name).eval().encode_image(pixel_values)
        ours = converted["model"].get_image_embeds(pixel_values)
    assert ours.shape == (2, PREFIX_DIM)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_beam_search_with_the_original_options_runs(converted, tokenizer):
    model = converted["model"]
    stop = period_id(tokenizer)
    out = model.generate(image_embeds=image_embeds(2, seed=2), num_beams=5, length_penalty=1.0, eos_token_id=stop,
                         max_new_tokens=20, num_return_sequences=2, output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape[0] == 4
    assert torch.all(out.sequences_scores.view(2, 2)[:, 0] >= out.sequences_scores.view(2, 2)[:, 1])
    assert all(isinstance(text, str) for text in tokenizer.batch_decode(out.sequences, skip_special_tokens=True))


def test_written_folder_is_complete(converted, tokenizer):
    folder, report = converted["folder"], converted["report"]
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", "modeling_clipcap.py",
            "open_clip_vision.py"} <= names
    assert not [name for name in names if name.endswith((".bin", ".pt", ".partial"))]
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [period_id(tokenizer), tokenizer.eos_token_id]
    assert generation["max_new_tokens"] == 67
    config = converted["model"].config
    mapping_type = converted["mapping_type"]
    assert (config.mapping_type, config.prefix_length, config.prefix_dim) == (
        mapping_type, PREFIX_LENGTH[mapping_type], PREFIX_DIM)
    if mapping_type == "transformer":
        assert (config.clip_length, config.mapping_num_layers, config.mapping_num_heads) == (3, 2, 8)
        assert (config.vision_backend, config.normalize_prefix) == ("open_clip", True)
        assert report.preset == "coco-transformer"
    else:
        assert (config.vision_backend, config.normalize_prefix, report.preset) == ("clip", False, "coco-mlp")
    assert config.text_config.n_head == 1 and config.text_config.n_layer == N_LAYER
    assert len(report.dropped_keys) == 2 * N_LAYER
    card = ModelCard.load(folder / "README.md")
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "image-to-text")
    checkpoint = folder.parent / "release.pt"
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert f"sha256 `{sha256}`" in card.text
    # The record a later `overwrite` reads: every file the conversion wrote besides itself.
    record = json.loads((folder / "clipcap_conversion.json").read_text())
    assert record["files"] == sorted(names - {"clipcap_conversion.json"})
    assert record["sha256"] == {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
                                for name in record["files"]}
    assert (record["checkpoint"], record["checkpoint_sha256"], record["preset"]) == (
        "release.pt", sha256, report.preset)


def test_an_untied_output_layer_is_kept(tmp_path, tokenizer, local_parts):
    original = make_original("mlp", tokenizer, seed=5)
    with torch.no_grad():
        original.gpt.lm_head.weight = nn.Parameter(original.gpt.lm_head.weight + 0.01 * torch.randn_like(
            original.gpt.lm_head.weight))
    checkpoint = save_release(original, tmp_path / "release.pt")
    convert_original_checkpoint(checkpoint, tmp_path / "out", **local_parts["mlp"])
    model = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert not model.config.text_config.tie_word_embeddings
    x, tokens = image_embeds(2), torch.tensor([[5, 6, 7], [8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(model(image_embeds=x, input_ids=with_image_tokens(model, tokens)).logits[..., :-1],
                                   original(tokens, x), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- command line


def test_cli_converts_with_options(tmp_path, tokenizer, local_parts, capsys):
    original = make_original("mlp", tokenizer, seed=4, n_embd=32, n_head=4)  # not GPT-2's 64-wide heads
    checkpoint = save_release(original, tmp_path / "release.pt")
    parts = local_parts["mlp"]
    arguments = ["convert-original", str(checkpoint), "--output", str(tmp_path / "out"), "--preset", "conceptual-mlp",
                 "--vision-model", parts["vision_model"], "--tokenizer", parts["tokenizer"], "--normalize-prefix"]
    assert main(arguments) == 2
    assert "the number of attention heads cannot be inferred; pass it" in capsys.readouterr().err
    assert main(arguments + ["--lm-num-heads", "0"]) == 2
    assert "argument --lm-num-heads: must be at least 1, got 0" in capsys.readouterr().err
    assert main(arguments + ["--lm-num-heads", "3"]) == 2
    assert "`lm_num_heads` (--lm-num-heads) 3 does not divide GPT-2's width 32" in capsys.readouterr().err
    assert main(arguments + ["--lm-num-heads", "4"]) == 0
    assert "Wrote" in capsys.readouterr().out
    model = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert model.config.normalize_prefix and model.config.text_config.n_head == 4
    x = image_embeds(2)
    tokens = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(model(image_embeds=x, input_ids=with_image_tokens(model, tokens)).logits[..., :-1],
                                   original(tokens, normalized_if(model, x)), atol=1e-4, rtol=0)
    assert "google-research-datasets/conceptual_captions" in (tmp_path / "out" / "README.md").read_text()


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    arguments = ["convert-original", str(missing), "--output", str(tmp_path / "out")]
    assert main(arguments) == 2
    assert capsys.readouterr().err == f"clipcap convert-original: error: Checkpoint {missing} does not exist.\n"
    # main() turns the error into that message; the command itself keeps its type.
    args = build_parser().parse_args(arguments)
    with pytest.raises(FileNotFoundError):
        args.handler(args)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("document", ["README.md", "model_card.md"])
def test_documented_commands_parse(document):
    text = (Path(__file__).resolve().parents[1] / document).read_text()
    commands = re.findall(r"clipcap convert-original [^`\n]*", text)
    assert commands
    for command in commands:
        build_parser().parse_args(shlex.split(command)[1:])  # exits on a missing required argument
    # huggingface_hub 1.x ships only the `hf` command.
    assert "huggingface-cli" not in text


def test_model_card_points_to_sections_that_exist():
    root = Path(__file__).resolve().parents[1]
    # 'See "SECTION" in `docs/PAGE.md`' or 'in the `clipcap_hf` README'
    references = re.findall(r'"([^"]+)" in (?:`(docs/[\w.]+\.md)`|the `clipcap_hf` (README))',
                            (root / "model_card.md").read_text())
    assert references
    for section, page, _ in references:
        document = page or "README.md"
        assert f"# {section}\n" in (root / document).read_text(), f"{document} has no section {section!r}"


# ---------------------------------------------------------------- bad inputs


class RunsCode:
    """Unpickling this runs a shell command: what weights_only=True must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def missing_key(state):
    del state["gpt.transformer.h.1.mlp.c_proj.bias"]
    return state


def wrong_shape(state):
    state["clip_project.model.2.bias"] = state["clip_project.model.2.bias"][:-1]
    return state


def ragged_prefix(state):
    state["clip_project.model.2.weight"] = state["clip_project.model.2.weight"][:-1]
    return state


def unexpected_key(state):
    state["clip_project.model.4.weight"] = torch.zeros(2, 2)
    return state


def no_mapper(state):
    return {key: value for key, value in state.items() if not key.startswith("clip_project.")}


@pytest.mark.parametrize(
    "edit, message",
    [
        (missing_key, "missing key 'gpt.transformer.h.1.mlp.c_proj.bias'"),
        (wrong_shape, "'clip_project.model.2.bias' has shape (319,), expected (320,)"),
        (ragged_prefix, "'clip_project.model.2.weight' has 319 rows, not a multiple of GPT-2's width 64: the MLP "
         "mapper must output prefix_length x n_embd values."),
        (unexpected_key, "unexpected key 'clip_project.model.4.weight'"),
        (no_mapper, "has no mapping network: expected 'clip_project.model.0.weight' (MLP mapper)"),
        (lambda state: {k: v for k, v in state.items() if k != "gpt.transformer.wte.weight"},
         "lacks 'gpt.transformer.wte.weight' (GPT-2's token embeddings)"),
    ],
)
def test_inconsistent_checkpoints_are_refused(tmp_path, tokenizer, local_parts, edit, message):
    checkpoint = tmp_path / "release.pt"
    torch.save(edit(release_state("mlp", tokenizer)), checkpoint)
    with pytest.raises(ValueError) as error:
        convert_original_checkpoint(checkpoint, tmp_path / "out", **local_parts["mlp"])
    assert str(error.value).startswith(f"{checkpoint}: ")  # which file, when converting several
    assert message in str(error.value)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize(
    "mapping_type, stray_key, message",
    [
        ("mlp", "gpt.transformer.h.40.ln_1.weight",
         "GPT-2 layers ('gpt.transformer.h.N.*') are numbered up to 40, but layer 2 is missing"),
        ("transformer", "clip_project.transformer.layers.40.norm1.weight",
         "transformer mapper's layers ('clip_project.transformer.layers.N.*') are numbered up to 40, but layer 2 is "
         "missing"),
    ],
)
def test_a_stray_layer_index_is_refused_before_a_model_is_built(tmp_path, tokenizer, local_parts, monkeypatch,
                                                                 mapping_type, stray_key, message):
    # The depth is the number of layers, not the highest index + 1: one stray key must not build a 41-layer model
    # (or one thousands of layers deep) before the keys are checked.
    state = release_state(mapping_type, tokenizer)
    state[stray_key] = torch.ones(N_EMBD)
    checkpoint = tmp_path / "release.pt"
    torch.save(state, checkpoint)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built for a checkpoint with a layer missing")

    monkeypatch.setattr(convert_original, "ClipCapForConditionalGeneration", no_model)
    monkeypatch.setattr(convert_original, "load_pretrained_vision_model", no_model)
    with pytest.raises(ValueError) as error:
        convert_original_checkpoint(checkpoint, tmp_path / "out", **local_parts[mapping_type])
    assert str(error.value).startswith(f"{checkpoint}: The checkpoint's {message} (no '")
    assert_nothing_written(tmp_path / "out")


def flatten(key):
    def edit(state):
        state[key] = state[key].flatten()
        return state

    return edit


@pytest.mark.parametrize("key", ["gpt.transformer.h.0.mlp.c_fc.weight", "gpt.transformer.wte.weight",
                                 "clip_project.model.0.weight"])
def test_tensors_read_as_matrices_must_be_matrices(tmp_path, tokenizer, local_parts, key):
    checkpoint = tmp_path / "release.pt"
    torch.save(flatten(key)(release_state("mlp", tokenizer)), checkpoint)
    with pytest.raises(ValueError) as error:
        convert_original_checkpoint(checkpoint, tmp_path / "out", **local_parts["mlp"])
    assert str(error.value).startswith(f"{checkpoint}: The checkpoint's {key!r} (")
    assert "not a matrix" in str(error.value)
    assert_nothing_written(tmp_path / "out")


def write_text(path):
    path.write_text("not a checkpoint")


def write_empty(path):
    path.write_bytes(b"")


def write_list(path):
    torch.save([torch.zeros(2)], path)


def write_non_tensor_entry(path):
    torch.save({"gpt.transformer.wte.weight": torch.zeros(2), "epoch": 3}, path)


def write_raw_pickle(path):
    path.write_bytes(pickle.dumps({"a": 1}))


def write_meta_tensor(path):  # a model built on the meta device, saved before its weights were loaded
    torch.save({"gpt.transformer.wte.weight": torch.empty(4, 8, device="meta")}, path)


def write_empty_dict(path):
    torch.save({}, path)


def write_number_key(path):
    torch.save({1: torch.zeros(2)}, path)


def write_nested_state_dict(path):  # a training checkpoint: the weights under a key
    torch.save({"state_dict": {"gpt.transformer.wte.weight": torch.zeros(2)}, "epoch": 3}, path)


def write_quantized_tensor(path):
    quantized = torch.quantize_per_tensor(torch.ones(2, 2), 0.1, 0, torch.qint8)
    torch.save({"clip_project.model.0.weight": quantized}, path)


def write_nan_tensor(path):
    state = {"gpt.transformer.wte.weight": torch.zeros(4, 8), "clip_project.model.0.bias": torch.tensor([0, np.nan])}
    torch.save(state, path)


@pytest.mark.parametrize(
    "write, message",
    [
        (write_text, r"is not a PyTorch checkpoint \(torch.load: not a file that `torch.save` writes\)\.$"),
        (write_empty, r"is not a PyTorch checkpoint \(torch.load: not a file that `torch.save` writes\)\.$"),
        (write_empty_dict, r"release.pt holds an empty dict: no tensor to convert\.$"),
        (write_number_key, r"release.pt is not a state dict: its key 1 is a int, not a name\.$"),
        (write_nested_state_dict, r"entry 'state_dict' is a dict, not a tensor; if it holds the weights, save "
         r"`checkpoint\['state_dict'\]` alone\.$"),
        (write_quantized_tensor, r"entry 'clip_project.model.0.weight' is a quantized tensor \(torch.qint8\), which "
         r"the converter does not read; convert the checkpoint of float weights \(`tensor.dequantize\(\)`\)\.$"),
        (write_nan_tensor, r"entry 'clip_project.model.0.bias' holds NaN or infinite values; the checkpoint is "
         r"damaged\.$"),
        (write_list, "holds a list, not a state dict"),
        (write_non_tensor_entry, "entry 'epoch' is a int, not a tensor"),
        (write_raw_pickle, "is not a PyTorch checkpoint"),
        (write_meta_tensor, r"entry 'gpt.transformer.wte.weight' holds no values \(a meta tensor"),
    ],
)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_files_that_are_not_checkpoints_are_refused(tmp_path, write, message):
    checkpoint = tmp_path / "release.pt"
    write(checkpoint)
    with pytest.raises(ValueError, match=message):
        convert_original_checkpoint(checkpoint, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def saved_with_its_record(state, key, path):
    """`torch.save(state, path)`, the file's bytes, the zip record holding `state[key]`'s values and their offset."""
    torch.save(state, path)
    values = state[key].numpy().tobytes()
    with zipfile.ZipFile(path) as archive:
        record = next(info for info in archive.infolist() if archive.read(info) == values)
    raw = bytearray(path.read_bytes())
    return raw, record, raw.find(values)


@pytest.mark.parametrize("damage", ["a value", "a record header"])
def test_a_damaged_checkpoint_is_named_as_damaged_not_converted(tmp_path, tokenizer, local_parts, damage):
    # torch.load does not check the zip's checksums: one float overwritten converted into a model with that weight.
    state = release_state("mlp", tokenizer)
    key = "clip_project.model.0.bias"
    checkpoint = tmp_path / "release.pt"
    raw, record, offset = saved_with_its_record(state, key, checkpoint)
    if damage == "a value":
        raw[offset + 8 : offset + 12] = np.float32(1.0).tobytes()
    else:
        raw[record.header_offset : record.header_offset + 4] = b"XXXX"
    checkpoint.write_bytes(bytes(raw))
    with pytest.raises(ValueError) as error:
        convert_original_checkpoint(checkpoint, tmp_path / "out", **local_parts["mlp"])
    assert str(error.value) == (
        f"{checkpoint} is damaged: its record {record.filename!r} does not match its CRC-32 checksum or its header, "
        "so it is not the file `torch.save` wrote (an interrupted or corrupted download, or a failing disk). Download "
        "it again (https://github.com/rmokady/CLIP_prefix_caption links the released files)."
    )
    assert_nothing_written(tmp_path / "out")


def test_a_checkpoint_saved_without_checksums_loads(tmp_path, tokenizer):
    # torch can write its zip records with no CRC-32 (all zero): nothing to check, and no damage to name.
    state = release_state("mlp", tokenizer)
    checkpoint = tmp_path / "release.pt"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, checkpoint)
    finally:
        torch.serialization.set_crc32_options(True)
    loaded = convert_original.load_original_state_dict(checkpoint)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[key], state[key]) for key in state)


def test_a_checkpoint_cut_short_is_named_as_damaged(tmp_path, tokenizer):
    checkpoint = tmp_path / "release.pt"
    torch.save(release_state("mlp", tokenizer), checkpoint)
    checkpoint.write_bytes(checkpoint.read_bytes()[:-100])
    with pytest.raises(ValueError) as error:
        convert_original.load_original_state_dict(checkpoint)
    assert str(error.value).startswith(
        f"{checkpoint} is damaged: it is cut short (it lacks the directory of records that ends a zip archive), so it "
        "is not the file `torch.save` wrote"
    )


def test_a_legacy_format_checkpoint_has_no_checksums_to_check(tmp_path, tokenizer):
    state = release_state("mlp", tokenizer)
    checkpoint = tmp_path / "release.pt"
    torch.save(state, checkpoint, _use_new_zipfile_serialization=False)
    loaded = convert_original.load_original_state_dict(checkpoint)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[key], state[key]) for key in state)


@pytest.mark.parametrize(
    "key, values",
    [
        ("clip_project.model.0.weight", torch.randint(0, 3, (160, PREFIX_DIM))),
        ("clip_project.model.0.bias", torch.ones(160, dtype=torch.bool)),
        ("clip_project.model.0.bias", torch.randn(160, dtype=torch.complex64)),
        ("gpt.transformer.wte.weight", torch.randint(0, 3, (300, N_EMBD), dtype=torch.int32)),
    ],
)
def test_weights_that_are_not_floating_point_are_refused_not_cast(tmp_path, tokenizer, local_parts, key, values):
    # They were cast to float32 without a word; the uint8 `attn.bias` buffers the converter drops stay accepted.
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    state = torch.load(checkpoint, weights_only=True)
    assert state[key].shape == values.shape and state["gpt.transformer.h.0.attn.bias"].dtype == torch.uint8
    torch.save(state | {key: values}, checkpoint)
    with pytest.raises(ValueError) as error:
        convert_original_checkpoint(checkpoint, tmp_path / "out", **local_parts["mlp"])
    assert str(error.value) == (
        f"{checkpoint}: entry {key!r} holds {values.dtype} values, not floating-point weights (the released "
        "checkpoints hold float32 ones); convert the checkpoint as it was released, not one cast by another tool."
    )
    assert_nothing_written(tmp_path / "out")


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize("layout", [torch.Tensor.to_sparse, torch.Tensor.to_sparse_csr])
def test_sparse_tensors_in_a_checkpoint_are_named_not_called_empty(tmp_path, tokenizer, layout):
    # They were refused as tensors that "hold no values", which is a meta tensor's fault; a sparse one declares its
    # dense size, which a small file can make huge, so it is refused as sparse rather than expanded.
    state = make_original("mlp", tokenizer, seed=6).state_dict()
    key = "clip_project.model.0.weight"
    checkpoint = tmp_path / "release.pt"
    torch.save(state | {key: layout(state[key])}, checkpoint)
    with pytest.raises(ValueError) as error:
        convert_original.load_original_state_dict(checkpoint)
    assert str(error.value) == (
        f"{checkpoint}: entry {key!r} is a {layout(state[key]).layout} tensor, which the converter does not read; "
        "save the checkpoint's tensors dense (`tensor.to_dense()`)."
    )


def test_a_folder_given_as_the_checkpoint_is_named(tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as error:
        convert_original_checkpoint(folder, tmp_path / "out")
    assert str(error.value) == f"Checkpoint {folder} is a folder; give the released .pt file, e.g. coco_weights.pt."
    (folder / "coco_weights.pt").write_bytes(b"")
    (folder / "README.md").write_text("")
    with pytest.raises(IsADirectoryError) as error:
        convert_original_checkpoint(folder, tmp_path / "out")
    assert str(error.value) == (
        f"Checkpoint {folder} is a folder; give the released .pt file, e.g. {folder / 'coco_weights.pt'}."
    )
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize(
    "protocol, message",
    [
        ("torch", r"Refused to load .*release\.pt: it holds Python objects \(\w+\.system\), not only tensors"),
        (2, r"Refused to load .*release\.pt: it holds Python objects \(\w+\.system\), not only tensors"),
        (pickle.DEFAULT_PROTOCOL, r"release\.pt is not a PyTorch checkpoint"),  # refused before reaching the call
    ],
)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_that_would_run_code_is_refused_unexecuted(tmp_path, protocol, message):
    marker = tmp_path / "code_ran"
    checkpoint = tmp_path / "release.pt"
    payload = {"clip_project.linear.weight": RunsCode(marker)}
    if protocol == "torch":
        torch.save(payload, checkpoint)
    else:
        checkpoint.write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(ValueError, match=message):
        convert_original_checkpoint(checkpoint, tmp_path / "out")
    assert not marker.exists()
    assert_nothing_written(tmp_path / "out")


def test_preset_must_match_the_mapper(tmp_path, tokenizer, local_parts):
    checkpoint = save_release(make_original("transformer", tokenizer), tmp_path / "release.pt")
    with pytest.raises(ValueError) as error:
        convert_original_checkpoint(checkpoint, tmp_path / "out", preset="coco-mlp", **local_parts["transformer"])
    assert str(error.value) == (f"{checkpoint}: Preset 'coco-mlp' is a mlp release but the checkpoint has a "
                                "transformer mapper; use one of ['coco-transformer'].")
    with pytest.raises(ValueError, match="trained with RN50x4, which vision_backend='clip' does not offer; use "
                                         "vision_backend='open_clip'"):
        convert_original_checkpoint(checkpoint, tmp_path / "out", vision_backend="clip")
    with pytest.raises(ValueError, match=r"Unknown preset 'coco'; choose one of \['coco-mlp'"):
        convert_original_checkpoint(checkpoint, tmp_path / "out", preset="coco")
    assert_nothing_written(tmp_path / "out")


def test_open_clip_names_choose_the_open_clip_backend(tmp_path, tokenizer, local_parts):
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    tokenizer_dir = local_parts["mlp"]["tokenizer"]
    # The tiny open_clip ResNet has the MLP release's embedding width.
    report = convert_original_checkpoint(checkpoint, tmp_path / "out", tokenizer=tokenizer_dir,
                                         vision_model=local_parts["transformer"]["vision_model"])
    assert report.config.vision_backend == "open_clip"
    with pytest.raises(FileNotFoundError, match=r"the folder .*missing does not exist"):
        convert_original_checkpoint(checkpoint, tmp_path / "out2", vision_model=f"local-dir:{tmp_path / 'missing'}",
                                    tokenizer=tokenizer_dir)
    assert_nothing_written(tmp_path / "out2")


def test_an_open_clip_tag_selects_the_open_clip_backend(tmp_path, tokenizer, local_parts, monkeypatch, capsys):
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    requested = []

    def offline_loader(name, backend, tag):  # records what the real loader would be asked to download
        requested.append((name, backend, tag))
        raise OSError("no network")

    monkeypatch.setattr(convert_original, "load_pretrained_vision_model", offline_loader)
    tokenizer_dir = local_parts["mlp"]["tokenizer"]
    # The MLP presets default to HF CLIP, but a pretrained tag means open_clip, named or the preset's ViT-B-32.
    assert main(["convert-original", str(checkpoint), "--output", str(tmp_path / "out"), "--vision-model", "ViT-B-32",
                 "--open-clip-pretrained", "openai", "--tokenizer", tokenizer_dir]) == 2
    assert capsys.readouterr().err == (
        "clipcap convert-original: error: Could not load the vision model 'ViT-B-32': no network. Choose the vision "
        "model with `vision_model` (--vision-model); without network access, give a local folder.\n"
    )
    with pytest.raises(OSError, match="Could not load the vision model 'ViT-B-32'"):
        convert_original_checkpoint(checkpoint, tmp_path / "out", open_clip_pretrained="laion2b_s34b_b79k",
                                    tokenizer=tokenizer_dir)
    # The preset's open_clip model named without a tag gets the preset's tag.
    with pytest.raises(OSError, match="Could not load the vision model 'ViT-B-32'"):
        convert_original_checkpoint(checkpoint, tmp_path / "out", vision_backend="open_clip", vision_model="ViT-B-32",
                                    tokenizer=tokenizer_dir)
    assert requested == [("ViT-B-32", "open_clip", "openai"), ("ViT-B-32", "open_clip", "laion2b_s34b_b79k"),
                         ("ViT-B-32", "open_clip", "openai")]
    # Another one has no default tag: the option is named before anything is loaded.
    assert main(["convert-original", str(checkpoint), "--output", str(tmp_path / "out"), "--vision-backend",
                 "open_clip", "--vision-model", "ViT-L-14", "--tokenizer", tokenizer_dir]) == 2
    assert capsys.readouterr().err == (
        "clipcap convert-original: error: The open_clip model 'ViT-L-14' needs a pretrained tag, which only the "
        "preset's own open_clip model ('coco-mlp': ViT-B-32) has by default; pass `open_clip_pretrained` "
        "(--open-clip-pretrained), e.g. openai, or name a 'local-dir:' or 'hf-hub:' model.\n"
    )
    assert len(requested) == 3
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("option", ["tokenizer", "vision_model"])
def test_a_part_that_cannot_be_loaded_is_named_with_its_option(tmp_path, tokenizer, local_parts, option):
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    name = "clipcap-test/not-in-the-cache"  # offline: named before transformers tries to download it
    with pytest.raises(OSError) as error:
        convert_original_checkpoint(checkpoint, tmp_path / "out", **{**local_parts["mlp"], option: name})
    spelled = f"`{option}` (--{option.replace('_', '-')})"
    assert str(error.value) == (
        f"{spelled} {name}: no such folder, and this Hub model is not in the local cache (HF_HUB_OFFLINE is set). "
        f"Give {spelled} a local folder, or download the model once while online."
    )
    assert_nothing_written(tmp_path / "out")


def test_a_failed_part_keeps_its_built_in_error_type(tmp_path, tokenizer, local_parts, monkeypatch):
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")

    def unreadable(name, backend, tag):
        raise PermissionError(13, "Permission denied", name)

    monkeypatch.setattr(convert_original, "load_pretrained_vision_model", unreadable)
    with pytest.raises(PermissionError, match=r"^Could not load the vision model '.*': \[Errno 13\] Permission denied"):
        convert_original_checkpoint(checkpoint, tmp_path / "out", **local_parts["mlp"])


TOKENIZER_FILES = "tokenizer_config.json or tokenizer.json or vocab.json or tokenizer.model"


@pytest.mark.parametrize("option, files", [("tokenizer", TOKENIZER_FILES), ("vision_model", "config.json")])
def test_a_local_part_that_is_no_such_folder_is_named_with_its_option(tmp_path, tokenizer, local_parts, option, files):
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.json").write_text("{}")
    for name, problem in [
        (str(tmp_path / "missing"), f"folder {tmp_path / 'missing'} does not exist"),
        ("./no-such-folder", "folder ./no-such-folder does not exist"),  # a valid Hub id, but a path
        (str(tmp_path / "file.json"), f"{tmp_path / 'file.json'} is a file; give the folder that holds it"),
        (str(tmp_path / "empty"), f"{tmp_path / 'empty'} holds no {files}"),
    ]:
        with pytest.raises(OSError) as error:
            convert_original_checkpoint(checkpoint, tmp_path / "out", **{**local_parts["mlp"], option: name})
        assert str(error.value) == f"`{option}` (--{option.replace('_', '-')}): {problem}."
    assert_nothing_written(tmp_path / "out")


def test_an_open_clip_name_with_the_clip_backend_is_refused(tmp_path, tokenizer, local_parts):
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    parts = {**local_parts["mlp"], "vision_model": f"local-dir:{tmp_path}"}
    with pytest.raises(ValueError) as error:
        convert_original_checkpoint(checkpoint, tmp_path / "out", vision_backend="clip", **parts)
    assert str(error.value) == (
        f"The vision model 'local-dir:{tmp_path}' names an open_clip model, which vision_backend='clip' "
        "(--vision-backend clip) does not read; leave the backend out, or set it to 'open_clip'."
    )


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, tokenizer, local_parts):
    checkpoint = save_release(OriginalClipCaptionModel("mlp", len(tokenizer) - 1), tmp_path / "release.pt")
    with pytest.raises(ValueError) as error:
        convert_original_checkpoint(checkpoint, tmp_path / "out", **local_parts["mlp"])
    assert str(error.value) == (
        f"The tokenizer {local_parts['mlp']['tokenizer']!r} has {len(tokenizer)} tokens but the checkpoint's GPT-2 "
        f"embeds only {len(tokenizer) - 1}; use the tokenizer the checkpoint was trained with (GPT-2's)."
    )
    assert_nothing_written(tmp_path / "out")


# The tokenizer has 300 tokens: 308 and 400 rows are no multiple of a power of two above them (a multiple of 4 and
# of 16), 2048 is a power of two past the largest padding multiple (1024).
@pytest.mark.parametrize("vocab_size", [308, 400, 2048])
def test_a_tokenizer_smaller_than_padding_explains_is_refused(tmp_path, tokenizer, local_parts, vocab_size):
    # Converted before, with a warning: the image token took row 300 of a checkpoint trained with another tokenizer.
    assert len(tokenizer) == 300
    checkpoint = save_release(OriginalClipCaptionModel("mlp", vocab_size), tmp_path / "release.pt")
    with pytest.raises(ValueError) as error:
        convert_original_checkpoint(checkpoint, tmp_path / "out", **local_parts["mlp"])
    assert str(error.value) == (
        f"The tokenizer {local_parts['mlp']['tokenizer']!r} has 300 tokens but the checkpoint's GPT-2 embeds "
        f"{vocab_size}, more than padding its vocabulary (to a multiple of 64, say) would add: the checkpoint was "
        "trained with another tokenizer. Use that one (GPT-2's, for the released checkpoints)."
    )
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("vocab_size", [320, 1024])  # 300 rounded up to a multiple of 64, and of 1024
def test_a_vocabulary_padded_past_the_tokenizer_converts(tmp_path, tokenizer, local_parts, caplog, vocab_size):
    checkpoint = save_release(OriginalClipCaptionModel("mlp", vocab_size), tmp_path / "padded.pt")
    with caplog.at_level("WARNING", logger="clipcap_hf.conversion.convert_original"):
        report = convert_original_checkpoint(checkpoint, tmp_path / "out", **local_parts["mlp"])
    # The image token takes the first padding row, which no token uses.
    assert report.config.image_token_id == 300
    assert report.config.text_config.vocab_size == vocab_size
    assert "the image token takes row 300, which no token of this tokenizer uses" in caplog.text


def test_a_tokenizer_folder_of_gpt2_s_older_layout_converts(tmp_path, tokenizer, local_parts):
    # vocab.json and merges.txt beside a config.json, no tokenizer_config.json: AutoTokenizer reads it.
    folder = tmp_path / "gpt2"
    folder.mkdir()
    tokenizer.backend_tokenizer.model.save(str(folder))
    GPT2Config(n_layer=1, n_embd=N_EMBD, n_head=1, vocab_size=len(tokenizer)).save_pretrained(folder)
    assert sorted(path.name for path in folder.iterdir()) == ["config.json", "merges.txt", "vocab.json"]
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    report = convert_original_checkpoint(checkpoint, tmp_path / "out", vision_model=local_parts["mlp"]["vision_model"],
                                         tokenizer=str(folder))
    assert report.config.image_token_id == len(tokenizer)
    # Without its merges.txt, AutoTokenizer fails with a bare TypeError or ValueError: named with the option.
    (folder / "merges.txt").unlink()
    with pytest.raises(OSError, match=rf"^Could not load the tokenizer {re.escape(repr(str(folder)))}: .*\. Choose "
                                      r"the tokenizer with `tokenizer` \(--tokenizer\)\.$"):
        convert_original_checkpoint(checkpoint, tmp_path / "again", vision_model=local_parts["mlp"]["vision_model"],
                                    tokenizer=str(folder))


def test_vision_tower_width_must_match_the_mapper(tmp_path, tokenizer, local_parts):
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    # The open_clip ModifiedResNet has the right width; a 16-d HF CLIP does not.
    narrow = tmp_path / "narrow_clip"
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=4, image_size=32, patch_size=8,
                                                   projection_dim=16)).save_pretrained(narrow)
    with pytest.raises(ValueError, match="mapper reads 24-d CLIP embeddings but the vision tower .* produces 16-d"):
        convert_original_checkpoint(checkpoint, tmp_path / "out", vision_model=str(narrow),
                                    tokenizer=local_parts["mlp"]["tokenizer"])
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("tower", ["dinov2", "siglip"])
def test_a_vision_tower_that_is_not_a_clip_is_refused_before_it_is_loaded(tmp_path, tokenizer, local_parts,
                                                                          monkeypatch, capsys, tower):
    # The releases' mappers read CLIP embeddings; another tower's mean nothing to them, whatever their width.
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    folder = tmp_path / tower
    vision = {"hidden_size": PREFIX_DIM, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    if tower == "dinov2":
        Dinov2Model(Dinov2Config(**vision)).save_pretrained(folder)
    else:
        SiglipVisionModel(SiglipVisionConfig(**vision)).save_pretrained(folder)

    def no_loading(*args, **kwargs):
        raise AssertionError("the tower's weights were loaded before it was refused")

    monkeypatch.setattr(convert_original, "load_pretrained_vision_model", no_loading)
    capsys.readouterr()  # transformers 5's progress bars while saving the tower
    assert main(["convert-original", str(checkpoint), "--output", str(tmp_path / "out"), "--vision-model",
                 str(folder), "--tokenizer", local_parts["mlp"]["tokenizer"]]) == 2
    model_type = "dinov2" if tower == "dinov2" else "siglip_vision_model"
    assert capsys.readouterr().err == (
        f"clipcap convert-original: error: The vision tower {str(folder)!r} is a {model_type!r} model, not a CLIP: the "
        "released mappers read the embeddings of the CLIP they were trained with (preset 'coco-mlp': "
        "openai/clip-vit-base-patch32), and another tower's embeddings mean nothing to them. Give that CLIP with "
        "`vision_model` (--vision-model); to caption with another tower, train a ClipCap model on it (clipcap "
        "train).\n"
    )
    assert_nothing_written(tmp_path / "out")


def test_existing_output_needs_overwrite(tmp_path, tokenizer, local_parts):
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    output = tmp_path / "out"
    convert_original_checkpoint(checkpoint, output, **local_parts["mlp"])
    card = (output / "README.md").read_text()
    (output / "generation_config.json").unlink()
    with pytest.raises(ValueError, match="already exists; remove it or pass overwrite=True"):
        convert_original_checkpoint(checkpoint, output, **local_parts["mlp"])
    # The earlier conversion's files, removed since, are written again.
    convert_original_checkpoint(checkpoint, output, overwrite=True, **local_parts["mlp"])
    assert (output / "README.md").read_text() == card and (output / "generation_config.json").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "release.pt"]


def test_overwrite_keeps_the_files_edited_since_the_conversion(tmp_path, tokenizer, local_parts):
    # The model card the docs say to edit before publishing was replaced by the stub without a word.
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    output = tmp_path / "out"
    convert_original_checkpoint(checkpoint, output, **local_parts["mlp"])
    card = (output / "README.md").read_text()
    (output / "README.md").write_text("my card")
    with pytest.raises(ValueError) as error:
        convert_original_checkpoint(checkpoint, output, overwrite=True, **local_parts["mlp"])
    assert str(error.value) == (
        f"Refusing to replace {output}: 'README.md' changed since the earlier conversion wrote it, and replacing the "
        "folder would lose the changes. Move it out of the folder to keep it (or delete it to discard the changes), "
        "then convert again; or choose another folder."
    )
    (output / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"'README\.md', 'config\.json' changed since the earlier conversion wrote "
                                         r"them, .* Move them out of the folder to keep them \(or delete them"):
        convert_original_checkpoint(checkpoint, output, overwrite=True, **local_parts["mlp"])
    assert (output / "README.md").read_text() == "my card" and (output / "config.json").read_text() == "{}"
    # Moved out (or deleted), they are written again.
    (output / "README.md").rename(tmp_path / "my_card.md")
    (output / "config.json").unlink()
    convert_original_checkpoint(checkpoint, output, overwrite=True, **local_parts["mlp"])
    assert (output / "README.md").read_text() == card and (output / "model.safetensors").exists()
    assert (tmp_path / "my_card.md").read_text() == "my card"


def test_overwrite_replaces_a_folder_an_earlier_version_converted(tmp_path, tokenizer, local_parts):
    # Its record lists the files without their sha256: they are replaced, edited or not, as that version did.
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    output = tmp_path / "out"
    convert_original_checkpoint(checkpoint, output, **local_parts["mlp"])
    card = (output / "README.md").read_text()
    record = json.loads((output / "clipcap_conversion.json").read_text())
    del record["sha256"]
    (output / "clipcap_conversion.json").write_text(json.dumps(record))
    (output / "README.md").write_text("edited")
    convert_original_checkpoint(checkpoint, output, overwrite=True, **local_parts["mlp"])
    assert (output / "README.md").read_text() == card
    assert "sha256" in json.loads((output / "clipcap_conversion.json").read_text())


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_empty_output_folder_is_written_as_a_new_one(tmp_path, tokenizer, local_parts, overwrite):
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    (tmp_path / "out").mkdir()
    convert_original_checkpoint(checkpoint, tmp_path / "out", overwrite=overwrite, **local_parts["mlp"])
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "release.pt"]


def test_a_file_as_the_output_is_refused(tmp_path, tokenizer, local_parts):
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    (tmp_path / "out").write_text("notes")
    with pytest.raises(NotADirectoryError, match=r"out is a file; name a folder to write the converted model to"):
        convert_original_checkpoint(checkpoint, tmp_path / "out", overwrite=True, **local_parts["mlp"])
    assert (tmp_path / "out").read_text() == "notes"


def test_overwrite_replaces_only_an_earlier_conversion(tmp_path, tokenizer, local_parts, monkeypatch, capsys):
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.jpg").write_text("keep")
    with pytest.raises(ValueError, match=r"photos: .* only replaces a folder that an earlier conversion wrote, and it "
                                         r"has no clipcap_conversion\.json .*; it holds 'keep\.jpg'\. Remove it"):
        convert_original_checkpoint(checkpoint, other, overwrite=True, **local_parts["mlp"])
    converted = tmp_path / "converted"
    convert_original_checkpoint(checkpoint, converted, **local_parts["mlp"])
    (converted / "release.pt").write_bytes(checkpoint.read_bytes())
    with pytest.raises(ValueError, match=r"Refusing to replace .*converted: it holds the checkpoint"):
        convert_original_checkpoint(converted / "release.pt", converted, overwrite=True, **local_parts["mlp"])
    # An empty current folder too: the model would replace it whole, pulling it from under the shell.
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    for output in [".", str(empty)]:
        arguments = ["convert-original", str(checkpoint), "--output", output, "--vision-model",
                     local_parts["mlp"]["vision_model"], "--tokenizer", local_parts["mlp"]["tokenizer"]]
        assert main(arguments) == 2
        assert "it is the current folder or one of its parents" in capsys.readouterr().err
    assert empty.is_dir() and not list(empty.iterdir())
    # Below a file: refused before the work, naming the file.
    arguments = ["convert-original", str(checkpoint), "--output", str(other / "keep.jpg" / "out"), "--vision-model",
                 local_parts["mlp"]["vision_model"], "--tokenizer", local_parts["mlp"]["tokenizer"]]
    assert main(arguments) == 2
    assert "keep.jpg is a file; name a folder" in capsys.readouterr().err
    monkeypatch.chdir(converted)
    for output in [".", "..", str(tmp_path)]:
        arguments = ["convert-original", str(checkpoint), "--output", output, "--overwrite", "--vision-model",
                     local_parts["mlp"]["vision_model"], "--tokenizer", local_parts["mlp"]["tokenizer"]]
        assert main(arguments) == 2
        assert "it is the current folder or one of its parents" in capsys.readouterr().err
    assert (other / "keep.jpg").exists() and (converted / "release.pt").exists() and checkpoint.exists()


def test_overwrite_keeps_a_training_output_that_holds_a_clipcap_model(tmp_path, tokenizer, local_parts, capsys):
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    trained = tmp_path / "trained"
    convert_original_checkpoint(checkpoint, trained, **local_parts["mlp"])
    (trained / "clipcap_conversion.json").unlink()  # a ClipCap model saved by training, not by a conversion
    (trained / "checkpoint-500").mkdir()
    (trained / "checkpoint-500" / "model.safetensors").write_text("weights")
    (trained / "notes.txt").write_text("notes")
    before = sorted(path.name for path in trained.iterdir())
    arguments = ["convert-original", str(checkpoint), "--output", str(trained), "--overwrite", "--vision-model",
                 local_parts["mlp"]["vision_model"], "--tokenizer", local_parts["mlp"]["tokenizer"]]
    assert main(arguments) == 2
    assert re.search(rf"Refusing to replace {re.escape(str(trained))}: .* no clipcap_conversion\.json .*; it holds "
                     r"'README\.md', .*'checkpoint-500', .* and \d+ more\. Remove it", capsys.readouterr().err)
    # An earlier conversion that something else was put into since is refused too, naming what was added.
    converted = tmp_path / "converted"
    convert_original_checkpoint(checkpoint, converted, **local_parts["mlp"])
    (converted / "notes.txt").write_text("notes")
    (converted / "eval").mkdir()
    arguments[3] = str(converted)
    assert main(arguments) == 2
    assert capsys.readouterr().err.endswith(
        f"clipcap convert-original: error: Refusing to replace {converted}: it holds 'eval', 'notes.txt', which the "
        "earlier conversion did not write and replacing the folder would delete. Move them elsewhere or choose "
        "another folder.\n"
    )
    assert sorted(path.name for path in trained.iterdir()) == before
    assert (trained / "checkpoint-500" / "model.safetensors").read_text() == "weights"
    assert (converted / "notes.txt").exists() and (converted / "eval").is_dir()


def test_mapping_num_heads_is_used_as_given(tmp_path, tokenizer, local_parts, capsys):
    checkpoint = save_release(make_original("transformer", tokenizer), tmp_path / "release.pt")
    arguments = ["convert-original", str(checkpoint), "--output", str(tmp_path / "out"), "--vision-model",
                 local_parts["transformer"]["vision_model"], "--tokenizer", local_parts["transformer"]["tokenizer"]]
    assert main(arguments + ["--mapping-num-heads", "0"]) == 2
    assert capsys.readouterr().err.endswith("error: argument --mapping-num-heads: must be at least 1, got 0\n")
    # Not replaced by the default of 8 heads; one that does not divide the width (64) is named before any loading.
    for heads in (0, 3):
        with pytest.raises(ValueError) as error:
            convert_original_checkpoint(checkpoint, tmp_path / "out", mapping_num_heads=heads,
                                        **local_parts["transformer"])
        assert str(error.value) == (
            "`mapping_num_heads` (--mapping-num-heads) must be a positive integer that divides the width of "
            f"{checkpoint}'s mapper (64), got {heads}; the official code uses 8."
        )
    mlp_checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "mlp.pt")
    with pytest.raises(ValueError) as error:  # an MLP mapper has no heads: not silently ignored
        convert_original_checkpoint(mlp_checkpoint, tmp_path / "out", mapping_num_heads=4, **local_parts["mlp"])
    assert str(error.value) == (
        f"`mapping_num_heads` (--mapping-num-heads) sets a transformer mapper's heads, and {mlp_checkpoint} has an MLP "
        "mapper; leave it out."
    )
    assert_nothing_written(tmp_path / "out")


def test_a_failed_swap_keeps_the_earlier_conversion(tmp_path, tokenizer, local_parts, monkeypatch):
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    output = tmp_path / "out"
    convert_original_checkpoint(checkpoint, output, **local_parts["mlp"])
    weights = (output / "model.safetensors").read_bytes()
    rename = type(output).rename

    def failing_rename(self, target):
        if self.name.endswith(".partial"):  # moving the new folder into place
            raise OSError("disk full")
        return rename(self, target)

    monkeypatch.setattr(type(output), "rename", failing_rename)
    with pytest.raises(OSError, match="disk full"):
        convert_original_checkpoint(checkpoint, output, overwrite=True, **local_parts["mlp"])
    assert (output / "model.safetensors").read_bytes() == weights
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "release.pt"]


def test_failed_verification_writes_nothing(tmp_path, tokenizer, local_parts, monkeypatch):
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    forward = ClipCapMLPMapper.forward
    monkeypatch.setattr(ClipCapMLPMapper, "forward", lambda self, x: forward(self, x) * 1.01)
    with pytest.raises(ValueError, match=r"Verification failed: .* differ from the original computation by up to"):
        convert_original_checkpoint(checkpoint, tmp_path / "out", **local_parts["mlp"])
    assert_nothing_written(tmp_path / "out")


def test_a_vision_tower_changed_during_conversion_writes_nothing(tmp_path, tokenizer, local_parts, monkeypatch):
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    init = ClipCapForConditionalGeneration.__init__

    def reinitialising_init(self, *args, **kwargs):  # a model that replaces the tower it is given
        init(self, *args, **kwargs)
        with torch.no_grad():
            for parameter in self.vision_model.parameters():
                parameter.normal_()

    monkeypatch.setattr(ClipCapForConditionalGeneration, "__init__", reinitialising_init)
    # The logits check feeds image embeddings, so only the comparison with the source tower sees this.
    with pytest.raises(ValueError, match=r"does not reproduce the source vision tower: its image embeddings differ "
                                         r"by up to [\d.e+-]+ \(> 0.0001\); nothing was written\."):
        convert_original_checkpoint(checkpoint, tmp_path / "out", **local_parts["mlp"])
    assert_nothing_written(tmp_path / "out")


def test_written_folder_permissions_follow_the_umask(tmp_path, tokenizer, local_parts):
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    output = tmp_path / "new" / "out"
    previous = os.umask(0o027)
    try:
        convert_original_checkpoint(checkpoint, output, **local_parts["mlp"])
    finally:
        os.umask(previous)
    # As `mkdir` and `open` would make them (not private), so that other users and containers can read the model.
    assert stat.S_IMODE(output.parent.stat().st_mode) == 0o750
    assert stat.S_IMODE(output.stat().st_mode) == 0o750
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in output.iterdir()} == {
        path.name: 0o640 for path in output.iterdir()
    }
    assert {"model.safetensors", "config.json", "README.md"} <= {path.name for path in output.iterdir()}


def test_failure_while_writing_removes_what_it_created(tmp_path, tokenizer, local_parts, monkeypatch):
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    (tmp_path / "existing").mkdir()

    def broken_reload(*args):
        raise OSError("disk full")

    monkeypatch.setattr(convert_original, "_check_reload", broken_reload)
    output = tmp_path / "existing" / "new" / "deeper" / "out"
    with pytest.raises(OSError, match="disk full"):
        convert_original_checkpoint(checkpoint, output, **local_parts["mlp"])
    # The partial folder and the parents made for it are gone; the parent that was there stays.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["existing", "release.pt"]
    assert not list((tmp_path / "existing").iterdir())


# Runs `clipcap convert-original ARGS...` in a fresh interpreter that stops once the converted folder is written and
# waits there, in the check of the written folder, for the test to send SIGTERM.
STOPPED_CONVERSION = r"""
import sys, time
from pathlib import Path
import clipcap_hf.conversion.convert_original as convert_original

def waiting_check(folder, *args):
    Path(sys.argv[1]).write_text(str(folder))
    time.sleep(120)

convert_original._check_reload = waiting_check
from clipcap_hf.commands import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_conversion_ended_by_sigterm_removes_what_it_wrote(tmp_path, tokenizer, local_parts):
    # SIGTERM (kill, timeout, job schedulers) ended the process on the spot: its hidden `.partial` folder, the
    # converted model, stayed behind.
    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    (tmp_path / "models").mkdir()
    output = tmp_path / "models" / "new" / "out"
    marker = tmp_path / "written"
    arguments = ["convert-original", str(checkpoint), "--output", str(output), "--vision-model",
                 local_parts["mlp"]["vision_model"], "--tokenizer", local_parts["mlp"]["tokenizer"]]
    process = subprocess.Popen([sys.executable, "-c", STOPPED_CONVERSION, str(marker), *arguments],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if not marker.exists():
            process.kill()
            pytest.fail(f"the conversion did not reach its check: {process.communicate()[1][-3000:]}")
        staging = Path(marker.read_text())
        assert staging.name.endswith(".partial") and (staging / "model.safetensors").exists()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == []  # the parents it made too
