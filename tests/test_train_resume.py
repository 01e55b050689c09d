"""`clipcap train` rerun in an output_dir with checkpoints: it resumes only with the arguments and the training data of
the run that saved the checkpoint (checkpoint-N/clipcap_run_args.json; output_dir's copy for a checkpoint without one),
and a folder written before runs (or their data) were recorded resumes unchecked."""

import contextlib
import io
import json
import logging
import re
import shutil
import subprocess
import sys
from unittest import mock

import datasets
import pytest
import torch
from conftest import CAPTIONED_IMAGES, random_images, tiny_config, tiny_model, tiny_processor
from safetensors.torch import load_file
from test_faults import train_arguments
from test_folder_locks import HOLD_LOCK
from transformers import Dinov2Config, SiglipVisionConfig, TrainerCallback, TrainingArguments, ViTConfig

from clipcap_hf import ClipCapConfig, ClipCapForConditionalGeneration
from clipcap_hf.commands import main
from clipcap_hf.data import ClipCapDataCollator
from clipcap_hf.training import ClipCapTrainer, load_lora_model
from clipcap_hf.training.run import (
    CAPTION_COLUMN_KEY,
    DATA_IDENTITY_KEY,
    MODEL_IDENTITY_KEY,
    RUN_ARGUMENTS_NAME,
    RUN_LOCK_NAME,
    data_identity,
)
from clipcap_hf.utils.loading import model_identity, same_model


@pytest.fixture
def killed_run(tmp_path, saved_model_dir, caption_folder):
    """
    A run of three steps with a checkpoint after each, as if killed after its second: checkpoint-3 and the final model
    removed. Returns its output_dir, its arguments and the weights of its uninterrupted end.
    """
    out = tmp_path / "out"
    arguments = train_arguments(saved_model_dir, caption_folder, out, tmp_path / "cache")
    assert main(arguments) == 0
    uninterrupted = load_file(out / "checkpoint-3/model.safetensors")
    shutil.rmtree(out / "checkpoint-3")
    (out / "model.safetensors").unlink()
    return out, arguments, uninterrupted


@pytest.fixture
def resumed_from():
    """The checkpoint each `Trainer.train` call in the test resumed from (None: a fresh start); training runs as is."""
    calls = []
    train = ClipCapTrainer.train

    def record(self, resume_from_checkpoint=None, **kwargs):
        calls.append(resume_from_checkpoint)
        return train(self, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    with mock.patch.object(ClipCapTrainer, "train", record):
        yield calls


# The data, the seed, the schedule, the captions: an old rerun resumed from the checkpoint without a word.
CHANGED_RUN = (
    ["--learning_rate", "5e-2", "--seed", "7", "--train_file", "{other_images}", "--max_caption_length", "20"],
    ["--learning_rate 0.01 (now 0.05)", "--seed 42 (now 7)", "--train_file {caption_folder} (now {other_images})",
     "--max_caption_length 40 (now 20)"],
)  # fmt: skip
# Another set of trained parameters: an old rerun stopped blaming the checkpoint's optimizer state.
CHANGED_MODEL = (["--freeze_language_model"], ["--freeze_language_model false (now true)"])


@pytest.mark.parametrize(
    "changes, explicit, own_record",
    [(CHANGED_RUN, False, True), (CHANGED_RUN, True, True), (CHANGED_MODEL, False, True), (CHANGED_RUN, False, False)],
    ids=["run", "explicit", "model", "checkpoint_without_record"],
)
def test_a_rerun_with_changed_arguments_is_refused_naming_each_with_both_values(
    killed_run, caption_folder, tmp_path, capsys, resumed_from, changes, explicit, own_record
):
    out, arguments, _ = killed_run
    if not own_record:  # as a checkpoint saved before checkpoints held the record: output_dir's copy is checked
        (out / "checkpoint-2" / RUN_ARGUMENTS_NAME).unlink()
    record = out / "checkpoint-2" / RUN_ARGUMENTS_NAME if own_record else out / RUN_ARGUMENTS_NAME
    paths = {"caption_folder": caption_folder, "other_images": shutil.copytree(caption_folder, tmp_path / "other")}
    changed, expected = ([item.format(**paths) for item in items] for items in changes)
    resume = ["--resume_from_checkpoint", str(out / "checkpoint-2")] if explicit else []
    capsys.readouterr()
    assert main([*arguments, *changed, *resume]) == 2
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("clipcap train: error: ")]
    assert len(message) == 1 and "Traceback" not in err
    assert message[0].startswith(
        f"clipcap train: error: Cannot resume from {out}/checkpoint-2: its run was trained with other arguments "
        f"(recorded in {record}): "
    )
    for change in expected:
        assert change in message[0]
    assert message[0].count("(now ") == len(expected)
    assert "Rerun with that run's arguments to resume it, or start a new run " in message[0]
    if explicit:
        assert f"--model_name_or_path {out}/checkpoint-2 in place of --resume_from_checkpoint" in message[0]
    else:
        assert message[0].endswith(f"another --output_dir (or in {out} once that run's checkpoints are deleted).")
    # Refused before anything trained or was written.
    assert resumed_from == []
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    recorded = json.loads((out / RUN_ARGUMENTS_NAME).read_text())
    assert (recorded["learning_rate"], recorded["train_file"], recorded["freeze_language_model"]) == (
        1e-2,
        str(caption_folder),
        False,
    )


