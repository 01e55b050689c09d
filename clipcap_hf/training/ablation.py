"""Ablations (`clipcap ablate`): train a grid of ClipCap variants on one dataset with the same budget each, score each
with the caption metrics, and write the scores as a table (CSV and Markdown) and as figures, the score against the
prefix length per mapper, as in the paper's prefix-length figure.

The grid's axes are the paper's: prefix length, mapper (MLP or transformer), language model (fine-tuned or frozen)
and, beyond the paper, the vision tower (any tower `from_vision_text_pretrained` takes). Every run starts from the same
pretrained vision tower and language model and trains for the same number of steps on the same batches; the vision
tower is frozen, so each tower embeds the images once, for all of its runs.

Without a dataset the grid runs on the quickstart's synthetic shapes ([`clipcap_hf.training.quickstart`]). Nothing
pretrained is reachable offline, so a short quickstart run first trains the "pretrained" parts (its vision tower and
language model); the grid then starts from those, as the paper's runs start from CLIP and GPT-2.

Each run is saved in `output_dir/runs/NAME/` (model, processor, `scores.json`); a run whose `scores.json` exists is
not trained again when the grid is rerun, so an interrupted grid continues where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import io
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache, partial
from operator import eq
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig
from transformers.utils import logging as transformers_logging

from ..configuration_clipcap import MAPPING_TYPES, check_positive_int
from ..data import ClipCapDataCollator, add_caption_lengths, group_by_image, load_caption_dataset
from ..data.collator import image_inputs
from ..data.embeddings import image_cache_key
from ..evaluation.metrics import caption_tokenization, compute_caption_metrics, require_pycocoevalcap
from ..modeling_clipcap import ClipCapForConditionalGeneration
from ..processing_clipcap import ClipCapProcessor
from ..utils.file_utils import (
    read_json,
    save_pretrained,
    write_atomically,
    write_folder_atomically,
    write_text_atomically,
)
from ..utils.loading import local_folder, model_identity, same_model
from .quickstart import (
    IMAGE_TOKEN,
    TEXT_POSITIONS,
    QuickstartConfig,
    build_tokenizer,
    make_shapes_dataset,
    run_quickstart,
    score_captions,
)
from .trainer import caption_dataset, scratch_trainer, scratch_training_arguments

logger = logging.getLogger(__name__)

LANGUAGE_MODES = ("finetuned", "frozen")
# The COCO caption metrics every run is scored with: the ones that need no Java. The captions are tokenized as
# `clipcap evaluate` tokenizes them (`score_run`), so the scores are comparable with its own.
CAPTION_METRICS = ("bleu", "rouge", "cider")
SCORES_FILE = "scores.json"
# The scores a figure can show: the caption metrics', and the synthetic task's own.
SYNTHETIC_SCORES = ("exact_match", "colour_accuracy", "shape_accuracy", "position_accuracy")
PLOTTABLE_SCORES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr", *SYNTHETIC_SCORES)


@dataclass
class AblationConfig:
    """The grid and the budget of each of its runs (the defaults: 20 runs on the synthetic task, 12 minutes on a
    shared 2-core machine, docs/ablations.md)."""

    prefix_lengths: Sequence[int] = (1, 2, 4, 8, 16)
    mapping_types: Sequence[str] = MAPPING_TYPES
    language_models: Sequence[str] = LANGUAGE_MODES
    """`"finetuned"` trains the language model with the mapper; `"frozen"` trains the mapper only."""
    vision_models: Sequence[str] = ()
    """Pretrained vision towers (Hub names or folders) for a dataset of your own; empty: the synthetic task's own
    tower. The grid's only record of its towers: the dataset ([`AblationData`]) holds none."""
    text_model: str | None = None
    """The pretrained causal language model for a dataset of your own; `None`: the synthetic task's own."""
    max_steps: int = 200
    batch_size: int = 64
    learning_rate: float = 1e-3
    mapping_num_layers: int = 2
    """Layers of the transformer mapper (the paper's has 8)."""
    max_caption_length: int = 40
    plot_metrics: Sequence[str] = ("CIDEr", "Bleu_4")
    seed: int = 0
    shapes: QuickstartConfig = field(default_factory=lambda: QuickstartConfig(max_steps=1500))
    """Synthetic task only: its dataset's sizes, and the quickstart run that trains its pretrained parts."""

    def __post_init__(self):
        for name in ("prefix_lengths", "mapping_types", "language_models", "vision_models", "plot_metrics"):
            values = getattr(self, name)
            if isinstance(values, (str, os.PathLike)) or not isinstance(values, Sequence):
                one_value = isinstance(values, (str, os.PathLike, int, float))
                fix = f"; give [{values!r}]." if one_value else "."
                raise ValueError(f"`{name}` must be a list, got {values!r}{fix}")
        tower = next((vision for vision in self.vision_models if not isinstance(vision, (str, os.PathLike))), None)
        if tower is not None:
            raise ValueError(f"`vision_models` must name towers by Hub name or folder, got {tower!r}.")
        # Towers given as paths (`Path("models/clip")`) are named by their strings, as the command gives them.
        self.vision_models = [os.fspath(vision) for vision in self.vision_models]
        self.text_model = None if self.text_model is None else os.fspath(self.text_model)
        for name, values, choices in (
            ("mapping_types", self.mapping_types, MAPPING_TYPES),
            ("language_models", self.language_models, LANGUAGE_MODES),
        ):
            unknown = [value for value in values if value not in choices]
            if unknown or not values:
                raise ValueError(f"`{name}` must be some of {choices}, got {list(values)}.")
        unknown = [name for name in self.plot_metrics if name not in PLOTTABLE_SCORES]
        if unknown:
            raise ValueError(f"`plot_metrics` must be some of {PLOTTABLE_SCORES}, got {unknown}.")
        if not self.prefix_lengths:
            raise ValueError("`prefix_lengths` must hold at least one prefix length.")
        for index, length in enumerate(self.prefix_lengths):
            check_positive_int(f"prefix_lengths[{index}]", length)
        for name in ("max_steps", "batch_size", "mapping_num_layers", "max_caption_length"):
            check_positive_int(name, getattr(self, name))
        if not self.learning_rate > 0:
            raise ValueError(f"`learning_rate` must be positive, got {self.learning_rate!r}.")
        if bool(self.vision_models) != (self.text_model is not None):
            raise ValueError(
                "Give both the pretrained vision towers and the language model (a dataset of your own), or neither "
                "(the synthetic task, which trains its own)."
            )
        synthetic_only = [name for name in self.plot_metrics if name in SYNTHETIC_SCORES]
        if self.vision_models and synthetic_only:  # they would be drawn empty once the whole grid has trained
            raise ValueError(
                f"`plot_metrics` (--plot-metrics) {' '.join(synthetic_only)}: scores of the synthetic task, which a "
                "dataset of your own is not scored with; plot caption metrics (Bleu_1 to Bleu_4, ROUGE_L, CIDEr)."
            )
        for name in ("prefix_lengths", "mapping_types", "language_models", "vision_models"):
            values = list(getattr(self, name))
            repeated = next((value for index, value in enumerate(values) if value in values[:index]), None)
            if repeated is not None:
                raise ValueError(
                    f"`{name}` holds {repeated!r} more than once ({values}): give each value once (a repeat would "
                    "train the same run again and add a duplicate row to the table and figures)."
                )
        names = [tower_name(vision) for vision in self.vision_models]
        if len(set(names)) < len(names):
            raise ValueError(
                f"The vision towers {list(self.vision_models)} end in the same name, which names their runs' folders; "
                "give towers whose last path parts differ (copy or link one under another name)."
            )


