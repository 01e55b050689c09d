"""A training run from arguments: the model, the data and the `Trainer` ([`train`]), and [`main`], the entry point of
`clipcap train` and `examples/run_clipcap.py`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from accelerate import PartialState
from tqdm.auto import tqdm
from transformers import TrainerState, TrainingArguments, set_seed
from transformers.integrations import get_reporting_integration_callbacks
from transformers.trainer import TRAINER_STATE_NAME
from transformers.utils import ADAPTER_CONFIG_NAME, find_adapter_config_file

from ..data import ClipCapDataCollator, TrainingData, load_training_data
from ..data.embeddings import EMBEDDINGS_INFO_NAME
from ..data.prepare import data_file_patterns
from ..data.sources import DEFAULT_CAPTION_COLUMNS, read_stream
from ..modeling_clipcap import ClipCapForConditionalGeneration
from ..processing_clipcap import ClipCapProcessor, check_tokenizer_files
from ..utils.file_utils import (
    acquire_file_lock,
    check_output_folder,
    check_output_outside_inputs,
    glob_folder,
    read_json,
    sampled_sha256,
    save_pretrained,
)
from ..utils.loading import (
    check_pretrained_source,
    is_adapters_identity,
    is_hub_identity,
    load_clipcap,
    local_folder,
    model_identity,
    same_model,
)
from .arguments import (
    ARGUMENTS_A_RESUME_MAY_CHANGE,
    CONFIG_OPTIONS,
    DATA_PATH_ARGUMENTS,
    MODEL_PATH_ARGUMENTS,
    PART_OPTIONS,
    PATH_ARGUMENTS,
    RECIPES,
    RECORDED_TRAINING_ARGUMENTS,
    TRANSFORMER_OPTIONS,
    ClipCapArgumentParser,
    DataArguments,
    ModelArguments,
    _recipe_architecture,
    _recipe_run_defaults,
    check_transformer_options,
)
from .lora import (
    BASE_MODEL_DIR,
    add_lora,
    check_continued_lora_options,
    check_lora_target_modules,
    is_peft_model,
    load_lora_model,
    lora_base_model,
    merge_lora,
)
from .trainer import (
    RUN_ARGUMENTS_NAME,
    ClipCapTrainer,
    check_is_a_checkpoint,
    checkpoint_folders,
    write_run_arguments,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Model


def build_model(model_args: ModelArguments) -> tuple[ClipCapForConditionalGeneration, ClipCapProcessor]:
    """
    Load a ClipCap checkpoint, or assemble a new one from a pretrained CLIP and language model. A LoRA run's output
    (a folder with `adapter_config.json`) loads as a trainable `PeftModel` when `use_lora` is set.
    """
    # transformers does not expand `~`: expanded once here, before any lookup takes a folder for a Hub name.
    path = None if model_args.model_name_or_path is None else local_folder(model_args.model_name_or_path)
    parts = {
        name: None if getattr(model_args, name) is None else local_folder(getattr(model_args, name))
        for name in PART_OPTIONS
    }
    if path is not None:
        option = "--model_name_or_path"
        check_pretrained_source(path, option, filenames=("config.json", ADAPTER_CONFIG_NAME))
        if _is_lora_output(path):
            if not model_args.use_lora:
                raise ValueError(
                    f"{option} {path} holds LoRA adapters ({ADAPTER_CONFIG_NAME}). Add --use_lora (or "
                    "--recipe lora) to train those adapters further, or continue from a plain checkpoint: the merged "
                    "model (output_dir/merged, written by --save_merged_model, or clipcap_hf.training.merge_lora)."
                )
            # transformers' from_pretrained would load the adapters frozen (and add_lora would then wrap them twice).
            model = load_lora_model(path, is_trainable=True)
            processor = ClipCapProcessor.from_pretrained(path, trust_remote_code=False)
        else:
            model, processor = load_clipcap(path, option)
        _check_checkpoint_architecture(model_args, model.config)
        return model, processor
    for name, part in parts.items():
        check_pretrained_source(part, f"--{name}")
    vision, text = parts["vision_model_name_or_path"], parts["text_model_name_or_path"]
    check_tokenizer_files(text, "--text_model_name_or_path")
    config_kwargs = {
        "mapping_num_layers": model_args.mapping_num_layers,
        "normalize_prefix": model_args.normalize_prefix,
        "vision_pooling": model_args.vision_pooling,
    }
    if model_args.mapping_type == "transformer":
        config_kwargs["clip_length"] = model_args.clip_length
    processor = ClipCapProcessor.from_vision_text_pretrained(
        vision,
        text,
        num_image_tokens=model_args.prefix_length,
        trust_remote_code=False,
    )
    model = ClipCapForConditionalGeneration.from_vision_text_pretrained(
        vision,
        text,
        mapping_type=model_args.mapping_type,
        prefix_length=model_args.prefix_length,
        image_token_id=processor.image_token_id,  # the id the tokenizer gave it
        **config_kwargs,
    )
    return model, processor


def _is_lora_output(name_or_path: str) -> bool:
    return find_adapter_config_file(name_or_path) is not None


def _check_checkpoint_architecture(model_args: ModelArguments, config) -> None:
    """Refuse architecture options given with --model_name_or_path that the checkpoint does not have."""
    problems = [
        f"--{name} {getattr(model_args, name)} builds a new model"
        for name in PART_OPTIONS
        if getattr(model_args, name) is not None
    ]
    # A mapper other than a transformer has none of its options: the config's values for them are unused.
    unused = TRANSFORMER_OPTIONS if config.mapping_type != "transformer" else ()
    for name in CONFIG_OPTIONS:
        value = getattr(model_args, name)
        if value is not None and value != getattr(config, name) and name not in unused:
            problems.append(f"--{name} {value} (the checkpoint's: {getattr(config, name)})")
    recipe_type = _recipe_architecture(model_args.recipe).get("mapping_type")
    if recipe_type is not None and recipe_type != config.mapping_type and model_args.mapping_type is None:
        problems.append(
            f"--recipe {model_args.recipe} trains a {recipe_type} mapper (the checkpoint's: {config.mapping_type}; "
            "set --freeze_language_model or --use_lora without a recipe instead)"
        )
    if problems:
        raise ValueError(
            f"--model_name_or_path {model_args.model_name_or_path} continues a checkpoint, whose architecture is "
            f"fixed, but {'; '.join(problems)}. Leave these options out to keep the checkpoint's architecture, or "
            "leave out --model_name_or_path to build a new model."
        )
    given = [f"--{name} {getattr(model_args, name)}" for name in unused if getattr(model_args, name) is not None]
    check_transformer_options(
        given, config.mapping_type, f"the checkpoint --model_name_or_path {model_args.model_name_or_path}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# The run


def parse_args(
    args: Sequence[str] | None = None, prog: str | None = None
) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """
    Parse command-line arguments (or one JSON file). The defaults of the `--recipe` named come first, so arguments
    given explicitly (or values in the JSON file) override them; its architecture (mapper, prefix length, ...) is
    filled in by `ModelArguments` for a new model only.
    """
    args = list(sys.argv[1:] if args is None else args)
    parser = ClipCapArgumentParser((ModelArguments, DataArguments, TrainingArguments), prog=prog)
    if len(args) == 1 and args[0].endswith(".json"):
        values = read_json(args[0])
        if not isinstance(values, dict) or not isinstance(values.get("recipe", ""), (str, type(None))):
            raise ValueError(
                f"{args[0]} must hold one JSON object of argument names and values (\"recipe\", if given, a string)."
            )
        parser.check_json_types(values, args[0])
        return parser.parse_dict({**_recipe_run_defaults(values.get("recipe")), **values})
    # Abbreviations are the main parser's (`--rec` is `--recipe` only when no other option starts so).
    recipe_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    recipe_parser.add_argument("--recipe", choices=sorted(RECIPES), default=None)
    recipe = recipe_parser.parse_known_args(parser.spelled_in_full(args))[0].recipe
    defaults = _recipe_run_defaults(recipe)
    default_args = [item for name, value in defaults.items() for item in (f"--{name}", str(value))]
    # Only the arguments given: transformers would also read a `<script>.args` file found beside `sys.argv[0]`.
    return parser.parse_args_into_dataclasses(args=default_args + args, look_for_args_file=False)


def setup_logging(training_args: TrainingArguments) -> None:
    """Log from the main process only (at `--log_level`), replicas at `--log_level_replica`, as the examples do."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stderr)],  # stdout is for results; warnings and progress go here
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logging.getLogger(__package__).setLevel(log_level)  # the loggers of every module here (run, trainer, ...)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    # transformers' records already have its handler; with CI=true it also passes them on to the root logger, whose
    # handler (above) would print every one of them a second time.
    transformers.utils.logging.disable_propagation()


