import io
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from conftest import build_tokenizer, tiny_processor
from torchvision import transforms
from transformers import CLIPImageProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from clipcap_hf import ClipCapImageProcessor, ClipCapProcessor
from clipcap_hf.image_processing_clipcap import load_image

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_samples"


def clip_reference_transform(size=224):
    """OpenAI CLIP's own preprocessing (clip.load's `_transform`), built from torchvision."""
    return transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            lambda image: image.convert("RGB"),
            transforms.ToTensor(),
            transforms.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        ]
    )


def photo_like(width, height, seed=0):
    """A smooth image with detail, so that resampling differences would show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / 7.0 + c) * np.cos(y / 11.0 - c) for c in range(3)], -1) * 100 + 128
    return PIL.Image.fromarray((base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(640, 480), (333, 500), (224, 224), (300, 225)])
def test_pixel_values_equal_clip_reference_preprocessing(size):
    image = photo_like(*size)
    ours = ClipCapImageProcessor()(image)["pixel_values"][0]
    reference = clip_reference_transform()(image)
    assert ours.shape == (3, 224, 224)
    assert (ours - reference).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA"])
def test_modes_that_convert_to_the_same_pixels_equal_clip_reference(mode):
    # Opaque alpha, so compositing on white (ours) and dropping alpha (CLIP's convert("RGB")) agree.
    image = photo_like(300, 225).convert(mode)
    reference = clip_reference_transform()(image)
    assert (ClipCapImageProcessor()(image)["pixel_values"][0] - reference).abs().max() < 1e-5


@pytest.mark.skipif(not SAMPLES.exists(), reason="shared/reference/official_samples is not present")
def test_pixel_values_equal_clip_reference_on_real_photographs():
    processor = ClipCapImageProcessor(size=288, crop_size=288)
    for path in sorted(SAMPLES.glob("*.jpg"))[:4]:
        image = PIL.Image.open(path)
        ours = processor(image)["pixel_values"][0]
        assert (ours - clip_reference_transform(288)(image)).abs().max() < 1e-5, path.name


def test_numpy_and_torch_inputs_equal_pil():
    image = photo_like(50, 40)
    processor = ClipCapImageProcessor(size=32, crop_size=32)
    expected = processor(image)["pixel_values"]
    array = np.asarray(image)
    channels_first = array.transpose(2, 0, 1)
    for variant in (array, channels_first, array.astype(np.float32) / 255, torch.from_numpy(channels_first.copy())):
        assert torch.allclose(processor(variant)["pixel_values"], expected, atol=1e-6)
    batch = processor(np.stack([array, array]))["pixel_values"]
    assert batch.shape == (2, 3, 32, 32) and torch.equal(batch[1], expected[0])


def test_modes_are_converted_to_rgb():
    processor = ClipCapImageProcessor(size=16, crop_size=16)
    rgb = photo_like(20, 16)

    gray = rgb.convert("L")
    np.testing.assert_allclose(processor(gray)["pixel_values"], processor(gray.convert("RGB"))["pixel_values"])

    palette = rgb.convert("P")
    np.testing.assert_allclose(processor(palette)["pixel_values"], processor(palette.convert("RGB"))["pixel_values"])

    cmyk = rgb.convert("CMYK")
    np.testing.assert_allclose(processor(cmyk)["pixel_values"], processor(cmyk.convert("RGB"))["pixel_values"])

    # A fully transparent image shows the white background, whatever colour its hidden pixels hold.
    rgba = PIL.Image.new("RGBA", (20, 16), (10, 200, 30, 0))
    white = PIL.Image.new("RGB", (20, 16), (255, 255, 255))
    np.testing.assert_allclose(processor(rgba)["pixel_values"], processor(white)["pixel_values"], atol=1e-6)


def test_exif_orientation_is_applied():
    image = photo_like(40, 20)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    stored = PIL.Image.open(io.BytesIO(buffer.getvalue()))
    processor = ClipCapImageProcessor(size=16, crop_size=16)
    upright = image.transpose(PIL.Image.Transpose.ROTATE_270)
    assert upright.size == (20, 40)
    np.testing.assert_allclose(processor(stored)["pixel_values"], processor(upright)["pixel_values"])
    assert not np.allclose(processor(stored)["pixel_values"], processor(image)["pixel_values"])


def test_decompression_bomb_is_an_unreadable_image_named_by_its_file(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    PIL.Image.new("RGB", (30, 20)).save(path)
    # Pillow refuses images over twice this many pixels with DecompressionBombError, which is not an OSError.
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 250)
    with pytest.raises(ValueError) as caught:
        load_image(path)
    assert str(caught.value) == (
        f"Cannot read image {path}: Image size (600 pixels) exceeds limit of 500 pixels, could be decompression "
        "bomb DOS attack. If you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS."
    )


@pytest.mark.parametrize(
    "images, message",
    [
        ([], "empty list of images"),
        (PIL.Image.new("RGB", (0, 5)), "size 0x5"),
        (np.full((4, 4, 3), 2.0, dtype=np.float32), "Float image arrays must hold values in [0, 1]"),
        (np.zeros((5, 6, 7), dtype=np.uint8), "shape (5, 6, 7)"),
    ],
)
def test_bad_images_are_rejected_with_a_message(images, message):
    with pytest.raises(ValueError) as error:
        ClipCapImageProcessor()(images)
    assert message in str(error.value)


def test_non_image_input_is_rejected():
    with pytest.raises(TypeError, match="Image 0: Expected a PIL image, a numpy array or a torch tensor, got str"):
        ClipCapImageProcessor()(["photo.jpg"])


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_float_images_are_rejected_with_their_index(bad_value):
    good = np.full((4, 4, 3), 0.5, dtype=np.float32)
    bad = good.copy()
    bad[1, 2, 0] = bad_value
    with pytest.raises(ValueError, match=r"Image 1: Float image arrays must hold finite values"):
        ClipCapImageProcessor(size=4, crop_size=4)([good, bad])
    with pytest.raises(ValueError, match=r"Image 0: .*finite"):
        ClipCapImageProcessor(size=4, crop_size=4)(torch.from_numpy(bad).permute(2, 0, 1))


def test_captions_become_training_labels(processor, tokenizer):
    batch = processor(captions=["A dog runs.", "Two cats sleep on a sofa!"])
    eos = tokenizer.eos_token_id
    image = [processor.image_token_id] * 4
    first = tokenizer("A dog runs.", add_special_tokens=False)["input_ids"] + [eos]
    second = tokenizer("Two cats sleep on a sofa!", add_special_tokens=False)["input_ids"] + [eos]
    assert batch["input_ids"][1].tolist() == image + second
    assert batch["labels"][1].tolist() == [-100] * 4 + second  # image tokens are never targets
    padding = len(second) - len(first)
    assert batch["labels"][0].tolist() == [-100] * 4 + first + [-100] * padding
    assert batch["attention_mask"][0].tolist() == [1] * (4 + len(first)) + [0] * padding
    assert "num_truncated" not in batch


def test_images_alone_and_prompts_get_the_image_tokens_in_front(processor, tokenizer, images):
    image = [processor.image_token_id] * 4
    assert processor.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert processor(images=images)["input_ids"].tolist() == [image] * 3
    prompts = processor(images=images[:2], text=["A dog", "Two red cats"])
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("A dog", "Two red cats")]
    padding = len(ids[1]) - len(ids[0])
    assert prompts["input_ids"].tolist() == [[tokenizer.pad_token_id] * padding + image + ids[0], image + ids[1]]
    assert prompts["attention_mask"][0].tolist() == [0] * padding + [1] * (4 + len(ids[0]))
    assert processor.batch_decode(prompts["input_ids"], skip_special_tokens=True) == ["A dog", "Two red cats"]
    # A prompt's one image token is expanded where it stands, as LLaVA's processor does.
    placed = processor(images=images[:1], text="A photo<image> of")["input_ids"][0].tolist()
    photo, of = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("A photo", " of"))
    assert placed == photo + image + of
    with pytest.raises(ValueError, match="Prompt 1 holds 2 image tokens '<image>'"):
        processor(images=images[:2], text=["A dog", "<image><image>"])
    with pytest.raises(ValueError, match=r"\['truncation'\] were passed twice"):
        processor(images=images[:1], text="A dog", truncation=True, text_kwargs={"truncation": False})


def test_caption_truncation_is_counted(processor, tokenizer):
    short_length = len(tokenizer("A dog.", add_special_tokens=False)["input_ids"]) + 1  # with EOS
    encoded = processor.tokenize_captions(["A dog runs on the beach.", "A dog."], max_length=short_length)
    assert encoded["input_ids"].shape[1] == 4 + short_length  # the image tokens are not counted
    assert encoded["num_truncated"] == 1
    assert encoded["input_ids"][1, -1] == tokenizer.eos_token_id


@pytest.mark.parametrize("max_length", [0, -1])
def test_caption_length_below_one_is_rejected(processor, max_length):
    message = rf"max_caption_length \(max_length\) must be at least 1 \(EOS included\), got {max_length}\."
    with pytest.raises(ValueError, match=message):
        processor(captions=["A dog."], max_caption_length=max_length)
    with pytest.raises(ValueError, match=message):
        processor.tokenize_captions(["A dog."], max_length=max_length)
    assert processor.tokenize_captions(["A dog."], max_length=1)["input_ids"].shape == (1, 4 + 1)


def test_empty_caption_is_rejected_with_its_index(processor):
    with pytest.raises(ValueError, match=r"Caption 1 is empty \(' '\)"):
        processor(captions=["A dog.", " "])


def test_caption_holding_the_image_token_is_rejected_with_its_index(processor):
    with pytest.raises(ValueError, match=r"Caption 1 holds the image token '<image>' \('a <image> dog'\)"):
        processor(captions=["A dog.", "a <image> dog"])
    # Counting a dataset's caption lengths, in batches: the dataset's row is named, not the row in its batch.
    import datasets

    from clipcap_hf.data import add_caption_lengths

    rows = datasets.Dataset.from_dict({"caption": ["A dog."] * 5 + ["a <image> dog"]})
    with pytest.raises(ValueError, match=r"^Caption 5 holds the image token '<image>' \('a <image> dog'\)"):
        add_caption_lengths(rows, processor, batch_size=2)


def test_a_special_tokens_text_in_a_caption_is_text_and_only_the_caption_end_is_eos(processor, tokenizer):
    eos = tokenizer.eos_token_id
    encoded = processor.tokenize_captions([f"A sign reading {tokenizer.eos_token} on a wall.", "A dog."])
    labels = encoded["labels"][0]
    assert (labels == eos).nonzero().flatten().tolist() == [len(labels) - 1]  # the EOS added at the end alone
    as_text = tokenizer(tokenizer.eos_token, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert len(as_text) > 1 and eos not in as_text
    dog = tokenizer("A dog.", add_special_tokens=False)["input_ids"] + [eos]  # other captions as before
    assert encoded["input_ids"][1, 4 : 4 + len(dog)].tolist() == dog


def test_prompts_are_left_padded_and_counted_against_images(processor, images):
    batch = processor(images=images, text="A dog")
    assert batch["input_ids"].shape[0] == 3  # one prompt for all images
    with pytest.raises(ValueError, match="Got 3 images but 2 prompts"):
        processor(images=images, text=["A", "B"])
    with pytest.raises(ValueError, match="Got 3 images but 1 captions"):
        processor(images=images, captions=["A dog."])


def test_prompt_tokenizer_options_are_applied(processor, tokenizer, images):
    prompts = ["A dog runs on the beach", "Two cats", "A"]
    image = [processor.image_token_id] * 4
    full = [image + tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    truncated = processor(images=images, text=prompts, truncation=True, max_length=6)["input_ids"]  # counts the image
    assert truncated.tolist() == [ids[:6] if len(ids) >= 6 else [tokenizer.pad_token_id] + ids for ids in full]
    padded = processor(images=images, text=prompts, text_kwargs={"padding": "max_length", "max_length": 20})
    assert padded["input_ids"].shape == (3, 20)
    assert padded["input_ids"][2].tolist() == [tokenizer.pad_token_id] * (20 - len(full[2])) + full[2]  # left


def test_prompt_truncation_cuts_text_only_never_image_tokens(tokenizer, images):
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    prompts = ["A dog runs on the beach", "Photo: <image> two cats sleep", "A"]
    image = [image_token_id] * 4
    full = [image + tokenizer(prompts[0], add_special_tokens=False)["input_ids"],
            tokenizer(prompts[1].replace("<image>", "<image>" * 4), add_special_tokens=False)["input_ids"],
            image + tokenizer(prompts[2], add_special_tokens=False)["input_ids"]]

    def keep_text(ids, budget, from_left):
        text = [index for index, token in enumerate(ids) if token != image_token_id]
        kept = set(text[len(text) - budget :] if from_left else text[:budget])
        return [token for index, token in enumerate(ids) if token == image_token_id or index in kept]

    for side in ("right", "left"):
        side_tokenizer = build_tokenizer()
        side_tokenizer.truncation_side = side
        processor = tiny_processor(side_tokenizer)
        for max_length in (4, 5, 7):
            batch = processor(images=images, text=prompts, truncation=True, max_length=max_length)
            pad = [side_tokenizer.pad_token_id]
            expected = [keep_text(ids, max_length - 4, side == "left") for ids in full]
            width = max(len(ids) for ids in expected)
            left_padded = [pad * (width - len(ids)) + ids for ids in expected]
            assert batch["input_ids"].tolist() == left_padded, (side, max_length)
            assert batch["attention_mask"].tolist() == [[0] * (width - len(ids)) + [1] * len(ids) for ids in expected]
        padded = processor(images=images, text=prompts, truncation=True, max_length=7, padding="max_length")
        assert padded["input_ids"].shape == (3, 7)
        assert (padded["input_ids"] == image_token_id).sum(1).tolist() == [4, 4, 4]
        with pytest.raises(ValueError, match=r"max_length=3 cannot hold the prompt's 4 image tokens"):
            processor(images=images, text=prompts, truncation=True, max_length=3)
        lengths = processor(images=images, text=prompts, truncation=True, max_length=5, return_length=True)["length"]
        assert lengths.tolist() == [5, 5, 5]  # the truncated rows' lengths, as the tokenizer's own truncation gives
        with pytest.raises(ValueError, match="return_overflowing_tokens is not supported with prompt truncation"):
            processor(images=images, text=prompts, truncation=True, max_length=5, return_overflowing_tokens=True)


def test_prompt_truncation_keeps_special_tokens_as_the_tokenizer_does(images):
    tokenizer = build_tokenizer()
    tokenizer.truncation_side = "left"
    tokenizer.add_bos_token = True
    if hasattr(tokenizer, "update_post_processor"):
        tokenizer.update_post_processor()
    text = "a photo of a big red dog"
    special = tokenizer(text, add_special_tokens=True)["input_ids"]
    if special == tokenizer(text, add_special_tokens=False)["input_ids"]:
        pytest.skip("GPT-2's tokenizer adds BOS on transformers 5 only")
    # The tokenizer's own left truncation cuts text and keeps its special tokens; so does the processor's.
    expected = tokenizer(text, add_special_tokens=True, truncation=True, max_length=len(special) - 2)["input_ids"]
    assert len(expected) == len(special) - 2 and expected[0] == special[0]
    processor = tiny_processor(tokenizer)
    batch = processor(images=images[:1], text=[text], add_special_tokens=True, truncation=True,
                      max_length=4 + len(expected))["input_ids"][0].tolist()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    assert [token for token in batch if token != image_token_id] == expected


def test_image_options_reach_the_image_processor_with_or_without_text(processor, images):
    expected = processor.image_processor(images, crop_size=16, image_mean=[0, 0, 0])["pixel_values"]
    assert expected.shape == (3, 3, 16, 16)
    for call in (
        lambda: processor(images=images, crop_size=16, image_mean=[0, 0, 0]),
        lambda: processor(images=images, text="A dog", crop_size=16, image_mean=[0, 0, 0]),
        lambda: processor(images=images, captions=["a", "b", "c"],
                          images_kwargs={"crop_size": 16, "image_mean": [0, 0, 0]}),
    ):
        torch.testing.assert_close(call()["pixel_values"], expected)
    assert not torch.equal(processor(images=images)["pixel_values"][:, :, :16, :16], expected)


def test_transformers_standard_image_switches(processor, images):
    # Each step can be switched off for a call, as transformers' image processors allow.
    image = np.asarray(images[0].convert("RGB").resize((32, 32)), dtype=np.float32)  # already at the crop size
    mean, std = np.asarray(OPENAI_CLIP_MEAN, np.float32), np.asarray(OPENAI_CLIP_STD, np.float32)
    raw = processor(images=images[0].resize((32, 32)), do_rescale=False, do_normalize=False)["pixel_values"][0]
    np.testing.assert_allclose(raw.numpy(), image.transpose(2, 0, 1))
    scaled = processor(images=images[0].resize((32, 32)), rescale_factor=0.5, text="A dog")["pixel_values"][0]
    np.testing.assert_allclose(scaled.numpy(), ((image * 0.5 - mean) / std).transpose(2, 0, 1), rtol=1e-5, atol=1e-5)
    uncropped = processor(images=images[0], do_resize=False, do_center_crop=False)["pixel_values"]
    assert uncropped.shape == (1, 3, images[0].height, images[0].width)


def test_options_no_part_takes_are_errors_that_name_them(processor, images):
    for options in ({"input_data_format": "channels_last"}, {"do_pad": True, "text": "A dog"}, {"temperature": 1.0}):
        with pytest.raises(TypeError, match=repr(next(name for name in options if name != "text"))):
            processor(images=images[:1], **options)
    with pytest.raises(ValueError, match=r"tokenizer options \['truncation'\].*captions take `max_caption_length`"):
        processor(images=images, captions=["a", "b", "c"], truncation=True)
    for options in ({"text": "A dog"}, {}):  # prompts (or none) take the tokenizer's truncation instead
        with pytest.raises(ValueError, match=r"`max_caption_length` applies to `captions`"):
            processor(images=images, max_caption_length=3, **options)
    with pytest.raises(ValueError, match="do_convert_rgb=False"):
        processor.image_processor(images, do_convert_rgb=False)


def test_return_tensors_is_an_option(processor, images):
    assert isinstance(processor(images=images[:1], text="A dog")["input_ids"], torch.Tensor)
    as_lists = processor(text=["A dog", "A"], return_tensors=None)
    assert isinstance(as_lists["input_ids"], list) and isinstance(as_lists["input_ids"][0], list)
    assert isinstance(processor(images=images[:1], return_tensors="np")["pixel_values"], np.ndarray)


def test_a_tokenizer_naming_code_of_its_own_is_refused_without_running_it(tmp_path, processor, monkeypatch):
    # transformers asks whether to run a folder's code unless trust_remote_code is given, and runs it on "y".
    processor.save_pretrained(tmp_path)
    marker = tmp_path / "code-ran"
    (tmp_path / "tokenization_custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PreTrainedTokenizerFast\n\n\nclass CustomTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n"
    )
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    auto_map = {"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]}
    config.update(tokenizer_class="CustomTokenizer", auto_map=auto_map)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr("builtins.input", lambda *args: "y")
    with pytest.raises(ValueError, match="trust_remote_code"):
        ClipCapProcessor.from_pretrained(tmp_path)
    assert not marker.exists()


def test_saved_settings_are_restored_and_a_folder_without_image_tokens_reads_its_config(
    tmp_path, processor, tokenizer
):
    saved = ClipCapProcessor(processor.image_processor, tokenizer, num_image_tokens=7, image_token="<image>")
    saved.save_pretrained(tmp_path)
    loaded = ClipCapProcessor.from_pretrained(tmp_path, trust_remote_code=False)
    assert (loaded.num_image_tokens, loaded.image_token, loaded.image_token_id) == (7, "<image>", 300)
    assert loaded(text="A")["input_ids"][0, :7].tolist() == [300] * 7
    # A folder saved before image tokens existed has no `num_image_tokens`: the model's config gives it.
    settings_file = next(path for path in tmp_path.iterdir() if path.name in ("processor_config.json",))
    settings = json.loads(settings_file.read_text())
    del settings["num_image_tokens"]
    settings_file.write_text(json.dumps(settings))
    from conftest import tiny_config

    tiny_config(tokenizer, prefix_length=5).save_pretrained(tmp_path)
    assert ClipCapProcessor.from_pretrained(tmp_path).num_image_tokens == 5


def test_batch_decode_matches_the_tokenizer(processor, tokenizer):
    ids = tokenizer(["A dog runs.", "Two cats!"], padding=True)["input_ids"]
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["A dog runs.", "Two cats!"]
    assert processor.decode(ids[0], skip_special_tokens=True) == "A dog runs."


def test_tokenizer_without_pad_token_gets_eos():
    tokenizer = build_tokenizer()
    assert tokenizer.pad_token is None
    processor = ClipCapProcessor(ClipCapImageProcessor(), tokenizer)
    assert processor.tokenizer.pad_token_id == tokenizer.eos_token_id


def test_processor_round_trip(tmp_path, processor):
    processor.save_pretrained(tmp_path)
    loaded = ClipCapProcessor.from_pretrained(tmp_path)
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    image = photo_like(40, 30)
    assert torch.equal(loaded(images=image)["pixel_values"], processor(images=image)["pixel_values"])
    assert loaded.tokenizer("A dog")["input_ids"] == processor.tokenizer("A dog")["input_ids"]


def ramp16(width=300):
    """A dark-to-bright 16-bit ramp, as imageio, OpenCV or tifffile return a 16-bit PNG or TIFF."""
    return np.tile(np.linspace(0, 65535, width).astype(np.uint16), (8, 1))


def test_16_bit_arrays_are_scaled_to_8_bits():
    processor = ClipCapImageProcessor(size=8, crop_size=8)
    array = ramp16()
    # Reference: each 16-bit value v is the 8-bit value round(v / 257), as PIL's "I;16" images are read.
    expected = processor(PIL.Image.fromarray((array / 257.0).round().astype(np.uint8)).convert("RGB"))
    variants = (
        array,
        array.astype(">u2"),  # big-endian, as some TIFF readers return it
        torch.from_numpy(array.astype(np.int32)).to(torch.uint16),
        PIL.Image.fromarray(array),
        PIL.Image.fromarray(array).convert("I"),  # how Pillow before 10.3 opened 16-bit PNGs
        PIL.Image.fromarray(array.astype(">u2"), mode="I;16B"),
    )
    for variant in variants:
        assert torch.equal(processor(variant)["pixel_values"], expected["pixel_values"])


def test_8_bit_values_in_wider_integer_types_are_read_as_8_bits():
    processor = ClipCapImageProcessor(size=8, crop_size=8)
    gray = np.tile(np.arange(256, dtype=np.uint8), (8, 1))
    expected = processor(PIL.Image.fromarray(gray, mode="L"))["pixel_values"]
    for variant in (gray.astype(np.int32), gray.astype(np.int64), torch.from_numpy(gray.astype(np.int16)),
                    PIL.Image.fromarray(gray).convert("I")):  # PIL's L -> I conversion keeps 0..255
        assert torch.equal(processor(variant)["pixel_values"], expected)


@pytest.mark.parametrize(
    "bad, held",
    [(ramp16().astype(np.int32), "int32 must hold values in [0, 255], this one holds [0, 65535]"),
     (np.full((8, 8), -3, dtype=np.int16), "int16 must hold values in [0, 255], this one holds [-3, -3]")],
)
def test_integer_arrays_outside_the_8_bit_range_are_rejected_with_their_index(bad, held):
    good = np.zeros((8, 8), dtype=np.uint8)
    with pytest.raises(ValueError) as error:
        ClipCapImageProcessor(size=8, crop_size=8)([good, bad])
    assert str(error.value) == (
        f"Image 1: Integer image arrays of dtype {held}; pass 16-bit images as uint16 (array.astype(np.uint16)), "
        "or scale the values to [0, 255]."
    )


def test_boolean_masks_are_black_and_white():
    processor = ClipCapImageProcessor(size=8, crop_size=8)
    mask = np.tile(np.arange(16) >= 8, (16, 1))
    expected = processor(PIL.Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)))["pixel_values"]
    assert torch.equal(processor(mask)["pixel_values"], expected)
    assert torch.equal(processor(torch.from_numpy(mask))["pixel_values"], expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tensors_are_read_like_float32(dtype):
    processor = ClipCapImageProcessor(size=8, crop_size=8)
    tensor = torch.rand(3, 12, 10, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = processor(tensor.float().numpy())["pixel_values"]  # the same values, as float32
    assert torch.equal(processor(tensor)["pixel_values"], expected)


@pytest.mark.parametrize("mode, key", [("RGB", (0, 0, 0)), ("L", 0)])
def test_colour_key_transparency_is_composited_on_white(mode, key):
    # Left half in the colour key (transparent), right half grey; PNG stores the key in a tRNS chunk.
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[:, 4:] = 120
    image = PIL.Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=key)
    stored = load_image(io.BytesIO(buffer.getvalue()))
    assert stored.mode == mode and stored.info["transparency"] == key
    expected = pixels.copy()
    expected[:, :4] = 255
    processor = ClipCapImageProcessor(size=8, crop_size=8)
    assert torch.equal(processor(stored)["pixel_values"], processor(PIL.Image.fromarray(expected))["pixel_values"])


def test_constructor_options_it_would_ignore_are_rejected():
    with pytest.raises(TypeError) as error:
        ClipCapImageProcessor(size=32, crop_size=32, do_normalize=False, do_resize=False)
    assert str(error.value) == (
        "ClipCapImageProcessor got unknown options ['do_normalize', 'do_resize']. Its preprocessing is always resize "
        "(and center crop), RGB, normalize, and it takes only size=..., crop_size=..., resample=..., image_mean=..., "
        "image_std=..., resize_mode=...; for a vision checkpoint's preprocessing, use "
        "ClipCapImageProcessor.from_transformers_pretrained(...)."
    )


def test_loading_a_clip_preprocessor_config_points_to_from_transformers_pretrained(tmp_path):
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    pointer = r"unknown options \[.*'do_center_crop'.*use ClipCapImageProcessor\.from_transformers_pretrained"
    with pytest.raises(TypeError, match=pointer):
        ClipCapImageProcessor.from_pretrained(tmp_path)
    assert ClipCapImageProcessor.from_transformers_pretrained(tmp_path).crop_size == 32
    assert ClipCapImageProcessor.from_clip_pretrained(tmp_path).crop_size == 32  # its name in 0.1


def test_saved_configs_with_transformers_bookkeeping_keys_still_load(tmp_path):
    # preprocessor_config.json as transformers 4.57 saves it with a ClipCapProcessor (transformers 5 drops
    # processor_class); the same keys are in folders saved by earlier versions of this package.
    saved = {
        "auto_map": {"AutoImageProcessor": "image_processing_clipcap.ClipCapImageProcessor",
                     "AutoProcessor": "processing_clipcap.ClipCapProcessor"},
        "crop_size": 16, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "ClipCapImageProcessor",
        "image_std": [0.25, 0.25, 0.25], "processor_class": "ClipCapProcessor", "resample": "bilinear", "size": 20,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(saved))
    loaded = ClipCapImageProcessor.from_pretrained(tmp_path)
    assert (loaded.size, loaded.crop_size, loaded.resample, loaded.image_mean) == (20, 16, "bilinear", [0.5] * 3)


@pytest.mark.parametrize("caption, shown", [(["A dog runs.", "A dog."], "list (['A dog runs.', 'A dog.'])"),
                                            (None, "NoneType (None)")])
def test_a_caption_that_is_not_a_string_is_named_as_such(processor, images, caption, shown):
    with pytest.raises(ValueError) as error:
        processor(images=images[:2], captions=["A cat.", caption])
    assert str(error.value) == (
        f"Caption 1 must be a string, got {shown}; for several captions per image, repeat the image once per caption."
    )


@pytest.mark.parametrize("saved", ["language model only", "CLIP vision tower"])
def test_a_language_model_folder_without_its_tokenizer_is_refused_naming_it(tmp_path, tiny_clip_dir, saved):
    # transformers 5 built an empty GPT-2 tokenizer (every caption one token, trained on silently); 4.57 raised a bare
    # TypeError (GPT-2) or KeyError (a CLIP vision config).
    from transformers import CLIPVisionConfig, GPT2Config

    config = GPT2Config(n_layer=1, n_embd=8, n_head=2) if saved == "language model only" else CLIPVisionConfig()
    config.save_pretrained(tmp_path / "lm")
    with pytest.raises(FileNotFoundError) as error:
        ClipCapProcessor.from_vision_text_pretrained(tiny_clip_dir, tmp_path / "lm")
    assert str(error.value) == (
        f"text_model_name_or_path {tmp_path / 'lm'} has no tokenizer (none of tokenizer_config.json, tokenizer.json, "
        "vocab.json, vocab.txt, tokenizer.model, spiece.model); save the language model's tokenizer there too "
        f"(tokenizer.save_pretrained('{tmp_path / 'lm'}'))."
    )


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="4.x raises instead of an empty tokenizer")
def test_a_tokenizer_loaded_with_no_vocabulary_is_refused(tmp_path, tiny_clip_dir):
    # A vocabulary file of another tokenizer type: GPT-2's loads none of it, as for a Hub model without tokenizer files.
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=f"^text_model_name_or_path {tmp_path} gave a tokenizer with no vocabulary"):
        ClipCapProcessor.from_vision_text_pretrained(tiny_clip_dir, tmp_path)


def test_an_image_token_the_tokenizer_holds_as_text_is_made_special_and_skipped_when_decoding():
    tokenizer = build_tokenizer(image_token=False)
    tokenizer.add_tokens(["<image>"])  # an ordinary added token, as a tokenizer with such a word would have it
    token_id = tokenizer.convert_tokens_to_ids("<image>")
    processor = ClipCapProcessor(ClipCapImageProcessor(size=32), tokenizer, num_image_tokens=4)
    assert processor.image_token_id == token_id  # its id kept
    ids = processor(images=PIL.Image.new("RGB", (32, 32)), text="mal")["input_ids"]
    assert ids[0].tolist()[:4] == [token_id] * 4
    assert processor.batch_decode(ids, skip_special_tokens=True) == [tokenizer.decode(ids[0, 4:])]


@pytest.mark.parametrize("value", [0, -3, True, 2.0])
def test_num_image_tokens_must_be_a_positive_integer(tokenizer, value):
    with pytest.raises(ValueError, match=rf"`num_image_tokens` must be a positive integer, got {value!r}"):
        ClipCapProcessor(ClipCapImageProcessor(size=32), tokenizer, num_image_tokens=value)


@pytest.mark.parametrize(
    "call, message",
    [
        (dict(text=[5]), r"Prompt 0 must be a string, got int \(5\)"),
        (dict(text=["a", None]), r"Prompt 1 must be a string, got NoneType \(None\)"),
        (dict(text=[]), r"Got an empty list of prompts \(`text`\)"),
        (dict(captions=[]), r"Got an empty list of captions"),
    ],
)
def test_bad_prompt_and_caption_lists_are_named(tokenizer, call, message):
    with pytest.raises(ValueError, match=message):
        tiny_processor(tokenizer)(**call)


IMAGE = PIL.Image.new("RGB", (40, 32))
IMAGES_ACCEPTED = (
    "`images` must be an image (PIL image, numpy array or torch tensor) or a list of images, got {}. Open image files "
    "with PIL.Image.open first."
)


@pytest.mark.parametrize(
    "call, message",
    [
        # Iterated: "'int' object is not iterable", naming neither the argument nor what it takes.
        (dict(images=5), IMAGES_ACCEPTED.format("int (5)")),
        (dict(images=[IMAGE], text=5), "`text` must be a string or a list of strings (one per image), got int (5)."),
        (dict(images=[IMAGE], captions=5),
         "`captions` must be a string or a list of strings (one per image), got int (5)."),
        # Their keys or characters were read as the images: "Image 0: Expected a PIL image, ..., got str".
        (dict(images={"a": IMAGE}), IMAGES_ACCEPTED.format(f"dict ({ {'a': IMAGE}!r:.60})")),
        (dict(images="photo.jpg"), IMAGES_ACCEPTED.format("str ('photo.jpg')")),
        (dict(images=[IMAGE], text={"a": "A dog"}),
         "`text` must be a string or a list of strings (one per image), got dict ({'a': 'A dog'})."),
    ],
    ids=["images=5", "text=5", "captions=5", "images=dict", "images=path", "text=dict"],
)
def test_arguments_of_the_wrong_type_are_named_with_what_they_take(processor, call, message):
    with pytest.raises(TypeError) as error:
        processor(**call)
    assert str(error.value) == message


@pytest.mark.parametrize("option", ["text_target", "text_pair", "return_mm_token_type_ids"])
def test_tokenizer_options_that_would_drop_the_image_tokens_are_refused(tokenizer, option):
    # text_target gave labels of the target alone, shorter than input_ids and without the image tokens.
    value = True if option.startswith("return") else "A dog"
    with pytest.raises(TypeError, match=rf"ClipCapProcessor got an unknown option '{option}'"):
        tiny_processor(tokenizer)(images=PIL.Image.new("RGB", (32, 32)), text="A", **{option: value})


def test_folders_given_with_a_tilde_are_read_from_the_home_folder(tmp_path, tokenizer, monkeypatch):
    from conftest import tiny_config
    from transformers import CLIPVisionModelWithProjection, GPT2LMHeadModel

    from clipcap_hf import ClipCapForConditionalGeneration

    config = tiny_config(tokenizer)
    CLIPVisionModelWithProjection(config.vision_config).save_pretrained(tmp_path / "vision")
    ClipCapImageProcessor(size=32).save_pretrained(tmp_path / "vision")
    GPT2LMHeadModel(config.text_config).save_pretrained(tmp_path / "text")
    tokenizer.save_pretrained(tmp_path / "text")
    monkeypatch.setenv("HOME", str(tmp_path))
    processor = ClipCapProcessor.from_vision_text_pretrained("~/vision", "~/text", num_image_tokens=2)
    assert len(processor.tokenizer) == len(tokenizer) and processor.image_processor.crop_size == 32
    model = ClipCapForConditionalGeneration.from_vision_text_pretrained("~/vision", "~/text", prefix_length=2)
    assert model.config.prefix_dim == 24
