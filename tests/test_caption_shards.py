"""`clipcap caption --output`: datasets and embeddings folders into parquet shards, whole, resumable, split between
processes, and the same captions as `model.generate`."""

import errno
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import datasets
import pyarrow.parquet as pq
import pytest
import torch
from conftest import (
    distinct_captioning_model,
    mkldnn_disabled,
    packs_run,
    random_images,
    reuse_seen_by_generate,
    tiny_processor,
)

from clipcap_hf import ClipCapForConditionalGeneration, ClipCapProcessor, onednn
from clipcap_hf.commands import main
from clipcap_hf.onednn import onednn_linear_available
from clipcap_hf.utils.memory import on_glibc, reuses_freed_memory

NUM_IMAGES = 7
MAX_NEW_TOKENS = "5"


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A model whose greedy captions differ from image to image."""
    folder = tmp_path_factory.mktemp("captioner")
    distinct_captioning_model(tokenizer).save_pretrained(folder)
    tiny_processor(tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def parquet_source(tmp_path_factory):
    """A parquet file of PNG images (a datasets Image column), and the images' bytes in order."""
    encoded = [png_bytes(image) for image in random_images(NUM_IMAGES, seed=11)]
    path = tmp_path_factory.mktemp("source") / "images.parquet"
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": [{"bytes": data, "path": None} for data in encoded]}, features=features)\
        .to_parquet(path)
    return path, encoded


def expected_rows(model_dir, encoded, **generate_kwargs) -> list[tuple[str, str]]:
    """(image_key, caption) of each image by model.generate on all images at once."""
    import PIL.Image

    model = ClipCapForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = ClipCapProcessor.from_pretrained(model_dir)
    images = [PIL.Image.open(io.BytesIO(data)) for data in encoded]
    generated = model.generate(**processor(images=images), max_new_tokens=int(MAX_NEW_TOKENS), **generate_kwargs)
    keys = ["sha256:" + hashlib.sha256(data).hexdigest() for data in encoded]  # load_image_source's keys of bytes
    return list(zip(keys, processor.post_process_image_text_to_text(generated)))


def read_rows(output: Path) -> list[tuple[str, str]]:
    rows = []
    for shard in sorted(output.glob("captions-*.parquet")):
        table = pq.read_table(shard).to_pydict()
        rows += list(zip(table["image_key"], table["caption"]))
    return rows


def caption_argv(model_dir, source, output, *extra) -> list[str]:
    return ["caption", "--model", str(model_dir), "--data-files", str(source), "--output", str(output),
            "--shard-size", "3", "--batch-size", "2", "--max-new-tokens", MAX_NEW_TOKENS, *extra]


def two_parquet_files(folder: Path, encoded: list[bytes]) -> list[Path]:
    """The images in two parquet files (4 and the rest): streamed, each gives one output shard."""
    files = []
    features = datasets.Features({"image": datasets.Image()})
    for index, part in enumerate((encoded[:4], encoded[4:])):
        files.append(folder / f"part-{index}.parquet")
        datasets.Dataset.from_dict({"image": [{"bytes": data, "path": None} for data in part]}, features=features)\
            .to_parquet(files[-1])
    return files


def streaming_argv(model_dir, files: list[Path], output: Path) -> list[str]:
    return ["caption", "--model", str(model_dir), "--data-files", *map(str, files), "--streaming", "--output",
            str(output), "--batch-size", "3", "--max-new-tokens", MAX_NEW_TOKENS]


def test_parquet_source_gives_whole_shards_with_generate_captions_and_a_rerun_skips_them(
    model_dir, parquet_source, tmp_path, capsys
):
    source, encoded = parquet_source
    output = tmp_path / "captions"
    assert main(caption_argv(model_dir, source, output)) == 0
    names = sorted(path.name for path in output.glob("*.parquet"))
    assert names == [f"captions-0000{i}-of-00003.parquet" for i in range(3)]  # 7 rows in shards of 3, 2, 2
    assert read_rows(output) == expected_rows(model_dir, encoded)
    assert "wrote 3 shard(s) of 3 (7 captions)" in capsys.readouterr().err

    (output / names[1]).unlink()
    kept = (output / names[0]).stat().st_mtime_ns
    assert main(caption_argv(model_dir, source, output)) == 0
    assert "wrote 1 shard(s) of 3 (2 captions); 2 already finished" in capsys.readouterr().err
    assert (output / names[0]).stat().st_mtime_ns == kept
    assert read_rows(output) == expected_rows(model_dir, encoded)

    # Other settings into the same folder would mix captions: refused, naming what differs, as then and now.
    assert main(caption_argv(model_dir, source, output, "--num-beams", "2")) == 2
    assert (f"holds captions made with other settings (decoding.num_beams was 1, now 2; see "
            f"{output / 'caption_run.json'})") in capsys.readouterr().err


def read_table(output: Path) -> dict[str, list]:
    table = {}
    for shard in sorted(output.glob("*.parquet")):
        for name, values in pq.read_table(shard).to_pydict().items():
            table.setdefault(name, []).extend(values)
    return table


def test_sampled_candidates_reranked_by_clip_keep_the_best_and_resume_alike(
    model_dir, parquet_source, tiny_clip_dir, tmp_path, monkeypatch
):
    # PyTorch's own kernels on both sides: a captioning run holds oneDNN weights packed, a lone generate() plain
    # ones, and sampling may tell their rounding apart.
    monkeypatch.setenv("CLIPCAP_CPU_LINEAR", "default")
    from transformers import AutoProcessor, CLIPModel

    from clipcap_hf.inference import CLIPScorer

    source, encoded = parquet_source
    output = tmp_path / "captions"
    argv = caption_argv(model_dir, source, output, "--do-sample", "--top-p", "0.9", "--temperature", "1.5",
                        "--num-candidates", "3", "--rerank-model", str(tiny_clip_dir), "--seed", "3")
    assert main(argv) == 0
    table = read_table(output)
    assert sorted(table) == ["candidates", "caption", "clip_score", "image_key"]
    assert len(table["caption"]) == NUM_IMAGES and all(len(c) == 3 for c in table["candidates"])
    import PIL.Image

    scorer = CLIPScorer(CLIPModel.from_pretrained(tiny_clip_dir), AutoProcessor.from_pretrained(tiny_clip_dir))
    images = [PIL.Image.open(io.BytesIO(data)) for data in encoded]
    for image, caption, candidates, score in zip(images, table["caption"], table["candidates"], table["clip_score"]):
        scores = scorer.clip_score([image] * 3, candidates)
        # The chosen candidate scores highest (up to float rounding: candidates may tie).
        assert float(scores[candidates.index(caption)]) == pytest.approx(float(scores.max()), abs=1e-5)
        assert score == pytest.approx(float(scores.max()), abs=1e-5)

    # Each shard is seeded on its own: the middle one sampled again gives the same candidates.
    next(output.glob("captions-00001-*.parquet")).unlink()
    assert main(argv) == 0
    assert read_table(output) == table


def test_a_bad_row_stops_the_run_naming_shard_and_key_or_is_skipped_and_counted(model_dir, tmp_path, capsys):
    encoded = [png_bytes(image) for image in random_images(4, seed=12)]
    encoded[2] = b"not an image"
    source = tmp_path / "images.parquet"
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": [{"bytes": data, "path": None} for data in encoded]}, features=features)\
        .to_parquet(source)
    bad_key = "sha256:" + hashlib.sha256(b"not an image").hexdigest()

    output = tmp_path / "stop"
    assert main(caption_argv(model_dir, source, output)) == 2
    err = capsys.readouterr().err
    assert (f"captions-00001-of-00002.parquet, key '{bad_key}' (from {source}, row 2 (from 0)): Cannot decode the "
            "image bytes (12 bytes): no image format PIL reads") in err
    assert "--on-bad-image skip" in err
    # The bad row is in the second shard (rows 2 and 3): the first one is finished and kept.
    assert [path.name for path in output.glob("*.parquet")] == ["captions-00000-of-00002.parquet"]

    output = tmp_path / "skip"
    assert main(caption_argv(model_dir, source, output, "--on-bad-image", "skip")) == 0
    assert "1 unreadable image(s) skipped" in capsys.readouterr().err
    good = [data for data in encoded if data != b"not an image"]
    assert read_rows(output) == expected_rows(model_dir, good)


def write_image_bytes(path: Path, encoded: list[bytes]) -> Path:
    """A parquet file of a datasets Image column holding these bytes."""
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": [{"bytes": data, "path": None} for data in encoded]}, features=features)\
        .to_parquet(path)
    return path


def test_a_run_that_can_read_no_image_fails_and_keeps_no_shard_without_captions(model_dir, tmp_path, capsys):
    bad = [f"not an image {index}".encode() for index in range(4)]
    source = write_image_bytes(tmp_path / "images.parquet", bad)
    output = tmp_path / "captions"
    argv = caption_argv(model_dir, source, output, "--on-bad-image", "skip")  # shards of rows 0-1 and 2-3
    first_key = "sha256:" + hashlib.sha256(bad[0]).hexdigest()
    message = (
        f"clipcap caption: error: None of the 4 image(s) read could be captioned: every one was unreadable and "
        f"skipped (--on-bad-image skip), so {output} holds no caption. The first: captions-00000-of-00002.parquet, "
        f"key '{first_key}' (from {source}, row 0 (from 0)): Cannot decode the image bytes (14 bytes): no image "
        "format PIL reads\nCheck the source (its image column, and --image-root where it names image files) and "
        "rerun: the folder's shards, which hold no caption, are removed, so that the rerun reads their rows "
        "again.\n"
    )
    for _ in range(2):  # a rerun is refused alike: no empty shard passes for a finished one
        assert main(argv) == 2
        assert capsys.readouterr().err.endswith(message)
        assert not list(output.glob("captions-*.parquet"))


def test_a_resumed_run_whose_remaining_images_are_unreadable_keeps_the_earlier_captions_with_status_0(
    model_dir, tmp_path, capsys
):
    encoded = [png_bytes(image) for image in random_images(3, seed=14)]
    encoded += [f"not an image {index}".encode() for index in range(3)]
    source = write_image_bytes(tmp_path / "images.parquet", encoded)
    output = tmp_path / "captions"
    argv = caption_argv(model_dir, source, output, "--on-bad-image", "skip")  # shards of rows 0-2 and 3-5 (bad)
    assert main(argv) == 0
    assert "wrote 2 shard(s) of 2 (3 captions, 3 unreadable image(s) skipped)" in capsys.readouterr().err

    # Resumed: this run reads only the unreadable images, but the folder holds the first shard's captions.
    (output / "captions-00001-of-00002.parquet").unlink()
    assert main(argv) == 0
    assert "wrote 1 shard(s) of 2 (0 captions, 3 unreadable image(s) skipped); 1 already finished" in (
        capsys.readouterr().err)
    # Everything finished: nothing is read, so nothing is unreadable.
    assert main(argv) == 0
    assert "wrote 0 shard(s) of 2 (0 captions); 2 already finished" in capsys.readouterr().err
    assert read_rows(output) == expected_rows(model_dir, encoded[:3])


