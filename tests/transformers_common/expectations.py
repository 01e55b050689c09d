"""
What transformers' common tests cannot pass on ClipCap, and why: `DESIGN` (deliberate, documented differences, and
what this run's environment cannot do) are skipped; `KNOWN_BUGS` are strict xfails, so a fix makes the run fail until
its entry is removed here (except where the test fails inside a `subTest`: pytest then reports the test itself as
passed, so that xfail cannot be strict).

An entry names a test method and applies to its parameterized variants too (`test_x_0_images`, `test_x_00_fp16_...`).
"""

import functools
import re
import unittest

import pytest
import transformers

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

IMAGE_TOKENS_WITHOUT_IMAGE = (
    "Image tokens without an image are refused (docs/decoding.md); this test runs `input_ids` alone, image tokens "
    "included. SDPA = eager with the image: tests/test_conformance.py::test_sdpa_equals_eager."
)
FROZEN_PARTS_IN_EVAL_MODE = (
    "Frozen sub-models stay in eval mode in training mode (ClipCapForConditionalGeneration's docstring). The test "
    "unfreezes every parameter after `model.train()` (not through `freeze_vision_model(False)`), so the CLIP layers it "
    "counts checkpointed calls on stay in eval mode, where transformers does not checkpoint. Covered by "
    "tests/test_conformance.py::test_gradient_checkpointing_gives_the_same_loss_and_gradients."
)
SWITCHES_PER_CALL = (
    "ClipCapImageProcessor's constructor takes its own settings only (size, crop_size, resample, image_mean, "
    "image_std, resize_mode), so that a CLIP preprocessor config carrying do_* keys is refused with a pointer to "
    "from_transformers_pretrained instead of half-read; transformers' step switches (do_rescale, do_normalize, ...) "
    "are taken per call (tests/test_processing.py::test_transformers_standard_image_switches). This test sets them at "
    "creation."
)
RGB_ONLY = (
    "CLIP reads RGB: ClipCapImageProcessor always converts to RGB and reads an array's channel layout itself, so it "
    "takes no do_convert_rgb / input_data_format."
)

# (test name, reason, applies[, strict]: KNOWN_BUGS entries are strict unless they say False)
DESIGN = [
    ("test_eager_matches_sdpa_inference", IMAGE_TOKENS_WITHOUT_IMAGE, True),
    (
        "test_model_base_model_prefix",
        (
            "ClipCap has no separate base model: the CLIP tower, the mapper and the language model are direct "
            "children of ClipCapForConditionalGeneration (the layout of converted checkpoints), so `model.base_model` "
            "is the model itself."
        ),
        True,
    ),
    ("test_training_gradient_checkpointing", FROZEN_PARTS_IN_EVAL_MODE, True),
    ("test_training_gradient_checkpointing_use_reentrant_false", FROZEN_PARTS_IN_EVAL_MODE, True),
    ("test_training_gradient_checkpointing_use_reentrant_true", FROZEN_PARTS_IN_EVAL_MODE, True),
    (
        "test_subprocessor_defaults",
        (
            "Every row ClipCapProcessor writes starts with the image tokens, a prompt without images included (for "
            "`image_embeds`); the test expects `processor(text=...)` to equal the bare tokenizer's output."
        ),
        True,
    ),
    ("test_save_load_pretrained_additional_features", SWITCHES_PER_CALL, True),
    ("test_subprocessor_defaults_preserved_by_kwargs", SWITCHES_PER_CALL, True),
    # transformers 4.57's forms of the test above (passed there only while `from_pretrained` stored such options
    # unchecked, and the calls ignored them).
    ("test_image_processor_defaults_preserved_by_image_kwargs", SWITCHES_PER_CALL, not TRANSFORMERS_5),
    ("test_kwargs_overrides_default_image_processor_kwargs", SWITCHES_PER_CALL, not TRANSFORMERS_5),
    ("test_call_numpy_4_channels", RGB_ONLY, True),
    ("test_image_processor_from_dict_with_kwargs_has_attributes", RGB_ONLY, True),
    (
        "test_args_overlap_kwargs",
        (
            "A saved ClipCapImageProcessor config with an option it does not take (the test adds `is_override`) is "
            "refused on load; transformers 4.57 reads the image processor from the folder even when one is passed."
        ),
        not TRANSFORMERS_5,
    ),
    (
        "test_backends_equivalence",
        "Environment: loads a test image from the Hugging Face Hub, and this run has no network beyond PyPI.",
        True,
    ),
]

KNOWN_BUGS = []


def _matches(name: str, test_name: str) -> bool:
    return test_name == name or re.fullmatch(re.escape(name) + r"_\d+(_.*)?", test_name) is not None


def _copy(function):
    @functools.wraps(function)
    def test(self, *args, **kwargs):
        return function(self, *args, **kwargs)

    return test


def apply_expectations(cls):
    """Class decorator: skip the `DESIGN` tests and strictly xfail the `KNOWN_BUGS` tests of `cls`."""
    # (parameterized.expand leaves the expanded method's own name set to None: not a test)
    for test_name in [name for name in dir(cls) if name.startswith("test_") and callable(getattr(cls, name))]:
        for entries, mark in ((DESIGN, unittest.skip), (KNOWN_BUGS, None)):
            for name, reason, applies, *strict in entries:
                if applies and _matches(name, test_name):
                    test = _copy(getattr(cls, test_name))
                    if mark is unittest.skip:
                        test = unittest.skip(reason)(test)
                    else:
                        test = pytest.mark.xfail(strict=strict != [False], reason=f"known bug: {reason}")(test)
                    setattr(cls, test_name, test)
    return cls