def test_a_rerun_with_the_same_arguments_resumes_and_ends_as_the_uninterrupted_run(
    killed_run, caption_folder, tmp_path, monkeypatch, resumed_from
):
    out, arguments, uninterrupted = killed_run
    # The same run, spelled otherwise: relative paths from another working directory, another logging cadence, the
    # embeddings computed one image at a time.
    monkeypatch.chdir(caption_folder.parent)
    # The same data copied anew, with new modification times (as cp, or rsync without -t, gives): the same data.
    copy = shutil.copytree(caption_folder, tmp_path / "copy")
    shutil.rmtree(caption_folder)
    shutil.copytree(copy, caption_folder, copy_function=shutil.copyfile)
    relative = {str(caption_folder): caption_folder.name, str(out): out.name}
    rerun = [relative.get(argument, argument) for argument in arguments]
    assert main([*rerun, "--logging_steps", "1", "--embedding_batch_size", "1"]) == 0
    assert resumed_from == ["out/checkpoint-2"]
    resumed = load_file(out / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert tensor.equal(resumed[name]), name
    # Each checkpoint, those of the first run and the one the rerun saved, holds the record of its run.
    recorded = json.loads((out / RUN_ARGUMENTS_NAME).read_text())
    assert (recorded["learning_rate"], recorded["max_steps"], recorded["train_file"]) == (1e-2, 3, str(caption_folder))
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    for step in (1, 2, 3):
        assert json.loads((out / f"checkpoint-{step}" / RUN_ARGUMENTS_NAME).read_text()) == recorded


def test_a_resume_with_other_embedding_batches_reads_the_cached_embeddings_and_ends_as_the_uninterrupted_run(
    killed_run, resumed_from
):
    # It was refused as changing the weights: the embeddings were cached before the first step, and are read again.
    out, arguments, uninterrupted = killed_run
    assert main([*arguments, "--embedding_batch_size", "4"]) == 0
    assert resumed_from == [f"{out}/checkpoint-2"]
    resumed = load_file(out / "model.safetensors")
    for name, tensor in uninterrupted.items():
        assert tensor.equal(resumed[name]), name


def test_use_embedding_cache_is_recorded_as_no_cache_under_streaming_which_embeds_the_pixels_either_way(tmp_path):
    from clipcap_hf.training.arguments import DataArguments, ModelArguments
    from clipcap_hf.training.run import run_arguments

    def recorded(**data) -> bool:
        data_args = DataArguments(dataset_name="user/captions", **data)
        training_args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
        return run_arguments(ModelArguments(model_name_or_path="m"), data_args, training_args)["use_embedding_cache"]

    # A streamed run resumed with --no_use_embedding_cache was refused, though it trains on the same embeddings.
    assert recorded(streaming=True) is recorded(streaming=True, use_embedding_cache=False) is False
    assert recorded() is True and recorded(use_embedding_cache=False) is False


def test_a_resume_without_the_cache_is_refused_saying_why(killed_run, capsys, resumed_from):
    # Resumed, it ended with other weights than the uninterrupted run (by 1e-6): the embeddings round otherwise.
    out, arguments, _ = killed_run
    capsys.readouterr()
    assert main([*arguments, "--no_use_embedding_cache"]) == 2
    message = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clipcap train: error: ")]
    assert len(message) == 1
    assert message[0].startswith(
        f"clipcap train: error: Cannot resume from {out}/checkpoint-2: its run was trained with other arguments "
        f"(recorded in {out}/checkpoint-2/{RUN_ARGUMENTS_NAME}): --use_embedding_cache true (now false; embeddings "
        "computed from the pixels at each step round differently from the cached ones, which changes the weights). "
        "Rerun with that run's arguments"
    )
    assert resumed_from == []


def test_a_lora_resume_on_a_base_model_saved_over_at_the_same_path_is_refused_naming_it(
    tmp_path, saved_model_dir, caption_folder, tokenizer, capsys, resumed_from
):
    out = tmp_path / "out"
    arguments = train_arguments(saved_model_dir, caption_folder, out, tmp_path / "cache", "--use_lora")
    assert main(arguments) == 0
    shutil.rmtree(out / "checkpoint-3")
    (out / "adapter_model.safetensors").unlink()
    before = model_identity(str(saved_model_dir))
    assert json.loads((out / "checkpoint-2" / RUN_ARGUMENTS_NAME).read_text())[MODEL_IDENTITY_KEY] == {
        "model_name_or_path": before,
        "vision_model_name_or_path": None,
        "text_model_name_or_path": None,
    }
    # Another model saved at the same path: the adapters and mapper would have trained on without a word.
    tiny_model(tokenizer, seed=1).save_pretrained(saved_model_dir)
    after = model_identity(str(saved_model_dir))
    assert after != before
    capsys.readouterr()
    assert main(arguments) == 2
    message = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clipcap train: error: ")]
    assert message == [
        f"clipcap train: error: Cannot resume from {out}/checkpoint-2: its run was trained with other models "
        f"(recorded in {out}/checkpoint-2/{RUN_ARGUMENTS_NAME}): --model_name_or_path {saved_model_dir} holds "
        f"another model (then {before[:19]}; now {after[:19]}). Rerun with that run's models to resume it, or start "
        f"a new run with another --output_dir (or in {out} once that run's checkpoints are deleted)."
    ]
    assert resumed_from == [None]  # the first run's start only


def test_a_finished_lora_run_rerun_with_save_merged_model_writes_the_merged_model(
    tmp_path, saved_model_dir, caption_folder, resumed_from
):
    out = tmp_path / "out"
    arguments = train_arguments(saved_model_dir, caption_folder, out, tmp_path / "cache", "--use_lora")
    assert main(arguments) == 0
    assert not (out / "merged").exists()
    assert main([*arguments, "--save_merged_model"]) == 0
    assert resumed_from == [None]  # nothing trained again
    merged = ClipCapForConditionalGeneration.from_pretrained(out / "merged").state_dict()
    expected = load_lora_model(out).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        assert tensor.equal(merged[name]), name


def test_a_folder_without_the_record_resumes_with_a_warning_and_records_the_rerun(killed_run, caplog, resumed_from):
    out, arguments, _ = killed_run
    for record in out.glob(f"**/{RUN_ARGUMENTS_NAME}"):  # as an older clipcap_hf left the folder
        record.unlink()
    assert main([*arguments, "--learning_rate", "5e-2"]) == 0
    assert resumed_from == [str(out / "checkpoint-2")]
    warnings = [record.getMessage() for record in caplog.records if RUN_ARGUMENTS_NAME in record.getMessage()]
    assert warnings == [
        f"Resuming from {out}/checkpoint-2 without checking that this run's arguments are those it was trained with: "
        f"neither it nor {out} holds {RUN_ARGUMENTS_NAME} (an older clipcap_hf wrote the checkpoint)."
    ]
    assert json.loads((out / RUN_ARGUMENTS_NAME).read_text())["learning_rate"] == 5e-2
    assert json.loads((out / "checkpoint-3" / RUN_ARGUMENTS_NAME).read_text())["learning_rate"] == 5e-2


def test_an_unrecorded_checkpoint_of_a_run_that_trained_other_parameters_is_not_called_damaged(
    killed_run, capsys, resumed_from
):
    out, arguments, _ = killed_run
    for record in out.glob(f"**/{RUN_ARGUMENTS_NAME}"):  # as an older clipcap_hf left the folder: resumed unchecked
        record.unlink()
    capsys.readouterr()
    assert main([*arguments, "--freeze_language_model"]) == 2
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("clipcap train: error: ")]
    assert len(message) == 1 and "Traceback" not in err
    # Its optimizer state, read whole, holds the groups of another set of trained parameters: it was called damaged,
    # with the advice to delete it.
    assert message[0].startswith(
        f"clipcap train: error: Cannot resume from {out}/checkpoint-2: the contents of its optimizer or scheduler "
        "state (optimizer.pt, scheduler.pt) do not fit this run (ValueError: "
    )
    assert message[0].endswith(
        "The checkpoint belongs to another model, or to a run that trained other parameters (another "
        "--freeze_language_model, --use_lora or LoRA option, or mapper). Resume it with the arguments of the run "
        "that saved it, or start a new run in another --output_dir."
    )
    assert "damaged" not in message[0] and "Delete" not in message[0]
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    # The refused run left no record of its arguments: the run's own arguments still resume it.
    assert not (out / RUN_ARGUMENTS_NAME).exists()
    assert main(arguments) == 0 and resumed_from[-1] == str(out / "checkpoint-2")


