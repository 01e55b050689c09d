import dataclasses
import html
import json
import re

import PIL.Image
import pytest
import torch
from conftest import random_images, run_without_package, tiny_model

from clipcap_hf.commands import main
from clipcap_hf.interpretability import interpret_prefix_embeds

# Words that the test tokenizer encodes as one token each, so that their embeddings are known rows.
WORDS = [" do", "at", "!", "A"]


def token_id(tokenizer, word):
    ids = tokenizer.encode(word)
    assert len(ids) == 1, f"{word!r} is not a single token: {ids}"
    return ids[0]


def set_constant_prefix(model, vectors):
    """Make the MLP mapper output `vectors` (prefix_length, hidden) for every image: zero weight, bias = vectors."""
    last = model.mapping_network.model[2]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(vectors.reshape(-1))


@pytest.fixture
def prefix_of_words(tokenizer):
    """A tiny model whose prefix vectors are exactly the input embeddings of WORDS, whatever the image."""
    model = tiny_model(tokenizer, "mlp")
    ids = [token_id(tokenizer, word) for word in WORDS]
    set_constant_prefix(model, model.get_input_embeddings().weight[ids].clone())
    return model, ids


def test_prefix_made_of_token_embeddings_reads_back_as_those_tokens(prefix_of_words, processor, tokenizer):
    model, ids = prefix_of_words
    pixel_values = processor(images=random_images(2))["pixel_values"]
    interpretations = model.interpret_prefix(pixel_values=pixel_values, tokenizer=tokenizer, top_k=3)
    assert len(interpretations) == 2
    for interpretation in interpretations:
        assert interpretation.tokens == WORDS
        assert [position[0].token_id for position in interpretation.matches] == ids
        for position in interpretation.matches:
            assert position[0].similarity == pytest.approx(1.0, abs=1e-5)
            assert len(position) == 3
            assert position[0].similarity > position[1].similarity >= position[2].similarity


def test_image_embeds_and_processor_as_tokenizer(prefix_of_words, processor):
    model, ids = prefix_of_words
    image_embeds = torch.randn(1, model.config.prefix_dim)
    (interpretation,) = model.interpret_prefix(image_embeds=image_embeds, tokenizer=processor, top_k=1)
    assert interpretation.tokens == WORDS
    assert interpretation.format().splitlines() == ["  0: ' do' 1.000", "  1: 'at' 1.000", "  2: '!' 1.000",
                                                    "  3: 'A' 1.000"]


def test_ranking_is_by_cosine_similarity_not_by_dot_product(tokenizer):
    model = tiny_model(tokenizer, "mlp")
    a, b, d, c = (token_id(tokenizer, word) for word in WORDS)
    embeddings = model.get_input_embeddings().weight
    e0, e1 = torch.eye(embeddings.shape[1])[:2]
    with torch.no_grad():
        embeddings[:, :2] = 0  # every other token is orthogonal to the prefix: similarity exactly 0
        embeddings[a] = 5 * e0  # same direction, longer: similarity 1
        embeddings[b] = 0.6 * e0 + 0.8 * e1  # similarity 0.6
        embeddings[d] = 10 * (0.5 * e0 + 0.75**0.5 * e1)  # similarity 0.5, but the largest dot product after `a`
        embeddings[c] = -e0  # opposite: similarity -1, ranked last
    set_constant_prefix(model, 2 * e0.expand(model.config.prefix_length, -1))
    (interpretation,) = model.interpret_prefix(image_embeds=torch.randn(1, model.config.prefix_dim),
                                               tokenizer=tokenizer, top_k=4)
    for position in interpretation.matches:
        assert [match.token_id for match in position[:3]] == [a, b, d]
        assert [match.token for match in position[:3]] == [" do", "at", "!"]
        assert [match.similarity for match in position] == pytest.approx([1.0, 0.6, 0.5, 0.0], abs=1e-5)
    # Every candidate: the whole vocabulary but the image token.
    (interpretation,) = model.interpret_prefix(image_embeds=torch.randn(1, model.config.prefix_dim),
                                               top_k=len(tokenizer) - 1)
    assert interpretation.matches[0][-1].token_id == c
    assert interpretation.matches[0][-1].similarity == pytest.approx(-1.0, abs=1e-5)


