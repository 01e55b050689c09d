import io
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import greedy_loop, tiny_config, tiny_model, tiny_processor
from transformers import GenerationConfig, LlamaConfig

from clipcap_hf.modeling_clipcap import (
    CACHE_NAME,
    DEFAULT_MAX_NEW_TOKENS,
    ClipCapForConditionalGeneration,
    ClipCapForImageToText,
    caption_length,
)


def embeds(model, count, seed=0):
    return torch.randn(count, model.config.prefix_dim, generator=torch.Generator().manual_seed(seed))


def strip_after_eos(tokens, eos_token_id):
    tokens = list(tokens)
    return tokens[: tokens.index(eos_token_id) + 1] if eos_token_id in tokens else tokens


def caption_tokens(model, generated, prompt_length=0):
    """The generated tokens after the image tokens and the prompt."""
    return generated[:, model.config.prefix_length + prompt_length :]


def test_greedy_equals_a_step_by_step_argmax_loop_without_cache(model):
    x = embeds(model, 3)
    eos = model.generation_config.eos_token_id
    generated = model.generate(image_embeds=x, max_new_tokens=12, do_sample=False)
    image_tokens = [model.config.image_token_id] * model.config.prefix_length
    for row in range(3):
        expected = greedy_loop(model, x[row : row + 1], 12, eos_token_id=eos)
        assert generated[row, : len(image_tokens)].tolist() == image_tokens  # the sequences start with the input
        assert strip_after_eos(caption_tokens(model, generated)[row].tolist(), eos) == expected
        assert len(expected) > 3


def test_greedy_from_pixel_values_equals_greedy_from_image_embeds(model, processor, images):
    inputs = processor(images=images)
    from_pixels = model.generate(**inputs, max_new_tokens=8)
    from_embeds = model.generate(image_embeds=model.get_image_embeds(inputs["pixel_values"]), max_new_tokens=8)
    assert torch.equal(from_pixels, from_embeds)
    # Without `input_ids`, generate writes the processor's image tokens itself.
    assert torch.equal(model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=8), from_pixels)


@pytest.mark.parametrize("model_class", [ClipCapForConditionalGeneration, ClipCapForImageToText])
@pytest.mark.parametrize("options", [{"num_beams": 3}, {"num_beams": 3, "num_return_sequences": 2},
                                     {"do_sample": True, "num_return_sequences": 2}])
