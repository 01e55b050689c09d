"""Embeddings folders kept sound across runs: each image read once, replaced image files not served twice (their
shards' rewrites lose no row when interrupted), killed runs' leftovers removed, runs sharing a folder taking turns,
non-finite embeddings refused with the earlier ones kept."""

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import count_vision_images, random_images, tiny_model
from test_embed import expected_embeddings, is_memory_mapped, model_dir, stored  # noqa: F401 (model_dir: a fixture)

import clipcap_hf.data.embeddings as embeddings
import clipcap_hf.data.sources as sources
from clipcap_hf import ClipCapForConditionalGeneration, ClipCapProcessor
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
    (folder / "3.png").write_bytes(b"not an image")
    metadata = [json.dumps({"file_name": f"{index}.png", "text": f"Image {index}."}) for index in range(4)]
    (folder / "metadata.jsonl").write_text("\n".join(metadata) + "\n")
    model = tiny_model(tokenizer)

    def embed():
        source = load_image_source(data_files=str(folder), caption_column="text")
        return embed_source(source, model, processor.image_processor, tmp_path / "emb", on_bad_image="skip")

    embed()
    before = stored(tmp_path / "emb")
    (shard,) = embeddings._complete_shards(tmp_path / "emb")
    unreadable_keys = shard / embeddings.UNREADABLE_KEYS_NAME
    assert json.loads(unreadable_keys.read_text()) == [image_cache_key(str(folder / "3.png"))]
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
    # The rewritten first shard still records its batch's unreadable image.
    assert json.loads(unreadable_keys.read_text()) == [image_cache_key(str(folder / "3.png"))]
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


def test_a_file_replaced_with_its_caption_edited_is_embedded_again_not_refused(tmp_path, tokenizer, processor):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(random_images(2)):
        image.save(folder / f"{index}.png")
    model = tiny_model(tokenizer)

    def embed(captions: list[str]):  # as `clipcap embed` calls it
        lines = [json.dumps({"file_name": f"{index}.png", "text": text}) for index, text in enumerate(captions)]
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        source = load_image_source(data_files=str(folder), caption_column="text")
        return embed_source(source, model, processor.image_processor, tmp_path / "emb", check_source=True)

    embed(["Image 0.", "A blurry photo."])
    replaced = folder / "1.png"
    old_key = image_cache_key(str(replaced))
    random_images(1, seed=9)[0].save(replaced)  # a new picture, and the new picture's caption
    os.utime(replaced, ns=(10**18, 10**18))
    info = embed(["Image 0.", "A sharp new photo."])
    after = stored(tmp_path / "emb")
    assert (info["num_images"], info["num_replaced"]) == (2, 1)
    assert old_key not in after and after[image_cache_key(str(replaced))][1] == ["A sharp new photo."]
    # The caption of a file left as it is still may not change under the folder.
    with pytest.raises(ValueError, match=r"stores 1 image\(s\) with other captions .*the first: .*0\.png\|"):
        embed(["Image zero.", "A sharp new photo."])


def test_a_killed_runs_leftovers_are_removed_by_process_0_before_its_run_writes(
    tmp_path, tokenizer, processor, webdataset_shards, monkeypatch
):
    folder = tmp_path / "emb"
    folder.mkdir()
    leftover = datasets.Dataset.from_dict({"image_key": ["x"], "embedding": [[0.0]]})  # what save_to_disk leaves
    temporary = []
    for name in ("rank00000-of-00002-00000-0123", "rank00003-of-00004-00007-4567", "rank00001-of-00002-00000-89ab"):
        temporary.append(folder / f".tmp-shard-{name}")
        leftover.save_to_disk(str(temporary[-1]))
    info_file = folder / ".embeddings_info.json.0123abcd.tmp"
    marker = folder / ".shared-folder-check-0123abcd"
    for path in (info_file, marker):
        path.write_text("left by a killed run")
    source = load_image_source(data_files=[str(path) for path in webdataset_shards[0]], caption_column="txt")
    model = tiny_model(tokenizer)
    # Process 0 of 2 (without a process group: every gather is its own). It holds the folder's lock, so no other run
    # writes there, and its own process 1 only starts once the leftovers are gone (it waits in the first gather).
    monkeypatch.setattr(embeddings, "_world_size", lambda: 2)
    embed_source(source, model, processor.image_processor, folder)
    assert not any(path.exists() for path in (*temporary, info_file, marker))
    assert list(folder.glob("shard-rank00000-of-00002-*"))
    assert sorted(path.name for path in folder.iterdir() if not path.name.startswith("shard-")) == [
        ".embeddings-writer.lock", "embeddings_info.json"
    ]


def embed_files(folder, model, processor, output, batch_size=64):
    """Embed the image files of `folder` (captions from its metadata.jsonl) into `output`."""
    source = load_image_source(data_files=str(folder), caption_column="text")
    return embed_source(source, model, processor.image_processor, output, batch_size=batch_size)


def image_folder(path, count):
    path.mkdir()
    for index, image in enumerate(random_images(count)):
        image.save(path / f"{index}.png")
    lines = [json.dumps({"file_name": f"{index}.png", "text": f"Image {index}."}) + "\n" for index in range(count)]
    (path / "metadata.jsonl").write_text("".join(lines))
    return path


# The first run's shard, rewritten without the row of the file replaced since (the rerun's new row is the next one).
REWRITTEN = "shard-rank00000-of-00001-00000"


def replace_file(path, seed=9):
    random_images(1, seed=seed)[0].save(path)
    os.utime(path, ns=(10**18, 10**18))  # another modification time whatever the clock's resolution


def test_a_shard_rewrite_interrupted_between_its_renames_keeps_every_row(tmp_path, tokenizer, processor, monkeypatch):
    """Ctrl-C while a shard losing a replaced file's row is renamed: the old shard is put back at once."""
    folder, model = image_folder(tmp_path / "images", 4), tiny_model(tokenizer)
    embed_files(folder, model, processor, tmp_path / "emb")
    before = stored(tmp_path / "emb")
    replace_file(folder / "1.png")
    real_replace = os.replace

    def interrupted(source, destination):
        if Path(source).name.startswith(".tmp-shard-") and Path(destination).name == REWRITTEN:
            raise KeyboardInterrupt  # the rewritten shard about to take the old one's name
        return real_replace(source, destination)

    monkeypatch.setattr(embeddings.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embed_files(folder, model, processor, tmp_path / "emb")
    monkeypatch.undo()
    after = stored(tmp_path / "emb")
    assert set(before) < set(after) and len(after) == 5  # every row kept, and the replaced file's new one
    for key, (embedding, captions) in before.items():
        np.testing.assert_array_equal(after[key][0], embedding)
        assert after[key][1] == captions
    assert not list((tmp_path / "emb").glob(".aside-*")) and not list((tmp_path / "emb").glob(".tmp-*"))

    info = embed_files(folder, model, processor, tmp_path / "emb")  # the rerun drops the old row again
    assert (info["num_images"], info["num_replaced"]) == (4, 1)
    assert sorted(stored(tmp_path / "emb")) == sorted(image_cache_key(str(folder / f"{i}.png")) for i in range(4))


KILLED_AT_A_RENAME = r"""
import os, signal, sys
from pathlib import Path

import clipcap_hf.data.embeddings as embeddings
from clipcap_hf import ClipCapForConditionalGeneration, ClipCapProcessor
from clipcap_hf.data import embed_source, load_image_source

model_dir, folder, output, killed_while = sys.argv[1:]
rewritten = "shard-rank00000-of-00001-00000"
real_replace = os.replace


def replace_or_die(source, destination):
    old, new = Path(source).name, Path(destination).name
    renaming = old.startswith(".tmp-shard-") and new == rewritten  # the rewritten shard into place
    deleting = old == ".aside-" + rewritten and new.startswith(".tmp-")  # the old shard on its way out
    if renaming if killed_while == "renaming" else deleting:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(source, destination)


embeddings.os.replace = replace_or_die
model = ClipCapForConditionalGeneration.from_pretrained(model_dir).eval()
processor = ClipCapProcessor.from_pretrained(model_dir)
embed_source(load_image_source(data_files=folder, caption_column="text"), model, processor.image_processor, output)
sys.exit(1)  # not reached when killed where meant
"""


@pytest.mark.parametrize(
    "killed_while, num_replaced",
    [
        ("renaming the rewritten shard into place", 1),  # the old one is put back, its row dropped again
        ("deleting the old shard", 0),  # the rewritten one stays
    ],
)
def test_a_shard_rewrite_killed_midway_is_settled_by_the_next_run(
    tmp_path, model_dir, killed_while, num_replaced  # noqa: F811 (model_dir: a fixture)
):
    folder, emb = image_folder(tmp_path / "images", 4), tmp_path / "emb"
    model = ClipCapForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = ClipCapProcessor.from_pretrained(model_dir)
    embed_files(folder, model, processor, emb)
    before, old_key = stored(emb), image_cache_key(str(folder / "1.png"))
    replace_file(folder / "1.png")
    # A process of its own (not a fork of this one, whose OpenMP threads a forked child cannot use), SIGKILLed there
    mode = "renaming" if killed_while.startswith("renaming") else "deleting"
    arguments = [str(model_dir), str(folder), str(emb), mode]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_A_RENAME, *arguments], env=env, capture_output=True,
                            check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert (emb / f".aside-{REWRITTEN}").exists()  # killed where meant: the old shard moved aside
    assert (emb / REWRITTEN).exists() == (num_replaced == 0)

    seen, patch = count_vision_images(model)
    with patch:
        info = embed_files(folder, model, processor, emb)
    assert seen == []  # nothing lost, so nothing embedded again
    after = stored(emb)
    assert (info["num_images"], info["num_replaced"], len(after)) == (4, num_replaced, 4)
    assert sorted(after) == sorted(image_cache_key(str(folder / f"{index}.png")) for index in range(4))
    for key in set(before) - {old_key}:
        np.testing.assert_array_equal(after[key][0], before[key][0])
    assert sorted(path.name for path in emb.iterdir() if not path.name.startswith("shard-")) == [
        ".embeddings-rewrite.lock", ".embeddings-writer.lock", "embeddings_info.json"  # the rewrites' lock stays
    ]


