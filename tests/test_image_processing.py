"""ClipCapImageProcessor takes options in the forms transformers' image processors use, with the same pixels."""

import json
import logging

import numpy as np
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


def test_options_to_from_transformers_pretrained_replace_the_checkpoints_and_unknown_ones_are_refused(tmp_path):
    # They were dropped silently: a checkpoint read at 32 pixels bicubic whatever size or resampling was asked.
    saved = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    ClipImageProcessorPil(**saved).save_pretrained(tmp_path)
    processor = ClipCapImageProcessor.from_transformers_pretrained(tmp_path, size=40, resample="bilinear")
    assert (processor.size, processor.crop_size, processor.resample) == (40, 32, "bilinear")
    images = images_with_even_crop_margins()
    asked = {**saved, "size": {"shortest_edge": 40}, "resample": PIL.Image.Resampling.BILINEAR}
    torch.testing.assert_close(processor(images)["pixel_values"], clip_pixels(images, **asked), atol=1e-5, rtol=0)

    with pytest.raises(TypeError, match=r"from_transformers_pretrained got unknown options \['bogus'\]: it takes "
                                        r"download options \(cache_dir, .*\) and the settings it reads"):
        ClipCapImageProcessor.from_transformers_pretrained(tmp_path, bogus=1)
    with pytest.raises(ValueError, match=r"`size` must be at least 1 pixel, got 0"):
        ClipCapImageProcessor.from_transformers_pretrained(tmp_path, size=0)
    # Step switches apply per call: refused here by this method, not by the constructor pointing back to it.
    with pytest.raises(TypeError, match=r"unknown options \['do_center_crop'\].*the step switches \(do_resize, ...\) "
                                        r"apply per call"):
        ClipCapImageProcessor.from_transformers_pretrained(tmp_path, do_center_crop=False)


@pytest.mark.parametrize("resample", [PIL.Image.Resampling.BOX, PIL.Image.Resampling.HAMMING])
def test_box_and_hamming_from_a_checkpoint_give_its_pixels(tmp_path, resample):
    settings = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "resample": resample}
    ClipImageProcessorPil(**settings).save_pretrained(tmp_path)
    processor = ClipCapImageProcessor.from_transformers_pretrained(tmp_path)
    assert processor.resample == resample.name.lower()
    images = images_with_even_crop_margins()
    torch.testing.assert_close(processor(images)["pixel_values"], clip_pixels(images, **settings), atol=1e-5, rtol=0)


def refusal_of_checkpoint(folder, settings):
    """The error `from_transformers_pretrained` raises for a short-side CLIP processor config with `settings`."""
    config = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32}, **settings}
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        ClipCapImageProcessor.from_transformers_pretrained(folder)
    return str(error.value)


def test_a_checkpoint_with_an_unknown_resampling_is_refused_naming_it(tmp_path):
    assert refusal_of_checkpoint(tmp_path, {"resample": 9}) == (
        f"{tmp_path}: `resample` must be one of ['nearest', 'box', 'bilinear', 'hamming', 'bicubic', 'lanczos'] or a "
        "PIL.Image.Resampling value, got 9."
    )


def test_an_upright_image_is_not_copied_and_an_exif_rotated_one_is_turned_once():
    import io

    import numpy as np

    from clipcap_hf.image_processing_clipcap import to_rgb_image

    upright = random_images(1)[0]
    assert to_rgb_image(upright) is upright  # exif_transpose would copy it (16 decoded photos: +183 MB)
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # 40 wide, 20 tall, left half white
    exif = PIL.Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    encoded = io.BytesIO()
    PIL.Image.fromarray(pixels).save(encoded, "PNG", exif=exif.tobytes())
    once = to_rgb_image(PIL.Image.open(encoded))
    twice = to_rgb_image(once)
    assert once.size == twice.size == (20, 40)
    expected = np.zeros((40, 20, 3), np.uint8)
    expected[:20] = 255  # the white half on top
    assert np.array_equal(np.asarray(twice), expected)


