"""`ClipCapTrainer`: a `Trainer` whose evaluation also captions the evaluation images."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import PreTrainedModel, PrinterCallback, Trainer, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data import image_inputs
from ..evaluation.metrics import compute_caption_metrics
from ..inference.captioner import captioning_run
from ..processing_clipcap import ClipCapProcessor
from ..utils.file_utils import give_files_the_umask_mode, read_json, write_text_atomically
from ..utils.memory import reuse_freed_memory

logger = logging.getLogger(__name__)

# The arguments that define a run (`run_arguments` in run.py), recorded in its output_dir and in each checkpoint.
RUN_ARGUMENTS_NAME = "clipcap_run_args.json"


def write_run_arguments(folder: str | os.PathLike[str], arguments: dict[str, Any]) -> None:
    """Write a run's arguments in `folder` (created if need be) as `RUN_ARGUMENTS_NAME`, atomically."""
    os.makedirs(folder, exist_ok=True)
    write_text_atomically(os.path.join(folder, RUN_ARGUMENTS_NAME), json.dumps(arguments, indent=2) + "\n")


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
    `image` or `image_path`. Returns the decoded, stripped captions in row order. The batches run in one
    [`~clipcap_hf.inference.captioning_run`] block: on the CPU the weights are packed for oneDNN once for all the
    batches, where it is chosen (they do not change until it returns), and the memory one batch frees serves the next.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    captions: list[str] = []
    with captioning_run(model):
        for start in range(0, len(images), batch_size):
            rows = [images[index] for index in range(start, min(start + batch_size, len(images)))]
            inputs = image_inputs(rows, processor.image_processor, image_embeds)
            generated = model.generate(**{name: value.to(device) for name, value in inputs.items()}, **generate_kwargs)
            captions.extend(processor.post_process_image_text_to_text(generated))
    model.train(was_training)
    return captions