def test_a_row_without_an_image_stops_the_run_before_any_shard_or_is_left_out(model_dir, tmp_path, capsys):
    encoded = [png_bytes(image) for image in random_images(3, seed=13)]
    source = tmp_path / "images.parquet"
    rows = [{"bytes": encoded[0], "path": None}, None, {"bytes": encoded[1], "path": None}]
    rows.append({"bytes": encoded[2], "path": None})
    datasets.Dataset.from_dict({"image": rows}, features=datasets.Features({"image": datasets.Image()})).to_parquet(
        source
    )
    output = tmp_path / "stop"
    assert main(caption_argv(model_dir, source, output)) == 2
    assert f"{source}, row 1 (from 0) has no image (it is null or missing)" in capsys.readouterr().err
    assert not output.exists() or not list(output.glob("*.parquet"))

    output = tmp_path / "skip"
    assert main(caption_argv(model_dir, source, output, "--on-bad-image", "skip")) == 0
    assert read_rows(output) == expected_rows(model_dir, encoded)


# Runs `clipcap caption ARGS...` and SIGKILLs itself half-way through writing the second output shard.
KILLED_WHILE_WRITING = r"""
import os, signal, sys
import pyarrow.parquet as pq
real_write_table = pq.write_table
calls = []
def write_table(table, where, *args, **kwargs):  # `where`: the shard's temporary file, opened
    calls.append(where)
    real_write_table(table, where, *args, **kwargs)
    if len(calls) == 2:  # killed with the second shard half written
        where.flush()
        where.truncate(where.tell() // 2)
        where.flush()
        os.kill(os.getpid(), signal.SIGKILL)
pq.write_table = write_table
from clipcap_hf.commands import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_mid_shard_then_rerun_gives_every_row_once(model_dir, parquet_source, tmp_path):
    source, encoded = parquet_source
    output = tmp_path / "captions"
    argv = caption_argv(model_dir, source, output)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, *argv], env=env, capture_output=True,
                            check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert [path.name for path in output.glob("*.parquet")] == ["captions-00000-of-00003.parquet"]
    assert list(output.glob(".*.partial"))  # the half-written second shard, under its temporary name
    assert (output / ".caption-rank-00000-of-00001.lock").exists()  # its lock file, which no process holds now

    assert main(argv) == 0
    assert read_rows(output) == expected_rows(model_dir, encoded)  # no duplicates, no gaps
    assert not list(output.glob(".*.partial"))


def test_a_streaming_run_killed_mid_shard_then_rerun_gives_every_row_once(model_dir, parquet_source, tmp_path):
    _, encoded = parquet_source
    output = tmp_path / "captions"
    argv = streaming_argv(model_dir, two_parquet_files(tmp_path, encoded), output)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, *argv], env=env, capture_output=True,
                            check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert [path.name for path in output.glob("*.parquet")] == ["captions-00000-of-00002.parquet"]
    assert list(output.glob(".*.partial"))

    assert main(argv) == 0
    assert read_rows(output) == expected_rows(model_dir, encoded)
    assert not list(output.glob(".*.partial"))


def test_two_processes_under_torchrun_split_the_shards(model_dir, parquet_source, tmp_path):
    source, encoded = parquet_source
    output = tmp_path / "captions"
    script = tmp_path / "clipcap_main.py"
    script.write_text("import sys\nfrom clipcap_hf.commands import main\nsys.exit(main(sys.argv[1:]))\n")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*torchrun, str(script), *caption_argv(model_dir, source, output)], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Rank 0 of 2: wrote 2 shard(s) of 3 (5 captions)" in result.stderr  # shards 0 and 2
    assert "Rank 1 of 2: wrote 1 shard(s) of 3 (2 captions)" in result.stderr  # shard 1
    assert read_rows(output) == expected_rows(model_dir, encoded)


def test_embeddings_folder_is_captioned_without_the_vision_tower(model_dir, parquet_source, tmp_path, monkeypatch):
    from clipcap_hf.data.embeddings import embed_source, load_embeddings
    from clipcap_hf.data.sources import load_image_source

    source, _ = parquet_source
    model = ClipCapForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = ClipCapProcessor.from_pretrained(model_dir)
    embeddings = tmp_path / "embeddings"
    embed_source(load_image_source(data_files=str(source)), model, processor.image_processor, embeddings)

    def no_vision(*args, **kwargs):
        raise AssertionError("the vision tower ran")

    monkeypatch.setattr(type(model.vision_model), "forward", no_vision)
    output = tmp_path / "captions"
    argv = ["caption", "--model", str(model_dir), "--embeddings", str(embeddings), "--output", str(output),
            "--shard-size", "4", "--max-new-tokens", MAX_NEW_TOKENS]
    assert main(argv) == 0
    stored = load_embeddings(embeddings)
    by_key = dict(read_rows(output))
    assert sorted(by_key) == sorted(stored["image_key"])
    generated = model.generate(image_embeds=torch.tensor(stored["embedding"]), max_new_tokens=int(MAX_NEW_TOKENS))
    assert [by_key[key] for key in stored["image_key"]] == processor.post_process_image_text_to_text(generated)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data-files", "x.parquet"], "give --output DIR"),
        (["img.png", "--data-files", "x.parquet", "--output", "o"], "Give one source"),
        (["--data-files", "x.parquet", "--output", "o", "--num-candidates", "3"], "give --rerank-model"),
        (["--data-files", "x", "--output", "o", "--num-candidates", "3", "--rerank-model", "c"], "needs --do-sample"),
        (["--data-files", "x", "--output", "o", "--top-p", "0.9"], "--top-p only apply when sampling"),
        (["--data-files", "x", "--output", "o", "--temperature", "0.5", "--top-p", "0.9"],
         "--top-p and --temperature only apply when sampling: add --do-sample."),
        (["--data-files", "x", "--output", "o", "--do-sample", "--num-candidates", "2", "--rerank-model", "c",
          "--num-return-sequences", "2"], "Give --num-candidates or --num-return-sequences, not both"),
        (["--data-files", "x", "--output", "o", "--num-return-sequences", "3", "--num-beams", "2"],
         "--num-return-sequences 3 needs --num-beams 3 or more, or --do-sample without --num-beams: 2 beams give at "
         "most 2, with or without sampling."),
        (["--data-files", "x", "--output", "o", "--do-sample", "--num-beams", "2", "--num-return-sequences", "4"],
         "--num-return-sequences 4 needs --num-beams 4 or more: 2 beams give at most 2, with or without sampling."),
        (["--data-files", "x", "--output", "o", "--rerank-model", "c"],
         "--rerank-model chooses among candidate captions: give --num-candidates N (N > 1) with it."),
        (["--embeddings", "e", "--output", "o", "--do-sample", "--num-candidates", "2", "--rerank-model", "c"],
         "an embeddings folder has no images"),
        (["--data-files", "x", "--output", "o", "--top-p", "1.5"], "argument --top-p: must be above 0 and at most 1"),
        (["--data-files", "x", "--output", "o", "--temperature", "0"], "argument --temperature: must be above 0"),
        (["--data-files", "x", "--output", "o", "--num-candidates", "0"],
         "argument --num-candidates: must be at least"),
        (["--data-files", "x", "--output", "o", "--dtype", "int8"], "argument --dtype: choose from float32"),
        (["--embeddings", "e", "--output", "o", "--split", "validation", "--streaming", "--image-column", "jpg",
          "--dataset-format", "coco"],
         "--dataset-format, --split, --image-column and --streaming apply to a dataset (--dataset-name or "
         "--data-files), not to --embeddings: an embeddings folder is read whole, as `clipcap embed` wrote it. Leave "
         "them out."),
        (["--embeddings", "e", "--output", "o", "--split", "train"],  # given, even as the default
         "--split applies to a dataset (--dataset-name or --data-files), not to --embeddings"),
        (["img.png", "--dataset-config-name", "c", "--image-root", "r"],
         "--dataset-config-name and --image-root apply to a dataset (--dataset-name or --data-files), not to image "
         "files: they are captioned as given. Leave them out."),
    ],
)
def test_bad_options_are_refused_before_any_work(tmp_path, capsys, extra, message):
    assert main(["caption", "--model", str(tmp_path / "nothing-loaded"), *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("source", [["img.png"], ["--data-files", "d.parquet", "--output", "o"]])
def test_a_bad_rerank_model_is_refused_by_its_option_before_the_source_and_model_load(
    model_dir, tmp_path, capsys, source
):
    # Neither the images, the source nor --model exist: the --rerank-model check comes before any of them is read.
    argv = ["caption", "--model", str(tmp_path / "nothing-loaded"), *source, "--do-sample", "--num-candidates", "2"]
    assert main([*argv, "--rerank-model", str(tmp_path / "no-clip")]) == 2
    assert f"error: --rerank-model: folder {tmp_path / 'no-clip'} does not exist.\n" in capsys.readouterr().err
    assert main([*argv, "--rerank-model", str(model_dir)]) == 2
    assert (f"error: --rerank-model: {model_dir} holds a model of type 'clipcap' (config.json), not a whole CLIP "
            "model" in capsys.readouterr().err)


def test_streaming_gives_one_output_shard_per_data_file(model_dir, parquet_source, tmp_path, capsys):
    _, encoded = parquet_source
    output = tmp_path / "captions"
    assert main(streaming_argv(model_dir, two_parquet_files(tmp_path, encoded), output)) == 0
    assert sorted(path.name for path in output.glob("*.parquet")) == [
        "captions-00000-of-00002.parquet", "captions-00001-of-00002.parquet"]
    assert pq.read_table(output / "captions-00000-of-00002.parquet").num_rows == 4
    assert read_rows(output) == expected_rows(model_dir, encoded)


def test_a_streamed_data_file_that_does_not_read_stops_the_run_naming_it(model_dir, parquet_source, tmp_path, capsys):
    _, encoded = parquet_source
    files = two_parquet_files(tmp_path, encoded)
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2] + data[-200:])  # its middle lost (a bad copy): its footer is damaged
    output = tmp_path / "captions"
    assert main(streaming_argv(model_dir, files, output)) == 2
    # pyarrow's own error, met as the shard is read, names no file ("Could not open Parquet input source '<Buffer>'").
    err = capsys.readouterr().err
    named = re.escape(f"{files[1]} cannot be read as parquet data (OSError: Couldn't deserialize thrift")
    assert re.search(named + r".*\); fix or remove it\.", err, re.DOTALL), err
    assert [path.name for path in output.glob("*.parquet")] == ["captions-00000-of-00002.parquet"]  # the first, kept


def test_the_writer_refuses_an_unknown_bad_image_policy_before_any_work(tmp_path):
    from clipcap_hf.inference import caption_dataset_to_parquet

    with pytest.raises(ValueError, match=r"on_bad_image \(`--on_bad_image`\) must be 'error' or 'skip', got 'ignore'"):
        caption_dataset_to_parquet(object(), object(), tmp_path / "captions", on_bad_image="ignore")
    assert not (tmp_path / "captions").exists()


def test_caption_offers_every_dataset_format_the_loaders_read():
    # `clipcap caption` lists them itself so that its --help does not import datasets.
    from clipcap_hf.commands.caption import DATASET_FORMATS
    from clipcap_hf.data import DATASET_FORMATS as LOADER_FORMATS

    assert sorted(DATASET_FORMATS) == sorted(LOADER_FORMATS)


@pytest.mark.skipif(not onednn_linear_available(), reason="needs PyTorch with oneDNN on x86-64")
def test_a_run_packs_each_weight_once_and_gives_the_captions_of_plain_kernels(
    model_dir, parquet_source, tmp_path, monkeypatch
):
    import PIL.Image

    from clipcap_hf.inference import ClipCapCaptioner, caption_dataset_to_parquet

    monkeypatch.setenv(onednn.CPU_LINEAR_ENV, "onednn")
    _, encoded = parquet_source
    model = ClipCapForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = ClipCapProcessor.from_pretrained(model_dir)
    images = [PIL.Image.open(io.BytesIO(data)) for data in encoded[:2]]
    with torch.no_grad(), onednn.cpu_linear_kernels(model, prepack=True):
        _, one_batch = packs_run(lambda: model.generate(**processor(images=images), max_new_tokens=2))

    features = datasets.Features({"image_key": datasets.Value("string"), "image": datasets.Image()})
    rows = {"image_key": [str(index) for index in range(NUM_IMAGES)],
            "image": [{"bytes": data, "path": None} for data in encoded]}
    dataset = datasets.Dataset.from_dict(rows, features=features)
    captioner = ClipCapCaptioner(model, processor, max_new_tokens=int(MAX_NEW_TOKENS))

    def run(output: Path) -> list[tuple[str, str]]:
        # 7 rows in shards of 3, 2, 2, in batches of 2: 4 generate calls.
        caption_dataset_to_parquet(captioner, dataset, output, batch_size=2, shard_size=3, rank=0, world_size=1)
        return read_rows(output)

    reusing = reuse_seen_by_generate(monkeypatch, captioner.model)
    captions, packs = packs_run(lambda: run(tmp_path / "onednn"))
    assert packs == one_batch > 0  # once per run, not per batch or shard
    assert all("forward" not in vars(module) for module in model.modules())  # the block ended with the run
    # Each batch reuses the memory the one before freed (glibc), until the run returns.
    assert reusing == [on_glibc()] * 4 and not reuses_freed_memory()
    with mkldnn_disabled():
        plain_captions = run(tmp_path / "plain")
    assert captions == plain_captions
    assert len({caption for _, caption in captions}) > 1  # captions that tell a reordering apart


def embeddings_rows(count: int, dim: int) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(5)
    return datasets.Dataset.from_dict({"image_key": [f"k{i}" for i in range(count)],
                                       "embedding": torch.randn(count, dim, generator=generator).tolist()})


@pytest.fixture(scope="module")
def embeddings_captioner(model_dir):
    from clipcap_hf.inference import ClipCapCaptioner

    model = ClipCapForConditionalGeneration.from_pretrained(model_dir).eval()
    return ClipCapCaptioner(model, ClipCapProcessor.from_pretrained(model_dir), max_new_tokens=2)


def test_a_resume_on_a_source_whose_shards_moved_is_refused(embeddings_captioner, tmp_path):
    from clipcap_hf.inference import caption_dataset_to_parquet

    dim = embeddings_captioner.model.config.prefix_dim
    output = tmp_path / "captions"

    def run(dataset):
        return caption_dataset_to_parquet(embeddings_captioner, dataset, output, shard_size=3, settings={"run": 1},
                                          rank=0, world_size=1)

    run(embeddings_rows(7, dim))  # shards of rows 0-2, 3-5, 6
    (output / "captions-00001-of-00003.parquet").unlink()
    # 8 rows keep 3 shards of 3 rows, but rows 6 and 7 move into the last one: row 6 would be captioned twice.
    with pytest.raises(ValueError) as refused:
        run(embeddings_rows(8, dim))
    assert str(refused.value) == (
        f"--output {output} holds captions of a source of 7 rows in 3 shard(s), but this one has 8 rows in 3 "
        "shard(s): the input shards would not line up with the finished ones, leaving rows out or captioning them "
        "twice. Write to a new output folder, or resume on the original source.")
    assert run(embeddings_rows(7, dim)).written == ["captions-00001-of-00003.parquet"]
    assert [key for key, _ in read_rows(output)] == [f"k{i}" for i in range(7)]

    # A streaming source: its number of shards (data files) is known, not its rows.
    streamed = tmp_path / "streamed"
    caption_dataset_to_parquet(embeddings_captioner, embeddings_rows(6, dim).to_iterable_dataset(num_shards=2),
                               streamed, settings={"run": 1}, rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"of an unknown number of rows in 2 shard\(s\), but this one has an unknown "
                                         r"number of rows in 3 shard\(s\)"):
        caption_dataset_to_parquet(embeddings_captioner, embeddings_rows(6, dim).to_iterable_dataset(num_shards=3),
                                   streamed, settings={"run": 1}, rank=0, world_size=1)


def test_a_run_without_settings_still_refuses_a_source_of_another_layout(embeddings_captioner, tmp_path):
    from clipcap_hf.inference import caption_dataset_to_parquet

    dim = embeddings_captioner.model.config.prefix_dim
    output = tmp_path / "captions"

    def run(dataset, shard_size):
        return caption_dataset_to_parquet(embeddings_captioner, dataset, output, shard_size=shard_size, rank=0,
                                          world_size=1)

    run(embeddings_rows(6, dim), 3)
    (output / "captions-00001-of-00002.parquet").unlink()  # as if killed before its second shard
    with pytest.raises(ValueError, match=r"holds captions of a source of 6 rows in 2 shard\(s\), but this one has 6 "
                                         r"rows in 3 shard\(s\)"):
        run(embeddings_rows(6, dim), 2)  # another shard size would caption rows 3 to 5 twice
    other = embeddings_rows(6, dim).map(lambda row: {"image_key": "x" + row["image_key"]})
    with pytest.raises(ValueError, match=r"but this one has 6 rows in 2 shard\(s\) but other images"):
        run(other, 3)  # another source of the same size would keep the first one's captions
    assert run(embeddings_rows(6, dim), 3).written == ["captions-00001-of-00002.parquet"]
    assert [key for key, _ in read_rows(output)] == [f"k{i}" for i in range(6)]


def test_a_run_that_failed_before_any_shard_does_not_bind_the_folder(embeddings_captioner, tmp_path):
    from clipcap_hf.inference import caption_dataset_to_parquet

    dim = embeddings_captioner.model.config.prefix_dim
    output = tmp_path / "captions"
    dataset = embeddings_rows(4, dim)
    with pytest.raises(ValueError, match="the dataset has no image_key column"):
        caption_dataset_to_parquet(embeddings_captioner, dataset.remove_columns("image_key"), output,
                                   settings={"run": 1}, rank=0, world_size=1)
    assert (output / "caption_run.json").exists() and not list(output.glob("*.parquet"))

    caption_dataset_to_parquet(embeddings_captioner, dataset, output, settings={"run": 2}, rank=0, world_size=1)
    assert json.loads((output / "caption_run.json").read_text())["run"] == 2
    with pytest.raises(ValueError, match=r"holds captions made with other settings \(run was 2, now 3; see "):
        caption_dataset_to_parquet(embeddings_captioner, dataset, output, settings={"run": 3}, rank=0, world_size=1)


@pytest.mark.parametrize(
    "failure, fix",
    [
        # pyarrow's own errors name no file; a full disk, and a folder that may not be written.
        (OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device"),
         "Free space in {folder}"),
        (PermissionError(errno.EACCES, "Failed to open local file. Detail: [errno 13] Permission denied"),
         "Make {folder} writable"),
    ],
)
def test_a_shard_that_cannot_be_written_is_named_and_the_earlier_ones_kept(embeddings_captioner, tmp_path, failure,
                                                                            fix):
    import pyarrow.parquet as pq

    from clipcap_hf.inference import caption_dataset_to_parquet

    output = tmp_path / "captions"
    dataset = embeddings_rows(7, embeddings_captioner.model.config.prefix_dim)
    write_table, written = pq.write_table, []

    def fail_at_second_shard(table, where, **kwargs):  # `where`: the temporary file, opened
        written.append(where)
        if len(written) == 2:
            where.write(b"PAR1")
            raise failure
        return write_table(table, where, **kwargs)

    with mock.patch.object(pq, "write_table", fail_at_second_shard), pytest.raises(OSError) as error:
        caption_dataset_to_parquet(embeddings_captioner, dataset, output, shard_size=3, rank=0, world_size=1)
    shard = output / "captions-00001-of-00003.parquet"
    # Of the same class and errno, for a caller to tell a full disk from a refusal; the fix for its cause alone.
    assert type(error.value) is type(failure) and error.value.errno == failure.errno
    assert error.value.__cause__ is failure
    assert str(error.value) == (
        f"[Errno {failure.errno}] Cannot write the caption shard {shard} ({type(failure).__name__}: {failure}); the "
        f"shards written before it are kept. {fix.format(folder=output)} (or give another --output) and rerun: it "
        "captions the rest."
    )
    assert sorted(path.name for path in output.iterdir() if path.suffix == ".parquet" or ".partial" in path.name) == [
        "captions-00000-of-00003.parquet"
    ]
    summary = caption_dataset_to_parquet(embeddings_captioner, dataset, output, shard_size=3, rank=0, world_size=1)
    assert summary.skipped == ["captions-00000-of-00003.parquet"] and len(summary.written) == 2


def test_a_link_planted_at_a_shard_s_temporary_name_is_replaced_not_written_through(embeddings_captioner, tmp_path):
    from clipcap_hf.inference import caption_dataset_to_parquet

    output = tmp_path / "captions"
    output.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("someone's file")
    (output / ".captions-00000-of-00001.parquet.partial").symlink_to(victim)
    dataset = embeddings_rows(3, embeddings_captioner.model.config.prefix_dim)
    caption_dataset_to_parquet(embeddings_captioner, dataset, output, shard_size=3, rank=0, world_size=1)
    assert victim.read_text() == "someone's file"
    shard = output / "captions-00000-of-00001.parquet"
    assert not shard.is_symlink() and len(datasets.Dataset.from_parquet(str(shard))) == 3


def test_a_shard_error_without_errno_or_of_a_class_built_otherwise_keeps_what_it_can():
    from clipcap_hf.inference.sharded import _same_kind_of_error

    class BuiltOtherwise(OSError):  # as some libraries' OSError subclasses: other constructor arguments
        def __init__(self, path):
            super().__init__(errno.EIO, "I/O error", path)

    # No errno: no "[Errno None]" in the message.
    without = _same_kind_of_error(FileNotFoundError("gone"), "Cannot write the caption shard s")
    assert type(without) is FileNotFoundError and without.errno is None
    assert str(without) == "Cannot write the caption shard s"
    # Its class cannot be built from (errno, message): an OSError of the same errno.
    other = _same_kind_of_error(BuiltOtherwise("p"), "Cannot write the caption shard s")
    assert type(other) is OSError and other.errno == errno.EIO
    assert str(other) == "[Errno 5] Cannot write the caption shard s"


def test_a_seeded_sampled_resume_with_another_batch_size_is_refused(model_dir, tmp_path):
    from clipcap_hf.inference import ClipCapCaptioner, caption_dataset_to_parquet

    model = ClipCapForConditionalGeneration.from_pretrained(model_dir).eval()
    captioner = ClipCapCaptioner(model, ClipCapProcessor.from_pretrained(model_dir), max_new_tokens=4, do_sample=True)
    dataset = embeddings_rows(6, model.config.prefix_dim)
    output = tmp_path / "captions"

    def run(batch_size):
        return caption_dataset_to_parquet(captioner, dataset, output, batch_size=batch_size, shard_size=3, seed=0,
                                          settings={"run": 1}, rank=0, world_size=1)

    run(3)
    whole = read_rows(output)
    (output / "captions-00001-of-00002.parquet").unlink()
    # The draws are spread over a batch's rows: batches of 1 would sample other captions for the same seed.
    with pytest.raises(ValueError, match=r"\(sampling\.batch_size was 3, now 1; see .* Seeded sampled captions "
                                         r"depend on the batch size and the device: resume with batch size 3 on a "
                                         r"cpu device\."):
        run(1)
    run(3)
    assert read_rows(output) == whole


def test_embeddings_holding_nan_or_inf_are_bad_rows_named_by_shard_and_key(embeddings_captioner, tmp_path):
    from clipcap_hf.inference import caption_dataset_to_parquet

    dim = embeddings_captioner.model.config.prefix_dim
    rows = embeddings_rows(9, dim).to_dict()
    rows["embedding"][3] = None  # the second shard's (rows 3-5); a missing one keeps its own message
    rows["embedding"][4][7] = float("nan")
    rows["embedding"][5] = [float("inf")] * dim
    dataset = datasets.Dataset.from_dict(rows)

    def run(output: Path, on_bad_image: str):
        return caption_dataset_to_parquet(embeddings_captioner, dataset, output, shard_size=3, batch_size=3,
                                          on_bad_image=on_bad_image, rank=0, world_size=1)

    with pytest.raises(ValueError) as refused:
        run(tmp_path / "stop", "error")
    assert str(refused.value).startswith(
        "3 image(s) cannot be read:\n"
        "  captions-00001-of-00003.parquet, key 'k3': The embedding is missing (None)\n"
        "  captions-00001-of-00003.parquet, key 'k4': The embedding holds NaN or infinite values\n"
        "  captions-00001-of-00003.parquet, key 'k5': The embedding holds NaN or infinite values\n"
        "The shards finished before are kept: rerun with --on-bad-image skip")
    assert [path.name for path in (tmp_path / "stop").glob("*.parquet")] == ["captions-00000-of-00003.parquet"]

    summary = run(tmp_path / "skip", "skip")
    assert (summary.num_captions, summary.num_bad_rows) == (6, 3)
    good = rows["embedding"][:3] + rows["embedding"][6:]
    generated = embeddings_captioner.model.generate(image_embeds=torch.tensor(good), max_new_tokens=2)
    captions = embeddings_captioner.processor.post_process_image_text_to_text(generated)
    assert read_rows(tmp_path / "skip") == list(zip(["k0", "k1", "k2", "k6", "k7", "k8"], captions))


def test_a_process_that_can_read_none_of_its_rows_fails_only_when_the_whole_run_captioned_none(
    embeddings_captioner, tmp_path, caplog
):
    from clipcap_hf.inference import caption_dataset_to_parquet

    dim = embeddings_captioner.model.config.prefix_dim
    rows = embeddings_rows(4, dim).to_dict()  # shards of rows 0-1 (process 0 of 2) and 2-3 (process 1)
    rows["embedding"][2] = rows["embedding"][3] = [float("nan")] * dim

    def run(dataset, output: Path, rank: int):
        return caption_dataset_to_parquet(embeddings_captioner, dataset, output, shard_size=2, on_bad_image="skip",
                                          rank=rank, world_size=2)

    # Process 1 reads only unreadable rows, but process 0 captions its own: a run that captioned, with status 0,
    # whichever finishes first.
    readable_first, readable_last = tmp_path / "readable-first", tmp_path / "readable-last"
    dataset = datasets.Dataset.from_dict(rows)
    assert run(dataset, readable_first, 0).num_captions == 2
    assert run(dataset, readable_first, 1).num_captions == 0
    assert "could be captioned" not in caplog.text
    assert run(dataset, readable_last, 1).num_captions == 0
    assert "the other processes' shards are not all written" in caplog.text  # not known yet: a warning, not an error
    assert run(dataset, readable_last, 0).num_captions == 2

    # No process can read a row: the last to finish fails, removing the shards, which hold no caption.
    rows["embedding"][0] = rows["embedding"][1] = [float("inf")] * dim
    dataset = datasets.Dataset.from_dict(rows)
    output = tmp_path / "unreadable"
    caplog.clear()
    assert run(dataset, output, 0).num_bad_rows == 2
    assert ("None of the 2 image(s) this process read could be captioned: every one was unreadable and skipped "
            "(--on-bad-image skip). The first: captions-00000-of-00002.parquet, key 'k0': The embedding holds NaN or "
            "infinite values. Whether the run captioned any is not known here: the other processes' shards are not "
            "all written yet.") in caplog.text
    with pytest.raises(ValueError, match=r"^None of the 2 image\(s\) read could be captioned: .* The first: "
                                         r"captions-00001-of-00002.parquet, key 'k2': The embedding holds NaN"):
        run(dataset, output, 1)
    assert list(output.glob("*.parquet")) == []


def test_a_run_that_can_read_no_image_beside_a_damaged_shard_is_refused_naming_it_and_removes_no_shard(
    embeddings_captioner, tmp_path
):
    from clipcap_hf.inference import caption_dataset_to_parquet

    dim = embeddings_captioner.model.config.prefix_dim
    rows = embeddings_rows(4, dim).to_dict()  # shards of rows 0-1 and 2-3
    rows["embedding"][0] = rows["embedding"][1] = [float("nan")] * dim
    output = tmp_path / "captions"

    def run():
        return caption_dataset_to_parquet(embeddings_captioner, datasets.Dataset.from_dict(rows), output,
                                          shard_size=2, on_bad_image="skip", rank=0, world_size=1)

    run()  # the second shard's rows are readable
    (output / "captions-00000-of-00002.parquet").unlink()
    # The second shard, as a run stopped by a full disk may leave it: taken as finished, and not parquet.
    damaged = output / "captions-00001-of-00002.parquet"
    damaged.write_bytes(b"PAR1 cut short")
    with pytest.raises(ValueError) as refused:
        run()
    assert str(refused.value).startswith(
        f"The caption shard {damaged} is incomplete or damaged (ArrowInvalid: Parquet magic bytes not found")
    assert str(refused.value).endswith(
        "this process could caption none of the 2 image(s) it read: every one was unreadable and skipped "
        "(--on-bad-image skip). The first: captions-00000-of-00002.parquet, key 'k0': The embedding holds NaN or "
        "infinite values. Remove that file and rerun: its rows are captioned again.")
    # Nothing is removed: neither the damaged shard nor the first, whose lack of captions is no fault of the run's
    # when the damaged shard's rows, captioned again, are readable.
    assert damaged.read_bytes() == b"PAR1 cut short"
    assert pq.read_metadata(output / "captions-00000-of-00002.parquet").num_rows == 0


def test_a_run_file_of_an_earlier_version_without_the_source_layout_is_resumed(
    model_dir, parquet_source, tmp_path, capsys, caplog
):
    source, encoded = parquet_source
    output = tmp_path / "captions"
    argv = caption_argv(model_dir, source, output)
    assert main(argv) == 0
    (output / "captions-00001-of-00003.parquet").unlink()
    older = {  # as clipcap_hf wrote it before recording the source's number of rows and shards
        "model": str(model_dir),
        "source": {"dataset_name": None, "dataset_config_name": None, "data_files": [str(source)],
                   "dataset_format": None, "image_root": None, "split": "train", "image_column": None,
                   "streaming": False, "embeddings": None},
        "shard_size": 3,
        "dtype": "float32",
        "decoding": {"num_beams": 1, "do_sample": False, "max_new_tokens": int(MAX_NEW_TOKENS)},
        "rerank_model": None,
        "seed": None,
    }
    run_file = output / "caption_run.json"
    run_file.write_text(json.dumps({**older, "seed": 4}))
    assert main(argv) == 2  # the settings it did record are still checked
    assert "holds captions made with other settings (seed was 4, now null; see" in capsys.readouterr().err
    # So are the finished shards' names: a source now split in 3 shards cannot resume shards of 4.
    stray = output / "captions-00000-of-00004.parquet"
    stray.write_bytes((output / "captions-00000-of-00003.parquet").read_bytes())
    run_file.write_text(json.dumps(older))
    assert main(argv) == 2
    assert (f"--output {output} holds captions-00000-of-00004.parquet, but this source makes 3 shard(s)"
            in capsys.readouterr().err)
    stray.unlink()

    assert main(argv) == 0
    assert "was written by an earlier version, which did not record the source's rows" in caplog.text
    assert "wrote 1 shard(s) of 3 (2 captions); 2 already finished" in capsys.readouterr().err
    assert read_rows(output) == expected_rows(model_dir, encoded)
    keys = "\0".join(key for key, _ in read_rows(output)).encode()
    assert json.loads(run_file.read_text())["source_layout"] == {
        "num_rows": NUM_IMAGES, "num_shards": 3, "image_keys_sha256": hashlib.sha256(keys).hexdigest()}


def test_a_resume_checks_the_model_itself_not_the_path_naming_it(
    model_dir, parquet_source, tmp_path, capsys, caplog, monkeypatch
):
    import shutil

    source, encoded = parquet_source
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    output = tmp_path / "captions"
    assert main(caption_argv(model, source, output)) == 0
    unfinished = output / "captions-00001-of-00003.parquet"
    run_file = output / "caption_run.json"

    # The same folder named otherwise: with a trailing slash, or relative to another working directory.
    monkeypatch.chdir(tmp_path)
    for spelling in (f"{model}{os.sep}", "model", os.path.join("..", tmp_path.name, "model")):
        unfinished.unlink()
        assert main(caption_argv(spelling, source, output)) == 0, capsys.readouterr().err
        assert "wrote 1 shard(s) of 3 (2 captions); 2 already finished" in capsys.readouterr().err
        assert json.loads(run_file.read_text())["paths"]["model"] == spelling  # shown as given
    assert read_rows(output) == expected_rows(model_dir, encoded)

    # A run file of an earlier version named the model by its path alone: resumed when that matches, with a warning.
    older = json.loads(run_file.read_text())
    older["model"] = older.pop("paths")["model"]
    older["rerank_model"] = None
    run_file.write_text(json.dumps(older))
    unfinished.unlink()
    assert main(caption_argv("./model", source, output)) == 2  # its path is still compared
    err = capsys.readouterr().err
    assert f'holds captions made with other settings (model was "{older["model"]}", now "./model"; see' in err
    assert main(caption_argv(older["model"], source, output)) == 0
    assert "which did not record the models themselves (only the paths naming them" in caplog.text
    assert json.loads(run_file.read_text())["model"].startswith("sha256:")

    # Other weights saved into the same folder: refused, though the path is the same.
    retrained = ClipCapForConditionalGeneration.from_pretrained(model)
    with torch.no_grad():
        for parameter in retrained.parameters():
            parameter.add_(0.01)
    retrained.save_pretrained(model)
    unfinished.unlink()
    assert main(caption_argv(older["model"], source, output)) == 2
    assert re.search(r'holds captions made with other settings \(model was "sha256:\w+", now "sha256:\w+"; see',
                     capsys.readouterr().err)
    assert not unfinished.exists()


def test_model_identity_reads_a_large_weight_file_s_header_and_ends_not_all_of_it(tmp_path, monkeypatch):
    from clipcap_hf.utils.loading import model_identity

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "clipcap"}')
    header = b'{"w": {"dtype": "F32", "shape": [786432], "data_offsets": [0, 3145728]}}'
    data = bytearray(len(header).to_bytes(8, "little") + header + bytes(3 * 2**20))
    weights = folder / "model.safetensors"

    def identity_with(offset: int | None = None) -> str:
        changed = bytearray(data)
        if offset is not None:
            changed[offset] ^= 1
        weights.write_bytes(changed)
        return model_identity(str(folder))

    original = identity_with()
    monkeypatch.chdir(tmp_path)
    assert model_identity("model/") == model_identity("./model") == original  # any path naming it
    assert identity_with(len(data) // 2) == original  # the middle of a large file is not read
    for offset in (20, 8 + len(header) + 5, len(data) - 1):  # its header, first and last bytes are
        assert identity_with(offset) != original
    identity_with()
    (folder / "config.json").write_text('{"model_type": "clipcap", "prefix_length": 2}')
    assert model_identity("model") != original
    # Results a run writes into its folder are no part of the model; remote code is.
    changed_config = model_identity("model")
    for results in ("eval_results.json", "all_results.json", "trainer_state.json", "training_args.bin", "README.md"):
        (folder / results).write_text("{}")
    assert model_identity("model") == changed_config
    (folder / "modeling_custom.py").write_text("x = 1")
    assert model_identity("model") != changed_config
    assert model_identity("someone/not-cached") == "someone/not-cached"  # a Hub name not in the cache: its name


def test_a_source_of_as_many_rows_but_other_images_or_order_is_not_resumed(embeddings_captioner, tmp_path, caplog):
    from clipcap_hf.inference import caption_dataset_to_parquet

    dataset = embeddings_rows(6, embeddings_captioner.model.config.prefix_dim)
    output = tmp_path / "captions"

    def run(source):
        return caption_dataset_to_parquet(embeddings_captioner, source, output, shard_size=2, settings={"run": 1},
                                          rank=0, world_size=1)

    run(dataset)
    (output / "captions-00001-of-00003.parquet").unlink()  # killed before its second shard was written
    # k2's row moved to the end (an embeddings folder re-embedding a replaced k2), or k2 replaced by another image
    moved = dataset.select([0, 1, 3, 4, 5, 2])
    other = dataset.map(lambda row: {"image_key": "k9" if row["image_key"] == "k2" else row["image_key"]})
    for source in (moved, other):
        with pytest.raises(ValueError, match=(
            r"holds captions of a source of 6 rows in 3 shard\(s\), but this one has 6 rows in 3 shard\(s\) but "
            r"other images \(replaced, or rows that moved\)")):
            run(source)

    # A run file of the previous version, without the digest, resumes with a warning; the digest is recorded then.
    run_file = output / "caption_run.json"
    recorded = json.loads(run_file.read_text())
    del recorded["source_layout"]["image_keys_sha256"]
    run_file.write_text(json.dumps(recorded))
    assert run(dataset).written == ["captions-00001-of-00003.parquet"]
    assert "which did not record the source's image keys: resuming as if they have not changed" in caplog.text
    assert [key for key, _ in read_rows(output)] == [f"k{i}" for i in range(6)]
    assert "image_keys_sha256" in json.loads(run_file.read_text())["source_layout"]


def test_a_second_run_into_a_folder_being_written_is_refused_but_the_ranks_of_one_run_share_it(
    embeddings_captioner, tmp_path, monkeypatch
):
    from clipcap_hf.inference import caption_dataset_to_parquet

    dataset = embeddings_rows(6, embeddings_captioner.model.config.prefix_dim)

    def run(output: Path, rank: int, world_size: int):
        return caption_dataset_to_parquet(embeddings_captioner, dataset, output, shard_size=2, settings={"run": 1},
                                          rank=rank, world_size=world_size)

    # Each of `starting` starts while the run writes a shard: between writing its temporary file and renaming it.
    starting, outcomes = [], []
    write_table = pq.write_table

    def write_table_then_start_one(table, where, *args, **kwargs):
        write_table(table, where, *args, **kwargs)
        if starting:
            try:
                outcomes.append(run(*starting.pop(0)))
            except ValueError as error:
                outcomes.append(str(error))

    monkeypatch.setattr(pq, "write_table", write_table_then_start_one)
    output = tmp_path / "captions"
    starting += [(output, 0, 1), (output, 1, 2)]  # the same command again; another split of the shards
    assert len(run(output, 0, 1).written) == 3
    busy = (f"--output {output} is being written by another run (process 0 of 1 holds "
            ".caption-rank-00000-of-00001.lock): two runs would write the same shards over each other. Let it "
            "finish, or stop it and rerun this command to resume where it stopped; or write to another folder.")
    assert outcomes == [busy, busy]
    assert [key for key, _ in read_rows(output)] == [f"k{i}" for i in range(6)]  # three whole shards

    # Process 1 of 2 starting while process 0 writes: the shards 0 and 2 are 0's, shard 1 is 1's.
    output, outcomes[:] = tmp_path / "two", []
    starting.append((output, 1, 2))
    assert run(output, 0, 2).written == ["captions-00000-of-00003.parquet", "captions-00002-of-00003.parquet"]
    assert outcomes[0].written == ["captions-00001-of-00003.parquet"]
    assert [key for key, _ in read_rows(output)] == [f"k{i}" for i in range(6)]


def test_an_output_folder_on_a_filesystem_without_file_locks_is_refused_naming_it(
    embeddings_captioner, tmp_path, monkeypatch
):
    import filelock

    from clipcap_hf.inference import caption_dataset_to_parquet
    from clipcap_hf.utils.file_utils import FileLocksUnsupportedError

    def unsupported(self, *args, **kwargs):
        raise NotImplementedError  # what filelock 3 raises on a filesystem without flock

    monkeypatch.setattr(filelock.FileLock, "acquire", unsupported)
    output, dataset = tmp_path / "captions", embeddings_rows(2, embeddings_captioner.model.config.prefix_dim)
    with pytest.raises(FileLocksUnsupportedError) as refused:
        caption_dataset_to_parquet(embeddings_captioner, dataset, output, rank=0, world_size=1)
    assert str(refused.value) == (
        f"Cannot lock the output folder {output}: its filesystem does not support file locks (flock). Upgrade filelock "
        "(`pip install -U filelock`: version 4 locks without flock) or use a folder on another filesystem.")
    assert not list(output.glob("*.parquet")) and not (output / "caption_run.json").exists()


def test_integer_image_keys_are_recorded_and_resumed_as_the_writer_stores_them(embeddings_captioner, tmp_path):
    from clipcap_hf.inference import caption_dataset_to_parquet

    rows = embeddings_rows(3, embeddings_captioner.model.config.prefix_dim)
    dataset = rows.remove_columns("image_key").add_column("image_key", [391895, 522418, 184613])  # COCO ids
    output = tmp_path / "captions"

    def run():
        return caption_dataset_to_parquet(embeddings_captioner, dataset, output, shard_size=2, settings={"run": 1},
                                          rank=0, world_size=1)

    run()
    (output / "captions-00001-of-00002.parquet").unlink()
    assert run().written == ["captions-00001-of-00002.parquet"]
    assert [key for key, _ in read_rows(output)] == ["391895", "522418", "184613"]


@pytest.mark.parametrize("content, why", [("", "is not valid JSON: Expecting value"),
                                          ("[1, 2]", "does not hold a JSON object of settings but a list")])
def test_a_run_file_that_is_not_a_json_object_is_refused_naming_it(embeddings_captioner, tmp_path, content, why):
    from clipcap_hf.inference import caption_dataset_to_parquet

    output = tmp_path / "captions"
    output.mkdir()
    (output / "caption_run.json").write_text(content)
    dataset = embeddings_rows(2, embeddings_captioner.model.config.prefix_dim)
    with pytest.raises(ValueError) as refused:
        caption_dataset_to_parquet(embeddings_captioner, dataset, output, settings={"run": 1}, rank=0, world_size=1)
    message = str(refused.value)
    assert message.startswith(f"{output / 'caption_run.json'} {why}")
    assert message.endswith(
        f"Remove it and the captions-*.parquet files to start over in {output}, or write to another folder."
    )
    assert not list(output.glob("*.parquet")) and (output / "caption_run.json").read_text() == content


def test_finished_shards_without_their_run_file_are_refused_not_added_to(embeddings_captioner, tmp_path):
    # Resumed without a record, a rerun with another shard size would caption every image again beside them.
    from clipcap_hf.inference import caption_dataset_to_parquet

    output = tmp_path / "captions"
    dataset = embeddings_rows(4, embeddings_captioner.model.config.prefix_dim)
    caption_dataset_to_parquet(embeddings_captioner, dataset, output, shard_size=2, settings={"run": 1}, rank=0,
                               world_size=1)
    (output / "caption_run.json").unlink()
    shards = sorted(path.name for path in output.glob("*.parquet"))
    assert shards == ["captions-00000-of-00002.parquet", "captions-00001-of-00002.parquet"]
    message = re.escape(
        f"--output {output} holds 2 finished caption shard(s) (captions-00000-of-00002.parquet, ...) but no "
        "caption_run.json: what they were captioned from and with is unknown"
    )
    with pytest.raises(ValueError, match=message + r".* Remove the folder's captions-\*\.parquet files to start"):
        caption_dataset_to_parquet(embeddings_captioner, dataset, output, shard_size=1, settings={"run": 1}, rank=0,
                                   world_size=1)
    assert sorted(path.name for path in output.glob("*.parquet")) == shards
    assert not (output / "caption_run.json").exists()


def test_a_finished_run_is_judged_alike_before_the_model_loads_and_by_the_writer(embeddings_captioner, tmp_path):
    # `clipcap caption` asks finished_caption_run (no model loaded) first: it must refuse what the writer refuses.
    from clipcap_hf.inference import caption_dataset_to_parquet
    from clipcap_hf.inference.sharded import CaptionRunSummary, finished_caption_run

    output = tmp_path / "captions"
    dataset = embeddings_rows(4, embeddings_captioner.model.config.prefix_dim)
    shards = ["captions-00000-of-00002.parquet", "captions-00001-of-00002.parquet"]
    options = {"shard_size": 2, "rank": 0, "world_size": 1}
    caption_dataset_to_parquet(embeddings_captioner, dataset, output, settings={"run": 1, "dtype": "float32"},
                               **options)
    run_file = output / "caption_run.json"
    recorded = run_file.read_text()

    def both(settings, **loaded):
        """Each entry point's answer: its summary, or the message of its refusal."""
        answers = []
        for call in (lambda: finished_caption_run(dataset, output, settings=settings, **loaded, **options),
                     lambda: caption_dataset_to_parquet(embeddings_captioner, dataset, output, settings=settings,
                                                        **options)):
            try:
                answers.append(call())
            except ValueError as error:
                answers.append(str(error))
        return answers

    finished = CaptionRunSummary(2, written=[], skipped=shards)
    assert both({"run": 1, "dtype": "float32"}) == [finished, finished]
    # The dtype is known once the model loads: taken as recorded before, checked by the writer.
    assert both({"run": 1, "dtype": None}, loaded_settings=("dtype",))[0] == finished
    refused = (f"--output {output} holds captions made with other settings (run was 1, now 2; see {run_file}). "
               "Write to another folder, or remove it to start over.")
    assert both({"run": 2, "dtype": "float32"}) == [refused, refused]
    assert run_file.read_text() == recorded

    run_file.write_text("[]")
    refused = (f"{run_file} does not hold a JSON object of settings but a list. Remove it and the captions-*.parquet "
               f"files to start over in {output}, or write to another folder.")
    assert both({"run": 1, "dtype": "float32"}) == [refused, refused]

    run_file.unlink()
    refused = (f"--output {output} holds 2 finished caption shard(s) (captions-00000-of-00002.parquet, ...) but no "
               "caption_run.json: what they were captioned from and with is unknown, so this run could caption their "
               "images again or add captions of other settings. Remove the folder's captions-*.parquet files to "
               "start over there, or write to another folder.")
    assert both({"run": 1, "dtype": "float32"}) == [refused, refused]
    assert sorted(path.name for path in output.glob("*.parquet")) == shards and not run_file.exists()

    # A shard left: finished_caption_run says so (None) without reading or writing the run file.
    (output / shards[1]).unlink()
    assert finished_caption_run(dataset, output, settings={"run": 2}, **options) is None
    assert not run_file.exists()


