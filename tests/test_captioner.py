"""ClipCapCaptioner: a batch dict in, the same dict with captions out, as `datasets.map(batched=True)` and Ray Data's
`map_batches` call it; and `clipcap caption`'s decoding options on image files."""

import json
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import distinct_captioning_model, random_images, tiny_processor
from transformers import GenerationConfig
from transformers.utils.quantization_config import QuantizationMethod

from clipcap_hf.commands import main
from clipcap_hf.inference import ClipCapCaptioner
from clipcap_hf.inference.captioner import decode_image

MAX_NEW_TOKENS = 5


@pytest.fixture(scope="module")
def captioning(tokenizer):
    return distinct_captioning_model(tokenizer), tiny_processor(tokenizer)


@pytest.fixture(scope="module")
def captioning_dir(captioning, tmp_path_factory):
    """`captioning` saved, for `clipcap caption --model`."""
    folder = tmp_path_factory.mktemp("captioning")
    for part in captioning:
        part.save_pretrained(folder)
    return folder


def image_files(folder, images) -> list:
    """The images saved as PNG files in `folder`."""
    paths = [folder / f"{index}.png" for index in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    return paths


def generate_captions(model, processor, images, **kwargs) -> list[str]:
    generated = model.generate(**processor(images=images), max_new_tokens=MAX_NEW_TOKENS, **kwargs)
    return processor.post_process_image_text_to_text(generated)


def test_datasets_map_adds_generate_captions(captioning):
    model, processor = captioning
    images = random_images(5, seed=21)
    dataset = datasets.Dataset.from_dict({"image": images, "image_key": [f"k{i}" for i in range(5)]})
    captioner = ClipCapCaptioner(model, processor, max_new_tokens=MAX_NEW_TOKENS)
    captioned = dataset.map(captioner, batched=True, batch_size=2)
    assert captioned["caption"] == generate_captions(model, processor, images)
    assert len(set(captioned["caption"])) > 1  # the images get different captions, so the order is checked
    assert captioned["image_key"] == [f"k{i}" for i in range(5)]


def test_embeddings_column_and_beam_candidates(captioning):
    model, processor = captioning
    images = random_images(3, seed=22)
    embeds = model.get_image_embeds(processor(images=images)["pixel_values"]).detach()
    captioner = ClipCapCaptioner(model, processor, num_beams=3, num_return_sequences=3, max_new_tokens=MAX_NEW_TOKENS)
    output = captioner({"embedding": embeds.numpy().tolist(), "image_key": ["a", "b", "c"]})
    expected = generate_captions(model, processor, images, num_beams=3, num_return_sequences=3)
    assert output["candidates"] == [expected[0:3], expected[3:6], expected[6:9]]
    assert output["caption"] == expected[0::3]


def test_unreadable_rows_raise_naming_the_key_or_are_skipped(captioning, caplog):
    model, processor = captioning
    batch = {"image": [random_images(1)[0], b"junk"], "image_key": ["good", "bad"]}
    with pytest.raises(ValueError, match=r"key 'bad': Cannot decode the image bytes \(4 bytes\)"):
        ClipCapCaptioner(model, processor, max_new_tokens=MAX_NEW_TOKENS)(batch)
    output = ClipCapCaptioner(model, processor, on_bad_image="skip", max_new_tokens=MAX_NEW_TOKENS)(batch)
    assert output["caption"][0] == generate_captions(model, processor, batch["image"][:1])[0]
    assert output["caption"][1] is None


def test_missing_wrong_size_or_nan_embeddings_raise_naming_the_key_or_are_skipped(captioning):
    model, processor = captioning
    dim = model.config.prefix_dim
    good = torch.randn(2, dim, generator=torch.Generator().manual_seed(3))
    batch = {"embedding": [good[0].tolist(), None, [0.5] * (dim - 1), [float("nan")] * dim, good[1].tolist()],
             "image_key": ["a", "missing", "short", "nan", "e"]}
    with pytest.raises(ValueError) as refused:
        ClipCapCaptioner(model, processor, max_new_tokens=MAX_NEW_TOKENS)(batch)
    assert (f"key 'missing': The embedding is missing (None); key 'short': The embedding has shape ({dim - 1},), "
            f"expected ({dim},): the model's CLIP embedding size (config.prefix_dim); key 'nan': The embedding holds "
            "NaN or infinite values") in str(refused.value)
    output = ClipCapCaptioner(model, processor, on_bad_image="skip", max_new_tokens=MAX_NEW_TOKENS)(batch)
    generated = model.generate(image_embeds=good, max_new_tokens=MAX_NEW_TOKENS)
    first, last = processor.post_process_image_text_to_text(generated)
    assert output["caption"] == [first, None, None, None, last]


def test_arrays_and_tensors_are_read_as_the_processor_reads_them(captioning):
    """The dtypes and layouts of docs/image-processing.md's table, as a batch column holds them (a tensor from
    `with_format("torch")`), become the 8-bit RGB pixels the table gives."""
    model, processor = captioning
    rng = np.random.default_rng(4)
    floats = rng.random((8, 6, 3), dtype=np.float32)
    words = rng.integers(0, 65536, (8, 6, 3), dtype=np.uint16)
    mask = rng.random((8, 6)) > 0.5
    gray = rng.integers(0, 256, (8, 6, 1), dtype=np.uint8)
    columns = {
        "float HWC in [0, 1]": (floats, np.round(floats.astype(np.float64) * 255)),
        "uint16 HWC": (words, np.round(words / 257.0)),
        "bool HW": (mask, np.repeat(mask[:, :, None] * 255, 3, axis=2)),
        "uint8 HW1 (gray)": (gray, np.repeat(gray, 3, axis=2)),
        "uint8 CHW tensor": (torch.from_numpy(gray.repeat(3, axis=2).transpose(2, 0, 1).copy()), gray.repeat(3, 2)),
        "float CHW tensor": (torch.from_numpy(floats.transpose(2, 0, 1).copy()),
                             np.round(floats.astype(np.float64) * 255)),
    }
    for name, (value, expected) in columns.items():
        decoded = decode_image(value)
        assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), expected.astype(np.uint8)), name
    with pytest.raises(ValueError, match=r"Cannot read an image array of shape \(0, 0, 3\)|empty image array"):
        decode_image(np.zeros((0, 0, 3), np.uint8))

    values = [value for value, _ in columns.values()]
    batch = {"image": values, "image_key": list(columns)}
    output = ClipCapCaptioner(model, processor, max_new_tokens=MAX_NEW_TOKENS)(batch)
    assert output["caption"] == generate_captions(model, processor, values)


