"""Shared fixtures: tiny ClipCap models built from configs and a tokenizer trained here, never from the Hub."""

import logging
import os
from contextlib import contextmanager
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import PIL.Image
import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import CLIPVisionConfig, GPT2Config, GPT2TokenizerFast

from clipcap_hf import ClipCapConfig, ClipCapForConditionalGeneration, ClipCapImageProcessor, ClipCapProcessor

# The headless Chromium fixture (`browser`) of the demo and gallery tests.
pytest_plugins = ["browser"]


class _DeprecationLog(logging.Handler):
    """transformers announces most deprecations through its logger, not as warnings; this collects them."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if "deprecated" in message.lower() or "will be removed" in message.lower():
            self.messages.append(message)


@pytest.fixture(autouse=True)
def no_transformers_deprecations():
    """A test fails when transformers reports a deprecated use (FutureWarnings are errors too: pyproject.toml)."""
    handler = _DeprecationLog()
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        yield
    finally:
        transformers_logger.removeHandler(handler)
    assert not handler.messages, f"transformers reported a deprecated use: {handler.messages[0]}"

CORPUS = [
    "A dog runs on the beach.",
    "A red circle above a blue square.",
    "Two cats sleep on a sofa!",
    "A man rides a bicycle down the street.",
    "A small green triangle in the corner.",
    "People walk in the park near the lake.",
] * 20

IMAGE_SIZE = 32
PREFIX_LENGTH = 4  # tiny_config's
IMAGE_TOKEN = "<image>"


def build_tokenizer(image_token: bool = True) -> GPT2TokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    if image_token:
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)  # a special token: skipped when decoding
    return tokenizer


def tiny_config(tokenizer, mapping_type="mlp", text_config=None, text_dropout=0.1, **kwargs) -> ClipCapConfig:
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=8,
        projection_dim=24,
    )
    if text_config is None:
        text_config = GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=4,
            n_positions=128,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            resid_pdrop=text_dropout,
            embd_pdrop=text_dropout,
            attn_pdrop=text_dropout,
        )
    defaults = {
        "prefix_length": PREFIX_LENGTH,
        "mapping_num_layers": 2,
        "mapping_num_heads": 4,
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    }
    defaults.update(kwargs)
    return ClipCapConfig(vision_config=vision_config, text_config=text_config, mapping_type=mapping_type, **defaults)


def tiny_model(tokenizer, mapping_type="mlp", seed=0, **kwargs) -> ClipCapForConditionalGeneration:
    torch.manual_seed(seed)
    model = ClipCapForConditionalGeneration(tiny_config(tokenizer, mapping_type, **kwargs)).eval()
    # Sharpen the output distribution so that greedy decoding has clear, stable winners.
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8)
    return model


def random_images(count: int, seed: int = 0, size=(48, 40)) -> list:
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def processor(tokenizer):
    return tiny_processor(tokenizer)


def tiny_processor(tokenizer, num_image_tokens=PREFIX_LENGTH) -> ClipCapProcessor:
    image_processor = ClipCapImageProcessor(size=IMAGE_SIZE, crop_size=IMAGE_SIZE)
    return ClipCapProcessor(image_processor, tokenizer, num_image_tokens=num_image_tokens)


@pytest.fixture(params=["mlp", "transformer"])
def model(request, tokenizer):
    return tiny_model(tokenizer, request.param)


@pytest.fixture
def mlp_model(tokenizer):
    return tiny_model(tokenizer, "mlp")


@pytest.fixture
def images():
    return random_images(3)


@pytest.fixture
def saved_model_dir(tmp_path, tokenizer, processor):
    """A complete saved folder (model + processor), as a user would get from the Hub."""
    model = tiny_model(tokenizer, "mlp")
    model.save_pretrained(tmp_path / "clipcap")
    processor.save_pretrained(tmp_path / "clipcap")
    return tmp_path / "clipcap"


@torch.no_grad()
def greedy_loop(model, image_embeds, max_new_tokens, prompt_ids=None, eos_token_id=None):
    """What the paper's decoder does: recompute the whole sequence at every step, no cache, take the argmax."""
    image_tokens = [model.config.image_token_id] * model.config.prefix_length
    tokens = [] if prompt_ids is None else list(prompt_ids)
    new_tokens = []
    for _ in range(max_new_tokens):
        input_ids = torch.tensor([image_tokens + tokens], dtype=torch.long)
        logits = model(image_embeds=image_embeds, input_ids=input_ids, use_cache=False).logits
        next_token = int(logits[0, -1].argmax())
        tokens.append(next_token)
        new_tokens.append(next_token)
        if next_token == eos_token_id:
            break
    return tokens if prompt_ids is not None else new_tokens