def test_a_run_of_other_settings_split_alike_does_not_replace_the_run_file_of_one_writing_its_first_shards(
    embeddings_captioner, tmp_path, monkeypatch
):
    from filelock import FileLock

    from clipcap_hf.inference import caption_dataset_to_parquet

    dataset = embeddings_rows(4, embeddings_captioner.model.config.prefix_dim)
    output = tmp_path / "captions"

    def run(rank: int, settings: dict):
        return caption_dataset_to_parquet(embeddings_captioner, dataset, output, shard_size=2, settings=settings,
                                          rank=rank, world_size=2)

    # Run A, process 0 of 2, has recorded its settings and holds its lock, its first shard not finished.
    output.mkdir()
    lock_a = FileLock(output / ".caption-rank-00000-of-00002.lock")
    lock_a.acquire(timeout=0)
    (output / "caption_run.json").write_text(json.dumps({"run": "A"}))
    with pytest.raises(ValueError, match=r"holds a caption_run\.json of other settings, and another process holds "
                                         r"\.caption-rank-00000-of-00002\.lock"):
        run(1, {"run": "B"})
    assert json.loads((output / "caption_run.json").read_text()) == {"run": "A"}
    lock_a.release()

    # A run whose run file another run replaced while it captioned a shard does not write that shard.
    caption_batch = embeddings_captioner.caption_batch

    def replaced_meanwhile(batch):
        (output / "caption_run.json").write_text(json.dumps({"run": "C"}))
        return caption_batch(batch)

    (output / "caption_run.json").unlink()
    monkeypatch.setattr(embeddings_captioner, "caption_batch", replaced_meanwhile)
    with pytest.raises(ValueError, match=r"caption_run\.json was replaced or removed by another run while this one "
                                         r"captioned captions-00000-of-00002\.parquet, which is not written"):
        run(0, {"run": "A"})
    assert not list(output.glob("*.parquet"))


