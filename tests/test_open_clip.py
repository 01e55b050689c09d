"""The open_clip vision backend: config, preprocessing and image embeddings equal to open_clip's own, saving."""


import numpy as np
import open_clip
import PIL.Image
import pytest
import torch
from conftest import TINY_OPEN_CLIP_CFGS, run_without_package, save_open_clip_local_dir, tiny_open_clip
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from transformers import GPT2Config, GPT2LMHeadModel

from clipcap_hf import (
    ClipCapConfig,
    ClipCapForConditionalGeneration,
    ClipCapImageProcessor,
    ClipCapOpenClipVisionModel,
    ClipCapProcessor,
)
from clipcap_hf.modeling_clipcap import load_pretrained_vision_model

BUILTIN_MODELS = [
    # name, tag, embedding width, image size, QuickGELU
    ("RN50x4", "openai", 640, 288, True),
    ("ViT-B-32", "openai", 512, 224, True),
    ("ViT-H-14", "laion2b_s32b_b79k", 1024, 224, False),
]


def odd_sized_images(seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(300, 200), (97, 130), (64, 64), (501, 333)]
    return [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def tiny_gpt2_config(**kwargs):
    return GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=300, bos_token_id=0,
                      eos_token_id=0, **kwargs)


def open_clip_config(kind, **kwargs):
    defaults = {"prefix_length": 3, "mapping_type": "mlp"}
    defaults.update(kwargs)
    return ClipCapConfig(vision_backend="open_clip", open_clip_model_cfg=TINY_OPEN_CLIP_CFGS[kind],
                         text_config=tiny_gpt2_config(), **defaults)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(tiny_gpt2_config()).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("name, tag, width, image_size, quick_gelu", BUILTIN_MODELS)
def test_config_resolves_builtin_open_clip_models_without_downloading(tmp_path, name, tag, width, image_size,
                                                                      quick_gelu):
    config = ClipCapConfig(vision_backend="open_clip", open_clip_model_name=name, open_clip_pretrained=tag)
    assert config.prefix_dim == width
    assert config.vision_config is None
    assert config.open_clip_model_cfg["vision_cfg"]["image_size"] == image_size
    # OpenAI's weights were trained with QuickGELU: the tower must use it, whatever the architecture default.
    assert config.open_clip_model_cfg["quick_gelu"] is quick_gelu
    config.save_pretrained(tmp_path)
    loaded = ClipCapConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert "text_cfg" not in loaded.open_clip_model_cfg  # only the image tower is kept


def test_open_clip_config_round_trips_through_dicts():
    config = open_clip_config("resnet", mapping_type="transformer", prefix_length=4, clip_length=2,
                              mapping_num_layers=1, normalize_prefix=True)
    again = ClipCapConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert (again.prefix_dim, again.vision_backend, again.open_clip_model_name) == (24, "open_clip", None)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"vision_backend": "timm"}, "`vision_backend` must be one of ('clip', 'open_clip'), got 'timm'"),
        ({"vision_backend": "open_clip"}, "needs `open_clip_model_name` (e.g. 'RN50x4') or `open_clip_model_cfg`"),
        ({"vision_backend": "open_clip", "open_clip_model_name": "RN51"}, "Unknown open_clip model 'RN51'"),
        ({"vision_backend": "open_clip", "open_clip_model_name": "RN50x4", "open_clip_pretrained": "laion"},
         "Unknown open_clip pretrained tag 'laion' for 'RN50x4': `open_clip_pretrained` must be one of ['openai']"),
        ({"vision_backend": "open_clip", "open_clip_model_name": "RN50x4", "vision_config": {"projection_dim": 8}},
         "leave it None with vision_backend='open_clip'"),
        ({"open_clip_model_name": "RN50x4"}, "vision_backend='clip' does not use `open_clip_model_name`; set "
                                             "vision_backend='open_clip' or leave it None"),
        ({"vision_backend": "open_clip", "open_clip_model_cfg": {"vision_cfg": {}}},
         "lacks the key 'embed_dim'"),
        ({"vision_backend": "open_clip", "open_clip_model_cfg": {"embed_dim": 0, "vision_cfg": {}}},
         "`open_clip_model_cfg['embed_dim']` must be a positive integer, got 0"),
        ({"vision_backend": "open_clip", "open_clip_model_name": "local-dir:/x", "open_clip_pretrained": "openai"},
         "`open_clip_pretrained` must be None for 'local-dir:/x'"),
    ],
)
def test_config_rejects_invalid_open_clip_settings(kwargs, message):
    with pytest.raises(ValueError) as error:
        ClipCapConfig(**kwargs)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "backend, pretrained, message",
    [
        ("timm", None, "`vision_backend` must be one of ('clip', 'open_clip'), got 'timm'"),
        ("clip", "openai", "vision_backend='clip' does not use `open_clip_pretrained`"),
    ],
)
def test_loading_a_tower_checks_the_backend_as_the_config_does(backend, pretrained, message):
    # Refused before anything is looked up: the name would otherwise be a missing folder.
    with pytest.raises(ValueError) as error:
        load_pretrained_vision_model("./no-such-tower", backend, pretrained)
    assert message in str(error.value)


