"""`clipcap embed` and embeddings folders: each unique image once, resumable after SIGKILL, shared between torchrun
ranks, refused for another vision tower, and `clipcap train --embeddings DIR` / `--streaming` training from them."""

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import count_vision_images, random_images, tiny_model, write_webdataset_shards

from clipcap_hf import ClipCapConfig, ClipCapForConditionalGeneration, ClipCapImageProcessor
from clipcap_hf.commands import main
from clipcap_hf.data import (
    check_embeddings,
    embed_images,
    embed_source,
    embedding_cache_folder,
    load_embeddings,
    load_embeddings_info,
    load_image_source,
    load_training_data,
    vision_fingerprint,
)
from clipcap_hf.training import DataArguments
from clipcap_hf.utils import memory

REPO = Path(__file__).resolve().parents[1]


def is_memory_mapped(dataset) -> bool:
    """Whether every block of a dataset's table is read from its Arrow file rather than held in memory."""
    table = dataset.data
    blocks = table.blocks if isinstance(table, datasets.table.ConcatenationTable) else [[table]]
    return all(isinstance(block, datasets.table.MemoryMappedTable) for row in blocks for block in row)


def expected_embeddings(model, processor, images):
    with torch.no_grad():
        return model.get_image_embeds(processor.image_processor(images, return_tensors="pt")["pixel_values"])


def snapshot(directory):
    """Every file and folder under `directory` with its size and modification time (a folder's changes when a file is
    added to it or removed)."""
    return {
        str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in [Path(directory), *Path(directory).rglob("*")]
    }


def stored(directory):
    """{image key: (embedding, captions)} of an embeddings folder, after checking that no key is stored twice."""
    table = load_embeddings(directory)[:]
    assert len(set(table["image_key"])) == len(table["image_key"])
    return dict(zip(table["image_key"], zip(table["embedding"], table["captions"])))


@pytest.fixture
def model_dir(tmp_path, tokenizer, processor):
    folder = tmp_path / "tiny"
    tiny_model(tokenizer).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_each_unique_image_is_embedded_once_with_the_captions_of_all_its_rows(tmp_path, tokenizer, processor, caplog):
    images = random_images(3)
    encoded = [io.BytesIO() for _ in images]
    for image, buffer in zip(images, encoded):
        image.save(buffer, "PNG")
    rows = [0, 1, 0, 2]  # the first image twice, with another caption
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    data = {"image": [{"bytes": encoded[i].getvalue(), "path": None} for i in rows], "caption": ["a", "b", "c", "d"]}
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(tmp_path / "data.parquet"))
    source = load_image_source(data_files=str(tmp_path / "data.parquet"), caption_column="caption")
    model = tiny_model(tokenizer)
    seen, patch = count_vision_images(model)
    with patch:
        info = embed_source(source, model, processor.image_processor, tmp_path / "emb", batch_size=2)
    assert seen == [2, 1]
    assert (info["num_images"], info["num_shards"], info["embedding_dim"]) == (3, 1, 24)
    assert info["fingerprint"] == vision_fingerprint(model, processor.image_processor)
    table = load_embeddings(tmp_path / "emb")
    assert table.column_names == ["image_key", "captions", "embedding"]
    assert table["captions"] == [["a", "c"], ["b"], ["d"]]
    decoded = [PIL.Image.open(buffer) for buffer in encoded]
    expected = expected_embeddings(model, processor, decoded)
    stored_embeddings = torch.tensor(np.array(table["embedding"], dtype=np.float32))
    torch.testing.assert_close(stored_embeddings, expected, atol=1e-5, rtol=1e-5)
    # Memory-mapped: every block of the table is read from its Arrow file, not held in memory.
    assert is_memory_mapped(table)

    seen.clear()
    with patch:
        embed_source(source, model, processor.image_processor, tmp_path / "emb")
    assert seen == [] and len(load_embeddings(tmp_path / "emb")) == 3

    # Streamed (read once): the repeated image keeps its first row's captions, and a warning counts the others.
    streamed = load_image_source(data_files=str(tmp_path / "data.parquet"), caption_column="caption", streaming=True)
    with caplog.at_level("WARNING"):
        embed_source(streamed, model, processor.image_processor, tmp_path / "streamed", batch_size=2)
    assert load_embeddings(tmp_path / "streamed")["captions"] == [["a"], ["b"], ["d"]]
    assert "1 streamed row(s) repeat an image already embedded" in caplog.text
    assert "so their 1 caption(s) are not stored" in caplog.text
    # Its advice, followed: the same folder keeps the captions it stores (and refuses to change them), a new one merges.
    assert "embed the source without --streaming into a new --output" in caplog.text
    with pytest.raises(ValueError, match="streamed stores 1 image"):
        embed_source(source, model, processor.image_processor, tmp_path / "streamed", check_source=True)
    embed_source(source, model, processor.image_processor, tmp_path / "merged", check_source=True)
    assert load_embeddings(tmp_path / "merged")["captions"] == [["a", "c"], ["b"], ["d"]]