def scratch_training_arguments(
    scratch_dir: str | Path,
    *,
    max_steps: int,
    batch_size: int,
    learning_rate: float,
    logging_steps: int,
    seed: int,
    verbose: bool = True,
    **overrides,
) -> TrainingArguments:
    """
    The `TrainingArguments` of a short in-process run (the quickstart, each ablation run): the `Trainer` writes only
    into `scratch_dir`, a temporary folder (no checkpoints are saved: the caller saves the final model), reports to no
    integration, warms up over the first 1/30 of the steps, and trains on the CPU when there is no GPU. `overrides` are
    further `TrainingArguments` fields.
    """
    return TrainingArguments(
        output_dir=str(scratch_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=max(1, max_steps // 30),
        logging_steps=logging_steps,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not verbose,
        **overrides,
    )


def scratch_trainer(model, args: TrainingArguments, train_dataset, data_collator) -> ClipCapTrainer:
    """
    The `ClipCapTrainer` of a short in-process run on `scratch_training_arguments`; a quiet one (`verbose=False`, so
    no progress bar) prints no log dicts either: without its bar, `Trainer` prints each one instead.
    """
    trainer = ClipCapTrainer(model=model, args=args, train_dataset=train_dataset, data_collator=data_collator)
    if args.disable_tqdm:
        trainer.remove_callback(PrinterCallback)
    return trainer


_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# How the model weights Trainer saves in a checkpoint are named: safetensors or torch files, sharded (with their index)
# or not, FSDP's, peft's adapters.
_WEIGHTS_PREFIXES = ("model.safetensors", "pytorch_model", "adapter_model")


def _holds_model_weights(folder: Path) -> bool:
    """Whether `folder` holds model weights as Trainer saves them (peft's adapters also one subfolder per adapter)."""
    for entry in folder.iterdir():
        if entry.name.startswith(_WEIGHTS_PREFIXES):
            return True
        if entry.is_dir() and any(name.startswith("adapter_model") for name in os.listdir(entry)):
            return True
    return False


def checkpoint_folders(output_dir: str | os.PathLike[str]) -> dict[int, str]:
    """The `checkpoint-N` folders of `output_dir`, by step."""
    steps = {}
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            steps[int(match.group(1))] = os.path.join(output_dir, name)
    return steps


def _newest_checkpoint(folder: Path) -> Path | None:
    """
    The `checkpoint-N` folder of `folder` with the largest N of those that would resume (holding trainer_state.json
    and model weights), else None. So it is never a folder [`check_is_a_checkpoint`] refuses, nor a damaged one.
    """
    try:
        steps = checkpoint_folders(folder)
    except OSError:
        return None
    complete = [
        step for step, checkpoint in steps.items()
        if Path(checkpoint, TRAINER_STATE_NAME).is_file() and _holds_model_weights(Path(checkpoint))
    ]
    return Path(steps[max(complete)]) if complete else None


def check_is_a_checkpoint(checkpoint: str | os.PathLike[str]) -> None:
    """
    Refuse to resume from what is no Trainer checkpoint at all (a path that does not exist, a file, a folder without
    the trainer_state.json that Trainer writes last into each checkpoint, or one not named checkpoint-N without model
    weights), naming it and a checkpoint to give instead. Only the files of a checkpoint are reported as damaged, with
    the advice to delete it ([`_naming_a_damaged_checkpoint`]): a checkpoint-N holding trainer_state.json goes on to
    be loaded, so one whose weights are missing is; an image folder or a saved model given by mistake must not be.
    """
    folder = Path(checkpoint)
    named_a_checkpoint = _CHECKPOINT_NAME.match(folder.name) is not None
    if not folder.exists():
        problem = "there is no such folder"
    elif not folder.is_dir():
        problem = "it is a file, not a checkpoint folder"
    elif not (folder / TRAINER_STATE_NAME).is_file():
        problem = (
            f"it is not a Trainer checkpoint: it holds no {TRAINER_STATE_NAME} (Trainer writes it last into each "
            "checkpoint, so a checkpoint a run stopped writing has none either)"
        )
    elif not _holds_model_weights(folder) and not named_a_checkpoint:
        problem = f"it is not a Trainer checkpoint: it holds {TRAINER_STATE_NAME} but no model weights"
    else:
        # A checkpoint-N holding trainer_state.json is a checkpoint a run saved: without its weights (deleted, or in a
        # layout Trainer alone knows) its load fails as damaged, with the advice to delete it.
        return
    newest = (_newest_checkpoint(folder) if folder.is_dir() else None) or _newest_checkpoint(folder.parent)
    example = f"{newest}, the newest in its folder" if newest else "<output_dir>/checkpoint-N"
    # A model saved by save_pretrained, given by mistake; every checkpoint holds config.json too, so not one of those.
    saved_model = (folder / "config.json").is_file() and not named_a_checkpoint
    further = "; to train a saved model further, give it as --model_name_or_path" if saved_model else ""
    raise ValueError(
        f"Cannot resume from {folder}: {problem}. Give --resume_from_checkpoint a checkpoint that a run saved, e.g. "
        f"{example}{further}."
    )


def _raised_putting_state_in(error: BaseException) -> bool:
    """
    Whether `error` was raised by torch's `load_state_dict` (of the model, its adapters, the optimizer, the scheduler):
    while state read whole from a checkpoint was put into this run's objects, which it did not fit, rather than while
    the checkpoint's files were read.
    """
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    return any(
        frame.name == "load_state_dict" and frame.filename.startswith(torch_dir)
        for frame in traceback.extract_tb(error.__traceback__)
    )


@contextlib.contextmanager
def _naming_a_damaged_checkpoint(checkpoint: str | None, files: str) -> Iterator[None]:
    """
    Turn a failure to read part of a checkpoint (truncated, corrupt, not a torch file) into an error naming it. Only
    for a folder that [`check_is_a_checkpoint`] accepted: its advice is to delete the checkpoint. A checkpoint read
    whole whose state does not fit the run's model or optimizer (other parameter shapes or groups) is another run's,
    not damaged: the error says so, and does not advise deleting it.
    """
    try:
        yield
    except Exception as error:  # torch.load's failures are many: UnpicklingError, RuntimeError, EOFError, ...
        folder = Path(checkpoint)
        if _raised_putting_state_in(error):
            raise ValueError(
                f"Cannot resume from {folder}: the contents of its {files} do not fit this run "
                f"({type(error).__name__}: {error}). The checkpoint belongs to another model, or to a run that trained "
                "other parameters (another --freeze_language_model, --use_lora or LoRA option, or mapper). Resume it "
                "with the arguments of the run that saved it, or start a new run in another --output_dir."
            ) from error
        raise ValueError(
            f"Cannot resume from {folder}: its {files} cannot be read ({type(error).__name__}: {error}); the "
            f"checkpoint is damaged, e.g. by a run stopped while writing it. Delete {folder} to resume from the "
            f"checkpoint before it, or give an earlier one with --resume_from_checkpoint {folder.parent}/checkpoint-N."
        ) from error


def _in_memory_names(model: PreTrainedModel, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """
    `state_dict`, read from a checkpoint that `save_pretrained` wrote, under the names and in the layout `model` holds
    its weights in. transformers 5 saves some towers' weights as their checkpoints hold them (ViT's and DINOv2's
    `attention.attention.key`, SigLIP's `vision_model.vision_model.`, DINOv2's SwiGLU `weights_in` whole) and converts
    them on loading with the model's conversion mapping: `from_pretrained` applies it, Trainer's `load_state_dict` does
    not. Applied here as `from_pretrained` does; a key matching no weight of the model keeps its name (torch reports it
    as unexpected). transformers 4, which holds the weights under their checkpoint names, gets `state_dict` back.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: no conversions
        return state_dict
    conversions = get_model_conversion_mapping(model)
    renamings = [conversion for conversion in conversions if isinstance(conversion, WeightRenaming)]
    converters = [conversion for conversion in conversions if isinstance(conversion, WeightConverter)]
    converter_of = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    own = model.state_dict()
    converted, pending = {}, {}
    for key, tensor in state_dict.items():
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, own)
        if name not in own:  # as `from_pretrained`: a key the model holds already is not renamed away
            name, pattern = key, None
        if pattern is None:
            converted[name] = tensor
        else:  # a tensor that becomes others (DINOv2's `weights_in`, split in two), once all its parts are read
            pending.setdefault(name, copy.deepcopy(converter_of[pattern])).add_tensor(name, key, pattern, tensor)
    for name, converter in pending.items():
        for target, tensors in converter.convert(name, model=model, config=model.config).items():
            converted[target] = tensors[0] if isinstance(tensors, list) else tensors
    return converted


@contextlib.contextmanager
def _loading_checkpoint_names(model) -> Iterator[None]:
    """
    While Trainer loads the weights of a checkpoint into `model` with torch's `load_state_dict` (resuming, loading the
    best checkpoint), they load under the names `model` holds them by ([`_in_memory_names`]), and a weight tied to one
    loaded (GPT-2's output layer, saved once with the input embeddings) does not count as missing. Without this, a
    resume on transformers 5 left a ViT, SigLIP or DINOv2 tower with the weights it had before (undoing the training of
    an unfrozen tower) and warned of missing and unexpected keys, and every resume warned of GPT-2's output layer. A
    wrapped model (FSDP, peft's adapters) is left to Trainer.
    """
    if not isinstance(model, PreTrainedModel):
        yield
        return
    load_state_dict = model.load_state_dict

    def load_converted(state_dict, strict=True, assign=False):
        try:
            state_dict = _in_memory_names(model, state_dict)
        except (AttributeError, TypeError) as error:  # transformers' loading internals as another 5.x has them
            logger.warning(
                "Could not convert the checkpoint's weight names as from_pretrained does (%s: %s); loading them as "
                "Trainer does, which leaves a ViT, SigLIP or DINOv2 tower's weights as they were.",
                type(error).__name__,
                error,
            )
        result = load_state_dict(state_dict, strict, assign)
        weights = model.state_dict(keep_vars=True)
        loaded = {id(weights[name]) for name in state_dict if name in weights}
        return result._replace(missing_keys=[name for name in result.missing_keys if id(weights[name]) not in loaded])

    model.load_state_dict = load_converted
    try:
        yield
    finally:
        del model.load_state_dict


def _check_caption_eval_columns(images: datasets.Dataset, image_embeds: torch.Tensor | None) -> None:
    """
    Refuse a `caption_eval_dataset` without the columns an evaluation reads, before it captions anything: `image_id`
    and `references` (written beside each caption) and each row's image, as [`caption_dataset`] takes it.
    """
    columns = set(images.column_names)
    missing = [f"`{name}`" for name in ("image_id", "references") if name not in columns]
    if image_embeds is not None:
        image = "`image_index` (its row of caption_eval_embeds)"
        if "image_index" not in columns:
            missing.append(image)
    else:
        image = "an image column: `pixel_values`, `image` or `image_path`"
        if not columns & {"pixel_values", "image", "image_path"}:
            missing.append(image)
    if missing:
        raise ValueError(
            f"caption_eval_dataset lacks {' and '.join(missing)}; it needs one row per image (see group_by_image) with "
            f"`image_id`, `references` (its reference captions) and {image}. Its columns: {sorted(columns)}."
        )


class ClipCapTrainer(Trainer):
    r"""
    A `Trainer` whose evaluation also captions every evaluation image and reports it.

    Loss alone does not reveal the classic captioning failure, a model giving every image the same caption; so each
    evaluation generates one caption per unique image and logs `{prefix}_distinct_captions` (how many different
    captions) and `{prefix}_distinct_caption_ratio`, optional COCO metrics against the references, and writes the
    captions to `output_dir/predictions/{prefix}_step{N}.json`. The work is split between processes. The
    `processing_class` (a [`ClipCapProcessor`]) decodes the captions (and preprocesses pixels).

    Args:
        caption_eval_dataset: one row per image (see [`group_by_image`]) with `image_id`, `references` and its image:
            `image_index` with `caption_eval_embeds`, else `pixel_values`, `image` or `image_path`.
        caption_eval_embeds: the embedding table its `image_index` points into; `None` to caption from pixels.
        generation_kwargs: passed to `generate`, e.g. `{"num_beams": 5, "max_new_tokens": 30}`.
        caption_metrics: names for [`compute_caption_metrics`], e.g. `["bleu", "cider"]`.
        run_arguments: the arguments that define the run, written into each checkpoint as `RUN_ARGUMENTS_NAME`, so
            that a resume checks its arguments against those of the run that saved that very checkpoint.
    """

    def __init__(
        self,
        *args,
        caption_eval_dataset: datasets.Dataset | None = None,
        caption_eval_embeds: torch.Tensor | None = None,
        generation_kwargs: dict[str, Any] | None = None,
        caption_metrics: Sequence[str] = (),
        run_arguments: dict[str, Any] | None = None,
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
            _check_caption_eval_columns(caption_eval_dataset, caption_eval_embeds)
        self.caption_eval_dataset = caption_eval_dataset
        self.caption_eval_embeds = caption_eval_embeds
        self.generation_kwargs = generation_kwargs or {}
        self.caption_metrics = list(caption_metrics)
        self.run_arguments = run_arguments

    def train(self, *args, **kwargs):
        # On the CPU the large tensors a step frees are reused by the next one, not mapped in again (memory.py).
        with reuse_freed_memory() if self.args.device.type == "cpu" else contextlib.nullcontext():
            return super().train(*args, **kwargs)

    # Resuming: a damaged part of the checkpoint is named, with what to do, rather than a bare torch.load traceback, and
    # the weights load under the model's own names (`_loading_checkpoint_names`). Trainer.train (and run.py, for a
    # finished run) loads the weights first, before the other files of the checkpoint.
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        check_is_a_checkpoint(resume_from_checkpoint)
        with (
            _naming_a_damaged_checkpoint(resume_from_checkpoint, "model weights or trainer_state.json"),
            _loading_checkpoint_names(self.model if model is None else model),
        ):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            read_json(Path(resume_from_checkpoint) / TRAINER_STATE_NAME)  # which Trainer.train reads next, unchecked

    def _load_best_model(self):
        with _loading_checkpoint_names(self.model):
            super()._load_best_model()

    def _load_optimizer_and_scheduler(self, checkpoint):
        with _naming_a_damaged_checkpoint(checkpoint, "optimizer or scheduler state (optimizer.pt, scheduler.pt)"):
            super()._load_optimizer_and_scheduler(checkpoint)

    def _load_rng_state(self, checkpoint):
        with _naming_a_damaged_checkpoint(checkpoint, "random number generator state (rng_state*.pth)"):
            super()._load_rng_state(checkpoint)

    def _save_checkpoint(self, model, trial):
        # Written first: Trainer writes trainer_state.json last, so a complete checkpoint always names its run.
        if self.run_arguments is not None and self.args.should_save:
            checkpoint = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            write_run_arguments(checkpoint, self.run_arguments)
        super()._save_checkpoint(model, trial)

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        # safetensors writes the weights readable by their owner only; they get the umask's mode, as the other files.
        give_files_the_umask_mode(output_dir or self.args.output_dir)

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
        fields = {"image_id": images["image_id"], "caption": captions, "references": images["references"]}
        if "image_path" in images.column_names:  # images given as pixels or an `image` column have no path to write
            fields["image_path"] = images["image_path"]
        records = [dict(zip(fields, values)) for values in zip(*fields.values())]
        write_text_atomically(path, json.dumps(records, indent=1, ensure_ascii=False))
        logger.info(f"Wrote {len(records)} evaluation captions to {path}.")