def test_loading_pretrained_weights_needs_a_tag():
    with pytest.raises(ValueError, match=r"needs a pretrained tag, e.g. \['openai'\]"):
        ClipCapOpenClipVisionModel.from_open_clip_pretrained("RN50x4")


def test_weights_that_cannot_be_loaded_raise_an_os_error_naming_the_model(tmp_path, monkeypatch):
    save_open_clip_local_dir(tmp_path / "rn", "resnet")
    (tmp_path / "rn" / "open_clip_model.safetensors").unlink()
    with pytest.raises(OSError, match=r"open_clip 'local-dir:.*rn': Required pretrained weights .* as local-dir:PATH"):
        ClipCapOpenClipVisionModel.from_open_clip_pretrained(f"local-dir:{tmp_path / 'rn'}")

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai'")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(OSError, match=r"open_clip 'RN50x4' \(pretrained tag 'openai'\): Failed to download"):
        ClipCapOpenClipVisionModel.from_open_clip_pretrained("RN50x4", "openai")


def test_local_dir_problems_name_the_folder_or_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"the folder .*missing does not exist"):
        ClipCapConfig(vision_backend="open_clip", open_clip_model_name=f"local-dir:{tmp_path / 'missing'}")
    (tmp_path / "open_clip_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"open_clip_config\.json is not valid JSON: Expecting property name"):
        ClipCapConfig(vision_backend="open_clip", open_clip_model_name=f"local-dir:{tmp_path}")


# ---------------------------------------------------------------- preprocessing


def open_clip_inference_transform(name, tag):
    """open_clip's inference transform for a built-in model and tag, resolved as create_model_and_transforms does."""
    cfg = merge_preprocess_dict(PreprocessCfg(), open_clip.get_pretrained_cfg(name, tag))
    cfg["size"] = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


@pytest.mark.parametrize("name, tag, width, image_size, quick_gelu", BUILTIN_MODELS)
def test_pixel_values_equal_open_clip_transform(name, tag, width, image_size, quick_gelu):
    processor = ClipCapImageProcessor.from_open_clip(name, tag)
    assert (processor.size, processor.crop_size, processor.resample) == (image_size, image_size, "bicubic")
    images = odd_sized_images()
    expected = torch.stack([open_clip_inference_transform(name, tag)(image) for image in images])
    torch.testing.assert_close(processor(images)["pixel_values"], expected, atol=1e-5, rtol=0)


def test_pixel_values_equal_create_model_and_transforms_for_a_local_model(tmp_path):
    preprocess_cfg = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear"}
    name, _ = save_open_clip_local_dir(tmp_path / "tiny", "resnet", preprocess_cfg=preprocess_cfg)
    _, _, open_clip_preprocess = open_clip.create_model_and_transforms(name)
    processor = ClipCapImageProcessor.from_open_clip(name)
    assert (processor.size, processor.resample, processor.image_mean) == (64, "bilinear", [0.5, 0.4, 0.3])
    images = odd_sized_images(seed=1)
    expected = torch.stack([open_clip_preprocess(image) for image in images])
    torch.testing.assert_close(processor(images)["pixel_values"], expected, atol=1e-5, rtol=0)


def test_squash_pixel_values_equal_create_model_and_transforms(tmp_path):
    # SigLIP's open_clip tags (ViT-B-16-SigLIP/webli) resize to the square whatever the aspect ratio.
    preprocess_cfg = {"resize_mode": "squash", "mean": [0.5] * 3, "std": [0.5] * 3}
    name, _ = save_open_clip_local_dir(tmp_path / "squash", "vit", preprocess_cfg=preprocess_cfg)
    _, _, open_clip_preprocess = open_clip.create_model_and_transforms(name)
    processor = ClipCapImageProcessor.from_open_clip(name)
    assert (processor.resize_mode, processor.size, processor.crop_size) == ("squash", 32, 32)
    images = odd_sized_images(seed=2)
    expected = torch.stack([open_clip_preprocess(image) for image in images])
    torch.testing.assert_close(processor(images)["pixel_values"], expected, atol=1e-5, rtol=0)


def test_longest_resize_mode_is_refused(tmp_path):
    name, _ = save_open_clip_local_dir(tmp_path / "longest", "vit", preprocess_cfg={"resize_mode": "longest"})
    with pytest.raises(ValueError, match="resize_mode='longest'; ClipCapImageProcessor implements 'shortest' and "
                                         "'squash' only"):
        ClipCapImageProcessor.from_open_clip(name)


# ---------------------------------------------------------------- image embeddings


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_image_features_equal_open_clip_encode_image(tmp_path, kind, gpt2_dir, tokenizer_dir):
    name, clip = save_open_clip_local_dir(tmp_path / kind, kind, seed=3)
    model = ClipCapForConditionalGeneration.from_vision_text_pretrained(
        name, str(gpt2_dir), vision_backend="open_clip", prefix_length=3
    ).eval()
    processor = ClipCapProcessor.from_vision_text_pretrained(
        name, str(tokenizer_dir), num_image_tokens=3, vision_backend="open_clip"
    )
    assert model.config.prefix_dim == TINY_OPEN_CLIP_CFGS[kind]["embed_dim"]
    assert model.config.open_clip_model_cfg["quick_gelu"] is (kind == "vit")

    pixel_values = processor(images=odd_sized_images())["pixel_values"]
    with torch.no_grad():
        expected = clip.encode_image(pixel_values)
        torch.testing.assert_close(model.get_image_embeds(pixel_values), expected, atol=1e-5, rtol=0)
    # Captions from pixels go through the same embedding.
    torch.testing.assert_close(
        model.generate(pixel_values=pixel_values, max_new_tokens=4),
        model.generate(image_embeds=expected, max_new_tokens=4),
    )


def test_a_coca_tower_gives_its_pooled_embedding(tmp_path):
    # CoCa's image tower (attentional pooling, `output_tokens=True`) returns (pooled, tokens); ClipCap reads the pooled
    # embedding, as CoCa's encode_image does, from the tower open_clip built and from one rebuilt from the config.
    text_cfg = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
    coca_cfg = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 8, "patch_size": 8,
                       "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 4,
                       "output_tokens": True},
        "text_cfg": {**text_cfg, "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {**text_cfg, "width": 24},
    }
    torch.manual_seed(0)
    coca = open_clip.CoCa(**coca_cfg).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    config = ClipCapConfig(vision_backend="open_clip", open_clip_model_cfg=coca_cfg, text_config=tiny_gpt2_config(),
                           prefix_length=3)
    model = ClipCapForConditionalGeneration(
        config, vision_model=ClipCapOpenClipVisionModel(config.open_clip_model_cfg, visual=coca.visual)
    ).eval()
    with torch.no_grad():
        expected = coca.encode_image(pixel_values, normalize=False)
        torch.testing.assert_close(model.get_image_embeds(pixel_values), expected)
        assert model.get_prefix_embeds(pixel_values=pixel_values).shape == (2, 3, 32)
    model.save_pretrained(tmp_path)
    loaded = ClipCapForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.get_image_embeds(pixel_values), expected)