@pytest.mark.skipif(not memory.on_glibc(), reason="sets glibc's malloc switches")
def test_embedding_on_the_cpu_reuses_the_memory_each_batch_frees_until_it_ends(tmp_path, tokenizer, processor):
    source = datasets.Dataset.from_dict({"image": random_images(3), "image_key": ["a", "b", "c"]})
    model = tiny_model(tokenizer)
    reusing = []
    model.vision_model.register_forward_hook(lambda *_: reusing.append(memory.reuses_freed_memory()))
    embed_source(source, model, processor.image_processor, tmp_path / "emb", batch_size=2, device="cpu")
    assert reusing == [True, True]
    assert not memory.reuses_freed_memory()  # glibc's defaults are back


def test_an_unreadable_image_in_a_tar_shard_is_named_by_shard_and_key(tmp_path, tokenizer, processor, caplog):
    shards, samples = write_webdataset_shards(tmp_path / "shards", [["A dog.", "A cat.", "A car."]])
    broken = tmp_path / "broken.tar"
    import tarfile

    with tarfile.open(shards[0]) as original, tarfile.open(broken, "w") as copy:
        for member in original.getmembers():
            data = original.extractfile(member).read()
            if member.name == "000000001.jpg":
                data = data[:100]  # a truncated JPEG
            member.size = len(data)
            copy.addfile(member, io.BytesIO(data))
    source = load_image_source(data_files=str(broken), caption_column="txt")
    model = tiny_model(tokenizer)
    where = rf"shard {broken}, sample 000000001"
    message = rf"1 image\(s\) cannot be read.*\n  {where}: OSError.*\(key sha256:[0-9a-f]{{64}}\)"
    with pytest.raises(ValueError, match=message):
        embed_source(source, model, processor.image_processor, tmp_path / "emb")
    assert len(load_embeddings(tmp_path / "emb")) == 2  # the readable ones are kept
    with caplog.at_level("WARNING"):
        info = embed_source(source, model, processor.image_processor, tmp_path / "emb", on_bad_image="skip")
    assert info["num_images"] == 2
    assert "Skipped 1 unreadable image(s) and their 1 caption(s)" in caplog.text


def test_an_unreadable_parquet_row_is_named_by_file_row_and_key(tmp_path, tokenizer, processor):
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    good = io.BytesIO()
    random_images(1)[0].save(good, "PNG")
    for number, data in enumerate([[good.getvalue()], [b"not an image", good.getvalue()[:60]]]):
        rows = {"image": [{"bytes": item, "path": None} for item in data], "caption": ["A dog."] * len(data)}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / f"part{number}.parquet"))
    files = [str(tmp_path / "part0.parquet"), str(tmp_path / "part1.parquet")]
    source = load_image_source(data_files=files, caption_column="caption")
    with pytest.raises(ValueError) as error:
        embed_source(source, tiny_model(tokenizer), processor.image_processor, tmp_path / "emb")
    lines = str(error.value).splitlines()
    assert lines[0].startswith("2 image(s) cannot be read")
    key = "sha256:" + __import__("hashlib").sha256(b"not an image").hexdigest()
    problem = "UnidentifiedImageError: cannot identify image file"
    # Rows of the second file: counted in that file, not in the whole source.
    assert lines[1] == f"  shard {files[1]}, row 0 (from 0): {problem} (key {key})"
    assert lines[2].startswith(f"  shard {files[1]}, row 1 (from 0): ")

    # Streamed: datasets gives no file per parquet row, so the source's files and the row of the stream name it.
    streamed = load_image_source(data_files=files, caption_column="caption", streaming=True)
    with pytest.raises(ValueError) as error:
        embed_source(
            streamed, tiny_model(tokenizer), processor.image_processor, tmp_path / "streamed", source_name="part*.pq"
        )
    assert str(error.value).splitlines()[1] == (
        "  a streamed row of part*.pq (row 1 of the stream, from 0; embed it without --streaming to have the row's "
        f"file and number named): {problem} (key {key})"
    )


