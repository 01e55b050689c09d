"""SIGKILL at the worst moments: `clipcap train` while it writes a checkpoint, between checkpoints and while it
embeds images; `clipcap evaluate` and `clipcap caption` while they write their output. Nothing half-written is
trusted afterwards: rerunning the same command ends with what an uninterrupted run gives."""

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import random_images
from safetensors.torch import load_file

from clipcap_hf.commands import main

# Runs `clipcap ARGS...` in a fresh interpreter that kills itself with SIGKILL at the point named by CLIPCAP_KILL:
# half-way through writing a file (the partial bytes are on disk), or right after a step completes.
KILLING_CLIPCAP = r"""
import os, signal, sys
point = os.environ["CLIPCAP_KILL"]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def write_half_and_die(path, data):
    with open(path, "wb") as file:
        file.write(data[: len(data) // 2])
    die()

if point == "checkpoint weights":  # the model weights of checkpoint-2
    import safetensors.torch, transformers.modeling_utils as modeling
    real_save_file = modeling.safe_save_file
    def save_file(tensors, filename, metadata=None):
        if f"checkpoint-2{os.sep}" in str(filename):
            real_save_file(tensors, filename, metadata=metadata)
            with open(filename, "rb") as file:
                write_half_and_die(filename, file.read())
        real_save_file(tensors, filename, metadata=metadata)
    modeling.safe_save_file = save_file
elif point == "checkpoint optimizer":  # the optimizer state of checkpoint-2
    import io, torch
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if str(f).endswith(os.path.join("checkpoint-2", "optimizer.pt")):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            write_half_and_die(f, buffer.getvalue())
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
elif point == "checkpoint state":  # trainer_state.json of checkpoint-2, which Trainer writes last
    from transformers.trainer_callback import TrainerState
    real_save_to_json = TrainerState.save_to_json
    def save_to_json(self, json_path):
        if f"checkpoint-2{os.sep}" in json_path:
            real_save_to_json(self, json_path)
            with open(json_path, "rb") as file:
                write_half_and_die(json_path, file.read())
        real_save_to_json(self, json_path)
    TrainerState.save_to_json = save_to_json
elif point == "between checkpoints":  # checkpoint-1 complete, nothing of checkpoint-2 written
    from transformers import Trainer
    real_save_checkpoint = Trainer._save_checkpoint
    def save_checkpoint(self, *args, **kwargs):
        real_save_checkpoint(self, *args, **kwargs)
        if self.state.global_step == 1:
            die()
    Trainer._save_checkpoint = save_checkpoint
elif point == "embedding":  # the second shard of the embedding cache, one image per shard
    import datasets
    import clipcap_hf.data.embeddings as embeddings
    embeddings.EMBEDDING_SHARD_SIZE = 1
    real_save_to_disk = datasets.Dataset.save_to_disk
    calls = []
    def save_to_disk(self, path, *args, **kwargs):
        calls.append(path)
        real_save_to_disk(self, path, *args, **kwargs)
        if len(calls) == 2:
            die()
    datasets.Dataset.save_to_disk = save_to_disk
elif point == "output":  # the command's output (predictions.json, the gallery): written whole, not yet in place
    real_replace = os.replace
    def replace(source, target):
        if os.path.basename(target) in ("predictions.json", "gallery.html"):
            die()
        real_replace(source, target)
    os.replace = replace
from clipcap_hf.commands import main
sys.exit(main(sys.argv[1:]))
"""


def run_killed(point, arguments):
    result = subprocess.run(
        [sys.executable, "-c", KILLING_CLIPCAP, *arguments],
        check=False, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "CLIPCAP_KILL": point},
    )  # fmt: skip
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


