import copy
import json
import threading
import time

import pytest
import torch
from transformers import GenerationConfig
from conftest import greedy_loop, tiny_model

from clipcap_hf.modeling_clipcap import DEFAULT_MAX_NEW_TOKENS


def embeds(model, count, seed=0):
    return torch.randn(count, model.config.prefix_dim, generator=torch.Generator().manual_seed(seed))


def strip_after_eos(tokens, eos_token_id):
    tokens = list(tokens)
    return tokens[: tokens.index(eos_token_id) + 1] if eos_token_id in tokens else tokens


def test_greedy_equals_a_step_by_step_argmax_loop_without_cache(model):
    x = embeds(model, 3)
    eos = model.generation_config.eos_token_id
    generated = model.generate(image_embeds=x, max_new_tokens=12, do_sample=False)
    for row in range(3):
        expected = greedy_loop(model, x[row : row + 1], 12, eos_token_id=eos)
        assert strip_after_eos(generated[row].tolist(), eos) == expected
        assert len(expected) > 3


def test_greedy_from_pixel_values_equals_greedy_from_image_embeds(model, processor, images):
    pixel_values = processor(images=images)["pixel_values"]
    from_pixels = model.generate(pixel_values=pixel_values, max_new_tokens=8)
    from_embeds = model.generate(image_embeds=model.get_image_features(pixel_values), max_new_tokens=8)
    assert torch.equal(from_pixels, from_embeds)


def test_cache_does_not_change_the_result(model):
    x = embeds(model, 2)
    assert torch.equal(
        model.generate(image_embeds=x, max_new_tokens=10, use_cache=True),
        model.generate(image_embeds=x, max_new_tokens=10, use_cache=False),
    )


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batch_equals_items_generated_one_by_one(model, num_beams):
    x = embeds(model, 4, seed=1)
    eos = model.generation_config.eos_token_id
    batched = model.generate(image_embeds=x, max_new_tokens=10, num_beams=num_beams)
    for row in range(4):
        alone = model.generate(image_embeds=x[row : row + 1], max_new_tokens=10, num_beams=num_beams)
        assert strip_after_eos(batched[row].tolist(), eos) == strip_after_eos(alone[0].tolist(), eos)


def test_num_beams_1_equals_greedy(model):
    x = embeds(model, 2)
    assert torch.equal(
        model.generate(image_embeds=x, max_new_tokens=10, num_beams=1, do_sample=False),
        model.generate(image_embeds=x, max_new_tokens=10, do_sample=False),
    )