def test_images_the_processor_refuses_are_bad_rows_named_by_key(captioning, tmp_path):
    """A file that opens but that the processor's conversion refuses (a float32 "F" TIFF of [0, 255] values), or a
    float array above 1, is a bad row named by its key, under on_bad_image, not an error about the whole batch."""
    model, processor = captioning
    depth = tmp_path / "depth.tif"
    PIL.Image.fromarray(np.linspace(0, 255, 40 * 48, dtype=np.float32).reshape(40, 48)).save(depth)
    good = random_images(2, seed=9)
    batch = {"image": [b"junk", good[0], str(depth), np.full((8, 8), 2.0, np.float32), good[1]],
             "image_key": ["junk", "good-0", "depth", "bright", "good-1"]}
    with pytest.raises(ValueError) as refused:
        ClipCapCaptioner(model, processor, max_new_tokens=MAX_NEW_TOKENS)(batch)
    message = str(refused.value)
    assert message.startswith("3 image(s) of the batch cannot be read (key 'junk': Cannot decode the image bytes")
    assert (f"; key 'depth': Cannot read image {depth}: Float image arrays must hold values in [0, 1], this one holds "
            "[0, 255]" in message
            and "; key 'bright': Float image arrays must hold values in [0, 1], this one holds [2, 2]" in message)
    output = ClipCapCaptioner(model, processor, on_bad_image="skip", max_new_tokens=MAX_NEW_TOKENS)(batch)
    first, last = generate_captions(model, processor, good)
    assert output["caption"] == [None, first, None, None, last]


def test_numpy_keys_are_named_as_plain_strings(captioning):
    # Ray Data's numpy batches hold keys as numpy strings, whose repr is np.str_('cat/001.jpg').
    batch = {"image": np.array([b"junk"], dtype=object), "image_key": np.array(["cat/001.jpg"])}
    with pytest.raises(ValueError, match=r"\(key 'cat/001\.jpg': Cannot decode the image bytes \(4 bytes\)"):
        ClipCapCaptioner(*captioning, max_new_tokens=MAX_NEW_TOKENS)(batch)


def test_a_bitsandbytes_model_is_not_given_a_dtype(captioning, monkeypatch):
    """transformers refuses any `dtype` argument to a bitsandbytes model's `to`, even None; the captioner passes only
    the arguments given. (No GPU for bitsandbytes here: the mark `from_pretrained` sets on such a model is set by
    hand, and transformers' own `to` refuses.)"""
    model, processor = captioning
    monkeypatch.setattr(model, "quantization_method", QuantizationMethod.BITS_AND_BYTES, raising=False)
    assert ClipCapCaptioner(model, processor).model is model
    with pytest.raises(ValueError, match="bitsandbytes"):  # transformers' refusal, which a given dtype still meets
        ClipCapCaptioner(model, processor, dtype=torch.float32)


