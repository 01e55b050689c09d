"""`clipcap train` end to end: which weights each recipe trains, resuming from damaged checkpoints, file modes and
offline runs."""

import importlib.util
import json
import os
import shutil
import stat
from unittest import mock

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file
from transformers import TrainingArguments

from clipcap_hf.commands import main

# `clipcap` in a fresh interpreter, as the console script runs it.
CLIPCAP = "import sys; from clipcap_hf.commands import main; sys.exit(main())"


def train_arguments(caption_folder, output_dir, cache_dir, *extra):
    return [
        "--dataset_format", "imagefolder",
        "--train_file", str(caption_folder),
        "--output_dir", str(output_dir),
        "--embedding_cache_dir", str(cache_dir),
        "--do_train",
        "--max_steps", "2",
        "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-2",
        "--warmup_steps", "0",
        "--save_strategy", "no",
        "--use_cpu",
        "--report_to", "none",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


@pytest.fixture
def parts(tmp_path, tokenizer):
    """A tiny CLIP vision tower and GPT-2 (with its tokenizer) saved as the pretrained parts of a new model."""
    model = tiny_model(tokenizer)
    model.vision_model.save_pretrained(tmp_path / "clip")
    model.language_model.save_pretrained(tmp_path / "gpt")
    tokenizer.save_pretrained(tmp_path / "gpt")
    return ["--vision_model_name_or_path", str(tmp_path / "clip"), "--text_model_name_or_path", str(tmp_path / "gpt")]


def changed_parts(before: dict, after: dict) -> set:
    """The top-level parts (vision_model, mapping_network, language_model) with a weight that changed."""
    assert before.keys() == after.keys()
    return {name.split(".")[0] for name in before if not torch.equal(before[name], after[name])}


@pytest.mark.parametrize(
    "recipe_arguments, trained",
    [
        (["--recipe", "transformer_frozen", "--prefix_length", "4", "--clip_length", "4", "--mapping_num_layers",
          "1"], {"mapping_network"}),
        (["--freeze_language_model"], {"mapping_network"}),
        (["--recipe", "mlp_finetune", "--prefix_length", "4"], {"mapping_network", "language_model"}),
    ],
)
def test_each_recipe_trains_exactly_its_parts(tmp_path, parts, caption_folder, recipe_arguments, trained):
    out = tmp_path / "out"
    # A first run of no step saves the model as built; the second trains it, from the same seed.
    arguments = train_arguments(caption_folder, out, tmp_path / "cache", *parts, *recipe_arguments)
    untrained = ["--max_steps", "1", "--learning_rate", "0", "--output_dir", str(tmp_path / "0")]
    assert main(["train", *arguments, *untrained]) == 0
    assert main(["train", *arguments]) == 0
    before, after = load_file(tmp_path / "0/model.safetensors"), load_file(out / "model.safetensors")
    assert changed_parts(before, after) == trained


@pytest.fixture
def checkpointed_run(tmp_path, saved_model_dir, caption_folder):
    """
    A run of three steps that saved a checkpoint after each, as if killed after the second (checkpoint-3 removed);
    returns its output_dir and its arguments, which resume it (a rerun with other arguments is refused).
    """
    out = tmp_path / "out"
    every_step = ("--save_strategy", "steps", "--save_steps", "1", "--max_steps", "3")
    arguments = train_arguments(caption_folder, out, tmp_path / "cache", *every_step)
    arguments = ["--model_name_or_path", str(saved_model_dir), *arguments]
    assert main(["train", *arguments]) == 0
    shutil.rmtree(out / "checkpoint-3")
    return out, arguments


@pytest.mark.parametrize(
    "damaged, part",
    [
        ("optimizer.pt", "optimizer or scheduler state"),
        ("scheduler.pt", "optimizer or scheduler state"),
        ("rng_state.pth", "random number generator state"),
        ("model.safetensors", "model weights or trainer_state.json"),
        ("trainer_state.json", "model weights or trainer_state.json"),  # named with --resume_from_checkpoint
    ],
)
def test_a_damaged_checkpoint_is_named_with_the_fix_when_resuming(checkpointed_run, capsys, damaged, part):
    out, resume = checkpointed_run
    path = out / "checkpoint-2" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    # Without a whole trainer_state.json (written last) a checkpoint is incomplete, and skipped unless named.
    explicit = ["--resume_from_checkpoint", str(out / "checkpoint-2")] if damaged == "trainer_state.json" else []
    assert main(["train", *resume, *explicit]) == 2
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("clipcap train: error: ")]
    assert len(message) == 1 and "Traceback" not in err
    assert f"Cannot resume from {out}/checkpoint-2: its {part}" in message[0]
    assert f"Delete {out}/checkpoint-2 to resume from the checkpoint before it" in message[0]
    # The fix works: without the damaged checkpoint the run resumes from the one before.
    shutil.rmtree(out / "checkpoint-2")
    assert main(["train", *resume]) == 0
    assert (out / "checkpoint-3").is_dir()