def test_sentencepiece_word_start_tokens_keep_their_leading_space():
    # A Llama-style tokenizer (SentencePiece's "▁" marks a word's start), built here: `decode` strips the marker of a
    # text's first token, so "▁the" alone would read "the", like the mid-word "the": it reads " the", as GPT-2's
    # byte-level "Ġdo" reads " do".
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    pieces = SentencePieceBPETokenizer()
    pieces.train_from_iterator(["the dog runs on the beach", "the cat sleeps"] * 50, vocab_size=60, min_frequency=1,
                               special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=pieces._tokenizer, unk_token="<unk>", eos_token="</s>")
    ids = tokenizer.convert_tokens_to_ids(["\u2581the", "the", "\u2581", "ps"])
    embeddings = torch.eye(len(tokenizer))  # each token nearest to itself alone
    (interpretation,) = interpret_prefix_embeds(embeddings[ids][None], embeddings, tokenizer, top_k=1)
    assert [position[0].token_id for position in interpretation.matches] == ids
    assert interpretation.tokens == [" the", "the", " ", "ps"]
    assert interpretation.format_matches() == ["' the' 1.000", "'the' 1.000", "' ' 1.000", "'ps' 1.000"]


def test_word_start_punctuation_keeps_its_leading_space_whatever_the_tokenizers_clean_up():
    # transformers 4.x applies `clean_up_tokenization_spaces`, which many saved tokenizers set, to byte-level tokens
    # too: `decode` would read GPT-2's "Ġ," as ",".
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    pieces = ByteLevelBPETokenizer()
    pieces.train_from_iterator(["a dog , a cat . it 's here ! do n't"] * 50, vocab_size=300, min_frequency=1,
                               special_tokens=["<|endoftext|>"])
    words = [" ,", " .", " !", " dog", ","]
    for clean_up in (False, True):
        tokenizer = GPT2TokenizerFast(tokenizer_object=pieces._tokenizer, eos_token="<|endoftext|>",
                                      clean_up_tokenization_spaces=clean_up)
        ids = [tokenizer.encode(word) for word in words]
        assert all(len(token_ids) == 1 for token_ids in ids), ids
        embeddings = torch.eye(len(tokenizer))  # each token nearest to itself alone
        prefix = embeddings[[token_ids[0] for token_ids in ids]][None]
        (interpretation,) = interpret_prefix_embeds(prefix, embeddings, tokenizer, top_k=1)
        assert interpretation.tokens == words, clean_up


def test_without_tokenizer_only_ids_are_given(prefix_of_words):
    model, ids = prefix_of_words
    (interpretation,) = model.interpret_prefix(image_embeds=torch.randn(1, model.config.prefix_dim), top_k=1)
    assert [position[0].token_id for position in interpretation.matches] == ids
    assert interpretation.tokens == [None] * len(ids)
    assert interpretation.format().splitlines()[0] == f"  0: #{ids[0]} 1.000"


def test_tokenizer_excludes_embedding_rows_beyond_its_vocabulary(tokenizer):
    model = tiny_model(tokenizer, "mlp")
    model.resize_token_embeddings(len(tokenizer) + 8)  # padded rows, as models padded to a multiple of 8 have
    prefix = torch.randn(model.config.prefix_length, model.config.text_config.hidden_size)
    with torch.no_grad():
        model.get_input_embeddings().weight[len(tokenizer)] = prefix[0]  # a padding row equal to a prefix vector
    set_constant_prefix(model, prefix)
    image_embeds = torch.randn(1, model.config.prefix_dim)
    nearest = model.interpret_prefix(image_embeds=image_embeds, top_k=1)[0].matches[0][0]
    assert nearest.token_id == len(tokenizer)
    nearest = model.interpret_prefix(image_embeds=image_embeds, tokenizer=tokenizer, top_k=1)[0].matches[0][0]
    assert nearest.token_id < len(tokenizer)
    assert nearest.token is not None