def test_a_second_run_into_the_output_dir_of_a_running_one_is_refused_before_loading_and_touches_nothing(
    killed_run, caption_folder, capsys, resumed_from
):
    out, arguments, _ = killed_run
    # The first run, writing its third checkpoint (its record comes first): a second run took it for one a stopped
    # run left incomplete, removed it, and then trained into the folder beside the first.
    writing = out / "checkpoint-3"
    writing.mkdir()
    shutil.copy(out / "checkpoint-2" / RUN_ARGUMENTS_NAME, writing / RUN_ARGUMENTS_NAME)
    # Its main process, holding the folder's lock (a fresh Python: this process imported torch and must not fork).
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / RUN_LOCK_NAME)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        before = {path: path.read_bytes() for path in files_of(out)}
        evaluation = [*arguments, "--validation_file", str(caption_folder), "--do_eval"]
        evaluation.remove("--do_train")  # it writes the results and captions of a training run's evaluation
        for refused in (arguments, evaluation):
            capsys.readouterr()
            with mock.patch("clipcap_hf.training.run.build_model", side_effect=AssertionError("a model was loaded")):
                assert main(refused) == 2
            assert capsys.readouterr().err.splitlines()[-1] == (
                f"clipcap train: error: --output_dir {out} is being written by another run (its main process holds "
                f"{RUN_LOCK_NAME}): two runs would save their checkpoints, run record and results over each other. "
                "Let that run finish, or stop it (rerun, it resumes from its last checkpoint), or give another "
                "--output_dir."
            )
            assert {path: path.read_bytes() for path in files_of(out)} == before
    finally:
        holder.communicate("", timeout=60)
    # That run over (killed or not: the OS lets go of its lock), the next one goes on: here it resumes the run.
    assert main(arguments) == 0
    assert resumed_from == [str(out / "checkpoint-2")]
    assert (out / "checkpoint-3" / "trainer_state.json").is_file() and (out / "model.safetensors").is_file()
    assert main(arguments) == 0  # the lock let go at the end of the run, too


def files_of(folder):
    return sorted(path for path in folder.rglob("*") if path.is_file())


def described(files) -> str:
    """A pattern of how the error describes the data of `files`, capturing the start of its SHA-256."""
    return rf"{len(files)} file\(s\), {sum(path.stat().st_size for path in files)} bytes, sha256 ([0-9a-f]{{12}})"


@pytest.mark.parametrize("change", ["caption edited", "image added"])
def test_a_rerun_on_data_changed_at_the_same_path_is_refused_naming_the_argument_and_the_path(
    killed_run, caption_folder, capsys, resumed_from, change
):
    out, arguments, _ = killed_run
    before = files_of(caption_folder)
    if change == "caption edited":  # to one of the same length: only the content tells
        metadata = caption_folder / "metadata.jsonl"
        metadata.write_text(metadata.read_text().replace('"A dog runs."', '"A cat runs."'))
    else:
        shutil.copy(caption_folder / "a.png", caption_folder / "e.png")
    after = files_of(caption_folder)
    capsys.readouterr()
    assert main(arguments) == 2
    message = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clipcap train: error: ")]
    assert len(message) == 1
    checkpoint = out / "checkpoint-2"
    match = re.fullmatch(
        re.escape(
            f"clipcap train: error: Cannot resume from {checkpoint}: its run was trained with other data (recorded in "
            f"{checkpoint / RUN_ARGUMENTS_NAME}): --train_file {caption_folder} holds other data (then "
        )
        + described(before)
        + "; now "
        + described(after)
        + re.escape(
            "). Rerun with that run's data to resume it, or start a new run with another --output_dir (or in "
            f"{out} once that run's checkpoints are deleted)."
        ),
        message[0],
    )
    assert match and match[1] != match[2]
    assert resumed_from == []
    identities = json.loads((out / RUN_ARGUMENTS_NAME).read_text())[DATA_IDENTITY_KEY]
    assert identities["train_file"]["sha256"].startswith(match[1])
    assert {name: identity for name, identity in identities.items() if name != "train_file"} == {
        "dataset_name": None,
        "image_root": None,
        "embeddings": None,
    }


def test_a_record_without_data_identities_resumes_with_a_warning_that_the_data_were_not_checked(
    killed_run, caplog, resumed_from
):
    out, arguments, _ = killed_run
    for path in out.glob(f"**/{RUN_ARGUMENTS_NAME}"):  # as the previous clipcap_hf wrote them: paths only
        recorded = json.loads(path.read_text())
        del recorded[DATA_IDENTITY_KEY]
        path.write_text(json.dumps(recorded))
    assert main(arguments) == 0
    assert resumed_from == [str(out / "checkpoint-2")]
    warnings = [record.getMessage() for record in caplog.records if "training data" in record.getMessage()]
    assert warnings == [
        f"Resuming from {out}/checkpoint-2 without checking that its training data are unchanged: "
        f"{out}/checkpoint-2/{RUN_ARGUMENTS_NAME} records their paths only (an older clipcap_hf wrote it)."
    ]
    assert DATA_IDENTITY_KEY in json.loads((out / "checkpoint-3" / RUN_ARGUMENTS_NAME).read_text())


def test_a_run_on_an_embeddings_folder_resumes_until_more_images_are_embedded_into_it(
    tmp_path, saved_model_dir, caption_folder, capsys, resumed_from
):
    embeddings, out = tmp_path / "embeddings", tmp_path / "out"
    embed = ["embed", "--model", str(saved_model_dir), "--dataset_format", "imagefolder", "--output", str(embeddings)]
    assert main([*embed, "--train_file", str(caption_folder)]) == 0
    arguments = train_arguments(saved_model_dir, caption_folder, out, tmp_path / "cache", "--max_steps", "2")
    for option in ("--dataset_format", "--train_file"):
        del arguments[arguments.index(option) : arguments.index(option) + 2]
    arguments += ["--embeddings", str(embeddings)]
    assert main(arguments) == 0
    # Killed after its first step; training only read the folder, so the rerun resumes.
    shutil.rmtree(out / "checkpoint-2")
    assert main(arguments) == 0
    assert resumed_from == [None, str(out / "checkpoint-1")]
    assert main([*embed, "--train_file", str(shutil.copytree(caption_folder, tmp_path / "more"))]) == 0
    capsys.readouterr()
    assert main(arguments) == 2
    message = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clipcap train: error: ")]
    assert len(message) == 1
    assert message[0].startswith(
        f"clipcap train: error: Cannot resume from {out}/checkpoint-2: its run was trained with other data "
        f"(recorded in {out}/checkpoint-2/{RUN_ARGUMENTS_NAME}): --embeddings {embeddings} holds other data (then "
    )
    assert resumed_from == [None, str(out / "checkpoint-1")]