def test_a_squash_then_crop_checkpoint_gives_its_processors_pixels(tmp_path):
    settings = {"size": {"height": 40, "width": 40}, "crop_size": {"height": 32, "width": 32}}
    ClipImageProcessorPil(**settings).save_pretrained(tmp_path)
    processor = ClipCapImageProcessor.from_transformers_pretrained(tmp_path)
    assert (processor.resize_mode, processor.size, processor.crop_size) == ("squash", 40, 32)
    images = random_images(2, seed=1, size=(60, 44))
    pixels = processor(images)["pixel_values"]
    assert pixels.shape == (2, 3, 32, 32)
    torch.testing.assert_close(pixels, clip_pixels(images, **settings), atol=1e-5, rtol=0)
    # Without the crop, the squashed square.
    ClipImageProcessorPil(**settings, do_center_crop=False).save_pretrained(tmp_path)
    processor = ClipCapImageProcessor.from_transformers_pretrained(tmp_path)
    assert (processor.resize_mode, processor.size, processor.crop_size) == ("squash", 40, 40)
    torch.testing.assert_close(
        processor(images)["pixel_values"], clip_pixels(images, **settings, do_center_crop=False), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"do_resize": False}, "do_resize=False"),
        ({"do_rescale": False}, "do_rescale=False"),
        ({"rescale_factor": 1 / 127.5}, "rescale_factor=0.00784313725490196"),
        ({"do_convert_rgb": False}, "do_convert_rgb=False"),
        ({"do_pad": True}, "do_pad=True"),
    ],
)
def test_a_checkpoint_setting_it_cannot_apply_is_refused_naming_it(tmp_path, settings, named):
    assert refusal_of_checkpoint(tmp_path, settings) == (
        f"{tmp_path}: ClipCapImageProcessor cannot reproduce this checkpoint's preprocessing with {named}; it always "
        "resizes, center-crops (or squashes), converts to RGB and scales by 1/255."
    )


def test_a_short_side_checkpoint_without_a_crop_is_refused(tmp_path):
    ClipImageProcessorPil(size={"shortest_edge": 32}, do_center_crop=False).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"do_center_crop=False with a short-side resize keeps each image's aspect"):
        ClipCapImageProcessor.from_transformers_pretrained(tmp_path)


def test_an_unreadable_settings_file_is_named_not_replaced_by_the_towers_defaults(tmp_path):
    # A settings file cut short (an interrupted copy) must not silently become the tower's reference preprocessing:
    # transformers raises the same OSError for it as for a checkpoint without one.
    transformers.CLIPVisionConfig(image_size=32).save_pretrained(tmp_path)
    settings = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3}
    ClipImageProcessorPil(**settings).save_pretrained(tmp_path)
    path = tmp_path / "preprocessor_config.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(OSError) as error:
        ClipCapImageProcessor.from_transformers_pretrained(str(tmp_path))
    assert str(error.value).startswith(f"Could not read the preprocessing settings of {str(tmp_path)!r} from {path}: ")
    assert "not a valid JSON file" in str(error.value)
    # Without the file, the tower's reference preprocessing (CLIP's, at its image size).
    path.unlink()
    processor = ClipCapImageProcessor.from_transformers_pretrained(str(tmp_path))
    assert (processor.size, processor.crop_size, processor.image_mean) == (32, 32, ClipCapImageProcessor().image_mean)