def _check_context_length(
    config, data_args: DataArguments, data: TrainingData | None = None, generation: bool = False
) -> None:
    """
    Refuse, before training, captions (of `data`) or generated captions (`generation`) that with the prefix would
    not fit the language model's positions: a learned position table such as GPT-2's fails with an IndexError in the
    middle of the run.
    """
    context = getattr(config.text_config, "max_position_embeddings", None)
    if not isinstance(context, int):
        return
    prefix = config.prefix_length
    room = f"{context - prefix} or less" if context > prefix else "below 1: the prefix alone fills the context"
    longest = data.longest_caption if data is not None else 0
    streamed = data is not None and isinstance(data.train, datasets.IterableDataset)
    if streamed and prefix + data_args.max_caption_length > context:
        raise ValueError(
            f"--max_caption_length {data_args.max_caption_length} with the {prefix} prefix vectors allows "
            f"{prefix + data_args.max_caption_length} positions, but the language model has {context} "
            "(max_position_embeddings), and a streamed source's captions are not measured before training: a caption "
            f"that long would stop the run part-way. Set --max_caption_length to {room}."
        )
    if longest and prefix + longest > context:
        raise ValueError(
            f"The longest caption has {longest} tokens (EOS included, after --max_caption_length "
            f"{data_args.max_caption_length}); with the {prefix} prefix vectors that is {prefix + longest} "
            f"positions, but the language model has {context} (max_position_embeddings). Set --max_caption_length "
            f"to {room}."
        )
    # Not given: the model's own caption length, which `generate` fits to the positions (as `clipcap evaluate`).
    if generation and data_args.generation_max_new_tokens and prefix + data_args.generation_max_new_tokens > context:
        raise ValueError(
            f"--generation_max_new_tokens {data_args.generation_max_new_tokens} with the {prefix} prefix vectors "
            f"needs {prefix + data_args.generation_max_new_tokens} positions, but the language model has {context} "
            f"(max_position_embeddings). Set --generation_max_new_tokens to {room}."
        )


def _check_dataset_name_is_read(data_args: DataArguments, training: bool, evaluating: bool) -> None:
    """Refuse --dataset_name (or --dataset_config_name) where no split of the run reads it: the files given instead
    (`prepare.load_source`) would be trained or evaluated on, the name silently ignored."""
    trains_from_it = training and data_args.train_file is None and data_args.embeddings is None
    karpathy_file = data_args.dataset_format == "coco-karpathy" and data_args.train_file is not None
    evaluates_on_it = (
        evaluating
        and data_args.validation_file is None
        and not karpathy_file  # which holds the evaluation split too
        and data_args.validation_split is not None
    )
    if data_args.dataset_name is None:
        raise ValueError("--dataset_config_name configures a --dataset_name, and none is given: leave it out.")
    if not (trains_from_it or evaluates_on_it):
        raise ValueError(
            f"--dataset_name {data_args.dataset_name} is read by no split of this run: training reads --train_file "
            "or --embeddings when given, and evaluation reads the dataset only through --validation_split, without "
            "--validation_file. Leave it out, or evaluate on one of its splits: --do_eval --validation_split NAME."
        )


def last_complete_checkpoint(output_dir: str, remove_incomplete: bool = False) -> str | None:
    """
    The newest `checkpoint-N` folder of `output_dir` that a run finished writing: its trainer_state.json, which Trainer
    writes last, reads whole. Newer folders are passed over. With `remove_incomplete` (the main process alone, whose
    removals the other processes may see part-way) each is judged: one a run of this package stopped while writing
    (it holds its `RUN_ARGUMENTS_NAME`, written first, and no or a cut trainer_state.json) is removed, so that
    Trainer's checkpoint rotation does not take it for a checkpoint; any other (a link, another tool's) raises a
    ValueError naming it, and nothing that may be someone's work is deleted. A state file that cannot be read for
    another reason (permissions, a network filesystem's error) raises in every process.
    """
    steps = checkpoint_folders(output_dir)
    for step in sorted(steps, reverse=True):
        checkpoint = steps[step]
        try:
            read_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
            return checkpoint
        except (FileNotFoundError, ValueError) as error:  # none yet, or cut short: `json` raises a ValueError
            if not remove_incomplete:
                continue
            problem = f"its {TRAINER_STATE_NAME} is missing" if isinstance(error, FileNotFoundError) else str(error)
            if os.path.islink(checkpoint) or not os.path.isfile(os.path.join(checkpoint, RUN_ARGUMENTS_NAME)):
                raise ValueError(
                    f"{checkpoint} is not a checkpoint of a clipcap train run stopped while writing it ({problem}, "
                    f"and it {'is a link' if os.path.islink(checkpoint) else f'holds no {RUN_ARGUMENTS_NAME}'}); "
                    "move it out of --output_dir, or give another --output_dir."
                ) from error
        except OSError as error:
            raise ValueError(
                f"Cannot read {os.path.join(checkpoint, TRAINER_STATE_NAME)} ({error}), so whether {checkpoint} is a "
                "complete checkpoint is not known; make it readable, or move the folder out of --output_dir."
            ) from error
        logger.warning(f"Removing {checkpoint}, which a run stopped while writing it.")
        shutil.rmtree(checkpoint)
    return None


