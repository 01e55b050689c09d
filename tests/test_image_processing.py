"""ClipCapImageProcessor takes options in the forms transformers' image processors use, with the same pixels."""

import json

import PIL.Image
import pytest
import torch
import transformers
from conftest import random_images

from clipcap_hf import ClipCapImageProcessor

# The PIL-backed CLIP processor: 4.57's default, transformers 5's `...Pil` class (its default resizes tensors with
# torchvision, which gives slightly different pixels and has no box or hamming filter).
ClipImageProcessorPil = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def images_with_even_crop_margins():
    # Crops with an even margin start where transformers' processors start them (an odd one can differ by a pixel).
    return random_images(1, seed=1, size=(48, 40)) + random_images(1, seed=2, size=(40, 60))


def clip_pixels(images, **settings):
    return ClipImageProcessorPil(**settings)(images, return_tensors="pt")["pixel_values"]


TRANSFORMERS_STYLE = {
    "size": {"shortest_edge": 40}, "crop_size": {"height": 24, "width": 24}, "resample": PIL.Image.Resampling.BILINEAR
}


def test_call_options_in_transformers_forms_give_clip_image_processor_pixels():
    images = images_with_even_crop_margins()
    pixels = ClipCapImageProcessor(size=32)(images, **TRANSFORMERS_STYLE)["pixel_values"]
    assert pixels.shape == (2, 3, 24, 24)
    torch.testing.assert_close(pixels, clip_pixels(images, **TRANSFORMERS_STYLE), atol=1e-5, rtol=0)


def test_constructor_takes_transformers_forms_and_saves_plain_values(tmp_path):
    images = images_with_even_crop_margins()
    processor = ClipCapImageProcessor(**TRANSFORMERS_STYLE)
    assert (processor.size, processor.crop_size, processor.resample) == (40, 24, "bilinear")
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert (saved["size"], saved["crop_size"], saved["resample"]) == (40, 24, "bilinear")
    torch.testing.assert_close(
        ClipCapImageProcessor.from_pretrained(tmp_path)(images)["pixel_values"],
        clip_pixels(images, **TRANSFORMERS_STYLE),
        atol=1e-5,
        rtol=0,
    )


def test_a_squash_processor_takes_a_height_width_size():
    image = random_images(1, seed=3)[0]
    processor = ClipCapImageProcessor(size=32, resize_mode="squash")
    assert processor(image, size={"height": 20, "width": 20})["pixel_values"].shape == (1, 3, 20, 20)
    assert ClipCapImageProcessor(size={"height": 20, "width": 20}, resize_mode="squash").size == 20


@pytest.mark.parametrize(
    "options, message",
    [
        ({"size": {"height": 40, "width": 40}}, "size={'height': 40, 'width': 40} asks for resize_mode='squash', but "
                                                "this processor's resize_mode is 'shortest'; pass size=40, or build "
                                                "the processor with resize_mode='squash'."),
        ({"crop_size": {"height": 24, "width": 20}}, "`crop_size` {'height': 24, 'width': 20} is 24x20; "
                                                     "ClipCapImageProcessor makes square images only."),
        ({"size": {"shortest_edge": 40, "longest_edge": 60}}, "`size` must be an int, {'shortest_edge': n} or "
                                                              "{'height': n, 'width': n}, got {'shortest_edge': 40, "
                                                              "'longest_edge': 60}."),
        ({"resample": 7}, "`resample` must be one of ['nearest', 'box', 'bilinear', 'hamming', 'bicubic', 'lanczos'] "
                          "or a PIL.Image.Resampling value, got 7."),
    ],
)
def test_options_it_cannot_honour_are_refused_in_one_line(options, message):
    image = random_images(1)[0]
    with pytest.raises(ValueError) as error:
        ClipCapImageProcessor(size=32)(image, **options)
    assert str(error.value) == message
    with pytest.raises(ValueError) as error:
        ClipCapImageProcessor(**{"size": 32, **options})
    assert str(error.value) == message


@pytest.mark.parametrize("resample", [PIL.Image.Resampling.BOX, PIL.Image.Resampling.HAMMING])
def test_box_and_hamming_from_a_checkpoint_give_its_pixels(tmp_path, resample):
    settings = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "resample": resample}
    ClipImageProcessorPil(**settings).save_pretrained(tmp_path)
    processor = ClipCapImageProcessor.from_transformers_pretrained(tmp_path)
    assert processor.resample == resample.name.lower()
    images = images_with_even_crop_margins()
    torch.testing.assert_close(processor(images)["pixel_values"], clip_pixels(images, **settings), atol=1e-5, rtol=0)


def test_a_checkpoint_with_an_unknown_resampling_is_refused_naming_it(tmp_path):
    settings = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32}, "resample": 9}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError) as error:
        ClipCapImageProcessor.from_transformers_pretrained(tmp_path)
    assert str(error.value) == (
        f"{tmp_path}: `resample` must be one of ['nearest', 'box', 'bilinear', 'hamming', 'bicubic', 'lanczos'] or a "
        "PIL.Image.Resampling value, got 9."
    )
