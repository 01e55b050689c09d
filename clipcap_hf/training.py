"""Training ClipCap with the Hugging Face `Trainer`: recipes, argument dataclasses, caption evaluation and LoRA.

Three recipes (see [`RECIPES`]) set the defaults of a run; any argument given explicitly overrides them:

- `mlp_finetune`: the paper's MLP mapper (prefix 10) with GPT-2 fine-tuned: lr 2e-5, 5000 warmup steps, batch 40,
  10 epochs;
- `transformer_frozen`: the paper's transformer mapper (prefix 40, clip length 40, 8 layers) with a frozen GPT-2,
  which stays in eval mode (no dropout) and gets no gradients;
- `lora`: the MLP mapper, fully trained, with LoRA adapters (peft) on the language model's linear layers.

Run it with `clipcap train ...` or `python examples/run_clipcap.py ...` (the same arguments), e.g.

```bash
clipcap train --recipe transformer_frozen --dataset_format coco-karpathy --train_file dataset_coco.json \\
    --image_root coco/ --output_dir clipcap-coco --do_train --do_eval --eval_strategy epoch
```
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from accelerate import PartialState
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import find_adapter_config_file

from .data import (
    DATASET_FORMATS,
    ClipCapDataCollator,
    _check_policy,
    add_caption_lengths,
    check_images,
    embed_images,
    group_by_image,
    image_inputs,
    load_caption_dataset,
)
from .file_utils import read_json, write_text_atomically
from .modeling_clipcap import DEFAULT_MAX_NEW_TOKENS, ClipCapForConditionalGeneration
from .processing_clipcap import ClipCapProcessor

logger = logging.getLogger(__name__)

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
}
# The two pretrained parts a new model is assembled from; the other architecture options are ClipCapConfig fields.
PART_OPTIONS = ("vision_model_name_or_path", "text_model_name_or_path")
CONFIG_OPTIONS = tuple(name for name in ARCHITECTURE_DEFAULTS if name not in PART_OPTIONS)


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
        default=None, metadata={"help": "The CLIP checkpoint of a new model (default: openai/clip-vit-base-patch32)."}
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
    freeze_language_model: bool = field(default=False, metadata={"help": "Train the mapper only (frozen LM)."})
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on the LM (peft) and the mapper."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path."})
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
            for name, default in {**ARCHITECTURE_DEFAULTS, **_recipe_architecture(self.recipe)}.items():
                if getattr(self, name) is None:
                    setattr(self, name, default)


@dataclass
class DataArguments:
    """Which data to train and evaluate on, and how."""

    dataset_format: str = field(
        default="imagefolder", metadata={"help": f"One of {', '.join(sorted(DATASET_FORMATS))}."}
    )
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Training captions: the Karpathy JSON (which also holds validation/test), a COCO or nocaps "
            "JSON, a Conceptual Captions TSV, or the image folder."
        },
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Evaluation captions (not needed for coco-karpathy)."}
    )
    validation_format: str | None = field(
        default=None, metadata={"help": "Format of validation_file, when it differs (e.g. nocaps)."}
    )
    image_root: str | None = field(default=None, metadata={"help": "Folder the image paths are relative to."})
    validation_image_root: str | None = field(default=None, metadata={"help": "Default: image_root."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training captions."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation captions."})
    max_caption_length: int = field(default=40, metadata={"help": "Caption tokens kept (EOS included)."})
    use_embedding_cache: bool = field(
        default=True,
        metadata={
            "help": "Train from CLIP embeddings computed once per image and cached. --no_use_embedding_cache runs the "
            "vision tower on the pixels at every step instead: slower, same result."
        },
    )
    embedding_cache_dir: str | None = field(
        default=None, metadata={"help": "Where embeddings are cached; default: the datasets cache."}
    )
    embedding_batch_size: int = field(default=64, metadata={"help": "Images per vision forward when caching."})
    preprocessing_num_workers: int = field(default=0, metadata={"help": "Workers decoding images."})
    on_bad_image: str = field(
        default="error",
        metadata={"help": "A missing or unreadable image: 'error' stops before training, 'skip' drops its captions."},
    )
    generation_num_beams: int = field(default=1, metadata={"help": "Beams when captioning the evaluation images."})
    generation_max_new_tokens: int = field(
        default=DEFAULT_MAX_NEW_TOKENS, metadata={"help": "Longest generated caption."}
    )
    eval_caption_metrics: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated COCO metrics for the evaluation captions (bleu, meteor, rouge, cider, "
            "spice); needs pycocoevalcap."
        },
    )

    def __post_init__(self):
        for name in ("dataset_format", "validation_format"):
            value = getattr(self, name)
            if value is not None and value not in DATASET_FORMATS:
                raise ValueError(f"--{name} must be one of {sorted(DATASET_FORMATS)}, got {value!r}.")
        _check_policy(self.on_bad_image)
        # Checked before any embedding is computed (or training step taken), not at the first evaluation.
        for name in ("max_caption_length", "generation_max_new_tokens", "generation_num_beams"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}; leave it out to keep all.")
        if self.caption_metrics:
            from .metrics import check_metric_names, require_pycocoevalcap

            try:
                check_metric_names(self.caption_metrics)
                require_pycocoevalcap()
            except (ValueError, ImportError) as error:
                raise type(error)(f"--eval_caption_metrics: {error}") from error

    @property
    def caption_metrics(self) -> list[str]:
        """The metric names of `--eval_caption_metrics`."""
        return [name.strip() for name in (self.eval_caption_metrics or "").split(",") if name.strip()]


# ---------------------------------------------------------------------------------------------------------------------
# Model


def build_model(model_args: ModelArguments) -> tuple[ClipCapForConditionalGeneration, ClipCapProcessor]:
    """
    Load a ClipCap checkpoint, or assemble a new one from a pretrained CLIP and language model. A LoRA run's output
    (a folder with `adapter_config.json`) loads as a trainable `PeftModel` when `use_lora` is set.
    """
    path = model_args.model_name_or_path
    if path is not None:
        if _is_lora_output(path):
            if not model_args.use_lora:
                raise ValueError(
                    f"--model_name_or_path {path} holds LoRA adapters (adapter_config.json). Add --use_lora (or "
                    "--recipe lora) to train those adapters further, or continue from a plain checkpoint: the merged "
                    "model (output_dir/merged, written by --save_merged_model, or clipcap_hf.training.merge_lora)."
                )
            # transformers' from_pretrained would load the adapters frozen (and add_lora would then wrap them twice).
            model = load_lora_model(path, is_trainable=True)
        else:
            model = ClipCapForConditionalGeneration.from_pretrained(path)
        _check_checkpoint_architecture(model_args, model.config)
        return model, ClipCapProcessor.from_pretrained(path)
    config_kwargs = {
        "mapping_num_layers": model_args.mapping_num_layers,
        "normalize_prefix": model_args.normalize_prefix,
    }
    if model_args.mapping_type == "transformer":
        config_kwargs["clip_length"] = model_args.clip_length
    model = ClipCapForConditionalGeneration.from_vision_text_pretrained(
        model_args.vision_model_name_or_path,
        model_args.text_model_name_or_path,
        mapping_type=model_args.mapping_type,
        prefix_length=model_args.prefix_length,
        **config_kwargs,
    )
    processor = ClipCapProcessor.from_vision_text_pretrained(
        model_args.vision_model_name_or_path, model_args.text_model_name_or_path
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
    for name in CONFIG_OPTIONS:
        value = getattr(model_args, name)
        if value is not None and value != getattr(config, name):
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


def lora_target_modules(model: ClipCapForConditionalGeneration, names: Sequence[str] | None = None) -> str:
    """
    A peft regex matching the language model's layers called `names` (e.g. `["c_attn"]`); by default every linear
    layer of the language model except its output layer.
    """
    # Built here rather than with peft's "all-linear", which would also adapt the frozen CLIP tower and the mapper
    # (which is trained in full, as a `modules_to_save`).
    if not names:
        output_layer = model.get_output_embeddings()
        names = {
            name.rsplit(".", 1)[-1]
            for name, module in model.language_model.named_modules()
            if isinstance(module, (torch.nn.Linear, transformers.pytorch_utils.Conv1D)) and module is not output_layer
        }
    return rf"language_model\..*\.({'|'.join(sorted(map(re.escape, names)))})"


def add_lora(model: ClipCapForConditionalGeneration, model_args: ModelArguments):
    """
    Wrap the model in a peft `PeftModel`: LoRA adapters on the language model, the mapping network fully trained
    (and saved with the adapters, as a `modules_to_save`), everything else frozen.
    """
    from peft import LoraConfig, get_peft_model

    names = [name.strip() for name in (model_args.lora_target_modules or "").split(",") if name.strip()]
    # GPT-2's Conv1D layers store their weight transposed (fan_in_fan_out); peft would set the flag itself, with a
    # warning for each layer, so it is set here.
    conv1d = transformers.pytorch_utils.Conv1D
    lora_config = LoraConfig(
        fan_in_fan_out=any(isinstance(module, conv1d) for module in model.language_model.modules()),
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=lora_target_modules(model, names),
        modules_to_save=["mapping_network"],
    )
    return get_peft_model(model, lora_config)


def load_lora_model(
    adapter_dir: str | os.PathLike, base_model_name_or_path: str | None = None, is_trainable: bool = False
):
    """
    Reload a LoRA run: the base ClipCap (by default the one recorded in `adapter_config.json`) with the adapters
    and the trained mapping network from `adapter_dir`. Returns a `PeftModel`, frozen unless `is_trainable` (then the
    adapters and the mapping network train further); `.merge_and_unload()` gives a plain
    [`ClipCapForConditionalGeneration`].
    """
    from peft import PeftConfig, PeftModel

    base_path = base_model_name_or_path or PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    base = ClipCapForConditionalGeneration.from_pretrained(base_path)
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=is_trainable)


def merge_lora(
    adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, base_model_name_or_path: str | None = None
) -> ClipCapForConditionalGeneration:
    """Merge a LoRA run's adapters into its base model and save a plain checkpoint (with the processor)."""
    model = load_lora_model(adapter_dir, base_model_name_or_path).merge_and_unload()
    model.save_pretrained(output_dir)
    ClipCapProcessor.from_pretrained(adapter_dir).save_pretrained(output_dir)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation by captioning


