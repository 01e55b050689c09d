"""Image processor for ClipCap: a vision tower's reference preprocessing (CLIP's by default), on every kind of image a
user has."""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import IMAGE_PROCESSOR_NAME, PROCESSOR_NAME, cached_file, logging

from .configuration_clipcap import check_vision_backend, vision_tower_config

# Imported directly, not only through the configuration module: transformers 4.x copies only a remote-code module's
# direct relative imports into its cache.
from .open_clip_vision import resolve_open_clip_model

logger = logging.get_logger(__name__)

# What transformers itself passes to the constructor when loading a saved processor; every other keyword is refused.
_BOOKKEEPING_KWARGS = {
    "image_processor_type", "auto_map", "processor_class", "_processor_class", "feature_extractor_type"
}

# Every Pillow filter, by the name a saved config keeps; PIL's values (as transformers saves them) are read too.
_RESAMPLE = {
    "nearest": PIL.Image.Resampling.NEAREST,
    "box": PIL.Image.Resampling.BOX,
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "hamming": PIL.Image.Resampling.HAMMING,
    "bicubic": PIL.Image.Resampling.BICUBIC,
    "lanczos": PIL.Image.Resampling.LANCZOS,
}

ImageLike = PIL.Image.Image | np.ndarray | torch.Tensor
_EXIF_ORIENTATION = 0x0112

