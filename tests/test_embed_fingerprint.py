"""The vision fingerprint that names and guards embeddings folders: one value for one tower under transformers 4 and 5
(which holds ViT, SigLIP and DINOv2 weights under other names), and the folders fingerprinted before still read."""

import json

import datasets
import pytest
import torch
import transformers
from conftest import count_vision_images, random_images, tiny_config
from transformers import (
    CLIPVisionConfig,
    Dinov2Config,
    Dinov2WithRegistersConfig,
    Siglip2VisionConfig,
    SiglipVisionConfig,
    ViTConfig,
)

from clipcap_hf import ClipCapConfig, ClipCapForConditionalGeneration, ClipCapImageProcessor
from clipcap_hf.data import check_embeddings, embed_images, embedding_cache_folder, vision_fingerprint

TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "patch_size": 8}
TOWERS = {
    "clip": (CLIPVisionConfig(**TOWER, image_size=32, projection_dim=24), None),
    "vit_pooled": (ViTConfig(**TOWER, image_size=32), "pooled"),
    "vit_cls": (ViTConfig(**TOWER, image_size=32), "cls"),
    "siglip": (SiglipVisionConfig(**TOWER, image_size=32), None),
    "siglip2": (Siglip2VisionConfig(**TOWER, num_patches=16), None),
    "dinov2": (Dinov2Config(**TOWER, image_size=32), None),
    "dinov2_swiglu": (Dinov2Config(**TOWER, image_size=32, use_swiglu_ffn=True), None),
    "dinov2_registers": (Dinov2WithRegistersConfig(**TOWER, image_size=32, num_register_tokens=2), None),
}
IS_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def tower_model(tokenizer, kind: str) -> ClipCapForConditionalGeneration:
    """
    A tiny ClipCap model whose `kind` tower has the same weights under both transformers versions: each tensor's
    values follow its elements in order, repeating every 8, so they depend neither on its name nor on where the tower
    registers it (transformers 5 moved some), and DINOv2's SwiGLU input projection, two halves of it on 5.x, is
    filled alike either way.
    """
    vision_config, pooling = TOWERS[kind]
    pooling = {"vision_pooling": pooling} if pooling else {}
    config = ClipCapConfig(
        vision_config=vision_config, text_config=tiny_config(tokenizer).text_config, prefix_length=2, **pooling
    )
    model = ClipCapForConditionalGeneration(config).eval()
    with torch.no_grad():
        for tensor in model.vision_model.state_dict().values():
            tensor.copy_((torch.arange(tensor.numel()) % 8 - 3.5).reshape(tensor.shape) / 8)
    return model


IMAGE_PROCESSOR = ClipCapImageProcessor(size=32, crop_size=32)

# Checked under transformers 4.57.6 and 5.25.0 alike (each computed in its own interpreter, and under 4.57 equal to
# what clipcap_hf gave before the fingerprint read checkpoint names, so folders written with 4.x keep theirs).
FINGERPRINTS = {
    "clip": "338fed74c3190790684d0b1dd11886b76bcf3906f4e82f1edd95adad00e8e669",
    "vit_pooled": "ab2b5e2d73ae9f790f56363a420c4159cb2143e4b8a9919b431bffe174bf1293",
    "vit_cls": "5fa374f371ca747c7cedbae0d8ed47b1548816e29f1ae6314323e090438f9dd7",
    "siglip": "4f0d5e5b4de46db069662628aeda8c6e8ba7da9b57fa40d1280e469b2198e1c1",
    "siglip2": "13d70d5a98f537710cdd1e8cb03dfc816a3d48497d1e2b51c1c01332c5d2b07c",
    "dinov2": "2022658f234b79de4363c2e055e3c48d09e6b9840577b06234f892b714b51957",
    "dinov2_swiglu": "769fa39a53efaacbb7b9df65c20cf88aea6f2fd50b57d035cf523335aa46f6c1",
    "dinov2_registers": "c66cdc4117c233753d17e995ec8e88de16b26b44b71c914be500fc434c6a6253",
}


@pytest.mark.parametrize("kind", sorted(TOWERS))
def test_a_towers_fingerprint_is_the_same_under_transformers_4_and_5(tokenizer, kind):
    model = tower_model(tokenizer, kind)
    fingerprint = vision_fingerprint(model, IMAGE_PROCESSOR)
    assert fingerprint == FINGERPRINTS[kind]
    # Still a hash of the weights' values and dtypes, and of the preprocessing.
    with torch.no_grad():
        next(iter(model.vision_model.parameters())).view(-1)[0] += 1
    assert vision_fingerprint(model, IMAGE_PROCESSOR) not in (fingerprint, FINGERPRINTS[kind])
    assert vision_fingerprint(model, ClipCapImageProcessor(size=32, crop_size=28)) != fingerprint
    assert vision_fingerprint(tower_model(tokenizer, kind).half(), IMAGE_PROCESSOR) != fingerprint


# What clipcap_hf gave the `vit_pooled` and `siglip` towers under transformers 5.25.0 before (the weights' names as
# transformers 5 holds them), which the embeddings folders it wrote carry; under 4.57.6 it gave `FINGERPRINTS`' values.
FINGERPRINTS_BEFORE_ON_5 = {
    "vit_pooled": "a0ee5577086b33dbdfaba2bebf8aebdb199c4657f401d3c8da907b249bd10c5b",
    "siglip": "57b94838b2ebb38cb4a95710ce6c24eef20a4c3d00c4a4f9334144116701aadd",
}


@pytest.mark.parametrize("kind", sorted(FINGERPRINTS_BEFORE_ON_5))
def test_a_folder_fingerprinted_before_is_still_read_and_trainings_cache_found_by_its_name(tmp_path, tokenizer, kind):
    model = tower_model(tokenizer, kind)
    before = FINGERPRINTS_BEFORE_ON_5[kind] if IS_TRANSFORMERS_5 else FINGERPRINTS[kind]
    paths = []
    for index, image in enumerate(random_images(2)):
        paths.append(str(tmp_path / f"{index}.png"))
        image.save(paths[-1])
    rows = datasets.Dataset.from_dict({"image_path": paths, "image_id": [0, 1], "caption": ["a", "b"]})
    embed_images(rows, model, IMAGE_PROCESSOR, tmp_path / "cache")
    # The folder as the code before wrote it: named by, and carrying, the fingerprint it gave the tower.
    (written,) = (tmp_path / "cache").iterdir()
    folder = written.rename(tmp_path / "cache" / before[:16])
    info = json.loads((folder / "embeddings_info.json").read_text())
    (folder / "embeddings_info.json").write_text(json.dumps({**info, "fingerprint": before}))

    assert check_embeddings(folder, model, IMAGE_PROCESSOR, finished=True)["fingerprint"] == before
    assert embedding_cache_folder(tmp_path / "cache", model, IMAGE_PROCESSOR) == folder
    seen, counting = count_vision_images(model)
    with counting:
        _, table = embed_images(rows, model, IMAGE_PROCESSOR, tmp_path / "cache")
    assert seen == [] and table.shape == (2, 32)  # reused, not embedded again
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == [before[:16]]
    # Another tower is still refused, and gets a folder of its own.
    other = tower_model(tokenizer, "dinov2")
    with pytest.raises(ValueError, match="computed with another vision tower or image preprocessing"):
        check_embeddings(folder, other, IMAGE_PROCESSOR)
    assert embedding_cache_folder(tmp_path / "cache", other, IMAGE_PROCESSOR).name == FINGERPRINTS["dinov2"][:16]
