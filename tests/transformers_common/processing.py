"""
ClipCapProcessor through transformers' own ProcessorTesterMixin, set up as transformers' LLaVA and BLIP-2 processor
tests: a saved processor folder with ClipCap's image processor and a tokenizer trained here (no Hub).

Run by .ci/transformers_common_tests.py as tests/models/clipcap/test_processing_clipcap.py of transformers' tree.
"""

import tempfile
import unittest

from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2TokenizerFast
from transformers.testing_utils import require_vision

from clipcap_hf import ClipCapImageProcessor, ClipCapProcessor

from ...test_processing_common import ProcessorTesterMixin
from .expectations import apply_expectations

CORPUS = ["A dog runs on the beach.", "A red circle above a blue square.", "lower newer upper older longer"] * 20


def build_tokenizer() -> GPT2TokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    return GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


@require_vision
@apply_expectations
class ClipCapProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = ClipCapProcessor
    maxDiff = None

    @classmethod
    def setUpClass(cls):
        if hasattr(ProcessorTesterMixin, "_setup_from_components"):  # transformers 5 saves the processor itself
            return super().setUpClass()
        # transformers 4.57: the test class saves the processor it tests, as 4.57's LLaVA test does
        cls.tmpdirname = tempfile.mkdtemp()
        processor = cls.processor_class(
            cls._setup_image_processor(), cls._setup_tokenizer(), **cls.prepare_processor_dict()
        )
        processor.save_pretrained(cls.tmpdirname)

    @classmethod
    def _setup_test_attributes(cls, processor):
        # ClipCap's convention: the processor writes the image tokens in front of every prompt and prompts hold none,
        # so the mixin's prompts get no image token (as for a processor without one).
        pass

    @classmethod
    def _setup_image_processor(cls):
        return ClipCapImageProcessor(size=32, crop_size=32)

    @classmethod
    def _setup_tokenizer(cls):
        return build_tokenizer()

    @staticmethod
    def prepare_processor_dict():
        return {"num_image_tokens": 4}
