"""Vision towers other than CLIP (SigLIP, SigLIP2, ViT, DINOv2): each tiny tower is built from a config, saved with
its own image processor, and assembled with `from_vision_text_pretrained`, as a user would from the Hub."""

import re

import pytest
import torch
import transformers
from conftest import random_images, save_open_clip_local_dir, tiny_config
from transformers import (
    AutoConfig,
    CLIPConfig,
    CLIPModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    GPT2LMHeadModel,
    Siglip2Config,
    Siglip2Model,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from clipcap_hf import ClipCapConfig, ClipCapForConditionalGeneration, ClipCapImageProcessor, ClipCapProcessor
from clipcap_hf.configuration_clipcap import resolve_vision_pooling
from clipcap_hf.modeling_clipcap import build_vision_tower, load_pretrained_vision_model

TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "vocab_size": 64, "max_position_embeddings": 16}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "patch_size": 8}
# Images whose crop margins are even, where every crop convention agrees (see docs/image-processing.md).
IMAGE_SIZES = [(48, 40), (40, 56)]


def _own_processor(name: str, **settings):
    """A tower's own image processor, the PIL-backed one: 4.57's, and on 5.x the `...Pil` class (its default class
    resizes tensors with torchvision, whose antialiasing gives other pixels than PIL's resize)."""
    return (getattr(transformers, f"{name}Pil", None) or getattr(transformers, name))(**settings)