@pytest.mark.parametrize("mapping_type", ["mlp", "transformer"])
def test_nearest_tokens_match_a_brute_force_search(tokenizer, mapping_type):
    model = tiny_model(tokenizer, mapping_type)
    image_embeds = torch.randn(2, model.config.prefix_dim)
    interpretations = model.interpret_prefix(image_embeds=image_embeds, tokenizer=tokenizer, top_k=2)
    with torch.no_grad():
        prefix = model.get_prefix_embeds(image_embeds=image_embeds)
    embeddings = model.get_input_embeddings().weight.detach()
    for image, interpretation in enumerate(interpretations):
        assert len(interpretation.matches) == model.config.prefix_length
        for position, matches in enumerate(interpretation.matches):
            scores = torch.cosine_similarity(prefix[image, position][None], embeddings, dim=-1).tolist()
            scores[model.config.image_token_id] = float("-inf")  # never a candidate: no text holds it
            best = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)[:2]
            assert [match.token_id for match in matches] == best
            assert [match.similarity for match in matches] == pytest.approx([scores[i] for i in best], abs=1e-5)


@pytest.mark.parametrize("top_k", [0, 10_000])
def test_top_k_out_of_range_is_rejected(mlp_model, top_k):
    with pytest.raises(ValueError, match="`top_k` must be between 1 and the vocabulary size"):
        mlp_model.interpret_prefix(image_embeds=torch.randn(1, mlp_model.config.prefix_dim), top_k=top_k)


@pytest.mark.parametrize("top_k", [2.0, "3", None, True])
def test_top_k_that_is_not_an_int_is_named(mlp_model, top_k):
    # Before, bare TypeErrors from torch or a comparison, and True read as 1.
    with pytest.raises(TypeError) as caught:
        mlp_model.interpret_prefix(image_embeds=torch.randn(1, mlp_model.config.prefix_dim), top_k=top_k)
    assert str(caught.value) == f"`top_k` must be an int, how many tokens to keep per prefix vector; got {top_k!r}."


def test_top_k_may_be_a_numpy_integer(mlp_model):
    import numpy as np

    embeds = torch.randn(1, mlp_model.config.prefix_dim)
    (given,) = mlp_model.interpret_prefix(image_embeds=embeds, top_k=np.int64(3))
    (plain,) = mlp_model.interpret_prefix(image_embeds=embeds, top_k=3)
    assert given == plain and len(given.matches[0]) == 3


@pytest.mark.parametrize("top_k", [5, 3])
def test_a_tokenizer_name_instead_of_a_tokenizer_is_named(mlp_model, top_k):
    # Before: "`top_k` must be between 1 and the vocabulary size (4)" (the name's length), or an AttributeError.
    with pytest.raises(TypeError) as caught:
        mlp_model.interpret_prefix(image_embeds=torch.randn(1, mlp_model.config.prefix_dim), tokenizer="gpt2",
                                   top_k=top_k)
    assert str(caught.value) == (
        "`tokenizer` must be the language model's tokenizer or the model's processor, objects with `decode` and "
        "`convert_ids_to_tokens`; got the str 'gpt2'. Load it first, e.g. "
        "`AutoProcessor.from_pretrained(model_folder)`."
    )


def test_non_finite_prefix_vectors_are_refused_naming_images_and_positions(tokenizer):
    # NaN prefixes (a float16 overflow) were read as the first tokens of the vocabulary, with similarity nan.
    prefix = torch.randn(5, 4, 8)
    prefix[1, 0, 3] = prefix[1, 2, 0] = float("nan")
    prefix[2, 3, 7] = float("inf")
    prefix[3, 1, 1] = prefix[4, 0, 0] = float("-inf")
    with pytest.raises(ValueError) as caught:
        interpret_prefix_embeds(prefix, torch.randn(50, 8), tokenizer, top_k=2)
    assert str(caught.value) == (
        "`prefix_embeds` holds NaN or infinite values (image 1: positions [0, 2]; image 2: positions [3]; image 3: "
        "positions [1]; ...), which match no token. The model likely overflowed, as float16 does: run it in float32 "
        "or bfloat16, or check the image embeddings and the model's weights."
    )
    with pytest.raises(ValueError, match=r"^`prefix_embeds` holds NaN or infinite values \(image 0: positions \[1\]\)"):
        interpret_prefix_embeds(torch.tensor([[[1.0, 0.0], [float("nan"), 1.0]]]), torch.eye(2), top_k=1)