def test_beams_and_returned_sequences_run_the_vision_tower_once_per_image(model, processor, images, model_class,
                                                                          options):
    captioner = model_class(model.config).eval()
    captioner.load_state_dict(model.state_dict())
    pixel_values = processor(images=images[:2])["pixel_values"]
    tower_batches = []
    hook = captioner.vision_model.register_forward_pre_hook(
        lambda module, args, kwargs: tower_batches.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    try:
        torch.manual_seed(0)
        from_pixels = captioner.generate(pixel_values=pixel_values, max_new_tokens=6, **options)
    finally:
        hook.remove()
    assert tower_batches == [2]  # not once per beam or returned sequence (6 rows)
    torch.manual_seed(0)
    from_embeds = captioner.generate(image_embeds=captioner.get_image_embeds(pixel_values), max_new_tokens=6, **options)
    assert torch.equal(from_pixels, from_embeds)


@pytest.mark.parametrize("mapping_type", ["mlp", "transformer"])
def test_beam_search_maps_each_image_once_and_scores_every_beam_from_its_own_image(tokenizer, mapping_type):
    model = tiny_model(tokenizer, mapping_type)
    x, beams = embeds(model, 2), 3
    mapped_rows = []
    hook = model.mapping_network.register_forward_hook(lambda module, args, output: mapped_rows.append(len(output)))
    try:
        # length_penalty=0: a sequence's score is the sum of its tokens' log-probabilities.
        generated = model.generate(
            image_embeds=x, max_new_tokens=6, num_beams=beams, num_return_sequences=beams, length_penalty=0.0,
            return_dict_in_generate=True, output_scores=True,
        )
    finally:
        hook.remove()
    assert mapped_rows == [2]  # the mapper ran once per image, not once per beam (6 rows)
    # Each returned sequence scored again by the forward from its own image's embedding, beams copied beforehand.
    sequences, start = generated.sequences, model.config.prefix_length
    with torch.no_grad():
        logits = model(input_ids=sequences, image_embeds=x.repeat_interleave(beams, 0)).logits
    token_logprobs = logits[:, start - 1 : -1].log_softmax(-1).gather(-1, sequences[:, start:, None]).squeeze(-1)
    eos = model.generation_config.eos_token_id
    ended = (sequences[:, start:] == eos).long().cumsum(1)
    scored = (ended == 0) | ((ended == 1) & (sequences[:, start:] == eos))  # up to and with the first EOS
    torch.testing.assert_close(generated.sequences_scores, (token_logprobs * scored).sum(1), rtol=1e-4, atol=1e-4)


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
    # Beam search scores the raw log-probabilities (before the image token is suppressed), so the greedy caption's are
    # computed from the raw logits too.
    greedy = mlp_model.generate(image_embeds=x, max_new_tokens=6, output_logits=True, return_dict_in_generate=True)
    caption = caption_tokens(mlp_model, greedy.sequences)
    greedy_logprob = torch.stack(
        [torch.log_softmax(step, -1).gather(1, caption[:, i : i + 1]).squeeze(1)
         for i, step in enumerate(greedy.logits)],
        dim=1,
    ).sum(1) / caption.shape[1]
    assert torch.all(scores[:, 0] >= greedy_logprob - 1e-4)


def test_sampling_is_reproducible_with_a_seed_and_varies_without(mlp_model):
    x = embeds(mlp_model, 1).expand(8, -1)
    torch.manual_seed(0)
    first = mlp_model.generate(image_embeds=x, max_new_tokens=8, do_sample=True, temperature=3.0)
    torch.manual_seed(0)
    second = mlp_model.generate(image_embeds=x, max_new_tokens=8, do_sample=True, temperature=3.0)
    assert torch.equal(first, second)
    assert len({tuple(row.tolist()) for row in first}) > 1


def test_the_image_token_is_never_generated(mlp_model):
    # Make the image token by far the most likely next token everywhere: decoding must still never pick it.
    image_token_id = mlp_model.config.image_token_id

    def favour_the_image_token(module, inputs, logits):
        return logits + 1000 * F.one_hot(torch.tensor(image_token_id), logits.shape[-1])

    mlp_model.get_output_embeddings().register_forward_hook(favour_the_image_token)
    x = embeds(mlp_model, 2)
    logits = mlp_model(image_embeds=x, input_ids=torch.full((2, 4), image_token_id)).logits
    assert logits[:, -1].argmax(-1).tolist() == [image_token_id] * 2
    for options in ({}, {"num_beams": 3}, {"do_sample": True, "top_k": 5}):
        captions = caption_tokens(mlp_model, mlp_model.generate(image_embeds=x, max_new_tokens=6, **options))
        assert image_token_id not in captions.flatten().tolist(), options

    # A caller's own `suppress_tokens` replaces the saved list: the image token stays suppressed, and theirs too.
    scored = {"max_new_tokens": 6, "output_scores": True, "return_dict_in_generate": True}
    for options in (
        {**scored, "suppress_tokens": [5]},
        {**scored, "suppress_tokens": [5], "use_cache": False},
        {"generation_config": GenerationConfig(**scored, suppress_tokens=[5])},
        {**scored, "suppress_tokens": []},
    ):
        out = mlp_model.generate(image_embeds=x, **options)
        assert image_token_id not in caption_tokens(mlp_model, out.sequences).flatten().tolist(), options
        suppressed = [image_token_id, 5] if options.get("suppress_tokens") != [] else [image_token_id]
        for step in out.scores:
            assert torch.all(step[:, suppressed] == -float("inf")), options


def test_prompt_is_continued(model, processor):
    x = embeds(model, 1)
    inputs = processor(text="A dog")
    prompt = inputs["input_ids"][0, model.config.prefix_length :].tolist()
    assert processor.decode(prompt) == "A dog"
    generated = model.generate(image_embeds=x, **inputs, max_new_tokens=6, min_new_tokens=6)
    assert generated[0, model.config.prefix_length :].tolist() == greedy_loop(model, x, 6, prompt_ids=prompt)


def test_left_padded_prompts_equal_prompts_alone(model, processor):
    prompts = ["", "A dog", "A red circle above a blue"]
    x = embeds(model, 3)
    batch = processor(text=prompts)
    assert batch["attention_mask"][0, 0] == 0  # left padding
    out = model.generate(image_embeds=x, **batch, max_new_tokens=6, min_new_tokens=6, output_scores=True,
                         return_dict_in_generate=True)
    for row, prompt in enumerate(prompts):
        alone = model.generate(image_embeds=x[row : row + 1], **processor(text=[prompt]), max_new_tokens=6,
                               min_new_tokens=6, output_scores=True, return_dict_in_generate=True)
        width = alone.sequences.shape[1]
        assert out.sequences[row, -width:].tolist() == alone.sequences[0].tolist()
        # The scores too: a mask that let the padding in would change them before it changed the tokens.
        for batched_step, alone_step in zip(out.scores, alone.scores):
            torch.testing.assert_close(batched_step[row], alone_step[0], atol=1e-4, rtol=1e-4)


def test_guidance_without_a_prompt_guides_against_a_caption_of_no_image(mlp_model, processor):
    # transformers' classifier-free guidance reads each row's last input token alone: an image token without its image,
    # which the model refused ("`input_ids` hold image tokens but no image was given").
    x = embeds(mlp_model, 2)
    start = mlp_model.generation_config.bos_token_id
    bare = processor(text=["", ""])
    guided = mlp_model.generate(image_embeds=x, **bare, guidance_scale=1.5, max_new_tokens=5, min_new_tokens=5)
    against_start = mlp_model.generate(image_embeds=x, **bare, guidance_scale=1.5, max_new_tokens=5,
                                       min_new_tokens=5, negative_prompt_ids=torch.tensor([[start], [start]]))
    assert guided.tolist() == against_start.tolist()
    assert guided.tolist() != mlp_model.generate(image_embeds=x, **bare, max_new_tokens=5, min_new_tokens=5).tolist()
    # With a prompt in one row, that row is guided against its last prompt token, as transformers does.
    mixed = processor(text=["", "A dog"])
    last = mixed["input_ids"][:, -1:].masked_fill(mixed["input_ids"][:, -1:] == mlp_model.config.image_token_id, start)
    assert mlp_model.generate(image_embeds=x, **mixed, guidance_scale=1.5, max_new_tokens=5).tolist() == (
        mlp_model.generate(image_embeds=x, **mixed, guidance_scale=1.5, max_new_tokens=5,
                           negative_prompt_ids=last).tolist()
    )
    # Beams and returned sequences expand the input's rows: the unconditional rows are expanded alike.
    beams = mlp_model.generate(image_embeds=x, **mixed, guidance_scale=1.5, max_new_tokens=5, num_beams=3,
                               num_return_sequences=2)
    assert beams.tolist() == mlp_model.generate(image_embeds=x, **mixed, guidance_scale=1.5, max_new_tokens=5,
                                                num_beams=3, num_return_sequences=2,
                                                negative_prompt_ids=last.repeat_interleave(3, dim=0)).tolist()


def test_a_call_continuing_a_returned_cache_with_the_image_again_continues_the_caption(mlp_model, processor):
    # transformers 5 marks a continuing call's first step first: the image went in with no image tokens and was refused.
    import copy

    inputs = processor(text="A dog")
    x = embeds(mlp_model, 1)
    whole = mlp_model.generate(image_embeds=x, **inputs, max_new_tokens=8, min_new_tokens=8)
    first = mlp_model.generate(image_embeds=x, **inputs, max_new_tokens=4, min_new_tokens=4,
                               return_dict_in_generate=True)
    cache = {CACHE_NAME: copy.deepcopy(getattr(first, CACHE_NAME))}
    rest = mlp_model.generate(image_embeds=x, input_ids=first.sequences, attention_mask=torch.ones_like(
        first.sequences), max_new_tokens=4, min_new_tokens=4, **cache)
    assert rest.tolist() == whole.tolist()


def test_stop_strings_take_the_processor_as_the_tokenizer(mlp_model, processor):
    x = embeds(mlp_model, 1)
    free = mlp_model.generate(image_embeds=x, **processor(text=""), max_new_tokens=8, min_new_tokens=8)
    caption = processor.decode(caption_tokens(mlp_model, free)[0])
    stop = caption[len(caption) // 2 :][:2]  # a string the free caption reaches midway
    assert stop.strip()
    stopped = mlp_model.generate(image_embeds=x, **processor(text=""), max_new_tokens=8, stop_strings=stop,
                                 tokenizer=processor)  # was an AttributeError: no get_vocab
    assert stopped.shape[1] < free.shape[1]
    assert processor.decode(caption_tokens(mlp_model, stopped)[0]).endswith(stop)


def test_generate_rejects_inputs_that_do_not_match_the_images(mlp_model, processor):
    x = embeds(mlp_model, 2)
    with pytest.raises(ValueError, match=r"Got 2 images for 1 text rows holding \[4\] image tokens"):
        mlp_model.generate(image_embeds=x, **processor(text="A dog"), max_new_tokens=3)
    with pytest.raises(ValueError, match=r"holding \[0, 0\] image tokens \(id 300\); each row needs exactly 4"):
        mlp_model.generate(image_embeds=x, input_ids=torch.tensor([[5, 6], [7, 8]]), max_new_tokens=3)


def test_a_given_generation_config_keeps_the_model_defaults_it_leaves_unset(mlp_model):
    x = embeds(mlp_model, 2)
    prefix_length = mlp_model.config.prefix_length
    mlp_model.generation_config.eos_token_id = None
    free_running = caption_tokens(mlp_model, mlp_model.generate(image_embeds=x, max_new_tokens=8)).tolist()
    assert free_running[0][0] not in free_running[1]
    # The first caption's first token becomes the stop token (as '.' ends the paper's captions); the second runs on.
    mlp_model.generation_config.eos_token_id = free_running[0][0]
    mlp_model.generation_config.max_new_tokens = 8
    pad = mlp_model.generation_config.pad_token_id
    expected = [free_running[0][:1] + [pad] * 7, free_running[1]]
    assert caption_tokens(mlp_model, mlp_model.generate(image_embeds=x)).tolist() == expected
    given = GenerationConfig(do_sample=False)
    assert caption_tokens(mlp_model, mlp_model.generate(image_embeds=x, generation_config=given)).tolist() == expected

    # What the caller's config sets wins; a max_length counts the image tokens.
    assert mlp_model.generate(image_embeds=x, generation_config=GenerationConfig(max_new_tokens=2)).shape == (
        2, prefix_length + 2)
    assert mlp_model.generate(
        image_embeds=x, generation_config=GenerationConfig(max_length=prefix_length + 3)
    ).shape == (2, prefix_length + 3)


def test_a_given_config_max_length_does_not_warn_that_max_new_tokens_was_also_set(mlp_model):
    # The config's max_length becomes max_new_tokens in a copy; transformers (5) warned "Both `max_new_tokens` and
    # `max_length` seem to have been set" when the copy kept the max_length too. (Its logger does not propagate.)
    x = embeds(mlp_model, 2)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger("transformers").addHandler(handler)
    try:
        given = GenerationConfig(max_length=mlp_model.config.prefix_length + 5)
        generated = mlp_model.generate(image_embeds=x, generation_config=given)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert generated.shape == (2, mlp_model.config.prefix_length + 5)
    assert given.max_new_tokens is None  # the caller's config is left as it was
    assert "max_new_tokens" not in stream.getvalue()


def test_generate_reads_the_clipcap_generation_config_not_the_language_models(mlp_model):
    # A language model checkpoint's own generation config (an instruction-tuned LM's samples, and stops at its EOS)
    # must not decide how captions are decoded; ClipCap's does.
    x = embeds(mlp_model, 2)
    mlp_model.generation_config.eos_token_id = None  # no stop token, as in the paper's decoding
    greedy = [greedy_loop(mlp_model, x[row : row + 1], 6) for row in range(2)]
    mlp_model.language_model.generation_config = GenerationConfig(
        do_sample=True, temperature=5.0, top_k=0, eos_token_id=greedy[0][0], max_new_tokens=2
    )
    for _ in range(3):
        assert caption_tokens(mlp_model, mlp_model.generate(image_embeds=x, max_new_tokens=6)).tolist() == greedy


def test_generation_after_save_and_load(tmp_path, tokenizer):
    model = tiny_model(tokenizer, "transformer")
    x = embeds(model, 2)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(
        model.generate(image_embeds=x, max_new_tokens=8), loaded.generate(image_embeds=x, max_new_tokens=8)
    )


def test_default_caption_length_and_explicit_lengths(tokenizer, tmp_path):
    # A prefix longer than transformers' default max_length (20), which counts the image tokens.
    model = tiny_model(tokenizer, "transformer", prefix_length=24)
    model.generation_config.eos_token_id = None  # every caption runs to its full length
    x = embeds(model, 2)
    assert model.generate(image_embeds=x).shape == (2, 24 + DEFAULT_MAX_NEW_TOKENS)
    assert model.generate(image_embeds=x, max_new_tokens=5).shape == (2, 24 + 5)
    assert model.generate(image_embeds=x, max_length=30).shape == (2, 30)
    # A saved config that chooses no length: ClipCap's default, as `caption_length` reports (5.x: no TypeError on a
    # None max_length; 4.x: not transformers' default max_length of 20).
    model.generation_config.max_new_tokens = None
    assert caption_length(model.generation_config, 24) == DEFAULT_MAX_NEW_TOKENS
    assert model.generate(image_embeds=x).shape == (2, 24 + DEFAULT_MAX_NEW_TOKENS)
    given = GenerationConfig(do_sample=False)  # a config of the call's own, without a length (set in a copy of it)
    assert model.generate(image_embeds=x, generation_config=given).shape == (2, 24 + DEFAULT_MAX_NEW_TOKENS)
    assert given.max_new_tokens is None
    model.generation_config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    # ... and the prompt
    prompts = tiny_processor(tokenizer, num_image_tokens=24)(text=["A dog", "Two cats"])
    prompt_tokens = [len(tokenizer(text)["input_ids"]) for text in ("A dog", "Two cats")]
    assert prompts["attention_mask"].sum(1).tolist() == [24 + length for length in prompt_tokens]
    prompt_length = prompts["input_ids"].shape[1]
    with_prompt = model.generate(image_embeds=x, **prompts, max_length=prompt_length + 4)
    assert with_prompt.tolist() == model.generate(image_embeds=x, **prompts, max_new_tokens=4).tolist()
    assert with_prompt.shape == (2, prompt_length + 4)

    # A folder saved without a caption length gets the default when loaded.
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
    assert loaded.generate(image_embeds=x).shape == (2, 27)


def test_the_image_to_text_class_refuses_generation_without_images_by_name(mlp_model, processor):
    image_to_text = ClipCapForImageToText(mlp_model.config).eval()
    batch = processor(text="A dog")
    embeddings = mlp_model.get_input_embeddings()(batch["input_ids"])
    for inputs in ({"input_ids": batch["input_ids"]}, {"inputs_embeds": embeddings}, {}):
        with pytest.raises(ValueError, match="captions images: pass `pixel_values` or `image_embeds`"):
            image_to_text.generate(**inputs, max_new_tokens=2)
    with pytest.raises(ValueError, match="For text alone or `inputs_embeds`, use ClipCapForConditionalGeneration"):
        image_to_text.generate(inputs_embeds=embeddings, image_embeds=embeds(mlp_model, 1), max_new_tokens=2)


def test_inputs_is_the_main_input_as_in_transformers_generate(mlp_model, processor, images, tokenizer):
    # `generate(inputs=...)` is transformers' name for the main input: `input_ids` here, `pixel_values` for the
    # image-to-text class.
    x = embeds(mlp_model, 1)
    batch = processor(text="A dog")
    prompt = batch["input_ids"][0, mlp_model.config.prefix_length :].tolist()
    generated = mlp_model.generate(inputs=batch["input_ids"], image_embeds=x, max_new_tokens=6, min_new_tokens=6)
    assert generated[0, mlp_model.config.prefix_length :].tolist() == greedy_loop(mlp_model, x, 6, prompt_ids=prompt)
    with pytest.raises(ValueError, match="`inputs` is `input_ids` for this model: pass one of them, not both"):
        mlp_model.generate(inputs=batch["input_ids"], input_ids=batch["input_ids"], image_embeds=x)

    image_to_text = ClipCapForImageToText(mlp_model.config).eval()
    image_to_text.load_state_dict(mlp_model.state_dict())
    pixel_values = processor(images=images[:2])["pixel_values"]
    assert torch.equal(image_to_text.generate(inputs=pixel_values, max_new_tokens=5),
                       mlp_model.generate(pixel_values=pixel_values, max_new_tokens=5))


def test_image_to_text_class_writes_image_tokens_in_front_of_a_prompt_without_them(mlp_model, processor, images):
    # transformers 4.57's image-to-text pipeline passes `prompt=` as the tokenizer's ids, without image tokens.
    image_to_text = ClipCapForImageToText(mlp_model.config).eval()
    image_to_text.load_state_dict(mlp_model.state_dict())
    batch = processor(images=images[:2], text=["A dog", "A dog"])
    prompt = processor.tokenizer(["A dog", "A dog"], add_special_tokens=False, return_tensors="pt")
    expected = mlp_model.generate(**batch, max_new_tokens=5, min_new_tokens=5)
    generated = image_to_text.generate(batch["pixel_values"], **prompt, max_new_tokens=5, min_new_tokens=5)
    assert torch.equal(generated, expected)
    # The prompt conditions the caption.
    assert not torch.equal(generated[:, batch["input_ids"].shape[1]:],
                           image_to_text.generate(batch["pixel_values"], max_new_tokens=5, min_new_tokens=5)[:, 4:])


def test_image_to_text_class_drops_the_bos_a_tokenizer_adds_in_front_of_a_prompt(mlp_model, processor, images):
    # transformers 4.57's image-to-text pipeline tokenizes `prompt=` with special tokens: OPT's and Llama's
    # tokenizers put a BOS in front, which the processor leaves out. Left-padded rows of other lengths move alike.
    image_to_text = ClipCapForImageToText(mlp_model.config).eval()
    image_to_text.load_state_dict(mlp_model.state_dict())
    prompts = ["A dog", "A small red dog"]
    batch = processor(images=images[:2], text=prompts)
    bos, pad = mlp_model.config.text_config.bos_token_id, processor.tokenizer.pad_token_id or 0
    rows = [[bos, *processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]] for prompt in prompts]
    width = max(map(len, rows))
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    expected = mlp_model.generate(**batch, max_new_tokens=5, min_new_tokens=5, output_scores=True,
                                  return_dict_in_generate=True)
    generated = image_to_text.generate(batch["pixel_values"], input_ids=input_ids, attention_mask=attention_mask,
                                       max_new_tokens=5, min_new_tokens=5, output_scores=True,
                                       return_dict_in_generate=True)
    # (The image tokens go before the padding here, after it there: the positions, counted from the mask, agree.)
    assert torch.equal(generated.sequences[:, -5:], expected.sequences[:, -5:])
    torch.testing.assert_close(torch.stack(generated.scores), torch.stack(expected.scores))
    assert generated.sequences.shape == expected.sequences.shape  # the BOS is gone, not masked in place


def test_caption_lengths_beyond_a_learned_position_table_are_refused_before_decoding(mlp_model, processor, caplog):
    # The tiny GPT-2 has 128 learned positions; the input takes 4 image tokens and the prompt.
    x = embeds(mlp_model, 1)
    mlp_model.generation_config.eos_token_id = None  # every caption runs to its full length
    batch = processor(text="A dog")
    input_length = batch["input_ids"].shape[1]
    room = 128 - input_length
    assert mlp_model.generate(image_embeds=x, **batch, max_new_tokens=room).shape == (1, 128)
    with pytest.raises(ValueError, match=rf"`max_new_tokens={room + 1}` needs 129 positions .* the language model has "
                                         rf"128 \(max_position_embeddings\), room for {room} new tokens; give "
                                         rf"max_new_tokens <= {room}\."):
        mlp_model.generate(image_embeds=x, **batch, max_new_tokens=room + 1)
    with pytest.raises(ValueError, match=r"`max_length=300` needs 300 positions.*give max_length <= 128\."):
        mlp_model.generate(image_embeds=x, **batch, max_length=300)
    # A generation config's length (a pipeline's default: 256 on 4.57's image-to-text) is cut to the room, warning.
    with caplog.at_level(logging.WARNING, logger="clipcap_hf.modeling_clipcap"):
        capped = mlp_model.generate(image_embeds=x, **batch, generation_config=GenerationConfig(max_new_tokens=200))
    assert torch.equal(capped, mlp_model.generate(image_embeds=x, **batch, max_new_tokens=room))
    assert f"generation_config.max_new_tokens asks for 200 new tokens, but the language model has room for {room}" in (
        caplog.text
    )
    # A max_length within the input is named as such, not as a negative max_new_tokens.
    for options in ({"max_length": 3}, {"generation_config": GenerationConfig(max_length=3)}):
        with pytest.raises(ValueError, match=rf"`max_length=3` leaves no room to generate: it counts the input's "
                                             rf"{input_length} tokens"):
            mlp_model.generate(image_embeds=x, **batch, **options)


def test_rotary_language_models_generate_past_max_position_embeddings(tokenizer, processor):
    # Rotary positions have no table to run off: transformers generates past max_position_embeddings, and so does this.
    text_config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8,
                              bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = ClipCapForConditionalGeneration(tiny_config(tokenizer, text_config=text_config)).eval()
    model.generation_config.eos_token_id = None
    x = embeds(model, 1)
    generated = model.generate(image_embeds=x, max_new_tokens=10)
    assert generated.shape == (1, 4 + 10)
    assert caption_tokens(model, generated)[0].tolist() == greedy_loop(model, x, 10)