@torch.no_grad()
def caption_dataset(
    model,
    processor: ClipCapProcessor,
    images: datasets.Dataset,
    image_embeds: torch.Tensor | None = None,
    batch_size: int = 32,
    **generate_kwargs,
) -> list[str]:
    """
    Caption each row of `images`: rows with `image_index` into `image_embeds` (the embedding cache), or rows with an
    `image` or `image_path`. Returns the decoded, stripped captions in row order.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    captions: list[str] = []
    for start in range(0, len(images), batch_size):
        rows = [images[index] for index in range(start, min(start + batch_size, len(images)))]
        inputs = image_inputs(rows, processor.image_processor, image_embeds)
        generated = model.generate(**{name: value.to(device) for name, value in inputs.items()}, **generate_kwargs)
        captions.extend(processor.post_process_image_text_to_text(generated))
    model.train(was_training)
    return captions


class ClipCapTrainer(Trainer):
    r"""
    A `Trainer` whose evaluation also captions every evaluation image and reports it.

    Loss alone does not reveal the classic captioning failure, a model giving every image the same caption; so each
    evaluation generates one caption per unique image and logs `{prefix}_distinct_captions` (how many different
    captions) and `{prefix}_distinct_caption_ratio`, optional COCO metrics against the references, and writes the
    captions to `output_dir/predictions/{prefix}_step{N}.json`. The work is split between processes. The
    `processing_class` (a [`ClipCapProcessor`]) decodes the captions (and preprocesses pixels).

    Args:
        caption_eval_dataset: one row per image (see [`group_by_image`]) with `references`.
        caption_eval_embeds: the embedding table its `image_index` points into; `None` to caption from pixels.
        generation_kwargs: passed to `generate`, e.g. `{"num_beams": 5, "max_new_tokens": 30}`.
        caption_metrics: names for [`compute_caption_metrics`], e.g. `["bleu", "cider"]`.
    """

    def __init__(
        self,
        *args,
        caption_eval_dataset: datasets.Dataset | None = None,
        caption_eval_embeds: torch.Tensor | None = None,
        generation_kwargs: dict[str, Any] | None = None,
        caption_metrics: Sequence[str] = (),
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if caption_eval_dataset is not None:
            if not isinstance(self.processing_class, ClipCapProcessor):
                raise ValueError(
                    "ClipCapTrainer needs processing_class=<the model's ClipCapProcessor> to decode the captions of "
                    f"caption_eval_dataset; got {type(self.processing_class).__name__}."
                )
            if len(caption_eval_dataset) == 0:
                raise ValueError("caption_eval_dataset has no rows; give at least one image, or None.")
        self.caption_eval_dataset = caption_eval_dataset
        self.caption_eval_embeds = caption_eval_embeds
        self.generation_kwargs = generation_kwargs or {}
        self.caption_metrics = list(caption_metrics)

    def evaluation_loop(
        self,
        dataloader: torch.utils.data.DataLoader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        # `evaluate` describes its loop as "Evaluation"; `predict` runs on other data and gets no caption metrics.
        if self.caption_eval_dataset is not None and description == "Evaluation":
            output.metrics.update(self.evaluate_captions(metric_key_prefix))
        return output

    def evaluate_captions(self, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Caption the evaluation images (split across processes), write them out and return the metrics."""
        from accelerate.utils import gather_object

        images = self.caption_eval_dataset
        model = self.accelerator.unwrap_model(self.model)
        with self.accelerator.split_between_processes(list(range(len(images))), apply_padding=True) as rows:
            captions = caption_dataset(
                model,
                self.processing_class,
                images.select(rows),
                self.caption_eval_embeds,
                batch_size=self.args.per_device_eval_batch_size,
                **self.generation_kwargs,
            )
        captions = gather_object(captions)[: len(images)]  # padding repeated the last rows

        distinct = len(set(captions))
        metrics = {
            f"{metric_key_prefix}_distinct_captions": distinct,
            f"{metric_key_prefix}_distinct_caption_ratio": round(distinct / len(captions), 4),
        }
        if self.caption_metrics:
            from .metrics import compute_caption_metrics

            scores = compute_caption_metrics(
                dict(enumerate(captions)), dict(enumerate(images["references"])), metrics=self.caption_metrics
            )
            metrics.update({f"{metric_key_prefix}_{name}": round(value, 4) for name, value in scores.items()})
        if self.is_world_process_zero():
            if distinct == 1 and len(captions) > 1:
                logger.warning(
                    f"The model gives all {len(captions)} evaluation images the same caption: {captions[0]!r}"
                )
            self._write_predictions(images, captions, metric_key_prefix)
        return metrics

    def _write_predictions(self, images: datasets.Dataset, captions: list[str], prefix: str) -> None:
        folder = Path(self.args.output_dir) / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{prefix}_step{self.state.global_step}.json"
        records = [
            {"image_id": image_id, "caption": caption, "references": references, "image_path": image_path}
            for image_id, caption, references, image_path in zip(
                images["image_id"], captions, images["references"], images["image_path"]
            )
        ]
        write_text_atomically(path, json.dumps(records, indent=1, ensure_ascii=False))
        logger.info(f"Wrote {len(records)} evaluation captions to {path}.")


