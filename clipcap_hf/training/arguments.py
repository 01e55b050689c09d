"""The arguments of a training run (`ModelArguments`, `DataArguments`) and the recipes that set their defaults."""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from transformers import HfArgumentParser

from ..data.loaders import DATASET_FORMATS
from ..evaluation.metrics import check_metric_names, require_pycocoevalcap
from ..modeling_clipcap import DEFAULT_MAX_NEW_TOKENS
from ..utils.bad_images import check_bad_image_policy

# The paper's optimisation: AdamW at 2e-5 with 5000 linear warm-up steps, batch 40, 10 epochs, no gradient clipping.
PAPER_SCHEDULE = {
    "learning_rate": 2e-5,
    "warmup_steps": 5000,
    "per_device_train_batch_size": 40,
    "num_train_epochs": 10,
    "max_grad_norm": 0.0,
}
# The defaults each recipe puts before the user's own arguments, so that anything given explicitly wins.
RECIPES: dict[str, dict[str, Any]] = {
    "mlp_finetune": {"mapping_type": "mlp", "prefix_length": 10, **PAPER_SCHEDULE},
    "transformer_frozen": {
        "mapping_type": "transformer",
        "prefix_length": 40,
        "clip_length": 40,
        "mapping_num_layers": 8,
        "normalize_prefix": True,
        "freeze_language_model": True,
        **PAPER_SCHEDULE,
    },
    "lora": {
        "mapping_type": "mlp",
        "prefix_length": 10,
        "use_lora": True,
        "save_merged_model": True,
        **PAPER_SCHEDULE,
        "learning_rate": 2e-4,
        "warmup_steps": 1000,
    },
}
# Every run: the collator needs the caption column, which Trainer would otherwise drop.
COMMON_DEFAULTS = {"remove_unused_columns": False}
# The options that shape a new model. A checkpoint (--model_name_or_path) has its own: these are then checked against
# it rather than ignored, and a recipe's values for them apply to new models only.
ARCHITECTURE_DEFAULTS: dict[str, Any] = {
    "vision_model_name_or_path": "openai/clip-vit-base-patch32",
    "text_model_name_or_path": "gpt2",
    "mapping_type": "mlp",
    "prefix_length": 10,
    "clip_length": None,
    "mapping_num_layers": 8,
    "normalize_prefix": False,
    "vision_pooling": None,  # the tower's own default
}
# The LoRA options not given (with --use_lora).
LORA_DEFAULTS: dict[str, Any] = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05}
# The two pretrained parts a new model is assembled from; the other architecture options are ClipCapConfig fields.
PART_OPTIONS = ("vision_model_name_or_path", "text_model_name_or_path")
# The architecture options only a transformer mapper has: an MLP mapper would drop them.
TRANSFORMER_OPTIONS = ("clip_length", "mapping_num_layers")
CONFIG_OPTIONS = tuple(name for name in ARCHITECTURE_DEFAULTS if name not in PART_OPTIONS)