@dataclass(frozen=True)
class AblationRun:
    """One point of the grid."""

    vision_model: str
    mapping_type: str
    language_model: str
    prefix_length: int

    @property
    def name(self) -> str:
        """The run's folder name: tower, mapper, language model mode and prefix length."""
        tower = tower_name(self.vision_model)
        return f"{tower}-{self.mapping_type}-{self.language_model}-prefix{self.prefix_length:03d}"


def tower_name(vision_model: str) -> str:
    """What a vision tower (a Hub name or a folder) is called in run names, the table and the figures' legends."""
    return Path(vision_model.rstrip("/")).name or "vision"


@dataclass
class AblationData:
    """The dataset a grid runs on (the pretrained parts it starts from are the grid's: [`AblationConfig`])."""

    train: datasets.Dataset
    """Training rows: `caption` and the image (`image` or `image_path`)."""
    evaluation: datasets.Dataset
    """Evaluation rows, one per image: `references` (a list of captions) and the image."""
    extra_scores: Any = field(default=None, repr=False)
    """`f(predictions, references) -> dict` of task-specific scores (the synthetic task's attribute accuracies)."""

    def __post_init__(self):
        # Checked here, not where the first run reads them: a run trains for minutes before it scores.
        for split, rows, needed in (("train", self.train, "caption"), ("evaluation", self.evaluation, "references")):
            if needed not in rows.column_names:
                fix = (
                    "group the evaluation rows by image with `clipcap_hf.data.group_by_image`, which gathers each "
                    "image's captions into `references`"
                    if split == "evaluation" and "caption" in rows.column_names
                    else f"give each row its {'caption' if split == 'train' else 'reference captions (a list)'}"
                )
                raise ValueError(
                    f"The {split} rows (`AblationData.{split}`) have no `{needed}` column (columns "
                    f"{rows.column_names}): {fix}."
                )
            if "image" not in rows.column_names and "image_path" not in rows.column_names:
                raise ValueError(
                    f"The {split} rows (`AblationData.{split}`) have no image: give them an `image` or `image_path` "
                    f"column (columns {rows.column_names})."
                )
        if "image_id" in self.evaluation.column_names:  # the images' scores are keyed by it
            counts = Counter(self.evaluation["image_id"])
            repeated = next((image_id for image_id, count in counts.items() if count > 1), None)
            if repeated is not None:
                raise ValueError(
                    f"The evaluation rows hold the image id {repeated!r} more than once: give one row per image "
                    "(`clipcap_hf.data.group_by_image` gathers an image's captions into its `references`)."
                )
        references = self.evaluation["references"]
        bad = [row for row, captions in enumerate(references) if not isinstance(captions, list) or not captions]
        if bad:
            # Named by image id where the rows have one (as a scoring error would name them), else by row.
            named = (
                f"image ids {[self.evaluation[row]['image_id'] for row in bad[:10]]}"
                if "image_id" in self.evaluation.column_names
                else f"rows {bad[:10]}"
            )
            raise ValueError(
                f"{len(bad)} of the {len(references)} evaluation images ({named}{', ...' if len(bad) > 10 else ''}) "
                "have no reference captions (`references` must be a non-empty list of captions per image): leave "
                "those images out of the evaluation rows or give them captions."
            )