# ---------------------------------------------------------------------------------------------------------------------
# Data


def load_splits(data_args: DataArguments) -> tuple[datasets.Dataset | None, datasets.Dataset | None]:
    """The training and evaluation caption datasets named by the arguments (either may be `None`)."""
    train = validation = None
    if data_args.train_file is not None:
        loaded = load_caption_dataset(data_args.dataset_format, data_args.train_file, data_args.image_root)
        if isinstance(loaded, datasets.DatasetDict):  # the Karpathy file holds every split
            train, validation = loaded.get("train"), loaded.get("validation")
        else:
            train = loaded
    if data_args.validation_file is not None:
        validation_format = data_args.validation_format or data_args.dataset_format
        validation = load_caption_dataset(
            validation_format, data_args.validation_file, data_args.validation_image_root or data_args.image_root
        )
        if isinstance(validation, datasets.DatasetDict):  # a Karpathy file: its "val" images
            if "validation" not in validation:
                raise ValueError(
                    f"--validation_file {data_args.validation_file} ({validation_format}) has no images of split "
                    "'val' to evaluate on; give a file that has some, or another --validation_format."
                )
            validation = validation["validation"]
    if train is not None and data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if validation is not None and data_args.max_eval_samples is not None:
        validation = validation.select(range(min(data_args.max_eval_samples, len(validation))))
    return train, validation


