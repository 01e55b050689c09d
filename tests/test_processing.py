import io
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision import transforms

from conftest import build_tokenizer

from clipcap_hf import ClipCapImageProcessor, ClipCapProcessor
from clipcap_hf.image_processing_clipcap import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_image

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
    for variant in (array, array.transpose(2, 0, 1), array.astype(np.float32) / 255, torch.from_numpy(array.transpose(2, 0, 1).copy())):
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
    first = tokenizer("A dog runs.", add_special_tokens=False)["input_ids"] + [eos]
    second = tokenizer("Two cats sleep on a sofa!", add_special_tokens=False)["input_ids"] + [eos]
    assert batch["input_ids"][1].tolist() == second
    assert batch["labels"][1].tolist() == second
    padding = len(second) - len(first)
    assert batch["labels"][0].tolist() == first + [-100] * padding
    assert batch["attention_mask"][0].tolist() == [1] * len(first) + [0] * padding
    assert "num_truncated" not in batch


def test_caption_truncation_is_counted(processor, tokenizer):
    short_length = len(tokenizer("A dog.", add_special_tokens=False)["input_ids"]) + 1  # with EOS
    encoded = processor.tokenize_captions(["A dog runs on the beach.", "A dog."], max_length=short_length)
    assert encoded["input_ids"].shape[1] == short_length
    assert encoded["num_truncated"] == 1
    assert encoded["input_ids"][1, -1] == tokenizer.eos_token_id


@pytest.mark.parametrize("max_length", [0, -1])
def test_caption_length_below_one_is_rejected(processor, max_length):
    message = rf"max_caption_length \(max_length\) must be at least 1 \(EOS included\), got {max_length}\."
    with pytest.raises(ValueError, match=message):
        processor(captions=["A dog."], max_caption_length=max_length)
    with pytest.raises(ValueError, match=message):
        processor.tokenize_captions(["A dog."], max_length=max_length)
    assert processor.tokenize_captions(["A dog."], max_length=1)["input_ids"].shape == (1, 1)


def test_empty_caption_is_rejected_with_its_index(processor):
    with pytest.raises(ValueError, match=r"Caption 1 is empty \(' '\)"):
        processor(captions=["A dog.", " "])


def test_prompts_are_left_padded_and_counted_against_images(processor, images):
    batch = processor(images=images, text="A dog")
    assert batch["input_ids"].shape[0] == 3  # one prompt for all images
    with pytest.raises(ValueError, match="Got 3 images but 2 prompts"):
        processor(images=images, text=["A", "B"])
    with pytest.raises(ValueError, match="Got 3 images but 1 captions"):
        processor(images=images, captions=["A dog."])


def test_prompt_tokenizer_options_are_applied(processor, tokenizer, images):
    prompts = ["A dog runs on the beach", "Two cats", "A"]
    full = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    truncated = processor(images=images, text=prompts, truncation=True, max_length=2)["input_ids"]
    assert truncated.tolist() == [ids[:2] if len(ids) >= 2 else [tokenizer.pad_token_id] + ids for ids in full]
    padded = processor(images=images, text=prompts, padding="max_length", max_length=12)
    assert padded["input_ids"].shape == (3, 12)
    assert padded["input_ids"][2].tolist() == [tokenizer.pad_token_id] * (12 - len(full[2])) + full[2]  # left


def test_options_that_would_be_ignored_are_rejected(processor, images):
    with pytest.raises(ValueError, match=r"Got options \['max_length', 'truncation'\].*no `text`"):
        processor(images=images, truncation=True, max_length=2)
    with pytest.raises(ValueError, match=r"Got options \['crop_size'\]"):
        processor(images=images, captions=["a", "b", "c"], crop_size=16)
    with pytest.raises(TypeError, match=r"no per-call options, got \['crop_size', 'size'\].*\(size=\.\.\., crop_size="):
        processor.image_processor(images, size=16, crop_size=16)


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