def test_resuming_from_what_is_no_checkpoint_names_it_and_a_checkpoint_to_give(
    checkpointed_run, caption_folder, saved_model_dir, capsys
):
    out, resume = checkpointed_run
    weightless = out.parent / "weightless"  # a checkpoint's trainer_state.json alone
    weightless.mkdir()
    shutil.copy(out / "checkpoint-2/trainer_state.json", weightless)
    newest = f"Give --resume_from_checkpoint a checkpoint that a run saved, e.g. {out}/checkpoint-2, the newest in its"
    anywhere = "Give --resume_from_checkpoint a checkpoint that a run saved, e.g. <output_dir>/checkpoint-N"
    no_state = (
        "it is not a Trainer checkpoint: it holds no trainer_state.json (Trainer writes it last into each checkpoint, "
        "so a checkpoint a run stopped writing has none either)"
    )
    stopped = out / "checkpoint-3"  # as a run stopped while writing it leaves it: config and weights, no state
    shutil.copytree(out / "checkpoint-2", stopped, ignore=shutil.ignore_patterns("trainer_state.json"))
    cases = {
        out / "checkpoint-9": f"there is no such folder. {newest} folder.",
        stopped: f"{no_state}. {newest} folder.",  # a checkpoint holds config.json too: no saved model's advice
        out / "model.safetensors": f"it is a file, not a checkpoint folder. {newest} folder.",
        caption_folder: f"{no_state}. {anywhere}.",
        saved_model_dir: f"{no_state}. {anywhere}; to train a saved model further, give it as --model_name_or_path.",
        weightless: f"it is not a Trainer checkpoint: it holds trainer_state.json but no model weights. {anywhere}.",
    }
    before = {path: sorted(os.listdir(path)) for path in (caption_folder, saved_model_dir, weightless)}
    for given, problem in cases.items():
        capsys.readouterr()
        assert main(["train", *resume, "--resume_from_checkpoint", str(given)]) == 2
        err = capsys.readouterr().err
        message = [line for line in err.splitlines() if line.startswith("clipcap train: error: ")]
        assert len(message) == 1 and "Traceback" not in err
        assert message[0] == f"clipcap train: error: Cannot resume from {given}: {problem}"
    # Nothing given by mistake is called damaged, nor is anything of it removed.
    assert {path: sorted(os.listdir(path)) for path in before} == before


def test_a_checkpoint_whose_weights_are_missing_is_named_damaged_and_never_given_as_one_to_resume_from(
    checkpointed_run, capsys
):
    out, resume = checkpointed_run
    (out / "checkpoint-2/model.safetensors").unlink()

    def error(*extra):
        capsys.readouterr()
        assert main(["train", *resume, *extra]) == 2
        err = capsys.readouterr().err
        message = [line for line in err.splitlines() if line.startswith("clipcap train: error: ")]
        assert len(message) == 1 and "Traceback" not in err
        return message[0]

    # Resumed from (the last checkpoint of output_dir, or given): a checkpoint of the run, damaged, to be deleted.
    for given in ([], ["--resume_from_checkpoint", str(out / "checkpoint-2")]):
        message = error(*given)
        assert f"Cannot resume from {out}/checkpoint-2: its model weights or trainer_state.json cannot" in message
        assert f"Delete {out}/checkpoint-2 to resume from the checkpoint before it" in message
        assert "not a Trainer checkpoint" not in message and "--model_name_or_path" not in message
    # Nor is it the checkpoint a refusal suggests: the newest that would resume is.
    assert error("--resume_from_checkpoint", str(out / "checkpoint-9")) == (
        f"clipcap train: error: Cannot resume from {out}/checkpoint-9: there is no such folder. Give "
        f"--resume_from_checkpoint a checkpoint that a run saved, e.g. {out}/checkpoint-1, the newest in its folder."
    )
    # The fix works: without the damaged checkpoint the run resumes from the one before.
    shutil.rmtree(out / "checkpoint-2")
    assert main(["train", *resume]) == 0
    assert (out / "checkpoint-3").is_dir()