# How an image becomes a square: resize the short side and center-crop (CLIP, DINOv2), or resize both sides to the
# square, whatever the aspect ratio (SigLIP, ViT), as open_clip names these modes.
RESIZE_MODES = ("shortest", "squash")
_HALF = (0.5, 0.5, 0.5)
# The reference preprocessing of each transformers tower, for a checkpoint without a preprocessor_config.json:
# (resize mode, resample, mean, std), at the tower's image size.
_TOWER_PREPROCESSING = {
    "clip_vision_model": ("shortest", "bicubic", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "siglip_vision_model": ("squash", "bicubic", _HALF, _HALF),
    "siglip2_vision_model": ("squash", "bilinear", _HALF, _HALF),
    "vit": ("squash", "bilinear", _HALF, _HALF),
    "dinov2": ("shortest", "bicubic", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "dinov2_with_registers": ("shortest", "bicubic", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
}

# What `cached_file` takes of `from_transformers_pretrained`'s keyword arguments.
_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")

# The settings the constructor takes, which `from_transformers_pretrained` reads from a checkpoint (and takes as
# options in their place).
_SETTINGS = ("size", "crop_size", "resample", "image_mean", "image_std", "resize_mode")

# The step switches of transformers' image processors that `from_transformers_pretrained` translates.
_TRANSLATED_STEPS = frozenset({"do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"})

# The options a call can give (the processor passes them on by these names): the processor's own settings, and
# transformers' standard switches for each preprocessing step.
IMAGE_OPTIONS = frozenset(
    {
        "size", "crop_size", "resample", "image_mean", "image_std",
        "do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb",
    }
)

# The keyword arguments of `from_pretrained` that `from_dict` gives the constructor with the saved settings: the
# processor's own, and transformers 5's image processor options (`ImagesKwargs`), so that the same are read or refused
# on 4.57. Others (download options, a processor's options for its tokenizer, ...) are left to the caller.
_FROM_DICT_OPTIONS = IMAGE_OPTIONS | {
    "resize_mode", "do_pad", "pad_size", "default_to_square", "data_format", "input_data_format", "device",
    "disable_grouping", "image_seq_length", "return_tensors",
}


def load_image(path: str | os.PathLike, formats: Sequence[str] | None = None) -> PIL.Image.Image:
    """
    Open and fully decode an image file (a truncated file fails here, not later), naming the file on failure.
    `formats` (PIL's names, e.g. `("JPEG", "PNG")`) limits the formats tried, as for files from strangers: PIL hands
    some (EPS) to other programs.
    """
    try:
        with PIL.Image.open(path, formats=formats) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError) as error:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"Cannot read image {path}: {error}") from error
    except PIL.Image.DecompressionBombError as error:  # a plain Exception, which callers' handlers would miss
        raise ValueError(
            f"Cannot read image {path}: {error} If you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS."
        ) from error


def to_rgb_image(image: ImageLike) -> PIL.Image.Image:
    """
    Turn one image into an upright 8-bit RGB PIL image.

    PIL images get their EXIF orientation applied; transparent images (RGBA, LA, palette or colour-key transparency)
    are composited on white; CMYK, grayscale and 16-bit images are converted. Arrays and tensors may be HWC or CHW,
    with 1, 3 or 4 channels: uint8, uint16 (16-bit images, scaled to 8 bits), bool (black and white), other integers
    in [0, 255], or floats in [0, 1]. A PIL "I" image holding values above 255 is a 16-bit one (Pillow before 10.3
    opens 16-bit PNGs so), otherwise an 8-bit one.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        # numpy has no bfloat16; float16/bfloat16 in [0, 1] are read like any float image.
        image = (image.float() if image.is_floating_point() else image).numpy()
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(
            f"Expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}. "
            "Open files with PIL.Image.open first."
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(f"Got an image of size {image.width}x{image.height}; images must not be empty.")
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        # Only then: exif_transpose copies even an upright image. It removes the tag from the image it returns, so an
        # image that comes through here twice is turned once.
        image = PIL.ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # Integer and float images by the rules of arrays: PIL's own conversion to RGB clips at 255 (and makes an "F"
        # image in [0, 1] black).
        values = np.asarray(image)
        if image.mode == "I" and 255 < values.max() <= 65535 and values.min() >= 0:
            values = values.astype(np.uint16)
        return _array_to_pil(values).convert("RGB")
    if "transparency" in image.info and image.mode in ("P", "RGB", "L"):
        image = image.convert("RGBA")  # palette or PNG colour-key (tRNS) transparency
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent areas carry arbitrary colours; white is what a viewer shows behind them.
        background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB") if image.mode != "RGB" else image


def _array_to_pil(array: np.ndarray) -> PIL.Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"Cannot read an image array of shape {array.shape}: expected (H, W), (H, W, C) or (C, H, W) with C in "
            "1, 3 or 4."
        )
    if array.size == 0:
        raise ValueError(f"Got an empty image array of shape {array.shape}.")
    return PIL.Image.fromarray(_to_uint8(array))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """An image array's values as uint8, by its dtype's meaning; values that fit no 8-bit reading are refused."""
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))  # big-endian data (PIL's "I;16B", some TIFFs)
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(255)  # a mask: False black, True white
    if np.issubdtype(array.dtype, np.floating):
        low, high = array.min(), array.max()  # a NaN anywhere makes both NaN, which passes any range comparison
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError("Float image arrays must hold finite values; this one holds NaN or infinity.")
        if low < 0 or high > 1:
            raise ValueError(
                f"Float image arrays must hold values in [0, 1], this one holds [{low:g}, {high:g}]; divide "
                "[0, 255] data by 255 or pass it as uint8."
            )
        return (array.astype(np.float64) * 255).round().astype(np.uint8)
    if array.dtype == np.uint16:
        # 16-bit images (imageio, OpenCV, tifffile): the same scaling as PIL's "I;16" images get.
        return (array.astype(np.float64) / 257.0).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"Integer image arrays of dtype {array.dtype} must hold values in [0, 255], this one holds "
                f"[{low}, {high}]; pass 16-bit images as uint16 (array.astype(np.uint16)), or scale the values "
                "to [0, 255]."
            )
        return array.astype(np.uint8)
    raise ValueError(
        f"Cannot read an image array of dtype {array.dtype}; pass uint8, uint16, bool, integers in [0, 255] or "
        "floats in [0, 1]."
    )


# Largest short-side resize, in crop areas, made before a center crop; beyond it only the crop's region is resampled
# (a resize to 16 crop areas is an aspect ratio of 16:1, wider than panoramas).
_LARGEST_RESIZE_PER_CROP = 16


def _center_crop_corner(width: int, height: int, crop_size: int) -> tuple[int, int]:
    """The left and top of a `crop_size` square centered in a `width` x `height` image, as torchvision rounds them."""
    return int(round((width - crop_size) / 2.0)), int(round((height - crop_size) / 2.0))


def _resample_name(resample: str | int) -> str:
    """A resampling filter by its name in `_RESAMPLE`, given as that name or as a PIL value
    (`PIL.Image.Resampling.BICUBIC`, or 3 as transformers' image processors save it)."""
    if isinstance(resample, str) and resample in _RESAMPLE:
        return resample
    if isinstance(resample, numbers.Integral) and not isinstance(resample, bool):  # Resampling is an IntEnum
        names = {int(value): name for name, value in _RESAMPLE.items()}
        if int(resample) in names:
            return names[int(resample)]
    raise ValueError(f"`resample` must be one of {list(_RESAMPLE)} or a PIL.Image.Resampling value, got {resample!r}.")


def _read_size(value: int | dict[str, int], name: str) -> tuple[int, str | None]:
    """
    A `size` or `crop_size` in any form transformers' image processors write it: a number, `{"shortest_edge": n}`
    (the short side) or `{"height": n, "width": n}` (a square). Returns the side and the resize mode that a dict's
    form names (`"shortest"` or `"squash"`; None for a number).
    """
    if isinstance(value, dict):
        if value.keys() == {"shortest_edge"}:
            return _positive_side(int(value["shortest_edge"]), value, name), "shortest"
        if value.keys() == {"height", "width"}:
            if value["height"] != value["width"]:
                raise ValueError(
                    f"`{name}` {value} is {value['height']}x{value['width']}; ClipCapImageProcessor makes square "
                    "images only."
                )
            return _positive_side(int(value["height"]), value, name), "squash"
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return _positive_side(int(value), value, name), None
    raise ValueError(
        f"`{name}` must be an int, {{'shortest_edge': n}} or {{'height': n, 'width': n}}, got {value!r}."
    )


def _positive_side(side: int, value: int | dict[str, int], name: str) -> int:
    if side < 1:  # else the first image would fail, blamed for it ("height and width must be > 0")
        raise ValueError(f"`{name}` must be at least 1 pixel, got {value!r}.")
    return side


def _channel_values(value: float | Sequence[float], name: str) -> list[float]:
    """
    `image_mean` or `image_std` as three floats, one per RGB channel; one number is every channel's, as
    `CLIPImageProcessor` takes it. A std must be > 0 (a zero one gave infinite pixels).
    """
    values = [value] * 3 if isinstance(value, numbers.Real) else value
    try:
        values = [float(channel) for channel in values]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3 or not all(math.isfinite(channel) for channel in values):
        raise ValueError(
            f"`{name}` must be three finite numbers (one per RGB channel) or one for all three, got {value!r}."
        )
    if name == "image_std" and min(values) <= 0:
        raise ValueError(f"`image_std` must be > 0 for every channel, got {value!r}.")
    return values


def _square_sizes(
    size: int | dict[str, int], crop_size: int | dict[str, int] | None, resize_mode: str
) -> tuple[int, int]:
    """`size` and `crop_size` (None: `size`) as ints; a `size` dict must name `resize_mode`'s kind of resize."""
    side, named_mode = _read_size(size, "size")
    if named_mode not in (None, resize_mode):
        raise ValueError(
            f"size={size} asks for resize_mode={named_mode!r}, but this processor's resize_mode is {resize_mode!r}; "
            f"pass size={side}, or build the processor with resize_mode={named_mode!r}."
        )
    return side, side if crop_size is None else _read_size(crop_size, "crop_size")[0]


def _untranslatable_settings(settings: dict[str, Any]) -> list[str]:
    """The settings of a transformers image processor that ClipCapImageProcessor cannot apply, as `name=value`."""
    refused = {name: settings[name] for name in ("do_resize", "do_rescale", "do_convert_rgb")
               if settings.get(name) is False}
    rescale_factor = settings.get("rescale_factor")
    if rescale_factor is not None and not math.isclose(rescale_factor, 1 / 255):
        refused["rescale_factor"] = rescale_factor
    # Other steps (padding, channel flips, ...) that are switched on.
    refused.update({name: value for name, value in settings.items()
                    if name.startswith("do_") and name not in _TRANSLATED_STEPS and value})
    return [f"{name}={value!r}" for name, value in refused.items()]


def _image_processor_files(pretrained_model_name_or_path: str, kwargs: dict[str, Any]) -> list[str]:
    """
    The paths of the files of a checkpoint that may hold its image processor settings and are there:
    `preprocessor_config.json`, and `processor_config.json` (where transformers 5 saves a whole processor's). Raises an
    OSError where that cannot be told (a Hub checkpoint neither cached nor reachable).
    """
    download_kwargs = {key: kwargs[key] for key in _DOWNLOAD_KWARGS if key in kwargs}
    paths = (
        cached_file(pretrained_model_name_or_path, filename, _raise_exceptions_for_missing_entries=False,
                    **download_kwargs)
        for filename in (IMAGE_PROCESSOR_NAME, PROCESSOR_NAME)
    )
    return [path for path in paths if path is not None]


def _may_hold_image_processor_settings(path: str) -> bool:
    """
    Whether a settings file that transformers could not load may hold image processor settings, and so must not be
    replaced by the tower's reference preprocessing: any that is not a JSON object (e.g. cut short), a
    `preprocessor_config.json`, or a `processor_config.json` with an `image_processor` entry. One holding only the
    processor's own attributes (`{"processor_class": "CLIPProcessor"}`) has none; transformers 5 raises for it as
    for a corrupt file, 4.57 reads it as settings that leave everything open.
    """
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
    except ValueError:  # not JSON, or not UTF-8
        return True
    return not isinstance(content, dict) or os.path.basename(path) != PROCESSOR_NAME or "image_processor" in content


def _model_config(pretrained_model_name_or_path: str, **kwargs) -> PretrainedConfig:
    """
    The config of a transformers checkpoint; one that names code of its own (`auto_map`) is refused rather than its
    code run, unless `trust_remote_code=True` is given.
    """
    return AutoConfig.from_pretrained(pretrained_model_name_or_path, **{"trust_remote_code": False, **kwargs})


def _own_config_code(pretrained_model_name_or_path: str, kwargs: dict[str, Any]) -> str | None:
    """
    The config class a checkpoint's `config.json` names as code of its own (its `auto_map`'s `AutoConfig`, e.g.
    `"custom.CustomConfig"`) for a model type transformers does not know: the config `_model_config` refuses rather
    than run that code. None for any other config, or none that can be read. Reads the JSON only.
    """
    download_kwargs = {key: kwargs[key] for key in _DOWNLOAD_KWARGS if key in kwargs}
    try:
        config_dict = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **download_kwargs)[0]
    except (OSError, ValueError):
        return None
    auto_map = config_dict.get("auto_map")
    if not isinstance(auto_map, dict) or config_dict.get("model_type") in CONFIG_MAPPING:  # a known type: read so
        return None
    return auto_map.get("AutoConfig")


class ClipCapImageProcessor(BaseImageProcessor):
    r"""
    CLIP's reference preprocessing, as OpenAI CLIP and open_clip apply it: bicubic resize of the short side,
    center crop, RGB, scale to [0, 1], normalize with CLIP's mean and std; or, with other settings, another vision
    tower's (SigLIP's and ViT's resize to the square without a crop, `resize_mode="squash"`, and their 0.5 mean and
    std): [`from_vision_pretrained`] reads them from the tower's checkpoint.

    Written by hand rather than reusing `CLIPImageProcessor` so that one code path gives the same pixels on every
    supported transformers version (transformers 5 resizes tensors with torchvision by default, 4.x resizes with
    PIL), and so that EXIF orientation and transparency are handled before the resize.

    Args:
        size (`int`, *optional*, defaults to 224):
            Length the shorter side is resized to (`"shortest"`), or the side of the square (`"squash"`).
            transformers' `{"shortest_edge": n}` (with `"shortest"`) and `{"height": n, "width": n}` (with
            `"squash"`) mean the same.
        crop_size (`int`, *optional*):
            Side of the square center crop (224 for ViT-B/32, 288 for RN50x4), or `{"height": n, "width": n}`;
            defaults to `size` (with `"squash"`: no crop).
        resample (`str`, *optional*, defaults to `"bicubic"`):
            One of "nearest", "box", "bilinear", "hamming", "bicubic", "lanczos", or its `PIL.Image.Resampling`
            value.
        image_mean, image_std (`Sequence[float]`, *optional*):
            Per-channel normalisation; CLIP's by default.
        resize_mode (`str`, *optional*, defaults to `"shortest"`):
            `"shortest"` (resize the short side to `size`, center-crop `crop_size`) or `"squash"` (resize to
            `size` x `size`, whatever the aspect ratio, then center-crop `crop_size`).
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: int | dict[str, int] = 224,
        crop_size: int | dict[str, int] | None = None,
        resample: str | int = "bicubic",
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        resize_mode: str = "shortest",
        **kwargs,
    ):
        unknown = sorted(set(kwargs) - _BOOKKEEPING_KWARGS)
        if unknown:
            # Refused rather than stored and ignored (CLIPImageProcessor's do_normalize=False, do_resize=False...).
            raise TypeError(
                f"ClipCapImageProcessor got unknown options {unknown}. Its preprocessing is always resize (and center "
                "crop), RGB, normalize, and it takes only size=..., crop_size=..., resample=..., image_mean=..., "
                "image_std=..., resize_mode=...; for a vision checkpoint's preprocessing, use "
                "ClipCapImageProcessor.from_transformers_pretrained(...)."
            )
        super().__init__(**kwargs)
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"`resize_mode` must be one of {RESIZE_MODES}, got {resize_mode!r}.")
        size, crop_size = _square_sizes(size, crop_size, resize_mode)
        if crop_size > size:
            raise ValueError(f"`crop_size` ({crop_size}) must not exceed `size` ({size}).")
        self.size = size
        self.crop_size = crop_size
        self.resample = _resample_name(resample)
        self.resize_mode = resize_mode
        self.image_mean = _channel_values(image_mean, "image_mean")
        self.image_std = _channel_values(image_std, "image_std")

    @classmethod
    def from_dict(cls, image_processor_dict: dict[str, Any], **kwargs) -> ClipCapImageProcessor:
        """
        A processor from its saved settings, as `from_pretrained` loads it. Its options among `kwargs`
        (`from_pretrained(folder, resample="bilinear")`) replace the saved ones and go through the constructor's checks
        with them: transformers' own `from_dict` set them on the loaded processor unchecked (4.57 all but the sizes,
        5.x those it does not know), so that they differed between versions. The other `kwargs` are left unused.

        A squash saved without a crop (its `crop_size` is its `size`) stays one: a new `size` without a `crop_size`
        gives its whole square, as the constructor makes it. A crop that was saved (any `crop_size` of a short-side
        resize, a smaller one of a squash) is kept at a new `size`, as `CLIPImageProcessor.from_pretrained` keeps it.
        """
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        options = {name: kwargs.pop(name) for name in list(kwargs) if name in _FROM_DICT_OPTIONS}
        saved = dict(image_processor_dict)
        if saved.get("resize_mode") == "squash" and saved.get("crop_size", saved.get("size")) == saved.get("size"):
            # No crop is saved as the crop of the whole square: kept, it would crop the square of another `size`.
            saved.pop("crop_size", None)
        image_processor = cls(**{**saved, **options})
        return (image_processor, kwargs) if return_unused_kwargs else image_processor

    @classmethod
    def from_transformers_pretrained(cls, pretrained_model_name_or_path: str, **kwargs) -> ClipCapImageProcessor:
        """
        Take the preprocessing of a transformers vision checkpoint (CLIP, SigLIP, SigLIP2, ViT, DINOv2): its
        `preprocessor_config.json`'s sizes, resize mode, resampling, mean and std. A checkpoint without one gets its
        tower's reference preprocessing at the tower's image size. SigLIP2's NaFlex preprocessing, which keeps the
        aspect ratio within `max_num_patches`, becomes the square of that many patches (the same pixels for square
        images).

        `kwargs` are download options (`cache_dir`, `revision`, `token`, ..., `trust_remote_code`) and settings
        (`size=64`, `resample="bilinear"`, ...: the constructor's), which replace what the checkpoint gives and go
        through the constructor's checks; anything else is refused.
        """
        options = {name: kwargs.pop(name) for name in list(kwargs) if name in _SETTINGS}
        unknown = sorted(set(kwargs) - {*_DOWNLOAD_KWARGS, "trust_remote_code"})
        if unknown:
            raise TypeError(
                f"from_transformers_pretrained got unknown options {unknown}: it takes download options "
                f"({', '.join(_DOWNLOAD_KWARGS)}, trust_remote_code) and the settings it reads from the checkpoint "
                f"({', '.join(_SETTINGS)}); the step switches (do_resize, ...) apply per call."
            )
        processor = cls._from_transformers_checkpoint(pretrained_model_name_or_path, **kwargs)
        # The options go through the constructor's checks, as `from_pretrained(folder, size=64)` sends them.
        return cls.from_dict(processor.to_dict(), **options) if options else processor

    @classmethod
    def _from_transformers_checkpoint(cls, pretrained_model_name_or_path: str, **kwargs) -> ClipCapImageProcessor:
        """`from_transformers_pretrained` with download options only."""
        try:
            settings = cls.get_image_processor_dict(pretrained_model_name_or_path, **kwargs)[0]
        except OSError as error:  # transformers 4.57 and 5 raise it for an absent file as for a corrupt one
            # Only a checkpoint that truly has no image processor settings gets the reference preprocessing: a file
            # that is there but unreadable (e.g. cut short) would otherwise be ignored, and the tower fed other pixels.
            try:
                present = [
                    path for path in _image_processor_files(pretrained_model_name_or_path, kwargs)
                    if _may_hold_image_processor_settings(path)
                ]
            except OSError as lookup_error:  # e.g. a Hub checkpoint offline and not cached: it may have one
                raise OSError(
                    f"Could not look up the preprocessing settings ({IMAGE_PROCESSOR_NAME}) of "
                    f"{pretrained_model_name_or_path!r}: {str(lookup_error).strip()}"
                ) from lookup_error
            if present:
                raise OSError(
                    f"Could not read the preprocessing settings of {pretrained_model_name_or_path!r} from "
                    f"{' or '.join(present)}: {str(error).strip()} Fix the file, or remove it for the tower's "
                    "reference preprocessing."
                ) from error
            settings = {}
        if not settings:
            tower = vision_tower_config(_model_config(pretrained_model_name_or_path, **kwargs))
            resize_mode, resample, mean, std = _TOWER_PREPROCESSING[tower.model_type]
            side = getattr(tower, "image_size", None) or math.isqrt(tower.num_patches) * tower.patch_size
            return cls(size=side, resample=resample, image_mean=mean, image_std=std, resize_mode=resize_mode)
        if settings.get("image_processor_type") == cls.__name__:  # saved by ClipCapImageProcessor itself
            return cls.from_dict(settings)

        def model_config() -> PretrainedConfig | None:
            try:
                return _model_config(pretrained_model_name_or_path, **kwargs)
            except (OSError, ValueError):  # no model config (4.x: OSError, 5.x: ValueError): settings only
                if kwargs.get("trust_remote_code"):
                    return None
                own_code = _own_config_code(pretrained_model_name_or_path, kwargs)
                if own_code is not None:  # a config that is there but refused: said, for the tower may not be CLIP's
                    logger.warning(
                        f"The model config of {pretrained_model_name_or_path} names code of its own ({own_code}, in "
                        "its auto_map), which is not run, so the config is not read: the preprocessing is the "
                        "checkpoint's saved preprocessing settings, with CLIP's reference preprocessing for what they "
                        "leave out (the resize mode of a bare-number size, the resampling, mean and std). If the "
                        "tower preprocesses otherwise, add those settings there or build ClipCapImageProcessor(...) "
                        "with them."
                    )
                return None

        try:
            return cls.from_transformers_settings(settings, model_config)
        except ValueError as error:  # name the checkpoint whose settings these are
            raise ValueError(f"{pretrained_model_name_or_path}: {error}") from error

    @classmethod
    def from_transformers_settings(
        cls, settings: dict[str, Any], model_config: Callable[[], PretrainedConfig | None]
    ) -> ClipCapImageProcessor:
        """
        The preprocessing of a transformers image processor's settings (its saved JSON, as
        `json.loads(image_processor.to_json_string())` gives them). `model_config` gives the tower's model config (or
        None), read only for what the settings leave open: the tower's reference preprocessing. Settings it cannot
        reproduce raise a ValueError naming them.
        """
        untranslatable = _untranslatable_settings(settings)
        if untranslatable:  # refused rather than left out: the tower would see other pixels than it was trained on
            raise ValueError(
                f"ClipCapImageProcessor cannot reproduce this checkpoint's preprocessing with "
                f"{', '.join(untranslatable)}; it always resizes, center-crops (or squashes), converts to RGB and "
                "scales by 1/255."
            )
        reference = None  # the tower's reference preprocessing, read only for what the settings leave open

        def tower_reference() -> tuple[str, str, Sequence[float], Sequence[float]]:
            nonlocal reference
            if reference is None:
                config = model_config()
                # Without a model config, CLIP's conventions, as before other towers
                tower_type = "clip_vision_model" if config is None else vision_tower_config(config).model_type
                reference = _TOWER_PREPROCESSING[tower_type]
            return reference

        if settings.get("do_normalize") is False:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        else:  # what the tower's own processor defaults to where the settings leave them out
            mean = settings.get("image_mean") or tower_reference()[2]
            std = settings.get("image_std") or tower_reference()[3]
        crop_size = settings.get("crop_size")
        if "max_num_patches" in settings:  # SigLIP2 (NaFlex)
            resize_mode, size = "squash", math.isqrt(settings["max_num_patches"]) * settings["patch_size"]
        else:
            size, resize_mode = _read_size(settings.get("size", 224), "size")
            # A bare number, as older configs save it, is the short side for CLIP's and DINOv2's processors but
            # the square's side for ViT's and SigLIP's (google/vit-base-patch16-224's): the tower says which.
            resize_mode = resize_mode or tower_reference()[0]
        if settings.get("do_center_crop") is False:
            if resize_mode == "shortest":
                raise ValueError(
                    "do_center_crop=False with a short-side resize keeps each image's aspect ratio, and the towers "
                    "read square images: keep the crop, or resize with resize_mode='squash'."
                )
            crop_size = None  # no crop: the squashed square is the image
        resample = _resample_name(settings["resample"]) if "resample" in settings else tower_reference()[1]
        return cls(
            size=size, crop_size=crop_size, resample=resample, image_mean=mean, image_std=std, resize_mode=resize_mode
        )

    # The name it had when CLIP was the only transformers tower.
    from_clip_pretrained = from_transformers_pretrained

    @classmethod
    def from_vision_pretrained(
        cls, vision_model_name_or_path: str, vision_backend: str = "clip", open_clip_pretrained: str | None = None
    ) -> ClipCapImageProcessor:
        """
        The preprocessing of a vision tower of either backend: [`from_transformers_pretrained`] or [`from_open_clip`].
        """
        # As the config checks them: a typo of the backend would be read as a transformers checkpoint, and fail on it.
        check_vision_backend(vision_backend, open_clip_pretrained=open_clip_pretrained)
        if vision_backend == "open_clip":
            return cls.from_open_clip(vision_model_name_or_path, open_clip_pretrained)
        return cls.from_transformers_pretrained(vision_model_name_or_path)

    @classmethod
    def from_open_clip(cls, model_name: str, pretrained: str | None = None) -> ClipCapImageProcessor:
        """
        Take the inference preprocessing open_clip uses for a model and pretrained tag (image size, resize mode,
        interpolation, mean and std), e.g. `from_open_clip("RN50x4", "openai")` (288 pixels) or
        `from_open_clip("ViT-B-16-SigLIP", "webli")` (`"squash"`). Needs `open_clip_torch`; downloads nothing but the
        small config of an `"hf-hub:"` name.
        """
        preprocess_cfg = resolve_open_clip_model(model_name, pretrained)[1]
        resize_mode = preprocess_cfg["resize_mode"]
        if resize_mode not in RESIZE_MODES:  # "longest": resize the long side and pad to the square
            raise ValueError(
                f"open_clip model {model_name!r} preprocesses with resize_mode={resize_mode!r}; ClipCapImageProcessor "
                f"implements {' and '.join(map(repr, RESIZE_MODES))} only."
            )
        size = preprocess_cfg["size"]
        if isinstance(size, (list, tuple)):
            if size[0] != size[1]:
                raise ValueError(f"open_clip model {model_name!r} takes {size[0]}x{size[1]} images; only square ones "
                                 "are supported.")
            size = size[0]
        # open_clip also accepts "random" interpolation, for training; its inference transform then uses bicubic.
        resample = "bilinear" if preprocess_cfg["interpolation"] == "bilinear" else "bicubic"
        return cls(
            size=size,
            crop_size=size,
            resample=resample,
            image_mean=preprocess_cfg["mean"],
            image_std=preprocess_cfg["std"],
            resize_mode=resize_mode,
        )

    def preprocess_one(
        self,
        image: ImageLike,
        size: int | None = None,
        crop_size: int | None = None,
        resample: str | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        do_resize: bool = True,
        do_center_crop: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        do_convert_rgb: bool = True,
    ) -> np.ndarray:
        """
        Preprocess one image into a float32 array of shape (3, crop_size, crop_size). The options override, for this
        call, this processor's settings and transformers' standard switches for each step (all on by default).
        """
        size = size or self.size
        crop_size = crop_size or self.crop_size
        image = to_rgb_image(image)
        width, height = image.size
        if do_resize and self.resize_mode == "squash":
            image = image.resize((size, size), _RESAMPLE[resample or self.resample])
        elif do_resize:
            # Same arithmetic as torchvision's Resize(int) on a PIL image, so the pixels match CLIP's own transform.
            if width <= height:
                new_width, new_height = size, int(size * height / width)
            else:
                new_width, new_height = int(size * width / height), size
            box = None
            if do_center_crop and new_width * new_height > _LARGEST_RESIZE_PER_CROP * crop_size**2:
                # A thin strip (a PNG of 1 x 40,000 pixels takes a few bytes) would be resized to gigabytes before its
                # center crop: only the source region under the crop is resampled, by the same filter at the same
                # scale (PIL rounds its weights differently, so a pixel may differ by 1 of 255 from the full resize's).
                left, top = _center_crop_corner(new_width, new_height, crop_size)
                x_scale, y_scale = width / new_width, height / new_height
                box = (left * x_scale, top * y_scale, (left + crop_size) * x_scale, (top + crop_size) * y_scale)
                new_width = new_height = crop_size  # the crop below then keeps it whole
            image = image.resize((new_width, new_height), _RESAMPLE[resample or self.resample], box=box)
        # A squashed image is already the square of `size`: cropped only to a smaller `crop_size`, or if not resized.
        if do_center_crop and (self.resize_mode == "shortest" or crop_size != size or not do_resize):
            left, top = _center_crop_corner(*image.size, crop_size)
            image = image.crop((left, top, left + crop_size, top + crop_size))
        pixels = np.asarray(image, dtype=np.float32)
        if do_rescale:
            pixels = pixels * np.float32(rescale_factor)
        if do_normalize:
            mean = np.asarray(self.image_mean if image_mean is None else image_mean, dtype=np.float32)
            std = np.asarray(self.image_std if image_std is None else image_std, dtype=np.float32)
            pixels = (pixels - mean) / std
        return pixels.transpose(2, 0, 1)

    def preprocess(self, images: ImageLike | Sequence[ImageLike], return_tensors: str | None = "pt", **options: Any):
        """
        Preprocess an image or a batch of images. The options ([`preprocess_one`]'s: `size`, `crop_size`, `resample`,
        `image_mean`, `image_std`, and the switches `do_resize`, `do_center_crop`, `do_rescale`, `rescale_factor`,
        `do_normalize`) apply to this call only; `size`, `crop_size` and `resample` in the forms the constructor
        takes.

        Returns:
            [`BatchFeature`] with `pixel_values` of shape `(batch_size, 3, crop_size, crop_size)` (`size` for a squash
            without a crop; each image's own with `do_resize=False, do_center_crop=False`).
        """
        unknown = sorted(set(options) - IMAGE_OPTIONS)
        if unknown:  # refused rather than ignored
            raise TypeError(f"ClipCapImageProcessor takes no option {unknown}; it takes {sorted(IMAGE_OPTIONS)}.")
        options = {name: value for name, value in options.items() if value is not None}
        if "resample" in options:
            options["resample"] = _resample_name(options["resample"])
        if options.get("do_convert_rgb") is False:
            raise ValueError("`do_convert_rgb=False` is not supported: CLIP towers read 3-channel RGB images.")
        for name in ("image_mean", "image_std"):
            if name in options:
                options[name] = _channel_values(options[name], name)
        do_resize, do_center_crop = options.get("do_resize", True), options.get("do_center_crop", True)
        if do_resize and not do_center_crop and self.resize_mode == "shortest":
            raise ValueError(
                "do_center_crop=False with a short-side resize keeps each image's aspect ratio, and the towers read "
                "square images: keep the crop, or resize with resize_mode='squash'."
            )
        uncropped_squash = self.resize_mode == "squash" and self.crop_size == self.size
        # A squash without a crop stays one at another `size`.
        default_crop_size = None if uncropped_squash else self.crop_size
        size, crop_size = _square_sizes(
            options.get("size", self.size), options.get("crop_size", default_crop_size), self.resize_mode
        )
        options.update(size=size, crop_size=crop_size)
        if do_resize and do_center_crop and crop_size > size:
            raise ValueError(f"`crop_size` ({crop_size}) must not exceed `size` ({size}).")
        if isinstance(images, (PIL.Image.Image, np.ndarray, torch.Tensor)) and not _is_batched_array(images):
            images = [images]
        elif isinstance(images, (str, bytes, os.PathLike, dict)) or not is_iterable(images):
            # Else iterated: a number fails bare, and a path or dict gives its characters or keys as images.
            raise TypeError(
                f"`images` must be an image (PIL image, numpy array or torch tensor) or a list of images, got "
                f"{type(images).__name__} ({images!r:.60}). Open image files with PIL.Image.open first."
            )
        images = list(images)  # a batched array or tensor becomes a list of its images
        if any(isinstance(image, (list, tuple)) for image in images):
            images = _one_image_per_sample(images)
        if not images:
            raise ValueError("Got an empty list of images; pass at least one image.")
        arrays = []
        for index, image in enumerate(images):  # errors name the bad image of a batch
            try:
                arrays.append(self.preprocess_one(image, **options))
            except TypeError as error:
                raise TypeError(f"Image {index}: {error}") from error
            except ValueError as error:
                raise ValueError(f"Image {index}: {error}") from error
        different = next((index for index, array in enumerate(arrays) if array.shape != arrays[0].shape), None)
        if different is not None:  # both steps switched off: rather than numpy's "must have the same shape"
            sizes = [f"{arrays[index].shape[2]}x{arrays[index].shape[1]}" for index in (0, different)]
            raise ValueError(
                f"Images 0 and {different} are {sizes[0]} and {sizes[1]} (width x height): with do_resize=False and "
                "do_center_crop=False each image keeps its own size, so a batch needs images of one size."
            )
        pixel_values = np.stack(arrays)
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)


def is_iterable(value: Any) -> bool:
    """Whether `list(value)` reads it: any iterable, or a map-style dataset (`__getitem__` only)."""
    try:
        iter(value)
    except TypeError:
        return False
    return True


def _is_batched_array(images: Any) -> bool:
    return isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4


def _one_image_per_sample(samples: list) -> list:
    """The images of LLaVA-style per-sample lists (`[[image], [image], ...]`); ClipCap captions one image per prompt,
    so each sample must hold exactly one."""
    for index, sample in enumerate(samples):
        count = len(sample) if isinstance(sample, (list, tuple)) else 1
        if count != 1:
            raise ValueError(
                f"ClipCap takes one image per prompt, and sample {index} holds {count} images: give one image per "
                "sample ([[image], [image], ...]) or a flat list of images."
            )
    return [sample[0] if isinstance(sample, (list, tuple)) else sample for sample in samples]


__all__ = ["ClipCapImageProcessor"]
