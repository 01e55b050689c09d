"""Folders saved before image tokens existed (clipcap_hf 0.1) load and caption as they did.

`data/clipcap-0.1-folder` was saved by clipcap_hf 0.1.0 on transformers 4.57 (a tiny transformer-mapper model), with
`expected_captions.json`: what 0.1.0 computed with it (logits and captions). Its model code files are left out: the
folder loads through the installed package.
"""

import json
from pathlib import Path

import torch
from conftest import random_images
from transformers import AutoModel, AutoProcessor

import clipcap_hf  # noqa: F401  (registers "clipcap")

LEGACY_FOLDER = Path(__file__).parent / "data" / "clipcap-0.1-folder"


def load(folder):
    model = AutoModel.from_pretrained(folder, trust_remote_code=False).eval()
    return model, AutoProcessor.from_pretrained(folder, trust_remote_code=False)


def test_a_folder_saved_before_image_tokens_captions_as_before(tmp_path):
    expected = json.loads((LEGACY_FOLDER / "expected_captions.json").read_text())
    model, processor = load(LEGACY_FOLDER)
    vocab_size = 300  # the folder's tokenizer and language model
    assert model.config.image_token_id == processor.image_token_id == vocab_size
    assert processor.num_image_tokens == model.config.prefix_length == 4
    image_embeds = torch.tensor(expected["image_embeds"])
    input_ids = torch.cat((torch.full((2, 4), vocab_size), torch.tensor([[5, 6, 7], [8, 9, 10]])), dim=1)
    with torch.no_grad():
        logits = model(image_embeds=image_embeds, input_ids=input_ids).logits
    torch.testing.assert_close(logits[:, -3:, :vocab_size], torch.tensor(expected["last_logits"]), atol=1e-5, rtol=1e-5)
    captions = model.generate(image_embeds=image_embeds, max_new_tokens=8)[:, 4:]
    assert captions.tolist() == expected["greedy_from_image_embeds"]
    beams = model.generate(image_embeds=image_embeds, max_new_tokens=8, num_beams=3)[:, 4:]
    assert beams.tolist() == expected["beam_from_image_embeds"]
    inputs = processor(images=random_images(2, seed=5), text=["A dog", ""])
    decoded = processor.batch_decode(model.generate(**inputs, max_new_tokens=8), skip_special_tokens=True)
    assert decoded == expected["greedy_from_images_with_prompts"]

    # Saved again, the folder has its image token and loads as any new folder.
    model.save_pretrained(tmp_path / "upgraded")
    processor.save_pretrained(tmp_path / "upgraded")
    saved = json.loads((tmp_path / "upgraded" / "config.json").read_text())
    assert saved["image_token_id"] == vocab_size and saved["text_config"]["vocab_size"] == vocab_size + 1
    upgraded, upgraded_processor = load(tmp_path / "upgraded")
    assert upgraded_processor.num_image_tokens == 4
    assert upgraded.generate(image_embeds=image_embeds, max_new_tokens=8)[:, 4:].tolist() == captions.tolist()

