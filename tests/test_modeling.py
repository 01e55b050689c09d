import pytest
import torch
import torch.nn.functional as F
from conftest import greedy_loop, random_images, tiny_config, tiny_model
from torch.overrides import TorchFunctionMode
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    CLIPConfig,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
)
from transformers.activations import GELUTanh, NewGELUActivation

from clipcap_hf import ClipCapCausalLMOutputWithPast, ClipCapConfig, ClipCapForConditionalGeneration
from clipcap_hf.modeling_clipcap import CACHE_NAME


def image_embeds_for(model, count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, model.config.prefix_dim, generator=generator)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("mapping_type", ["mlp", "transformer"])
def test_config_round_trip(tmp_path, tokenizer, mapping_type):
    config = tiny_config(tokenizer, mapping_type, prefix_length=7, normalize_prefix=True)
    config.save_pretrained(tmp_path)
    loaded = ClipCapConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert type(loaded.text_config) is type(config.text_config)
    assert loaded.vision_config.projection_dim == 24
    assert (loaded.prefix_length, loaded.normalize_prefix, loaded.prefix_dim) == (7, True, 24)
    assert loaded.clip_length == (7 if mapping_type == "transformer" else None)


def test_config_defaults_are_the_paper_mlp_variant():
    config = ClipCapConfig()
    assert (config.mapping_type, config.prefix_length, config.prefix_dim) == ("mlp", 10, 512)
    assert config.text_config.model_type == "gpt2" and config.text_config.n_embd == 768
    assert config.vision_config.patch_size == 32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mapping_type": "lstm"}, "`mapping_type` must be one of ('mlp', 'transformer'), got 'lstm'"),
        ({"prefix_length": 0}, "`prefix_length` must be a positive integer, got 0"),
        ({"prefix_length": 1024}, "`prefix_length` (1024) leaves no position for text: the language model has 1024"),
        ({"mapping_type": "mlp", "clip_length": 10}, "`clip_length` is only used by mapping_type='transformer'"),
        ({"mapping_type": "transformer", "clip_length": -1}, "`clip_length` must be a positive integer, got -1"),
        ({"mapping_type": "transformer", "mapping_num_heads": 5}, "`mapping_num_heads` (5) must divide"),
        ({"mapping_num_layers": 2.5}, "`mapping_num_layers` must be a positive integer, got 2.5"),
        ({"prefix_dim": 0}, "`prefix_dim` must be a positive integer, got 0"),
        # The default CLIP tower gives 512-d embeddings: a mapper reading 32 would fail on the first image.
        ({"prefix_dim": 32}, "`prefix_dim` (32) differs from the width of the vision tower's image embeddings (512, "
                             "vision_pooling='projection')"),
        ({"image_token_id": 100.0}, "`image_token_id` must be a token id (an integer >= 0), got 100.0"),
        ({"image_token_id": "100"}, "`image_token_id` must be a token id (an integer >= 0), got '100'"),
        ({"normalize_prefix": "yes"}, "`normalize_prefix` must be True or False"),
        ({"text_config": {"n_embd": 8}}, "needs a `model_type` key"),
        ({"image_token_id": 50256}, "`image_token_id` (50256) is also the language model's bos_token_id (50256) and "
                                    "eos_token_id (50256); the image token needs an id of its own"),
        ({"text_config": {"model_type": "gpt2", "pad_token_id": 7}, "image_token_id": 7}, "pad_token_id (7)"),
    ],
)
def test_config_rejects_invalid_values(kwargs, message):
    with pytest.raises(ValueError) as error:
        ClipCapConfig(**kwargs)
    assert message in str(error.value)


# ---------------------------------------------------------------- mapping networks