def test_beam_search_returns_ranked_sequences(mlp_model):
    x = embeds(mlp_model, 2)
    out = mlp_model.generate(
        image_embeds=x, max_new_tokens=6, num_beams=4, num_return_sequences=3, output_scores=True,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape[0] == 6
    scores = out.sequences_scores.view(2, 3)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    # The best beam scores at least as well as the greedy caption (length-normalised log-probability).
    greedy = mlp_model.generate(image_embeds=x, max_new_tokens=6, output_scores=True, return_dict_in_generate=True)
    greedy_logprob = torch.stack(
        [torch.log_softmax(step, -1).gather(1, greedy.sequences[:, i : i + 1]).squeeze(1)
         for i, step in enumerate(greedy.scores)], dim=1
    ).sum(1) / greedy.sequences.shape[1]
    assert torch.all(scores[:, 0] >= greedy_logprob - 1e-4)


def test_sampling_is_reproducible_with_a_seed_and_varies_without(mlp_model):
    x = embeds(mlp_model, 1).expand(8, -1)
    torch.manual_seed(0)
    first = mlp_model.generate(image_embeds=x, max_new_tokens=8, do_sample=True, temperature=3.0)
    torch.manual_seed(0)
    second = mlp_model.generate(image_embeds=x, max_new_tokens=8, do_sample=True, temperature=3.0)
    assert torch.equal(first, second)
    assert len({tuple(row.tolist()) for row in first}) > 1


def test_prompt_is_continued(model, tokenizer):
    x = embeds(model, 1)
    prompt = tokenizer("A dog", add_special_tokens=False)["input_ids"]
    generated = model.generate(image_embeds=x, input_ids=torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6)
    assert generated[0].tolist() == greedy_loop(model, x, 6, prompt_ids=prompt)
    assert generated[0, : len(prompt)].tolist() == prompt


def test_left_padded_prompts_equal_prompts_alone(model, processor):
    prompts = ["A dog", "A red circle above a blue"]
    x = embeds(model, 2)
    batch = processor(text=prompts)
    assert batch["attention_mask"][0, 0] == 0  # left padding
    generated = model.generate(image_embeds=x, **batch, max_new_tokens=6, min_new_tokens=6)
    for row, prompt in enumerate(prompts):
        alone = model.generate(image_embeds=x[row : row + 1], **processor(text=[prompt]), max_new_tokens=6,
                               min_new_tokens=6)
        width = alone.shape[1]
        assert generated[row, -width:].tolist() == alone[0].tolist()


def test_empty_and_right_padded_prompts_in_a_batch_caption_as_alone(model, processor):
    # Both leave padding after the prefix or the prompt; the first caption token must still come from the last real
    # position.
    x = embeds(model, 3)
    prompts = ["", "A dog", "A red circle above a blue"]
    left = processor(text=prompts)
    assert left["attention_mask"][0].tolist() == [0] * left["input_ids"].shape[1]  # an empty prompt: all padding
    right = processor(text=prompts, padding_side="right")
    assert right["attention_mask"][1, -1] == 0
    expected = [model.generate(image_embeds=x[:1], max_new_tokens=6, min_new_tokens=6)[0].tolist()]
    for row, prompt in ((1, "A dog"), (2, "A red circle above a blue")):
        alone = model.generate(image_embeds=x[row : row + 1], **processor(text=[prompt]), max_new_tokens=6,
                               min_new_tokens=6)
        expected.append(alone[0, -6:].tolist())
    for batch in (left, right):
        generated = model.generate(image_embeds=x, **batch, max_new_tokens=6, min_new_tokens=6)
        assert generated[:, -6:].tolist() == expected


def test_generate_rejects_bad_arguments(mlp_model):
    x = embeds(mlp_model, 2)
    with pytest.raises(ValueError, match="`max_new_tokens` must be at least 1, got 0"):
        mlp_model.generate(image_embeds=x, max_new_tokens=0)
    with pytest.raises(ValueError, match="exactly one of `pixel_values` or `image_embeds`.*neither"):
        mlp_model.generate(max_new_tokens=3)
    with pytest.raises(ValueError, match="exactly one of `pixel_values` or `image_embeds`.*got only text"):
        mlp_model.generate(input_ids=torch.tensor([[5, 6]]), max_new_tokens=3)
    with pytest.raises(ValueError, match="Got 2 images but 1 text sequences"):
        mlp_model.generate(image_embeds=x, input_ids=torch.tensor([[5, 6]]), max_new_tokens=3)
    with pytest.raises(ValueError, match=r"`max_length` \(5\) counts the 4 prefix positions and the 2 prompt tokens"):
        mlp_model.generate(image_embeds=x[:1], input_ids=torch.tensor([[5, 6]]), max_length=5)


def test_a_given_generation_config_keeps_the_model_defaults_it_leaves_unset(mlp_model):
    x = embeds(mlp_model, 2)
    mlp_model.generation_config.eos_token_id = None
    free_running = mlp_model.generate(image_embeds=x, max_new_tokens=8).tolist()
    assert free_running[0][0] not in free_running[1]
    # The first caption's first token becomes the stop token (as '.' ends the paper's captions); the second runs on.
    mlp_model.generation_config.eos_token_id = free_running[0][0]
    mlp_model.generation_config.max_new_tokens = 8
    pad = mlp_model.generation_config.pad_token_id
    expected = [free_running[0][:1] + [pad] * 7, free_running[1]]
    assert mlp_model.generate(image_embeds=x).tolist() == expected
    assert mlp_model.generate(image_embeds=x, generation_config=GenerationConfig(do_sample=False)).tolist() == expected

    # What the caller's config sets wins.
    assert mlp_model.generate(image_embeds=x, generation_config=GenerationConfig(max_new_tokens=2)).shape == (2, 2)
    prefix_length = mlp_model.config.prefix_length
    assert mlp_model.generate(
        image_embeds=x, generation_config=GenerationConfig(max_length=prefix_length + 3)
    ).shape == (2, 3)
    # A length passed as an argument beats the config's, as a 4.57 pipeline passes both (a copy of ours and yours).
    assert mlp_model.generate(
        image_embeds=x, generation_config=copy.deepcopy(mlp_model.generation_config), max_length=prefix_length + 3
    ).shape == (2, 3)


def test_decoding_settings_come_from_the_clipcap_generation_config_not_the_language_models(mlp_model):
    # A language model checkpoint's own generation config (an instruction-tuned LM's samples, and stops at its EOS)
    # must not decide how captions are decoded; ClipCap's does.
    x = embeds(mlp_model, 2)
    mlp_model.generation_config.eos_token_id = None  # no stop token, as in the paper's decoding
    greedy = [greedy_loop(mlp_model, x[row : row + 1], 6) for row in range(2)]
    language_models_config = GenerationConfig(
        do_sample=True, temperature=5.0, top_k=0, eos_token_id=greedy[0][0], max_new_tokens=2
    )
    mlp_model.language_model.generation_config = language_models_config
    for _ in range(3):
        assert mlp_model.generate(image_embeds=x, max_new_tokens=6).tolist() == greedy
    assert mlp_model.language_model.generation_config is language_models_config  # given back after the call


def test_concurrent_generate_calls_keep_their_settings_and_restore_the_language_models(mlp_model):
    # The language model reads ClipCap's settings during a call; a second thread must neither see the first call's
    # nor leave them behind.
    x = embeds(mlp_model, 1)
    expected = {length: mlp_model.generate(image_embeds=x, max_new_tokens=length) for length in (2, 6)}
    own = mlp_model.language_model.generation_config
    mlp_model.language_model.register_forward_pre_hook(lambda *args: time.sleep(0.02))
    results = {}

    def caption(length, delay):
        time.sleep(delay)
        results[length] = mlp_model.generate(image_embeds=x, max_new_tokens=length)

    threads = [threading.Thread(target=caption, args=(2, 0)), threading.Thread(target=caption, args=(6, 0.01))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert mlp_model.language_model.generation_config is own
    assert {length: tokens.tolist() for length, tokens in results.items()} == {
        length: tokens.tolist() for length, tokens in expected.items()
    }


def test_generation_after_save_and_load(tmp_path, tokenizer):
    model = tiny_model(tokenizer, "transformer")
    x = embeds(model, 2)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(model.generate(image_embeds=x, max_new_tokens=8), loaded.generate(image_embeds=x, max_new_tokens=8))


def test_default_caption_length_and_explicit_lengths(tokenizer, tmp_path):
    # A prefix longer than transformers' default max_length (20), which the language model counts the prefix into.
    model = tiny_model(tokenizer, "transformer", prefix_length=24)
    model.generation_config.eos_token_id = None  # every caption runs to its full length
    x = embeds(model, 2)
    assert model.generate(image_embeds=x).shape == (2, DEFAULT_MAX_NEW_TOKENS)
    assert model.generate(image_embeds=x, max_new_tokens=5).shape == (2, 5)
    assert model.generate(image_embeds=x, max_length=30).shape == (2, 30 - 24)  # max_length counts the prefix
    # ... and the prompt, which the output starts with: 30 = 24 prefix + 2 prompt + 4 new tokens.
    prompt = torch.tensor([[5, 6], [7, 8]])
    with_prompt = model.generate(image_embeds=x, input_ids=prompt, max_length=30)
    assert with_prompt.shape == (2, 2 + 4)
    assert with_prompt.tolist() == model.generate(image_embeds=x, input_ids=prompt, max_new_tokens=4).tolist()

    # A folder saved without a caption length (as by older versions) gets the default when loaded.
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["max_new_tokens"] == DEFAULT_MAX_NEW_TOKENS
    del saved["max_new_tokens"]
    (tmp_path / "generation_config.json").write_text(json.dumps(saved))
    assert type(model).from_pretrained(tmp_path).generation_config.max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    # ... unless it chose a max_length, which then stays in charge.
    (tmp_path / "generation_config.json").write_text(json.dumps({**saved, "max_length": 27}))
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.generation_config.max_new_tokens is None
    assert loaded.generate(image_embeds=x).shape == (2, 27 - 24)