def test_a_processor_config_without_image_processor_settings_gets_the_towers_defaults(tmp_path):
    # A processor_config.json holding only the processor's own attributes says nothing about the preprocessing
    # (transformers 5 raises the same OSError for it as for a corrupt file): the tower's reference preprocessing.
    # (At the image size CLIPImageProcessor defaults to: 4.57 reads the file as settings leaving all at its defaults.)
    transformers.CLIPVisionConfig(image_size=224).save_pretrained(tmp_path)
    path = tmp_path / "processor_config.json"
    path.write_text(json.dumps({"processor_class": "CLIPProcessor"}))
    processor = ClipCapImageProcessor.from_transformers_pretrained(str(tmp_path))
    assert processor.to_dict() == ClipCapImageProcessor().to_dict()
    # One cut short may have held them: refused, naming it.
    text = json.dumps({"processor_class": "CLIPProcessor", "image_processor": {"size": {"shortest_edge": 64}}})
    path.write_text(text[: len(text) // 2])
    with pytest.raises(OSError, match=rf"^Could not read the preprocessing settings of .* from {path}: "):
        ClipCapImageProcessor.from_transformers_pretrained(str(tmp_path))


def test_a_thin_strip_is_resampled_only_under_its_crop_and_matches_the_full_resize(monkeypatch):
    # A 1 x 40,000 PNG takes a few bytes; resized on its short side to 224 it would be 224 x 8,960,000 pixels (6 GB).
    processor = ClipCapImageProcessor()
    requested = []
    real_resize = PIL.Image.Image.resize

    def recording_resize(image, size, *args, **kwargs):
        requested.append(size)
        return real_resize(image, size, *args, **kwargs)

    monkeypatch.setattr(PIL.Image.Image, "resize", recording_resize)
    assert processor(PIL.Image.new("RGB", (1, 40_000), (10, 200, 30)), return_tensors="np")["pixel_values"].shape == (
        1, 3, 224, 224,
    )
    assert requested == [(224, 224)]
    # Against the full resize and center crop (torchvision's arithmetic), on a random strip of aspect ratio 75.
    strip = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (3000, 40, 3), dtype=np.uint8))
    pixels = processor(strip, return_tensors="np")["pixel_values"][0]
    full = real_resize(strip, (224, int(224 * 3000 / 40)), PIL.Image.BICUBIC)
    top = int(round((full.height - 224) / 2.0))
    expected = np.asarray(full.crop((0, top, 224, top + 224)), dtype=np.float32).transpose(2, 0, 1) / 255
    as_read = pixels * np.asarray(processor.image_std)[:, None, None] + np.asarray(processor.image_mean)[:, None, None]
    assert np.abs(as_read - expected).max() <= 1 / 255 + 1e-5


def write_tower_naming_code_of_its_own(folder, monkeypatch):
    """
    A tower folder whose config names code of its own (`auto_map`) for a model type transformers does not know; that
    code marks the returned path when it runs. Such a config makes transformers ask whether to run the folder's code,
    and run it on "y", unless trust_remote_code=False is passed: the answer given here is "y".
    """
    marker = folder / "code-ran"
    (folder / "config.json").write_text(
        json.dumps({"model_type": "custom_vision", "auto_map": {"AutoConfig": "custom.CustomConfig"}})
    )
    (folder / "custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PretrainedConfig\n\n\nclass CustomConfig(PretrainedConfig):\n"
        "    model_type = 'custom_vision'\n"
    )
    monkeypatch.setattr("builtins.input", lambda *args: "y")
    return marker