def train_arguments(model_dir, caption_folder, output_dir, cache_dir, *extra):
    return [
        "train",
        "--model_name_or_path", str(model_dir),
        "--dataset_format", "imagefolder",
        "--train_file", str(caption_folder),
        "--output_dir", str(output_dir),
        "--embedding_cache_dir", str(cache_dir),
        "--embedding_batch_size", "1",
        "--do_train",
        "--max_steps", "3",
        "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-2",
        "--save_strategy", "steps",
        "--save_steps", "1",
        "--use_cpu",
        "--report_to", "none",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "point", ["checkpoint weights", "checkpoint optimizer", "checkpoint state", "between checkpoints", "embedding"]
)
def test_train_killed_then_rerun_ends_with_the_weights_of_an_uninterrupted_run(
    tmp_path, saved_model_dir, caption_folder, point
):
    assert main(train_arguments(saved_model_dir, caption_folder, tmp_path / "whole", tmp_path / "whole-cache")) == 0
    arguments = train_arguments(saved_model_dir, caption_folder, tmp_path / "out", tmp_path / "cache")
    run_killed(point, arguments)
    # Killed where meant: the checkpoints the killed run left (the embedding pass: one image's shard, before any).
    left = sorted(path.name for path in (tmp_path / "out").glob("checkpoint-*"))
    expected_left = {"embedding": [], "between checkpoints": ["checkpoint-1"]}
    assert left == expected_left.get(point, ["checkpoint-1", "checkpoint-2"])
    if point == "embedding":
        assert len(cached_embeddings(tmp_path / "cache")) == 1
    assert main(arguments) == 0
    expected, resumed = load_file(tmp_path / "whole/model.safetensors"), load_file(tmp_path / "out/model.safetensors")
    for name, tensor in expected.items():
        assert tensor.equal(resumed[name]), name
    # The embedding cache holds each image once, with the embedding of an uninterrupted pass.
    expected, cached = cached_embeddings(tmp_path / "whole-cache"), cached_embeddings(tmp_path / "cache")
    assert len(cached) == len(expected) == 4
    assert cached == expected


def cached_embeddings(cache_dir):
    """The embedding cache's {image key: embedding}, after checking that no key is stored twice."""
    from datasets import concatenate_datasets, load_from_disk

    shards = [load_from_disk(str(shard)) for shard in sorted(cache_dir.rglob("shard-*"))]
    columns = concatenate_datasets(shards)[:]
    assert len(set(columns["image_key"])) == len(columns["image_key"])
    return dict(zip(columns["image_key"], columns["embedding"]))


def test_evaluate_killed_while_writing_keeps_the_earlier_output_and_a_rerun_writes_the_same(
    tmp_path, saved_model_dir, caption_folder
):
    arguments = ["evaluate", "--model", str(saved_model_dir), "--data", str(caption_folder),
                 "--data-format", "imagefolder",
                 "--metrics", "bleu", "--max-new-tokens", "4"]  # fmt: skip
    assert main([*arguments, "--output-dir", str(tmp_path / "whole")]) == 0
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.json").write_text("[]")  # an earlier run's
    run_killed("output", [*arguments, "--output-dir", str(out)])
    assert len(list(out.glob(".predictions.json.*.tmp"))) == 1  # killed with the new predictions written aside
    assert json.loads((out / "predictions.json").read_text()) == []  # never half-written
    assert main([*arguments, "--output-dir", str(out)]) == 0
    for name in ("predictions.json", "metrics.md"):
        assert (out / name).read_text() == (tmp_path / "whole" / name).read_text()


def test_caption_killed_while_writing_the_gallery_keeps_the_earlier_page(tmp_path, saved_model_dir):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(random_images(2)):
        image.save(folder / f"{index}.png")
    page = tmp_path / "gallery.html"
    page.write_text("earlier page")
    arguments = ["caption", str(folder), "--model", str(saved_model_dir), "--max-new-tokens", "4"]
    arguments += ["--gallery", str(page)]
    run_killed("output", arguments)
    assert len(list(tmp_path.glob(".gallery.html.*.tmp"))) == 1  # killed with the new page written aside
    assert page.read_text() == "earlier page"
    assert main(arguments) == 0
    assert main([*arguments[:-1], str(tmp_path / "whole.html")]) == 0
    assert page.read_text() == (tmp_path / "whole.html").read_text().replace("whole.html", "gallery.html")