def test_a_second_run_sharing_the_folder_waits_for_the_first_then_embeds_only_the_rest(
    tmp_path, tokenizer, processor, monkeypatch
):
    """Two runs of a sweep sharing one cache folder (here threads of one process: the lock is a file's)."""
    folder, model = image_folder(tmp_path / "images", 4), tiny_model(tokenizer)
    images = load_image_source(data_files=str(folder), caption_column="text")
    parts = [images.select(range(3)), images.select(range(1, 4))]  # the second run adds image 3
    seen = {}
    real_forward = model.vision_model.forward

    def counting_forward(pixel_values=None, **kwargs):
        seen.setdefault(threading.current_thread().name, []).append(pixel_values.shape[0])
        return real_forward(pixel_values=pixel_values, **kwargs)

    saved, go, waiting = threading.Event(), threading.Event(), threading.Event()
    real_save = datasets.Dataset.save_to_disk

    def paused_save(self, path, *args, **kwargs):  # the first run stops with its temporary shard half done
        real_save(self, path, *args, **kwargs)
        if threading.current_thread().name == "first":
            saved.set()
            go.wait(timeout=120)

    def warning(message, *args, **kwargs):
        if message.startswith("Waiting for another run writing into the embeddings folder"):
            waiting.set()

    monkeypatch.setattr(model.vision_model, "forward", counting_forward)
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", paused_save)
    monkeypatch.setattr(embeddings.logger, "warning", warning)
    errors, emb = {}, tmp_path / "emb"

    def run(source):
        try:
            embed_source(source, model, processor.image_processor, emb)
        except Exception as error:
            errors[threading.current_thread().name] = error

    runs = [threading.Thread(target=run, args=(part,), name=name) for name, part in zip(("first", "second"), parts)]
    try:
        runs[0].start()
        assert saved.wait(timeout=120)
        runs[1].start()
        while not waiting.is_set() and runs[1].is_alive():
            waiting.wait(timeout=0.05)
        assert waiting.is_set() and runs[1].is_alive()  # the second waits, and has not touched the first's files
        assert len(list(emb.glob(".tmp-shard-*"))) == 1 and not list(emb.glob("shard-*"))
    finally:
        go.set()
        for thread in runs:
            thread.join(timeout=120)
    assert errors == {}
    assert seen == {"first": [3], "second": [1]}  # the second embedded only the image the first had not
    table = stored(emb)
    assert sorted(table) == sorted(images["image_key"])
    assert load_embeddings_info(emb)["num_images"] == 4