def grid_runs(config: AblationConfig) -> list[AblationRun]:
    """Every run of the grid, in table order."""
    return [
        AblationRun(vision, mapping_type, language_model, prefix_length)
        for vision in config.vision_models
        for language_model in config.language_models
        for mapping_type in config.mapping_types
        for prefix_length in sorted(config.prefix_lengths)
    ]


def shapes_task(
    output_dir: str | os.PathLike, config: AblationConfig, verbose: bool = True
) -> tuple[AblationConfig, AblationData]:
    """
    The synthetic shapes task, and its pretrained parts: a quickstart run (`output_dir/base`, done once) trains the
    vision tower and the language model, which are then saved as a vision folder and a language model folder.

    Returns:
        `config` with those folders as its `vision_models` and `text_model`, and the task's dataset.
    """
    base = Path(output_dir) / "base"
    shapes = config.shapes
    splits = make_shapes_dataset(
        shapes.train_images_per_combination, shapes.test_images_per_combination, shapes.image_size, shapes.seed
    )
    if not (base / "held_out_scores.json").is_file():  # written last by the quickstart
        # Its language model is the grid's: prefix lengths it cannot take are refused before it trains, not after
        # (the captions measured with the tokenizer the quickstart learns from them; the lengths leave out the prefix).
        def processor():
            tokenizer = build_tokenizer(splits["train"]["caption"])
            return ClipCapProcessor(tokenizer=tokenizer, num_image_tokens=1, image_token=IMAGE_TOKEN)

        _refuse_long_prefixes(
            config.prefix_lengths, TEXT_POSITIONS,
            f"the synthetic task's language model (which the quickstart trains into {base})",
            splits["train"], processor, config.max_caption_length,
        )
        run_quickstart(base, config.shapes, verbose=verbose, overwrite=True)
    elif (trained_with := read_json(base / "quickstart_config.json")) != asdict(config.shapes):
        raise ValueError(
            f"{base} was trained with other settings ({trained_with}, this grid's: {asdict(config.shapes)}); use "
            f"another output folder, or remove {base} and its runs to start again."
        )
    vision_dir, text_dir = base / "clip-shapes", base / "gpt2-shapes"
    missing = [folder for folder in (vision_dir, text_dir) if not folder.is_dir()]
    if missing:
        model = ClipCapForConditionalGeneration.from_pretrained(base, trust_remote_code=False)
        processor = ClipCapProcessor.from_pretrained(base, trust_remote_code=False)
        parts = {vision_dir: (model.vision_model, processor.image_processor),
                 text_dir: (model.language_model, processor.tokenizer)}
        # Each written whole or not at all: a run killed part-way leaves no half-written folder a rerun would take.
        for folder in missing:
            write_folder_atomically(folder, lambda staging, folder=folder: save_pretrained(staging, *parts[folder]))
    evaluation = splits["test_seen"]
    evaluation = evaluation.add_column("references", [[caption] for caption in evaluation["caption"]])
    data = AblationData(
        train=splits["train"], evaluation=evaluation.remove_columns("caption"), extra_scores=_shapes_scores
    )
    # Not `replace`, whose checks would take the task's own parts for those of a dataset of your own (and refuse to
    # plot the task's scores).
    task_config = copy.copy(config)
    task_config.vision_models, task_config.text_model = [str(vision_dir)], str(text_dir)
    return task_config, data


def _shapes_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """The synthetic task's exact match and attribute accuracies (its BLEU is among the caption metrics already)."""
    scores = score_captions(predictions, [captions[0] for captions in references])
    scores.pop("bleu_4", None)
    return scores