# A run records the arguments that decide what it trains and how (clipcap_run_args.json, in output_dir and in each
# checkpoint); a rerun resumes from a checkpoint only with the values it records. Every ModelArguments and
# DataArguments field is recorded except these, which may differ when a run resumes:
# - recipe: what it sets is recorded field by field (the same values given one by one make the same run);
# - save_merged_model: what is written after the last step;
# - preprocessing_num_workers, embedding_cache_dir, embedding_batch_size: how fast and where the images are decoded
#   and embedded, not what the model is trained on. The embeddings are cached before the first step and a resume reads
#   them back, whatever the batch size; only embeddings computed again (another --embedding_cache_dir, a deleted
#   cache) may differ in their last bits, as they may on another device whatever the batch size.
#   use_embedding_cache is recorded (but under --streaming, which embeds the pixels at each step either way):
#   embeddings computed from the pixels at each step round differently from the cached ones;
# - on_bad_image: 'error' stops a run that meets a bad image, so the rows it trained on are the ones 'skip' keeps, and
#   a run stopped so may go on with 'skip';
# - validation_*, max_eval_samples, generation_*, eval_caption_metrics: evaluation only, which changes no weight.
ARGUMENTS_A_RESUME_MAY_CHANGE = (
    "recipe",
    "save_merged_model",
    "preprocessing_num_workers",
    "embedding_cache_dir",
    "embedding_batch_size",
    "on_bad_image",
    "validation_split",
    "validation_file",
    "validation_format",
    "validation_image_root",
    "max_eval_samples",
    "generation_num_beams",
    "generation_max_new_tokens",
    "eval_caption_metrics",
)
# The TrainingArguments fields recorded, named one by one (those of the installed transformers): the seeds, the
# optimizer, the schedule, the length of the run and the batches. The other fields (some 150, a set that changes with
# each transformers release) may differ on a resume: output_dir, overwrite_output_dir and resume_from_checkpoint; the
# logging, saving and evaluation cadence (logging_*, save_*, eval_*, do_eval, load_best_model_at_end); report_to,
# run_name and push_to_hub/hub_*; dataloader workers, pinning and prefetching; the device, precision and speed knobs
# (use_cpu, bf16, fp16, tf32, torch_compile*, gradient_checkpointing) and the distributed setup (ddp_*, fsdp*,
# deepspeed), which a run resumed on other hardware may need to change.
RECORDED_TRAINING_ARGUMENTS = (
    "seed",
    "data_seed",
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "warmup_ratio",
    "optim",
    "optim_args",
    "optim_target_modules",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "neftune_noise_alpha",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "dataloader_drop_last",
    "group_by_length",
    "length_column_name",
    "train_sampling_strategy",
)
# The recorded arguments that name local files, folders or glob patterns (or Hub names and URLs): a local path is
# recorded absolute, so that it names the same files whether it is given relative or not, from any working directory.
PATH_ARGUMENTS = (
    "model_name_or_path",
    "vision_model_name_or_path",
    "text_model_name_or_path",
    "dataset_name",
    "train_file",
    "image_root",
    "embeddings",
)
# The recorded arguments that name the training data. Besides its path, the record holds each one's content identity
# (`data_identity` in run.py), so that a resume refuses data changed at the same path rather than mix two datasets.
DATA_PATH_ARGUMENTS = ("dataset_name", "train_file", "image_root", "embeddings")
# The recorded arguments that name pretrained models. The record holds each one's `model_identity` too, so that a
# resume refuses a model saved over the same path (a base model retrained in place) rather than go on training
# adapters or a mapper fitted to another model.
MODEL_PATH_ARGUMENTS = ("model_name_or_path", *PART_OPTIONS)


def check_transformer_options(given: Sequence[str], mapping_type: str, model: str) -> None:
    """
    Refuse the `TRANSFORMER_OPTIONS` given (as "--name value") for a model whose mapper is not a transformer, which
    would drop them; `model` names the model ("this new model", "the checkpoint --model_name_or_path DIR").
    """
    if given and mapping_type != "transformer":
        fix = "Add --mapping_type transformer, or leave them out" if model == "this new model" else "Leave them out"
        raise ValueError(
            f"{', '.join(given)} shape a transformer mapper, but {model} has a {mapping_type} mapper, which has "
            f"neither. {fix}."
        )


def _recipe_architecture(recipe: str | None) -> dict[str, Any]:
    return {name: value for name, value in RECIPES.get(recipe, {}).items() if name in ARCHITECTURE_DEFAULTS}


def _recipe_run_defaults(recipe: str | None) -> dict[str, Any]:
    """What `parse_args` puts before the user's arguments: the recipe's values, less those for a new model only."""
    recipe = RECIPES.get(recipe, {})
    return {**COMMON_DEFAULTS, **{name: value for name, value in recipe.items() if name not in ARCHITECTURE_DEFAULTS}}