# ---------------------------------------------------------------- tiny open_clip models (pretrained=None, no download)

_OPEN_CLIP_TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
TINY_OPEN_CLIP_CFGS = {
    # A ViT with QuickGELU, as OpenAI's weights use, and a ModifiedResNet (the RN50x4 family).
    "vit": {"embed_dim": 24, "quick_gelu": True, "text_cfg": _OPEN_CLIP_TEXT_CFG,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8}},
    "resnet": {"embed_dim": 24, "text_cfg": _OPEN_CLIP_TEXT_CFG,
               "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16}},
}


def tiny_open_clip(kind: str, seed: int = 0):
    """A tiny open_clip CLIP with random weights, built from a config dict."""
    import open_clip

    torch.manual_seed(seed)
    clip = open_clip.CLIP(**TINY_OPEN_CLIP_CFGS[kind]).eval()
    with torch.no_grad():  # give batch norms non-trivial statistics, so that eval/train mode differences show
        for module in clip.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return clip


def save_open_clip_local_dir(folder, kind: str, seed: int = 0, preprocess_cfg=None):
    """Save a tiny open_clip model in open_clip's own folder format; returns its 'local-dir:' name and the model."""
    import json

    from safetensors.torch import save_file

    clip = tiny_open_clip(kind, seed)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": TINY_OPEN_CLIP_CFGS[kind], "preprocess_cfg": preprocess_cfg or {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file({name: tensor.contiguous() for name, tensor in clip.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}", clip


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, tokenizer):
    """The tiny tokenizer saved in a folder, for code that loads tokenizers by name or path."""
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


CAPTIONED_IMAGES = {
    "a.png": ["A dog runs on the beach.", "Two cats sleep!"],
    "b.png": ["A red circle above a blue square.", "People walk."],
    "c.png": "A man rides a bicycle down the street.",
    "sub/d.png": ["A small green triangle.", "A dog runs."],
}


@pytest.fixture
def caption_folder(tmp_path):
    """An image folder (metadata.jsonl): four images, seven captions (one image has a single caption)."""
    import json

    folder = tmp_path / "images"
    for (name, texts), image in zip(CAPTIONED_IMAGES.items(), random_images(len(CAPTIONED_IMAGES))):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(folder / name)
    lines = [json.dumps({"file_name": name, "text": texts}) for name, texts in CAPTIONED_IMAGES.items()]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


HIDE_CLIPCAP_HF = """
import sys
class BlockClipCap:
    def find_spec(self, name, path=None, target=None):
        if name == "clipcap_hf" or name.startswith("clipcap_hf."):
            raise ImportError("clipcap_hf is hidden for this test")
sys.meta_path.insert(0, BlockClipCap())
"""


def run_without_package(script: str, tmp_path):
    """Run a Python script in a fresh interpreter where `clipcap_hf` cannot be imported; return its last output
    line parsed as JSON. The Hugging Face cache (where remote code is copied) is private to the test."""
    import json
    import subprocess
    import sys
    import textwrap

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    code = HIDE_CLIPCAP_HF + textwrap.dedent(script)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- ONNX exports (tests/test_onnx*.py)


def captioning_model(tokenizer, mapping_type="mlp", seed=0) -> ClipCapForConditionalGeneration:
    """A tiny model whose greedy captions differ from image to image and from token to token: random images barely
    move a tiny CLIP's embedding and a tiny GPT-2 repeats itself, so the mapper's input and the positions are scaled."""
    model = tiny_model(tokenizer, mapping_type, seed=seed, text_dropout=0.0)
    with torch.no_grad():
        model.language_model.transformer.wpe.weight.normal_(0.0, 1.0)
        first_layer = model.mapping_network.model[0] if mapping_type == "mlp" else model.mapping_network.linear
        first_layer.weight.mul_(30.0)
    return model


@pytest.fixture(scope="session")
def onnx_export(tmp_path_factory, tokenizer):
    """A captioning model saved with its processor, and its export by `clipcap export-onnx` (fp32 and int8):
    (model, saved folder, exported folder)."""
    pytest.importorskip("onnxruntime", reason='onnxruntime is not installed (pip install -e ".[onnx]")')
    pytest.importorskip("onnxscript", reason='onnxscript is not installed (pip install -e ".[onnx]")')
    from clipcap_hf.commands import main

    model = captioning_model(tokenizer)
    saved = tmp_path_factory.mktemp("onnx-model")
    model.save_pretrained(saved)
    tiny_processor(tokenizer).save_pretrained(saved)
    exported = tmp_path_factory.mktemp("onnx-export")
    assert main(["export-onnx", str(saved), "--output", str(exported), "--overwrite"]) == 0
    return model, saved, exported