def test_an_unreadable_image_of_several_arrow_files_is_named_by_its_file_and_row_there(tmp_path, tokenizer, processor):
    import pyarrow

    good = io.BytesIO()
    random_images(1)[0].save(good, "PNG")
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    files = [str(tmp_path / "part0.arrow"), str(tmp_path / "part1.arrow")]
    for path, data in zip(files, [[good.getvalue()] * 2, [good.getvalue(), b"not an image"]]):
        rows = {"image": [{"bytes": item, "path": None} for item in data], "caption": ["A dog."] * len(data)}
        table = datasets.Dataset.from_dict(rows, features=features).data.table
        with pyarrow.OSFile(path, "wb") as sink, pyarrow.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    source = load_image_source(data_files=files, caption_column="caption")
    with pytest.raises(ValueError) as error:
        embed_source(source, tiny_model(tokenizer), processor.image_processor, tmp_path / "emb")
    key = "sha256:" + __import__("hashlib").sha256(b"not an image").hexdigest()
    # Row 3 of the source is row 1 of the second file.
    assert str(error.value).splitlines()[1] == (
        f"  shard {files[1]}, row 1 (from 0): UnidentifiedImageError: cannot identify image file (key {key})"
    )


def test_a_streamed_data_file_that_does_not_read_is_named_as_one_read_whole_is(
    tmp_path, tokenizer, processor, monkeypatch
):
    # A stream meets a malformed line midway, where pyarrow's bare ArrowInvalid names no file.
    import pyarrow

    random_images(1)[0].save(tmp_path / "x.png")
    files = [str(tmp_path / "part0.jsonl"), str(tmp_path / "part1.jsonl")]
    (tmp_path / "part0.jsonl").write_text(json.dumps({"image": "x.png", "caption": "A dog."}) + "\n")
    (tmp_path / "part1.jsonl").write_text(json.dumps({"image": "x.png", "caption": "A cat."}) + "\n{not json\n")
    message = (
        f"{files[1]} cannot be read as json data (line 2: ArrowInvalid: JSON parse error: Missing a name for object "
        "member.); fix or remove it."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        load_image_source(data_files=files, caption_column="caption")
    # Read again as a stream: nothing is prepared into datasets' cache (a stream's files are not to be copied).
    cache = tmp_path / "datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    source = load_image_source(data_files=files, caption_column="caption", streaming=True)
    with pytest.raises(ValueError) as error:
        embed_source(source, tiny_model(tokenizer), processor.image_processor, tmp_path / "emb")
    assert str(error.value) == message
    assert isinstance(error.value.__cause__, pyarrow.ArrowInvalid)  # the reader's own error, kept
    assert not list(cache.rglob("*.arrow"))
    # Met in the first rows, which the source reads when it is loaded (for its columns): named there.
    files.reverse()
    with pytest.raises(ValueError, match=re.escape(f"{files[0]} cannot be read as json data (line 2: ArrowInvalid: ")):
        load_image_source(data_files=files, caption_column="caption", streaming=True)


def test_a_parquet_row_after_skipped_rows_without_an_image_keeps_its_own_row_number(
    tmp_path, tokenizer, processor, caplog
):
    # Rows 1 and 2 of the file have no image; row 3's bytes are no image. Left out, the null rows must not shift the
    # unreadable row's number (it was named as row 1 once they were gone).
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    good = io.BytesIO()
    random_images(1)[0].save(good, "PNG")
    images = [{"bytes": good.getvalue(), "path": None}, None, None, {"bytes": b"not an image", "path": None}]
    rows = {"image": images, "caption": ["A dog.", "A cat.", "A cow.", "A bird."]}
    path = str(tmp_path / "part.parquet")
    datasets.Dataset.from_dict(rows, features=features).to_parquet(path)
    model = tiny_model(tokenizer)
    where = f"shard {path}, row 3 (from 0): UnidentifiedImageError"
    with caplog.at_level("WARNING"):
        source = load_image_source(data_files=path, caption_column="caption", on_bad_image="skip")
        embed_source(source, model, processor.image_processor, tmp_path / "emb", on_bad_image="skip")
    assert where in caplog.text, caplog.text
    # Training from pixels names it the same way.
    data_args = DataArguments(train_file=path, on_bad_image="skip", use_embedding_cache=False)
    with caplog.at_level("WARNING"):
        caplog.clear()
        load_training_data(data_args, model, processor, evaluate=False)
    assert where in caplog.text, caplog.text
    # A dataset given by name (a Hub dataset; here a local folder) names its row in the dataset.
    (tmp_path / "hub").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "hub" / "train.parquet"))
    with caplog.at_level("WARNING"):
        caplog.clear()
        source = load_image_source(dataset_name=str(tmp_path / "hub"), caption_column="caption", on_bad_image="skip")
        embed_source(source, model, processor.image_processor, tmp_path / "emb2", on_bad_image="skip")
    assert "  row 3 (from 0): UnidentifiedImageError" in caplog.text, caplog.text