def test_saved_folder_rebuilds_the_tower_without_open_clip_weights(tmp_path, monkeypatch):
    clip = tiny_open_clip("resnet", seed=5)
    config = open_clip_config("resnet", mapping_type="transformer", prefix_length=3, clip_length=2,
                              mapping_num_layers=1, mapping_num_heads=4, normalize_prefix=True)
    model = ClipCapForConditionalGeneration(
        config, vision_model=ClipCapOpenClipVisionModel(config.open_clip_model_cfg, visual=clip.visual)
    ).eval()
    model.save_pretrained(tmp_path)

    def no_download(*args, **kwargs):
        raise AssertionError("a saved folder must not fetch open_clip weights")

    monkeypatch.setattr(open_clip, "create_model", no_download)
    loaded = ClipCapForConditionalGeneration.from_pretrained(tmp_path).eval()
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.get_image_embeds(pixel_values), clip.encode_image(pixel_values))
        image_tokens = torch.full((2, 3), model.config.image_token_id)
        torch.testing.assert_close(loaded(pixel_values=pixel_values, input_ids=image_tokens).logits,
                                   model(pixel_values=pixel_values, input_ids=image_tokens).logits)
    assert not any(parameter.requires_grad for parameter in loaded.vision_model.parameters())


def test_a_timm_tower_s_computed_buffers_survive_a_round_trip(tmp_path):
    # EVA02's rotary tables are buffers timm computes and keeps out of the state dict: transformers 5, which builds the
    # loaded model on the meta device, left them uninitialised, and the embeddings came back NaN.
    model_cfg = {"embed_dim": 32, "vision_cfg": {"timm_model_name": "eva02_tiny_patch14_224", "image_size": 224,
                                                 "timm_model_pretrained": False, "timm_pool": "token",
                                                 "timm_proj": "linear"}}
    config = ClipCapConfig(vision_backend="open_clip", open_clip_model_cfg=model_cfg, text_config=tiny_gpt2_config(),
                           prefix_length=3)
    torch.manual_seed(0)
    model = ClipCapForConditionalGeneration(config).eval()
    rotary = {name: buffer for name, buffer in model.named_buffers() if "rope" in name}
    assert rotary and all(name in model.state_dict() for name in rotary)
    model.save_pretrained(tmp_path)
    loaded = ClipCapForConditionalGeneration.from_pretrained(tmp_path).eval()
    for name, buffer in loaded.named_buffers():
        if name in rotary:
            torch.testing.assert_close(buffer, rotary[name], rtol=0, atol=0)
    pixel_values = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.get_image_embeds(pixel_values), model.get_image_embeds(pixel_values))
    # A folder saved before they were saved (or with a tower given ready-made) lacks them: they are computed again.
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    save_file({name: tensor for name, tensor in weights.items() if "rope" not in name}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    older = ClipCapForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(older.get_image_embeds(pixel_values), model.get_image_embeds(pixel_values))
    # Computed from the config, they are no part of the embeddings cache's fingerprint (which hashed the state dict
    # before they joined it): caches computed before keep theirs. The weights still are.
    from clipcap_hf.data.embeddings import vision_fingerprint

    image_processor = ClipCapImageProcessor(size=224, crop_size=224)
    before = vision_fingerprint(older, image_processor)
    with torch.no_grad():
        older.vision_model.visual.trunk.rope.bands.mul_(2)
        assert vision_fingerprint(older, image_processor) == before
        next(older.vision_model.parameters()).mul_(2)
        assert vision_fingerprint(older, image_processor) != before


def test_a_given_tower_of_another_backend_or_model_config_is_refused(tokenizer):
    # Accepted, they failed at their first image (an AttributeError), or saved a folder that did not load.
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    vit_config = open_clip_config("vit")
    resnet = ClipCapOpenClipVisionModel(open_clip_config("resnet").open_clip_model_cfg)
    with pytest.raises(ValueError, match=r"^The given open_clip vision_model was built from another model config than "
                                         r"the config's `open_clip_model_cfg`; the folder saved with it would not"):
        ClipCapForConditionalGeneration(vit_config, vision_model=resnet)
    clip_tower = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                                                num_hidden_layers=1, num_attention_heads=4,
                                                                image_size=32, patch_size=8, projection_dim=24))
    with pytest.raises(ValueError, match=r"^The given vision_model is a CLIPVisionModelWithProjection, and the "
                                         r"config's vision_backend is 'open_clip'"):
        ClipCapForConditionalGeneration(vit_config, vision_model=clip_tower)
    clip_config = ClipCapConfig(vision_config=clip_tower.config, text_config=tiny_gpt2_config(), prefix_length=3)
    with pytest.raises(ValueError, match=r"^The given vision_model is an open_clip tower, and the config's "
                                         r"vision_backend is 'clip'"):
        ClipCapForConditionalGeneration(clip_config, vision_model=resnet)
    model = ClipCapForConditionalGeneration(vit_config, vision_model=ClipCapOpenClipVisionModel(
        vit_config.open_clip_model_cfg))  # its own config fits
    assert model.get_image_embeds(torch.randn(1, 3, 32, 32)).shape == (1, 24)