# ---------------------------------------------------------------- a tiny full CLIP (reranking, CLIPScore)


def _clip_byte_symbols() -> list[str]:
    """The 256 byte symbols of CLIP's byte-level BPE (printable bytes as themselves, the others shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [byte for byte in range(256) if byte not in printable]
    symbols = dict(zip(printable, map(chr, printable))) | {byte: chr(256 + n) for n, byte in enumerate(others)}
    return [symbols[byte] for byte in range(256)]


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A saved tiny transformers CLIPModel (both towers) with its CLIPProcessor: a character-level CLIP tokenizer
    (no merges) and 32-pixel images."""
    import json

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    symbols = _clip_byte_symbols()
    vocab = {token: index for index, token in enumerate(
        symbols + [symbol + "</w>" for symbol in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    text_config = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "max_position_embeddings": 48, "bos_token_id": vocab["<|startoftext|>"],
                   "eos_token_id": vocab["<|endoftext|>"], "pad_token_id": vocab["<|endoftext|>"]}
    vision_config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "image_size": IMAGE_SIZE, "patch_size": 8}
    model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=24)).eval()
    # The same weights on every transformers version (their initialisations differ); this seed gives the captions
    # of tests/test_clipscore.py cosines of both signs.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if name != "logit_scale":
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def write_webdataset_shards(folder, captions_per_shard, seed=0):
    """Webdataset .tar shards (img2dataset's layout): per sample `<key>.jpg` and `<key>.txt`. Returns
    `(shard paths, {sample key: (jpeg bytes, caption)})`."""
    import io
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    shards, samples = [], {}
    images = iter(random_images(sum(len(captions) for captions in captions_per_shard), seed=seed))
    for number, captions in enumerate(captions_per_shard):
        path = folder / f"{number:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for index, caption in enumerate(captions):
                key = f"{number:05d}{index:04d}"
                buffer = io.BytesIO()
                next(images).save(buffer, "JPEG")
                samples[key] = (buffer.getvalue(), caption)
                for suffix, data in (("jpg", buffer.getvalue()), ("txt", caption.encode())):
                    member = tarfile.TarInfo(f"{key}.{suffix}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
        shards.append(path)
    return shards, samples


@pytest.fixture
def webdataset_shards(tmp_path):
    """Two webdataset shards of 3 and 2 small JPEGs with .txt captions."""
    return write_webdataset_shards(
        tmp_path / "shards", [["A dog runs.", "Two cats sleep!", "A red circle."], ["A man rides.", "People walk."]]
    )


def distinct_captioning_model(tokenizer) -> ClipCapForConditionalGeneration:
    """A tiny model with the same weights on every transformers version (drawn here, not by their initialisations)
    whose greedy captions of `random_images` differ from image to image, so that tests see the order of captions."""
    model = tiny_model(tokenizer, text_dropout=0.0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def count_vision_images(model):
    """Patch the vision tower's forward to count the images it sees (and still compute)."""
    seen = []
    original = model.vision_model.forward

    def counting_forward(pixel_values=None, **kwargs):
        seen.append(pixel_values.shape[0])
        return original(pixel_values=pixel_values, **kwargs)

    return seen, mock.patch.object(model.vision_model, "forward", counting_forward)


PACK_OP = "mkldnn::_reorder_linear_weight"  # oneDNN packing a weight into its blocked layout


def packs_run(function):
    """The result of `function()` and how many weights it packed for oneDNN."""
    with torch.profiler.profile() as profiler:
        result = function()
    return result, sum(event.name == PACK_OP for event in profiler.events())


def reuse_seen_by_generate(monkeypatch, model) -> list[bool]:
    """A list to which each later `model.generate` call appends whether freed memory was being reused then."""
    from clipcap_hf.utils.memory import reuses_freed_memory

    seen = []
    generate = model.generate

    def watched_generate(*args, **kwargs):
        seen.append(reuses_freed_memory())
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", watched_generate)
    return seen


@contextmanager
def mkldnn_disabled():
    """PyTorch's own kernels (MKL) within the block. Set directly: `torch.backends.mkldnn.flags()` warns about TF32 on
    every call."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled
