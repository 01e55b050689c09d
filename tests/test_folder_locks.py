"""Locks on shared folders: readers of an embeddings folder never see a shard mid-rewrite (they wait for it, within
a bound, and a rewrite waits for them), and a filesystem without file locks is an error naming the folder."""

import errno
import fcntl
import os
import re
import shutil
import subprocess
import sys
import threading

import datasets
import filelock
import pytest
from conftest import tiny_model
from test_embed import snapshot, stored
from test_embed_cache import embed_files, image_folder, replace_file

import clipcap_hf.data.embeddings as embeddings
from clipcap_hf.data import embed_source, image_cache_key, load_embeddings

SECOND_SHARD = "shard-rank00000-of-00001-00001"


@pytest.fixture
def two_shards(tmp_path, tokenizer, processor, monkeypatch):
    """An embeddings folder of 4 image files in 2 shards, and the files' keys in order."""
    folder = image_folder(tmp_path / "images", 4)
    with monkeypatch.context() as patch:
        patch.setattr(embeddings, "EMBEDDING_SHARD_SIZE", 2)
        embed_files(folder, tiny_model(tokenizer), processor, tmp_path / "emb", batch_size=2)  # whole batches a shard
    keys = [image_cache_key(str(folder / f"{index}.png")) for index in range(4)]
    assert sorted(path.name for path in (tmp_path / "emb").glob("shard-*"))[1] == SECOND_SHARD
    return tmp_path / "emb", keys


def record_warnings(monkeypatch, prefix: str) -> threading.Event:
    """An event set when the embeddings module logs a warning starting with `prefix`."""
    logged = threading.Event()

    def warning(message, *args, **kwargs):
        if message.startswith(prefix):
            logged.set()

    monkeypatch.setattr(embeddings.logger, "warning", warning)
    return logged


def test_a_reader_waits_for_a_shard_rewrite_and_opens_the_shard_after_it(two_shards, monkeypatch):
    emb, _ = two_shards
    waiting = record_warnings(monkeypatch, "Waiting for a run rewriting shards of the embeddings folder")
    shard = emb / SECOND_SHARD
    rewrite = filelock.FileLock(emb / ".embeddings-rewrite.lock")  # what a rewrite holds, another run's here
    rewrite.acquire()
    aside = emb / f".aside-{SECOND_SHARD}"
    os.replace(shard, aside)  # the rewrite midway: the old shard aside, its new version not in place yet
    read = {}
    reader = threading.Thread(target=lambda: read.update(table=load_embeddings(emb)))
    try:
        reader.start()
        while not waiting.is_set() and reader.is_alive():
            waiting.wait(timeout=0.05)
        assert waiting.is_set() and reader.is_alive()  # it found the lock held, and waits without having listed
        kept = datasets.load_from_disk(str(aside)).select([1])  # the new version drops the shard's first row
        kept.save_to_disk(str(emb / ".tmp-rewritten"))
        os.replace(emb / ".tmp-rewritten", shard)
        shutil.rmtree(aside)
    finally:
        rewrite.release()
        reader.join(timeout=120)
    first = datasets.load_from_disk(str(emb / "shard-rank00000-of-00001-00000"))
    after = [*first["image_key"], *kept["image_key"]]  # the folder after the rewrite: 3 of the 4 rows
    assert sorted(read["table"]["image_key"]) == sorted(after) and len(after) == 3


HOLD_LOCK = """
import sys
from filelock import FileLock

lock = FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
sys.stdin.read()  # until the test closes it
"""