def test_a_streaming_resume_on_a_changed_data_file_is_refused(embeddings_captioner, tmp_path):
    from clipcap_hf.inference import caption_dataset_to_parquet

    rows = embeddings_rows(6, embeddings_captioner.model.config.prefix_dim)
    files = [tmp_path / "part-0.parquet", tmp_path / "part-1.parquet"]
    rows.select(range(3)).to_parquet(files[0])
    rows.select(range(3, 6)).to_parquet(files[1])
    output = tmp_path / "captions"

    def run():
        streamed = datasets.load_dataset("parquet", data_files=list(map(str, files)), split="train", streaming=True)
        return caption_dataset_to_parquet(embeddings_captioner, streamed, output, settings={"run": 1}, rank=0,
                                          world_size=1)

    run()
    (output / "captions-00001-of-00002.parquet").unlink()  # as if killed during shard 1
    assert run().written == ["captions-00001-of-00002.parquet"]  # the same files: resumed
    (output / "captions-00001-of-00002.parquet").unlink()
    rows.select([5, 4, 3, 2]).to_parquet(files[0])  # shard 0's file now holds other rows
    with pytest.raises(ValueError) as refused:
        run()
    assert str(refused.value) == (
        f"--output {output} holds captions of a source of an unknown number of rows in 2 shard(s), but this one has "
        f"an unknown number of rows in 2 shard(s) and other data files ({files[0]} changed or moved): the input "
        "shards would not line up with the finished ones, leaving rows out or captioning them twice. Write to a new "
        "output folder, or resume on the original source.")
    assert not (output / "captions-00001-of-00002.parquet").exists()


