"""Embeddings folders kept sound across runs: each image read once, replaced image files not served twice, killed
runs' temporary shards removed (never another process's), non-finite embeddings refused with the earlier ones kept."""

import json
import os
from unittest import mock

import datasets
import numpy as np
import PIL.Image
import pytest
from conftest import count_vision_images, random_images, tiny_model
from test_embed import expected_embeddings, is_memory_mapped, model_dir, stored  # noqa: F401 (model_dir: a fixture)

import clipcap_hf.data.embeddings as embeddings
import clipcap_hf.data.sources as sources
from clipcap_hf.commands import main
from clipcap_hf.data import embed_source, image_cache_key, load_embeddings, load_embeddings_info, load_image_source


def test_clipcap_embed_without_caption_column_reads_each_image_once(tmp_path, model_dir, webdataset_shards):  # noqa: F811
    shards = ",".join(str(path) for path in webdataset_shards[0])
    arguments = ["--model", str(model_dir), "--train_file", shards]
    assert main(["embed", *arguments, "--caption_column", "txt", "--output", str(tmp_path / "named")]) == 0
    real_key, real_open = sources.image_key, PIL.Image.open
    keyed, opened = [], []

    def counting_key(image):
        keyed.append(image)
        return real_key(image)

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return real_open(*args, **kwargs)

    # Its own copy of the shards: `datasets` would otherwise answer the key computation from the first run's cache.
    copies = []
    for path in webdataset_shards[0]:
        copies.append(tmp_path / "copy" / path.name)
        copies[-1].parent.mkdir(exist_ok=True)
        copies[-1].write_bytes(path.read_bytes())
    arguments = ["--model", str(model_dir), "--train_file", ",".join(map(str, copies))]
    with mock.patch.object(sources, "image_key", counting_key), mock.patch.object(PIL.Image, "open", counting_open):
        assert main(["embed", *arguments, "--output", str(tmp_path / "default")]) == 0
    assert (len(keyed), len(opened)) == (5, 5)  # each image's bytes hashed once and decoded once
    default, named = stored(tmp_path / "default"), stored(tmp_path / "named")
    assert sorted(default) == sorted(named)
    for key, (embedding, captions) in named.items():
        assert default[key][1] == captions
        np.testing.assert_allclose(default[key][0], embedding, atol=1e-6)


def test_a_replaced_image_file_is_embedded_again_and_its_old_row_dropped(tmp_path, tokenizer, processor):
    folder = tmp_path / "images"
    folder.mkdir()
    first, replacement = random_images(3), random_images(1, seed=7)[0]
    for index, image in enumerate(first):
        image.save(folder / f"{index}.png")
    metadata = [json.dumps({"file_name": f"{index}.png", "text": f"Image {index}."}) for index in range(3)]
    (folder / "metadata.jsonl").write_text("\n".join(metadata) + "\n")
    model = tiny_model(tokenizer)

    def embed():
        source = load_image_source(data_files=str(folder), caption_column="text")
        return embed_source(source, model, processor.image_processor, tmp_path / "emb")

    embed()
    before = stored(tmp_path / "emb")
    replaced = folder / "1.png"
    old_key = image_cache_key(str(replaced))
    replacement.save(replaced)
    os.utime(replaced, ns=(10**18, 10**18))  # another modification time whatever the clock's resolution
    assert image_cache_key(str(replaced)) != old_key

    seen, patch = count_vision_images(model)
    with patch:
        info = embed()
    assert seen == [1]  # only the replaced file is embedded again
    after = stored(tmp_path / "emb")
    assert (info["num_images"], info["num_replaced"], len(after)) == (3, 1, 3)
    assert old_key not in after and after[image_cache_key(str(replaced))][1] == ["Image 1."]
    new_embedding = expected_embeddings(model, processor, [PIL.Image.open(replaced)])[0]
    np.testing.assert_allclose(after[image_cache_key(str(replaced))][0], new_embedding.numpy(), atol=1e-5)
    for key in set(before) - {old_key}:  # the other images' rows are unchanged
        np.testing.assert_array_equal(after[key][0], before[key][0])
    assert is_memory_mapped(load_embeddings(tmp_path / "emb"))
    assert not list((tmp_path / "emb").glob(".tmp-*"))

    seen.clear()
    with patch:  # the folder still resumes: nothing left to embed
        info = embed()
    assert seen == [] and (info["num_images"], info["num_replaced"]) == (3, 0)


