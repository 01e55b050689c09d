"""`clipcap train` rerun in an output_dir with checkpoints: it resumes only with the arguments of the run that saved
the checkpoint (checkpoint-N/clipcap_run_args.json; output_dir's copy for a checkpoint without one), and a folder
written before runs were recorded resumes unchecked."""

import json
import shutil
from unittest import mock

import pytest
from safetensors.torch import load_file
from test_faults import train_arguments
from transformers import TrainingArguments

from clipcap_hf.commands import main
from clipcap_hf.training import ClipCapTrainer
from clipcap_hf.training.run import RUN_ARGUMENTS_NAME


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
