"""The quickstart (`clipcap quickstart`): train a small ClipCap from scratch on a built-in synthetic task, offline.

The task: images of one shape (square, ring, cross, triangle) in one of six colours at one of five positions,
with jittered size, place, hue and background, captioned "a red ring in the top left". A fifth of the
colour-shape-position combinations never appear in training: the `test` split holds only those, so its scores
measure whether the model composes attributes it learnt separately; `test_seen` holds new images of the training
combinations, for comparison.

No pretrained weights are reachable offline, so everything is trained here: the CLIP vision tower (unfrozen, unlike
real ClipCap training), the MLP mapper and a small GPT-2, with a byte-level BPE tokenizer built from the training
captions. The saved folder loads with `ClipCapForConditionalGeneration.from_pretrained`, `pipeline()` and
`clipcap caption`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import CLIPVisionConfig, GPT2Config, GPT2TokenizerFast

from ..configuration_clipcap import ClipCapConfig
from ..data import ClipCapDataCollator
from ..evaluation.metrics import compute_caption_metrics
from ..image_processing_clipcap import ClipCapImageProcessor
from ..modeling_clipcap import ClipCapForConditionalGeneration
from ..processing_clipcap import ClipCapProcessor
from ..utils.file_utils import check_output_folder, holds_clipcap_model, save_pretrained, write_text_atomically
from .trainer import caption_dataset, scratch_trainer, scratch_training_arguments

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 80, 215),
    "yellow": (230, 205, 40),
    "purple": (135, 60, 170),
    "orange": (240, 135, 30),
}
SHAPES = ("square", "ring", "cross", "triangle")
# Centre of each position, as fractions of the image side.
POSITIONS = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
EOS_TOKEN = "<|endoftext|>"
IMAGE_TOKEN = "<image>"


@dataclass
class QuickstartConfig:
    """Sizes of the synthetic dataset, the model and the training run (the defaults take a few minutes on 2 cores)."""

    train_images_per_combination: int = 16
    test_images_per_combination: int = 4
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 64
    num_layers: int = 2
    prefix_length: int = 4
    # CLIP starts position embeddings at a 14th of the patch embeddings' scale, which in a short run from scratch
    # leaves "where" to be learnt long after "what"; starting them larger makes positions come as early as shapes.
    position_embedding_scale: float = 3.0
    max_steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0


def is_held_out(colour: str, shape: str, position: str) -> bool:
    """
    Whether a combination belongs to the test split: one position per colour-shape pair (a fifth of all), chosen so
    that every colour-shape, colour-position and shape-position pair still occurs in training.
    """
    return (list(COLOURS).index(colour) + SHAPES.index(shape) + list(POSITIONS).index(position)) % 5 == 0


def caption_for(colour: str, shape: str, position: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} in the {position}"


def render_shape(colour: str, shape: str, position: str, rng: np.random.Generator, size: int = 32) -> PIL.Image.Image:
    """Draw one shape with random jitter of place, size, colour and background."""
    background = tuple(int(value) for value in rng.integers(190, 256, 3))
    image = PIL.Image.new("RGB", (size, size), background)
    draw = PIL.ImageDraw.Draw(image)
    centre_x, centre_y = POSITIONS[position]
    x = (centre_x + rng.uniform(-0.06, 0.06)) * size
    y = (centre_y + rng.uniform(-0.06, 0.06)) * size
    r = rng.uniform(0.16, 0.22) * size
    fill = tuple(int(np.clip(value + rng.integers(-20, 21), 0, 255)) for value in COLOURS[colour])
    if shape == "square":
        draw.rectangle([x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r], fill=fill)
    elif shape == "ring":
        draw.ellipse([x - r, y - r, x + r, y + r], outline=fill, width=max(2, round(0.4 * r)))
    elif shape == "cross":
        draw.rectangle([x - r, y - 0.35 * r, x + r, y + 0.35 * r], fill=fill)
        draw.rectangle([x - 0.35 * r, y - r, x + 0.35 * r, y + r], fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + 0.8 * r), (x + r, y + 0.8 * r)], fill=fill)
    return image


def make_shapes_dataset(
    train_images_per_combination: int = 16, test_images_per_combination: int = 4, image_size: int = 32, seed: int = 0
) -> datasets.DatasetDict:
    """
    The synthetic dataset, one caption per image: `train` (the seen combinations), `test` (the held-out combinations)
    and `test_seen` (one new image of each seen combination, to compare with).
    """
    rng = np.random.default_rng(seed)
    columns = {split: {"image_id": [], "image": [], "caption": []} for split in ("train", "test", "test_seen")}
    for colour in COLOURS:
        for shape in SHAPES:
            for position in POSITIONS:
                if is_held_out(colour, shape, position):
                    counts = {"test": test_images_per_combination}
                else:
                    counts = {"train": train_images_per_combination, "test_seen": 1}
                for split, count in counts.items():
                    rows = columns[split]
                    for _ in range(count):
                        rows["image_id"].append(f"{split}-{len(rows['image_id']):05d}")
                        rows["image"].append(render_shape(colour, shape, position, rng, image_size))
                        rows["caption"].append(caption_for(colour, shape, position))
    features = datasets.Features(
        {"image_id": datasets.Value("string"), "image": datasets.Image(), "caption": datasets.Value("string")}
    )
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(rows, features=features) for split, rows in columns.items()}
    )


# The language model's positions: image tokens, caption and EOS (`clipcap ablate` checks its prefix lengths against it).
TEXT_POSITIONS = 64


def build_tokenizer(captions: list[str]) -> GPT2TokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's scheme) learnt from the captions; EOS ends every caption."""
    bpe = ByteLevelBPETokenizer()
    # 256 byte tokens plus enough merges to make every caption word one token.
    bpe.train_from_iterator(captions, vocab_size=512, min_frequency=1, special_tokens=[EOS_TOKEN])
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN
    )
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)  # where the processor puts the prefix
    return tokenizer