def test_a_reader_gives_up_naming_the_folder_when_a_rewrite_holds_it_too_long(two_shards, monkeypatch):
    emb, keys = two_shards
    monkeypatch.setattr(embeddings, "_REWRITE_WAIT_SECONDS", 0.3)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(emb / ".embeddings-rewrite.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # another process's rewrite
    try:
        assert holder.stdout.readline() == "held\n"
        message = (rf"Gave up reading the embeddings folder {re.escape(str(emb))} after 0.3 s: a run rewriting its "
                   r"shards holds \.embeddings-rewrite\.lock .* Read it again once that run is done")
        with pytest.raises(TimeoutError, match=message):
            load_embeddings(emb)
    finally:
        holder.communicate("", timeout=60)
    assert sorted(load_embeddings(emb)["image_key"]) == sorted(keys)  # released: read at once


def test_a_shard_rewrite_waits_for_the_readers_opening_the_shards(tmp_path, tokenizer, processor, monkeypatch):
    folder, emb, model = image_folder(tmp_path / "images", 3), tmp_path / "emb", tiny_model(tokenizer)
    embed_files(folder, model, processor, emb)
    old_key = image_cache_key(str(folder / "1.png"))
    replace_file(folder / "1.png")
    waiting = record_warnings(monkeypatch, "Waiting for processes reading the embeddings folder")
    reading = os.open(emb / ".embeddings-rewrite.lock", os.O_RDONLY | os.O_CREAT)
    fcntl.flock(reading, fcntl.LOCK_SH)  # a reader opening the shards (of a folder rewritten before)
    outcome = {}
    writer = threading.Thread(target=lambda: outcome.update(info=embed_files(folder, model, processor, emb)))
    try:
        writer.start()
        while not waiting.is_set() and writer.is_alive():
            waiting.wait(timeout=0.05)
        assert waiting.is_set() and writer.is_alive()
        first = datasets.load_from_disk(str(emb / "shard-rank00000-of-00001-00000"))
        assert old_key in first["image_key"] and not list(emb.glob(".aside-*"))  # untouched while it is read
    finally:
        os.close(reading)
        writer.join(timeout=120)
    assert outcome["info"]["num_replaced"] == 1
    assert sorted(stored(emb)) == sorted(image_cache_key(str(folder / f"{index}.png")) for index in range(3))


def test_a_reader_opens_the_shard_a_killed_rewrite_left_aside(two_shards):
    emb, keys = two_shards
    os.replace(emb / SECOND_SHARD, emb / f".aside-{SECOND_SHARD}")  # killed before the new version took its name
    assert sorted(load_embeddings(emb)["image_key"]) == sorted(keys)


def test_the_next_writer_puts_a_killed_rewrite_s_aside_shard_back_only_once_the_readers_opened_it(
    two_shards, monkeypatch
):
    emb, keys = two_shards
    aside = emb / f".aside-{SECOND_SHARD}"
    os.replace(emb / SECOND_SHARD, aside)  # a rewrite killed before the new version took its name
    waiting = record_warnings(monkeypatch, "Waiting for processes reading the embeddings folder")
    reading = os.open(emb / ".embeddings-rewrite.lock", os.O_RDONLY | os.O_CREAT)
    fcntl.flock(reading, fcntl.LOCK_SH)  # a reader listing and opening the shards
    listed = embeddings._readable_shards(emb)
    assert aside in listed
    writer = threading.Thread(target=embeddings._remove_leftovers, args=(emb,))  # the next run starting
    try:
        writer.start()
        while not waiting.is_set() and writer.is_alive():
            waiting.wait(timeout=0.05)
        assert waiting.is_set() and writer.is_alive()  # it waits for the reader before moving the aside shard back
        opened = [embeddings._load_shard(path) for path in listed]
    finally:
        os.close(reading)
        writer.join(timeout=120)
    assert sorted(key for shard in opened for key in shard["image_key"]) == sorted(keys)
    assert (emb / SECOND_SHARD).is_dir() and not aside.exists()
    assert sorted(load_embeddings(emb)["image_key"]) == sorted(keys)


def test_a_reader_in_the_writing_process_or_without_flock_reads_at_once_and_writes_nothing(two_shards, monkeypatch):
    emb, keys = two_shards
    (emb / ".embeddings-rewrite.lock").touch()  # a folder rewritten before: readers take its lock
    before = snapshot(emb)
    # Process 0 of a run holds the writer's lock over its whole pass; its own reads (the trainer's) must not wait.
    with embeddings._folder_lock(emb, 0, 1):
        assert sorted(load_embeddings(emb)["image_key"]) == sorted(keys)

    def no_flock(descriptor, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)  # a filesystem without flock: nothing to wait for
    assert sorted(load_embeddings(emb)["image_key"]) == sorted(keys)
    assert snapshot(emb) == before


def without_file_locks(monkeypatch):
    """Locking as filelock 3 does on a filesystem without flock."""

    def unsupported(self, *args, **kwargs):
        raise NotImplementedError

    monkeypatch.setattr(filelock.FileLock, "acquire", unsupported)


def test_an_embeddings_folder_without_file_locks_is_refused_naming_it(tmp_path, tokenizer, processor, monkeypatch):
    source = datasets.Dataset.from_dict({"image": ["missing.png"], "image_key": ["missing.png"]})
    without_file_locks(monkeypatch)
    message = (rf"Cannot lock the embeddings folder {re.escape(str(tmp_path / 'emb'))}: its filesystem does not "
               r"support file locks \(flock\)\. Upgrade filelock \(`pip install -U filelock`")
    with pytest.raises(OSError, match=message):  # from every process of a run: the gathered message
        embed_source(source, tiny_model(tokenizer), processor.image_processor, tmp_path / "emb")
    assert not list((tmp_path / "emb").glob("shard-*"))