def prepare_images(
    dataset: datasets.DatasetDict, model, processor: ClipCapProcessor, data_args: DataArguments, device: torch.device
) -> tuple[datasets.DatasetDict, torch.Tensor | None]:
    """Add cached CLIP embeddings (or, training from pixels, check that every image opens)."""
    if not data_args.use_embedding_cache:
        return check_images(dataset, data_args.on_bad_image, data_args.preprocessing_num_workers), None
    cache_dir = data_args.embedding_cache_dir or os.path.join(datasets.config.HF_DATASETS_CACHE, "clipcap_embeddings")
    return embed_images(
        dataset,
        model,
        processor.image_processor,
        cache_dir,
        batch_size=data_args.embedding_batch_size,
        device=device,
        num_workers=data_args.preprocessing_num_workers,
        on_bad_image=data_args.on_bad_image,
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
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments), prog=prog)
    if len(args) == 1 and args[0].endswith(".json"):
        values = read_json(args[0])
        if not isinstance(values, dict) or not isinstance(values.get("recipe", ""), (str, type(None))):
            raise ValueError(
                f"{args[0]} must hold one JSON object of argument names and values (\"recipe\", if given, a string)."
            )
        return parser.parse_dict({**_recipe_run_defaults(values.get("recipe")), **values})
    recipe_parser = argparse.ArgumentParser(add_help=False)
    recipe_parser.add_argument("--recipe", choices=sorted(RECIPES), default=None)
    recipe = recipe_parser.parse_known_args(args)[0].recipe
    defaults = _recipe_run_defaults(recipe)
    default_args = [item for name, value in defaults.items() for item in (f"--{name}", str(value))]
    return parser.parse_args_into_dataclasses(args=default_args + args)