def test_while_process_0_waits_for_the_folder_every_process_of_its_run_checks_in(
    tmp_path, tokenizer, processor, webdataset_shards, monkeypatch
):
    """Processes 1.. of a run wait in a gather with process 0: each must end long before the distributed timeout."""
    from filelock import FileLock

    source = load_image_source(data_files=[str(path) for path in webdataset_shards[0]], caption_column="txt")
    model, emb = tiny_model(tokenizer), tmp_path / "emb"
    emb.mkdir()
    gathered = []
    real_gather = embeddings._all_gather
    monkeypatch.setattr(embeddings, "_world_size", lambda: 2)  # process 0 of 2, the gathers its own
    monkeypatch.setattr(embeddings, "_all_gather", lambda value: gathered.append(value) or real_gather(value))
    monkeypatch.setattr(embeddings, "_LOCK_POLL_SECONDS", 0.05)
    other_run = FileLock(emb / ".embeddings-writer.lock")
    other_run.acquire()
    waiting = threading.Thread(target=embed_source, args=(source, model, processor.image_processor, emb))
    try:
        waiting.start()
        while len(gathered) < 3 and waiting.is_alive():
            time.sleep(0.01)
        assert gathered[:3] == [(False, None)] * 3  # "not yet", said again every poll while the other run writes
        assert not list(emb.glob("shard-*"))
    finally:
        other_run.release()
        waiting.join(timeout=120)
    assert (True, None) in gathered and list(emb.glob("shard-rank00000-of-00002-*"))  # then it embedded its share


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


def images_with_the_second_unreadable(count: int) -> list[dict[str, Any]]:
    """`count` PNG images as a `datasets.Image` column's values, the second of them not an image."""
    files = [io.BytesIO() for _ in range(count)]
    for image, file in zip(random_images(count), files):
        image.save(file, "PNG")
    images = [{"bytes": file.getvalue(), "path": None} for file in files]
    images[1] = {"bytes": b"not an image", "path": None}
    return images


def batch_dependent_embeds(model):
    """
    The model's `get_image_embeds`, made to depend plainly on the batch an image is computed in (its size and the
    image's place in it): on the CPU an embedding's last bits do.
    """
    real_embeds = model.get_image_embeds

    def embeds(pixel_values):
        place = torch.arange(len(pixel_values), dtype=torch.float32)[:, None]
        return real_embeds(pixel_values) + 0.01 * len(pixel_values) + 0.001 * place

    return embeds


def interrupted_at(call: int, embeds):
    """`embeds` interrupted (`KeyboardInterrupt`) at its `call`-th call, and the list of the batch sizes it gets."""
    calls = []

    def interrupted(pixel_values):
        calls.append(len(pixel_values))
        if len(calls) == call:
            raise KeyboardInterrupt
        return embeds(pixel_values)

    return interrupted, calls


def assert_same_values(folder: Path, expected_folder: Path, num_images: int) -> None:
    """Both folders store the same images with the same captions and embeddings, to the last bit."""
    expected, result = stored(expected_folder), stored(folder)
    assert expected.keys() == result.keys() and len(result) == num_images
    for key, (embedding, captions) in expected.items():
        np.testing.assert_array_equal(result[key][0], embedding)
        assert result[key][1] == captions