def test_an_incomplete_checkpoint_is_removed_and_the_run_resumes_from_the_one_before(checkpointed_run, caplog):
    out, resume = checkpointed_run
    state = out / "checkpoint-2/trainer_state.json"
    state.write_text(state.read_text()[:40])  # as a run killed while writing it (Trainer writes it last) leaves it
    assert main(["train", *resume]) == 0
    assert f"Removing {out}/checkpoint-2, which a run stopped while writing it." in caplog.text
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert json.loads(state.read_text())["global_step"] == 2


def test_a_newer_folder_that_is_not_a_stopped_checkpoint_of_a_run_is_named_and_kept(tmp_path):
    from clipcap_hf.training.run import last_complete_checkpoint

    def checkpoint(name, state=None, run_arguments=True):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
        if run_arguments:
            (folder / "clipcap_run_args.json").write_text("{}")
        return folder

    complete = checkpoint("checkpoint-1", '{"global_step": 1}')
    stopped = checkpoint("checkpoint-2", '{"global_st')  # a run killed while writing its state: removed
    assert last_complete_checkpoint(str(tmp_path), remove_incomplete=True) == str(complete)
    assert not stopped.exists()
    foreign = checkpoint("checkpoint-3", run_arguments=False)  # another tool's, or written by hand: kept
    # The other processes pass it over: the main process judges it (they may see its removals part-way).
    assert last_complete_checkpoint(str(tmp_path), remove_incomplete=False) == str(complete)
    with pytest.raises(ValueError) as error:
        last_complete_checkpoint(str(tmp_path), remove_incomplete=True)
    assert str(error.value) == (
        f"{foreign} is not a checkpoint of a clipcap train run stopped while writing it (its trainer_state.json is "
        "missing, and it holds no clipcap_run_args.json); move it out of --output_dir, or give another --output_dir."
    )
    shutil.rmtree(foreign)
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    (elsewhere / "clipcap_run_args.json").write_text("{}")
    (tmp_path / "checkpoint-4").symlink_to(elsewhere)  # a link is never followed to delete
    with pytest.raises(ValueError, match=r"checkpoint-4 is not a checkpoint .* and it is a link\); move it out"):
        last_complete_checkpoint(str(tmp_path), remove_incomplete=True)
    assert sorted(path.name for path in elsewhere.iterdir()) == ["clipcap_run_args.json"]
    assert complete.is_dir()


def test_saved_weights_get_the_umask_mode(tmp_path, saved_model_dir, caption_folder):
    out = tmp_path / "out"
    every_step = ("--save_strategy", "steps", "--save_steps", "1")
    arguments = train_arguments(caption_folder, out, tmp_path / "cache", *every_step)
    previous = os.umask(0o022)  # safetensors alone would write 0600
    try:
        assert main(["train", "--model_name_or_path", str(saved_model_dir), *arguments]) == 0
    finally:
        os.umask(previous)
    weights = [out / "model.safetensors", *(out / f"checkpoint-{step}/model.safetensors" for step in (1, 2))]
    assert [stat.S_IMODE(path.stat().st_mode) for path in weights] == [0o644] * 3