def test_mlp_mapper_has_the_released_checkpoint_layout(tokenizer):
    model = tiny_model(tokenizer, "mlp")
    shapes = {name: tuple(p.shape) for name, p in model.mapping_network.state_dict().items()}
    k, h, d = 4, 32, 24
    assert shapes == {
        "model.0.weight": (k * h // 2, d),
        "model.0.bias": (k * h // 2,),
        "model.2.weight": (k * h, k * h // 2),
        "model.2.bias": (k * h,),
    }
    assert isinstance(model.mapping_network.model[1], torch.nn.Tanh)


def test_transformer_mapper_has_the_released_checkpoint_layout(tokenizer):
    model = tiny_model(tokenizer, "transformer", prefix_length=3, clip_length=5)
    shapes = {name: tuple(p.shape) for name, p in model.mapping_network.state_dict().items()}
    h, d = 32, 24
    expected = {"linear.weight": (5 * h, d), "linear.bias": (5 * h,), "prefix_const": (3, h)}
    for i in range(2):
        layer = f"transformer.layers.{i}."
        expected.update(
            {
                layer + "norm1.weight": (h,),
                layer + "norm1.bias": (h,),
                layer + "attn.to_queries.weight": (h, h),
                layer + "attn.to_keys_values.weight": (2 * h, h),
                layer + "attn.project.weight": (h, h),
                layer + "attn.project.bias": (h,),
                layer + "norm2.weight": (h,),
                layer + "norm2.bias": (h,),
                layer + "mlp.fc1.weight": (2 * h, h),
                layer + "mlp.fc1.bias": (2 * h,),
                layer + "mlp.fc2.weight": (h, 2 * h),
                layer + "mlp.fc2.bias": (h,),
            }
        )
    assert shapes == expected


def reference_transformer_mapper(state, x, clip_length, num_heads, num_layers):
    """The paper's TransformerMapper written out from its state dict with einsum, as the original code computes it."""
    b = x.shape[0]
    h = state["prefix_const"].shape[1]
    seq = torch.cat((F.linear(x, state["linear.weight"], state["linear.bias"]).view(b, clip_length, h),
                     state["prefix_const"].unsqueeze(0).expand(b, -1, -1)), dim=1)
    for i in range(num_layers):
        p = f"transformer.layers.{i}."
        y = F.layer_norm(seq, (h,), state[p + "norm1.weight"], state[p + "norm1.bias"])
        n = y.shape[1]
        q = F.linear(y, state[p + "attn.to_queries.weight"]).reshape(b, n, num_heads, h // num_heads)
        kv = F.linear(y, state[p + "attn.to_keys_values.weight"]).reshape(b, n, 2, num_heads, h // num_heads)
        keys, values = kv[:, :, 0], kv[:, :, 1]
        attention = torch.einsum("bnhd,bmhd->bnmh", q, keys) * (h // num_heads) ** -0.5
        attention = attention.softmax(dim=2)
        out = torch.einsum("bnmh,bmhd->bnhd", attention, values).reshape(b, n, h)
        seq = seq + F.linear(out, state[p + "attn.project.weight"], state[p + "attn.project.bias"])
        y = F.layer_norm(seq, (h,), state[p + "norm2.weight"], state[p + "norm2.bias"])
        y = F.linear(F.relu(F.linear(y, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"])),
                     state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
        seq = seq + y
    return seq[:, clip_length:]


def test_transformer_mapper_matches_the_paper_computation(tokenizer):
    model = tiny_model(tokenizer, "transformer", prefix_length=3, clip_length=5)
    x = image_embeds_for(model, 2)
    ours = model.mapping_network(x)
    reference = reference_transformer_mapper(model.mapping_network.state_dict(), x, 5, 4, 2)
    assert ours.shape == (2, 3, 32)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_mlp_mapper_matches_the_paper_computation(tokenizer):
    model = tiny_model(tokenizer, "mlp")
    state = model.mapping_network.state_dict()
    x = image_embeds_for(model, 2)
    hidden = torch.tanh(F.linear(x, state["model.0.weight"], state["model.0.bias"]))
    reference = F.linear(hidden, state["model.2.weight"], state["model.2.bias"]).view(2, 4, 32)
    torch.testing.assert_close(model.mapping_network(x), reference)


# ---------------------------------------------------------------- forward


def test_pixel_values_and_image_embeds_give_the_same_output(model, processor, images):
    inputs = processor(images=images, text="A dog")
    from_pixels = model(**inputs)
    embeds = model.get_image_embeds(inputs["pixel_values"])
    from_embeds = model(image_embeds=embeds, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert isinstance(from_pixels, ClipCapCausalLMOutputWithPast)
    # Every output counts the positions of `input_ids`, image tokens included.
    assert from_pixels.logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
    assert from_pixels.image_outputs.pooler_output.shape == (3, model.config.prefix_length, 32)
    torch.testing.assert_close(from_pixels.image_outputs.image_embeds, embeds)
    torch.testing.assert_close(from_pixels.logits, from_embeds.logits)


def test_prefix_goes_in_at_the_image_tokens(model, processor):
    # The language model run by hand on embeddings built here: the prefix vectors at the image tokens' places.
    inputs = processor(text=["A dog", "Two red cats"])
    x = image_embeds_for(model, 2)
    embeddings = model.get_input_embeddings()(inputs["input_ids"])
    image_positions = inputs["input_ids"] == model.config.image_token_id
    assert image_positions.sum(1).tolist() == [model.config.prefix_length] * 2
    embeddings[image_positions] = model.get_prefix_embeds(image_embeds=x).reshape(-1, 32)
    expected = model.language_model(inputs_embeds=embeddings, attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(model(image_embeds=x, **inputs).logits, expected)
    # `inputs_embeds` holding the image tokens' embeddings take the prefix the same way.
    from_embeddings = model(image_embeds=x, inputs_embeds=model.get_input_embeddings()(inputs["input_ids"]),
                            attention_mask=inputs["attention_mask"])
    torch.testing.assert_close(from_embeddings.logits, expected)
    # The prefix vectors given themselves go in the same way, and `generate` writes their image tokens.
    prefix = model.get_prefix_embeds(image_embeds=x)
    torch.testing.assert_close(model(prefix_embeds=prefix, **inputs).logits, expected)
    assert torch.equal(model.generate(prefix_embeds=prefix, max_new_tokens=5),
                       model.generate(image_embeds=x, max_new_tokens=5))


def test_prefix_vectors_with_an_image_or_of_the_wrong_width_are_refused(model, processor):
    inputs = processor(text=["A dog", "Two red cats"])
    x = image_embeds_for(model, 2)
    prefix = model.get_prefix_embeds(image_embeds=x)
    with pytest.raises(ValueError, match="Pass `prefix_embeds` .* instead of `pixel_values` or `image_embeds`"):
        model(prefix_embeds=prefix, image_embeds=x, **inputs)
    with pytest.raises(ValueError, match=r"must have shape \(images, 4, 32\) .* got \(2, 4, 16\)"):
        model(prefix_embeds=prefix[..., :16], **inputs)


def test_image_features_as_transformers_vision_language_models_return_them(model, processor, images):
    pixel_values = processor(images=images)["pixel_values"]
    features = model.get_image_features(pixel_values=pixel_values, output_hidden_states=True)
    torch.testing.assert_close(features.image_embeds, model.get_image_embeds(pixel_values))
    torch.testing.assert_close(features.pooler_output, model.mapping_network(features.image_embeds))
    tower = model.vision_model(pixel_values=pixel_values, output_hidden_states=True)
    torch.testing.assert_close(features.last_hidden_state, tower.last_hidden_state)
    assert len(features.hidden_states) == len(tower.hidden_states)
    as_tuple = model.get_image_features(pixel_values=pixel_values, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], features.last_hidden_state)


def test_position_ids_given_with_an_image(model, processor):
    # Once crashed: position ids over the text alone met inputs that had the prefix in front.
    inputs = processor(text=["A dog", "A cat"])
    assert bool(inputs["attention_mask"].all())
    x = image_embeds_for(model, 2)
    position_ids = torch.arange(inputs["input_ids"].shape[1]).expand(2, -1)
    torch.testing.assert_close(model(image_embeds=x, **inputs, position_ids=position_ids).logits,
                               model(image_embeds=x, **inputs).logits)
    shifted = model(image_embeds=x, **inputs, position_ids=position_ids + 3).logits
    assert not torch.allclose(shifted, model(image_embeds=x, **inputs).logits)
    # generate with caller position ids: test_conformance.py


def test_normalize_prefix_divides_by_the_l2_norm(tokenizer):
    model = tiny_model(tokenizer, "mlp", normalize_prefix=True)
    x = image_embeds_for(model, 2)
    expected = model.mapping_network(x / x.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(model.get_prefix_embeds(image_embeds=x * 3.0), expected)


def test_an_image_needs_exactly_one_image_input_and_text_alone_is_the_language_model(mlp_model, processor):
    x = image_embeds_for(mlp_model, 1)
    image_tokens = processor(text="")["input_ids"]
    with pytest.raises(ValueError, match="exactly one of `pixel_values`.*got both"):
        mlp_model(pixel_values=torch.zeros(1, 3, 32, 32), image_embeds=x, input_ids=image_tokens)
    # Without an image the tokens go to the language model as they are, as for transformers' vision-language models.
    tokens = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(mlp_model(input_ids=tokens).logits, mlp_model.language_model(input_ids=tokens).logits)
    # ... which is how decoding continues from the cache of an image's step.
    cached = mlp_model(image_embeds=x, input_ids=image_tokens, use_cache=True)
    continued = mlp_model(input_ids=tokens[:, :1], **{CACHE_NAME: getattr(cached, CACHE_NAME)}).logits[:, -1]
    recomputed = mlp_model(image_embeds=x, input_ids=torch.cat((image_tokens, tokens[:, :1]), 1)).logits[:, -1]
    torch.testing.assert_close(continued, recomputed, atol=1e-5, rtol=1e-5)


def test_a_lone_image_token_without_an_image_is_refused_unless_it_continues_a_cache(tokenizer):
    model = tiny_model(tokenizer, prefix_length=1)
    image_token = torch.tensor([[model.config.image_token_id]])
    with pytest.raises(ValueError, match="`input_ids` hold image tokens but no image was given"):
        model(input_ids=image_token)
    cached = model(image_embeds=image_embeds_for(model, 1), input_ids=image_token, use_cache=True)
    assert model(input_ids=torch.tensor([[5]]), **{CACHE_NAME: getattr(cached, CACHE_NAME)}).logits.shape[1] == 1


def test_wrong_embedding_width_names_both_sizes(mlp_model, processor):
    with pytest.raises(ValueError) as error:
        mlp_model(image_embeds=torch.zeros(2, 512), **processor(text=["", ""]))
    assert "(batch_size, 24)" in str(error.value) and "(2, 512)" in str(error.value)


def test_image_tokens_must_match_the_images(mlp_model, processor):
    x = image_embeds_for(mlp_model, 2)
    with pytest.raises(ValueError, match=r"Got 2 images for 3 text rows") as refused:
        mlp_model(image_embeds=x, **processor(text=["", "", ""]))
    assert "inputs_embeds" not in str(refused.value)  # the image tokens were read from input_ids
    with pytest.raises(ValueError, match=r"holding \[4, 0\] image tokens"):
        mlp_model(image_embeds=x, input_ids=torch.cat((processor(text="")["input_ids"], torch.ones(1, 4).long())))
    # Found in inputs_embeds, the image tokens are the rows equal to the image token's embedding: a text token that
    # shares it (a zero padding row, when the image token's row is a zero one) counts too, and the fix is named.
    inputs = processor(text=["A dog", "A cat"])
    inputs_embeds = mlp_model.get_input_embeddings()(inputs["input_ids"])
    inputs_embeds[1, -1] = mlp_model.get_input_embeddings().weight[mlp_model.config.image_token_id]
    with pytest.raises(ValueError, match=r"holding \[4, 5\] image tokens.* found in `inputs_embeds` by the image "
                                         r"token's embedding, which other tokens may share .*: pass `input_ids`"):
        mlp_model(image_embeds=x, inputs_embeds=inputs_embeds, attention_mask=inputs["attention_mask"])


def test_pixels_given_as_generate_s_first_argument_are_named(mlp_model, processor):
    # They reached the token embedding as input_ids, which raised a bare dtype error there.
    pixel_values = processor(images=random_images(1))["pixel_values"]
    with pytest.raises(ValueError, match=r"^`input_ids` \(generate's first argument\) holds floats, shape "
                                         r"\(1, 3, 32, 32\): pass images by name, `generate\(pixel_values=...\)`"):
        mlp_model.generate(pixel_values, max_new_tokens=2)


def test_pixels_given_as_a_list_to_generate_without_input_ids_are_named(mlp_model, processor):
    # generate read their batch size to write the image tokens before the model checked them: a bare AttributeError.
    pixel_values = processor(images=random_images(1))["pixel_values"]
    with pytest.raises(ValueError) as error:
        mlp_model.generate(pixel_values=[pixel_values[0]], max_new_tokens=2)
    assert str(error.value) == (
        "`pixel_values` must be a floating-point torch tensor of shape (batch_size, 3, height, width), normalised as "
        "the vision tower reads them; got list. Make them with this model's processor (ClipCapProcessor / "
        "AutoProcessor): `processor(images=images)`."
    )


@pytest.mark.parametrize("image_input", ["pixel_values", "image_embeds"])
def test_chunked_prefill_over_an_image_is_refused_naming_the_option(mlp_model, processor, image_input):
    # The image's prefix goes in with one pass. A chunk as long as the input still split it on transformers 4.57,
    # which chunks all but the input's last token (4 image tokens alone: a chunk of 3).
    inputs = processor(images=random_images(2), text=["A dog runs on the beach", "Two"])
    images_alone = {"pixel_values": inputs["pixel_values"]}
    if image_input == "image_embeds":
        inputs["image_embeds"] = mlp_model.get_image_embeds(inputs.pop("pixel_values"))
        images_alone = {"image_embeds": inputs["image_embeds"]}
    for given, chunk_size in ((inputs, 6), (images_alone, 100)):
        with pytest.raises(ValueError, match=rf"^prefill_chunk_size={chunk_size} splits the first pass over the "
                                             r"input into chunks, .* leave prefill_chunk_size unset when generating"):
            mlp_model.generate(**given, max_new_tokens=3, prefill_chunk_size=chunk_size)


def test_input_beyond_the_position_table_names_the_lengths_and_the_fix(mlp_model, processor):
    x = image_embeds_for(mlp_model, 1)
    image_tokens = processor(text="")["input_ids"]  # 4 of GPT-2's 128 positions
    fitting = torch.cat((image_tokens, torch.full((1, 124), 5)), 1)
    assert mlp_model(image_embeds=x, input_ids=fitting).logits.shape[1] == 128
    with pytest.raises(ValueError, match=r"129 positions.*128 \(max_position_embeddings\).*at most 124 tokens.*"
                                         r"`max_caption_length`"):
        mlp_model(image_embeds=x, input_ids=torch.cat((fitting, fitting[:, -1:]), 1))
    # Cached positions count too: a decoding step past the table.
    cached = mlp_model(image_embeds=x, input_ids=fitting[:, :-1], use_cache=True)
    with pytest.raises(ValueError, match=r"129 positions"):
        mlp_model(input_ids=fitting[:, -2:], **{CACHE_NAME: getattr(cached, CACHE_NAME)})


def test_labels_alone_give_the_loss_of_the_captions_they_hold(tokenizer, processor):
    model = tiny_model(tokenizer)
    batch = processor(captions=["A dog runs on the beach.", "Two cats sleep!"])  # the second one is padded
    assert (batch["labels"][:, model.config.prefix_length :] == -100).any()
    x = image_embeds_for(model, 2)
    for training in (False, True):  # the full forward, and the training path's LM head at labelled positions
        model.train(training)
        torch.manual_seed(0)
        expected = model(image_embeds=x, **batch).loss
        torch.manual_seed(0)
        torch.testing.assert_close(model(image_embeds=x, labels=batch["labels"]).loss, expected)


def test_labels_alone_must_be_the_processors(mlp_model, processor):
    batch = processor(captions=["A dog runs on the beach.", "Two cats sleep!"])
    x = image_embeds_for(mlp_model, 2)
    # A -100 before a target is an input that is not a target (a masked prompt): labels alone cannot give it back.
    prompt_masked = batch["labels"].clone()
    prompt_masked[:, mlp_model.config.prefix_length] = -100
    with pytest.raises(ValueError, match=r"`labels` without `input_ids` must be the processor's"):
        mlp_model(image_embeds=x, labels=prompt_masked)


def test_image_tokens_are_never_targets(mlp_model, processor):
    # `labels=input_ids`, the usual causal LM idiom, trains on the caption tokens only.
    batch = processor(captions=["A dog runs on the beach.", "Two cats sleep!"])
    x = image_embeds_for(mlp_model, 2)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.testing.assert_close(
        mlp_model(image_embeds=x, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  labels=labels).loss,
        mlp_model(image_embeds=x, **batch).loss,
    )


def test_return_dict_false_gives_a_tuple(tokenizer, processor):
    model = tiny_model(tokenizer)
    batch = processor(captions=["A dog runs on the beach.", "Two cats sleep!"])
    x = image_embeds_for(model, 2)
    expected = model(image_embeds=x, **batch)
    outputs = model(image_embeds=x, **batch, return_dict=False)
    assert isinstance(outputs, tuple)
    torch.testing.assert_close(outputs[:2], (expected.loss, expected.logits))
    model.config.return_dict = False  # the config's setting applies when the call gives none
    torch.testing.assert_close(model(image_embeds=x, **batch)[:2], (expected.loss, expected.logits))


def test_loss_counts_caption_tokens_only(model, processor):
    batch = processor(captions=["A dog runs on the beach.", "Two cats sleep!"])
    x = image_embeds_for(model, 2)
    outputs = model(image_embeds=x, **batch)
    k = model.config.prefix_length
    # Position k-1+j (the last image token, then each caption token) predicts caption token j.
    losses = []
    for row in range(2):
        length = int(batch["attention_mask"][row].sum()) - k
        logits = outputs.logits[row, k - 1 : k - 1 + length]
        losses.append(F.cross_entropy(logits, batch["input_ids"][row, k : k + length], reduction="none"))
    expected = torch.cat(losses).mean()
    torch.testing.assert_close(outputs.loss, expected)

    # Whatever token sits in the padding, the loss does not change.
    altered = batch["input_ids"].clone()
    altered[batch["attention_mask"] == 0] = 7
    again = model(image_embeds=x, input_ids=altered, attention_mask=batch["attention_mask"], labels=batch["labels"])
    torch.testing.assert_close(again.loss, outputs.loss)


def test_logits_to_keep_trims_logits_and_loss_stays_equal(mlp_model, processor):
    batch = processor(captions=["A dog runs on the beach.", "Two cats sleep!"])
    x = image_embeds_for(mlp_model, 2)
    full = mlp_model(image_embeds=x, **batch)
    caption_length = batch["input_ids"].shape[1] - mlp_model.config.prefix_length
    trimmed = mlp_model(image_embeds=x, **batch, logits_to_keep=caption_length + 1)
    torch.testing.assert_close(trimmed.logits, full.logits[:, -(caption_length + 1) :])
    torch.testing.assert_close(trimmed.loss, full.loss)
    # One fewer drops the position that predicts the first caption token: no partial loss.
    with pytest.raises(ValueError, match=r"`logits_to_keep=\d+` drops logits the loss needs"):
        mlp_model(image_embeds=x, **batch, logits_to_keep=caption_length)


def test_vision_tower_is_frozen_and_language_model_freezing_is_explicit(mlp_model, processor):
    assert not any(p.requires_grad for p in mlp_model.vision_model.parameters())
    assert all(p.requires_grad for p in mlp_model.language_model.parameters())
    mlp_model.freeze_language_model()
    mlp_model.train()
    assert mlp_model.training and mlp_model.mapping_network.training
    assert not mlp_model.language_model.training and not mlp_model.vision_model.training

    batch = processor(captions=["A dog runs."])
    outputs = mlp_model(pixel_values=torch.randn(1, 3, 32, 32), **batch)
    outputs.loss.backward()
    assert all(p.grad is None for p in mlp_model.vision_model.parameters())
    assert all(p.grad is None for p in mlp_model.language_model.parameters())
    assert all(p.grad is not None for p in mlp_model.mapping_network.parameters())

    mlp_model.freeze_language_model(False)
    assert mlp_model.language_model.training


@pytest.mark.parametrize("mapping_type", ["mlp", "transformer"])
def test_save_and_load_round_trip(tmp_path, tokenizer, mapping_type):
    model = tiny_model(tokenizer, mapping_type)
    model.save_pretrained(tmp_path)
    loaded = ClipCapForConditionalGeneration.from_pretrained(tmp_path).eval()
    for (name, tensor), (other_name, other) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == other_name
        assert torch.equal(tensor, other), name
    assert not any(p.requires_grad for p in loaded.vision_model.parameters())
    # GPT-2's output layer stays tied to its input embeddings after loading.
    assert loaded.language_model.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()


# ---------------------------------------------------------------- other language model families


def other_lm_config(kind, tokenizer):
    common = dict(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if kind == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, **common)
    # "opt_narrow" embeds tokens 16-d and projects them to its 32-d hidden states, as facebook/opt-350m does.
    return OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=128, word_embed_proj_dim=16 if kind == "opt_narrow" else 32, **common)


@pytest.mark.parametrize("kind", ["llama", "opt", "opt_narrow"])
def test_other_language_model_families(kind, tokenizer, processor):
    model = tiny_model(tokenizer, "transformer", text_config=other_lm_config(kind, tokenizer))
    assert model.language_model.config.model_type == kind.removesuffix("_narrow")
    width = 16 if kind == "opt_narrow" else 32
    assert model.get_prefix_embeds(image_embeds=image_embeds_for(model, 1)).shape == (1, 4, width)
    batch = processor(captions=["A dog runs on the beach.", "Two cats sleep!"])
    x = image_embeds_for(model, 2)
    outputs = model(image_embeds=x, **batch)
    assert torch.isfinite(outputs.loss)
    generated = model.generate(image_embeds=x, max_new_tokens=5, min_new_tokens=5)
    for row in range(2):
        assert generated[row, 4:].tolist() == greedy_loop(model, x[row : row + 1], 5)


def test_parts_given_to_the_constructor_bring_their_configs(tmp_path, tokenizer, processor):
    # A config describing other parts than the ones given (2 LM layers vs 3, a 32-d tower vs 48-d) would save a
    # folder that loads into other parts.
    config = tiny_config(tokenizer, "transformer")
    language_model = AutoModelForCausalLM.from_config(
        GPT2Config(n_layer=3, n_embd=16, n_head=2, n_positions=64, vocab_size=len(tokenizer))
    )
    vision_model = CLIPVisionModelWithProjection(
        CLIPVisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         image_size=32, patch_size=8, projection_dim=24)
    )
    model = ClipCapForConditionalGeneration(config, vision_model=vision_model, language_model=language_model).eval()
    assert model.config.text_config.n_layer == 3 and model.config.vision_config.hidden_size == 48
    assert model.get_prefix_embeds(image_embeds=image_embeds_for(model, 1)).shape == (1, 4, 16)
    model.save_pretrained(tmp_path)
    loaded = ClipCapForConditionalGeneration.from_pretrained(tmp_path).eval()
    pixel_values = processor(images=random_images(2))["pixel_values"]
    torch.testing.assert_close(loaded.get_image_embeds(pixel_values), model.get_image_embeds(pixel_values))
    assert loaded.generate(pixel_values=pixel_values, max_new_tokens=5).tolist() == model.generate(
        pixel_values=pixel_values, max_new_tokens=5
    ).tolist()

    # The transformer mapper's heads must still divide the given language model's width.
    with pytest.raises(ValueError, match=r"`mapping_num_heads` \(4\) must divide .* width \(18\)"):
        ClipCapForConditionalGeneration(
            config, language_model=AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=18, n_head=2))
        )


def test_a_given_vision_tower_that_gives_other_image_embeddings_than_the_mapper_reads_is_refused(tokenizer):
    # Accepted, it failed at its first image (a shape error), and a SigLIP tower saved a folder that did not load.
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = tiny_config(tokenizer)  # a CLIP tower's 24-d projection
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                 patch_size=8)
    wider = CLIPVisionModelWithProjection(CLIPVisionConfig(**tower, projection_dim=48))
    with pytest.raises(ValueError, match=r"gives 48-d image embeddings \(vision_pooling='projection'\), but the "
                                         r"mapping network reads config.prefix_dim=24\. Build the config from this"):
        ClipCapForConditionalGeneration(config, vision_model=wider)
    with pytest.raises(ValueError, match=r"does not fit the config: `vision_pooling` must be one of \('pooled',\) "
                                         r"for a 'siglip_vision_model' tower, got 'projection'\. Build the config"):
        ClipCapForConditionalGeneration(config, vision_model=SiglipVisionModel(SiglipVisionConfig(**tower)))
    # CLIP's tower without its projection, and a ViT without the pooler its pooling reads, have the right configs.
    from transformers import CLIPVisionModel, ViTConfig, ViTModel

    with pytest.raises(ValueError, match=r"is a CLIPVisionModel, and vision_pooling='projection' reads a "
                                         r"CLIPVisionModelWithProjection's image embeddings"):
        ClipCapForConditionalGeneration(config, vision_model=CLIPVisionModel(CLIPVisionConfig(**tower)))
    vit_config = ViTConfig(**tower)
    pooled = ClipCapConfig(vision_config=vit_config, vision_pooling="pooled", text_config=config.text_config,
                           prefix_length=config.prefix_length, image_token_id=config.image_token_id)
    with pytest.raises(ValueError, match=r"has no pooler, which vision_pooling='pooled' reads: build it with "
                                         r"add_pooling_layer=True, or use vision_pooling='cls'"):
        ClipCapForConditionalGeneration(pooled, vision_model=ViTModel(vit_config, add_pooling_layer=False))
    assert ClipCapForConditionalGeneration(pooled, vision_model=ViTModel(vit_config)).config.prefix_dim == 32
    assert config.vision_config.projection_dim == 24  # the config was left as it was
    # A model with a head, or a whole SigLIP, around the tower the config describes: taken, they failed at their
    # first image, and the saved folder loaded back a tower without its weights.
    from transformers import SiglipConfig, SiglipModel, ViTForImageClassification

    cls = ClipCapConfig(vision_config=vit_config, vision_pooling="cls", text_config=config.text_config,
                        prefix_length=config.prefix_length, image_token_id=config.image_token_id)
    siglip = SiglipModel(SiglipConfig(vision_config=tower, text_config={"hidden_size": 32, "intermediate_size": 64,
                                                                        "num_hidden_layers": 1,
                                                                        "num_attention_heads": 4}))
    siglip_config = ClipCapConfig(vision_config=siglip.config.vision_config, text_config=config.text_config,
                                  prefix_length=config.prefix_length, image_token_id=config.image_token_id)
    classifier = ViTForImageClassification(vit_config)
    for wrapped, kind, fitting in ((classifier, cls, classifier.vit),
                                   (siglip, siglip_config, SiglipVisionModel(siglip.config.vision_config))):
        wanted = type(fitting).__name__
        with pytest.raises(ValueError, match=rf"is a {type(wrapped).__name__}, and vision_pooling='(cls|pooled)' "
                                             rf"reads a {wanted}'s image embeddings: give a {wanted}"):
            ClipCapForConditionalGeneration(kind, vision_model=wrapped)
        ClipCapForConditionalGeneration(kind, vision_model=fitting)  # the tower itself fits
    # A config class of the user's own, of a known model type, is looked up by its type (was a bare KeyError).
    class OwnViTConfig(ViTConfig):
        pass

    own = ClipCapConfig(vision_config=OwnViTConfig(**tower), vision_pooling="cls", text_config=config.text_config,
                        prefix_length=config.prefix_length, image_token_id=config.image_token_id)
    ClipCapForConditionalGeneration(own, vision_model=ViTModel(OwnViTConfig(**tower)))


def test_a_vit_pooler_of_another_width_sets_the_prefix_width(tokenizer, tmp_path):
    from transformers import ViTConfig, ViTModel

    vit_config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8, pooler_output_size=48)
    config = ClipCapConfig(vision_config=vit_config, vision_pooling="pooled", text_config=tiny_config(tokenizer)
                           .text_config, prefix_length=4)
    assert config.prefix_dim == 48  # was the hidden size: the first image failed on a shape mismatch
    model = ClipCapForConditionalGeneration(config, vision_model=ViTModel(vit_config)).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.get_prefix_embeds(pixel_values=pixel_values).shape == (2, 4, 32)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ClipCapForConditionalGeneration.from_pretrained(tmp_path).get_image_embeds(
            pixel_values), model.get_image_embeds(pixel_values))


def test_language_model_whose_embeddings_differ_from_its_config_is_refused(tokenizer):
    language_model = AutoModelForCausalLM.from_config(tiny_config(tokenizer).text_config)
    language_model.set_input_embeddings(torch.nn.Embedding(len(tokenizer), 16))
    message = r"The language model's token embeddings are 16-d, but its config gives 32-d"
    with pytest.raises(ValueError, match=message):
        ClipCapForConditionalGeneration(tiny_config(tokenizer), language_model=language_model)


def test_a_whole_clip_config_gives_its_vision_part(tokenizer):
    vision = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8, "projection_dim": 24}
    whole = CLIPConfig(vision_config=vision, projection_dim=24)
    for given in (whole, whole.to_dict()):
        config = ClipCapConfig(vision_config=given, text_config=tiny_config(tokenizer).text_config)
        assert {key: getattr(config.vision_config, key) for key in vision} == vision
    for other in ({"model_type": "bert", "hidden_size": 64}, BertConfig(hidden_size=64)):
        with pytest.raises(ValueError, match=r"`vision_config` describes a 'bert' model, which gives no single image"):
            ClipCapConfig(vision_config=other)
    with pytest.raises(ValueError, match=r"`vision_config` must be a PretrainedConfig or a dict, got str"):
        ClipCapConfig(vision_config="openai/clip-vit-base-patch32")


def test_gradient_checkpointing_reaches_the_transformer_mapper(tokenizer, processor):
    # In the frozen-LM recipe the mapper is all that trains, so checkpointing must reach its layers; gradients are
    # the same either way.
    gradients = []
    for checkpointing in (False, True):
        model = tiny_model(tokenizer, "transformer", text_dropout=0.0)
        model.freeze_language_model()
        if checkpointing:  # transformers 5 renamed the method
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model.train()
        layers = model.mapping_network.transformer.layers
        assert all(layer.gradient_checkpointing == checkpointing for layer in layers)
        batch = processor(captions=["A dog.", "Two red cats."])
        model(image_embeds=image_embeds_for(model, 2), **batch).loss.backward()
        gradients.append([p.grad for p in model.mapping_network.parameters()])
    for plain, checkpointed in zip(*gradients):
        torch.testing.assert_close(checkpointed, plain)


def test_device_map_planning_keeps_each_mapper_layer_on_one_device(tokenizer):
    # A mapper layer adds its input to its sub-layers' outputs: split across devices, they would not add.
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    model = tiny_model(tokenizer, "transformer")
    # What `from_pretrained(device_map="auto")` plans with: the classes of every part (transformers 4.57 gathers them
    # on demand).
    if hasattr(model, "_get_no_split_modules"):
        no_split = model._get_no_split_modules("auto")
    else:
        no_split = model._no_split_modules
    assert {"ClipCapTransformerLayer", "GPT2Block"} <= set(no_split)
    total = compute_module_sizes(model)[""]
    for share in range(1, 100):
        device_map = infer_auto_device_map(
            model, max_memory={0: total * share // 100, 1: 2 * total}, no_split_module_classes=no_split
        )
        assert not [name for name in device_map if name.startswith("mapping_network.transformer.layers.0.")]


# ---------------------------------------------------------------- fused gelu_new


def test_gpt2s_gelu_new_computes_fused_with_the_language_models_results(tokenizer, tmp_path):
    model = tiny_model(tokenizer).eval()
    text_config = model.config.text_config
    assert text_config.activation_function == "gelu_new"
    kinds = (GELUTanh, NewGELUActivation)
    activations = [module for module in model.language_model.modules() if isinstance(module, kinds)]
    assert len(activations) == text_config.n_layer and all(type(module) is GELUTanh for module in activations)
    # The language model as transformers builds it from the same config and weights, with the seven-operation gelu_new.
    reference = AutoModelForCausalLM.from_config(text_config).eval()
    reference.load_state_dict(model.language_model.state_dict())
    assert type(reference.transformer.h[0].mlp.act) is NewGELUActivation
    input_ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    expected, result = reference(input_ids=input_ids), model.language_model(input_ids=input_ids)
    torch.testing.assert_close(result.logits, expected.logits, rtol=1e-5, atol=1e-5)
    result.logits.square().mean().backward()
    expected.logits.square().mean().backward()
    for name, parameter in model.language_model.named_parameters():
        torch.testing.assert_close(parameter.grad, reference.get_parameter(name).grad, rtol=1e-4, atol=1e-6)
    model.save_pretrained(tmp_path)  # the saved config keeps gelu_new: a folder is the same as before
    assert ClipCapConfig.from_pretrained(tmp_path).text_config.activation_function == "gelu_new"


def test_a_given_language_models_gelu_new_is_replaced_and_its_own_subclasses_kept(tokenizer):
    config = tiny_config(tokenizer)
    language_model = AutoModelForCausalLM.from_config(config.text_config)

    class OwnGelu(NewGELUActivation):
        pass

    language_model.transformer.h[0].mlp.act = own = OwnGelu()
    model = ClipCapForConditionalGeneration(config, language_model=language_model)
    assert model.language_model.transformer.h[0].mlp.act is own  # a subclass computes as it says
    assert all(type(block.mlp.act) is GELUTanh for block in model.language_model.transformer.h[1:])


# ---------------------------------------------------------------- CLIP's quick_gelu in one tensor


class _SigmoidCalls(TorchFunctionMode):
    """Counts the sigmoids computed into a new tensor and in place."""

    def __init__(self):
        super().__init__()
        self.calls = {"new": 0, "in_place": 0}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.sigmoid, torch.Tensor.sigmoid):
            self.calls["new"] += 1
        elif func is torch.Tensor.sigmoid_:
            self.calls["in_place"] += 1
        return func(*args, **(kwargs or {}))


def test_clips_quick_gelu_is_computed_in_place_with_the_towers_results(tokenizer):
    model = tiny_model(tokenizer).eval()
    vision_config = model.config.vision_config
    assert vision_config.hidden_act == "quick_gelu"
    # CLIP's tower as transformers builds it from the same config and weights, with its three-tensor quick_gelu.
    reference = CLIPVisionModelWithProjection(vision_config).eval()
    reference.load_state_dict(model.vision_model.state_dict())
    pixel_values = torch.randn(3, 3, vision_config.image_size, vision_config.image_size,
                               generator=torch.Generator().manual_seed(0))
    expected = reference(pixel_values=pixel_values).image_embeds
    # Inference, and a frozen tower while the rest trains: the activation writes its sigmoid and product in place.
    for gradients in (False, True):
        with torch.set_grad_enabled(gradients), _SigmoidCalls() as sigmoids:
            result = model.vision_model(pixel_values=pixel_values).image_embeds
        assert torch.equal(result, expected)
        assert sigmoids.calls == {"new": 0, "in_place": vision_config.num_hidden_layers}
    # A tower being trained: transformers' activation, so that its backward pass has what it needs.
    model.freeze_vision_model(False)
    with _SigmoidCalls() as sigmoids:
        result = model.vision_model(pixel_values=pixel_values).image_embeds
    assert sigmoids.calls == {"new": vision_config.num_hidden_layers, "in_place": 0}
    result.square().sum().backward()
    expected.square().sum().backward()
    for name, parameter in model.vision_model.named_parameters():
        torch.testing.assert_close(parameter.grad, reference.get_parameter(name).grad)


def test_trainer_num_items_in_batch_divides_the_summed_caption_loss(tokenizer, processor):
    # Trainer sums the loss over micro-batches (accumulation, devices) and divides by `num_items_in_batch`, its count
    # of labels other than -100; the result must be the mean over every caption target.
    model = tiny_model(tokenizer, text_dropout=0.0)
    micro_batches = [["A dog runs on the beach.", "Two cats sleep!"], ["A red circle above a blue square."]]
    k = model.config.prefix_length
    target_losses, summed = [], {False: 0.0, True: 0.0}
    batches = [(processor(captions=captions), image_embeds_for(model, len(captions), seed=len(captions)))
               for captions in micro_batches]
    num_items = sum(int(batch["labels"].ne(-100).sum()) for batch, _ in batches)
    lm = model.language_model
    for batch, x in batches:
        with torch.no_grad():  # the language model by hand: prefix vectors, then the caption's token embeddings
            prefix = model.get_image_features(image_embeds=x).pooler_output
            for row in range(len(x)):
                caption = batch["input_ids"][row, k:][batch["attention_mask"][row, k:] == 1]
                logits = lm(inputs_embeds=torch.cat([prefix[row], lm.get_input_embeddings()(caption)])[None]).logits
                target_losses.append(F.cross_entropy(logits[0, k - 1 : -1], caption, reduction="none"))
        for training in (False, True):  # the full-logits path and the training path that skips non-target positions
            model.train(training)
            summed[training] += model(image_embeds=x, **batch, num_items_in_batch=torch.tensor(num_items)).loss
    model.eval()
    for total in summed.values():
        torch.testing.assert_close(total, torch.cat(target_losses).mean())

    # Labels that make the image tokens targets were counted by Trainer: refused, not divided by too many items.
    batch, x = batches[0]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with pytest.raises(ValueError, match=r"`labels` make image tokens targets, and `num_items_in_batch`"):
        model(image_embeds=x, **{**batch, "labels": labels}, num_items_in_batch=labels.ne(-100).sum())
    # Without Trainer's count, the model masks them itself: the mean over the caption targets.
    torch.testing.assert_close(model(image_embeds=x, **{**batch, "labels": labels}).loss,
                               torch.cat(target_losses[:2]).mean())


def test_vision_pooling_with_an_open_clip_tower_is_refused_by_from_vision_text_pretrained(tmp_path):
    # As ClipCapConfig refuses it: an open_clip tower gives its projected embedding, whatever pooling is asked for.
    from conftest import build_tokenizer, save_open_clip_local_dir
    from transformers import GPT2LMHeadModel

    name, _ = save_open_clip_local_dir(tmp_path / "open_clip", "vit")
    tokenizer = build_tokenizer()
    GPT2LMHeadModel(tiny_config(tokenizer).text_config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"`vision_pooling` \('cls'\) applies to transformers towers"):
        ClipCapForConditionalGeneration.from_vision_text_pretrained(
            name, str(tmp_path / "gpt2"), vision_backend="open_clip", vision_pooling="cls"
        )