@pytest.mark.parametrize("settings", [False, True])
def test_a_tower_folder_naming_code_of_its_own_is_refused_without_running_it(tmp_path, monkeypatch, settings):
    marker = write_tower_naming_code_of_its_own(tmp_path, monkeypatch)
    if settings:  # the preprocessing settings there: the model config beside them is read as absent
        (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
        ClipCapImageProcessor.from_vision_pretrained(str(tmp_path))
    else:
        with pytest.raises(ValueError, match="trust_remote_code"):
            ClipCapImageProcessor.from_vision_pretrained(str(tmp_path))
    assert not marker.exists()


def test_settings_beside_a_config_naming_code_of_its_own_warn_that_clips_conventions_fill_them_in(
    tmp_path, monkeypatch, caplog
):
    # The refused config was read as absent without a word: a SigLIP-like custom tower given a bare-number size got
    # CLIP's short-side resize, resampling, mean and std.
    marker = write_tower_naming_code_of_its_own(tmp_path, monkeypatch)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "CLIPImageProcessor", "size": 48})
    )
    with caplog.at_level(logging.WARNING, logger="clipcap_hf.image_processing_clipcap"):
        processor = ClipCapImageProcessor.from_vision_pretrained(str(tmp_path))
    assert not marker.exists()
    assert processor.to_dict() == ClipCapImageProcessor(size=48).to_dict()  # still non-fatal: CLIP's conventions
    assert [record.getMessage() for record in caplog.records] == [
        f"The model config of {tmp_path} names code of its own (custom.CustomConfig, in its auto_map), which is not "
        "run, so the config is not read: the preprocessing is the checkpoint's saved preprocessing settings, with "
        "CLIP's reference preprocessing for what they leave out (the resize mode of a bare-number size, the "
        "resampling, mean and std). If the tower preprocesses otherwise, add those settings there or build "
        "ClipCapImageProcessor(...) with them."
    ]
    # An auto_map beside a model type transformers knows is read without that code, and says nothing.
    caplog.clear()
    config = transformers.SiglipVisionConfig(image_size=32).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "custom.CustomConfig"}}))
    with caplog.at_level(logging.WARNING, logger="clipcap_hf.image_processing_clipcap"):
        processor = ClipCapImageProcessor.from_vision_pretrained(str(tmp_path))
    assert (processor.resize_mode, processor.image_mean) == ("squash", [0.5] * 3)  # the config was read
    assert not caplog.records and not marker.exists()


def settings_of(processor):
    """A processor's settings, without the `auto_map` that a saved one keeps for remote code."""
    return {name: value for name, value in processor.to_dict().items() if name != "auto_map"}


def test_a_squash_saved_without_a_crop_loads_at_a_new_size_as_the_constructor_builds_it(tmp_path):
    # The saved crop_size (the whole square) was kept: size=64 gave the center 32x32 of the 64 square.
    images = random_images(2, seed=1, size=(60, 44))
    settings = {"size": {"height": 32, "width": 32}, "do_center_crop": False}
    ClipImageProcessorPil(**settings).save_pretrained(tmp_path / "clip")
    ClipCapImageProcessor.from_transformers_pretrained(tmp_path / "clip").save_pretrained(tmp_path / "clipcap")
    expected = ClipCapImageProcessor(size=64, resize_mode="squash")
    for load in (ClipCapImageProcessor.from_pretrained, transformers.AutoImageProcessor.from_pretrained):
        for size in (64, {"height": 64, "width": 64}):
            loaded = load(tmp_path / "clipcap", size=size)
            assert settings_of(loaded) == settings_of(expected)
            pixels = loaded(images)["pixel_values"]
            assert pixels.shape == (2, 3, 64, 64)
        # The pixels of CLIP's own processor loaded with the same size: it keeps squashing without a crop.
        overridden = ClipImageProcessorPil.from_pretrained(tmp_path / "clip", size={"height": 64, "width": 64})
        torch.testing.assert_close(pixels, overridden(images, return_tensors="pt")["pixel_values"], atol=1e-5, rtol=0)
        # A crop given with the size is taken.
        assert load(tmp_path / "clipcap", size=64, crop_size=48).crop_size == 48
    # A crop that was saved is kept at a new size, as CLIPImageProcessor keeps it (a short-side resize always crops);
    # without one, each saved processor loads as it was saved.
    for saved, crop_at_48 in (
        (ClipCapImageProcessor(size=40, crop_size=32, resize_mode="squash"), 32),
        (ClipCapImageProcessor(size=40, resize_mode="squash"), 48),
        (ClipCapImageProcessor(size=40, crop_size=32), 32),
        (ClipCapImageProcessor(size=40), 40),
    ):
        saved.save_pretrained(tmp_path / "saved")
        assert settings_of(ClipCapImageProcessor.from_pretrained(tmp_path / "saved")) == settings_of(saved)
        assert ClipCapImageProcessor.from_pretrained(tmp_path / "saved", size=48).crop_size == crop_at_48