@dataclass
class ModelArguments:
    """Which model to train, and which of its parts."""

    recipe: str | None = field(
        default=None,
        metadata={
            "help": "Defaults of a published setup; explicit arguments override them.",
            "choices": sorted(RECIPES),
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A ClipCap checkpoint (folder or Hub name) to continue from. Else a new model is built from "
            "--vision_model_name_or_path and --text_model_name_or_path."
        },
    )
    # The architecture options default to None: "not given". A new model then gets the recipe's value or
    # ARCHITECTURE_DEFAULTS (filled in by __post_init__); a checkpoint keeps its own, and a given value must match it.
    vision_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The vision tower of a new model: a CLIP, SigLIP, SigLIP2, ViT or DINOv2 checkpoint (default: "
            "openai/clip-vit-base-patch32)."
        },
    )
    text_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The causal LM of a new model (default: gpt2)."}
    )
    mapping_type: str | None = field(default=None, metadata={"help": "New model: 'mlp' (default) or 'transformer'."})
    prefix_length: int | None = field(default=None, metadata={"help": "New model: number of prefix vectors (10)."})
    clip_length: int | None = field(
        default=None, metadata={"help": "New transformer mapper: CLIP projection length; None means prefix_length."}
    )
    mapping_num_layers: int | None = field(default=None, metadata={"help": "New transformer mapper: layers (8)."})
    normalize_prefix: bool | None = field(
        default=None, metadata={"help": "New model: L2-normalize the CLIP embedding (default: false)."}
    )
    vision_pooling: str | None = field(
        default=None,
        metadata={
            "help": "New model: the vision tower's one image embedding: projection (CLIP), pooled (SigLIP, ViT), cls "
            "(ViT, DINOv2) or cls_mean_patch (DINOv2); default: the tower's first."
        },
    )
    freeze_language_model: bool = field(default=False, metadata={"help": "Train the mapper only (frozen LM)."})
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on the LM (peft) and the mapper."})
    # The LoRA options default to None: "not given", which they must be without --use_lora; then LORA_DEFAULTS.
    # (--save_merged_model is a flag: given means true.)
    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank (default: 8)."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA scaling numerator (default: 16)."})
    lora_dropout: float | None = field(default=None, metadata={"help": "Dropout on the LoRA path (default: 0.05)."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated module names to adapt; default: every linear layer of the LM except its "
            "output layer."
        },
    )
    save_merged_model: bool = field(
        default=False,
        metadata={"help": "LoRA: also save the adapters merged into a plain checkpoint, in output_dir/merged."},
    )

    def __post_init__(self):
        # The command line checks `choices`; a JSON file (`HfArgumentParser.parse_dict`) does not.
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"--recipe must be one of {sorted(RECIPES)}, got {self.recipe!r}.")
        if self.model_name_or_path is None:
            # Given explicitly, that is before the recipe's values and the defaults fill the others in.
            transformer_only = [
                f"--{name} {getattr(self, name)}" for name in TRANSFORMER_OPTIONS if getattr(self, name) is not None
            ]
            for name, default in {**ARCHITECTURE_DEFAULTS, **_recipe_architecture(self.recipe)}.items():
                if getattr(self, name) is None:
                    setattr(self, name, default)
            check_transformer_options(transformer_only, self.mapping_type, "this new model")
        # Before LORA_DEFAULTS fill them in: a continued LoRA run checks these against its adapters' own.
        self.lora_options_given = tuple(
            name for name in (*LORA_DEFAULTS, "lora_target_modules") if getattr(self, name) is not None
        )
        given = [f"--{name}" for name in self.lora_options_given]
        given += ["--save_merged_model"] if self.save_merged_model else []
        if given and not self.use_lora:
            fix = "leave them out"
            if self.save_merged_model and RECIPES.get(self.recipe, {}).get("save_merged_model"):
                fix += f" (--recipe {self.recipe} sets --save_merged_model: add --save_merged_model false)"
            raise ValueError(f"{', '.join(given)} set up LoRA adapters: add --use_lora, or {fix}.")
        if self.use_lora and self.freeze_language_model:
            # Together they meant opposite things: a new run trained its adapters regardless, a continued LoRA run
            # froze them and trained the mapper alone.
            message = (
                "--use_lora with --freeze_language_model: LoRA already keeps the language model's own weights frozen "
                "and trains adapters on it. To train the mapper only, leave out --use_lora; to train adapters, leave "
                "out --freeze_language_model."
            )
            if RECIPES.get(self.recipe, {}).get("freeze_language_model"):
                message += (
                    f" (--recipe {self.recipe} sets --freeze_language_model; for LoRA with a transformer mapper, "
                    "give --recipe lora --mapping_type transformer instead.)"
                )
            raise ValueError(message)
        for name, default in LORA_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        # Checked before any data is loaded, rather than by peft once the images are embedded.
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be at least 1 (the adapters' rank), got {self.lora_r}.")
        if self.lora_alpha <= 0:  # peft scales the adapters by lora_alpha / lora_r: 0 would never train them
            raise ValueError(f"--lora_alpha must be above 0 (the adapters' scale is lora_alpha / lora_r), got "
                             f"{self.lora_alpha}.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora_dropout must be from 0 up to (not including) 1, got {self.lora_dropout}.")


@dataclass
class SourceArguments:
    """Where images and captions come from: a Hub dataset, data files, a folder or a caption format (`datasets`)."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "A dataset on the Hub (or a local dataset folder) for datasets.load_dataset."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration."})
    train_split: str = field(
        default="train",
        metadata={
            "help": "The split of --dataset_name to train on; also the shards read from a --train_file folder of "
            "split-named shards (train-00000-of-00001.parquet)."
        },
    )
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Training data: webdataset .tar shards, .parquet, .jsonl/.json/.csv naming image files, .arrow "
            "(comma-separated, glob patterns allowed), a folder written by save_to_disk, an image folder, or the "
            "file of a --dataset_format."
        },
    )
    dataset_format: str | None = field(
        default=None,
        metadata={
            "help": f"A caption format read by its own loader: {', '.join(sorted(DATASET_FORMATS))} (imagefolder: "
            "metadata mixing single captions and lists). Default: what datasets reads."
        },
    )
    image_root: str | None = field(
        default=None, metadata={"help": "Folder the image paths are relative to (formats, JSON/CSV files)."}
    )
    image_column: str | None = field(
        default=None, metadata={"help": "The image column (default: image, or the source's first image column)."}
    )
    caption_column: str | None = field(
        default=None,
        metadata={
            "help": "The caption column: a caption or a list of captions per row (default: the first of caption, "
            "txt, text the source has)."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read the training source lazily (IterableDataset) and train from pixels, without reading the "
            "whole set first; needs --max_steps."
        },
    )
    preprocessing_num_workers: int = field(default=0, metadata={"help": "Workers decoding images."})
    on_bad_image: str = field(
        default="error",
        metadata={"help": "A missing or unreadable image: 'error' stops before training, 'skip' drops its captions."},
    )

    def __post_init__(self):
        if self.dataset_format is not None and self.dataset_format not in DATASET_FORMATS:
            raise ValueError(f"--dataset_format must be one of {sorted(DATASET_FORMATS)}, got {self.dataset_format!r}.")
        columns = [f"--{name}" for name in ("image_column", "caption_column") if getattr(self, name) is not None]
        if columns and self.dataset_format is not None:
            # A format's loader reads its own fields (every source it reads: --validation_format defaults to it).
            raise ValueError(
                f"--dataset_format {self.dataset_format} reads the images and captions from the format's own fields, "
                f"not from columns that --image_column and --caption_column name, so {' and '.join(columns)} would "
                f"be ignored: leave {'them' if len(columns) > 1 else 'it'} out, or leave out --dataset_format to read "
                "the columns of a data file."
            )
        check_bad_image_policy(self.on_bad_image)


@dataclass
class EmbedArguments(SourceArguments):
    """`clipcap embed`: the source, the model whose vision tower embeds it, and the output folder."""

    model: str | None = field(default=None, metadata={"help": "The ClipCap model (folder or Hub name)."})
    output: str | None = field(default=None, metadata={"help": "The embeddings folder to write (or complete)."})
    batch_size: int = field(default=64, metadata={"help": "Images per vision forward."})
    keep_columns: str | None = field(
        default=None, metadata={"help": "Comma-separated source columns to store beside the embeddings."}
    )
    device: str | None = field(
        default=None, metadata={"help": "cpu, cuda, cuda:N; default: this process's GPU, else the CPU."}
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("model", "output"):
            if getattr(self, name) is None:
                raise ValueError(f"--{name} is required.")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {self.batch_size}.")
        if self.dataset_name is None and self.train_file is None:
            raise ValueError("Give the images to embed: --train_file (data files or a folder) or --dataset_name.")


@dataclass
class DataArguments(SourceArguments):
    """Which data to train and evaluate on, and how."""

    embeddings: str | None = field(
        default=None,
        metadata={
            "help": "Train from an embeddings folder written by `clipcap embed` (memory-mapped), instead of "
            "--train_file/--dataset_name."
        },
    )
    validation_split: str | None = field(
        default=None,
        metadata={
            "help": "The split of --dataset_name to evaluate on (e.g. validation); also the shards read from a "
            "--validation_file folder of split-named shards (default there: validation)."
        },
    )
    validation_file: str | None = field(
        default=None,
        metadata={"help": "Evaluation data, as --train_file (not needed for a coco-karpathy --train_file)."},
    )
    validation_format: str | None = field(
        default=None, metadata={"help": "Format of validation_file, when it differs (e.g. nocaps)."}
    )
    validation_image_root: str | None = field(default=None, metadata={"help": "Default: image_root."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training captions."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation captions."})
    max_caption_length: int = field(default=40, metadata={"help": "Caption tokens kept (EOS included)."})
    use_embedding_cache: bool = field(
        default=True,
        metadata={
            "help": "Train from CLIP embeddings computed once per image and cached. --no_use_embedding_cache runs the "
            "vision tower on the pixels at every step instead (so does --streaming, whatever this says): slower, "
            "and the same training up to rounding (embeddings computed in other batches differ in their last bits), "
            "so a run resumes only with the setting it started with."
        },
    )
    embedding_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where embeddings are cached, and with --embeddings the caption rows made from its folder; "
            "default: the datasets cache."
        },
    )
    embedding_batch_size: int = field(
        default=64,
        metadata={
            "help": "Images per vision forward when caching. A resume may change it: it reads the embeddings "
            "cached before the first step (images embedded again, in another cache folder, may differ in their last "
            "bits)."
        },
    )
    generation_num_beams: int | None = field(
        # None: "not given" (greedy), so that a run that evaluates nothing can refuse it.
        default=None, metadata={"help": "Beams when captioning the evaluation images (default: 1, greedy)."}
    )
    generation_max_new_tokens: int | None = field(
        # None: the model's own caption length, as `clipcap evaluate` captions with.
        default=None,
        metadata={
            "help": "Longest generated caption (default: the model's generation config's, as `clipcap evaluate` "
            f"captions; {DEFAULT_MAX_NEW_TOKENS} when it sets none)."
        },
    )
    eval_caption_metrics: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated COCO metrics for the evaluation captions (bleu, meteor, rouge, cider, "
            "spice); needs pycocoevalcap."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.validation_format is not None and self.validation_format not in DATASET_FORMATS:
            raise ValueError(
                f"--validation_format must be one of {sorted(DATASET_FORMATS)}, got {self.validation_format!r}."
            )
        if self.embeddings is not None and (self.train_file is not None or self.dataset_name is not None):
            given = "--train_file" if self.train_file is not None else "--dataset_name"
            raise ValueError(f"--embeddings trains from its folder; leave out {given} (or --embeddings).")
        if self.streaming and self.embeddings is not None:
            raise ValueError("--streaming reads a source lazily; an --embeddings folder is read memory-mapped anyway.")
        # Checked before any embedding is computed (or training step taken), not at the first evaluation.
        for name in ("max_caption_length", "generation_max_new_tokens", "generation_num_beams"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}; leave it out to keep all.")
        if self.caption_metrics:
            try:
                check_metric_names(self.caption_metrics)
                require_pycocoevalcap()
            except (ValueError, ImportError) as error:
                raise type(error)(f"--eval_caption_metrics: {error}") from error

    @property
    def caption_metrics(self) -> list[str]:
        """The metric names of `--eval_caption_metrics`."""
        return [name.strip() for name in (self.eval_caption_metrics or "").split(",") if name.strip()]


class ClipCapArgumentParser(HfArgumentParser):
    """
    The `HfArgumentParser` of `clipcap train` and `clipcap embed`, which also takes an abbreviated option when it
    starts the spellings of one option only: `--learn` for `--learning_rate`, `--train-f` for `--train-file`, as the
    argparse subcommands (`clipcap caption --rerank`) take them. HfArgumentParser registers every multi-word option
    twice (`--train_file`, `--train-file`), so that argparse alone refuses nearly every abbreviation as ambiguous
    between the two spellings of one option. An abbreviation that starts several options is still refused, naming them.
    """

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else args
        return super().parse_known_args(self.spelled_in_full(args), namespace)

    def check_json_types(self, values: dict[str, Any], source: str) -> None:
        """
        Refuse a value of `values` (the arguments of the JSON file `source`) whose JSON type is not its field's:
        `parse_dict` sets fields as given, so "false" (a string) would switch a flag on and "8" would fail deep inside
        a check. The command line converts its strings instead; a JSON file must give each value its own type.
        """
        for dtype in self.dataclass_types:
            hints = typing.get_type_hints(dtype)
            for field_ in dataclasses.fields(dtype):
                if field_.init and field_.name in values and not _json_fits(values[field_.name], hints[field_.name]):
                    value = values[field_.name]
                    raise ValueError(
                        f"{source}: {field_.name!r} must be {_json_type_described(hints[field_.name])}, got "
                        f"{json.dumps(value)} ({_JSON_TYPE_NAMES.get(type(value), type(value).__name__)})."
                    )

    def spelled_in_full(self, args: Sequence[str]) -> list[str]:
        """
        `args` with each abbreviated option (`--learn 0.1`, `--learn=0.1`) spelled in full; one that starts several
        options exits with argparse's error, naming each option once.
        """
        actions = {option: action for action in self._actions for option in action.option_strings if option[:2] == "--"}
        spelled = []
        for position, arg in enumerate(args):
            if arg == "--":  # what follows is no option
                return spelled + list(args[position:])
            name, equals, value = arg.partition("=")
            if name.startswith("--") and name not in actions:
                # The first spelling it starts of each option: `--train_` starts only `--train_file`.
                started = {}
                for option, action in actions.items():
                    if option.startswith(name):
                        started.setdefault(action, option)
                if len(started) > 1:
                    self.error(f"ambiguous option: {name} could match {', '.join(started.values())}")
                if started:
                    arg = next(iter(started.values())) + equals + value
            spelled.append(arg)
        return spelled


_JSON_TYPE_NAMES = {
    str: "a string", bool: "true or false", int: "an integer", float: "a number", list: "a list", dict: "an object",
    type(None): "null",
}  # fmt: skip


def _union_arguments(annotation) -> tuple | None:
    """The types of a `Union` or `X | Y` annotation, else None."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return typing.get_args(annotation)
    return None


def _json_fits(value: Any, annotation) -> bool:
    """
    Whether a JSON value fits a dataclass field's type: an integer for `int`, a number for `float`, true or false for
    `bool`, a string for `str` or an enum (its values are checked by the dataclass), a list or an object for list and
    dict types; a type not named here is left to the dataclass.
    """
    choices = _union_arguments(annotation)
    if choices is not None:
        return any(_json_fits(value, choice) for choice in choices)
    origin = typing.get_origin(annotation) or annotation
    if origin is Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation in (int, float):  # bool is an int to Python, not to JSON
        return isinstance(value, int if annotation is int else (int, float)) and not isinstance(value, bool)
    if annotation is str or (isinstance(annotation, type) and issubclass(annotation, enum.Enum)):
        return isinstance(value, str)
    if origin in (list, tuple):
        items = typing.get_args(annotation)[:1]
        return isinstance(value, list) and (not items or all(_json_fits(item, items[0]) for item in value))
    if origin is dict:
        return isinstance(value, dict)
    return True


def _json_type_described(annotation) -> str:
    """How an error names the JSON values a field's type takes: "an integer or null"."""
    choices = _union_arguments(annotation)
    if choices is not None:
        return " or ".join(dict.fromkeys(_json_type_described(choice) for choice in choices))
    origin = typing.get_origin(annotation) or annotation
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(choice) for choice in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "a string"
    if origin is tuple:
        return "a list"
    return _JSON_TYPE_NAMES.get(origin, getattr(origin, "__name__", str(origin)))