def test_offline_a_new_model_names_the_option_of_the_pretrained_part_that_is_missing(tmp_path, caption_folder, capsys):
    assert main(["train", *train_arguments(caption_folder, tmp_path / "out", tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "clipcap train: error: --vision_model_name_or_path openai/clip-vit-base-patch32: no such folder" in err
    assert "(HF_HUB_OFFLINE is set). Give --vision_model_name_or_path a local folder" in err


def test_a_text_model_folder_without_its_tokenizer_is_refused_naming_the_option(
    tmp_path, parts, caption_folder, capsys
):
    # transformers 5 trained on captions its empty tokenizer made one token each, and 4.57 raised a bare TypeError.
    for name in os.listdir(tmp_path / "gpt"):
        if "token" in name or name in ("vocab.json", "merges.txt"):
            os.remove(tmp_path / "gpt" / name)
    arguments = train_arguments(caption_folder, tmp_path / "out", tmp_path / "cache", *parts, "--prefix_length", "4")
    assert main(["train", *arguments]) == 2
    assert capsys.readouterr().err.endswith(
        f"clipcap train: error: --text_model_name_or_path {tmp_path / 'gpt'} has no tokenizer (none of "
        "tokenizer_config.json, tokenizer.json, vocab.json, vocab.txt, tokenizer.model, spiece.model); save the "
        "language model's tokenizer there too "
        f"(tokenizer.save_pretrained('{tmp_path / 'gpt'}')).\n"
    )
    assert not (tmp_path / "out").exists()


def test_the_runs_warnings_go_to_stderr_and_leave_stdout_to_results(tmp_path, saved_model_dir, caption_folder):
    import subprocess
    import sys

    (caption_folder / "b.png").write_bytes(b"broken")
    arguments = train_arguments(caption_folder, tmp_path / "out", tmp_path / "cache", "--on_bad_image", "skip")
    result = subprocess.run(
        [sys.executable, "-c", CLIPCAP, "train", "--model_name_or_path", str(saved_model_dir), *arguments],
        check=False, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Skipped 1 unreadable image(s) and their 2 caption(s)" in result.stderr
    assert "Process rank: 0" in result.stderr
    assert "unreadable" not in result.stdout and "Process rank" not in result.stdout


def test_a_checkpoint_of_another_model_type_is_refused_naming_it(tmp_path, saved_model_dir, caption_folder, capsys):
    config = json.loads((saved_model_dir / "config.json").read_text())
    config["model_type"] = "gpt2"
    (saved_model_dir / "config.json").write_text(json.dumps(config))
    arguments = train_arguments(caption_folder, tmp_path / "out", tmp_path / "cache")
    assert main(["train", "--model_name_or_path", str(saved_model_dir), *arguments]) == 2
    assert capsys.readouterr().err.endswith(
        f"clipcap train: error: --model_name_or_path: {saved_model_dir} holds a model of type 'gpt2' (config.json's "
        "model_type), not a ClipCap model; give a ClipCap folder or Hub name.\n"
    )


def test_lora_adapters_whose_base_is_another_model_type_are_refused_naming_it(
    tmp_path, saved_model_dir, caption_folder
):
    from clipcap_hf.training import load_lora_model

    out = tmp_path / "out"
    lora = ("--use_lora", "--lora_r", "2", "--max_steps", "1")
    arguments = train_arguments(caption_folder, out, tmp_path / "cache", *lora)
    assert main(["train", "--model_name_or_path", str(saved_model_dir), *arguments]) == 0
    config = json.loads((saved_model_dir / "config.json").read_text())
    config["model_type"] = "gpt2"
    (saved_model_dir / "config.json").write_text(json.dumps(config))
    base = rf"^the base model of {out} \(adapter_config.json's record, else its own base_model folder\): "
    base += str(saved_model_dir)
    with pytest.raises(ValueError, match=rf"{base} holds a model of type 'gpt2'"):
        load_lora_model(out)


def test_adapters_trained_further_from_a_moved_lora_run_record_the_base_they_were_loaded_on(
    tmp_path, parts, caption_folder
):
    from peft import PeftConfig

    from clipcap_hf.training import load_lora_model

    first, moved, further = tmp_path / "first", tmp_path / "moved", tmp_path / "further"
    lora = ("--use_lora", "--lora_r", "2", "--prefix_length", "4")
    assert main(["train", *parts, *train_arguments(caption_folder, first, tmp_path / "cache", *lora)]) == 0
    first.rename(moved)  # adapter_config.json still names first/base_model
    assert PeftConfig.from_pretrained(moved).base_model_name_or_path == str(first.resolve() / "base_model")
    base = str(moved.resolve() / "base_model")
    assert load_lora_model(moved).peft_config["default"].base_model_name_or_path == base

    arguments = train_arguments(caption_folder, further, tmp_path / "cache", "--use_lora", "--save_merged_model")
    assert main(["train", "--model_name_or_path", str(moved), *arguments]) == 0
    assert PeftConfig.from_pretrained(further).base_model_name_or_path == base
    assert (further / "merged" / "model.safetensors").is_file()
    load_lora_model(further)


def test_train_and_embed_take_an_abbreviation_of_one_option_and_name_each_option_once_when_it_starts_several(
    tmp_path, capsys
):
    """HfArgumentParser alone refuses `--learn` as ambiguous between `--learning_rate` and `--learning-rate`."""
    from clipcap_hf.training.arguments import ClipCapArgumentParser, EmbedArguments
    from clipcap_hf.training.run import parse_args

    model_args, data_args, args = parse_args(
        ["--output_d", str(tmp_path), "--train-f", "a.json", "--learn=0.5", "--rec", "lora"]
    )
    assert (args.output_dir, data_args.train_file, args.learning_rate) == (str(tmp_path), "a.json", 0.5)
    assert (model_args.use_lora, args.warmup_steps) == (True, 1000)  # --rec: the lora recipe's defaults
    (embed_args,) = ClipCapArgumentParser(EmbedArguments).parse_args_into_dataclasses(
        ["--mod", "m", "--outp", "o", "--train_f", "a.json", "--image-col", "jpg"]
    )
    assert (embed_args.model, embed_args.output, embed_args.image_column) == ("m", "o", "jpg")

    with pytest.raises(SystemExit) as exit:
        main(["train", "--output_dir", str(tmp_path), "--dataset", "x"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "clipcap train: error: ambiguous option: --dataset could match --dataset_name, --dataset_config_name, "
        "--dataset_format"
    )


def refusal(capsys, arguments) -> str:
    """The one error line of a `clipcap train` run that must be refused before its data are loaded (or anything of
    its run written)."""
    capsys.readouterr()
    with mock.patch("clipcap_hf.training.run.load_training_data", side_effect=AssertionError("the data were loaded")):
        assert main(["train", *arguments]) == 2
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("clipcap train: error: ")]
    assert len(message) == 1 and "Traceback" not in err
    return message[0].removeprefix("clipcap train: error: ")


def test_an_output_dir_holding_no_run_or_read_by_the_run_is_refused_before_the_data_are_loaded(
    tmp_path, saved_model_dir, parts, caption_folder, capsys
):
    # Each was written over: another saved model's files, the input model itself, the data's folder.
    someone_elses = shutil.copytree(saved_model_dir, tmp_path / "someone_elses")
    before = {path: path.read_bytes() for path in someone_elses.iterdir()}
    model = ["--model_name_or_path", str(saved_model_dir)]

    def arguments(output_dir, *extra):
        return train_arguments(caption_folder, output_dir, tmp_path / "cache", *extra)

    overwrite = hasattr(TrainingArguments, "overwrite_output_dir")  # transformers 4.x
    message = refusal(capsys, arguments(someone_elses, *model))
    assert message.startswith(f"--output_dir {someone_elses} holds a saved model (config.json, ")
    assert message.endswith(
        ") but no run to resume or rerun (no checkpoint-N, clipcap_run_args.json or trainer_state.json): the run's "
        "model, config and tokenizer files would overwrite it. Give --output_dir a new folder"
        + (" (or add --overwrite_output_dir)." if overwrite else ".")
    )
    read = {
        ("is", "--model_name_or_path", saved_model_dir): arguments(saved_model_dir, *model),
        ("lies inside", "--model_name_or_path", saved_model_dir): arguments(saved_model_dir / "run", *model),
        ("lies inside", "--text_model_name_or_path", parts[3]): arguments(f"{parts[3]}/run", *parts),
        ("lies inside", "--train_file", caption_folder): arguments(caption_folder / "run", *model),
        ("lies inside", "--dataset_name", caption_folder): [
            "--dataset_name" if argument == "--train_file" else argument
            for argument in arguments(caption_folder / "run", *model)
        ],
    }
    for (where, option, path), given in read.items():
        assert refusal(capsys, given) == (
            f"--output_dir {given[given.index('--output_dir') + 1]} {where} the {option} folder {path}: the run would "
            "write its model and checkpoints among the files it reads. Give --output_dir a folder outside it."
        )
    assert {path: path.read_bytes() for path in someone_elses.iterdir()} == before
    assert not (saved_model_dir / "run").exists() and not (caption_folder / "run").exists()
    if overwrite:  # writing into it is asked for
        assert main(["train", *arguments(someone_elses, *model, "--overwrite_output_dir")]) == 0
    # An empty folder, or one holding other files (a log, an evaluation's results), is a new run's.
    (tmp_path / "logged" / ".hidden").mkdir(parents=True)
    (tmp_path / "logged" / "train.log").write_text("started\n")
    (tmp_path / "logged" / "eval_results.json").write_text("{}")
    assert main(["train", *arguments(tmp_path / "logged", *model)]) == 0
    assert (tmp_path / "logged" / "train.log").read_text() == "started\n"


def test_an_output_dir_that_is_a_file_or_under_one_is_refused_before_the_data_are_loaded(
    tmp_path, saved_model_dir, caption_folder, capsys
):
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    model = ["--model_name_or_path", str(saved_model_dir)]
    purpose = "name a folder to write the run's model, checkpoints and results in."
    assert refusal(capsys, train_arguments(caption_folder, notes, tmp_path / "cache", *model)) == (
        f"--output_dir: {notes} is a file; {purpose}"
    )
    assert refusal(capsys, train_arguments(caption_folder, notes / "out", tmp_path / "cache", *model)) == (
        f"--output_dir: {notes}/out cannot be created: {notes} is a file; {purpose}"
    )


def test_resuming_from_what_is_no_checkpoint_is_refused_before_the_data_are_loaded_and_leaves_nothing(
    tmp_path, parts, caption_folder, capsys
):
    # Refused once the images were embedded, it left clipcap_run_args.json and a LoRA run's base_model behind.
    out = tmp_path / "out"
    given = train_arguments(
        caption_folder, out, tmp_path / "cache", *parts, "--recipe", "lora", "--prefix_length", "4",
        "--resume_from_checkpoint", str(out / "checkpoint-2"),
    )  # fmt: skip
    assert refusal(capsys, given).startswith(f"Cannot resume from {out}/checkpoint-2: there is no such folder.")
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_a_missing_reporting_integration_or_optimizer_package_is_named_before_the_data_are_loaded(
    tmp_path, saved_model_dir, caption_folder, capsys
):
    arguments = train_arguments(
        caption_folder, tmp_path / "out", tmp_path / "cache", "--model_name_or_path", str(saved_model_dir)
    )
    # Trainer made the callback only once the images were embedded, which raised a bare RuntimeError.
    with mock.patch("transformers.integrations.integration_utils.is_wandb_available", return_value=False):
        assert refusal(capsys, [*arguments, "--report_to", "wandb"]) == (
            "--report_to wandb: WandbCallback requires wandb to be installed. Run `pip install wandb`. Or leave wandb "
            "out of --report_to (none: report nowhere)."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        message = refusal(capsys, [*arguments, "--optim", "adamw_bnb_8bit"])
        assert message.startswith("--optim adamw_bnb_8bit: ") and "`bitsandbytes`" in message
    # Trainer split --optim_args into key=value pairs with a bare "not enough values to unpack", named as --optim's.
    assert refusal(capsys, [*arguments, "--optim", "adamw_torch", "--optim_args", "lr_decay=0.9,kahan"]) == (
        "--optim_args lr_decay=0.9,kahan: 'kahan' is not a key=value pair; give comma-separated key=value pairs (e.g. "
        "--optim_args use_kahan_summation=True,momentum_dtype=bfloat16)."
    )
    assert not (tmp_path / "out").exists()