def test_a_streaming_source_records_each_data_file_once_and_an_image_folder_s_images(tmp_path, monkeypatch):
    from clipcap_hf.data.sources import load_image_source
    from clipcap_hf.inference import sharded

    files = [tmp_path / "part-0.jsonl", tmp_path / "part-1.jsonl"]  # the JSON loader names each file twice
    for index, path in enumerate(files):
        datasets.Dataset.from_dict({"image_key": [f"k{index}"]}).to_json(path)
    streamed = datasets.load_dataset("json", data_files=list(map(str, files)), split="train", streaming=True)
    assert [file["path"] for file in sharded._data_file_identities(streamed)] == list(map(str, files))

    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(random_images(3, seed=5)):
        image.save(folder / f"{index}.png")

    def identities():
        return sharded._data_file_identities(load_image_source(data_files=[str(folder)], streaming=True))

    recorded = identities()
    assert sorted(file["path"] for file in recorded) == [str(folder / f"{index}.png") for index in range(3)]
    random_images(1, seed=6)[0].save(folder / "1.png")  # replaced: the resume is refused
    assert identities() != recorded

    # Many files: one digest of their names, sizes and modification times; no image is read.
    monkeypatch.setattr(sharded, "_MAX_FILES_IDENTIFIED_BY_CONTENT", 2)
    monkeypatch.setattr("clipcap_hf.utils.file_utils.sampled_sha256", lambda path: pytest.fail(f"read {path}"))
    recorded = identities()
    assert set(recorded) == {"num_files", "paths_sizes_mtimes_sha256"} and recorded["num_files"] == 3
    assert identities() == recorded
    os.utime(folder / "2.png", ns=(0, os.stat(folder / "2.png").st_mtime_ns + 1))  # rewritten in place
    changed = identities()
    assert changed != recorded

    def layout(data_files):
        return {"source_layout": {"num_rows": None, "num_shards": 1, "image_keys_sha256": None,
                                  "data_files": data_files}}

    assert ("but this one has an unknown number of rows in 1 shard(s) and other data files (3 file(s) before, 3 now: "
            "one was added, removed, renamed, resized or modified)") in sharded._difference(
        tmp_path, layout(recorded), layout(changed))

    # Files named through links are recorded as named, as earlier versions recorded them (not where they point).
    linked = tmp_path / "linked"
    linked.mkdir()
    for index in range(3):
        (linked / f"l{index}.png").symlink_to(folder / f"{index}.png")
    by_links = sharded._data_file_identities(load_image_source(data_files=[str(linked)], streaming=True))
    listing = hashlib.sha256()
    for index in range(3):
        size, mtime = os.stat(folder / f"{index}.png").st_size, os.stat(folder / f"{index}.png").st_mtime_ns
        listing.update(f"l{index}.png\0{size}\0{mtime}\n".encode())
    assert by_links == {"num_files": 3, "paths_sizes_mtimes_sha256": listing.hexdigest()}

    # A streamed image folder that an earlier version read as one shard, now in several: the same files.
    many = {"source_layout": {**layout(recorded)["source_layout"], "num_shards": 2}}
    assert sharded._difference(tmp_path, layout(recorded), many) == (
        f"--output {tmp_path} holds captions of a source of an unknown number of rows in 1 shard(s), but this one has "
        "an unknown number of rows in 2 shard(s) of the same data files: the input shards would not line up with the "
        "finished ones, leaving rows out or captioning them twice. An earlier clipcap_hf streamed an image folder as "
        "one shard; this one streams it 1000 image files a shard. If that run finished, its captions are complete; "
        "otherwise write to a new output folder."
    )