@pytest.fixture
def image_token_nearest(tokenizer):
    """
    A tiny model whose every prefix vector is e0 and whose image token's embedding is 3 * e0 (cosine similarity 1,
    as a trained GPT-2's tied embeddings may move it), ' do' at similarity 0.6 next, every other token orthogonal.
    """
    model = tiny_model(tokenizer, "mlp")
    embeddings = model.get_input_embeddings().weight
    e0, e1 = torch.eye(embeddings.shape[1])[:2]
    with torch.no_grad():
        embeddings[:, :2] = 0
        embeddings[model.config.image_token_id] = 3 * e0
        embeddings[token_id(tokenizer, " do")] = 0.6 * e0 + 0.8 * e1
    set_constant_prefix(model, e0.expand(model.config.prefix_length, -1))
    return model


def test_the_image_token_is_never_a_candidate(image_token_nearest, tokenizer, processor):
    model = image_token_nearest
    image_token_id = model.config.image_token_id
    assert image_token_id == len(tokenizer) - 1  # "<image>", a token of the tokenizer: the last embedding row
    image_embeds = torch.randn(1, model.config.prefix_dim)
    for decoder in (None, tokenizer, processor):
        (interpretation,) = model.interpret_prefix(image_embeds=image_embeds, tokenizer=decoder, top_k=2)
        for position in interpretation.matches:
            assert position[0].token_id == token_id(tokenizer, " do")
            assert position[0].similarity == pytest.approx(0.6, abs=1e-6)
            assert position[1].similarity == pytest.approx(0.0, abs=1e-6)
    # Every candidate: the vocabulary but the image token; one more is refused, counting without it.
    (interpretation,) = model.interpret_prefix(image_embeds=image_embeds, tokenizer=tokenizer,
                                               top_k=len(tokenizer) - 1)
    assert sorted(match.token_id for match in interpretation.matches[0]) == list(range(len(tokenizer) - 1))
    with pytest.raises(ValueError) as caught:
        model.interpret_prefix(image_embeds=image_embeds, top_k=len(tokenizer))
    assert str(caught.value) == (
        f"`top_k` must be between 1 and the vocabulary size ({len(tokenizer) - 1}, not counting the excluded tokens "
        f"[{image_token_id}]), got {len(tokenizer)}."
    )
    # interpret_prefix_embeds excludes only what it is told to: the image token is the nearest row.
    with torch.no_grad():
        prefix = model.get_prefix_embeds(image_embeds=image_embeds)
    (interpretation,) = interpret_prefix_embeds(prefix, model.get_input_embeddings().weight, tokenizer, top_k=1)
    assert interpretation.tokens == ["<image>"] * model.config.prefix_length


def test_interpret_command_never_shows_the_image_token(image_token_nearest, processor, tmp_path, capsys):
    image_token_nearest.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    random_images(1)[0].save(tmp_path / "image.png")
    argv = ["interpret", str(tmp_path / "image.png"), "--model", str(tmp_path / "model")]
    assert main([*argv, "--top-k", "1"]) == 0
    lines = [f"  {position}: ' do' 0.600" for position in range(4)]
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "image.png"), *lines]
    # --top-k counts the candidates without it: the whole tokenizer is one too many.
    vocab_size = len(processor.tokenizer)
    assert main([*argv, "--top-k", str(vocab_size)]) == 2
    message = f"--top-k must be at most the vocabulary size less the image token ({vocab_size - 1}), got {vocab_size}."
    assert message in capsys.readouterr().err