def test_a_given_timm_tower_saves_its_computed_buffers_and_its_own_model_stays_as_it_was(tmp_path, caplog):
    model_cfg = {"embed_dim": 32, "vision_cfg": {"timm_model_name": "eva02_tiny_patch14_224", "image_size": 224,
                                                 "timm_model_pretrained": False, "timm_pool": "token",
                                                 "timm_proj": "linear"}}
    torch.manual_seed(0)
    clip = open_clip.CLIP(**model_cfg, text_cfg={"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2,
                                                 "layers": 1}).eval()
    own_keys = sorted(clip.state_dict())
    tower = ClipCapOpenClipVisionModel(model_cfg, visual=clip.visual)
    assert sorted(clip.state_dict()) == own_keys  # the user's model is not changed (its state dict loads as before)
    config = ClipCapConfig(vision_backend="open_clip", open_clip_model_cfg=model_cfg, text_config=tiny_gpt2_config(),
                           prefix_length=3)
    model = ClipCapForConditionalGeneration(config, vision_model=tower).eval()
    model.save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):  # saved with the weights: nothing reported missing at load
        loaded = ClipCapForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert "rope" not in caplog.text
    pixel_values = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.get_image_embeds(pixel_values), clip.encode_image(pixel_values))


def test_frozen_open_clip_tower_keeps_its_batch_norm_statistics_in_training():
    clip = tiny_open_clip("resnet")
    config = open_clip_config("resnet")
    model = ClipCapForConditionalGeneration(
        config, vision_model=ClipCapOpenClipVisionModel(config.open_clip_model_cfg, visual=clip.visual)
    )
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = clip.encode_image(pixel_values)
    model.train()
    assert model.mapping_network.training and not model.vision_model.training
    captions = torch.tensor([[model.config.image_token_id] * 3 + [5, 6], [model.config.image_token_id] * 3 + [7, 8]])
    model(pixel_values=pixel_values, input_ids=captions, labels=captions).loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(model.get_image_embeds(pixel_values), expected)