def test_a_streaming_run_file_listing_each_data_file_twice_or_an_image_folder_s_as_null_resumes(tmp_path, caplog):
    # The version before this one listed each JSON and Parquet file twice, and no file of an image folder (null).
    from clipcap_hf.data.sources import load_image_source
    from clipcap_hf.inference import sharded

    files = [tmp_path / "part-0.jsonl", tmp_path / "part-1.jsonl"]
    for index, path in enumerate(files):
        datasets.Dataset.from_dict({"image_key": [f"k{index}"]}).to_json(path)
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(random_images(2, seed=5)):
        image.save(folder / f"{index}.png")

    def settings(data_files):
        return {"model": "sha256:" + "1" * 64, "source_layout": {
            "num_rows": None, "num_shards": 2, "image_keys_sha256": None, "data_files": data_files}}

    def resume(earlier_files, dataset):
        output = tmp_path / "captions"
        output.mkdir(exist_ok=True)
        (output / sharded.RUN_FILE).write_text(json.dumps(settings(earlier_files)))
        (output / "captions-00000-of-00002.parquet").write_bytes(b"")  # a finished shard
        now = settings(sharded._data_file_identities(dataset))
        caplog.clear()
        assert sharded._check_run_file(output, now) == now
        assert json.loads((output / sharded.RUN_FILE).read_text()) == now  # recorded as this version does from now on
        return caplog.text

    def streamed_json():
        return datasets.load_dataset("json", data_files=list(map(str, files)), split="train", streaming=True)

    listed = sharded._data_file_identities(streamed_json())
    assert "which recorded the same settings in another form: resuming" in resume(listed * 2, streamed_json())
    streamed_folder = load_image_source(data_files=[str(folder)], streaming=True)
    assert "which did not record the data files: resuming as if they have not changed" in resume(None, streamed_folder)
    # A file changed since is still refused.
    datasets.Dataset.from_dict({"image_key": ["other"]}).to_json(files[1])
    with pytest.raises(ValueError, match=rf"and other data files \({files[1]} changed or moved\)"):
        resume(listed * 2, streamed_json())