def test_a_killed_runs_temporary_shards_are_removed_but_not_another_process_s(
    tmp_path, tokenizer, processor, webdataset_shards, monkeypatch
):
    folder = tmp_path / "emb"
    folder.mkdir()
    leftover = datasets.Dataset.from_dict({"image_key": ["x"], "embedding": [[0.0]]})  # what save_to_disk leaves

    def leave(name):
        leftover.save_to_disk(str(folder / name))
        return folder / name

    own = leave(".tmp-shard-rank00000-of-00002-00000-0123abcd")
    other_size = leave(".tmp-shard-rank00003-of-00004-00007-4567abcd")
    other_process = leave(".tmp-shard-rank00001-of-00002-00000-89abcdef")  # this run's process 1 may be writing it
    info_file = folder / ".embeddings_info.json.0123abcd.tmp"
    marker = folder / ".shared-folder-check-0123abcd"
    for path in (info_file, marker):
        path.write_text("left by a killed run")
    source = load_image_source(data_files=[str(path) for path in webdataset_shards[0]], caption_column="txt")
    model = tiny_model(tokenizer)
    # Process 0 of 2 (without a process group: every gather is its own).
    monkeypatch.setattr(embeddings, "_world_size", lambda: 2)
    embed_source(source, model, processor.image_processor, folder)
    assert not own.exists() and not other_size.exists() and not info_file.exists() and not marker.exists()
    assert other_process.exists() and list(folder.glob("shard-rank00000-of-00002-*"))

    monkeypatch.undo()  # one process: process 1 of 2 is not running now
    embed_source(source, model, processor.image_processor, folder)
    assert not other_process.exists()
    assert sorted(path.name for path in folder.iterdir() if not path.name.startswith("shard-")) == [
        "embeddings_info.json"
    ]
    assert load_embeddings_info(folder)["num_images"] == 5


def test_non_finite_embeddings_stop_the_pass_naming_the_images_and_keep_the_earlier_batches(
    tmp_path, tokenizer, processor, webdataset_shards
):
    source = load_image_source(data_files=[str(path) for path in webdataset_shards[0]], caption_column="txt")
    model = tiny_model(tokenizer)
    real_embeds, calls = model.get_image_embeds, []

    def second_batch_broken(pixel_values):
        calls.append(len(pixel_values))
        embeds = real_embeds(pixel_values)
        if len(calls) == 2:
            embeds[1, 3] = float("nan")
        return embeds

    with mock.patch.object(model, "get_image_embeds", second_batch_broken):
        with pytest.raises(ValueError) as error:
            embed_source(source, model, processor.image_processor, tmp_path / "emb", batch_size=2)
    keys = source["image_key"]
    lines = str(error.value).splitlines()
    assert lines[0].startswith("The vision tower gave NaN or infinite embeddings for 1 of the 2 images of a batch; ")
    assert "weights are likely corrupt" in lines[0]
    assert lines[1:] == [f"  {keys[3]}"]  # the one image of the batch with NaN
    assert sorted(load_embeddings(tmp_path / "emb")["image_key"]) == sorted(keys[:2])  # the first batch is kept
    assert "num_images" not in load_embeddings_info(tmp_path / "emb")

    seen, patch = count_vision_images(model)
    with patch:  # a sound tower resumes: only the others are embedded
        info = embed_source(source, model, processor.image_processor, tmp_path / "emb", batch_size=2)
    assert seen == [2, 1] and info["num_images"] == 5
    table = load_embeddings(tmp_path / "emb").with_format("numpy")
    assert np.isfinite(table["embedding"]).all()