def test_a_reranker_folder_given_as_a_path_reranks(captioning, tiny_clip_dir):
    model, processor = captioning
    captioner = ClipCapCaptioner(model, processor, reranker=Path(tiny_clip_dir), num_candidates=2, num_beams=2,
                                 max_new_tokens=MAX_NEW_TOKENS)
    image = random_images(1, seed=8)[0]
    output = captioner({"image": [image], "image_key": ["a"]})
    scores = captioner.reranker.clip_score([image] * 2, output["candidates"][0])
    assert output["candidates"][0] == generate_captions(model, processor, [image], num_beams=2, num_return_sequences=2)
    assert output["clip_score"][0] == pytest.approx(float(scores.max()), abs=1e-5)


def test_caption_given_one_image_instead_of_a_list_says_so(captioning):
    captioner = ClipCapCaptioner(*captioning, max_new_tokens=2)
    image = random_images(1)[0]
    message = r"^`images` is a list of images: caption one image with `caption\(\[image\]\)`"
    with pytest.raises(TypeError, match=message):
        captioner.caption(image)
    assert len(captioner.caption([image]).captions) == 1


def test_reranking_embeddings_is_refused_before_generating(captioning, tiny_clip_dir, monkeypatch):
    model, processor = captioning
    captioner = ClipCapCaptioner(model, processor, reranker=str(tiny_clip_dir), num_candidates=2, num_beams=2)

    def no_generate(*args, **kwargs):
        raise AssertionError("generate ran")

    monkeypatch.setattr(captioner.model, "generate", no_generate)
    with pytest.raises(ValueError, match="Reranking with CLIP needs the images, not only their embeddings"):
        captioner.caption(image_embeds=torch.zeros(1, model.config.prefix_dim))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_candidates": 3}, "num_candidates=3 needs a CLIP model to choose among the captions: give reranker"),
        ({"num_candidates": 3, "reranker": object()}, "num_candidates=3 needs do_sample=True, or num_beams=3 or more"),
        ({"num_candidates": 3, "reranker": object(), "do_sample": True, "num_return_sequences": 3},
         "Give num_candidates or num_return_sequences, not both"),
        ({"num_candidates": 0}, "num_candidates must be at least 1, got 0"),
        ({"reranker": object()}, r"give num_candidates=N \(N > 1\) with it"),
        ({"num_return_sequences": 2, "num_beams": 1},
         "num_return_sequences=2 needs do_sample=True, or num_beams=2 or more: greedy decoding gives one."),
        ({"top_p": 0.9, "temperature": 0.5}, "top_p and temperature only apply when sampling: add do_sample=True"),
        ({"top_k": 5, "min_p": 0.1, "typical_p": 0.5},
         "top_k and min_p and typical_p only apply when sampling: add do_sample=True"),
        # Sampled beam search keeps one caption per beam too: refused here, not by `generate` at the first batch.
        ({"do_sample": True, "num_beams": 2, "num_return_sequences": 4},
         "num_return_sequences=4 needs num_beams=4 or more: 2 beams give at most 2, with or without sampling."),
        ({"num_candidates": 3, "reranker": object(), "do_sample": True, "num_beams": 2},
         "num_candidates=3 needs num_beams=3 or more: 2 beams give at most 2"),
        ({"on_bad_image": "ignore"}, r"on_bad_image \(`--on_bad_image`\) must be 'error' or 'skip', got 'ignore'"),
    ],
)
def test_inconsistent_options_are_refused(captioning, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClipCapCaptioner(*captioning, **kwargs)


def test_options_not_given_are_the_generation_configs(captioning, monkeypatch):
    model, processor = captioning
    monkeypatch.setattr(model.generation_config, "do_sample", True)  # a saved model may sample by default
    ClipCapCaptioner(model, processor, top_p=0.9, num_return_sequences=2)
    monkeypatch.setattr(model.generation_config, "do_sample", False)
    monkeypatch.setattr(model.generation_config, "num_beams", 3)
    ClipCapCaptioner(model, processor, num_return_sequences=3)
    message = ("num_return_sequences=4 needs num_beams=4 or more, or do_sample=True without num_beams: 3 beams give "
               "at most 3, with or without sampling.")
    with pytest.raises(ValueError, match=message):
        ClipCapCaptioner(model, processor, num_return_sequences=4)
    # A generation config passed to the captioner is the one `generate` uses, so the one the rules read.
    ClipCapCaptioner(model, processor, num_return_sequences=4, generation_config=GenerationConfig(num_beams=4))
    monkeypatch.setattr(model.generation_config, "num_beams", 1)
    monkeypatch.setattr(model.generation_config, "num_return_sequences", 2)
    with pytest.raises(ValueError, match="num_return_sequences=2 needs do_sample=True, or num_beams=2 or more"):
        ClipCapCaptioner(model, processor)


def test_a_generation_config_with_several_sequences_gives_them_image_by_image(captioning, monkeypatch):
    model, processor = captioning
    monkeypatch.setattr(model.generation_config, "num_beams", 2)
    monkeypatch.setattr(model.generation_config, "num_return_sequences", 2)  # as a saved model's may say
    images = random_images(2, seed=27)
    expected = generate_captions(model, processor, images)  # two per image, image after image
    assert expected[1] != expected[2]  # so that a caption taken from the wrong image shows
    output = ClipCapCaptioner(model, processor, max_new_tokens=MAX_NEW_TOKENS)({"image": images})
    assert output["candidates"] == [expected[:2], expected[2:]]
    assert output["caption"] == [expected[0], expected[2]]


def test_ray_data_map_batches(captioning):
    ray = pytest.importorskip("ray")
    model, processor = captioning
    images = random_images(4, seed=23)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        items = [{"image": np.asarray(image), "image_key": f"k{i}"} for i, image in enumerate(images)]
        captioner = ClipCapCaptioner(model, processor, max_new_tokens=MAX_NEW_TOKENS)
        rows = ray.data.from_items(items).map_batches(captioner, batch_size=2).take_all()
    finally:
        ray.shutdown()
    by_key = {row["image_key"]: row["caption"] for row in rows}
    expected = generate_captions(model, processor, images)
    assert [by_key[f"k{i}"] for i in range(4)] == expected


def test_caption_files_with_beam_candidates_as_json_and_lines(tmp_path, captioning, captioning_dir, capsys):
    model, processor = captioning
    images = random_images(2, seed=24)
    paths = image_files(tmp_path, images)
    argv = ["caption", *map(str, paths), "--model", str(captioning_dir), "--num-beams", "3",
            "--num-return-sequences", "2", "--max-new-tokens", str(MAX_NEW_TOKENS)]
    expected = generate_captions(model, processor, images, num_beams=3, num_return_sequences=2)
    assert main([*argv, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["candidates"] for r in results] == [expected[0:2], expected[2:4]]
    assert [r["caption"] for r in results] == expected[0::2]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"{path}\t{caption}" for path, caption in zip([paths[0]] * 2 + [paths[1]] * 2, expected)]


def test_caption_files_give_one_caption_by_default_whatever_the_generation_config(tmp_path, captioning, capsys):
    model, processor = captioning
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(num_beams=2, num_return_sequences=2)  # a saved model that returns two captions per image
    (folder / "generation_config.json").write_text(json.dumps(config))
    images = random_images(2, seed=28)
    paths = image_files(tmp_path, images)
    assert main(["caption", *map(str, paths), "--model", str(folder), "--max-new-tokens", str(MAX_NEW_TOKENS),
                 "--json"]) == 0
    captions = [result["caption"] for result in json.loads(capsys.readouterr().out)]
    assert captions == generate_captions(model, processor, images, num_beams=1, num_return_sequences=1)


def test_caption_files_sampling_with_a_seed_matches_generate(tmp_path, captioning, captioning_dir, capsys,
                                                             monkeypatch):
    # PyTorch's own kernels on both sides: a captioning run holds oneDNN weights packed, a lone generate() plain
    # ones, and sampling may tell their rounding apart.
    monkeypatch.setenv("CLIPCAP_CPU_LINEAR", "default")
    model, processor = captioning
    image = random_images(1, seed=25)[0]
    (path,) = image_files(tmp_path, [image])
    assert main(["caption", str(path), "--model", str(captioning_dir), "--seed", "7", "--do-sample",
                 "--top-p", "0.8", "--temperature", "2.0", "--max-new-tokens", str(MAX_NEW_TOKENS), "--json"]) == 0
    caption = json.loads(capsys.readouterr().out)[0]["caption"]
    torch.manual_seed(7)
    assert caption == generate_captions(model, processor, [image], do_sample=True, top_p=0.8, temperature=2.0)[0]


def test_caption_files_in_bfloat16_match_generate_in_bfloat16(tmp_path, captioning, captioning_dir, capsys):
    model, processor = captioning
    images = random_images(2, seed=26)
    paths = image_files(tmp_path, images)
    assert main(["caption", *map(str, paths), "--model", str(captioning_dir), "--dtype", "bfloat16",
                 "--max-new-tokens", str(MAX_NEW_TOKENS), "--json"]) == 0
    captions = [result["caption"] for result in json.loads(capsys.readouterr().out)]
    half = type(model).from_pretrained(captioning_dir).to(torch.bfloat16).eval()
    assert captions == generate_captions(half, processor, images)