def test_trust_remote_code_loads_an_open_clip_model_without_the_package(tmp_path, processor):
    clip = tiny_open_clip("vit", seed=2)
    config = open_clip_config("vit")
    model = ClipCapForConditionalGeneration(
        config, vision_model=ClipCapOpenClipVisionModel(config.open_clip_model_cfg, visual=clip.visual)
    ).eval()
    folder = tmp_path / "clipcap"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert (folder / "open_clip_vision.py").exists()
    pixel_values = torch.randn(2, 3, 32, 32)
    torch.save(pixel_values, tmp_path / "pixels.pt")
    expected = model.generate(pixel_values=pixel_values, max_new_tokens=5).tolist()
    output = run_without_package(
        f"""
        import json, sys
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        pixel_values = torch.load({str(tmp_path / "pixels.pt")!r}, weights_only=True)
        print(json.dumps(model.generate(pixel_values=pixel_values, max_new_tokens=5).tolist()))
        """,
        tmp_path,
    )
    assert output == expected


@pytest.mark.parametrize(
    "kind, image_size, given",
    [("resnet", 64, (32, 32)), ("vit", 32, (64, 64)), ("vit", [32, 48], (48, 32))],
)
def test_pixel_values_of_another_size_than_the_tower_s_are_refused_naming_the_size(kind, image_size, given):
    # open_clip's ViT and ModifiedResNet take their config's image size alone; other sizes failed inside the tower
    # ("The size of tensor a (2) must match the size of tensor b (5)"), naming no input.
    model_cfg = dict(TINY_OPEN_CLIP_CFGS[kind])
    model_cfg["vision_cfg"] = {**model_cfg["vision_cfg"], "image_size": image_size}
    config = ClipCapConfig(vision_backend="open_clip", open_clip_model_cfg=model_cfg, text_config=tiny_gpt2_config(),
                           prefix_length=3)
    model = ClipCapForConditionalGeneration(config).eval()
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    message = (
        f"`pixel_values` must be images of {height}x{width} pixels (height x width), the size of this model's "
        f"open_clip vision tower (config.open_clip_model_cfg['vision_cfg']['image_size']); got {given[0]}x{given[1]}. "
        "Make them with this model's processor (ClipCapProcessor / AutoProcessor), which resizes and crops to that "
        "size: `processor(images=images)`."
    )
    bad = torch.randn(1, 3, *given)
    for run in (model.get_image_embeds, model.interpret_prefix, lambda pixels: model.generate(pixel_values=pixels)):
        with pytest.raises(ValueError) as caught:
            run(bad)
        assert str(caught.value) == message
    assert model.get_image_embeds(torch.randn(2, 3, height, width)).shape == (2, 24)


def test_a_timm_tower_takes_other_sizes_than_its_config_s():
    # A timm tower is not fixed to its config's image size (a ConvNeXt pools whatever it is given): not refused.
    model_cfg = {"embed_dim": 24, "vision_cfg": {"timm_model_name": "test_convnext", "image_size": 64,
                                                 "timm_model_pretrained": False, "timm_pool": "avg",
                                                 "timm_proj": "linear"}}
    config = ClipCapConfig(vision_backend="open_clip", open_clip_model_cfg=model_cfg, text_config=tiny_gpt2_config(),
                           prefix_length=3)
    model = ClipCapForConditionalGeneration(config).eval()
    assert model.vision_model.fixed_image_size is None
    with torch.no_grad():
        assert model.get_image_embeds(torch.randn(2, 3, 48, 40)).shape == (2, 24)
