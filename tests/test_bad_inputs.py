"""Bad inputs of the data loaders and of training runs: each is refused naming the file, the record and the fix."""

import json

import numpy as np
import pytest
import torch

from clipcap_hf.data import load_coco_karpathy, load_image_folder
from clipcap_hf.utils.file_utils import read_json


@pytest.mark.parametrize(
    "metadata, error",
    [
        ('{"file_name": "a.png", "text": "fine"}\n{"file_name": "b.png", "text": []}\n',
         r"metadata.jsonl: line 2 \(b.png\) has 'text' = \[\], no caption; give the image at least one caption"),
        ('{"file_name": "a.png", "text": 123}\n',
         r"metadata.jsonl: line 1 \(a.png\) has the caption 123 \(int\); a caption must be text"),
        ('{"file_name": "a.png", "text": ["fine", null]}\n',
         r"metadata.jsonl: line 1 \(a.png\) text\[1\] has the caption None \(NoneType\); a caption must be text"),
        ('{"file_name": "a.png", "text": "fine"}\n{"file_name": "caf\\udce9.png", "text": "A cup."}\n',
         r"metadata.jsonl: line 2 \(caf\\udce9.png\) names the file 'caf\\udce9.png', which is not valid Unicode .* "
         r"rename the image to a UTF-8 name"),
    ],
)
def test_metadata_records_without_text_captions_or_with_undecodable_names_are_named(tmp_path, metadata, error):
    (tmp_path / "metadata.jsonl").write_text(metadata, encoding="utf-8")
    with pytest.raises(ValueError, match=error):
        load_image_folder(tmp_path)


def test_a_caption_that_is_not_text_is_not_called_empty(tmp_path):
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": 7}]}]}))
    with pytest.raises(ValueError, match=r"k.json: images\[0\] \(a.jpg\) sentences\[0\] has the caption 7 \(int\)"):
        load_coco_karpathy(path, tmp_path)


def test_a_file_that_is_not_utf8_is_named_with_the_line_of_its_first_bad_byte(tmp_path):
    path = tmp_path / "metadata.csv"
    path.write_bytes("file_name,text\na.png,A dog.\ncaf\xe9.png,A cup.\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"metadata.csv is not valid UTF-8 \(.*\); the file must be UTF-8 encoded "
                                         r"\(the first bad byte is on line 3\)\."):
        load_image_folder(tmp_path)
    path.write_bytes(b'{"a": 1,\n"b": "\xff"}')
    with pytest.raises(ValueError, match=r"the first bad byte is on line 2"):
        read_json(path)

# ---------------------------------------------------------------- damaged model folders, through `clipcap caption`


def damaged_folder(saved_model_dir, damage):
    if damage == "truncated weights":
        weights = saved_model_dir / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage in ("no sub-configs", "mapper width", "language model width", "vision heads"):
        config = json.loads((saved_model_dir / "config.json").read_text())
        if damage == "no sub-configs":
            del config["text_config"], config["vision_config"]
        elif damage == "mapper width":
            config["prefix_dim"] *= 2
        elif damage == "vision heads":
            config["vision_config"]["num_attention_heads"] = 5  # does not divide the width, 32
        else:
            config["text_config"]["n_embd"] *= 2
        (saved_model_dir / "config.json").write_text(json.dumps(config))
    else:  # a file of the processor, in each of its forms (transformers 4.57 also writes vocab.json and
        # preprocessor_config.json, which serve as well)
        for name in damage.split(" or "):
            (saved_model_dir / name).unlink(missing_ok=True)
    return saved_model_dir


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncated weights", "the weights (model.safetensors) cannot be read"),
        ("no sub-configs", "config.json has no text_config and no vision_config"),
        # A mapper width that no longer fits the tower is refused by the config itself, before the weights load.
        ("mapper width", "`prefix_dim` (48) differs from the width of the vision tower's image embeddings (24"),
        ("language model width", "the weights do not fit config.json"),
        # transformers 5 refuses it in the config (huggingface_hub's strict dataclasses), 4.57 in the attention layer.
        ("vision heads",
         ("`vision_config`: The hidden size (32) is not a multiple of the number of attention heads (5)",
          "embed_dim must be divisible by num_heads (got `embed_dim`: 32 and `num_heads`: 5)")),
        ("tokenizer_config.json", "has no tokenizer_config.json, so it holds no complete processor"),
        ("tokenizer.json or vocab.json",
         "has no tokenizer.json or vocab.json or vocab.txt or tokenizer.model or spiece.model"),
        ("processor_config.json or preprocessor_config.json",
         "has no processor_config.json or preprocessor_config.json"),
    ],
)
def test_a_damaged_model_folder_is_one_line_naming_it(saved_model_dir, tmp_path, capsys, damage, message):
    from conftest import random_images

    from clipcap_hf.commands import main

    random_images(1)[0].save(tmp_path / "a.png")
    folder = damaged_folder(saved_model_dir, damage)
    assert main(["caption", str(tmp_path / "a.png"), "--model", str(folder)]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("clipcap caption: error: ")]
    messages = (message,) if isinstance(message, str) else message  # one per transformers version
    assert len(errors) == 1 and f"{folder}" in errors[0] and any(message in errors[0] for message in messages)
    assert "Traceback" not in captured.err and captured.out == ""