def test_from_pretrained_options_go_through_the_constructor_the_same_on_every_version(tmp_path):
    # transformers' own from_dict set options on the loaded processor unchecked: on 4.57 all but the sizes (resample=2
    # was stored raw and failed on the first call, do_resize=False was ignored), on 5.x resize_mode.
    ClipCapImageProcessor(size=32).save_pretrained(tmp_path)
    image = random_images(1)[0]
    for load in (ClipCapImageProcessor.from_pretrained, transformers.AutoImageProcessor.from_pretrained):
        loaded = load(tmp_path, resample=2, image_mean=0.5, size=40)
        assert (loaded.resample, loaded.image_mean, loaded.size, loaded.crop_size) == ("bilinear", [0.5] * 3, 40, 32)
        assert loaded(image)["pixel_values"].shape == (1, 3, 32, 32)
        with pytest.raises(ValueError) as error:
            load(tmp_path, resize_mode="longest")
        assert str(error.value) == "`resize_mode` must be one of ('shortest', 'squash'), got 'longest'."
        with pytest.raises(ValueError, match=r"^`resample` must be one of .*, got 'cubic'\.$"):
            load(tmp_path, resample="cubic")
        with pytest.raises(TypeError, match=r"^ClipCapImageProcessor got unknown options \['do_resize'\]\. "):
            load(tmp_path, do_resize=False)
    # Keyword arguments that are no image option are left to the caller, as transformers leaves them.
    loaded, unused = ClipCapImageProcessor.from_dict(
        ClipCapImageProcessor(size=32).to_dict(), size=36, padding_side="left", return_unused_kwargs=True
    )
    assert (loaded.size, unused) == (36, {"padding_side": "left"})


WIDE_AND_TALL = [PIL.Image.new("RGB", (64, 32), (200, 10, 10)), PIL.Image.new("RGB", (32, 64), (10, 200, 10))]


def test_a_call_without_the_crop_after_a_short_side_resize_is_refused():
    # Its images keep their aspect ratio: one came back 32x64, a batch of two aspect ratios failed in numpy.
    for images in (WIDE_AND_TALL[0], WIDE_AND_TALL):
        with pytest.raises(ValueError) as error:
            ClipCapImageProcessor(size=32)(images, do_center_crop=False)
        assert str(error.value) == (
            "do_center_crop=False with a short-side resize keeps each image's aspect ratio, and the towers read square "
            "images: keep the crop, or resize with resize_mode='squash'."
        )
    squashed = ClipCapImageProcessor(size=32, resize_mode="squash")(WIDE_AND_TALL, do_center_crop=False)
    assert squashed["pixel_values"].shape == (2, 3, 32, 32)