def _features(output):
    """`get_image_features`' embedding: a tensor on transformers 4.57, an output's `pooler_output` on 5.x."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _dinov2(config_class, classifier_class, registers=0):
    def build():
        extra = {"num_register_tokens": registers} if registers else {}
        config = config_class(**VISION, image_size=32, num_labels=2 * VISION["hidden_size"], **extra)
        # DINOv2's own linear-probe head reads the CLS token and the mean patch token (without the register tokens);
        # an identity head makes its logits that embedding, the reference for "cls_mean_patch".
        classifier = classifier_class(config).eval()
        torch.nn.init.eye_(classifier.classifier.weight)
        torch.nn.init.zeros_(classifier.classifier.bias)
        processor = _own_processor(
            "BitImageProcessor", size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, resample=3,
            image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD,
        )

        def embed(inputs, pooling):
            if pooling == "cls":  # DINOv2's pooler_output is its CLS token
                return classifier.base_model(**inputs).pooler_output
            return classifier(**inputs).logits

        return classifier.base_model, processor, embed

    return build


def _clip():
    model = CLIPModel(CLIPConfig(text_config=TEXT, vision_config={**VISION, "image_size": 32}, projection_dim=24))
    processor = _own_processor("CLIPImageProcessor", size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, processor, lambda inputs, pooling: _features(model.get_image_features(**inputs))


def _siglip():
    model = SiglipModel(SiglipConfig(text_config=TEXT, vision_config={**VISION, "image_size": 32}))
    processor = _own_processor("SiglipImageProcessor", size={"height": 32, "width": 32})
    return model, processor, lambda inputs, pooling: _features(model.get_image_features(**inputs))


def _siglip2():
    model = Siglip2Model(Siglip2Config(text_config=TEXT, vision_config={**VISION, "num_patches": 16}))
    processor = _own_processor("Siglip2ImageProcessor", patch_size=8, max_num_patches=16)
    return model, processor, lambda inputs, pooling: _features(model.get_image_features(**inputs))


def _vit():
    model = ViTModel(ViTConfig(**VISION, image_size=32))
    processor = _own_processor("ViTImageProcessor", size={"height": 32, "width": 32})

    def embed(inputs, pooling):
        output = model(**inputs)
        return output.pooler_output if pooling == "pooled" else output.last_hidden_state[:, 0]

    return model, processor, embed


# family: (builder, poolings to check, the embedding width each gives, image sizes its own processor agrees on)
TOWERS = {
    "clip": (_clip, ["projection"], [24], IMAGE_SIZES),
    "siglip": (_siglip, ["pooled"], [32], IMAGE_SIZES),
    # SigLIP2's NaFlex preprocessing keeps the aspect ratio; square images are where it makes the same square.
    "siglip2": (_siglip2, ["pooled"], [32], [(40, 40), (24, 24)]),
    "vit": (_vit, ["cls", "pooled"], [32, 32], IMAGE_SIZES),
    "dinov2": (_dinov2(Dinov2Config, Dinov2ForImageClassification), ["cls", "cls_mean_patch"], [32, 64], IMAGE_SIZES),
    "dinov2_with_registers": (
        _dinov2(Dinov2WithRegistersConfig, Dinov2WithRegistersForImageClassification, registers=2),
        ["cls_mean_patch"], [64], IMAGE_SIZES,
    ),
}


VISION_MODEL_TYPES = {
    "clip": "clip_vision_model", "siglip": "siglip_vision_model", "siglip2": "siglip2_vision_model", "vit": "vit",
    "dinov2": "dinov2", "dinov2_with_registers": "dinov2_with_registers",
}


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("text")
    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_config(tokenizer).text_config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _own_pixels_and_ours(own_processor, processor, images):
    own = own_processor(images, return_tensors="pt")
    ours = processor(images=images)["pixel_values"]
    return own, ours


@pytest.mark.parametrize("family", TOWERS)
def test_any_tower_assembles_embeds_as_its_own_model_and_round_trips(family, text_dir, tmp_path, tokenizer):
    build, poolings, widths, sizes = TOWERS[family]
    torch.manual_seed(0)
    tower, own_processor, own_embed = build()
    tower.eval()
    tower_dir = tmp_path / family
    tower.save_pretrained(tower_dir)
    own_processor.save_pretrained(tower_dir)
    images = [random_images(1, seed=index, size=size)[0] for index, size in enumerate(sizes)]

    for pooling, width in zip(poolings, widths):
        processor = ClipCapProcessor.from_vision_text_pretrained(str(tower_dir), str(text_dir), num_image_tokens=4)
        model = ClipCapForConditionalGeneration.from_vision_text_pretrained(
            str(tower_dir), str(text_dir), prefix_length=4, image_token_id=processor.image_token_id,
            vision_pooling=pooling,
        ).eval()
        assert (model.config.vision_pooling, model.config.prefix_dim) == (pooling, width)

        own_inputs, pixel_values = _own_pixels_and_ours(own_processor, processor, images)
        if family == "siglip2":  # its pixels come as flattened patches beside a mask and the grid's shape
            assert bool(own_inputs["pixel_attention_mask"].all())
            torch.testing.assert_close(model._vision_inputs(pixel_values)["pixel_values"], own_inputs["pixel_values"],
                                       atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(pixel_values, own_inputs["pixel_values"], atol=1e-5, rtol=0)
        with torch.no_grad():
            expected = own_embed(dict(own_inputs), pooling)
            torch.testing.assert_close(model.get_image_embeds(pixel_values), expected, atol=1e-5, rtol=1e-4)
            # The forward's path (get_image_features, which also returns the tower's states) embeds alike.
            features = model.get_image_features(pixel_values=pixel_values)
        torch.testing.assert_close(features.image_embeds, expected, atol=1e-5, rtol=1e-4)
        assert features.last_hidden_state is not None

        saved = tmp_path / f"clipcap-{family}-{pooling}"
        model.save_pretrained(saved)
        processor.save_pretrained(saved)
        reloaded = ClipCapForConditionalGeneration.from_pretrained(saved, trust_remote_code=False).eval()
        reprocessor = ClipCapProcessor.from_pretrained(saved, trust_remote_code=False)
        assert reloaded.config.vision_pooling == pooling
        assert reloaded.config.vision_config.model_type == VISION_MODEL_TYPES[family]
        inputs = reprocessor(images=images)
        torch.testing.assert_close(inputs["pixel_values"], pixel_values)
        with torch.no_grad():
            torch.testing.assert_close(reloaded.get_image_embeds(inputs["pixel_values"]), expected,
                                       atol=1e-5, rtol=1e-4)
            generated = model.generate(**processor(images=images), max_new_tokens=4)
            regenerated = reloaded.generate(**inputs, max_new_tokens=4)
        assert regenerated.tolist() == generated.tolist()


def test_vit_without_a_pooler_loads_for_cls_and_names_the_fix_for_pooled(text_dir, tmp_path):
    # Image-classification checkpoints (google/vit-base-patch16-224's kind) hold the ViT under `vit.`, without pooler.
    torch.manual_seed(0)
    classifier = ViTForImageClassification(ViTConfig(**VISION, image_size=32)).eval()
    classifier.save_pretrained(tmp_path / "vit")
    model = ClipCapForConditionalGeneration.from_vision_text_pretrained(str(tmp_path / "vit"), str(text_dir),
                                                                        prefix_length=4)
    assert model.config.vision_pooling == "cls"
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = classifier.vit(pixel_values).last_hidden_state[:, 0]
        torch.testing.assert_close(model.get_image_embeds(pixel_values), expected)
    message = r"is not a pretrained 'vit' tower for vision_pooling='pooled'.*'pooler\.dense\..*or vision_pooling='cls'"
    with pytest.raises(ValueError, match=message):
        ClipCapForConditionalGeneration.from_vision_text_pretrained(str(tmp_path / "vit"), str(text_dir),
                                                                    vision_pooling="pooled")


def test_a_tower_saved_in_bf16_gives_a_model_of_one_dtype_that_round_trips(text_dir, tmp_path):
    # transformers 5 loads a checkpoint in its own dtype by default: a bf16 tower beside an fp32 mapper and language
    # model was saved as a "bfloat16" model, and loaded back all in bf16.
    torch.manual_seed(0)
    model, _, _ = _clip()
    model.to(torch.bfloat16).save_pretrained(tmp_path / "clip")
    pixel_values = torch.randn(1, 3, 32, 32)
    for dtype in (torch.float32, torch.bfloat16):
        built = ClipCapForConditionalGeneration.from_vision_text_pretrained(
            str(tmp_path / "clip"), str(text_dir), prefix_length=4, dtype=dtype
        ).eval()
        assert {parameter.dtype for parameter in built.parameters()} == {dtype}
        built.save_pretrained(tmp_path / f"built-{dtype}")
        # (Loaded by default, fp32 on transformers 4.57, what config.json says on 5, unless asked for bf16.)
        asked = {} if dtype == torch.float32 else {"dtype": dtype}
        loaded = ClipCapForConditionalGeneration.from_pretrained(tmp_path / f"built-{dtype}", **asked).eval()
        assert {parameter.dtype for parameter in loaded.parameters()} == {dtype}
        with torch.no_grad():
            prefix = built.get_prefix_embeds(pixel_values=pixel_values.to(dtype))
            torch.testing.assert_close(loaded.get_prefix_embeds(pixel_values=pixel_values.to(dtype)), prefix)


# A tower's weights as its checkpoints (and transformers 4.57's modules) name them, under the model's `vision_model.`:
# the names a saved folder holds whichever transformers saved it. transformers 5 renamed the modules (SigLIP's lost
# its inner `vision_model.`, ViT's and DINOv2's attention became `q_proj`...), and 4.57 reads only these names: it left
# a SigLIP tower saved by 5.x random, with a warning. By tower: the prefix, then the names under it (one layer).
_SIGLIP_NAMES = (
    "vision_model.vision_model.",
    [
        "embeddings.patch_embedding.bias", "embeddings.patch_embedding.weight", "embeddings.position_embedding.weight",
        "encoder.layers.0.layer_norm1.bias", "encoder.layers.0.layer_norm1.weight",
        "encoder.layers.0.layer_norm2.bias", "encoder.layers.0.layer_norm2.weight",
        "encoder.layers.0.mlp.fc1.bias", "encoder.layers.0.mlp.fc1.weight",
        "encoder.layers.0.mlp.fc2.bias", "encoder.layers.0.mlp.fc2.weight",
        "encoder.layers.0.self_attn.k_proj.bias", "encoder.layers.0.self_attn.k_proj.weight",
        "encoder.layers.0.self_attn.out_proj.bias", "encoder.layers.0.self_attn.out_proj.weight",
        "encoder.layers.0.self_attn.q_proj.bias", "encoder.layers.0.self_attn.q_proj.weight",
        "encoder.layers.0.self_attn.v_proj.bias", "encoder.layers.0.self_attn.v_proj.weight",
        "head.attention.in_proj_bias", "head.attention.in_proj_weight",
        "head.attention.out_proj.bias", "head.attention.out_proj.weight",
        "head.layernorm.bias", "head.layernorm.weight",
        "head.mlp.fc1.bias", "head.mlp.fc1.weight", "head.mlp.fc2.bias", "head.mlp.fc2.weight", "head.probe",
        "post_layernorm.bias", "post_layernorm.weight",
    ],
)
_ATTENTION_NAMES = [
    "encoder.layer.0.attention.attention.key.bias", "encoder.layer.0.attention.attention.key.weight",
    "encoder.layer.0.attention.attention.query.bias", "encoder.layer.0.attention.attention.query.weight",
    "encoder.layer.0.attention.attention.value.bias", "encoder.layer.0.attention.attention.value.weight",
    "encoder.layer.0.attention.output.dense.bias", "encoder.layer.0.attention.output.dense.weight",
]
ONE_LAYER = {**VISION, "num_hidden_layers": 1}
SAVED_NAMES = {
    "siglip": (SiglipVisionConfig(**ONE_LAYER, image_size=32), "pooled", _SIGLIP_NAMES),
    "siglip2": (transformers.Siglip2VisionConfig(**ONE_LAYER, num_patches=16), "pooled", _SIGLIP_NAMES),
    "vit": (
        ViTConfig(**ONE_LAYER, image_size=32),
        "pooled",
        (
            "vision_model.",
            [
                "embeddings.cls_token", "embeddings.patch_embeddings.projection.bias",
                "embeddings.patch_embeddings.projection.weight", "embeddings.position_embeddings",
                *_ATTENTION_NAMES,
                "encoder.layer.0.intermediate.dense.bias", "encoder.layer.0.intermediate.dense.weight",
                "encoder.layer.0.layernorm_after.bias", "encoder.layer.0.layernorm_after.weight",
                "encoder.layer.0.layernorm_before.bias", "encoder.layer.0.layernorm_before.weight",
                "encoder.layer.0.output.dense.bias", "encoder.layer.0.output.dense.weight",
                "layernorm.bias", "layernorm.weight", "pooler.dense.bias", "pooler.dense.weight",
            ],
        ),
    ),
    # transformers 5 holds the SwiGLU input projection as two halves, saved as the one `weights_in`.
    "dinov2_with_registers_swiglu": (
        Dinov2WithRegistersConfig(**ONE_LAYER, image_size=32, num_register_tokens=2, use_swiglu_ffn=True),
        "cls",
        (
            "vision_model.",
            [
                "embeddings.cls_token", "embeddings.mask_token", "embeddings.patch_embeddings.projection.bias",
                "embeddings.patch_embeddings.projection.weight", "embeddings.position_embeddings",
                "embeddings.register_tokens",
                *_ATTENTION_NAMES,
                "encoder.layer.0.layer_scale1.lambda1", "encoder.layer.0.layer_scale2.lambda1",
                "encoder.layer.0.mlp.weights_in.bias", "encoder.layer.0.mlp.weights_in.weight",
                "encoder.layer.0.mlp.weights_out.bias", "encoder.layer.0.mlp.weights_out.weight",
                "encoder.layer.0.norm1.bias", "encoder.layer.0.norm1.weight",
                "encoder.layer.0.norm2.bias", "encoder.layer.0.norm2.weight",
                "layernorm.bias", "layernorm.weight",
            ],
        ),
    ),
}


def _model_with_random_tower(tokenizer, vision_config, vision_pooling):
    """A tiny model whose vision weights are all random (none left at an initial 0 or 1 that a bad load would keep)."""
    from transformers import GPT2Config

    config = ClipCapConfig(vision_config=vision_config, vision_pooling=vision_pooling, prefix_length=2,
                           text_config=GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer)))
    torch.manual_seed(0)
    model = ClipCapForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.vision_model.parameters():
            parameter.normal_()
    return model


def _saved_vision_names(folder) -> list[str]:
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as weights:
        return sorted(name for name in weights.keys() if name.startswith("vision_model."))


def _assert_same_tower(loaded, model):
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.vision_model.state_dict(), model.vision_model.state_dict(), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded.get_image_embeds(pixel_values), model.get_image_embeds(pixel_values))


@pytest.mark.parametrize("tower", SAVED_NAMES)
def test_a_tower_is_saved_under_its_checkpoint_names_by_either_transformers(tower, tokenizer, tmp_path):
    vision_config, vision_pooling, (prefix, names) = SAVED_NAMES[tower]
    model = _model_with_random_tower(tokenizer, vision_config, vision_pooling)
    model.save_pretrained(tmp_path)
    assert _saved_vision_names(tmp_path) == sorted(prefix + name for name in names)
    _assert_same_tower(ClipCapForConditionalGeneration.from_pretrained(tmp_path), model)


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="transformers 5's names of a SigLIP tower")
@pytest.mark.parametrize("tower", ["siglip", "siglip2"])
def test_a_siglip_folder_transformers_5_saved_under_its_own_names_loads_and_is_saved_again_under_the_checkpoints(
    tower, tokenizer, tmp_path
):
    # Before SigLIP's checkpoint names were restored on saving, transformers 5 saved the tower without its inner
    # `vision_model.`: such folders must still load on 5.x, and saving one writes the names 4.57 reads.
    from safetensors.torch import load_file, save_file

    vision_config, vision_pooling, (prefix, names) = SAVED_NAMES[tower]
    model = _model_with_random_tower(tokenizer, vision_config, vision_pooling)
    model.save_pretrained(tmp_path / "saved")
    weights = load_file(tmp_path / "saved" / "model.safetensors")
    save_file({name.replace("vision_model.vision_model.", "vision_model."): tensor for name, tensor in weights.items()},
              tmp_path / "saved" / "model.safetensors", metadata={"format": "pt"})
    assert _saved_vision_names(tmp_path / "saved") == sorted("vision_model." + name for name in names)
    loaded = ClipCapForConditionalGeneration.from_pretrained(tmp_path / "saved")
    _assert_same_tower(loaded, model)
    loaded.save_pretrained(tmp_path / "again")
    assert _saved_vision_names(tmp_path / "again") == sorted(prefix + name for name in names)


def test_siglip2_pixels_that_do_not_cut_into_patches_are_named(tokenizer):
    # The model cuts SigLIP2's pixels into patches itself; a reshape failed there, naming no input.
    from transformers import GPT2Config, Siglip2VisionConfig

    config = ClipCapConfig(vision_config=Siglip2VisionConfig(**VISION, num_patches=16),
                           text_config=GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer)),
                           prefix_length=4)
    model = ClipCapForConditionalGeneration(config).eval()
    assert model.get_image_embeds(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    for shape in ((1, 3, 50, 50), (3, 32, 32)):
        with pytest.raises(ValueError) as error:
            model.get_image_embeds(torch.randn(shape))
        assert str(error.value) == (
            "`pixel_values` must be a floating-point torch tensor of shape (batch_size, 3, height, width) with sides "
            "that are multiples of the SigLIP2 tower's patch size (8), normalised as the vision tower reads them; got "
            f"a float32 tensor of shape {shape}. Make them with this model's processor (ClipCapProcessor / "
            "AutoProcessor): `processor(images=images)`."
        )


# The errors name the field, the value given and what to give instead; the rest of their wording is free.
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"vision_config": {"model_type": "vit", **VISION}, "vision_pooling": "projection"},
         r"`vision_pooling` must be one of \('cls', 'pooled'\) .*'vit'.*got 'projection'"),
        ({"vision_config": {"model_type": "siglip_vision_model", **VISION}, "vision_pooling": "cls"},
         r"`vision_pooling` must be one of \('pooled',\) .*'siglip_vision_model'.*got 'cls'"),
        ({"vision_pooling": "pooled"},
         r"`vision_pooling` must be one of \('projection',\) .*'clip_vision_model'.*got 'pooled'"),
        # A SigLIP without its attention-pooling head would give no pooler_output, hence no embedding at all.
        ({"vision_config": {"model_type": "siglip_vision_model", "vision_use_head": False, **VISION}},
         r"vision_pooling='pooled'.*`vision_use_head=False`"),
        ({"vision_backend": "open_clip", "open_clip_model_cfg": {"embed_dim": 8, "vision_cfg": {}},
          "vision_pooling": "cls"},
         r"`vision_pooling` \('cls'\).*Leave it None with vision_backend='open_clip'"),
    ],
)
def test_vision_pooling_is_checked_in_the_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClipCapConfig(**kwargs)


# Each tower kind's default pooling, as the docs give it (docs/model.md).
DEFAULT_POOLINGS = {
    "clip_vision_model": "projection", "siglip_vision_model": "pooled", "siglip2_vision_model": "pooled",
    "vit": "cls", "dinov2": "cls", "dinov2_with_registers": "cls",
}


@pytest.mark.parametrize("model_type", DEFAULT_POOLINGS)
def test_the_config_and_the_loader_default_each_tower_to_the_same_pooling(model_type, tmp_path):
    settings = {"num_patches": 16} if model_type == "siglip2_vision_model" else {"image_size": 32}
    vision_config = AutoConfig.for_model(model_type, **VISION, **settings)
    assert resolve_vision_pooling(vision_config) == DEFAULT_POOLINGS[model_type]
    assert ClipCapConfig(vision_config=vision_config).vision_pooling == DEFAULT_POOLINGS[model_type]
    # The loader, given a tower checkpoint and no pooling, picks the same.
    build_vision_tower(vision_config, DEFAULT_POOLINGS[model_type]).save_pretrained(tmp_path)
    _, fields = load_pretrained_vision_model(str(tmp_path))
    assert fields["vision_pooling"] == DEFAULT_POOLINGS[model_type]
    assert fields["vision_config"].model_type == model_type


def test_the_loader_checks_the_pooling_before_loading_weights(tmp_path, monkeypatch):
    SiglipVisionModel(SiglipVisionConfig(**VISION, image_size=32, vision_use_head=False)).save_pretrained(tmp_path)

    def must_not_load(*args, **kwargs):
        raise AssertionError("weights were loaded for a pooling the tower cannot give")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", must_not_load)
    # Named by the tower given, as its other config errors are.
    named = re.escape(repr(str(tmp_path)))
    with pytest.raises(ValueError, match=rf"{named}: vision_pooling='pooled'.*`vision_use_head=False`"):
        load_pretrained_vision_model(str(tmp_path))
    with pytest.raises(ValueError, match=r"`vision_pooling` must be one of \('pooled',\) .*got 'cls'"):
        load_pretrained_vision_model(str(tmp_path), vision_pooling="cls")


def test_an_open_clip_tower_has_no_pooling_in_the_loader_nor_the_config(tmp_path):
    pytest.importorskip("open_clip")
    name, _ = save_open_clip_local_dir(tmp_path / "open_clip", "vit")
    _, fields = load_pretrained_vision_model(name, "open_clip")
    assert "vision_pooling" not in fields
    config = ClipCapConfig(**fields)
    assert (config.vision_backend, config.vision_pooling, config.prefix_dim) == ("open_clip", None, 24)


def test_config_defaults_and_legacy_configs(tokenizer):
    text_config = tiny_config(tokenizer).text_config
    dinov2 = ClipCapConfig(vision_config={"model_type": "dinov2", **VISION}, text_config=text_config,
                           vision_pooling="cls_mean_patch")
    assert (dinov2.prefix_dim, dinov2.vision_config.model_type) == (64, "dinov2")
    reloaded = ClipCapConfig.from_dict(dinov2.to_dict())
    assert (reloaded.vision_pooling, reloaded.prefix_dim, type(reloaded.vision_config)) == (
        "cls_mean_patch", 64, Dinov2Config
    )
    # A config saved before other towers existed: no `vision_pooling`, a vision_config without model_type.
    legacy = tiny_config(tokenizer).to_dict()
    del legacy["vision_pooling"]
    del legacy["vision_config"]["model_type"]
    config = ClipCapConfig.from_dict(legacy)
    assert (config.vision_pooling, config.prefix_dim, config.vision_config.model_type) == (
        "projection", 24, "clip_vision_model"
    )


def test_tower_without_a_preprocessor_config_gets_its_reference_preprocessing(tmp_path):
    SiglipModel(SiglipConfig(text_config=TEXT, vision_config={**VISION, "image_size": 32})).save_pretrained(tmp_path)
    processor = ClipCapImageProcessor.from_vision_pretrained(str(tmp_path))
    assert (processor.resize_mode, processor.size, processor.crop_size, processor.resample) == (
        "squash", 32, 32, "bicubic"
    )
    assert (processor.image_mean, processor.image_std) == ([0.5] * 3, [0.5] * 3)
    image = random_images(1, size=(48, 40))[0]  # not square: squashed, nothing cropped
    expected = torch.tensor(list(image.resize((32, 32), 3).getdata()), dtype=torch.float32).T.reshape(3, 32, 32)
    torch.testing.assert_close(processor(image)["pixel_values"][0], (expected / 255 - 0.5) / 0.5)


def test_squash_crops_only_to_a_smaller_crop_size():
    with pytest.raises(ValueError, match=r"`crop_size` \(40\) must not exceed `size` \(32\)"):
        ClipCapImageProcessor(size=32, crop_size=40, resize_mode="squash")
    with pytest.raises(ValueError, match=r"`resize_mode` must be one of \('shortest', 'squash'\), got 'longest'"):
        ClipCapImageProcessor(resize_mode="longest")


def test_clipcap_train_builds_a_new_model_on_another_tower_with_its_pooling(text_dir, tmp_path):
    from clipcap_hf.training.arguments import ModelArguments
    from clipcap_hf.training.run import build_model

    torch.manual_seed(0)
    ViTModel(ViTConfig(**VISION, image_size=32)).save_pretrained(tmp_path / "vit")
    model_args = ModelArguments(vision_model_name_or_path=str(tmp_path / "vit"), text_model_name_or_path=str(text_dir),
                                prefix_length=4, vision_pooling="pooled")
    model, processor = build_model(model_args)
    assert (model.config.vision_config.model_type, model.config.vision_pooling) == ("vit", "pooled")
    assert (processor.image_processor.resize_mode, processor.image_processor.size) == ("squash", 32)


def test_settings_an_older_config_leaves_open_are_read_as_the_towers_processor_reads_them(tmp_path):
    # Older preprocessor configs (google/vit-base-patch16-224's) save `"size": 224`, which ViT's processor reads as the
    # square's side and CLIP's as the short side, and may leave out the resampling, mean and std, which each processor
    # defaults in its own way; ours must give each one's own pixels on a non-square image.
    import json

    image = random_images(1, seed=3, size=(48, 40))[0]
    ViTModel(ViTConfig(**VISION, image_size=32)).save_pretrained(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(
        json.dumps({"size": 32, "feature_extractor_type": "ViTFeatureExtractor"})
    )
    processor = ClipCapImageProcessor.from_transformers_pretrained(str(tmp_path / "vit"))
    own = _own_processor("ViTImageProcessor", size=32)(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(processor(image)["pixel_values"], own, atol=1e-5, rtol=0)

    clip = CLIPModel(CLIPConfig(text_config=TEXT, vision_config={**VISION, "image_size": 32}, projection_dim=24))
    clip.save_pretrained(tmp_path / "clip")
    settings = {"size": 32, "crop_size": 32, "do_center_crop": True}
    (tmp_path / "clip" / "preprocessor_config.json").write_text(
        json.dumps({**settings, "feature_extractor_type": "CLIPFeatureExtractor"})
    )
    own = _own_processor("CLIPImageProcessor", **settings)(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(
        ClipCapImageProcessor.from_transformers_pretrained(str(tmp_path / "clip"))(image)["pixel_values"], own,
        atol=1e-5, rtol=0,
    )
    # A folder of the settings alone (no model config to ask) reads them as CLIP's processor does, as before.
    (tmp_path / "clip" / "config.json").unlink()
    (tmp_path / "clip" / "model.safetensors").unlink()
    torch.testing.assert_close(
        ClipCapImageProcessor.from_transformers_pretrained(str(tmp_path / "clip"))(image)["pixel_values"], own,
        atol=1e-5, rtol=0,
    )