def setup_logging(training_args: TrainingArguments) -> None:
    """Log from the main process only (at `--log_level`), replicas at `--log_level_replica`, as the examples do."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    # transformers' records already have its handler; with CI=true it also passes them on to the root logger, whose
    # handler (above) would print every one of them a second time.
    transformers.utils.logging.disable_propagation()


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _check_context_length(
    config, data_args: DataArguments, splits: Sequence[datasets.Dataset] = (), generation: bool = False
) -> None:
    """
    Refuse, before training, captions (of `splits`, with a `length` column) or generated captions (`generation`)
    that with the prefix would not fit the language model's positions: a learned position table such as GPT-2's
    fails with an IndexError in the middle of the run.
    """
    context = getattr(config.text_config, "max_position_embeddings", None)
    if not isinstance(context, int):
        return
    prefix = config.prefix_length
    room = f"{context - prefix} or less" if context > prefix else "below 1: the prefix alone fills the context"
    lengths = [max(split["length"]) for split in splits if len(split)]
    if lengths and prefix + max(lengths) > context:
        raise ValueError(
            f"The longest caption has {max(lengths)} tokens (EOS included, after --max_caption_length "
            f"{data_args.max_caption_length}); with the {prefix} prefix vectors that is {prefix + max(lengths)} "
            f"positions, but the language model has {context} (max_position_embeddings). Set --max_caption_length "
            f"to {room}."
        )
    if generation and prefix + data_args.generation_max_new_tokens > context:
        raise ValueError(
            f"--generation_max_new_tokens {data_args.generation_max_new_tokens} with the {prefix} prefix vectors "
            f"needs {prefix + data_args.generation_max_new_tokens} positions, but the language model has {context} "
            f"(max_position_embeddings). Set --generation_max_new_tokens to {room}."
        )


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
    setup_logging(training_args)
    logger.warning(
        f"Process rank: {training_args.process_index}, device: {training_args.device}, "
        f"world size: {training_args.world_size}, bf16: {training_args.bf16}, fp16: {training_args.fp16}"
    )
    last_checkpoint = None
    # transformers 4 has --overwrite_output_dir, which means: start afresh rather than resume.
    overwrite = getattr(training_args, "overwrite_output_dir", False)
    if training_args.do_train and os.path.isdir(training_args.output_dir) and not overwrite:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
            logger.info(f"Resuming from {last_checkpoint}; use another --output_dir to start afresh.")
    set_seed(training_args.seed)

    model, processor = build_model(model_args)
    train_dataset, eval_dataset = load_splits(data_args)
    # Evaluation (at the end, or during training) captions the evaluation images.
    evaluating = eval_dataset is not None and (training_args.do_eval or training_args.eval_strategy != "no")
    _check_context_length(model.config, data_args, generation=evaluating)
    if training_args.do_train and train_dataset is None:
        raise ValueError("--do_train needs --train_file.")
    if training_args.do_eval and eval_dataset is None:
        raise ValueError("--do_eval needs --validation_file (or a coco-karpathy --train_file).")
    if not training_args.do_train:
        train_dataset = None  # an evaluation-only run embeds and checks the evaluation images only

    # The main process computes the embeddings; the others then find them in the cache. Both splits share one
    # embedding table, so one collator serves training and evaluation batches.
    splits = datasets.DatasetDict(
        {name: split for name, split in (("train", train_dataset), ("eval", eval_dataset)) if split is not None}
    )
    # local=False: the global main process goes first, so nodes sharing an --embedding_cache_dir do not all embed.
    with training_args.main_process_first(local=False, desc="image embeddings"):
        splits, image_embeds = prepare_images(splits, model, processor, data_args, training_args.device)
    train_dataset, eval_dataset = splits.get("train"), splits.get("eval")
    for name, split in (("training", train_dataset), ("evaluation", eval_dataset)):
        if split is not None and len(split) == 0:
            raise ValueError(
                f"No {name} captions are left: every {name} image was unreadable and skipped (--on_bad_image skip). "
                "Fix the images named in the warning above."
            )
    metrics: dict[str, float] = {}
    # A `length` column lets `group_by_length` batch captions of similar length; the Trainer groups eval batches too.
    if eval_dataset is not None:
        eval_dataset = add_caption_lengths(eval_dataset, processor, data_args.max_caption_length)[0]
    if training_args.do_train:
        train_dataset, num_truncated = add_caption_lengths(train_dataset, processor, data_args.max_caption_length)
        metrics["train_truncated_captions"] = num_truncated
        if num_truncated:
            logger.info(
                f"{num_truncated} of {len(train_dataset)} training captions are longer than --max_caption_length "
                f"({data_args.max_caption_length} tokens, EOS included) and will be cut."
            )
    captions = [split for split in (train_dataset, eval_dataset) if split is not None]
    _check_context_length(model.config, data_args, captions)

    if model_args.freeze_language_model:
        model.freeze_language_model()
    if model_args.use_lora and _is_peft_model(model):
        logger.info(
            f"Training the adapters of {model_args.model_name_or_path} further (their own rank and target modules; "
            "the --lora_* options apply to new adapters)."
        )
    elif model_args.use_lora:
        if model.name_or_path in ("", None) or not os.path.isdir(model.name_or_path):
            # The adapters need a base model to load into later: save the freshly assembled one once.
            base_dir = os.path.join(training_args.output_dir, "base_model")
            if training_args.should_save:
                model.save_pretrained(base_dir)
                processor.save_pretrained(base_dir)
            model.name_or_path = base_dir
        # adapter_config.json records this path; a relative one would not resolve from another working directory.
        model.name_or_path = os.path.abspath(model.name_or_path)
        model = add_lora(model, model_args)

    collator = ClipCapDataCollator(
        processor, image_embeds=image_embeds, max_caption_length=data_args.max_caption_length
    )
    trainer = ClipCapTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        # Saved with every checkpoint, so a checkpoint folder captions on its own; also decodes evaluation captions.
        processing_class=processor,
        caption_eval_dataset=group_by_image(eval_dataset) if eval_dataset is not None else None,
        caption_eval_embeds=image_embeds,
        generation_kwargs={
            "num_beams": data_args.generation_num_beams,
            "max_new_tokens": data_args.generation_max_new_tokens,
        },
        caption_metrics=data_args.caption_metrics,
    )

    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint or last_checkpoint)
        trainer.save_model()
        if trainer.is_world_process_zero():
            processor.save_pretrained(training_args.output_dir)
            if model_args.use_lora and model_args.save_merged_model:
                merge_lora(training_args.output_dir, os.path.join(training_args.output_dir, "merged"))
        metrics.update(result.metrics)
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    return metrics


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


def add_train_parser(subparsers) -> None:
    """`clipcap train ARGS...`: the arguments of `examples/run_clipcap.py`, forwarded as they are."""
    # No option of its own (prefix '+'), so every `--flag` reaches HfArgumentParser, `--help` included.
    parser = subparsers.add_parser(
        "train", add_help=False, prefix_chars="+", help="Train a ClipCap model (see `clipcap train --help`)."
    )
    parser.add_argument("arguments", nargs=argparse.REMAINDER)
    parser.set_defaults(handler=_train_command)


def _train_command(parsed: argparse.Namespace) -> int:
    main(parsed.arguments, prog="clipcap train")
    return 0


__all__ = [
    "RECIPES",
    "ClipCapTrainer",
    "DataArguments",
    "ModelArguments",
    "add_lora",
    "build_model",
    "caption_dataset",
    "load_lora_model",
    "load_splits",
    "lora_target_modules",
    "main",
    "merge_lora",
    "parse_args",
    "prepare_images",
    "train",
]