def test_a_run_on_a_saved_dataset_resumes_though_datasets_wrote_its_cache_files_beside_it(
    tmp_path, saved_model_dir, caption_folder, resumed_from
):
    saved, out = tmp_path / "saved", tmp_path / "out"
    images = sorted(str(path) for path in caption_folder.rglob("*.png"))
    rows = {"image": images, "caption": [f"Picture {number}." for number in range(len(images))]}
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(str(saved))
    arguments = train_arguments(saved_model_dir, saved, out, tmp_path / "cache")
    del arguments[arguments.index("--dataset_format") : arguments.index("--dataset_format") + 2]
    assert main(arguments) == 0
    assert list(saved.glob("cache-*.arrow"))  # written by the run's maps, not data
    shutil.rmtree(out / "checkpoint-3")
    assert main(arguments) == 0
    assert resumed_from == [None, str(out / "checkpoint-2")]


def test_the_data_identity_of_shards_follows_their_content_not_their_folder_and_a_hub_name_has_none(tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    (first / "00.tar").write_bytes(bytes(3 * 2**20))  # above the size hashed whole: its first and last bytes count
    (first / "01.tar").write_bytes(b"captions")
    (first / "gone.tar").symlink_to(tmp_path / "nowhere.tar")  # a broken link: the loader names it
    identity = data_identity(str(first / "*.tar"))
    assert (identity["files"], identity["bytes"]) == (3, 3 * 2**20 + 8)
    second = shutil.copytree(first, tmp_path / "second", symlinks=True, copy_function=shutil.copyfile)
    assert data_identity(str(second / "*.tar")) == identity
    with open(second / "00.tar", "r+b") as shard:  # the same size, another last byte
        shard.seek(-1, 2)
        shard.write(b"x")
    assert data_identity(str(second / "*.tar"))["sha256"] != identity["sha256"]
    assert data_identity("user/captions") is None


def test_the_data_identity_leaves_out_the_run_s_own_output_and_cache_folders_inside_its_data_folder(tmp_path):
    from clipcap_hf.training.arguments import DataArguments, ModelArguments
    from clipcap_hf.training.run import run_arguments

    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a dog"}\n')

    def identity() -> dict:
        data_args = DataArguments(train_file=str(data), embedding_cache_dir=str(data / "cache"))
        training_args = TrainingArguments(output_dir=str(data / "run"), report_to="none")
        return run_arguments(ModelArguments(model_name_or_path="m"), data_args, training_args)[DATA_IDENTITY_KEY]

    started = identity()
    for written in ("run/checkpoint-1/trainer_state.json", "run/clipcap_run_args.json", "cache/shard.json"):
        (data / written).parent.mkdir(parents=True, exist_ok=True)
        (data / written).write_text("{}")
    assert identity() == started
    (data / "more" / "metadata.jsonl").parent.mkdir()
    (data / "more" / "metadata.jsonl").write_text("{}")  # another subfolder is data
    assert identity()["train_file"]["files"] == started["train_file"]["files"] + 1


def test_a_hub_model_is_identified_by_the_files_of_its_cached_snapshot_not_its_commit(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--gpt"

    def publish(commit: str, **files: str) -> None:
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for name, text in {"config.json": '{"model_type": "gpt2"}', "model.safetensors": "weights", **files}.items():
            (snapshot / name).write_text(text)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    # Not downloaded yet: its name. The first run recorded that, and its rerun (now cached) "name@commit": refused.
    assert model_identity("org/gpt") == "org/gpt"
    publish("a" * 40)
    downloaded = model_identity("org/gpt")
    assert same_model(downloaded, model_identity(str(repo / "snapshots" / ("a" * 40)))) is None  # a folder: one hash
    publish("b" * 40, **{"README.md": "a new model card"})  # a commit that changes no model file: was refused
    assert model_identity("org/gpt") == downloaded
    publish("c" * 40, **{"config.json": '{"model_type": "gpt2", "n_layer": 3}'})
    assert same_model(downloaded, model_identity("org/gpt")) is False


def _check_model_identity(
    tmp_path, option: str, name: str, recorded_identity: str | dict, identity: str | dict
) -> None:
    """`_check_resumed_arguments` of a run whose `option` names the model `name`, recorded with `recorded_identity`."""
    from clipcap_hf.training.run import _check_resumed_arguments

    def arguments(model) -> dict:
        return {option: name, DATA_IDENTITY_KEY: {}, MODEL_IDENTITY_KEY: {option: model}}

    record = tmp_path / "out" / "checkpoint-2" / RUN_ARGUMENTS_NAME
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(arguments(recorded_identity)))
    training_args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    _check_resumed_arguments(str(record.parent), str(record), arguments(identity), training_args)


def _check_models(tmp_path, recorded_identity: str | dict, identity: str | dict) -> None:
    """A run on the Hub model org/gpt (`--text_model_name_or_path`), checked as `_check_model_identity` does."""
    _check_model_identity(tmp_path, "text_model_name_or_path", "org/gpt", recorded_identity, identity)


def test_a_record_naming_a_hub_model_by_name_or_commit_resumes_with_a_warning_and_a_changed_one_is_refused(
    tmp_path, caplog
):
    files = {"hub": "org/gpt", "files": {"config.json": "1" * 64}}
    for older in ("org/gpt", "org/gpt@" + "a" * 40):  # refused as another model
        caplog.clear()
        with caplog.at_level("WARNING", logger="clipcap_hf.training.run"):
            _check_models(tmp_path, older, files)
        assert "without checking that --text_model_name_or_path org/gpt hold the models it was trained with" in (
            caplog.text
        )
    # Its files changed on the Hub: the error asked to rerun with that run's model, which the Hub no longer serves.
    with pytest.raises(ValueError) as refused:
        _check_models(tmp_path, {"hub": "org/gpt", "files": {"config.json": "2" * 64}}, files)
    assert "--text_model_name_or_path org/gpt holds another model" in str(refused.value)
    assert "changed on the Hub since that run" in str(refused.value)
    assert "Rerun with that run's" not in str(refused.value)


def test_a_hub_snapshot_that_gained_files_resumes_and_one_whose_shared_file_changed_is_refused(
    tmp_path, monkeypatch, caplog
):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--gpt"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (snapshot / "config.json").write_text('{"model_type": "gpt2"}')
    (snapshot / "model.safetensors").write_text("weights")
    started = model_identity("org/gpt")
    # The same commit: files fetched into its snapshot later (a pipeline's tokenizer, a .bin fallback) were refused
    # as the model "changed on the Hub".
    (snapshot / "tokenizer.json").write_text("{}")
    (snapshot / "pytorch_model.bin").write_text("weights")
    grown = model_identity("org/gpt")
    with caplog.at_level("WARNING", logger="clipcap_hf.training.run"):
        _check_models(tmp_path, started, grown)
        _check_models(tmp_path, grown, started)  # a cache cleaned of some of them
    assert caplog.text == ""
    (snapshot / "model.safetensors").write_text("retrained")  # a file both hold, changed
    with pytest.raises(ValueError) as refused:
        _check_models(tmp_path, grown, model_identity("org/gpt"))
    assert "--text_model_name_or_path org/gpt holds another model" in str(refused.value)
    assert "changed on the Hub since that run" in str(refused.value)


def _lora_folders(tmp_path):
    """A base model folder and LoRA adapters trained on it."""
    base, adapters = tmp_path / "base", tmp_path / "adapters"
    for folder in (base, adapters):
        folder.mkdir()
    (base / "config.json").write_text('{"model_type": "clipcap"}')
    (base / "model.safetensors").write_text("weights")
    adapter_config = {"peft_type": "LORA", "base_model_name_or_path": str(base)}
    (adapters / "adapter_config.json").write_text(json.dumps(adapter_config))
    (adapters / "adapter_model.safetensors").write_text("adapters")
    return base, adapters


def test_a_continued_lora_run_recorded_by_its_adapters_alone_resumes_with_a_warning_and_a_changed_base_is_refused(
    tmp_path, caplog
):
    from clipcap_hf.training.run import _model_identity

    base, adapters = _lora_folders(tmp_path)
    identity = _model_identity(str(adapters))
    # An earlier version recorded the adapters' folder alone: refused as another model, though nothing changed.
    with caplog.at_level("WARNING", logger="clipcap_hf.training.run"):
        _check_model_identity(tmp_path, "model_name_or_path", str(adapters), model_identity(str(adapters)), identity)
    assert f"without checking the base model of --model_name_or_path {adapters}" in caplog.text
    with pytest.raises(ValueError, match="holds another model"):  # other adapters, recorded so
        _check_model_identity(tmp_path, "model_name_or_path", str(adapters), "sha256:" + "1" * 64, identity)
    (base / "model.safetensors").write_text("retrained")  # the base saved over in place
    with pytest.raises(ValueError) as refused:
        _check_model_identity(tmp_path, "model_name_or_path", str(adapters), identity, _model_identity(str(adapters)))
    assert f"--model_name_or_path {adapters} holds another model" in str(refused.value)
    assert "Rerun with that run's models" in str(refused.value)
    # Local adapters on a Hub base whose files changed: the run's base cannot be put back, so no rerun with it.
    on_hub = [
        {"adapters": "sha256:" + "1" * 64, "base": {"hub": "org/gpt", "files": {"config.json": digit * 64}}}
        for digit in "23"
    ]
    with pytest.raises(ValueError) as refused:
        _check_model_identity(tmp_path, "model_name_or_path", str(adapters), *on_hub)
    assert "changed on the Hub since that run" in str(refused.value)
    assert "Rerun with that run's" not in str(refused.value)


def test_the_identity_of_lora_adapters_covers_the_base_they_load_into(tmp_path):
    from clipcap_hf.training.run import _model_identity

    base, adapters = tmp_path / "base", tmp_path / "adapters"
    for folder in (base, adapters):
        folder.mkdir()
    (base / "config.json").write_text('{"model_type": "clipcap"}')
    (base / "model.safetensors").write_text("weights")
    adapter_config = {"peft_type": "LORA", "base_model_name_or_path": str(base)}
    (adapters / "adapter_config.json").write_text(json.dumps(adapter_config))
    (adapters / "adapter_model.safetensors").write_text("adapters")
    started = _model_identity(str(adapters))
    # A base retrained and saved over in place: a continued LoRA run resumed its adapters on it.
    (base / "model.safetensors").write_text("retrained")
    assert _model_identity(str(adapters)) != started


def test_the_data_identity_leaves_out_the_cache_an_embeddings_folder_given_as_its_own_cache_root_holds(tmp_path):
    from clipcap_hf.training.arguments import DataArguments, ModelArguments
    from clipcap_hf.training.run import run_arguments

    embeddings = tmp_path / "E"
    (embeddings / "shard-00000").mkdir(parents=True)
    (embeddings / "shard-00000" / "data-00000-of-00001.arrow").write_bytes(b"rows")

    def identity() -> dict:
        data_args = DataArguments(embeddings=str(embeddings), embedding_cache_dir=str(embeddings))
        training_args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
        return run_arguments(ModelArguments(model_name_or_path="m"), data_args, training_args)[DATA_IDENTITY_KEY]

    started = identity()
    # What the run writes there: the rows of its captions, the evaluation images' embeddings (under the tower's
    # fingerprint). Its rerun was refused as trained on other data.
    for written in ("caption_rows/cache-1.arrow", "aadb22beb43ed957/shard-00000/data-00000-of-00001.arrow"):
        (embeddings / written).parent.mkdir(parents=True, exist_ok=True)
        (embeddings / written).write_bytes(b"cached")
    assert identity() == started
    (embeddings / "shard-00001").mkdir()
    (embeddings / "shard-00001" / "data-00000-of-00001.arrow").write_bytes(b"more rows")  # another shard is data
    assert identity()["embeddings"]["files"] == started["embeddings"]["files"] + 1


@pytest.mark.skipif(
    "overwrite_output_dir" not in TrainingArguments.__dataclass_fields__,
    reason="transformers 5 has no --overwrite_output_dir",
)
def test_a_run_started_over_another_and_killed_does_not_resume_from_the_other_runs_checkpoints(
    tmp_path, saved_model_dir, caption_folder, capsys, caplog, resumed_from
):
    # Run A, five steps at 1e-2; run B started in its folder with --overwrite_output_dir at 5e-2, killed after its
    # second checkpoint: Trainer leaves A's checkpoint-3 to -5 in place.
    out = tmp_path / "out"
    run_a = train_arguments(saved_model_dir, caption_folder, out, tmp_path / "cache")
    run_a[run_a.index("--max_steps") + 1] = "5"
    assert main(run_a) == 0
    run_b = [*run_a, "--learning_rate", "5e-2"]
    save_checkpoint = ClipCapTrainer._save_checkpoint

    def killed_after_the_second(self, *args, **kwargs):
        save_checkpoint(self, *args, **kwargs)
        if self.state.global_step == 2:
            raise KeyboardInterrupt

    with mock.patch.object(ClipCapTrainer, "_save_checkpoint", killed_after_the_second):
        with pytest.raises(KeyboardInterrupt):
            main([*run_b, "--overwrite_output_dir"])
    assert resumed_from == [None, None]
    # Rerun B to resume it: the newest checkpoint is A's, and its own record refuses it (output_dir's is B's).
    capsys.readouterr()
    assert main(run_b) == 2
    assert resumed_from == [None, None]
    message = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clipcap train: error: ")]
    assert message == [
        f"clipcap train: error: Cannot resume from {out}/checkpoint-5: its run was trained with other arguments "
        f"(recorded in {out}/checkpoint-5/{RUN_ARGUMENTS_NAME}): --learning_rate 0.01 (now 0.05). Rerun with that "
        f"run's arguments to resume it, or start a new run with another --output_dir (or in {out} once that run's "
        "checkpoints are deleted)."
    ]
    recorded = {step: json.loads((out / f"checkpoint-{step}" / RUN_ARGUMENTS_NAME).read_text()) for step in range(1, 6)}
    assert [recorded[step]["learning_rate"] for step in range(1, 6)] == [5e-2, 5e-2, 1e-2, 1e-2, 1e-2]
    warnings = [record.getMessage() for record in caplog.records if "--overwrite_output_dir" in record.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        "--overwrite_output_dir starts a new run, but the checkpoints in "
        f"{out} (checkpoint-1, checkpoint-2, checkpoint-3, checkpoint-4, checkpoint-5) stay"
    )
    # With A's checkpoints gone, the rerun resumes B from its own last one.
    for step in (3, 4, 5):
        shutil.rmtree(out / f"checkpoint-{step}")
    assert main(run_b) == 0
    assert resumed_from == [None, None, str(out / "checkpoint-2")]


# A run of one step (Trainer, resuming from its checkpoint mid-epoch, took a second step past --max_steps); one of
# one epoch, two steps of four captions (Trainer resumed it from its end), evaluated; one killed after its last
# checkpoint, before its final model was written, evaluated; a LoRA run (its adapters loaded), evaluated.
FINISHED_RUNS = {
    "max_steps": ["--max_steps", "1"],
    "epochs": ["--max_steps", "-1", "--num_train_epochs", "1", "--per_device_train_batch_size", "4",
               "--save_steps", "2"],
    "final_model_unwritten": ["--max_steps", "1"],
    "lora": ["--max_steps", "1", "--use_lora", "--save_merged_model"],
}  # fmt: skip


@pytest.mark.parametrize("run", FINISHED_RUNS)
def test_a_rerun_of_a_finished_run_trains_nothing_keeps_its_final_model_and_evaluates_it(
    tmp_path, saved_model_dir, caption_folder, caplog, resumed_from, run
):
    out = tmp_path / "out"
    evaluation = ["--do_eval", "--validation_file", str(caption_folder), "--generation_max_new_tokens", "4"]
    evaluation = evaluation if run != "max_steps" else []
    arguments = train_arguments(saved_model_dir, caption_folder, out, tmp_path / "cache", *FINISHED_RUNS[run])
    assert main([*arguments, *evaluation]) == 0
    last = {"max_steps": 1, "epochs": 2, "final_model_unwritten": 1, "lora": 1}[run]
    evaluated = json.loads((out / "eval_results.json").read_text()) if evaluation else None
    if run == "final_model_unwritten":
        for name in ("model.safetensors", "trainer_state.json", "train_results.json"):
            (out / name).unlink()
    # Everything but the evaluation's results (their runtimes differ) is compared byte for byte after the rerun.
    results = ("eval_results.json", "all_results.json")
    written = {path: path.read_bytes() for path in out.rglob("*") if path.is_file() and path.name not in results}
    caplog.clear()
    assert main([*arguments, *evaluation]) == 0
    assert resumed_from == [None]  # the first run's start only
    assert sorted(path.name for path in out.glob("checkpoint-*")) == [f"checkpoint-{last}"]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == last
    final_model = out / "model.safetensors"
    if run == "final_model_unwritten":  # written from the last checkpoint, with this run's training_args.bin
        assert final_model.read_bytes() == (out / f"checkpoint-{last}/model.safetensors").read_bytes()
        for path in (final_model, out / "training_args.bin"):  # transformers 4's holds the time (logging_dir)
            written[path] = path.read_bytes()
    assert {path: path.read_bytes() for path in written} == written
    if evaluation:  # evaluated again, the final model: the first run's loss, the predictions named by the last step
        assert json.loads((out / "eval_results.json").read_text())["eval_loss"] == evaluated["eval_loss"]
        assert [path.name for path in (out / "predictions").iterdir()] == [f"eval_step{last}.json"]
    messages = [record.getMessage() for record in caplog.records if "The run is complete" in record.getMessage()]
    assert messages == [
        f"The run is complete: {out}/checkpoint-{last} holds its last step ({last}), so nothing is trained and its "
        f"final model stays as it is. To train it longer, start a new run from the final model: --model_name_or_path "
        f"{out} with another --output_dir (a resume with another --max_steps or --num_train_epochs is refused: they "
        "set the learning-rate schedule)."
    ]


def test_a_finished_run_without_checkpoints_is_not_trained_again_and_a_rerun_with_other_arguments_is_refused(
    tmp_path, saved_model_dir, caption_folder, capsys, caplog, resumed_from
):
    out = tmp_path / "out"
    evaluation = ["--do_eval", "--validation_file", str(caption_folder), "--generation_max_new_tokens", "4"]
    arguments = [*train_arguments(saved_model_dir, caption_folder, out, tmp_path / "cache", "--max_steps", "2",
                                  "--save_strategy", "no"), *evaluation]  # fmt: skip
    assert main(arguments) == 0
    evaluated = json.loads((out / "eval_results.json").read_text())
    results = ("eval_results.json", "all_results.json")  # their runtimes differ
    written = {path: path.read_bytes() for path in out.rglob("*") if path.is_file() and path.name not in results}
    assert not list(out.glob("checkpoint-*"))
    # The same arguments: nothing trained (Trainer started afresh and wrote over the final model), the final model
    # evaluated again.
    caplog.clear()
    assert main(arguments) == 0
    assert resumed_from == [None]
    assert {path: path.read_bytes() for path in written} == written
    assert json.loads((out / "eval_results.json").read_text())["eval_loss"] == evaluated["eval_loss"]
    messages = [record.getMessage() for record in caplog.records]
    assert any(f"The run is complete: {out} holds its last step (2)" in message for message in messages)
    # Other arguments: refused, naming them, before anything is written.
    capsys.readouterr()
    assert main([*arguments, "--learning_rate", "0.5", "--max_steps", "3"]) == 2
    error = capsys.readouterr().err
    assert f"clipcap train: error: Cannot resume from {out}: its run was trained with other arguments" in error
    assert "--learning_rate 0.01 (now 0.5); --max_steps 2 (now 3). Rerun with that run's arguments" in error
    assert error.rstrip().endswith("or start a new run with another --output_dir.")
    assert resumed_from == [None] and {path: path.read_bytes() for path in written} == written


def test_a_finished_run_that_loaded_its_best_checkpoint_is_evaluated_and_written_from_that_checkpoint(
    tmp_path, saved_model_dir, caption_folder, resumed_from
):
    out = tmp_path / "out"
    # The loss falls at every step: with --greater_is_better the best checkpoint is the first, not the last.
    best = ["--eval_strategy", "steps", "--eval_steps", "1", "--validation_file", str(caption_folder), "--do_eval",
            "--load_best_model_at_end", "--metric_for_best_model", "eval_loss", "--greater_is_better", "true",
            "--generation_max_new_tokens", "4"]  # fmt: skip
    arguments = train_arguments(saved_model_dir, caption_folder, out, tmp_path / "cache", *best)
    assert main(arguments) == 0
    first = load_file(out / "checkpoint-1/model.safetensors")
    assert load_file(out / "model.safetensors").keys() == first.keys()
    assert all(torch.equal(load_file(out / "model.safetensors")[name], first[name]) for name in first)
    evaluated = json.loads((out / "eval_results.json").read_text())["eval_loss"]

    assert main(arguments) == 0  # evaluates the final model: the best checkpoint's weights, not the last one's
    assert json.loads((out / "eval_results.json").read_text())["eval_loss"] == evaluated
    # Stopped after its last checkpoint, before its final model was written: written from the best checkpoint.
    for name in ("model.safetensors", "trainer_state.json"):
        (out / name).unlink()
    assert main(arguments) == 0
    assert (out / "model.safetensors").read_bytes() == (out / "checkpoint-1/model.safetensors").read_bytes()
    assert resumed_from == [None]


def test_a_finished_run_rerun_with_a_larger_max_steps_is_refused_and_without_its_record_resumes_to_the_new_end(
    tmp_path, saved_model_dir, caption_folder, capsys, resumed_from
):
    out = tmp_path / "out"
    arguments = train_arguments(saved_model_dir, caption_folder, out, tmp_path / "cache", "--max_steps", "1")
    assert main(arguments) == 0
    capsys.readouterr()
    # The length of the run sets its learning-rate schedule: recorded, and a resume may not change it.
    assert main([*arguments, "--max_steps", "3"]) == 2
    message = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clipcap train: error: ")]
    assert len(message) == 1 and ": --max_steps 1 (now 3). Rerun with that run's arguments" in message[0]
    assert resumed_from == [None]
    # A checkpoint an older clipcap_hf wrote resumes unchecked: Trainer goes on to the new length, and stops there.
    for record in out.glob(f"**/{RUN_ARGUMENTS_NAME}"):
        record.unlink()
    assert main([*arguments, "--max_steps", "3"]) == 0
    assert resumed_from == [None, str(out / "checkpoint-1")]
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3


@pytest.fixture
def killed_run_of_two_caption_columns(tmp_path, saved_model_dir, caption_folder):
    """
    `killed_run` on an image folder read without --dataset_format whose metadata has both `text` and `caption`: its
    captions are read from the first of the usual columns, `caption`.
    """
    row = {"text": "From text.", "caption": "From caption."}
    lines = [json.dumps({"file_name": name, **row}) for name in CAPTIONED_IMAGES]
    (caption_folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    arguments = train_arguments(saved_model_dir, caption_folder, out, tmp_path / "cache")
    position = arguments.index("--dataset_format")
    del arguments[position : position + 2]
    assert main(arguments) == 0
    assert json.loads((out / RUN_ARGUMENTS_NAME).read_text())[CAPTION_COLUMN_KEY] == "caption"
    shutil.rmtree(out / "checkpoint-3")
    (out / "model.safetensors").unlink()
    return out, arguments


def _rewrite_records(out, change) -> None:
    for path in out.glob(f"**/{RUN_ARGUMENTS_NAME}"):
        recorded = json.loads(path.read_text())
        change(recorded)
        path.write_text(json.dumps(recorded))


def test_a_resume_reading_its_captions_from_another_column_is_refused_naming_caption_column(
    killed_run_of_two_caption_columns, capsys, resumed_from
):
    out, arguments = killed_run_of_two_caption_columns
    # As a run that read `text` (an earlier default): the same arguments now read `caption`.
    _rewrite_records(out, lambda recorded: recorded.update({CAPTION_COLUMN_KEY: "text"}))
    capsys.readouterr()
    assert main(arguments) == 2
    err = capsys.readouterr().err
    assert (
        f"clipcap train: error: Cannot resume from {out}/checkpoint-2: its run read its training captions from the "
        f"column text (recorded in {out}/checkpoint-2/{RUN_ARGUMENTS_NAME}), this run from caption. Rerun with "
        f"--caption_column text to resume it, or start a new run with another --output_dir" in err
    )
    assert resumed_from == []
    # Named, the recorded column resumes the run.
    assert main([*arguments, "--caption_column", "text"]) == 2  # --caption_column is an argument the record has too
    _rewrite_records(out, lambda recorded: recorded.update({"caption_column": "text"}))
    assert main([*arguments, "--caption_column", "text"]) == 0
    assert resumed_from == [str(out / "checkpoint-2")]


def test_a_record_without_the_caption_column_resumes_with_a_warning_naming_the_column_read(
    killed_run_of_two_caption_columns, caplog, resumed_from
):
    out, arguments = killed_run_of_two_caption_columns
    _rewrite_records(out, lambda recorded: recorded.pop(CAPTION_COLUMN_KEY))  # as an older clipcap_hf wrote them
    assert main(arguments) == 0
    assert resumed_from == [str(out / "checkpoint-2")]
    warnings = [record.getMessage() for record in caplog.records if "captions its run read" in record.getMessage()]
    assert warnings == [
        f"Resuming from {out}/checkpoint-2 without checking that it trains on the captions its run read: "
        f"{out}/checkpoint-2/{RUN_ARGUMENTS_NAME} does not record their column (an older clipcap_hf wrote it), which "
        "this run chose as 'caption', the first of caption, txt, text the source has; give --caption_column to read "
        "another."
    ]
    assert json.loads((out / "checkpoint-3" / RUN_ARGUMENTS_NAME).read_text())[CAPTION_COLUMN_KEY] == "caption"


# Towers that transformers 5 holds under other names than it saves them by (4.57 under the same): ViT's and DINOv2's
# `attention.attention.key` are its `attention.k_proj`, SigLIP's `vision_model.vision_model.` its `vision_model.`,
# DINOv2's SwiGLU `weights_in` its `gate_proj` and `up_proj` halves.
TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
         "patch_size": 8, "image_size": 32}
RENAMED_TOWERS = {
    "vit": (lambda: ViTConfig(**TOWER), "cls"),
    "siglip": (lambda: SiglipVisionConfig(**TOWER), "pooled"),
    "dinov2_swiglu": (lambda: Dinov2Config(**TOWER, use_swiglu_ffn=True), "cls"),
}


class TowerWeights(TrainerCallback):
    """The vision tower's weights as the model holds them when training begins and when each checkpoint is saved."""

    def __init__(self):
        self.at_begin = None
        self.saved = {}

    @staticmethod
    def of(model) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().clone() for name, tensor in model.vision_model.state_dict().items()}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.at_begin = self.of(model)

    def on_save(self, args, state, control, model=None, **kwargs):
        self.saved[state.global_step] = self.of(model)