def test_kept_columns_keep_their_source_types_in_every_shard(tmp_path, tokenizer, processor, monkeypatch):
    import clipcap_hf.data.embeddings as embeddings

    monkeypatch.setattr(embeddings, "EMBEDDING_SHARD_SIZE", 2)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "tags": datasets.Sequence(datasets.Value("string")),
            "meta": {"w": datasets.Value("int32")},
        }
    )
    rows = {"image": random_images(4), "caption": list("abcd"), "tags": [[], [], ["x"], ["y", "z"]]}
    rows["meta"] = [None, None, {"w": 1}, {"w": 2}]  # null, and empty lists, in the whole first shard
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    source = load_image_source(data_files=str(tmp_path / "saved"))
    embed_source(  # shards hold whole batches
        source, tiny_model(tokenizer), processor.image_processor, tmp_path / "emb", batch_size=2,
        keep_columns=["tags", "meta"],
    )
    table = load_embeddings(tmp_path / "emb")
    assert load_embeddings_info(tmp_path / "emb")["num_shards"] == 2
    assert table.features["tags"] == features["tags"] and table.features["meta"] == features["meta"]
    assert table["tags"] == rows["tags"] and table["meta"] == rows["meta"]

    # Another source whose kept column has another type: its shards would not load with these (an alignment error at
    # training time that named neither the folder nor the column).
    other = {"image": random_images(1, seed=9), "caption": ["e"], "tags": ["not a list"], "meta": [{"w": 3}]}
    features = datasets.Features({**features, "tags": datasets.Value("string")})
    datasets.Dataset.from_dict(other, features=features).save_to_disk(str(tmp_path / "other"))
    message = r"emb stores --keep_columns tags as (List|Sequence)\(.*\); this source gives it as Value\((dtype=)?'str"
    with pytest.raises(ValueError, match=message):
        embed_source(load_image_source(data_files=str(tmp_path / "other")), tiny_model(tokenizer),
                     processor.image_processor, tmp_path / "emb", keep_columns=["tags", "meta"])  # fmt: skip
    assert len(load_embeddings(tmp_path / "emb")) == 4


def test_a_kept_image_column_is_stored_as_its_source_bytes_and_a_rerun_is_not_refused(tmp_path, tokenizer, processor):
    def jpeg(image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=75)
        return buffer.getvalue()

    masks = [jpeg(image) for image in random_images(3, seed=5, size=(8, 8))]
    image, text = datasets.Image(), datasets.Value("string")
    features = datasets.Features({"image": image, "mask": image, "caption": text})
    rows = {"image": random_images(3), "mask": [{"bytes": m, "path": None} for m in masks], "caption": list("abc")}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "data.parquet"))
    model = tiny_model(tokenizer)

    def embed():  # as `clipcap embed --keep_columns mask` calls it
        source = load_image_source(data_files=str(tmp_path / "data.parquet"), caption_column="caption")
        return embed_source(
            source, model, processor.image_processor, tmp_path / "emb", keep_columns=["mask"], check_source=True
        )

    embed()
    table = load_embeddings(tmp_path / "emb")
    assert table.features["mask"] == datasets.Image()  # read back as images
    kept = table.cast_column("mask", datasets.Image(decode=False))["mask"]
    assert [value["bytes"] for value in kept] == masks  # the JPEG bytes themselves, not decoded and encoded again
    assert embed()["num_images"] == 3  # the same command again: the stored masks are the source's


def test_another_tower_pooling_or_an_old_cache_folder_is_refused(tmp_path, tokenizer, processor, webdataset_shards):
    model = tiny_model(tokenizer)
    source = load_image_source(data_files=[str(path) for path in webdataset_shards[0]], caption_column="txt")
    embed_source(source, model, processor.image_processor, tmp_path / "emb")
    message = r"computed with another vision tower or image preprocessing \(vision_backend clip, vision_model_type "
    with pytest.raises(ValueError, match=message + r"clip_vision_model, vision_pooling \w+, fingerprint"):
        embed_source(source, tiny_model(tokenizer, seed=1), processor.image_processor, tmp_path / "emb")

    fingerprint = vision_fingerprint(model, processor.image_processor)
    pooling = getattr(model.config, "vision_pooling", None)
    model.config.vision_pooling = "mean"  # another pooling of the same tower: another embedding
    assert vision_fingerprint(model, processor.image_processor) != fingerprint
    model.config.vision_pooling = pooling
    assert vision_fingerprint(model, processor.image_processor) == fingerprint
    model.config.vision_backend = "open_clip"
    assert vision_fingerprint(model, processor.image_processor) != fingerprint
    model.config.vision_backend = "clip"

    # The same weights computing otherwise (an activation edited in config.json): the fingerprint, which stays the
    # same for folders fingerprinted before, does not see it; the stored config does.
    model.vision_model.config.hidden_act = "gelu"
    assert vision_fingerprint(model, processor.image_processor) == fingerprint
    message = r"emb were computed with the same vision weights but other settings: vision_config.hidden_act 'quick_"
    with pytest.raises(ValueError, match=message):
        embed_source(source, model, processor.image_processor, tmp_path / "emb")
    model.vision_model.config.hidden_act = "quick_gelu"

    # An embedding cache of the earlier layout (cache_info.json, shards of image_key/image_embeds).
    old = tmp_path / "old-cache" / "0123456789abcdef"
    old.mkdir(parents=True)
    (old / "cache_info.json").write_text(json.dumps({"version": 1, "fingerprint": "0" * 64}))
    for folder in (old, old.parent):
        with pytest.raises(ValueError, match=r"is an embedding cache of an earlier version .* Rebuild it from its "
                                             r"source: `clipcap embed --model MODEL --train_file SOURCE"):
            load_embeddings(folder)
    data_args = DataArguments(train_file=str(webdataset_shards[0][0]), embedding_cache_dir=str(old))
    with pytest.raises(ValueError, match=r"--embedding_cache_dir .*0123456789abcdef is one embedding cache folder of "
                                         r"an earlier version .* Give the folder of the caches \(its parent"):
        load_training_data(data_args, model, processor, train=True, evaluate=False)