def _write_shards(folder, shards: dict[str, dict[str, bytes]]) -> list[str]:
    import io
    import tarfile

    for shard, members in shards.items():
        with tarfile.open(folder / shard, "w") as tar:
            for name, data in members.items():
                member = tarfile.TarInfo(name)
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return [str(folder / shard) for shard in shards]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_bad_image_or_caption_in_a_webdataset_shard_is_named_by_its_shard_and_sample(tmp_path, streaming):
    import io
    import types

    from conftest import random_images

    from clipcap_hf.data import load_image_source
    from clipcap_hf.data.prepare import _pixel_rows

    png = io.BytesIO()
    random_images(1)[0].save(png, "PNG")
    second = {"s1.png": png.getvalue(), "s1.txt": b"A cat.", "s2.png": b"not an image", "s2.txt": b"A dog."}
    files = _write_shards(tmp_path, {"00000.tar": {"s0.png": png.getvalue(), "s0.txt": b"A dog."}, "00001.tar": second})
    source = load_image_source(data_files=files, caption_column="txt", streaming=streaming)
    where = rf"shard {tmp_path / '00001.tar'}, sample s2: UnidentifiedImageError: cannot identify image file \(key sha"
    with pytest.raises(ValueError, match=where):
        list(_pixel_rows(source, types.SimpleNamespace(on_bad_image="error"), "training"))

    blank = {**second, "s2.png": png.getvalue(), "s2.txt": b"   "}
    files = _write_shards(tmp_path, {"00001.tar": blank})
    with pytest.raises(ValueError, match=r"00001.tar, sample 's2': the image sha256:\w+ has 'txt' = '   '; give each"):
        list(load_image_source(data_files=files, caption_column="txt", streaming=streaming))


def test_generate_given_numpy_inputs_names_input_ids_and_return_tensors_pt(tokenizer, processor):
    # processor(..., return_tensors="np") output failed in generate with "'numpy.ndarray' object has no attribute
    # 'is_floating_point'".
    from conftest import random_images, tiny_model

    model = tiny_model(tokenizer)
    inputs = processor(images=random_images(1), return_tensors="np")
    with pytest.raises(TypeError) as error:
        model.generate(**inputs, max_new_tokens=2)
    assert str(error.value) == (
        '`input_ids` must be a torch tensor, got ndarray: call the processor with return_tensors="pt" (its default), '
        "or pass torch tensors."
    )


# ---------------------------------------------------------------- pixel values not made by the processor

PIXEL_VALUES_MESSAGE = (
    "`pixel_values` must be a floating-point torch tensor of shape (batch_size, 3, height, width), normalised as the "
    "vision tower reads them; got {}. Make them with this model's processor (ClipCapProcessor / AutoProcessor): "
    "`processor(images=images)`."
)


@pytest.mark.parametrize(
    "pixel_values, given",
    [
        # One image's pixels, without the batch dimension: "not enough values to unpack (expected 4, got 3)".
        (torch.zeros(3, 32, 32), "a float32 tensor of shape (3, 32, 32)"),
        # One channel: a convolution's "expected input[2, 1, 32, 32] to have 3 channels".
        (torch.zeros(2, 1, 32, 32), "a float32 tensor of shape (2, 1, 32, 32)"),
        # processor(return_tensors="np") or an image array: "'numpy.ndarray' object has no attribute 'to'".
        (np.zeros((2, 3, 32, 32), np.float32), "ndarray"),
        # An image's 0..255 (torchvision's read_image): captioned as it was, cast to floats but never normalised.
        (torch.full((1, 3, 32, 32), 200, dtype=torch.uint8), "a uint8 tensor of shape (1, 3, 32, 32)"),
        (torch.zeros(2, 32, 32, 3, dtype=torch.uint8), "a uint8 tensor of shape (2, 32, 32, 3)"),
    ],
    ids=["3-D", "one channel", "numpy", "uint8", "uint8 channels-last"],
)
def test_pixel_values_not_made_by_the_processor_are_named_with_the_fix(tokenizer, processor, pixel_values, given):
    from conftest import random_images, tiny_model

    model = tiny_model(tokenizer)
    input_ids = processor(images=random_images(1))["input_ids"]
    calls = {
        "generate": lambda: model.generate(pixel_values=pixel_values, max_new_tokens=2),
        "forward": lambda: model(input_ids=input_ids, pixel_values=pixel_values),
        "get_image_embeds": lambda: model.get_image_embeds(pixel_values),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError) as error:
            call()
        assert str(error.value) == PIXEL_VALUES_MESSAGE.format(given), name


def test_integer_pixel_values_are_refused_by_an_open_clip_tower_too():
    from conftest import TINY_OPEN_CLIP_CFGS
    from transformers import GPT2Config

    from clipcap_hf import ClipCapConfig, ClipCapForConditionalGeneration

    config = ClipCapConfig(vision_backend="open_clip", open_clip_model_cfg=TINY_OPEN_CLIP_CFGS["vit"], prefix_length=2,
                           text_config=GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300))
    model = ClipCapForConditionalGeneration(config).eval()
    assert model.get_image_embeds(torch.zeros(1, 3, 32, 32)).shape == (1, 24)
    with pytest.raises(ValueError) as error:
        model.get_prefix_embeds(pixel_values=torch.full((1, 3, 32, 32), 200, dtype=torch.uint8))
    assert str(error.value) == PIXEL_VALUES_MESSAGE.format("a uint8 tensor of shape (1, 3, 32, 32)")