def caption_task(
    dataset_format: str, train_file: str, *, validation_file: str | None = None, image_root: str | None = None
) -> AblationData:
    """
    A dataset of your own ([`load_caption_dataset`]'s formats), for a grid whose config names the pretrained parts:
    training captions from `train_file`, evaluation images from `validation_file` (or the Karpathy file's validation
    split).
    """
    loaded = load_caption_dataset(dataset_format, train_file, image_root)
    train, evaluation = (loaded.get("train"), loaded.get("validation")) if isinstance(loaded, dict) else (loaded, None)
    if validation_file is not None:
        evaluation = load_caption_dataset(dataset_format, validation_file, image_root)
        if isinstance(evaluation, dict):
            evaluation = evaluation.get("validation")
    if train is None or evaluation is None:
        raise ValueError(
            f"{train_file}: an ablation needs training captions and evaluation images; give a validation file "
            "(--validation-file) or a coco-karpathy file, which holds both."
        )
    return AblationData(train=train, evaluation=group_by_image(evaluation))


def with_image_index(rows: datasets.Dataset) -> tuple[datasets.Dataset, datasets.Dataset]:
    """
    `rows` with an `image_index` column, and the rows of its distinct images in index order: the captions of one image
    file share its embedding, so each file is embedded once.
    """
    if "image_path" not in rows.column_names:  # images in the rows themselves (the synthetic task): one each
        return rows.add_column("image_index", list(range(len(rows)))), rows
    positions: dict[str, int] = {}
    first_rows, index = [], []
    for row, path in enumerate(rows["image_path"]):
        if path not in positions:
            positions[path] = len(first_rows)
            first_rows.append(row)
        index.append(positions[path])
    return rows.add_column("image_index", index), rows.select(first_rows)


@torch.no_grad()
def embed_rows(
    model, image_processor, rows: datasets.Dataset, batch_size: int = 64, verbose: bool = True
) -> torch.Tensor:
    """The frozen vision tower's image embedding of each row's image, in row order."""
    device = next(model.parameters()).device
    chunks = []
    for start in tqdm(range(0, len(rows), batch_size), desc="Embedding images", leave=False, disable=not verbose):
        batch = [rows[index] for index in range(start, min(start + batch_size, len(rows)))]
        pixel_values = image_inputs(batch, image_processor)["pixel_values"].to(device)
        chunks.append(model.get_image_embeds(pixel_values).float().cpu())
    return torch.cat(chunks)