@pytest.mark.parametrize("probed", [".caption-rank-00001-of-00002.lock", ".caption-rank-00000-of-00004.lock"])
def test_a_rank_whose_lock_a_sibling_probes_for_an_instant_still_starts(tmp_path, probed):
    # A process of the same run checking for another run's process takes each lock for an instant: its own run's
    # (`_check_no_other_process`), or those an earlier run of another size left (`_folder_lock`, in every process
    # of the run as it starts). A rank starting then was refused as if another run held the lock.
    import threading

    from clipcap_hf.inference.sharded import _folder_lock
    from clipcap_hf.utils.file_utils import acquire_file_lock

    (tmp_path / ".caption-rank-00000-of-00004.lock").touch()  # left by an earlier run of 4 processes
    taken, done = threading.Event(), threading.Event()

    def probe():
        lock = acquire_file_lock(tmp_path / probed, "the output folder", timeout=0)
        taken.set()
        done.wait(0.3)  # a probe lasts an instant; 0.3 s here, so that the test does not race
        lock.release()

    prober = threading.Thread(target=probe)
    prober.start()
    taken.wait()
    try:
        with _folder_lock(tmp_path, 1, 2) as own:
            assert own.name == ".caption-rank-00001-of-00002.lock"
    finally:
        done.set()
        prober.join()


def test_a_run_file_naming_a_hub_model_by_name_and_commit_resumes_on_that_name_only():
    # An earlier version identified a Hub model as "name@commit" (or its name while none was cached); now by the
    # files of its cached snapshot. The same name resumes, with what was not checked named; another name does not.
    from clipcap_hf.inference.sharded import SHOWN_ONLY, _as_recorded_by, _compared

    layout = {"num_rows": 3, "num_shards": 1, "image_keys_sha256": "k"}
    now = {"model": "sha256:0123", "rerank_model": None, "source_layout": layout,
           SHOWN_ONLY: {"model": "org/clipcap", "rerank_model": None}}  # fmt: skip
    for recorded_then in ("org/clipcap@4f2a9c", "org/clipcap"):
        earlier = {**now, "model": recorded_then}
        comparable, unchecked = _as_recorded_by(earlier, now)
        assert _compared(comparable) == _compared(earlier)
        assert unchecked == "the files of org/clipcap (only its Hub name, which matches)"
    for other in ("org/other@4f2a9c", "sha256:4567"):
        earlier = {**now, "model": other}
        assert _compared(_as_recorded_by(earlier, now)[0]) != _compared(earlier)


def test_a_run_file_s_hub_model_whose_snapshot_has_gained_files_since_resumes(tmp_path):
    # A Hub model is identified by each of its cached snapshot's files: one fetched since (a tokenizer.json) is not a
    # change, but a file both hold with other content is.
    from clipcap_hf.inference.sharded import RUN_FILE, SHOWN_ONLY, _check_run_file

    layout = {"num_rows": 3, "num_shards": 1, "image_keys_sha256": "k"}
    then = {"hub": "org/clipcap", "files": {"config.json": "a", "model.safetensors": "b"}}
    settings = {"model": then, "rerank_model": None, "source_layout": layout,
                SHOWN_ONLY: {"model": "org/clipcap", "rerank_model": None}}  # fmt: skip
    (tmp_path / RUN_FILE).write_text(json.dumps(settings))
    (tmp_path / "captions-00000-of-00001.parquet").write_bytes(b"finished")
    gained = {"hub": "org/clipcap", "files": {**then["files"], "tokenizer.json": "c"}}
    _check_run_file(tmp_path, {**settings, "model": gained})
    assert json.loads((tmp_path / RUN_FILE).read_text())["model"] == then
    changed = {"hub": "org/clipcap", "files": {**then["files"], "model.safetensors": "d"}}
    with pytest.raises(ValueError, match="other settings"):
        _check_run_file(tmp_path, {**settings, "model": changed})


@pytest.mark.parametrize(
    "source, reader",
    [(["--data-files", "{source}"], "clipcap_hf.data.sources.load_image_source"),
     (["--embeddings", "{tmp}/embeddings"], "clipcap_hf.data.embeddings.load_embeddings")],
)
def test_a_bad_model_or_device_is_reported_before_the_source_is_read(
    model_dir, parquet_source, tmp_path, capsys, monkeypatch, source, reader
):
    def not_read(*args, **kwargs):
        raise AssertionError("the source was read before --model and --device were checked")

    monkeypatch.setattr(reader, not_read)
    source = [value.format(source=parquet_source[0], tmp=tmp_path) for value in source]
    argv = ["caption", *source, "--output", str(tmp_path / "captions")]
    assert main([*argv, "--model", str(tmp_path / "no-model")]) == 2
    assert capsys.readouterr().err == (
        f"clipcap caption: error: --model: folder {tmp_path / 'no-model'} does not exist.\n")
    assert main([*argv, "--model", str(model_dir), "--device", "gpu"]) == 2
    assert capsys.readouterr().err == (
        "clipcap caption: error: --device: 'gpu' is not a device; use cpu, cuda, cuda:N or mps.\n")
    assert not (tmp_path / "captions").exists()


def test_a_config_name_without_a_dataset_name_is_refused_before_any_work(model_dir, parquet_source, tmp_path, capsys):
    output = tmp_path / "captions"
    assert main(caption_argv(model_dir, parquet_source[0], output, "--dataset-config-name", "large")) == 2
    assert capsys.readouterr().err == (
        "clipcap caption: error: --dataset-config-name picks a configuration of --dataset-name, not of --data-files: "
        "leave it out.\n")
    assert not output.exists()  # nor a caption_run.json recording it


def test_a_seed_without_sampling_is_warned_of_and_changes_nothing(model_dir, parquet_source, tmp_path):
    source, encoded = parquet_source
    output = tmp_path / "captions"
    # Warned, not refused: a run an earlier version recorded with it resumes with the same options.
    with pytest.warns(UserWarning, match=r"^--seed has no effect without --do-sample: greedy and beam search draw"):
        assert main(caption_argv(model_dir, source, output, "--seed", "7")) == 0
    assert read_rows(output) == expected_rows(model_dir, encoded)


def test_the_unreadable_image_error_says_a_rerun_with_skip_keeps_the_finished_shards(model_dir, tmp_path, capsys):
    good = [png_bytes(image) for image in random_images(6, seed=12)]
    source = write_image_bytes(tmp_path / "images.parquet", [*good[:4], b"not an image", good[5]])
    output = tmp_path / "captions"
    assert main(caption_argv(model_dir, source, output)) == 2  # shards of rows 0-2 and 3-5 (the bad one)
    err = capsys.readouterr().err
    assert ("The shards finished before are kept: rerun with --on-bad-image skip to leave these images out and "
            "caption the rest. To fix or remove them instead, write the captions of the changed source to a new "
            "--output") in err
    finished = output / "captions-00000-of-00002.parquet"
    kept = finished.stat().st_mtime_ns

    # As it says: a rerun with skip resumes, keeping the finished shard.
    assert main(caption_argv(model_dir, source, output, "--on-bad-image", "skip")) == 0
    assert ("wrote 1 shard(s) of 2 (2 captions, 1 unreadable image(s) skipped); 1 already finished"
            in capsys.readouterr().err)
    assert finished.stat().st_mtime_ns == kept
    # The image fixed (or removed), the source is another one: refused there, captioned into a new folder.
    (output / "captions-00001-of-00002.parquet").unlink()
    for changed in (good, good[:4] + good[5:]):
        write_image_bytes(source, changed)
        assert main(caption_argv(model_dir, source, output)) == 2
        assert f"--output {output} holds captions of a source of 6 rows" in capsys.readouterr().err
    assert main(caption_argv(model_dir, source, tmp_path / "new")) == 0


@pytest.mark.parametrize("option", ["--data-files", "--embeddings"])
@pytest.mark.parametrize("inside", [False, True])
def test_an_output_in_a_source_folder_is_refused_before_any_work(tmp_path, capsys, option, inside):
    folder = tmp_path / "source"
    folder.mkdir()
    output = folder / "captions" if inside else folder
    # Neither --model nor the source's files exist: the --output check comes before them.
    argv = ["caption", "--model", str(tmp_path / "nothing-loaded"), option, str(folder), "--output", str(output)]
    assert main(argv) == 2
    where = "lies inside" if inside else "is"
    assert capsys.readouterr().err == (
        f"clipcap caption: error: --output {output} {where} the {option} folder {folder}: a rerun would read the "
        "caption shards written there as source data. Give --output a folder outside it.\n"
    )
    assert not (folder / "captions").exists()