@pytest.mark.parametrize("streaming", [False, True])
def test_a_killed_and_rerun_pass_stores_the_values_of_an_uninterrupted_one(
    tmp_path, tokenizer, processor, monkeypatch, streaming
):
    # Batches of 3 do not divide shards of 4; row 1 is unreadable.
    monkeypatch.setattr(embeddings, "EMBEDDING_SHARD_SIZE", 4)
    images = images_with_the_second_unreadable(11)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    rows = {"image": images, "caption": [f"Image {index}." for index in range(11)]}
    path = str(tmp_path / "part.parquet")
    datasets.Dataset.from_dict(rows, features=features).to_parquet(path)
    model = tiny_model(tokenizer)
    batch_dependent = batch_dependent_embeds(model)

    def embed(folder):
        source = load_image_source(data_files=path, caption_column="caption", streaming=streaming)
        return embed_source(source, model, processor.image_processor, folder, batch_size=3, on_bad_image="skip")

    with mock.patch.object(model, "get_image_embeds", batch_dependent):
        embed(tmp_path / "uninterrupted")
        # Killed in its third batch: a killed process writes no last shard.
        killed_in_third_batch, _ = interrupted_at(3, batch_dependent)
        with mock.patch.object(model, "get_image_embeds", killed_in_third_batch), \
                mock.patch.object(embeddings._ShardWriter, "flush", lambda writer: None), \
                pytest.raises(KeyboardInterrupt):
            embed(tmp_path / "resumed")
        assert len(load_embeddings(tmp_path / "resumed")) == 5  # the first shard: two whole batches, less row 1
        info = embed(tmp_path / "resumed")
    assert info["num_images"] == 10
    assert_same_values(tmp_path / "resumed", tmp_path / "uninterrupted", num_images=10)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_killed_pass_among_another_sources_images_resumes_to_the_same_values_past_an_unreadable_image(
    tmp_path, tokenizer, processor, monkeypatch, streaming
):
    # A folder shared with a first source (the even images): each batch of the second source holds a stored image, so
    # its odd images are embedded in batches of their own, and image 1 is unreadable. Killed after its first batch
    # ([1, 3]) is stored, a rerun must not batch image 1 again among the others.
    monkeypatch.setattr(embeddings, "EMBEDDING_SHARD_SIZE", 1)  # every batch a shard
    images = images_with_the_second_unreadable(12)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    for name, indices in (("first", range(0, 12, 2)), ("second", range(12))):
        rows = {"image": [images[index] for index in indices], "caption": [f"Image {index}." for index in indices]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / f"{name}.parquet")
    model = tiny_model(tokenizer)
    batch_dependent = batch_dependent_embeds(model)

    def embed(name, folder):
        source = load_image_source(data_files=str(tmp_path / f"{name}.parquet"), caption_column="caption",
                                   streaming=streaming)
        return embed_source(source, model, processor.image_processor, folder, batch_size=2, on_bad_image="skip")

    killed_in_second_batch, calls = interrupted_at(2, batch_dependent)
    with mock.patch.object(model, "get_image_embeds", batch_dependent):
        for folder in ("uninterrupted", "resumed"):
            embed("first", tmp_path / folder)
        embed("second", tmp_path / "uninterrupted")
        with mock.patch.object(model, "get_image_embeds", killed_in_second_batch), pytest.raises(KeyboardInterrupt):
            embed("second", tmp_path / "resumed")
        assert calls == [1, 2]  # image 3 alone (1 unreadable), then [5, 7], killed
        assert len(load_embeddings(tmp_path / "resumed")) == 7
        seen, patch = count_vision_images(model)
        with patch:
            info = embed("second", tmp_path / "resumed")
    assert seen == [2, 2] and info["num_images"] == 11  # [5, 7] and [9, 11]; image 1 read again, alone
    assert_same_values(tmp_path / "resumed", tmp_path / "uninterrupted", num_images=11)


@pytest.mark.parametrize("streaming", [False, True])
def test_images_scattered_among_stored_ones_are_embedded_in_whole_batches(
    tmp_path, tokenizer, processor, streaming
):
    # A folder shared by two sources: the second's new images lie between images the first stored.
    files = [io.BytesIO() for _ in range(8)]
    for image, file in zip(random_images(8), files):
        image.save(file, "PNG")
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    for name, indices in (("first", range(0, 8, 2)), ("all", range(8))):
        rows = {"image": [{"bytes": files[index].getvalue(), "path": None} for index in indices],
                "caption": [f"Image {index}." for index in indices]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / f"{name}.parquet")
    model = tiny_model(tokenizer)

    def embed(name):
        source = load_image_source(data_files=str(tmp_path / f"{name}.parquet"), caption_column="caption",
                                   streaming=streaming)
        return embed_source(source, model, processor.image_processor, tmp_path / "emb", batch_size=3)

    embed("first")
    seen, patch = count_vision_images(model)
    with patch:
        info = embed("all")
    assert seen == [3, 1] and info["num_images"] == 8  # not one batch per image between stored ones