def test_byte_level_tokens_show_the_bytes_of_incomplete_characters_and_the_others_as_text():
    # GPT-2's byte-level alphabet writes the bytes 0xAE-0xFF as the Latin-1 characters of the same value, and ASCII
    # letters as themselves: "Ã" is 0xC3 (the first half of "é", 0xC3 0xA9), "õ" 0xF5 (never valid in UTF-8).
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    merged = {"Ã©": ("Ã", "©"), "Ã": None, "õm": ("õ", "m"), "Ãm": ("Ã", "m"), "mÃ": ("m", "Ã"), "Ãõm": ("Ã", "õm")}
    vocab = {char: index for index, char in enumerate(sorted(alphabet))}
    for token in merged:
        vocab.setdefault(token, len(vocab))
    pieces = Tokenizer(models.BPE(vocab, [pair for pair in merged.values() if pair]))
    pieces.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    pieces.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=pieces)
    ids = tokenizer.convert_tokens_to_ids(list(merged))
    embeddings = torch.eye(len(tokenizer))  # each token nearest to itself alone
    (interpretation,) = interpret_prefix_embeds(embeddings[ids][None], embeddings, tokenizer, top_k=1)
    assert [position[0].token_id for position in interpretation.matches] == ids
    # Before: "<0xF5><0x6D>", "<0xC3><0x6D>" and "<0xC3><0xF5><0x6D>", the letter m shown as a byte.
    assert interpretation.tokens == ["é", "<0xC3>", "<0xF5>m", "<0xC3>m", "m<0xC3>", "<0xC3><0xF5>m"]


@pytest.mark.parametrize(
    "prefix_shape, embeddings_shape, message",
    [
        ((4, 8), (50, 8), "`prefix_embeds` must have shape (batch_size, prefix_length, width), got (4, 8); "
                          "for one image's prefix, pass `prefix_embeds[None]`."),
        ((1, 4, 8), (50,), "`token_embeddings` must have shape (vocab_size, width), got (50,); pass the "
                           "language model's input embedding matrix."),
        ((1, 4, 8), (50, 16), "Prefix vectors have width 8 but token embeddings have width 16; they must come from "
                              "the same model."),
    ],
)
def test_shapes_are_checked_and_named(prefix_shape, embeddings_shape, message):
    with pytest.raises(ValueError) as caught:
        interpret_prefix_embeds(torch.randn(*prefix_shape), torch.randn(*embeddings_shape), top_k=2)
    assert str(caught.value) == message


@pytest.fixture
def saved_words_model(prefix_of_words, processor, tmp_path):
    model, ids = prefix_of_words
    folder = tmp_path / "words"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image_path = tmp_path / "image.png"
    random_images(1, seed=3)[0].save(image_path)
    return folder, image_path, ids