def build_model(tokenizer: GPT2TokenizerFast, config: QuickstartConfig) -> ClipCapForConditionalGeneration:
    """A small ClipCap with every part trainable, the vision tower included."""
    width = config.hidden_size
    vision_config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=config.num_layers,
        num_attention_heads=4,
        image_size=config.image_size,
        patch_size=config.patch_size,
        projection_dim=width,
    )
    # No dropout: the data is clean and the run short.
    text_config = GPT2Config(
        n_layer=config.num_layers,
        n_embd=width,
        n_head=4,
        n_positions=TEXT_POSITIONS,
        vocab_size=len(tokenizer),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(config.seed)
    model = ClipCapForConditionalGeneration(
        ClipCapConfig(
            vision_config=vision_config,
            text_config=text_config,
            prefix_length=config.prefix_length,
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        )
    )
    model.freeze_vision_model(False)
    embeddings = model.vision_model.vision_model.embeddings
    with torch.no_grad():
        patch_scale = embeddings.patch_embedding(torch.randn(1, 3, config.image_size, config.image_size)).std()
        embeddings.position_embedding.weight.normal_(std=config.position_embedding_scale * float(patch_scale))
    model.generation_config.max_new_tokens = 16
    return model


def score_captions(predictions: list[str], references: list[str]) -> dict[str, float]:
    """
    Exact match, and the share of captions naming the right colour, shape and position (each attribute read as the
    word(s) of that kind in the prediction; a caption naming none or two of a kind is wrong for it).
    """
    scores = {"exact_match": float(np.mean([p == r for p, r in zip(predictions, references)]))}
    for name, vocabulary in (("colour", COLOURS), ("shape", SHAPES), ("position", POSITIONS)):
        correct = []
        for prediction, reference in zip(predictions, references):
            found = [word for word in vocabulary if f" {word}" in f" {prediction}"]
            # "top left" also contains no other position name, so substring search is unambiguous here.
            correct.append(found == [word for word in vocabulary if f" {word}" in f" {reference}"])
        scores[f"{name}_accuracy"] = float(np.mean(correct))
    try:
        bleu = compute_caption_metrics(
            dict(enumerate(predictions)), {i: [r] for i, r in enumerate(references)}, metrics=["bleu"], tokenize=False
        )
        scores["bleu_4"] = bleu["Bleu_4"]
    except ImportError:  # pycocoevalcap is an optional extra
        pass
    return scores


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """
    Say before training, not after it, that the model cannot be saved in `output_dir`: it must be a folder that can
    be written, or be creatable in one. A folder with files in it is written into only with `overwrite`, and only if
    it holds a ClipCap model, so that no one's other files are written over by accident.
    """
    check_output_folder(output_dir, "--output-dir", "save the model in")
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return
    if not overwrite:
        raise ValueError(
            f"{output_dir} is not empty; choose another folder, remove it, or pass overwrite=True (--overwrite) to "
            "replace the model in it."
        )
    if not holds_clipcap_model(output_dir):
        raise ValueError(
            f"Refusing to write into {output_dir}: overwrite=True (--overwrite) only writes over a ClipCap "
            f"model, and {output_dir / 'config.json'} does not say model_type 'clipcap'. Remove it yourself or "
            "choose another folder."
        )


def run_quickstart(
    output_dir: str | os.PathLike, config: QuickstartConfig | None = None, verbose: bool = True, overwrite: bool = False
) -> dict:
    """
    Build the dataset, train, caption the held-out test split, save the model and processor to `output_dir`.

    `output_dir` must be new or empty, or, with `overwrite`, hold a ClipCap model: the new model's files are written
    over its files (the earlier run's `quickstart_config.json` and `held_out_scores.json` are removed first), and
    files the new run does not write stay. This, and that the folder can be written or created, is checked before
    training.

    Returns:
        `unseen_combinations` and `seen_combinations`: the scores (see [`score_captions`]) and `num_images` of the
        two test splits; `train_seconds`; `samples`, a few (prediction, reference) pairs of unseen combinations.
    """
    config = config or QuickstartConfig()
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    splits = make_shapes_dataset(
        config.train_images_per_combination, config.test_images_per_combination, config.image_size, config.seed
    )
    tokenizer = build_tokenizer(splits["train"]["caption"])
    image_processor = ClipCapImageProcessor(size=config.image_size, crop_size=config.image_size)
    processor = ClipCapProcessor(
        image_processor, tokenizer, num_image_tokens=config.prefix_length, image_token=IMAGE_TOKEN
    )
    model = build_model(tokenizer, config)

    # The images are tiny and reused every epoch: preprocess them once rather than in every batch.
    pixel_features = splits["train"].features.copy()
    del pixel_features["image"]
    pixel_features["pixel_values"] = datasets.Array3D((3, config.image_size, config.image_size), "float32")
    train = (
        splits["train"]
        .map(
            lambda rows: processor.image_processor(rows["image"], return_tensors="np"),
            batched=True,
            remove_columns=["image"],
            features=pixel_features,
        )
        .with_format("numpy", columns=["pixel_values"], output_all_columns=True)
    )
    # The Trainer writes only scratch files here (no checkpoints are saved); none belong in `output_dir`.
    with tempfile.TemporaryDirectory(prefix="clipcap-quickstart-") as scratch:
        args = scratch_training_arguments(
            scratch,
            max_steps=config.max_steps,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            logging_steps=max(1, config.max_steps // 10),
            seed=config.seed,
            verbose=verbose,
            weight_decay=config.weight_decay,
        )
        collator = ClipCapDataCollator(processor)
        result = scratch_trainer(model, args, train, collator).train()

    scores: dict[str, Any] = {"train_seconds": round(result.metrics["train_runtime"], 1)}
    for split, name in (("test", "unseen_combinations"), ("test_seen", "seen_combinations")):
        predictions = caption_dataset(model, processor, splits[split], batch_size=64)
        references = splits[split]["caption"]
        scores[name] = score_captions(predictions, references)
        scores[name]["num_images"] = len(references)
        if split == "test":
            scores["samples"] = list(zip(predictions, references))[:: max(1, len(references) // 8)][:8]

    records = {"quickstart_config.json": asdict(config), "held_out_scores.json": scores}
    # An earlier run's records go before the new weights come, so that a run stopped between the two never leaves
    # the new model beside the old run's settings and scores.
    for name in records:
        (output_dir / name).unlink(missing_ok=True)
    save_pretrained(output_dir, model, processor)
    for name, record in records.items():
        write_text_atomically(output_dir / name, json.dumps(record, indent=2))
    if verbose:
        print_report(scores, output_dir)
    return scores


def print_report(scores: dict, output_dir: Path) -> None:
    unseen, seen = scores["unseen_combinations"], scores["seen_combinations"]
    print(f"\nAfter {scores['train_seconds']} s of training, on new images of")
    print(f"  {'':18s} {'unseen combinations':>20s} {'seen combinations':>20s}")
    print(f"  {'(images)':18s} {unseen['num_images']:>20d} {seen['num_images']:>20d}")
    for name in ("exact_match", "colour_accuracy", "shape_accuracy", "position_accuracy", "bleu_4"):
        if name in unseen:
            print(f"  {name:18s} {unseen[name]:>20.3f} {seen[name]:>20.3f}")
    if "bleu_4" not in unseen:  # `score_captions` leaves it out without pycocoevalcap
        print(f"  {'bleu_4':18s} needs pycocoevalcap: pip install \"clipcap_hf[eval]\"")
    print("\nSample captions of unseen combinations (generated | reference):")
    for prediction, reference in scores["samples"]:
        print(f"  {'OK ' if prediction == reference else '   '} {prediction!r:40s} | {reference!r}")
    print(f"\nSaved to {output_dir}. Caption an image with:\n  clipcap caption IMAGE --model {output_dir}")


__all__ = ["QuickstartConfig", "make_shapes_dataset", "run_quickstart", "score_captions"]