def _same(weights, others) -> bool:
    return weights.keys() == others.keys() and all(weights[name].equal(others[name]) for name in weights)


@contextlib.contextmanager
def transformers_warnings():
    """What transformers' loggers warn of meanwhile (they do not propagate to caplog)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    try:
        yield stream
    finally:
        logging.getLogger("transformers").removeHandler(handler)


def train_a_tower(tokenizer, family, output_dir, seed, resume=None):
    """
    Three steps from pixels, a checkpoint after each, of a tiny model with a `family` tower, trained with it: a resume
    that left the tower as built (seeded with `seed`) would show. Returns the trainer and its `TowerWeights`.
    """
    vision_config, pooling = RENAMED_TOWERS[family]
    text = tiny_config(tokenizer)
    torch.manual_seed(seed)
    model = ClipCapForConditionalGeneration(
        ClipCapConfig(vision_config=vision_config(), vision_pooling=pooling, text_config=text.text_config,
                      prefix_length=text.prefix_length, image_token_id=text.image_token_id)
    )
    model.freeze_vision_model(False)
    processor = tiny_processor(tokenizer)
    captions = [texts if isinstance(texts, str) else texts[0] for texts in CAPTIONED_IMAGES.values()]
    pixels = processor.image_processor(random_images(len(captions)), return_tensors="pt")["pixel_values"]
    dataset = datasets.Dataset.from_dict({"caption": captions, "pixel_values": pixels.numpy()}).with_format("torch")
    tower = TowerWeights()
    trainer = ClipCapTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
            save_strategy="steps", save_steps=1, report_to=[], remove_unused_columns=False, use_cpu=True,
            disable_tqdm=True, seed=0,
        ),
        train_dataset=dataset,
        data_collator=ClipCapDataCollator(processor),
        callbacks=[tower],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, tower


@pytest.mark.parametrize("family", RENAMED_TOWERS)
def test_a_resume_loads_a_trained_tower_saved_under_other_names_and_ends_as_the_uninterrupted_run(
    tmp_path, tokenizer, family
):
    # transformers 5's Trainer loaded a checkpoint with torch's `load_state_dict`, without the renaming that
    # `from_pretrained` does: the tower kept its weights of before the resume, with warnings of missing and unexpected
    # keys (and, on 4.57 too, of GPT-2's output layer, tied to the input embeddings that were loaded).
    _, whole = train_a_tower(tokenizer, family, tmp_path / "whole", seed=0)
    assert not _same(whole.saved[2], whole.saved[3])  # the tower trains
    out = shutil.copytree(tmp_path / "whole", tmp_path / "out", ignore=shutil.ignore_patterns("checkpoint-3"))
    with transformers_warnings() as warnings:
        _, resumed = train_a_tower(tokenizer, family, out, seed=1, resume=str(out / "checkpoint-2"))
    assert _same(resumed.at_begin, whole.saved[2])  # not the tower it was built with (seed 1)
    assert _same(resumed.saved[3], whole.saved[3])
    final = load_file(out / "checkpoint-3" / "model.safetensors")
    uninterrupted = load_file(tmp_path / "whole" / "checkpoint-3" / "model.safetensors")
    assert final.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert tensor.equal(final[name]), name
    assert "missing keys" not in warnings.getvalue() and "unexpected keys" not in warnings.getvalue()


def test_loading_the_best_checkpoint_loads_its_tower_saved_under_other_names(tmp_path, tokenizer):
    trainer, tower = train_a_tower(tokenizer, "vit", tmp_path / "out", seed=0)
    assert not _same(tower.saved[1], TowerWeights.of(trainer.model))
    trainer.state.best_model_checkpoint = str(tmp_path / "out" / "checkpoint-1")
    with transformers_warnings() as warnings:
        trainer._load_best_model()
    assert _same(TowerWeights.of(trainer.model), tower.saved[1])
    assert "missing keys" not in warnings.getvalue() and "unexpected keys" not in warnings.getvalue()


def test_weights_load_as_trainer_loads_them_with_a_warning_where_their_names_cannot_be_converted(tokenizer, caplog):
    from clipcap_hf.training import trainer as trainer_module

    model = tiny_model(tokenizer)
    weights = {name: tensor + 1 for name, tensor in model.state_dict().items()}
    with mock.patch.object(trainer_module, "_in_memory_names", side_effect=TypeError("another signature")):
        with caplog.at_level(logging.WARNING, logger=trainer_module.__name__), trainer_module._loading_checkpoint_names(
            model
        ):
            model.load_state_dict(weights, strict=False)
    assert all(model.state_dict()[name].equal(tensor) for name, tensor in weights.items())
    assert "load_state_dict" not in vars(model)  # the model's own method again
    assert [record.getMessage() for record in caplog.records if record.name == trainer_module.__name__] == [
        "Could not convert the checkpoint's weight names as from_pretrained does (TypeError: another signature); "
        "loading them as Trainer does, which leaves a ViT, SigLIP or DINOv2 tower's weights as they were."
    ]