def _tower_with(tokenizer, **settings):
    """A tiny ClipCap model whose tower is a pooled ViT (`pooler_act`, ...) or, with `quick_gelu`, an open_clip ViT."""
    from conftest import TINY_OPEN_CLIP_CFGS, tiny_config
    from transformers import ViTConfig

    if "quick_gelu" in settings:
        tower = {"vision_backend": "open_clip", "open_clip_model_cfg": {**TINY_OPEN_CLIP_CFGS["vit"], **settings}}
    else:
        vision_config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  image_size=32, patch_size=8, **settings)  # fmt: skip
        tower = {"vision_config": vision_config, "vision_pooling": "pooled"}
    config = ClipCapConfig(**tower, text_config=tiny_config(tokenizer).text_config, prefix_length=3, mapping_type="mlp")
    torch.manual_seed(0)
    return ClipCapForConditionalGeneration(config).eval()


@pytest.mark.parametrize(
    "stored, other, harmless, expected",
    [
        ({"pooler_act": "tanh"}, {"pooler_act": "relu"}, {"pooler_act": "tanh", "attention_probs_dropout_prob": 0.3},
         "vision_config.pooler_act 'tanh' (this model's: 'relu')"),
        ({"quick_gelu": True}, {"quick_gelu": False}, None,
         "open_clip_model_cfg.quick_gelu True (this model's: False)"),
    ],
)  # fmt: skip
def test_the_same_weights_set_to_compute_otherwise_are_refused_naming_the_setting(
    tmp_path, tokenizer, stored, other, harmless, expected
):
    image_processor = ClipCapImageProcessor(size=32, crop_size=32)
    model, changed = _tower_with(tokenizer, **stored), _tower_with(tokenizer, **other)
    changed.vision_model.load_state_dict(model.vision_model.state_dict())
    pixel_values = image_processor(random_images(2), return_tensors="pt")["pixel_values"]
    with torch.no_grad():  # they embed otherwise, with one fingerprint, so one training cache folder
        assert not torch.allclose(model.get_image_embeds(pixel_values), changed.get_image_embeds(pixel_values))
    assert vision_fingerprint(model, image_processor) == vision_fingerprint(changed, image_processor)
    folder = embedding_cache_folder(tmp_path / "cache", model, image_processor)
    assert embedding_cache_folder(tmp_path / "cache", changed, image_processor) == folder
    for index, image in enumerate(random_images(2)):
        image.save(tmp_path / f"{index}.png")
    rows = datasets.Dataset.from_dict({"image_path": [str(tmp_path / f"{index}.png") for index in range(2)],
                                       "image_id": [0, 1]})  # fmt: skip
    embed_images(rows, model, image_processor, tmp_path / "cache")
    refusal = re.escape(f"emb were computed with the same vision weights but other settings: {expected}. Embed")
    with pytest.raises(ValueError, match=refusal.replace("emb", "")):  # training's cache too, not reused
        embed_images(rows, changed, image_processor, tmp_path / "cache")
    with pytest.raises(ValueError, match=refusal.replace("emb", "")):
        check_embeddings(folder, changed, image_processor)
    if harmless is not None:  # a setting that cannot change an embedding is no reason to embed again
        unchanged = _tower_with(tokenizer, **harmless)
        unchanged.vision_model.load_state_dict(model.vision_model.state_dict())
        check_embeddings(folder, unchanged, image_processor)
    else:  # a folder written before the open_clip config was recorded is read as before
        info = json.loads((folder / "embeddings_info.json").read_text())
        del info["vision"]["open_clip_model_cfg"]
        (folder / "embeddings_info.json").write_text(json.dumps(info))
        check_embeddings(folder, changed, image_processor)


