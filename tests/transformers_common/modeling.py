"""
ClipCapForConditionalGeneration through transformers' own ModelTesterMixin, GenerationTesterMixin and ConfigTester,
set up as transformers' LLaVA test: a tiny config, `input_ids` that start with the image tokens, `pixel_values`.

Run by .ci/transformers_common_tests.py, which places this file in transformers' test tree as
tests/models/clipcap/test_modeling_clipcap.py (the relative imports below are into that tree).
"""

import copy
import unittest

import torch
from transformers import CLIPVisionConfig
from transformers.testing_utils import require_torch, torch_device

from clipcap_hf import ClipCapConfig, ClipCapForConditionalGeneration

from ...generation.test_utils import GenerationTesterMixin
from ...test_configuration_common import ConfigTester
from ...test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor
from .expectations import apply_expectations

SPECIAL_TOKENS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
GPT2_TEXT_CONFIG = {
    "model_type": "gpt2", "vocab_size": 99, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 37,
    "n_positions": 512, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, **SPECIAL_TOKENS,
}
LLAMA_TEXT_CONFIG = {
    "model_type": "llama", "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 37, "hidden_act": "gelu", "max_position_embeddings": 512,
    **SPECIAL_TOKENS,
}
OPT_TEXT_CONFIG = {  # word_embed_proj_dim = hidden_size, as transformers' own OPT tester
    "model_type": "opt", "vocab_size": 99, "hidden_size": 32, "word_embed_proj_dim": 32, "num_hidden_layers": 2,
    "num_attention_heads": 4, "ffn_dim": 37, "max_position_embeddings": 512, **SPECIAL_TOKENS,
}
VISION_CONFIG = {
    "image_size": 8, "patch_size": 2, "num_channels": 3, "hidden_size": 32, "projection_dim": 24,
    "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37, "dropout": 0.1,
    "attention_dropout": 0.1, "initializer_range": 0.02,
}


class ClipCapModelTester:
    def __init__(self, parent, text_config=GPT2_TEXT_CONFIG, mapping_type="mlp", prefix_length=4, image_token_id=3,
                 text_seq_length=7, batch_size=3):
        self.parent = parent
        self.text_config = dict(text_config)
        self.mapping_type = mapping_type
        self.prefix_length = self.num_image_tokens = prefix_length
        self.image_token_id = image_token_id  # inside the vocabulary, as LLaVA's tester's
        self.pad_token_id = text_config["pad_token_id"]
        self.vocab_size = text_config["vocab_size"]
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.is_training = True
        self.batch_size = batch_size
        self.num_channels = 3
        self.image_size = VISION_CONFIG["image_size"]
        self.seq_length = self.encoder_seq_length = text_seq_length + prefix_length

    def get_config(self):
        mapper = {"mapping_num_layers": 2, "mapping_num_heads": 4} if self.mapping_type == "transformer" else {}
        return ClipCapConfig(
            vision_config=CLIPVisionConfig(**VISION_CONFIG),
            text_config=copy.deepcopy(self.text_config),
            mapping_type=self.mapping_type,
            prefix_length=self.prefix_length,
            image_token_id=self.image_token_id,
            **mapper,
        )

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 2) + 2
        input_ids[input_ids == self.image_token_id] = self.pad_token_id
        input_ids[:, : self.num_image_tokens] = self.image_token_id
        attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=torch_device)
        return config, {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


class ClipCapModelTestBase(ModelTesterMixin, GenerationTesterMixin):
    all_model_classes = (ClipCapForConditionalGeneration,)
    _is_composite = True
    test_pruning = False  # transformers 4.57's mixin, as its LLaVA test: ClipCap has no head pruning or head masks
    test_head_masking = False
    # configuration_clipcap.py has no "# Copyright YYYY" line, which the test would read as a pre-2023 model.
    test_can_init_all_missing_weights_before_2023 = True
    text_config = GPT2_TEXT_CONFIG
    mapping_type = "mlp"

    def setUp(self):
        self.model_tester = ClipCapModelTester(self, text_config=self.text_config, mapping_type=self.mapping_type)
        self.config_tester = ConfigTester(
            self, config_class=ClipCapConfig, has_text_modality=False,
            common_properties=["image_token_id", "prefix_length"],
        )

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # Labels as for transformers' image-text-to-text models (ClipCap is registered at run time, not in the mapping).
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:
            inputs_dict["labels"] = torch.zeros(
                (self.model_tester.batch_size, self.model_tester.seq_length), dtype=torch.long, device=torch_device
            )
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()


@require_torch
@apply_expectations
class ClipCapGPT2MLPModelTest(ClipCapModelTestBase, unittest.TestCase):
    pass


@require_torch
@apply_expectations
class ClipCapGPT2TransformerModelTest(ClipCapModelTestBase, unittest.TestCase):
    mapping_type = "transformer"


@require_torch
@apply_expectations
class ClipCapLlamaModelTest(ClipCapModelTestBase, unittest.TestCase):
    text_config = LLAMA_TEXT_CONFIG


@require_torch
@apply_expectations
class ClipCapOPTModelTest(ClipCapModelTestBase, unittest.TestCase):
    text_config = OPT_TEXT_CONFIG