def test_interpret_command_prints_the_nearest_tokens(saved_words_model, capsys):
    folder, image_path, ids = saved_words_model
    assert main(["interpret", str(image_path), "--model", str(folder), "--top-k", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        str(image_path), "  0: ' do' 1.000", "  1: 'at' 1.000", "  2: '!' 1.000", "  3: 'A' 1.000"
    ]

    assert main(["interpret", str(image_path), "--model", str(folder), "--top-k", "2", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["image"] == str(image_path)
    assert [position[0]["token"] for position in result["prefix"]] == WORDS
    assert [position[0]["token_id"] for position in result["prefix"]] == ids
    assert all(position[0]["similarity"] == pytest.approx(1.0, abs=1e-5) for position in result["prefix"])
    assert all(len(position) == 2 for position in result["prefix"])


def test_interpret_command_rejects_bad_input(saved_words_model, tmp_path, capsys):
    folder, image_path, _ = saved_words_model
    assert main(["interpret", str(image_path), "--model", str(folder), "--top-k", "0"]) == 2
    assert "argument --top-k: must be at least 1, got 0" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main(["interpret", str(broken), "--model", str(folder)]) == 2
    assert f"Cannot read image {broken}" in capsys.readouterr().err


def test_interpret_command_names_a_decompression_bomb(saved_words_model, monkeypatch, capsys):
    folder, image_path, _ = saved_words_model  # 48x40 pixels
    monkeypatch.setattr("PIL.Image.MAX_IMAGE_PIXELS", 500)  # over twice the limit: refused as a decompression bomb
    assert main(["interpret", str(image_path), "--model", str(folder)]) == 2
    assert capsys.readouterr().err.splitlines()[-2:] == [
        "clipcap interpret: error: 1 of 1 images could not be read:",
        f"  Cannot read image {image_path}: Image size (1920 pixels) exceeds limit of 1000 pixels, could be "
        "decompression bomb DOS attack. If you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS.",
    ]


def test_interpret_command_names_the_option_when_top_k_exceeds_the_vocabulary(saved_words_model, processor, capsys):
    folder, image_path, _ = saved_words_model
    candidates = len(processor.tokenizer) - 1  # the image token is never one
    assert main(["interpret", str(image_path), "--model", str(folder), "--top-k", str(candidates + 1)]) == 2
    message = f"--top-k must be at most the vocabulary size less the image token ({candidates}), got {candidates + 1}"
    assert message in capsys.readouterr().err


def test_interpret_json_keeps_earlier_results_when_an_image_fails(saved_words_model, tmp_path, capsys):
    folder, image_path, _ = saved_words_model
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main(["interpret", str(image_path), str(broken), "--model", str(folder), "--top-k", "1", "--json"]) == 2
    captured = capsys.readouterr()
    assert f"Cannot read image {broken}" in captured.err
    result, unreadable = json.loads(captured.out)
    assert result["image"] == str(image_path)
    assert [position[0]["token"] for position in result["prefix"]] == WORDS
    error = f"Cannot read image {broken}: cannot identify image file '{broken}'"
    assert unreadable == {"image": str(broken), "prefix": None, "error": error}


def test_interpret_prefix_works_on_a_folder_loaded_with_remote_code(saved_words_model, tmp_path):
    # interpretability.py travels with the saved model code, so trust_remote_code users have the method too.
    folder, _, _ = saved_words_model
    output = run_without_package(
        f"""
        import json, sys
        import torch
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        (interpretation,) = model.interpret_prefix(image_embeds=torch.randn(1, model.config.prefix_dim),
                                                   tokenizer=processor)
        print(json.dumps(interpretation.tokens))
        """,
        tmp_path,
    )
    assert output == WORDS


@pytest.fixture
def two_word_models(saved_words_model, tokenizer, processor, tmp_path):
    """The words model and a second one whose prefix reads as the same words in reverse order."""
    folder, image_path, ids = saved_words_model
    other = tiny_model(tokenizer, "mlp", seed=1)
    set_constant_prefix(other, other.get_input_embeddings().weight[ids[::-1]].clone())
    other_folder = tmp_path / "reversed"
    other.save_pretrained(other_folder)
    processor.save_pretrained(other_folder)
    return folder, other_folder, image_path


def _greedy_caption(folder, image_path):
    from clipcap_hf import ClipCapForConditionalGeneration, ClipCapProcessor
    from clipcap_hf.image_processing_clipcap import load_image

    model = ClipCapForConditionalGeneration.from_pretrained(folder).eval()
    processor = ClipCapProcessor.from_pretrained(folder)
    generated = model.generate(**processor(images=[load_image(image_path)]), do_sample=False, num_beams=1)
    return processor.post_process_image_text_to_text(generated)[0]


def test_interpret_compares_two_models_side_by_side(two_word_models, capsys):
    folder, other_folder, image_path = two_word_models
    assert main(["interpret", str(image_path), "--model", str(folder), "--compare", str(other_folder),
                 "--top-k", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        str(image_path),
        f"  caption ({folder}): {_greedy_caption(folder, image_path)}",
        f"  caption ({other_folder}): {_greedy_caption(other_folder, image_path)}",
        "  0: ' do' 1.000  |  'A' 1.000",
        "  1: 'at' 1.000   |  '!' 1.000",
        "  2: '!' 1.000    |  'at' 1.000",
        "  3: 'A' 1.000    |  ' do' 1.000",
    ]

    assert main(["interpret", str(image_path), "--model", str(folder), "--compare", str(other_folder),
                 "--top-k", "2", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["image"] == str(image_path)
    assert [model["model"] for model in result["models"]] == [str(folder), str(other_folder)]
    assert [[position[0]["token"] for position in model["prefix"]] for model in result["models"]] == [
        WORDS, WORDS[::-1]
    ]
    assert [model["caption"] for model in result["models"]] == [
        _greedy_caption(folder, image_path), _greedy_caption(other_folder, image_path)
    ]


def test_interpret_gallery_shows_each_models_caption_and_prefix_words(two_word_models, tmp_path, capsys):
    folder, other_folder, image_path = two_word_models
    gallery = tmp_path / "prefixes.html"
    assert main(["interpret", str(image_path), "--model", str(folder), "--compare", str(other_folder),
                 "--gallery", str(gallery)]) == 0
    page = gallery.read_text()
    headers = re.findall(r"<th>(.*?)</th>", page)
    assert headers == ["Image", f"caption ({folder})", f"prefix ({folder})", f"caption ({other_folder})",
                       f"prefix ({other_folder})"]
    cells = re.findall(r'<td class="(?:caption|column)">(.*?)</td>', page)
    assert cells == [
        html.escape(_greedy_caption(folder, image_path)), html.escape("' do' 'at' '!' 'A'"),
        html.escape(_greedy_caption(other_folder, image_path)), html.escape("'A' '!' 'at' ' do'"),
    ]
    assert f"Gallery: {gallery}" in capsys.readouterr().err


def test_interpret_compare_refuses_the_same_model(saved_words_model, capsys):
    folder, image_path, _ = saved_words_model
    assert main(["interpret", str(image_path), "--model", str(folder), "--compare", str(folder)]) == 2
    assert "--compare names the same model as --model" in capsys.readouterr().err


def test_interpret_compare_refuses_the_same_folder_named_another_way(saved_words_model, monkeypatch, capsys):
    folder, image_path, _ = saved_words_model
    monkeypatch.chdir(folder.parent)
    (folder.parent / "link").symlink_to(folder, target_is_directory=True)
    for other in (f"./{folder.name}", str(folder), "link"):
        assert main(["interpret", str(image_path), "--model", folder.name, "--compare", other]) == 2
        assert f"--compare names the same model as --model ({folder.name})" in capsys.readouterr().err


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_interpret_run_keeps_the_earlier_gallery_and_prints_no_json(
    saved_words_model, tmp_path, monkeypatch, capsys, failure
):
    import clipcap_hf.commands.interpret as interpret_command

    folder, image_path, _ = saved_words_model
    second = tmp_path / "second.png"
    random_images(1, seed=4)[0].save(second)
    gallery = tmp_path / "prefixes.html"
    argv = ["interpret", str(image_path), str(second), "--model", str(folder), "--gallery", str(gallery)]
    assert main(argv) == 0
    complete = gallery.read_text()
    assert '<p class="summary">2 images.' in complete
    capsys.readouterr()

    real_read, calls = interpret_command._read, []

    def read_then_fail(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # Ctrl-C, or a crash, while the second image is read
            raise failure("stopped")
        return real_read(*args, **kwargs)

    monkeypatch.setattr(interpret_command, "_read", read_then_fail)
    with pytest.raises(failure):
        main([*argv, "--json"])
    assert gallery.read_text() == complete  # not replaced by a gallery of the first image alone
    assert capsys.readouterr().out == ""  # no JSON list that looks complete but holds one image


def test_interpret_gallery_of_one_model(saved_words_model, tmp_path):
    folder, image_path, _ = saved_words_model
    gallery = tmp_path / "prefixes.html"
    assert main(["interpret", str(image_path), "--model", str(folder), "--gallery", str(gallery)]) == 0
    page = gallery.read_text()
    assert re.findall(r"<th>(.*?)</th>", page) == ["Image", f"caption ({folder})", f"prefix ({folder})"]
    assert re.findall(r'<td class="column">(.*?)</td>', page) == [html.escape("' do' 'at' '!' 'A'")]


def test_interpret_gallery_and_json_keep_an_unreadable_image_in_its_place(two_word_models, tmp_path, capsys):
    folder, other_folder, image_path = two_word_models
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    gallery = tmp_path / "prefixes.html"
    assert main(["interpret", str(broken), str(image_path), "--model", str(folder), "--compare", str(other_folder),
                 "--top-k", "1", "--json", "--gallery", str(gallery)]) == 2
    unreadable, result = json.loads(capsys.readouterr().out)
    error = f"Cannot read image {broken}: cannot identify image file '{broken}'"
    # With --compare, the key that holds a readable image's result ("models") is null, as docs/cli.md says.
    assert unreadable == {"image": str(broken), "models": None, "error": error}
    assert result["image"] == str(image_path)
    page = gallery.read_text()
    assert "<p class=\"summary\">2 images." in page
    assert re.findall(r'<div class="unreadable"><strong>(.*?)</strong><p>(.*?)</p></div>', page) == [
        (html.escape(str(broken)), html.escape(error))
    ]
    assert re.findall(r'<td class="column">(.*?)</td>', page) == [
        "", "", "", html.escape("' do' 'at' '!' 'A'"), html.escape(_greedy_caption(other_folder, image_path)),
        html.escape("'A' '!' 'at' ' do'"),
    ]


@pytest.mark.parametrize("with_gallery", [False, True])
def test_interpret_holds_one_decoded_image_at_a_time(saved_words_model, tmp_path, monkeypatch, with_gallery):
    import gc
    import weakref

    import clipcap_hf.commands.interpret as interpret_command
    import clipcap_hf.evaluation.gallery as gallery_module

    folder, image_path, _ = saved_words_model
    paths = [tmp_path / f"{index}.png" for index in range(4)]
    for path, image in zip(paths, random_images(4, seed=5)):
        image.save(path)
    loaded, alive_at_each_load = [], []
    real_decode_image = interpret_command.decode_image

    def tracked_decode_image(path):
        gc.collect()
        # The image before this one is still bound to the loop's variable; none before it may be held.
        alive_at_each_load.append(sum(reference() is not None for reference in loaded[:-1]))
        image = real_decode_image(path)
        loaded.append(weakref.ref(image))
        return image

    monkeypatch.setattr(interpret_command, "decode_image", tracked_decode_image)
    written = []
    monkeypatch.setattr(gallery_module, "write_gallery", lambda records, path, **kwargs: written.append(records))
    gallery = ["--gallery", str(tmp_path / "prefixes.html")] if with_gallery else []
    assert main(["interpret", *map(str, paths), "--model", str(folder), "--top-k", "1", *gallery]) == 0
    assert alive_at_each_load == [0, 0, 0, 0]
    # The gallery is given the files, which it reads again for the thumbnails.
    assert [[record["image"] for record in records] for records in written] == ([paths] if with_gallery else [])


def test_interpret_runs_each_model_s_vision_tower_and_mapper_once_per_image(tokenizer, processor, tmp_path,
                                                                            monkeypatch, capsys):
    from clipcap_hf import ClipCapForConditionalGeneration

    monkeypatch.setenv("CLIPCAP_CPU_LINEAR", "default")  # the same kernels inside generate() as outside it
    folders, images = [tmp_path / "first", tmp_path / "second"], [tmp_path / "a.png", tmp_path / "b.png"]
    for seed, (folder, image) in enumerate(zip(folders, images)):
        tiny_model(tokenizer, "mlp", seed=seed).save_pretrained(folder)  # prefixes that depend on the image
        processor.save_pretrained(folder)
        random_images(1, seed=seed + 5)[0].save(image)
    # Each model's reading of each image as `interpret_prefix` and `generate` give them from the pixels.
    expected = []
    for image in images:
        readings = []
        for folder in folders:
            model = ClipCapForConditionalGeneration.from_pretrained(folder).eval()
            pixel_values = processor(images=[PIL.Image.open(image)])["pixel_values"]
            (interpretation,) = model.interpret_prefix(pixel_values, tokenizer=processor, top_k=2)
            prefix = [[dataclasses.asdict(match) for match in position] for position in interpretation.matches]
            readings.append({"model": str(folder), "caption": _greedy_caption(folder, image), "prefix": prefix})
        expected.append({"image": str(image), "models": readings})

    calls = []
    real = ClipCapForConditionalGeneration.get_image_features

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ClipCapForConditionalGeneration, "get_image_features", counted)
    argv = ["interpret", *map(str, images), "--model", str(folders[0]), "--compare", str(folders[1]), "--top-k", "2"]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == expected
    assert len(calls) == 4  # one per image and model: the caption reads the prefix the interpretation read