# Runs `clipcap embed ARGS...` in a fresh interpreter, one image per shard, killed by SIGKILL while its third shard is
# written (saved under its temporary name, not yet renamed).
KILLED_EMBED = r"""
import os, signal, sys
import datasets
import clipcap_hf.data.embeddings as embeddings
embeddings.EMBEDDING_SHARD_SIZE = 1
real_save_to_disk, saved = datasets.Dataset.save_to_disk, []
def save_to_disk(self, path, *args, **kwargs):
    real_save_to_disk(self, path, *args, **kwargs)
    saved.append(path)
    if len(saved) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
datasets.Dataset.save_to_disk = save_to_disk
from clipcap_hf.commands import main
sys.exit(main(["embed", *sys.argv[1:]]))
"""


def test_a_killed_embedding_run_resumes_and_stores_every_image_once(tmp_path, model_dir, webdataset_shards, capsys):
    shards = ",".join(str(path) for path in webdataset_shards[0])
    arguments = ["--model", str(model_dir), "--train_file", shards, "--batch_size", "1"]
    assert main(["embed", *arguments, "--output", str(tmp_path / "whole")]) == 0
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_EMBED, *arguments, "--output", str(tmp_path / "emb")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert len(list((tmp_path / "emb").glob("shard-*"))) == 2  # killed where meant
    assert len(list((tmp_path / "emb").glob(".tmp-shard-*"))) == 1  # the third, left under its temporary name
    assert "num_images" not in load_embeddings_info(tmp_path / "emb")  # the info says it is incomplete
    # Nothing trains on or captions the part of the source embedded so far.
    capsys.readouterr()
    emb = ["--embeddings", str(tmp_path / "emb")]
    train = train_arguments(tmp_path / "out", "--model_name_or_path", str(model_dir), *emb)
    caption = ["caption", "--model", str(model_dir), *emb, "--output", str(tmp_path / "captions")]
    for argv in (["train", *train, "--embedding_cache_dir", str(tmp_path / "cache")], caption):
        assert main(argv) == 2
        assert "are from a `clipcap embed` pass that has not finished" in capsys.readouterr().err
    assert not (tmp_path / "out" / "all_results.json").exists()

    assert main(["embed", *arguments, "--output", str(tmp_path / "emb")]) == 0
    assert not list((tmp_path / "emb").glob(".tmp-*"))  # the rerun removed the killed run's leftover
    resumed, whole = stored(tmp_path / "emb"), stored(tmp_path / "whole")
    assert sorted(resumed) == sorted(whole) and len(resumed) == 5
    for key, (embedding, captions) in whole.items():
        assert resumed[key][1] == captions
        np.testing.assert_allclose(resumed[key][0], embedding, atol=1e-6)
    assert load_embeddings_info(tmp_path / "emb")["num_images"] == 5