def train_and_score(
    run: AblationRun,
    data: AblationData,
    config: AblationConfig,
    run_dir: Path,
    embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]],
    data_fingerprint: str,
    verbose: bool = True,
) -> dict[str, Any]:
    """
    Train one run from the pretrained parts, caption the evaluation images, score them and save the run, recording
    `data_fingerprint` (`dataset_fingerprint(data)`, computed once for the grid).
    """
    processor = ClipCapProcessor.from_vision_text_pretrained(
        run.vision_model, config.text_model, num_image_tokens=run.prefix_length
    )
    torch.manual_seed(config.seed)
    mapper_options = {"mapping_num_layers": config.mapping_num_layers} if run.mapping_type == "transformer" else {}
    model = ClipCapForConditionalGeneration.from_vision_text_pretrained(
        run.vision_model, config.text_model, mapping_type=run.mapping_type, prefix_length=run.prefix_length,
        image_token_id=processor.image_token_id, **mapper_options,
    )
    if run.language_model == "frozen":
        model.freeze_language_model()
    model.to("cuda" if torch.cuda.is_available() else "cpu")  # where the Trainer trains: embed and caption there too
    (train, train_images), (evaluation, eval_images) = with_image_index(data.train), with_image_index(data.evaluation)
    if run.vision_model not in embeddings:  # the tower is frozen: its embeddings serve every run with it
        embeddings[run.vision_model] = (
            embed_rows(model, processor.image_processor, train_images, verbose=verbose),
            embed_rows(model, processor.image_processor, eval_images, verbose=verbose),
        )
    train_embeds, eval_embeds = embeddings[run.vision_model]
    # The Trainer writes only scratch files (no checkpoints are saved); the run's folder gets the final model.
    with tempfile.TemporaryDirectory(prefix="clipcap-ablate-") as scratch:
        args = scratch_training_arguments(
            scratch,
            max_steps=config.max_steps,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            logging_steps=max(1, config.max_steps // 5),
            seed=config.seed,
            verbose=verbose,
        )
        collator = ClipCapDataCollator(
            processor, image_embeds=train_embeds, max_caption_length=config.max_caption_length
        )
        result = scratch_trainer(model, args, train, collator).train()
    # Saved before scoring, so that a failure there keeps the trained model (a run without `scores.json` is trained
    # again by a rerun, over it).
    save_pretrained(run_dir, model, processor)

    predictions = caption_dataset(model, processor, evaluation, image_embeds=eval_embeds, batch_size=64)
    references = data.evaluation["references"]
    image_ids = data.evaluation["image_id"] if "image_id" in data.evaluation.column_names else None
    scores = score_run(predictions, references, data.extra_scores, image_ids)
    record = {
        "run": asdict(run),
        "budget": budget(config, run),
        "trained_from": trained_from(run, config, data_fingerprint),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_seconds": round(result.metrics["train_runtime"], 1),
        "train_loss": round(result.metrics["train_loss"], 4),
        "scores": scores,
        "scoring": caption_tokenization(),  # a finished run is reused only when scored the same way
        "samples": [[prediction, refs[0]] for prediction, refs in list(zip(predictions, references))[:5]],
    }
    write_text_atomically(run_dir / SCORES_FILE, json.dumps(record, indent=2))  # last: marks the run finished
    return record


def score_run(
    predictions: list[str], references: list[list[str]], extra_scores: Any = None,
    image_ids: Sequence[Any] | None = None,
) -> dict[str, float]:
    """
    A run's caption metrics ([`CAPTION_METRICS`]) and `extra_scores(predictions, references)`, if given. The captions
    are PTB-tokenized (lower-cased, punctuation removed) as `clipcap evaluate` does; without Java, with its Python
    approximation and a warning ([`tokenize_captions`]). `image_ids` (one per image, distinct) name the images in the
    metrics' errors and warnings; without them, their positions do.
    """
    keys = list(range(len(predictions))) if image_ids is None else list(image_ids)
    scores = compute_caption_metrics(dict(zip(keys, predictions)), dict(zip(keys, references)), CAPTION_METRICS)
    if extra_scores is not None:
        scores.update(extra_scores(predictions, references))
    return scores


def budget(config: AblationConfig, run: AblationRun) -> dict[str, Any]:
    """
    What a run's training takes from the grid's settings; a finished run is reused only when it was trained the same
    way. The transformer mapper's depth is part of its runs' budget only: an MLP run is the same at any depth.
    """
    names = ("max_steps", "batch_size", "learning_rate", "max_caption_length", "seed")
    if run.mapping_type == "transformer":
        names += ("mapping_num_layers",)
    return {name: getattr(config, name) for name in names}


def _same_budget(recorded: dict[str, Any], expected: dict[str, Any]) -> bool:
    # Earlier versions recorded the transformer mapper's depth for MLP runs too.
    return {name: value for name, value in recorded.items() if name in expected or name != "mapping_num_layers"} == (
        expected
    )


def trained_from(run: AblationRun, config: AblationConfig, data_fingerprint: str) -> dict[str, Any]:
    """
    What a run starts from: its pretrained parts, by their content ([`model_identity`]: a folder's whatever its path,
    so a moved output folder resumes and a base retrained in place does not) and a fingerprint of the dataset's rows;
    a finished run is reused only when they match.
    """
    return {
        "vision_model": model_identity(run.vision_model),
        "text_model": model_identity(config.text_model),
        "dataset": data_fingerprint,
    }


def dataset_fingerprint(data: AblationData, image_files: bool = True) -> str:
    """
    A hash of the training and evaluation rows' contents (captions, references, image paths or image bytes) and of
    each image file the rows' `image_path`s name, by its identity ([`image_cache_key`]: absolute path, size and
    modification time). Without `image_files`, the rows' alone: an older clipcap_hf's fingerprint, which took a file
    replaced at its path, or a relative path read from another working folder, for the same image.
    """
    hasher = hashlib.sha256()
    for rows in (data.train, data.evaluation):
        sink = pa.BufferOutputStream()
        table = rows.with_format("arrow")[:]  # the rows as selected, not the whole backing table
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        hasher.update(sink.getvalue().to_pybytes())
    if image_files:  # none for rows that hold their images: their fingerprint is the rows', as before
        for key in _image_file_keys(data):
            hasher.update(f"{key}\n".encode())
    return hasher.hexdigest()


def _image_file_keys(data: AblationData) -> list[str]:
    """
    The identity of each distinct image file of the rows (in order of first appearance), as the embedding cache keys
    files: its absolute path, size and modification time, not its content, since hashing every image of a large
    dataset (COCO's: about 19 GB) would read all of it at each rerun of a finished grid. A file that is not there is
    refused, naming it.
    """
    keys: dict[str, str] = {}
    for split, rows in (("train", data.train), ("evaluation", data.evaluation)):
        if "image_path" not in rows.column_names:
            continue
        for row, path in enumerate(rows["image_path"]):
            if path is None or path in keys:
                continue
            absolute = os.path.abspath(path)
            if not os.path.isfile(absolute):
                raise FileNotFoundError(
                    f"{path}: no such image file (row {row} of the {split} rows' `image_path`, {absolute}). Paths "
                    "that do not start with / start from the working folder: give the dataset's image folder "
                    "(--image-root) as an absolute path, or run from the folder they start from."
                )
            keys[path] = image_cache_key(absolute)
    return list(keys.values())


def check_finished_run(
    record: dict[str, Any], run_dir: Path, expected: dict[str, Any], what: str,
    same: Callable[[Any, Any], bool | None] = eq, older: Any = None,
) -> None:
    """
    Refuse to reuse a finished run whose record of `what` (`budget`, `trained_from`) differs from this grid's: is not
    `same(recorded, expected)`. `same` gives None for a record an older clipcap_hf wrote that cannot be checked
    against this grid's; `older` is what that version would record for this grid, shown beside it.
    """
    if what not in record:
        raise ValueError(
            f"{run_dir / SCORES_FILE} has no `{what}` record (a run written by an older clipcap_hf), so it cannot be "
            "told apart from a run with other settings; use another output folder, or remove that run to train it "
            "again."
        )
    verdict = same(record[what], expected)
    if verdict is None:
        raise ValueError(
            f"{run_dir / SCORES_FILE} records `{what}` as an older clipcap_hf did, by the pretrained parts' paths or "
            f"Hub names, not by their content ({record[what]}, this grid's: {older}); as they differ, it cannot be "
            "verified that the run was trained from this grid's parts. Run the grid with the parts the record names "
            "(at the paths it was run with) to reuse the run, use another output folder, or remove that run to train "
            "it again."
        )
    if not verdict:
        description = "with another budget" if what == "budget" else "from other pretrained parts or data"
        raise ValueError(
            f"{run_dir} was trained {description} ({record[what]}, this grid's: {expected}); use another output "
            "folder, or remove that run to train it again."
        )


def _older_trained_from(run: AblationRun, config: AblationConfig) -> dict[str, str]:
    """The pretrained parts as an older clipcap_hf recorded them in `trained_from`, before it recorded their content: a
    local folder's absolute path (`~` not expanded, as then), else the name as given."""
    return {
        part: os.path.abspath(model) if os.path.exists(model) else model
        for part, model in (("vision_model", run.vision_model), ("text_model", config.text_model))
    }


def _is_path_or_name(identity: Any) -> bool:
    """Whether a recorded pretrained part is a path or Hub name (as an older clipcap_hf recorded it), not a content
    identity (`model_identity`; one named by its name alone holds no more than the name either)."""
    return isinstance(identity, str) and not identity.startswith("sha256:")


def _same_origin(recorded: Any, expected: dict[str, Any], older: dict[str, str]) -> bool | None:
    """
    Whether a run's `trained_from` record is this grid's: the same data, and models the same by content (an identity
    that cannot tell counts as another model). A part recorded by an older clipcap_hf, by its path or name, is matched
    as that version matched it, to `older` ([`_older_trained_from`]); None where it differs from it without naming
    another model, which cannot be checked.
    """
    if not isinstance(recorded, dict) or recorded.get("dataset") != expected["dataset"]:
        return False
    verdicts = []
    for part in ("vision_model", "text_model"):
        identity = recorded.get(part)
        if not _is_path_or_name(identity):
            verdicts.append(same_model(identity, expected[part]) is True)
        elif identity == older[part]:
            verdicts.append(True)
        else:  # another Hub name is another model; another path may hold the same one
            verdicts.append(False if same_model(identity, expected[part]) is False else None)
    return False if False in verdicts else None if None in verdicts else True


@contextlib.contextmanager
def _without_library_progress_bars() -> Iterator[None]:
    """Turn the progress bars of transformers (loading, saving weights) and datasets (`map`) off, and back on
    afterwards where they were on."""
    transformers_bars = transformers_logging.is_progress_bar_enabled()
    datasets_bars = not datasets.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if transformers_bars:
            transformers_logging.enable_progress_bar()
        if datasets_bars:
            datasets.enable_progress_bars()


def run_ablation(
    output_dir: str | os.PathLike, config: AblationConfig | None = None, data: AblationData | None = None,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """
    Train and score every run of the grid (skipping finished ones), then write `results.csv`, `results.md` and the
    figures `prefix_length_METRIC.png` into `output_dir`. `data` is a dataset of your own, for a `config` that names
    the pretrained parts; without it (and them) the grid runs on the synthetic shapes task.

    Returns:
        `list[dict]`: each run's record (its settings, budget, trainable parameters, training time and loss, scores).
    """
    config = config or AblationConfig()
    require_pycocoevalcap()  # before any training, not after it
    if config.plot_metrics:
        _matplotlib()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if data is None and config.vision_models:
        raise ValueError("A grid over your own vision towers needs your dataset too (`data`, --train-file).")
    if data is not None and not config.vision_models:
        raise ValueError(
            "A dataset of your own needs the pretrained parts the grid starts from: give the config's `vision_models` "
            "and `text_model` (--vision-models, --text-model)."
        )
    # Quiet: the libraries' bars too, for this grid only.
    with contextlib.nullcontext() if verbose else _without_library_progress_bars():
        if data is None:
            config, data = shapes_task(output_dir, config, verbose)
        data_fingerprint = dataset_fingerprint(data)
        rows_fingerprint = cache(partial(dataset_fingerprint, data, image_files=False))
        runs = grid_runs(config)
        finished = [
            _finished_record(run, config, output_dir, data_fingerprint, rows_fingerprint) for run in runs
        ]
        _check_prefix_lengths(config, [run for run, record in zip(runs, finished) if record is None], data)
        records, embeddings = [], {}
        for run, record in tqdm(list(zip(runs, finished)), desc="Ablation runs", disable=not verbose):
            if record is None:
                run_dir = output_dir / "runs" / run.name
                record = train_and_score(run, data, config, run_dir, embeddings, data_fingerprint, verbose)
            records.append({"name": run.name, **record})
        write_results(output_dir, records, config.plot_metrics)
    return records


def _finished_record(
    run: AblationRun, config: AblationConfig, output_dir: Path, data_fingerprint: str,
    rows_fingerprint: Callable[[], str],
) -> dict[str, Any] | None:
    """
    A run's record if it finished before and can be reused (refused if trained otherwise); None to train it.
    `rows_fingerprint()` is the dataset's fingerprint as an older clipcap_hf took it, without the image files.
    """
    run_dir = output_dir / "runs" / run.name
    scores_path = run_dir / SCORES_FILE
    if not scores_path.is_file():
        return None
    record = read_json(scores_path)
    check_finished_run(record, run_dir, budget(config, run), "budget", _same_budget)
    older = _older_trained_from(run, config)
    origin = trained_from(run, config, data_fingerprint)
    recorded = record.get("trained_from")
    recorded_data = recorded.get("dataset") if isinstance(recorded, dict) else None
    files_unrecorded = recorded_data != data_fingerprint and recorded_data == rows_fingerprint()
    if files_unrecorded:  # its pretrained parts are checked still: a run from others is refused, not trained over
        origin["dataset"] = recorded_data
    check_finished_run(record, run_dir, origin, "trained_from", partial(_same_origin, older=older), older)
    if files_unrecorded:
        # Its rows are this grid's, but whether its image files are cannot be told: trained again, as cheaper than
        # a table that may hold a run on other pictures.
        logger.warning(
            f"{run.name}: finished before, but its record identifies the dataset by its rows only (an older "
            "clipcap_hf), not by its image files, which may have been replaced since; training it again."
        )
        return None
    scoring = caption_tokenization()
    if record.get("scoring") != scoring:
        # Its predictions are not saved (5 samples only), so it cannot be rescored: trained again, so that one table
        # never mixes two ways of scoring.
        logger.warning(
            f"{run.name}: finished before, but scored on captions tokenized "
            f"{record.get('scoring', 'not at all (by an older clipcap_hf)')}, not {scoring} as this grid scores them; "
            "training it again."
        )
        return None
    if any(_is_path_or_name(recorded[part]) and recorded[part] != origin[part] for part in older):
        logger.warning(
            f"{run.name}: reused on an older clipcap_hf's record of its pretrained parts, by path or Hub name "
            f"({recorded}), which are this grid's; their content was not recorded, so a part trained again in place "
            "since then would go unnoticed."
        )
    logger.info(f"{run.name}: finished before, skipped.")
    return record


def _check_prefix_lengths(config: AblationConfig, runs: list[AblationRun], data: AblationData) -> None:
    """Refuse, before the first run trains, prefix lengths that leave the language model too few positions for the
    training captions."""
    if not runs:
        return
    # `~` expanded as training expands it; no code from the folder runs.
    text_config = AutoConfig.from_pretrained(local_folder(config.text_model), trust_remote_code=False)
    positions = getattr(text_config, "max_position_embeddings", None)
    if isinstance(positions, int):  # else rotary or ALiBi positions: no table to run past
        # The tokenizer is the language model's, whichever tower the processor is built with.
        def processor():
            return ClipCapProcessor.from_vision_text_pretrained(runs[0].vision_model, config.text_model)

        _refuse_long_prefixes(
            [run.prefix_length for run in runs], positions, f"the language model {config.text_model}",
            data.train, processor, config.max_caption_length,
        )


def _refuse_long_prefixes(
    prefix_lengths: Sequence[int], positions: int, described: str, captions: datasets.Dataset,
    processor: Callable[[], ClipCapProcessor], max_caption_length: int,
) -> None:
    """
    Refuse prefix lengths that with the longest of the training `captions` (EOS included, cut to `max_caption_length`,
    as the collator gives them) need more than the `positions` of the language model (`described`): `clipcap train`'s
    rule (`run._check_context_length`). A run past them fails part-way, in the middle of the grid. `processor` builds
    the processor that measures them, only when some caption could reach past them.
    """
    if max(prefix_lengths) + max_caption_length <= positions:
        return  # no caption can reach past them: not measured
    captions = captions.select_columns("caption")
    longest = max(add_caption_lengths(captions, processor(), max_caption_length)[0]["length"])
    too_long = sorted({length for length in prefix_lengths if length + longest > positions})
    if too_long:
        room = positions - longest
        fix = f"Give prefix lengths of {room} or less" if room > 0 else "Cut the captions shorter (max_caption_length)"
        raise ValueError(
            f"Prefix lengths {too_long} (--prefix-lengths) leave too few positions for the captions: {described} has "
            f"{positions} (max_position_embeddings), and the longest training caption takes {longest} (EOS included; "
            f"the runs cut captions at {max_caption_length} tokens). {fix}; nothing was trained."
        )


# ---------------------------------------------------------------------------------------------------------------------
# The table and the figures

_COLUMNS = ("name", "vision_model", "mapping_type", "language_model", "prefix_length", "trainable_parameters",
            "train_seconds", "train_loss")


def _rows(records: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The table's columns (the settings, then every score any run has) and one flat row per run record."""
    metric_names = list(dict.fromkeys(name for record in records for name in record["scores"]))
    rows = []
    for record in records:
        row = {**record["run"], **{name: record[name] for name in _COLUMNS if name in record}}
        row["vision_model"] = tower_name(row["vision_model"])
        row.update(record["scores"])
        rows.append(row)
    return [*_COLUMNS, *metric_names], rows


def results_csv(records: list[dict[str, Any]]) -> str:
    """The table as CSV, one row per run, scores as the metrics give them (0 to 1)."""
    columns, rows = _rows(records)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def results_markdown(records: list[dict[str, Any]]) -> str:
    """The scores ×100 (as captioning papers give them), one row per run."""
    columns, rows = _rows(records)
    metrics = columns[len(_COLUMNS):]
    header = ["vision", "mapper", "LM", "prefix", "trainable params", "train s", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["vision_model"], row["mapping_type"], row["language_model"], str(row["prefix_length"]),
                 f"{row['trainable_parameters']:,}", f"{row['train_seconds']:.1f}"]
        cells += [f"{100 * row[name]:.1f}" if name in row else "" for name in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_prefix_lengths(records: list[dict[str, Any]], metric: str, path: str | os.PathLike) -> Path:
    """Score against prefix length, one line per vision tower, mapper and language model mode (PNG)."""
    plt = _matplotlib()

    _, rows = _rows(records)
    several_towers = len({row["vision_model"] for row in rows}) > 1
    lines: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if metric in row:
            label = f"{row['mapping_type']}, {row['language_model']} LM"
            if several_towers:
                label = f"{row['vision_model']}: {label}"
            lines.setdefault(label, []).append((row["prefix_length"], 100 * row[metric]))
    figure, axes = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for label, points in sorted(lines.items()):
        points.sort()
        axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    prefix_lengths = sorted({row["prefix_length"] for row in rows})
    axes.set_xscale("log", base=2)
    axes.set_xticks(prefix_lengths, [str(length) for length in prefix_lengths])
    axes.set_xlabel("prefix length")
    axes.set_ylabel(f"{metric} (×100)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    try:
        write_atomically(path, lambda file: figure.savefig(file, format="png"))
    finally:
        plt.close(figure)
    return path


def _matplotlib():
    """`matplotlib.pyplot`, drawing to files only; an ImportError naming the install if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            'The ablation figures need matplotlib: `pip install matplotlib` (or "clipcap_hf[ablate]"), or ask for no '
            "figures (`plot_metrics=()`)."
        ) from error
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def figure_path(output_dir: Path, metric: str) -> Path:
    """Where the figure of `metric` against the prefix length goes."""
    return output_dir / f"prefix_length_{metric}.png"


def write_results(output_dir: Path, records: list[dict[str, Any]], plot_metrics: Sequence[str]) -> list[Path]:
    """
    `results.csv`, `results.md` and one `prefix_length_METRIC.png` per metric; returns the written paths. The figures
    of the other metrics an earlier grid drew there are removed: they would show runs the table no longer holds.
    """
    written = [output_dir / "results.csv", output_dir / "results.md"]
    write_text_atomically(written[0], results_csv(records))
    write_text_atomically(written[1], results_markdown(records))
    for metric in plot_metrics:
        written.append(plot_prefix_lengths(records, metric, figure_path(output_dir, metric)))
    for metric in PLOTTABLE_SCORES:  # only the figures this module names: other files are the user's
        if metric not in plot_metrics:
            figure_path(output_dir, metric).unlink(missing_ok=True)
    return written


__all__ = [
    "AblationConfig", "AblationData", "AblationRun", "caption_task", "run_ablation", "shapes_task", "write_results"
]