def test_without_a_resize_images_are_center_cropped_and_only_both_steps_off_keep_their_own_size():
    # A squash processor cropped nothing without its resize: each image came back at its own size.
    shortest, squash = ClipCapImageProcessor(size=32), ClipCapImageProcessor(size=32, resize_mode="squash")
    cropped = shortest(WIDE_AND_TALL, do_resize=False)["pixel_values"]
    assert cropped.shape == (2, 3, 32, 32)
    assert torch.equal(squash(WIDE_AND_TALL, do_resize=False)["pixel_values"], cropped)
    # Both steps switched off, as transformers' processors allow: each image at its own size.
    assert shortest(WIDE_AND_TALL[0], do_resize=False, do_center_crop=False)["pixel_values"].shape == (1, 3, 32, 64)
    for processor in (shortest, squash):
        with pytest.raises(ValueError) as error:
            processor(WIDE_AND_TALL, do_resize=False, do_center_crop=False)
        assert str(error.value) == (
            "Images 0 and 1 are 64x32 and 32x64 (width x height): with do_resize=False and do_center_crop=False each "
            "image keeps its own size, so a batch needs images of one size."
        )


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"size": 0}, "`size` must be at least 1 pixel, got 0."),
        ({"size": -4}, "`size` must be at least 1 pixel, got -4."),
        ({"size": {"shortest_edge": 0}}, "`size` must be at least 1 pixel, got {'shortest_edge': 0}."),
        ({"crop_size": 0}, "`crop_size` must be at least 1 pixel, got 0."),
        ({"image_mean": [0.5, 0.5]}, "`image_mean` must be three finite numbers (one per RGB channel) or one for all "
                                     "three, got [0.5, 0.5]."),
        ({"image_mean": "0.5"}, "`image_mean` must be three finite numbers (one per RGB channel) or one for all "
                                "three, got '0.5'."),
        ({"image_std": [0.5, float("nan"), 0.5]}, "`image_std` must be three finite numbers (one per RGB channel) or "
                                                  "one for all three, got [0.5, nan, 0.5]."),
        ({"image_std": [0.0, 1.0, 1.0]}, "`image_std` must be > 0 for every channel, got [0.0, 1.0, 1.0]."),
        ({"image_std": -0.5}, "`image_std` must be > 0 for every channel, got -0.5."),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_them_not_the_first_image(settings, message):
    # They failed on the first image ("Image 0: height and width must be > 0", a numpy broadcast error), or a zero
    # std gave infinite pixels.
    with pytest.raises(ValueError) as error:
        ClipCapImageProcessor(**{"size": 32, **settings})
    assert str(error.value) == message
    with pytest.raises(ValueError) as error:  # the same as options of a call
        ClipCapImageProcessor(size=32)(random_images(1)[0], **settings)
    assert str(error.value) == message


def test_a_mean_and_std_of_one_number_apply_to_every_channel():
    # As CLIPImageProcessor takes them; it was a TypeError ("'float' object is not iterable").
    processor = ClipCapImageProcessor(size=32, image_mean=0.5, image_std=0.25)
    assert (processor.image_mean, processor.image_std) == ([0.5] * 3, [0.25] * 3)
    image = random_images(1)[0]
    expected = ClipCapImageProcessor(size=32, image_mean=[0.5] * 3, image_std=[0.25] * 3)(image)["pixel_values"]
    assert torch.equal(processor(image)["pixel_values"], expected)
    assert torch.equal(ClipCapImageProcessor(size=32)(image, image_mean=0.5, image_std=0.25)["pixel_values"], expected)


@pytest.mark.parametrize(
    "backend, pretrained, message",
    [
        ("openclip", "openai", "`vision_backend` must be one of ('clip', 'open_clip'), got 'openclip'."),
        ("clip", "openai", "vision_backend='clip' does not use `open_clip_pretrained`; set vision_backend='open_clip' "
                           "or leave it None."),
    ],
)
def test_from_vision_pretrained_refuses_what_the_config_refuses(backend, pretrained, message):
    # The name was read as a transformers checkpoint instead, and failed with a Hub OSError about it.
    with pytest.raises(ValueError) as error:
        ClipCapImageProcessor.from_vision_pretrained("RN50x4", vision_backend=backend, open_clip_pretrained=pretrained)
    assert str(error.value) == message


def test_per_sample_image_lists_of_one_image_each_read_as_the_flat_list(processor):
    # LLaVA-style nesting ([[image], [image]]) was refused as "Expected a PIL image ..., got list".
    images = random_images(2, seed=3)
    flat = processor.image_processor(images)["pixel_values"]
    assert torch.equal(processor.image_processor([[images[0]], (images[1],)])["pixel_values"], flat)
    prompts = ["A dog", "Two"]
    expected = processor(images=images, text=prompts)
    nested = processor(images=[[images[0]], [images[1]]], text=prompts)
    assert nested.keys() == expected.keys() and all(torch.equal(nested[key], expected[key]) for key in expected)
    for samples, index, count in (([[images[0]], images[:2]], 1, 2), ([[], [images[1]]], 0, 0)):
        with pytest.raises(ValueError) as error:
            processor(images=samples, text=prompts)
        assert str(error.value) == (
            f"ClipCap takes one image per prompt, and sample {index} holds {count} images: give one image per sample "
            "([[image], [image], ...]) or a flat list of images."
        )