def test_a_rerun_into_a_folder_that_stores_other_captions_is_refused_and_new_images_are_added(
    tmp_path, model_dir, capsys
):
    for number, image in enumerate(random_images(3, seed=3)):
        image.save(tmp_path / f"{number}.png")
    (tmp_path / "2.png").write_bytes(b"not an image yet")

    def write_source(captions: dict[int, list[str]]):
        lines = [json.dumps({"image": f"{number}.png", "caption": caption})
                 for number, texts in captions.items() for caption in texts]  # fmt: skip
        (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")

    arguments = ["embed", "--model", str(model_dir), "--train_file", str(tmp_path / "data.jsonl"), "--output",
                 str(tmp_path / "emb")]  # fmt: skip
    # Image 0 given by two rows: its captions are merged, as the pass stores them. Image 2 does not read yet.
    write_source({0: ["a dog", "a pup"], 1: ["a cat"], 2: ["a cow"]})
    assert main(arguments) == 2
    random_images(1, seed=5)[0].save(tmp_path / "2.png")  # fixed: the rerun adds it
    write_source({0: ["a dog", "a pup"], 1: ["a cat"], 2: ["a cow"], 3: ["a bird"]})
    random_images(1, seed=6)[0].save(tmp_path / "3.png")  # and a new row: added too
    assert main(arguments) == 0
    assert sorted(captions for _, captions in stored(tmp_path / "emb").values()) == [
        ["a bird"], ["a cat"], ["a cow"], ["a dog", "a pup"]
    ]

    # Captions edited since: the rerun kept the stored ones, which training then read.
    for edited in ({0: ["a dog", "a puppy"], 1: ["a cat"], 2: ["a cow"], 3: ["a bird"]},
                   {0: ["a dog", "a pup"], 1: ["a kitten"], 2: ["a cow"], 3: ["a bird"]}):  # fmt: skip
        write_source(edited)
        capsys.readouterr()
        assert main(arguments) == 2
        assert "stores 1 image(s) with other captions or kept values than this source's (the first: " in (
            capsys.readouterr().err
        )
    write_source({0: ["a dog", "a pup"], 1: ["a cat"], 2: ["a cow"], 3: ["a bird"]})
    random_images(1, seed=4)[0].save(tmp_path / "1.png")  # a file replaced at its path: embedded again, as before
    assert main(arguments) == 0
    keys = sorted(stored(tmp_path / "emb"))
    assert keys == sorted(set(load_image_source(data_files=str(tmp_path / "data.jsonl"))["image_key"]))


@pytest.mark.parametrize(
    "environment, expected",
    [
        ({}, "cuda"),
        ({"WORLD_SIZE": "1", "LOCAL_RANK": "3"}, "cuda"),
        ({"WORLD_SIZE": "4", "LOCAL_RANK": "3"}, "cuda:1"),
    ],
)
def test_each_process_of_a_distributed_launch_takes_its_own_gpu_unless_told_a_device(
    monkeypatch, environment, expected
):
    """What `clipcap embed` and `clipcap caption` run on: here 2 GPUs, and LOCAL_RANK 3 of 4 processes takes cuda:1."""
    from clipcap_hf.commands._utils import resolve_device

    for name in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None) == torch.device(expected)
    assert resolve_device("cpu") == torch.device("cpu")


