"""
ClipCapImageProcessor through transformers' own ImageProcessingTestMixin (transformers 5's or 4.57's), set up as
transformers' CLIP image processor test.

Run by .ci/transformers_common_tests.py as tests/models/clipcap/test_image_processing_clipcap.py of transformers' tree.
"""

import unittest

from transformers.testing_utils import require_torch, require_vision

from clipcap_hf import ClipCapImageProcessor

from ... import test_image_processing_common as common
from .expectations import apply_expectations

SIZE, CROP_SIZE = 20, 18


if hasattr(common, "ImageProcessingTester"):  # transformers 5

    class ClipCapImageProcessingTester(common.ImageProcessingTester):
        def __init__(self, parent, **kwargs):
            super().__init__(parent, **kwargs)
            self.size, self.crop_size = SIZE, CROP_SIZE

        def _get_image_processing_classes(self):
            # As clipcap_hf registers it with AutoImageProcessor on transformers 5: one class for both backends.
            return {"pil": ClipCapImageProcessor, "torchvision": ClipCapImageProcessor}

        def prepare_image_processor_dict(self):
            return {"size": self.size, "crop_size": self.crop_size}

        def expected_output_image_shape(self, images):
            return self.num_channels, self.crop_size, self.crop_size

    @require_torch
    @require_vision
    @apply_expectations
    class ClipCapImageProcessingTest(common.ImageProcessingTestMixin, unittest.TestCase):
        image_processor_tester_class = ClipCapImageProcessingTester

else:  # transformers 4.57

    class ClipCapImageProcessingTester:
        def __init__(self, parent, batch_size=7, num_channels=3, min_resolution=30, max_resolution=400):
            self.parent = parent
            self.batch_size, self.num_channels = batch_size, num_channels
            self.min_resolution, self.max_resolution = min_resolution, max_resolution
            self.size, self.crop_size = SIZE, CROP_SIZE

        def prepare_image_processor_dict(self):
            return {"size": self.size, "crop_size": self.crop_size}

        def expected_output_image_shape(self, images):
            return self.num_channels, self.crop_size, self.crop_size

        def prepare_image_inputs(self, equal_resolution=False, numpify=False, torchify=False):
            return common.prepare_image_inputs(
                batch_size=self.batch_size, num_channels=self.num_channels, min_resolution=self.min_resolution,
                max_resolution=self.max_resolution, equal_resolution=equal_resolution, numpify=numpify,
                torchify=torchify,
            )

    @require_torch
    @require_vision
    @apply_expectations
    class ClipCapImageProcessingTest(common.ImageProcessingTestMixin, unittest.TestCase):
        image_processing_class = ClipCapImageProcessor

        def setUp(self):
            super().setUp()
            self.image_processor_tester = ClipCapImageProcessingTester(self)

        @property
        def image_processor_dict(self):
            return self.image_processor_tester.prepare_image_processor_dict()