def test_an_output_in_the_folder_a_data_files_pattern_searches_is_refused_before_any_work(tmp_path, capsys):
    folder = tmp_path / "source"
    folder.mkdir()
    pattern = f"{folder}/*/*.parquet"  # it would read the shards of an --output one folder below
    # Neither --model nor any file the pattern names exist: the --output check comes before them.
    argv = ["caption", "--model", str(tmp_path / "nothing-loaded"), "--data-files", pattern, "--output",
            str(folder / "captions")]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"clipcap caption: error: --output {folder / 'captions'} lies inside the folder {folder} that --data-files "
        f"{pattern} searches: a rerun would read the caption shards written there as source data. Give --output a "
        "folder outside it.\n"
    )
    assert not (folder / "captions").exists()


def test_quoted_glob_patterns_and_comma_separated_data_files_are_read_and_resumed_as_the_files_they_name(
    model_dir, parquet_source, tmp_path, capsys
):
    _, encoded = parquet_source
    data = tmp_path / "data"
    data.mkdir()
    files = two_parquet_files(data, encoded)
    output = tmp_path / "captions"
    # As the shell passes them quoted: the command expands them, as `clipcap train` does.
    assert main(streaming_argv(model_dir, [data / "part-*.parquet"], output)) == 0
    assert "wrote 2 shard(s) of 2 (7 captions); 0 already finished" in capsys.readouterr().err
    assert read_rows(output) == expected_rows(model_dir, encoded)
    run_file = json.loads((output / "caption_run.json").read_text())
    assert run_file["source"]["data_files"] == [os.path.realpath(file) for file in files]

    # The same pattern, the files comma-separated or listed (as the shell expands the pattern): the same run, resumed.
    for spelling in ([data / "part-*.parquet"], [f"{files[0]},{files[1]}"], files):
        (output / "captions-00001-of-00002.parquet").unlink()
        assert main(streaming_argv(model_dir, spelling, output)) == 0
        assert "wrote 1 shard(s) of 2 (3 captions); 1 already finished" in capsys.readouterr().err
    assert read_rows(output) == expected_rows(model_dir, encoded)

    # Comma-separated files and patterns, read whole into other shards.
    assert main(caption_argv(model_dir, f"{files[0]},{data}/part-1.*", tmp_path / "whole")) == 0
    assert read_rows(tmp_path / "whole") == expected_rows(model_dir, encoded)
    assert "wrote 3 shard(s) of 3 (7 captions)" in capsys.readouterr().err

    # A pattern that matches nothing is named, before any work.
    assert main(streaming_argv(model_dir, [f"{files[0]},{data}/other-*.parquet"], tmp_path / "none")) == 2
    assert capsys.readouterr().err == (
        f"clipcap caption: error: --data-files: No file matches '{data}/other-*.parquet'.\n")
    assert not (tmp_path / "none").exists()


def test_a_data_file_whose_name_holds_a_comma_is_read_as_named(model_dir, parquet_source, tmp_path):
    source, encoded = parquet_source
    named = tmp_path / "images,copy.parquet"  # as the shell passes it, from a pattern or quoted
    named.write_bytes(source.read_bytes())
    output = tmp_path / "captions"
    assert main(caption_argv(model_dir, named, output)) == 0
    assert read_rows(output) == expected_rows(model_dir, encoded)
    assert json.loads((output / "caption_run.json").read_text())["source"]["data_files"] == [str(named)]


@pytest.mark.parametrize(
    "data_files, output, refused",
    [
        # A file, then a pattern that would read the shards of an --output one folder below on a rerun.
        ("{source}/part/a.parquet,{source}/*/*.parquet", "{source}/captions",
         "lies inside the folder {source} that --data-files {source}/*/*.parquet searches"),
        # A pattern matching a folder, which is read whole (an image folder with its subfolders).
        ("{source}/*", "{source}/part/captions", "lies inside the --data-files folder {source}/part"),
    ],
)
def test_an_output_in_a_folder_that_a_pattern_searches_or_matches_is_refused_before_any_work(
    tmp_path, capsys, data_files, output, refused
):
    source = tmp_path / "source"
    (source / "part").mkdir(parents=True)
    (source / "part" / "a.parquet").touch()
    data_files, output, refused = (text.format(source=source) for text in (data_files, output, refused))
    argv = ["caption", "--model", str(tmp_path / "nothing-loaded"), "--data-files", data_files, "--output", output]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"clipcap caption: error: --output {output} {refused}: a rerun would read the caption shards written there "
        "as source data. Give --output a folder outside it.\n"
    )
    assert sorted(path.name for path in source.rglob("*")) == ["a.parquet", "part"]


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    # Root writes into any folder whatever its mode, so the folder's lack of write permission is what os.access says.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw))
    for output in (locked, locked / "captions"):
        # Neither --model nor the source exist: the --output check comes before them.
        argv = ["caption", "--model", str(tmp_path / "nothing-loaded"), "--data-files", str(tmp_path / "x.parquet"),
                "--output", str(output)]
        assert main(argv) == 2
        assert capsys.readouterr().err == (
            f"clipcap caption: error: --output: {output} cannot be written: the folder {locked} is not writable; "
            "name another folder.\n"
        )


def test_a_lock_file_that_cannot_be_written_is_named_as_the_output(tmp_path):
    from clipcap_hf.inference import caption_dataset_to_parquet

    denied = PermissionError(errno.EACCES, "Permission denied")
    with mock.patch("clipcap_hf.inference.sharded.acquire_file_lock", side_effect=denied), pytest.raises(
        PermissionError, match=re.escape(f"Cannot write to --output {tmp_path} ([Errno 13] Permission denied): make "
                                         "it writable, or write to another folder.")
    ):
        caption_dataset_to_parquet(object(), object(), tmp_path)


def test_a_resume_may_name_the_data_files_otherwise_and_a_refusal_names_the_setting_that_differs(
    model_dir, parquet_source, tmp_path, capsys, caplog, monkeypatch
):
    source, encoded = parquet_source
    data = tmp_path / "data"
    data.mkdir()
    (data / "images.parquet").write_bytes(source.read_bytes())
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "captions"
    run_file = output / "caption_run.json"
    unfinished = output / "captions-00001-of-00003.parquet"
    assert main(caption_argv(model_dir, "data/images.parquet", output)) == 0
    resolved = os.path.realpath(data / "images.parquet")
    assert json.loads(run_file.read_text())["source"]["data_files"] == [resolved]
    # Through a linked folder (a linked home or working folder): `$PWD`'s spelling, where relative paths get the
    # physical one.
    (tmp_path / "linked").symlink_to(data)
    for spelling in ("./data/images.parquet", str(data / "images.parquet"), "data/../data/images.parquet",
                     str(tmp_path / "linked" / "images.parquet")):
        unfinished.unlink()
        assert main(caption_argv(model_dir, spelling, output)) == 0, capsys.readouterr().err
        assert "wrote 1 shard(s) of 3 (2 captions); 2 already finished" in capsys.readouterr().err
    assert read_rows(output) == expected_rows(model_dir, encoded)

    # A run file of an earlier version recorded the path as given: resumed by any spelling of that file.
    older = json.loads(run_file.read_text())
    older["source"]["data_files"] = ["data/images.parquet"]
    run_file.write_text(json.dumps(older))
    unfinished.unlink()
    assert main(caption_argv(model_dir, "./data/images.parquet", output)) == 0
    assert "recorded the same settings in another form: resuming" in caplog.text
    assert json.loads(run_file.read_text())["source"]["data_files"] == [resolved]

    # Another file of the same images is another source: refused, naming the setting with both values.
    (data / "copy.parquet").write_bytes(source.read_bytes())
    assert main(caption_argv(model_dir, "data/copy.parquet", output)) == 2
    assert (f'other settings (source.data_files was ["{resolved}"], now ["{os.path.realpath(data / "copy.parquet")}"]'
            f"; see {run_file})") in capsys.readouterr().err

    # Streamed, each data file is recorded by its resolved path too.
    files = two_parquet_files(data, encoded)
    streamed = tmp_path / "streamed"
    assert main(streaming_argv(model_dir, [Path("data") / file.name for file in files], streamed)) == 0
    (streamed / "captions-00001-of-00002.parquet").unlink()
    argv = streaming_argv(model_dir, [os.path.join(".", "data", ".", file.name) for file in files], streamed)
    assert main(argv) == 0
    assert "wrote 1 shard(s) of 2 (3 captions); 1 already finished" in capsys.readouterr().err
    # An earlier version recorded them as the loader spelt them.
    older = json.loads((streamed / "caption_run.json").read_text())
    for file in older["source_layout"]["data_files"]:
        file["path"] = os.path.join(os.path.dirname(file["path"]), ".", os.path.basename(file["path"]))
    (streamed / "caption_run.json").write_text(json.dumps(older))
    (streamed / "captions-00001-of-00002.parquet").unlink()
    assert main(argv) == 0
    assert "wrote 1 shard(s) of 2 (3 captions); 1 already finished" in capsys.readouterr().err


def test_a_run_with_no_shard_left_loads_no_model_but_still_refuses_other_settings(
    model_dir, parquet_source, tiny_clip_dir, tmp_path, capsys, monkeypatch
):
    from transformers import CLIPModel

    source, _ = parquet_source
    output = tmp_path / "captions"
    argv = caption_argv(model_dir, source, output, "--do-sample", "--num-candidates", "2", "--rerank-model",
                        str(tiny_clip_dir), "--seed", "0")
    assert main(argv) == 0
    capsys.readouterr()
    loaded = []
    for model_class in (ClipCapForConditionalGeneration, CLIPModel):
        real = model_class.from_pretrained.__func__

        def counted(cls, *args, _real=real, **kwargs):
            loaded.append(cls.__name__)
            return _real(cls, *args, **kwargs)

        monkeypatch.setattr(model_class, "from_pretrained", classmethod(counted))

    assert main(argv) == 0
    assert "wrote 0 shard(s) of 3 (0 captions); 3 already finished" in capsys.readouterr().err
    assert loaded == []
    # Other settings are refused as before, the dtype too where --dtype names it.
    assert main([*argv, "--top-p", "0.9"]) == 2
    assert "other settings (decoding.top_p was not recorded, now 0.9; see" in capsys.readouterr().err
    assert main([*argv, "--dtype", "bfloat16"]) == 2
    assert 'other settings (dtype was "float32", now "bfloat16"; see' in capsys.readouterr().err
    # Process 3 of 4 has none of the 3 shards: it reads nothing there.
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(caption_argv(model_dir, source, tmp_path / "elsewhere")) == 0
    assert "Rank 3 of 4: wrote 0 shard(s) of 3 (0 captions); 0 already finished" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()
    assert loaded == []

    # A shard left: the models load.
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    (output / "captions-00001-of-00003.parquet").unlink()
    assert main(argv) == 0
    assert "wrote 1 shard(s) of 3 (2 captions); 2 already finished" in capsys.readouterr().err
    assert loaded == ["ClipCapForConditionalGeneration", "CLIPModel"]