def _check_output_dir(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> None:
    """
    Refuse the --output_dir of a training run that would write its model, config and tokenizer files over others: one
    that is, or lies inside, a folder the run reads (its model, its pretrained parts, its data), and one that holds a
    saved model but no run to resume or rerun (transformers 4.x: unless --overwrite_output_dir). Other files are not
    in the way: a log stays, and an evaluation's results are written anew by the run's own.
    """
    read = [(f"--{name}", getattr(model_args, name)) for name in MODEL_PATH_ARGUMENTS]
    read += [(f"--{name}", getattr(data_args, name)) for name in ("embeddings", "dataset_name")]
    for name in ("train_file", "validation_file"):
        read += [(f"--{name}", part) for part in data_file_patterns(getattr(data_args, name) or ())]
    check_output_outside_inputs(
        training_args.output_dir, "--output_dir", read, "the run would write its model and checkpoints among the files "
        "it reads"
    )
    output_dir = training_args.output_dir
    if getattr(training_args, "overwrite_output_dir", False) or not os.path.isdir(output_dir):
        return
    entries = sorted(os.listdir(output_dir))
    saved = [name for name in entries if _is_saved_model_file(name)]
    if saved and not _holds_a_run(output_dir, entries):
        shown = ", ".join(saved[:5]) + (", ..." if len(saved) > 5 else "")
        overwrite = " (or add --overwrite_output_dir)" if hasattr(training_args, "overwrite_output_dir") else ""
        raise ValueError(
            f"--output_dir {output_dir} holds a saved model ({shown}) but no run to resume or rerun (no checkpoint-N, "
            f"{RUN_ARGUMENTS_NAME} or {TRAINER_STATE_NAME}): the run's model, config and tokenizer files would "
            f"overwrite it. Give --output_dir a new folder{overwrite}."
        )


def _is_saved_model_file(name: str) -> bool:
    """Whether a file named `name` is part of a saved model, processor or adapters (what a run's save writes)."""
    return name in ("config.json", "generation_config.json", "adapter_config.json") or name.endswith(
        (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
    ) or name.startswith(("tokenizer", "preprocessor_config", "processor_config"))


def _holds_a_run(output_dir: str, entries: Sequence[str]) -> bool:
    """Whether `output_dir`, holding `entries`, holds a run of this command: what one writes before its first step (a
    LoRA run's base_model, its record) or later (its checkpoints, and its trainer state once finished)."""
    written = (RUN_ARGUMENTS_NAME, TRAINER_STATE_NAME, BASE_MODEL_DIR)
    return any(name in written for name in entries) or bool(checkpoint_folders(output_dir))


def _check_report_to(training_args: TrainingArguments) -> None:
    """
    Refuse an integration of --report_to that is not installed: `Trainer` makes its callbacks, whose making checks the
    package, only when it is built, once the images are embedded. Each is made here as `Trainer` makes it.
    """
    report_to = training_args.report_to
    for name in [report_to] if isinstance(report_to, str) else report_to or []:
        for callback in get_reporting_integration_callbacks(name):
            try:
                callback()
            except (ImportError, RuntimeError) as error:  # RuntimeError: "WandbCallback requires wandb to be ..."
                raise ValueError(
                    f"--report_to {name}: {error} Or leave {name} out of --report_to (none: report nowhere)."
                ) from error


def _check_optimizer(training_args: TrainingArguments, model) -> None:
    """
    Resolve --optim (and --optim_args) as `Trainer` does at the first step, so that a missing package or a bad value
    is named before the images are embedded. Layerwise optimizers are left to `Trainer`: resolving one registers its
    hooks on the model's parameters, which a second resolution would register again.
    """
    optim = getattr(training_args.optim, "value", training_args.optim)
    optim_args = training_args.optim_args
    if optim_args:  # read by Trainer as `key=value` pairs: another item would fail with a bare unpacking error
        malformed = [item for item in optim_args.replace(" ", "").split(",") if item.count("=") != 1]
        if malformed:
            raise ValueError(
                f"--optim_args {optim_args}: {malformed[0]!r} is not a key=value pair; give comma-separated key=value "
                "pairs (e.g. --optim_args use_kahan_summation=True,momentum_dtype=bfloat16)."
            )
    if optim.endswith("_layerwise"):
        return
    try:
        ClipCapTrainer.get_optimizer_cls_and_kwargs(training_args, model)
    except (ImportError, ValueError) as error:
        given = f"--optim {optim}" + (f" --optim_args {optim_args}" if optim_args else "")
        raise ValueError(f"{given}: {error}") from error


def _holds_optimizer_state(checkpoint: str) -> bool:
    """Whether Trainer saved the optimizer's state in `checkpoint`: its `optimizer.pt` (FSDP: `optimizer*`), or
    DeepSpeed's `global_step*` folder."""
    return any(name.startswith(("optimizer", "global_step")) for name in os.listdir(checkpoint))


def _warn_of_the_checkpoints_left(output_dir: str) -> None:
    """--overwrite_output_dir starts a new run, but Trainer deletes nothing: say what that means for a later resume."""
    steps = checkpoint_folders(output_dir)
    if steps:
        names = ", ".join(os.path.basename(steps[step]) for step in sorted(steps))
        logger.warning(
            f"--overwrite_output_dir starts a new run, but the checkpoints in {output_dir} ({names}) stay: this run's "
            "checkpoints replace those of their steps only. A rerun without --overwrite_output_dir resumes from the "
            "newest checkpoint, and stops if it is the other run's: delete the other run's checkpoints to be able to "
            "resume this one."
        )


def finished_run_state(checkpoint: str | None, training_args: TrainingArguments) -> dict[str, Any] | None:
    """
    The trainer state of `checkpoint` if its run is over: its global step has reached the run's length (--max_steps,
    else the state's own, which the recorded --num_train_epochs set), else None. Trainer resuming from it mid-epoch
    would take one more step before it checks the length, so a rerun of a finished run trains nothing instead.
    """
    if not isinstance(checkpoint, str):
        return None
    try:
        state = read_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
    except (OSError, ValueError):
        return None  # Trainer (ClipCapTrainer) names a checkpoint that is missing or damaged
    max_steps = training_args.max_steps if training_args.max_steps > 0 else state.get("max_steps")
    if isinstance(max_steps, int) and max_steps > 0 and state.get("global_step", 0) >= max_steps:
        return state
    return None


def _warn_of_a_restarted_stream(checkpoint: str | None) -> None:
    """
    Warn when a streamed run resumes from a checkpoint saved after its stream ran out and started again (epoch 1 or
    more): Trainer resumes a stream by skipping as many batches of a fresh stream as the run has trained on, which
    past a restart are not the batches that would have come next, so the resume does not continue the run exactly.
    """
    try:
        epoch = read_json(os.path.join(checkpoint, TRAINER_STATE_NAME)).get("epoch") if checkpoint else None
    except (OSError, ValueError, AttributeError):
        return  # Trainer (ClipCapTrainer) names a checkpoint that is missing or damaged
    if isinstance(epoch, (int, float)) and epoch >= 1:
        logger.warning(
            f"Resuming a streamed run from {checkpoint}, saved after its stream ran out and started again (epoch "
            f"{epoch:.2f}): Trainer skips as many batches of a fresh stream as the run has trained on, which are not "
            "the batches the run would have read next, so the resume does not continue it exactly. Streamed runs "
            "resume exactly within their first pass over the data."
        )


def _final_model_saved(output_dir: str, global_step: int | None = None) -> bool:
    """Whether a run's end (at `global_step`, if given) was written in `output_dir`: `train` writes its
    trainer_state.json last."""
    try:
        state = read_json(os.path.join(output_dir, TRAINER_STATE_NAME))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and (global_step is None or state.get("global_step") == global_step)


def _final_weights(checkpoint: str, state: dict[str, Any], training_args: TrainingArguments) -> str:
    """
    Where the final model of a finished run is read from: with --load_best_model_at_end the best checkpoint its state
    names (looked up beside `checkpoint`, wherever the run folder is now), else `checkpoint`, its last.
    """
    best = state.get("best_model_checkpoint")
    if training_args.load_best_model_at_end and isinstance(best, str):
        best = os.path.join(os.path.dirname(os.path.normpath(checkpoint)), os.path.basename(os.path.normpath(best)))
        if os.path.isdir(best):
            return best
    return checkpoint


def run_arguments(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> dict[str, Any]:
    """
    The arguments that define a run, as JSON values, local paths absolute: every model and data argument but
    `ARGUMENTS_A_RESUME_MAY_CHANGE`, and the `RECORDED_TRAINING_ARGUMENTS`; under `DATA_IDENTITY_KEY` the
    [`data_identity`] of each of the `DATA_PATH_ARGUMENTS`, and under `MODEL_IDENTITY_KEY` the `model_identity` of
    each of the `MODEL_PATH_ARGUMENTS` (so that a resume refuses another model saved at the same path).
    """
    values = {
        field.name: getattr(args, field.name)
        for args in (model_args, data_args)
        for field in dataclasses.fields(args)
        if field.name not in ARGUMENTS_A_RESUME_MAY_CHANGE
    }
    values.update(
        {name: getattr(training_args, name) for name in RECORDED_TRAINING_ARGUMENTS if hasattr(training_args, name)}
    )
    # A streamed source is embedded from the pixels at each step whatever --use_embedding_cache says.
    values["use_embedding_cache"] = data_args.use_embedding_cache and not data_args.streaming
    # Not an argument, but it sets the batches: each process trains its own share of every step's batch.
    values[WORLD_SIZE_KEY] = training_args.world_size
    for name in PATH_ARGUMENTS:
        if values[name] is not None:
            values[name] = ",".join(_absolute_local_path(part) for part in str(values[name]).split(","))
    values[DATA_IDENTITY_KEY] = {
        name: data_identity(values[name], f"--{name}", skip=_own_folders(data_args, training_args))
        for name in DATA_PATH_ARGUMENTS
    }
    values[MODEL_IDENTITY_KEY] = {name: _model_identity(values[name]) for name in MODEL_PATH_ARGUMENTS}
    # Enums (optim, lr_scheduler_type) as their strings, tuples as lists: what the record reads back as.
    return json.loads(json.dumps(values, default=str))


# The subfolders a run writes in its embedding cache root: the caption rows of --embeddings, and an embeddings folder
# per vision tower and preprocessing (named by the first 16 hex digits of its fingerprint, `embedding_cache_folder`).
_CACHE_SUBFOLDER = re.compile(r"caption_rows|[0-9a-f]{16}")


def _own_folders(data_args: DataArguments, training_args: TrainingArguments) -> list[str]:
    """
    The folders the run writes, which may lie inside a data folder but are no part of its data: the output_dir, the
    embedding cache root, and the cache's own subfolders, for a root that is itself a data folder (an --embeddings
    folder given as its own --embedding_cache_dir).
    """
    own = [training_args.output_dir]
    root = data_args.embedding_cache_dir
    if root:
        root = os.path.expanduser(root)
        own.append(root)
        if os.path.isdir(root):
            own += [os.path.join(root, name) for name in os.listdir(root) if _CACHE_SUBFOLDER.fullmatch(name)]
    return own


def _absolute_local_path(part: str) -> str:
    """A local file, folder or glob pattern as an absolute path; a Hub name or URL as given."""
    part = part.strip()
    path = os.path.expanduser(part)
    if "://" in path or not (os.path.exists(path) or glob.glob(path)):
        return part
    return os.path.abspath(path)


# The record's entries (not arguments) for the content identities of the data arguments and of the model arguments.
DATA_IDENTITY_KEY = "data_identity"
MODEL_IDENTITY_KEY = "model_identity"
# The record's entry (not an argument) for the column the training captions were read from ([`check_caption_column`]).
CAPTION_COLUMN_KEY = "caption_column_read"


def _model_identity(name_or_path: str | None) -> str | dict[str, Any] | None:
    """
    The `model_identity` of a model argument, taken once `build_model` has loaded it (a Hub model's files are then in
    the cache); for a LoRA run's adapters, `{"adapters": ..., "base": ...}`, with the identity of the base they load
    into (a base retrained and saved over in place is another model; `same_model` compares them). None when unset, or
    neither a folder nor a Hub name (`build_model` then names it).
    """
    if name_or_path is None:
        return None
    try:
        identity = model_identity(name_or_path)
        path = local_folder(name_or_path)
        if _is_lora_output(path):  # as build_model found it, which has downloaded a Hub name's adapters
            identity = {"adapters": identity, "base": model_identity(lora_base_model(path))}
        return identity
    except ValueError:  # huggingface_hub's HFValidationError: a missing local path, which is no Hub name either
        return None


# In a folder, the files that may hold captions are hashed so; the others (images, shards, arrays) are identified by
# their name and size only, so that a folder of a million images is listed, not read.
_HASHED_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt", ".parquet")
# Files of a data folder that change when its data does not, left out: hidden ones (locks, caches), the cache and
# temporary files `datasets` writes beside a saved dataset's own, its state (a fingerprint, random for some datasets
# saved again) and an embeddings folder's info (the counts of its last pass; its tower is checked on its own).
_NOT_DATA = re.compile(r"\.|cache-.*\.arrow$|tmp[a-z0-9_]{8}$|state\.json$|" + re.escape(EMBEDDINGS_INFO_NAME) + "$")


def data_identity(
    value: str | None, description: str = "data", skip: Sequence[str | os.PathLike] = ()
) -> dict[str, Any] | None:
    """
    A cheap identity of the content of a data argument's local files (comma-separated files, folders or glob
    patterns): how many files, their bytes, and a SHA-256 of their names (relative to what the argument names), sizes
    and contents (a file named by the argument, or one that may hold captions in a folder, see `_HASHED_SUFFIXES`),
    by [`sampled_sha256`]: a file up to 1 MiB whole, a larger one by its first and last 64 KiB, so that a thousand
    shards cost a few hundred MB read at most. Content, not modification times: a copy of the data (cp, rsync without
    -t) is the same data. None when it names no local file: a Hub dataset or a URL is recorded by its name alone.
    The folders in `skip` (a run's own output and cache folders, which may lie inside a data folder) are left out.
    """
    if value is None:
        return None
    skip = {os.path.realpath(os.path.expanduser(folder)) for folder in skip}
    digest, files, total, local = hashlib.sha256(), 0, 0, False
    with tqdm(desc=f"Identifying the data of {description}", unit=" files", delay=2, leave=False) as progress:
        for position, pattern in enumerate(data_file_patterns(value)):
            matches = [pattern] if os.path.exists(pattern) else sorted(glob.glob(pattern, recursive=True))
            local = local or bool(matches)
            base = _names_base(pattern)
            for match in matches:
                for path, name, hashed in _data_files(match, base, skip):
                    try:
                        size = os.path.getsize(path)
                        content = sampled_sha256(path) if hashed else ""
                    except OSError:  # a broken link, an unreadable file: the loader names it (or skips it)
                        size, content = 0, "unreadable"
                    digest.update(f"{position}|{name}|{size}|{content}\n".encode())
                    files, total = files + 1, total + size
                    progress.update()
    return {"files": files, "bytes": total, "sha256": digest.hexdigest()} if local else None


def _names_base(pattern: str) -> str:
    """
    The folder a data argument's files are named relative to: a glob pattern's part before its first wildcard, or a
    path's own folder.
    """
    return glob_folder(pattern) or os.path.dirname(os.path.normpath(pattern)) or "."


def _data_files(path: str, base: str, skip: set[str] = frozenset()) -> Iterator[tuple[str, str, bool]]:
    """
    The files of a data path (a file: itself; a folder: its data files, in order, but for the subfolders in `skip`,
    as real paths), each with its name relative to `base` and whether its content is hashed.
    """
    if not os.path.isdir(path):
        yield path, os.path.relpath(path, base), True
        return
    for folder, subfolders, names in os.walk(path):
        subfolders[:] = sorted(
            name
            for name in subfolders
            if not name.startswith(".") and os.path.realpath(os.path.join(folder, name)) not in skip
        )
        relative = os.path.relpath(folder, base)  # once per folder: a folder may hold a million images
        for name in sorted(names):
            if not _NOT_DATA.match(name):
                yield os.path.join(folder, name), os.path.join(relative, name), name.endswith(_HASHED_SUFFIXES)


def check_run_arguments(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    last_checkpoint: str | None,
) -> dict[str, Any]:
    """
    Refuse to resume from a checkpoint (--resume_from_checkpoint, else `last_checkpoint`, the last one in output_dir)
    with arguments that differ from those recorded by the run that saved it, naming each changed one. Each checkpoint
    holds the record of its own run (`ClipCapTrainer(run_arguments=...)`), so a folder holding checkpoints of two runs
    (one started with --overwrite_output_dir leaves the other's in place) is checked against the right one; a
    checkpoint saved before checkpoints held it is checked against the record in its folder, and one written before
    runs were recorded resumes unchecked, with a warning. The training data and the pretrained models are checked by
    their content identity ([`data_identity`], `model_identity`) as well as their paths; a record without identities
    (an earlier version) checks the paths only, with a warning, and so does one naming a Hub model by its name or
    commit. Called once `build_model` has loaded the models, whose files the identities hash. Returns this run's
    arguments, which [`check_caption_column`] completes once the source is loaded and [`record_run_arguments`] writes
    once the run starts training.
    """
    arguments = run_arguments(model_args, data_args, training_args)
    checkpoint = training_args.resume_from_checkpoint or last_checkpoint
    if isinstance(checkpoint, str) and os.path.isdir(checkpoint):  # a checkpoint that is not there: Trainer names it
        record = _run_record(checkpoint)
        if record is not None:
            _check_resumed_arguments(checkpoint, record, arguments, training_args)
        else:
            logger.warning(
                f"Resuming from {checkpoint} without checking that this run's arguments are those it was trained "
                f"with: neither it nor {os.path.dirname(os.path.normpath(checkpoint))} holds {RUN_ARGUMENTS_NAME} (an "
                "older clipcap_hf wrote the checkpoint)."
            )
    return arguments


def _run_record(checkpoint: str | None) -> str | None:
    """The record of the run that saved a checkpoint: the checkpoint's own, else its folder's; None if neither."""
    if not (isinstance(checkpoint, str) and os.path.isdir(checkpoint)):
        return None
    folder = os.path.dirname(os.path.normpath(checkpoint))
    records = [os.path.join(checkpoint, RUN_ARGUMENTS_NAME), os.path.join(folder, RUN_ARGUMENTS_NAME)]
    return next((path for path in records if os.path.exists(path)), None)


def check_caption_column(
    data_args: DataArguments,
    training_args: TrainingArguments,
    last_checkpoint: str | None,
    arguments: dict[str, Any],
    caption_column: str | None,
) -> None:
    """
    Record in a run's `arguments` (those [`check_run_arguments`] returned) the column its training captions are read
    from, known once the source is loaded (`TrainingData.train_caption_column`), and refuse to resume from a
    checkpoint whose run read them from another. Without --caption_column the column is the first of the source's
    usual ones it has (`DEFAULT_CAPTION_COLUMNS`), so the same arguments may read other captions than an earlier
    version chose. A record without the column (an earlier version) resumes with a warning when it was so chosen.
    """
    arguments[CAPTION_COLUMN_KEY] = caption_column
    checkpoint = training_args.resume_from_checkpoint or last_checkpoint
    record = _run_record(checkpoint)
    if record is None:
        return
    recorded = read_json(record)  # one JSON object: check_run_arguments refused anything else
    if CAPTION_COLUMN_KEY not in recorded:
        if data_args.caption_column is None and data_args.dataset_format is None and caption_column is not None:
            logger.warning(
                f"Resuming from {checkpoint} without checking that it trains on the captions its run read: {record} "
                f"does not record their column (an older clipcap_hf wrote it), which this run chose as "
                f"{caption_column!r}, the first of {', '.join(DEFAULT_CAPTION_COLUMNS)} the source has; give "
                "--caption_column to read another."
            )
        return
    if recorded[CAPTION_COLUMN_KEY] != caption_column:
        then = recorded[CAPTION_COLUMN_KEY]
        rerun = f"Rerun with --caption_column {then} to resume it" if isinstance(then, str) else "It cannot be resumed"
        raise ValueError(
            f"Cannot resume from {checkpoint}: its run read its training captions from the column {_shown(then)} "
            f"(recorded in {record}), this run from {_shown(caption_column)}. {rerun}, or start a new run "
            f"{_start_again(checkpoint, training_args)}."
        )


def record_run_arguments(training_args: TrainingArguments, arguments: dict[str, Any]) -> None:
    """Write a run's arguments in its output_dir (main process); its checkpoints get them as they are saved."""
    if training_args.should_save:
        write_run_arguments(training_args.output_dir, arguments)


def _check_resumed_arguments(
    checkpoint: str, record: str, arguments: dict[str, Any], training_args: TrainingArguments
) -> None:
    recorded = read_json(record)
    if not isinstance(recorded, dict):
        raise ValueError(
            f"{record} must hold one JSON object of argument names and values; delete it to resume from {checkpoint} "
            "without checking the arguments."
        )
    changed = [
        f"--{name} {_shown(recorded[name])} (now {_shown(value)}{_WHY_RECORDED.get(name, '')})"
        for name, value in arguments.items()
        # A name only one side has: another version's argument.
        if name not in (*_IDENTITIES, WORLD_SIZE_KEY) and name in recorded and recorded[name] != value
    ]
    processes = recorded.get(WORLD_SIZE_KEY)
    if processes is not None and processes != arguments[WORLD_SIZE_KEY]:
        # Warned of, not refused: a run moved to other hardware (a preempted job restarted on fewer GPUs) may go on.
        logger.warning(
            f"Resuming from {checkpoint}, trained by {processes} process(es), with {arguments[WORLD_SIZE_KEY]}: each "
            "process trains its own share of every step's batch, so the batches (and their size, "
            "per_device_train_batch_size x processes x gradient_accumulation_steps) differ from the run's, and the "
            "resume does not continue it exactly."
        )
    changed_content, unchecked, unchecked_models, unchecked_bases, hub_models = {}, [], [], [], []
    for key, (kind, unchecked_kind, held, described) in _IDENTITIES.items():
        identities = recorded.get(key)
        if not isinstance(identities, dict):
            unchecked += [unchecked_kind] if any(arguments[key].values()) else []
            continue
        differing = [
            name
            for name, identity in arguments[key].items()
            # Another path is named above.
            if name in identities and recorded.get(name) == arguments[name] and identities[name] != identity
        ]
        if key == MODEL_IDENTITY_KEY:
            now = arguments[key]
            verdicts = {name: same_model(identities[name], now[name]) for name in differing}
            # A record of an earlier version names a Hub model by its name (and cached commit), not by its files, or
            # LoRA adapters without their base; a model not loaded from files is known by its name alone: none tells
            # whether the files changed.
            for name in (name for name, same in verdicts.items() if same is None):
                adapters_alone = is_adapters_identity(now[name])
                (unchecked_bases if adapters_alone else unchecked_models).append(f"--{name} {arguments[name]}")
            differing = [name for name, same in verdicts.items() if same is False]
            hub_models += [name for name in differing if _changed_on_hub(identities[name], now[name])]
        changed_content[kind] = [
            f"--{name} {arguments[name]} holds {held} (then {described(identities[name])}; now "
            f"{described(arguments[key][name])})"
            for name in differing
        ]
    changes = {"arguments": changed, **changed_content}
    if not any(changes.values()):
        if unchecked:
            logger.warning(
                f"Resuming from {checkpoint} without checking that its {' and '.join(unchecked)} are unchanged: "
                f"{record} records their paths only (an older clipcap_hf wrote it)."
            )
        if unchecked_models:
            logger.warning(
                f"Resuming from {checkpoint} without checking that {', '.join(unchecked_models)} hold the models it "
                f"was trained with: {record} names them by their Hub name (and commit), not by their files (an older "
                "clipcap_hf wrote it)."
            )
        if unchecked_bases:
            logger.warning(
                f"Resuming from {checkpoint} without checking the base model of {', '.join(unchecked_bases)} (the "
                f"LoRA adapters are unchanged): {record} records the adapters alone (an older clipcap_hf wrote it)."
            )
        return
    what = " and ".join(kind for kind, kind_changes in changes.items() if kind_changes)
    start_again = _start_again(checkpoint, training_args)
    if hub_models:  # the Hub holds only a model's newest files under its name: the run's cannot be given again
        advice = (
            f"{', '.join(f'--{name}' for name in hub_models)} changed on the Hub since that run (its files, or its "
            f"base model's), which cannot be resumed with the newer model: start a new run {start_again}."
        )
    else:
        advice = f"Rerun with that run's {what} to resume it, or start a new run {start_again}."
    raise ValueError(
        f"Cannot resume from {checkpoint}: its run was trained with other {what} (recorded in {record}): "
        f"{'; '.join(change for kind_changes in changes.values() for change in kind_changes)}. {advice}"
    )


def _start_again(checkpoint: str, training_args: TrainingArguments) -> str:
    """How to start a new run instead of resuming from a checkpoint that a refused resume names."""
    if training_args.resume_from_checkpoint is not None:
        return (
            f"from its weights with --model_name_or_path {checkpoint} in place of --resume_from_checkpoint (and a "
            "new --output_dir)"
        )
    if os.path.normpath(checkpoint) == os.path.normpath(training_args.output_dir):  # a run without checkpoints
        return "with another --output_dir"
    # Not --overwrite_output_dir (transformers 4): it leaves that run's checkpoints in place for a rerun to meet.
    folder = os.path.dirname(os.path.normpath(checkpoint))
    return f"with another --output_dir (or in {folder} once that run's checkpoints are deleted)"


# The record's entry for the number of training processes.
WORLD_SIZE_KEY = "world_size"
# Why a resume may not change an argument that may seem to change the speed alone.
_WHY_RECORDED = {
    "use_embedding_cache": "; embeddings computed from the pixels at each step round differently from the cached "
    "ones, which changes the weights",
}


def _described(identity: dict[str, Any] | None) -> str:
    """A data identity as the error shows it."""
    if identity is None:
        return "no local file"
    return f"{identity['files']} file(s), {identity['bytes']} bytes, sha256 {identity['sha256'][:12]}"


def _changed_on_hub(recorded: Any, now: Any) -> bool:
    """Whether a model identity that `same_model` finds changed is a Hub snapshot's whose files changed (for adapters,
    their own or their base's): the Hub serves the newest files, so the run's cannot be put back at that name."""
    if is_adapters_identity(now):
        if not is_adapters_identity(recorded):  # recorded as the adapters alone
            return _changed_on_hub(recorded, now["adapters"])
        return any(
            same_model(recorded[part], now[part]) is False and _changed_on_hub(recorded[part], now[part])
            for part in ("adapters", "base")
        )
    return is_hub_identity(now)


def _described_model(identity: Any) -> str:
    """A model identity as the error shows it: a folder's hash (shortened), a Hub name (with its commit), a Hub
    snapshot's file hashes (shortened), or LoRA adapters' with their base's."""
    if identity is None:
        return "no model"
    if is_adapters_identity(identity):
        return f"adapters {_described_model(identity['adapters'])} on base {_described_model(identity['base'])}"
    if isinstance(identity, dict):
        files = ", ".join(f"{name} {digest[:12]}" for name, digest in identity["files"].items())
        return f"{identity['hub']} files {files}"
    return identity[: len("sha256:") + 12] if identity.startswith("sha256:") else identity


# The record's identities: each kind's name in the error and in the warning of a record without them, what a changed
# one holds, and how one is shown.
_IDENTITIES = {
    DATA_IDENTITY_KEY: ("data", "training data", "other data", _described),
    MODEL_IDENTITY_KEY: ("models", "models", "another model", _described_model),
}


def _shown(value: Any) -> str:
    """An argument's value as the command line spells it (None: unset)."""
    if value is None:
        return "unset"
    return value if isinstance(value, str) else json.dumps(value)


# The lock file a run's main process holds in --output_dir while the run lasts (see `_output_dir_lock`); named `_*`,
# which Trainer leaves out of what it pushes to the Hub (`--push_to_hub`).
RUN_LOCK_NAME = "_clipcap-train.lock"


@contextlib.contextmanager
def _output_dir_lock(training_args: TrainingArguments) -> Iterator[None]:
    """
    Hold --output_dir for this run while the body runs, or refuse the run if another holds it: two runs in one folder
    would save the same checkpoints over each other, remove the checkpoint the other is writing (taken for one left
    incomplete by a stopped run) and replace each other's run record and results. An evaluation-only run is held out
    too: it writes the results and the captions (`predictions/eval_step{N}.json`) of a training run's evaluation.

    The main process alone takes the lock (a `filelock` file, `RUN_LOCK_NAME`: the OS's `flock` on Unix, released
    however the process ends, so a killed run's file holds nothing up), for all the processes of its run, and tells
    them whether to go on: they refuse with it. The file stays in the folder, as the captioning and embedding runs'
    lock files do (removing one could race with a process opening it), except from a folder the run created and
    wrote nothing else in (a run refused on its way), which is removed with it.
    """
    from accelerate.utils import broadcast_object_list
    from filelock import Timeout  # a dependency of huggingface_hub, so always installed

    folder = Path(training_args.output_dir).absolute()
    lock, created, refusal = None, [], None
    if training_args.process_index == 0:
        created = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = acquire_file_lock(folder / RUN_LOCK_NAME, "--output_dir", timeout=0)
        except Timeout:
            refusal = ValueError(
                f"--output_dir {training_args.output_dir} is being written by another run (its main process holds "
                f"{RUN_LOCK_NAME}): two runs would save their checkpoints, run record and results over each other. "
                "Let that run finish, or stop it (rerun, it resumes from its last checkpoint), or give another "
                "--output_dir."
            )
        except OSError as error:  # a filesystem without file locks (named), or a folder that cannot be written
            refusal = error
    if training_args.world_size > 1:
        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise refusal
    try:
        yield
    finally:
        if lock is not None:
            with contextlib.suppress(OSError):  # removed meanwhile, or not empty: another run wrote there since
                if created and os.listdir(folder) == [RUN_LOCK_NAME]:
                    # Unlinked while held: a run that opened it meanwhile finds it unlinked once it locks it, and
                    # opens the path again (filelock 4 checks).
                    os.remove(folder / RUN_LOCK_NAME)
                    for path in created:
                        path.rmdir()
            lock.release()


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> dict[str, float]:
    """Run training and/or evaluation as the arguments say; returns the final metrics."""
    if training_args.do_predict:
        raise ValueError("--do_predict is not supported; caption and score a test set with `clipcap evaluate`.")
    if training_args.include_for_metrics:
        # Trainer would gather them for a `compute_metrics` this command does not have (and look for pixel_values
        # in batches of cached embeddings); the caption metrics come from `--eval_caption_metrics`.
        raise ValueError(
            "--include_for_metrics is not supported: this command has no compute_metrics to pass them to. "
            "Choose caption metrics with --eval_caption_metrics."
        )
    if training_args.label_smoothing_factor:
        # Trainer's smoothing takes the labels from the model and smooths its logits, which cover the prefix
        # positions as well as the caption: the shapes disagree, and the prefix has no targets.
        raise ValueError(
            f"--label_smoothing_factor {training_args.label_smoothing_factor} is not supported: ClipCap's loss covers "
            "the caption tokens only, which Trainer's label smoothing does not know. Leave the option out."
        )
    if training_args.include_num_input_tokens_seen not in ("no", False):
        # Trainer counts the model's main input, the image (absent from batches of cached embeddings), not tokens.
        raise ValueError(
            "--include_num_input_tokens_seen is not supported: Trainer would count the images' pixels (or nothing, "
            "with cached embeddings), not caption tokens. Leave the option out."
        )
    eval_given = data_args.validation_file or data_args.validation_split or data_args.dataset_format == "coco-karpathy"
    if training_args.eval_strategy != "no" and not eval_given:
        # TrainingArguments turns --do_eval on for it: the data loader's error would name that instead.
        strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
        raise ValueError(
            f"--eval_strategy {strategy} evaluates during training, but this run has no evaluation source: add "
            "--validation_file (or a coco-karpathy --train_file), or --dataset_name with --validation_split, or "
            "leave out --eval_strategy."
        )
    # Evaluation (at the end, or during training) captions the evaluation images.
    evaluating = training_args.do_eval or training_args.eval_strategy != "no"
    if not (training_args.do_train or evaluating):
        raise ValueError("This run would do nothing: add --do_train (to train), --do_eval (to evaluate), or both.")
    evaluation_options = {
        "--validation_file": data_args.validation_file,
        "--validation_split": data_args.validation_split,
        "--validation_format": data_args.validation_format,
        "--validation_image_root": data_args.validation_image_root,
        "--max_eval_samples": data_args.max_eval_samples,
        "--eval_caption_metrics": data_args.eval_caption_metrics,
        "--generation_num_beams": data_args.generation_num_beams,
        "--generation_max_new_tokens": data_args.generation_max_new_tokens,
    }
    unused = [option for option, value in evaluation_options.items() if value is not None]
    if unused and not evaluating:
        raise ValueError(
            f"{', '.join(unused)} set the evaluation data or how its images are captioned and scored, but this run "
            "evaluates nothing: add --do_eval (with --validation_file or --validation_split), or leave them out."
        )
    if data_args.dataset_config_name is not None or data_args.dataset_name is not None:
        _check_dataset_name_is_read(data_args, training_args.do_train, evaluating)
    # Before anything is loaded or embedded: each of these would otherwise stop the run only once the images are.
    check_output_folder(training_args.output_dir, "--output_dir", "write the run's model, checkpoints and results in")
    if training_args.do_train:
        _check_output_dir(model_args, data_args, training_args)
        if training_args.resume_from_checkpoint is not None:
            check_is_a_checkpoint(training_args.resume_from_checkpoint)
    _check_report_to(training_args)
    setup_logging(training_args)
    logger.warning(
        f"Process rank: {training_args.process_index}, device: {training_args.device}, "
        f"world size: {training_args.world_size}, bf16: {training_args.bf16}, fp16: {training_args.fp16}"
    )
    # Before the folder's checkpoints are looked at (an incomplete one is removed) and anything is loaded.
    with _output_dir_lock(training_args):
        return _run(model_args, data_args, training_args, evaluating)


def _run(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments, evaluating: bool
) -> dict[str, float]:
    """[`train`] once its arguments are checked and it holds --output_dir: resume or start, load, train, evaluate."""
    last_checkpoint = None
    # transformers 4 has --overwrite_output_dir, which means: start afresh rather than resume.
    overwrite = getattr(training_args, "overwrite_output_dir", False)
    if overwrite and training_args.do_train and os.path.isdir(training_args.output_dir):
        _warn_of_the_checkpoints_left(training_args.output_dir)
    resuming = training_args.do_train and training_args.resume_from_checkpoint is None and not overwrite
    if resuming and os.path.isdir(training_args.output_dir):
        remove_incomplete = training_args.should_save  # the main process
        last_checkpoint = last_complete_checkpoint(training_args.output_dir, remove_incomplete=remove_incomplete)
        if last_checkpoint is not None:
            logger.info(f"Resuming from {last_checkpoint}; use another --output_dir to start afresh.")
        elif _final_model_saved(training_args.output_dir):
            # A finished run that kept no checkpoint (--save_strategy no, or deleted since): its final model and state
            # stand for its last checkpoint, so that its rerun is checked and trains nothing, as one with checkpoints.
            last_checkpoint = training_args.output_dir
    set_seed(training_args.seed)

    model, processor = build_model(model_args)
    arguments = None
    finished = None  # the state of the checkpoint that ends the run, when a rerun finds the run over
    if training_args.do_train:
        # Once the models are loaded: a Hub model is identified by the files downloaded for it.
        arguments = check_run_arguments(model_args, data_args, training_args, last_checkpoint)
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        finished = finished_run_state(checkpoint, training_args)
        if finished is not None:
            logger.warning(
                f"The run is complete: {checkpoint} holds its last step ({finished['global_step']}), so nothing is "
                "trained and its final model stays as it is. To train it longer, start a new run from the final "
                f"model: --model_name_or_path {training_args.output_dir} with another --output_dir (a resume with "
                "another --max_steps or --num_train_epochs is refused: they set the learning-rate schedule)."
            )
    training = training_args.do_train and finished is None
    if training and last_checkpoint == training_args.output_dir:  # a run without checkpoints, which these would extend
        raise ValueError(
            f"{training_args.output_dir} holds the final model of a finished run that kept no checkpoint, and these "
            "arguments would train it further, which cannot resume its schedule. To train it longer, start a new run "
            f"from it: --model_name_or_path {training_args.output_dir} with another --output_dir."
        )
    if training and data_args.streaming:
        _warn_of_a_restarted_stream(training_args.resume_from_checkpoint or last_checkpoint)
    if training and last_checkpoint is not None and not _holds_optimizer_state(last_checkpoint):
        # Trainer would resume from it with a new optimizer and warm-up, saying so at the info level only.
        raise ValueError(
            f"{last_checkpoint} holds the model without the optimizer's state (it was saved with --save_only_model), "
            "so resuming from it would restart the optimizer and the learning-rate warm-up rather than continue the "
            f"run. Resume from it anyway with --resume_from_checkpoint {last_checkpoint}, or start afresh with "
            "another --output_dir."
        )
    # Before the data are loaded (and base_model saved): the LoRA options checked against the model, or against its
    # own adapters when it has them.
    if model_args.use_lora and not is_peft_model(model):
        check_lora_target_modules(model, model_args)
    elif model_args.use_lora:
        check_continued_lora_options(model, model_args)
    if training and data_args.streaming and training_args.max_steps <= 0:
        raise ValueError("--streaming needs --max_steps: a streamed source has no length to count epochs by.")
    if training:
        _check_optimizer(training_args, model)
    _check_context_length(model.config, data_args, generation=evaluating)
    # One call: the sources, their images embedded once across the processes, one row per caption, the lengths.
    if training or evaluating:
        data = load_training_data(data_args, model, processor, train=training, evaluate=evaluating)
    else:  # the rerun of a finished run, which evaluates nothing
        data = TrainingData(train=None, eval=None, eval_images=None, image_embeds=None)
    _check_context_length(model.config, data_args, data)
    if training:
        check_caption_column(data_args, training_args, last_checkpoint, arguments, data.train_caption_column)
    metrics: dict[str, float] = {}
    if training:
        metrics["train_truncated_captions"] = data.train_truncated_captions

    if model_args.freeze_language_model:
        model.freeze_language_model()
    if model_args.use_lora and is_peft_model(model):
        logger.info(
            f"Training the adapters of {model_args.model_name_or_path} further (their own rank and target modules; "
            "the --lora_* options apply to new adapters)."
        )
    elif model_args.use_lora:
        if model.name_or_path in ("", None) or not os.path.isdir(model.name_or_path):
            # The adapters need a base model to load into later: save the freshly assembled one once.
            base_dir = os.path.join(training_args.output_dir, BASE_MODEL_DIR)
            if training_args.should_save:
                save_pretrained(base_dir, model, processor)
            model.name_or_path = base_dir
        # adapter_config.json records this path; a relative one would not resolve from another working directory.
        # (load_lora_model finds the base_model folder inside the run's folder wherever that is moved.)
        model.name_or_path = os.path.abspath(model.name_or_path)
        stale_base = os.path.join(training_args.output_dir, BASE_MODEL_DIR)
        if os.path.isdir(stale_base) and os.path.realpath(stale_base) != os.path.realpath(model.name_or_path):
            logger.warning(
                f"{stale_base} is left by an earlier run: these adapters' base is {model.name_or_path} (recorded in "
                "adapter_config.json), not that folder; remove it to avoid mistaking one for the other."
            )
        model = add_lora(model, model_args)

    collator = ClipCapDataCollator(
        processor, image_embeds=data.image_embeds, max_caption_length=data_args.max_caption_length
    )
    trainer = ClipCapTrainer(
        model=model,
        args=training_args,
        train_dataset=_named_stream(data.train, training_args),
        eval_dataset=data.eval,
        data_collator=collator,
        # Saved with every checkpoint, so a checkpoint folder captions on its own; also decodes evaluation captions.
        processing_class=processor,
        caption_eval_dataset=data.eval_images,
        caption_eval_embeds=data.image_embeds,
        generation_kwargs={
            "num_beams": data_args.generation_num_beams or 1,  # None: not given, greedy
            # None: not given, the model's own caption length (as `clipcap evaluate`)
            **({"max_new_tokens": data_args.generation_max_new_tokens} if data_args.generation_max_new_tokens else {}),
        },
        caption_metrics=data_args.caption_metrics,
        run_arguments=arguments,  # recorded in each checkpoint, for a resume from it to check
    )

    if finished is not None:
        final_saved = _final_model_saved(training_args.output_dir, finished["global_step"])
        if training_args.do_eval or not final_saved:
            # The final weights, which a checkpoint holds (loaded as Trainer resumes, damaged files named), and the
            # last checkpoint's state (the step evaluation results are named by).
            trainer._load_from_checkpoint(_final_weights(checkpoint, finished, training_args))
            _align_special_tokens(trainer)
            trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        if not final_saved:  # stopped after its last checkpoint, before its final model was written
            logger.warning(f"Writing the final model of the run, from {checkpoint}, in {training_args.output_dir}.")
            _save_final_model(trainer, processor, model_args, training_args)
            trainer.save_state()
        elif not os.path.isdir(_merged_model_dir(training_args)):  # --save_merged_model added to the rerun
            _save_merged_model(trainer, model_args, training_args)
    if training:
        resumed_from = training_args.resume_from_checkpoint or last_checkpoint
        # Written once the run has started, so that a run refused before training leaves no output_dir behind. A
        # resume writes it only into a folder without one (an older clipcap_hf's, resumed unchecked), and takes it
        # back if Trainer then refuses the checkpoint (its optimizer's state does not fit): a rerun with the arguments
        # of the run that saved it would otherwise be compared with those of the refused one.
        record = os.path.join(training_args.output_dir, RUN_ARGUMENTS_NAME)
        first_record = resumed_from is not None and not os.path.exists(record)
        if resumed_from is None or first_record:
            record_run_arguments(training_args, arguments)
        saved_before = checkpoint_folders(training_args.output_dir)
        try:
            result = trainer.train(resume_from_checkpoint=resumed_from)
        except BaseException:
            # Refused or stopped before saving a checkpoint of its own (each holds its run's record).
            saved_none = checkpoint_folders(training_args.output_dir) == saved_before
            if first_record and training_args.should_save and saved_none:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(record)
            raise
        _save_final_model(trainer, processor, model_args, training_args)
        metrics.update(result.metrics)
        if isinstance(data.train, datasets.Dataset):
            metrics["train_samples"] = len(data.train)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = len(data.eval)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    return metrics


def _named_stream(rows: datasets.Dataset | datasets.IterableDataset | None, training_args: TrainingArguments):
    """
    The training rows as the Trainer gets them: a stream (`--streaming`) read through [`_NamedStream`] where one
    process reads it for the run (one process, or accelerate's default of dispatching a stream's batches from the
    main process); as it is where each process reads its own files (`dispatch_batches: false`), which accelerate
    gives each process by sharding a `datasets` stream, and would not for a wrapped one.
    """
    dispatched = getattr(training_args.accelerator_config, "dispatch_batches", None) is not False
    if isinstance(rows, datasets.IterableDataset) and (training_args.world_size == 1 or dispatched):
        return _NamedStream(rows)
    return rows


class _NamedStream(torch.utils.data.IterableDataset):
    """
    A streamed training source (`--streaming`) as the Trainer's data loader reads it, through [`read_stream`]: a data
    file that stops reading midway (a malformed JSON line, a damaged Parquet or tar file) is named, as for the other
    readers of a stream, not met as pyarrow's bare error. Each pass goes through the source's own `__iter__`, which
    shares its files between data loader workers; its epoch and its state (for `use_stateful_dataloader`) are the
    source's.
    """

    def __init__(self, rows: datasets.IterableDataset) -> None:
        self.rows = rows

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return read_stream(self.rows, self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Forwarded (the Trainer sets each epoch through the data loader): a shuffled source reshuffles by it."""
        self.rows.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.rows.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.load_state_dict(state)


def _align_special_tokens(trainer: ClipCapTrainer) -> None:
    """
    Give the model's config the tokenizer's special token ids, as `Trainer.train` does before training, so that a
    finished run's model, loaded without training, evaluates and saves as the trained one did.
    """
    align = getattr(transformers.trainer_utils, "align_special_tokens", None)  # transformers 5; 4.x: a method
    if align is not None:
        align(trainer.model, trainer.processing_class)
    else:
        trainer._align_special_tokens()


def _save_final_model(
    trainer: ClipCapTrainer, processor: ClipCapProcessor, model_args: ModelArguments, training_args: TrainingArguments
) -> None:
    """Save the trained model and its processor in output_dir, and with --save_merged_model the LoRA merge beside."""
    trainer.save_model()
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
    _save_merged_model(trainer, model_args, training_args)


def _merged_model_dir(training_args: TrainingArguments) -> str:
    return os.path.join(training_args.output_dir, "merged")


def _save_merged_model(trainer: ClipCapTrainer, model_args: ModelArguments, training_args: TrainingArguments) -> None:
    """With --save_merged_model, merge the LoRA adapters saved in output_dir into output_dir/merged (main process)."""
    if model_args.use_lora and model_args.save_merged_model and trainer.is_world_process_zero():
        logger.info(f"Writing the adapters merged into their base model in {_merged_model_dir(training_args)}.")
        # The run's own folder: an earlier merge there (a run started afresh over it) is replaced.
        merge_lora(training_args.output_dir, _merged_model_dir(training_args), overwrite=True)


def main(args: Sequence[str] | None = None, prog: str | None = None) -> dict[str, float]:
    """
    Entry point of `clipcap train` and `examples/run_clipcap.py`: [`train`], then, in a distributed run, the end of the
    process group (call `train` to keep it).
    """
    metrics = train(*parse_args(args, prog=prog))
    # Under torchrun, a rank that exits with its process group still alive while another rank is still working can
    # abort in native code ("terminate called without an active exception"); tearing the group down first cannot.
    PartialState().destroy_process_group()
    return metrics