def test_two_torchrun_ranks_each_embed_about_half_and_the_union_holds_every_image_once(tmp_path, model_dir):
    """Also while another run holds the folder: both processes wait for it (process 0 on the lock), then embed."""
    from filelock import FileLock

    captions = [[f"Image {shard} {index}." for index in range(6)] for shard in range(2)]
    shards, samples = write_webdataset_shards(tmp_path / "shards", captions)
    script = tmp_path / "embed.py"
    script.write_text("import sys\nfrom clipcap_hf.commands import main\nsys.exit(main(['embed', *sys.argv[1:]]))\n")
    arguments = ["--model", str(model_dir), "--train_file", str(tmp_path / "shards" / "*.tar"), "--batch_size", "2"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    (tmp_path / "emb").mkdir()
    other_run = FileLock(tmp_path / "emb" / ".embeddings-writer.lock")
    other_run.acquire()
    run = subprocess.Popen(
        [*command, *arguments, "--output", str(tmp_path / "emb")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    try:
        before = []  # its log until it says it waits (all of it if it never does)
        for line in run.stderr:
            before.append(line)
            if "Waiting for another run writing into the embeddings folder" in line:
                break
        assert not list((tmp_path / "emb").glob("shard-*")), "".join(before)[-3000:]
    finally:
        other_run.release()
        stdout, stderr = run.communicate(timeout=300)
    assert "Waiting for another run" in before[-1], "".join(before)[-3000:]
    assert run.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert stdout.count('"num_images": 12') == 1  # one summary, from the main process
    # Each rank wrote its own shards, with its share of the images (the keys' hash decides): about half each.
    keys = {
        rank: [key for shard in (tmp_path / "emb").glob(f"shard-rank{rank:05d}-of-00002-*")
               for key in datasets.load_from_disk(str(shard))["image_key"]]
        for rank in (0, 1)
    }  # fmt: skip
    assert all(len(keys[rank]) >= 3 for rank in (0, 1))
    assert not set(keys[0]) & set(keys[1])

    assert main(["embed", *arguments, "--output", str(tmp_path / "single")]) == 0
    together, single = stored(tmp_path / "emb"), stored(tmp_path / "single")
    assert sorted(together) == sorted(single) and len(together) == 12
    for key, (embedding, image_captions) in single.items():
        assert together[key][1] == image_captions
        np.testing.assert_allclose(together[key][0], embedding, atol=1e-6)


def test_torchrun_ranks_that_do_not_share_the_output_folder_stop_before_embedding(tmp_path, model_dir):
    """Two machines, each with a local folder at the path given as --output: here each rank gets its own folder."""
    write_webdataset_shards(tmp_path / "shards", [["A dog.", "A cat."]])
    script = tmp_path / "embed.py"
    script.write_text(
        "import os, sys\nfrom clipcap_hf.commands import main\n"
        "arguments = [a.replace('MACHINE', 'machine' + os.environ['RANK']) for a in sys.argv[1:]]\n"
        "sys.exit(main(['embed', *arguments]))\n"
    )
    arguments = ["--model", str(model_dir), "--train_file", str(tmp_path / "shards" / "*.tar")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [*command, *arguments, "--output", str(tmp_path / "MACHINE" / "emb")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    for rank in (0, 1):  # each process names its own folder, with the fix
        folder = tmp_path / f"machine{rank}" / "emb"
        assert (
            f"clipcap embed: error: Process(es) 1 of 2 do not see the embeddings folder {folder} that process 0 "
            "writes: every process must write into one folder, so put it on a filesystem that all machines share"
        ) in result.stderr, result.stderr[-3000:]
    assert not list(tmp_path.glob("machine*/emb/shard-*"))  # stopped before embedding anything
    assert not list(tmp_path.glob("machine*/emb/.shared-folder-check*"))  # and left no marker behind


def train_arguments(output_dir, *source):
    return [
        *source,
        "--output_dir", str(output_dir),
        "--do_train",
        "--max_steps", "2",
        "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-2",
        "--save_strategy", "no",
        "--use_cpu",
        "--report_to", "none",
        "--disable_tqdm", "true",
    ]  # fmt: skip


def test_train_from_an_embeddings_folder_memory_mapped(tmp_path, tokenizer, processor, model_dir, webdataset_shards):
    shards = ",".join(str(path) for path in webdataset_shards[0])
    assert main(["embed", "--model", str(model_dir), "--train_file", shards, "--output", str(tmp_path / "emb")]) == 0
    arguments = train_arguments(tmp_path / "out", "--model_name_or_path", str(model_dir))
    before = snapshot(tmp_path / "emb")
    cache = ["--embedding_cache_dir", str(tmp_path / "cache")]
    assert main(["train", *arguments, "--embeddings", str(tmp_path / "emb"), *cache]) == 0
    assert json.loads((tmp_path / "out/all_results.json").read_text())["train_samples"] == 5
    # Training only read the folder (it may be read-only or shared): no file added, removed or touched. Its caption
    # rows are cached under the cache folder instead.
    assert snapshot(tmp_path / "emb") == before
    assert list((tmp_path / "cache" / "caption_rows").glob("*.arrow"))

    # The data layer's table is the folder itself, memory-mapped, and the collator reads the stored embeddings.
    data_args = DataArguments(embeddings=str(tmp_path / "emb"), embedding_cache_dir=str(tmp_path / "cache"))
    model = tiny_model(tokenizer)
    data = load_training_data(data_args, model, processor, train=True, evaluate=False)
    assert isinstance(data.image_embeds, datasets.Dataset)
    assert is_memory_mapped(data.image_embeds)
    table = load_embeddings(tmp_path / "emb")
    captions = [caption for row in table["captions"] for caption in row]
    assert data.train["caption"] == captions and data.train["image_index"] == list(range(5))
    from clipcap_hf.data import ClipCapDataCollator

    batch = ClipCapDataCollator(processor, image_embeds=data.image_embeds)([data.train[3], data.train[0]])
    stored_embeddings = torch.tensor(np.array(table["embedding"], dtype=np.float32))
    torch.testing.assert_close(batch["image_embeds"], stored_embeddings[[3, 0]])

    # A folder of another tower is refused before training.
    other = tmp_path / "other"
    tiny_model(tokenizer, seed=3).save_pretrained(other)
    processor.save_pretrained(other)
    with pytest.raises(ValueError, match="were computed with another vision tower"):
        from clipcap_hf.training import main as train_main

        train_main(train_arguments(tmp_path / "out2", "--model_name_or_path", str(other), "--embeddings",
                                   str(tmp_path / "emb")))  # fmt: skip


def test_training_on_a_raw_source_embeds_it_first_and_streaming_trains_from_pixels(
    tmp_path, model_dir, webdataset_shards
):
    from clipcap_hf.training import main as train_main

    pattern = str(webdataset_shards[0][0].parent / "*.tar")
    arguments = train_arguments(tmp_path / "out", "--model_name_or_path", str(model_dir), "--train_file", pattern)
    metrics = train_main([*arguments, "--embedding_cache_dir", str(tmp_path / "cache")])
    assert metrics["train_samples"] == 5
    (folder,) = (tmp_path / "cache").iterdir()
    assert load_embeddings_info(folder)["num_images"] == 5

    streamed = train_main([*arguments, "--streaming", "--output_dir", str(tmp_path / "streamed")])
    assert "train_loss" in streamed and (tmp_path / "streamed/model.safetensors").exists()
    with pytest.raises(ValueError, match="--streaming needs --max_steps"):
        train_main([*arguments, "--streaming", "--max_steps", "-1", "--output_dir", str(tmp_path / "endless")])
