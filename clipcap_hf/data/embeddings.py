"""Embeddings folders: each unique image's CLIP embedding computed once and stored on disk, memory-mapped when read.

[`embed_source`] writes the folder (`clipcap embed`, and `clipcap train` on a raw source), shared by all processes of a
distributed run; [`load_embeddings`] reads it as one memory-mapped `datasets.Dataset`, and [`check_embeddings`]
checks that it was computed with a given vision tower and preprocessing. [`embed_images`] does the same for a caption
dataset held in memory (the rows of a loader) and returns its embedding table as a tensor: training from embeddings
never runs the vision tower.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..utils.bad_images import BadImagePolicy, check_bad_image_policy
from ..utils.file_utils import FileLocksUnsupportedError, acquire_file_lock, read_json, write_text_atomically
from ..utils.memory import reuse_freed_memory
from ..utils.settings_diff import changed_settings
from .loaders import PathLike, _image_keys, _rebuild, _splits
from .sources import SHARD_COLUMN, SOURCE_ROW_COLUMN, WEBDATASET_KEY, decode_image, describe_image_error, read_stream

logger = logging.get_logger(__name__)

# Images per shard written during an embedding pass: an interrupted pass keeps all but the last few thousand.
EMBEDDING_SHARD_SIZE = 4096
# In a shard's folder: the keys of the images its batches could not read (see `_batches_to_embed`), when there are any.
UNREADABLE_KEYS_NAME = "unreadable_keys.json"


def vision_fingerprint(model, image_processor) -> str:
    """
    A hash of everything that determines an image's embedding: the vision tower's weights (names, dtypes, values),
    which tower it is (the ClipCap config's `vision_backend`, `vision_pooling` and the vision config's model type)
    and the image processor's settings. Any change gives another fingerprint, hence another cache.

    The weights are hashed under their names and layout in the tower's checkpoints (see [`_checkpoint_state_dict`]),
    so one tower has one fingerprint under transformers 4 and 5.

    Args:
        model: a [`ClipCapForConditionalGeneration`] (its `vision_model` and `config` are read).
        image_processor: the preprocessing the embeddings are computed with.
    """
    return _fingerprint(model, image_processor, _checkpoint_state_dict(model))


def _accepted_fingerprints(model, image_processor) -> Iterator[str]:
    """
    The fingerprints an embeddings folder of this tower and preprocessing may carry, lazily (each hashes the weights):
    [`vision_fingerprint`], then, where transformers holds the weights under other names than its checkpoints (5.x:
    ViT, SigLIP, DINOv2), the one that clipcap_hf gave them under those names before, which its folders written then
    carry (a training cache's folder is named by its first 16 hex digits).
    """
    checkpoint = _checkpoint_state_dict(model)
    yield _fingerprint(model, image_processor, checkpoint)
    in_memory = _own_state_dict(model)
    if in_memory.keys() != checkpoint.keys():
        yield _fingerprint(model, image_processor, in_memory)


def _fingerprint(model, image_processor, state_dict: dict[str, torch.Tensor]) -> str:
    """[`vision_fingerprint`] of the tower's weights given as `state_dict`."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(_vision_tower(model.config), sort_keys=True).encode())
    # Only preprocessing settings: save_pretrained adds `auto_map` (and transformers 4 `_processor_class`), which
    # would otherwise give a saved and reloaded processor another fingerprint and recompute the whole cache.
    settings = {
        key: value
        for key, value in image_processor.to_dict().items()
        if "processor_class" not in key and key != "auto_map"
    }
    digest.update(type(image_processor).__name__.encode())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _own_state_dict(model) -> dict[str, torch.Tensor]:
    """The vision tower's weights as it holds them, less an open_clip tower's buffers computed from its config."""
    # Those buffers (see `ClipCapOpenClipVisionModel.computed_buffers`) are left out: towers saved before they were
    # saved lack them, and their embeddings folders keep their fingerprint.
    computed = getattr(model.vision_model, "computed_buffers", frozenset())
    return {name: tensor for name, tensor in model.vision_model.state_dict().items() if name not in computed}


# transformers 5 holds some towers' weights under other names than their checkpoints (which it converts on loading and
# saving), and DINOv2's SwiGLU input projection as two halves; transformers 4 holds them as the checkpoints do. By the
# vision config's model type: the renamings (applied in turn, none matching a checkpoint name) that give the checkpoint
# names back. Names rather than the weights' order, which transformers 5 changed too (ViT's layer norms, DINOv2's
# register tokens); and the names of transformers 4 keep the fingerprints of the folders written with it.
_DINOV2_NAMES = (
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.down_proj\.", ".mlp.weights_out."),
)
_CHECKPOINT_NAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "vit": (
        (r"^layers\.", "encoder.layer."),
        *_DINOV2_NAMES[:4],
        (r"\.mlp\.fc1\.", ".intermediate.dense."),
        (r"\.mlp\.fc2\.", ".output.dense."),
    ),
    "dinov2": _DINOV2_NAMES,
    "dinov2_with_registers": _DINOV2_NAMES,
    "siglip_vision_model": ((r"^(?!vision_model\.)", "vision_model."),),
    "siglip2_vision_model": ((r"^(?!vision_model\.)", "vision_model."),),
}
# transformers 5's halves of DINOv2's SwiGLU input projection, `weights_in` in its checkpoints (gate rows first).
_SWIGLU_HALF = re.compile(r"(.*\.mlp\.)(gate|up)_proj\.(weight|bias)")


def _checkpoint_state_dict(model) -> dict[str, torch.Tensor]:
    """The vision tower's weights (see [`_own_state_dict`]) under the names and in the layout of its checkpoints."""
    state_dict = _own_state_dict(model)
    vision = _vision_tower(model.config)
    if vision["vision_backend"] == "open_clip" or vision["vision_model_type"] not in _CHECKPOINT_NAMES:
        return state_dict
    converted = {}
    for name, tensor in state_dict.items():
        half = _SWIGLU_HALF.fullmatch(name)
        if half and half[2] == "up":  # joined to its gate half
            continue
        if half:
            prefix, kind = half[1], half[3]
            name, tensor = f"{prefix}weights_in.{kind}", torch.cat([tensor, state_dict[f"{prefix}up_proj.{kind}"]])
        for pattern, replacement in _CHECKPOINT_NAMES[vision["vision_model_type"]]:
            name = re.sub(pattern, replacement, name)
        converted[name] = tensor
    return converted


# Keys of a tower's config that cannot change an embedding, left out when `check_embeddings` compares the others: names,
# versions and dtypes (the weights' dtypes are fingerprinted), other tasks' labels, initialisation, dropouts (off when
# embedding), the outputs asked for and the attention kernel.
_NOT_COMPUTATION_SETTING = re.compile(
    r"^_|name_or_path|version|dtype|architectures|initializer|dropout|drop_path|label|^output_|return_dict|"
    r"problem_type|chunk_size_feed_forward|encoder_stride|attn_implementation"
)


def _vision_tower(config) -> dict[str, str | None]:
    """Which vision tower a ClipCap config describes, besides its weights."""
    return {
        "vision_backend": getattr(config, "vision_backend", None),
        "vision_pooling": getattr(config, "vision_pooling", None),
        "vision_model_type": getattr(getattr(config, "vision_config", None), "model_type", None),
    }


def image_cache_key(path: str) -> str:
    """
    The embedding cache's key of an image file: its absolute path, size and modification time (in nanoseconds), so
    that a file replaced at the same path is embedded again, without hashing the content of every file.
    """
    try:
        stat = os.stat(path)
    except OSError:  # a missing file fails to load and is reported; its key only needs to be stable
        return path
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


# ---------------------------------------------------------------------------------------------------------------------
# The embeddings folder of `clipcap embed`: every unique image of a source embedded once, across all processes

EMBEDDINGS_VERSION = 2
EMBEDDINGS_INFO_NAME = "embeddings_info.json"
LEGACY_CACHE_INFO_NAME = "cache_info.json"
# Columns of the embeddings folder; a source's other columns may be kept beside them (`keep_columns`).
KEY_COLUMN, EMBEDDING_COLUMN, CAPTIONS_COLUMN = "image_key", "embedding", "captions"


def load_embeddings(directory: PathLike) -> datasets.Dataset:
    """
    The embeddings folder written by `clipcap embed` (or by `clipcap train` on a raw source) as one memory-mapped
    `datasets.Dataset`: `image_key`, `embedding` (float32, `embedding_dim` values), `captions` when the source had
    captions, and the source columns kept with `--keep_columns`. Nothing is read into memory until used.

    Its description (vision tower fingerprint, preprocessing, counts) is [`load_embeddings_info`]. A folder of an
    earlier version (the embedding cache before `clipcap embed`) is refused with the command that rebuilds it.

    It may be read while a run writes into the folder: it then holds the shards complete so far. A shard that a run is
    rewriting (to drop the rows of replaced image files) is read before or after its rewrite, never missed: the read
    waits for the rewrite (one shard's), and gives up with a `TimeoutError` naming the folder after 5 minutes.
    """
    directory = Path(directory)
    load_embeddings_info(directory)  # checks the folder
    shards = _open_shards(directory)
    if not shards:
        raise ValueError(f"{directory} holds no embeddings yet; run `clipcap embed` (or let it finish) first.")
    return datasets.concatenate_datasets(shards)


def load_embeddings_info(directory: PathLike) -> dict[str, Any]:
    """
    The info file of an embeddings folder: `version`, `fingerprint` (see [`vision_fingerprint`]), `vision` (the
    tower: backend, pooling, model type, class, config, open_clip model config), `image_processor` (its settings),
    `embedding_dim`, `columns`, `source`, and when the pass is complete `num_images`, `num_shards`, `num_skipped`
    (unreadable images left out) and `num_replaced` (rows of replaced image files that the pass dropped).
    """
    directory = Path(directory)
    info_path = directory / EMBEDDINGS_INFO_NAME
    if not info_path.exists():
        legacy = (directory / LEGACY_CACHE_INFO_NAME).exists() or any(directory.glob(f"*/{LEGACY_CACHE_INFO_NAME}"))
        if legacy:
            raise ValueError(
                f"{directory} is an embedding cache of an earlier version of clipcap_hf (image keys and embeddings, "
                "no captions, no info file), which cannot be read as an embeddings folder. Rebuild it from its source: "
                "`clipcap embed --model MODEL --train_file SOURCE --output NEW_FOLDER`, or in Python `embed_source("
                "load_image_source(data_files=SOURCE), model, image_processor, NEW_FOLDER)` (or train from the source "
                "itself); the old folder can then be deleted."
            )
        raise FileNotFoundError(
            f"{directory} is no embeddings folder (it has no {EMBEDDINGS_INFO_NAME}); write one with `clipcap embed` "
            "or `embed_source`."
        )
    info = read_json(info_path)
    if info.get("version") != EMBEDDINGS_VERSION:
        raise ValueError(
            f"{directory} was written by another version of clipcap_hf (format {info.get('version')}, this one reads "
            f"{EMBEDDINGS_VERSION}); rebuild it with `clipcap embed` or `embed_source`."
        )
    return info


def check_embeddings(directory: PathLike, model, image_processor, finished: bool = False) -> dict[str, Any]:
    """
    The folder's info, after checking that `model`'s vision tower and `image_processor` computed it and, with
    `finished`, that its `clipcap embed` pass has finished (a folder read as a whole dataset must hold all of it).
    """
    info = load_embeddings_info(directory)
    fingerprints = _accepted_fingerprints(model, image_processor)
    fingerprint = next(fingerprints)
    if info["fingerprint"] != fingerprint and info["fingerprint"] not in fingerprints:
        raise ValueError(
            f"The embeddings in {directory} were computed with another vision tower or image preprocessing "
            f"({_describe_tower(info)}, fingerprint {info['fingerprint'][:16]}; this model's is {fingerprint[:16]}). "
            "Embed the source again with this model (`clipcap embed --model ... --output ANOTHER_FOLDER`)."
        )
    # Settings that change the tower's computation without changing a weight (an activation, a pooler's, open_clip's
    # quick_gelu), which the fingerprint leaves out: they are compared here instead, so that folders fingerprinted
    # before keep their fingerprint (and a training cache its folder name). Only what both record: a folder written
    # before the open_clip config was recorded is read as before.
    stored = {name: value for name, value in (info.get("vision") or {}).items() if name in _TOWER_SETTINGS}
    current = json.loads(json.dumps(_tower_settings(model), default=str))  # as the info file stores them
    changed = changed_settings(
        stored,
        current,
        lambda name, stored_value, value: f"{name} {stored_value!r} (this model's: {value!r})",
        shared_only=True,
        skip=_NOT_COMPUTATION_SETTING.search,
    )
    if changed:
        raise ValueError(
            f"The embeddings in {directory} were computed with the same vision weights but other settings: "
            f"{'; '.join(changed)}. Embed the images again with this model into another folder (`clipcap embed "
            "--output ANOTHER_FOLDER`; for training's cache, another --embedding_cache_dir or the folder deleted)."
        )
    if finished and info.get("num_images") is None:  # the counts are written when a pass ends
        raise ValueError(
            f"The embeddings in {directory} are from a `clipcap embed` pass that has not finished (it was stopped, "
            "or is still running), so they hold only part of the source: finish it (rerun the same `clipcap embed` "
            "command, which embeds only the images still missing) first."
        )
    return info


def embed_source(
    source: datasets.Dataset | datasets.IterableDataset,
    model,
    image_processor,
    output_dir: PathLike,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    on_bad_image: BadImagePolicy = "error",
    keep_columns: Sequence[str] = (),
    source_name: str | None = None,
    check_source: bool = False,
) -> dict[str, Any]:
    """
    Embed every unique image of a source (rows of [`load_image_source`]) once into an embeddings folder.

    In a distributed run (`torchrun`, `accelerate launch`: `torch.distributed` initialised) every process embeds its
    own share, the images whose key hashes to its rank, and writes its own shards, named
    `shard-rank<R>-of-<N>-<n>`; without one, one process embeds everything. All processes must see the one folder (on
    several machines: a shared filesystem); a process that does not is an error before any image is embedded. Shards
    are written whole under a temporary name and then renamed, every [`EMBEDDING_SHARD_SIZE`] images (whole batches),
    so a run that is killed keeps all but its last shard: a rerun reads the keys already stored and embeds only the
    others, in the batches an uninterrupted run puts them in (an embedding's last bits depend on its batch), so the
    folder holds the same values; it never stores an image twice, and removes the temporary shards the killed run left.
    Runs that share the folder (a sweep of `clipcap train` runs with one `--embedding_cache_dir`) take turns: a run
    that finds another one writing into it waits for it to finish, then embeds only the images still missing.
    An image file replaced at its path gets another key (see [`image_cache_key`]), so it is embedded again; the row
    of its earlier version is then removed, and the folder serves only the file's current content.
    Embeddings that are not finite (NaN or inf: a corrupt tower) stop the pass with a `ValueError` naming the batch's
    image keys; the batches embedded before it are kept.
    An image given by several rows (several captions, one per row) is embedded once, with all their captions; from
    an `IterableDataset` (read once, in order) with its first row's captions, and a warning counts the others.

    Args:
        source: the images: `image`, `image_key` and optionally `captions`.
        model: the [`ClipCapForConditionalGeneration`] whose vision tower embeds them.
        image_processor: its image processor.
        output_dir: the embeddings folder; one written with another tower or preprocessing is refused.
        batch_size: images per vision forward.
        device: where the vision tower runs; CUDA when available by default.
        num_workers: DataLoader workers that decode and preprocess images (map-style sources).
        on_bad_image: an unreadable image raises a `ValueError` naming its shard and key after the readable ones are
            stored (`"error"`), or is left out with a warning that counts them (`"skip"`).
        keep_columns: source columns to store beside the embeddings (from the image's first row).
        source_name: how the info file describes the source.
        check_source: for a folder that is trained from (`clipcap embed`): refuse a folder that stores images with
            other captions or kept values than this source gives them. A folder keeps each image's captions from the
            pass that embedded it, so after the captions were edited a rerun into the same folder would keep the old
            ones. New images (more shards, an image fixed since, another source) are embedded as usual; a streamed
            source is not read ahead, so it is not checked. Without it (an embedding cache) the folder's captions are
            not what training reads.

    Returns:
        The folder's info (see [`load_embeddings_info`]), with `num_images` and `num_shards`.
    """
    check_bad_image_policy(on_bad_image)
    missing = [name for name in (*keep_columns, "image", KEY_COLUMN) if name not in (source.features or {})]
    if missing:
        raise ValueError(
            f"The source has no column {missing[0]!r}; its columns are: {', '.join(source.features or {})}."
        )
    output_dir = Path(output_dir)
    rank, world_size = _process_rank(), _world_size()
    with _folder_lock(output_dir, rank, world_size):
        if rank == 0:  # before the other processes start writing: they wait in the check's gathers
            _remove_leftovers(output_dir)
        _check_shared_folder(output_dir, rank, world_size)
        has_captions = CAPTIONS_COLUMN in source.features
        keep_features = datasets.Features({name: source.features[name] for name in keep_columns})
        writer = _ShardWriter(output_dir, rank, world_size, has_captions, keep_features)
        previous: dict[str, Any] = {}  # the info of the run before, if any
        shards: list[Path] = []  # and its complete shards
        if (output_dir / EMBEDDINGS_INFO_NAME).exists() or (output_dir / LEGACY_CACHE_INFO_NAME).exists():
            previous = check_embeddings(output_dir, model, image_processor)
            stored_columns = previous["columns"]
            shards = _complete_shards(output_dir)
            if stored_columns != writer.columns and shards:
                raise ValueError(
                    f"The embeddings folder {output_dir} holds the columns {', '.join(stored_columns)}; this source "
                    f"would add {', '.join(writer.columns)}. Embed it into another folder (or with the same columns)."
                )
            # Shards whose kept columns differ in type do not concatenate: the folder would not load any more.
            stored = _load_shard(shards[0]).features if shards else {}
            retyped = [name for name in keep_columns if name in stored and stored[name] != keep_features[name]]
            if retyped:
                name = retyped[0]
                raise ValueError(
                    f"The embeddings folder {output_dir} stores --keep_columns {name} as {stored[name]}; this source "
                    f"gives it as {keep_features[name]}, and shards of both would not load together. Embed it into "
                    "another folder, or give the column the stored type."
                )
        stale = _stale_rows(shards, source, keep_columns) if check_source else None
        if stale is not None:
            raise ValueError(
                f"The embeddings folder {output_dir} stores {stale}. A folder keeps each image's captions from the "
                "pass that embedded it, and is trained from whole, so those rows would stay as they are: embed this "
                "source into a new --output (or delete the folder)."
            )
        info = _folder_info(model, image_processor, writer.columns, source_name)
        if rank == 0:
            write_text_atomically(output_dir / EMBEDDINGS_INFO_NAME, json.dumps(info, indent=2, default=str))
        done = _stored_keys(output_dir, rank, world_size)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model.vision_model.to(device).eval()
        repeated_rows: list[int] = []  # streaming: the caption counts of rows that repeat an image already embedded
        if isinstance(source, datasets.IterableDataset):
            batches = _iterable_batches(
                source, image_processor, done, rank, world_size, batch_size, keep_columns, repeated_rows, source_name
            )
        else:
            batches = _map_style_batches(
                source, image_processor, done, rank, world_size, batch_size, num_workers, keep_columns
            )
        problems: list[tuple[str, int]] = []
        non_finite: str | None = None  # why this process stopped early: the tower gave NaN or inf
        description = f"Embedding images (process {rank})" if world_size > 1 else "Embedding images"
        progress = tqdm(desc=description, unit="image")
        try:
            # On the CPU, the memory a batch frees serves the next (utils/memory.py): at 64 images CLIP's widest
            # activations are larger than glibc reuses by itself. CLIP ViT-B/32 on a 2-core AMD EPYC: 3.49 s a batch
            # instead of 3.75 (median of 9), with no page faults instead of about 150,000.
            with torch.no_grad(), reuse_freed_memory() if device.type == "cpu" else nullcontext():
                for pixel_values, records, batch_problems in batches:
                    problems.extend((line, num_captions) for line, num_captions, _ in batch_problems)
                    embeddings = None
                    if records:
                        pixel_values = pixel_values.to(device, model.vision_model.dtype)
                        embeddings = model.get_image_embeds(pixel_values).float().cpu()
                        # On the CPU copy, which the batch waits for anyway: one check per batch costs no extra sync.
                        if not torch.isfinite(embeddings).all():
                            non_finite = _non_finite_error(records, embeddings, model.vision_model.dtype)
                            break
                    writer.add(records, embeddings, [key for _, _, key in batch_problems])
                    progress.update(len(records) + len(batch_problems))
        finally:  # also on an error or Ctrl-C: what was embedded is kept
            progress.close()
            writer.flush()
        if repeated_rows:
            logger.warning(
                f"{len(repeated_rows)} streamed row(s) repeat an image already embedded; streaming keeps each image's "
                f"first row's captions, so their {sum(repeated_rows)} caption(s) are not stored. To store them, "
                "embed the source without --streaming into a new --output (this folder keeps the captions it stores)."
            )
        # Gathered from every process, each done writing: a process that stopped early stops them all, with its reason.
        gathered = _all_gather((problems, non_finite, writer.num_written))
        problems = [problem for process_problems, _, _ in gathered for problem in process_problems]
        non_finite = next((reason for _, reason, _ in gathered if reason is not None), None)
        # Skipped when no row was added since a completed pass that dropped them (its info counts them): a rerun over a
        # large folder with nothing new to embed reads no key.
        num_replaced = 0
        if rank == 0 and (any(written for _, _, written in gathered) or "num_replaced" not in previous):
            num_replaced = _drop_replaced_files(output_dir)
        _barrier()
        if non_finite is not None:
            raise ValueError(non_finite)
        lines = [line for line, _ in problems]
        report = "\n".join(lines[:10]) + (f"\n  ... and {len(lines) - 10} more" if len(lines) > 10 else "")
        if problems and on_bad_image == "error":
            raise ValueError(
                f"{len(problems)} image(s) cannot be read; the readable ones are stored in {output_dir}. Fix or remove "
                f"them, or skip them (`--on_bad_image skip`, `on_bad_image=\"skip\"`):\n{report}"
            )
        if problems:
            num_captions = sum(count for _, count in problems)
            captions = f" and their {num_captions} caption(s)" if num_captions else ""
            logger.warning(f"Skipped {len(problems)} unreadable image(s){captions}:\n{report}")
        if rank == 0:
            shards = _complete_shards(output_dir)
            info["num_images"] = sum(_load_shard(shard).num_rows for shard in shards)
            info["num_shards"] = len(shards)
            info["num_skipped"] = len(problems)
            info["num_replaced"] = num_replaced
            info["embedding_dim"] = _load_shard(shards[0]).features[EMBEDDING_COLUMN].length if shards else None
            write_text_atomically(output_dir / EMBEDDINGS_INFO_NAME, json.dumps(info, indent=2, default=str))
        _barrier()
        return load_embeddings_info(output_dir)


def _stale_rows(shards: list[Path], source, keep_columns: Sequence[str]) -> str | None:
    """
    What a folder's `shards` store that a map-style source (to be embedded into it) says otherwise, described; None if
    nothing. An image is stale when the source's rows give it other captions or kept values than stored (merged as a
    pass merges them: all its rows' captions in order, its first row's kept values). Images are matched by key, which
    for a file holds its size and modification time: a file replaced at its path (its caption edited with it or not)
    is a new image, embedded again, its old row then dropped. Images not stored yet (new rows,
    an image fixed since an earlier pass) are what the pass adds; stored images the source does not give stay (a
    folder may gather several sources). A stream is not read ahead: None.
    """
    if not isinstance(source, datasets.Dataset) or not shards:
        return None
    columns = [name for name in (KEY_COLUMN, CAPTIONS_COLUMN, *keep_columns) if name in source.column_names]

    def rows(table):  # (key, [captions, *kept values]) of each row; kept images as their stored bytes
        for batch in _undecoded_images(table.select_columns(columns)).iter(batch_size=10_000):
            for position, key in enumerate(batch[KEY_COLUMN]):
                yield key, [batch[name][position] for name in columns[1:]]

    def digest(values: list) -> int:
        return hash(json.dumps(values, default=str))

    # By Python's string hashes, the source's images grouped as the pass groups them (`_first_rows`), and lists kept
    # only for the images given by several rows: a folder of millions of images is checked in a few hundred MB.
    table = datasets.concatenate_datasets([_load_shard(shard) for shard in shards])
    stored = {hash(key): (key, digest(values)) for key, values in rows(table)}
    every_row = np.arange(len(source))
    first_row_of = _first_rows(every_row, _source_key_digests(source)[1])
    repeated = set(first_row_of[first_row_of != every_row].tolist())  # the first rows of images given several times
    merged: dict[int, tuple[str, list]] = {}
    stale: list[str] = []
    for row, (key, values) in enumerate(rows(source)):
        first = int(first_row_of[row])
        if first in merged:  # a later row of an image given several times
            if CAPTIONS_COLUMN in columns:
                merged[first][1][0] += values[0]
        elif first == row and hash(key) in stored:  # else not stored yet: the pass adds it
            if row in repeated:
                merged[row] = (key, values)
            elif digest(values) != stored[hash(key)][1]:
                stale.append(key)
    stale += [key for key, values in merged.values() if digest(values) != stored[hash(key)][1]]
    if stale:
        return f"{len(stale)} image(s) with other captions or kept values than this source's (the first: {stale[0]})"
    return None


# The tower's settings that an info file records beside its fingerprint (see `_tower_settings`).
_TOWER_SETTINGS = ("vision_config", "open_clip_model_cfg")


def _tower_settings(model) -> dict[str, Any]:
    """A transformers tower's config, and an open_clip tower's model config (None for other towers)."""
    return {
        "vision_config": getattr(getattr(model.vision_model, "config", None), "to_dict", dict)(),
        "open_clip_model_cfg": getattr(model.config, "open_clip_model_cfg", None),
    }


def _folder_info(model, image_processor, columns: list[str], source_name: str | None) -> dict[str, Any]:
    """What an embeddings folder's info file says of how it was computed (the counts come when the pass ends)."""
    return {
        "version": EMBEDDINGS_VERSION,
        "fingerprint": vision_fingerprint(model, image_processor),
        "vision": {
            **_vision_tower(model.config),
            "vision_model": type(model.vision_model).__name__,
            **_tower_settings(model),
        },
        "image_processor": image_processor.to_dict(),
        "columns": columns,
        "source": source_name,
    }


# How long process 0 waits for another run's lock before every process of its run checks in again (a gather): far
# below the distributed timeout (10 minutes or more) that the other processes would otherwise hit while waiting.
_LOCK_POLL_SECONDS = 10
_LOCK_NAME = ".embeddings-writer.lock"


@contextmanager
def _folder_lock(directory: Path, rank: int, world_size: int) -> Iterator[None]:
    """
    Hold an embeddings folder for this run while the body runs: two runs writing one folder at once (a sweep of
    `clipcap train` runs sharing `--embedding_cache_dir`) would remove each other's temporary shards, write the same
    shard names and embed the same images twice. A second run, of any number of processes, waits for the first to
    finish, then finds its images stored and embeds only the others.

    Process 0 alone takes the lock (a `filelock` file: the OS's `flock` on Unix, released however the process ends),
    for all processes of its run, which write their own shards side by side and end with a barrier before it lets
    go. While it waits, they all check in with it every [`_LOCK_POLL_SECONDS`] (a gather): no process sits in one
    collective long enough to reach the distributed timeout.
    """
    from filelock import Timeout  # a dependency of huggingface_hub, so always installed

    lock, announced = None, False
    while True:
        acquired, problem = True, None
        if rank == 0:
            try:
                directory.mkdir(parents=True, exist_ok=True)
                timeout = _LOCK_POLL_SECONDS if announced else 0
                lock = acquire_file_lock(directory / _LOCK_NAME, "the embeddings folder", timeout)
            except Timeout:
                acquired = False
            except FileLocksUnsupportedError as error:
                problem = str(error)
            except OSError as error:
                problem = _unwritable(directory, error)
        if world_size > 1:
            acquired, problem = _all_gather((acquired, problem))[0]
        if problem is not None:
            raise OSError(problem)
        if acquired:
            break
        if rank == 0 and not announced:
            logger.warning(f"Waiting for another run writing into the embeddings folder {directory} to finish.")
        announced = True
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _unwritable(directory: Path, error: OSError) -> str:
    return (
        f"Cannot write to the embeddings folder {directory} ({type(error).__name__}: {error}); give a writable folder "
        "with room for the embeddings (`--output`, `--embedding_cache_dir`, `cache_dir`)."
    )


def _check_shared_folder(directory: Path, rank: int, world_size: int) -> None:
    """
    Before any image is embedded: process 0 writes a random token into the folder (which [`_folder_lock`] created),
    and in a distributed run every process reads it back. Processes on machines without a shared filesystem would
    otherwise each fill a folder of their own, each holding only its share of the images, and nothing would say so.
    """
    token, problem = uuid.uuid4().hex, None
    if rank == 0:
        try:
            write_text_atomically(directory / f".shared-folder-check-{token}", token)
        except OSError as error:
            problem = _unwritable(directory, error)
    token, problem = _all_gather((token, problem))[0]  # process 0's, after it wrote them: the others may look
    if problem is not None:
        raise OSError(problem)
    # A name never looked up before, so that no filesystem cache can answer for the file it names.
    marker = directory / f".shared-folder-check-{token}"
    try:
        seen = marker.read_text() == token
    except OSError:
        seen = False
    blind = [process for process, saw in enumerate(_all_gather(seen)) if not saw]  # everyone has looked
    if rank == 0:
        marker.unlink(missing_ok=True)
    if blind:
        raise OSError(
            f"Process(es) {', '.join(map(str, blind))} of {world_size} do not see the embeddings folder {directory} "
            "that process 0 writes: every process must write into one folder, so put it on a filesystem that all "
            "machines share (--output, --embedding_cache_dir)."
        )


class _ShardWriter:
    """
    Collects one process's embeddings and writes them as shards of [`EMBEDDING_SHARD_SIZE`] images or a little more,
    whole batches each, the kept source columns with their source's types (`keep_features`): inferred from each
    shard's values, a column that is null or empty in one shard would get another type there, and the shards could not
    be read as one table. A run killed between shards has stored whole batches, which its rerun leaves out
    ([`_batches_to_embed`]): each shard also records the keys of its batches' unreadable images
    ([`UNREADABLE_KEYS_NAME`]).
    """

    def __init__(
        self, directory: Path, rank: int, world_size: int, has_captions: bool, keep_features: datasets.Features
    ):
        self.directory = directory
        self.prefix = f"shard-rank{rank:05d}-of-{world_size:05d}-"
        self.keep_features = keep_features
        captions = [CAPTIONS_COLUMN] if has_captions else []
        self.columns = [KEY_COLUMN, EMBEDDING_COLUMN, *captions, *keep_features]
        self.records: list[dict[str, Any]] = []
        self.embeddings: list[torch.Tensor] = []
        self.unreadable_keys: list[str] = []
        self.num_written = 0
        # A rerun continues the numbering of this rank's shards.
        numbers = [int(path.name[len(self.prefix) :]) for path in directory.glob(f"{self.prefix}*")]
        self.next_number = max(numbers, default=-1) + 1

    def add(
        self, records: list[dict[str, Any]], embeddings: torch.Tensor | None, unreadable_keys: Sequence[str] = ()
    ) -> None:
        """A batch: its readable images' records and embeddings (`None` when it has none), its unreadable ones' keys."""
        self.records.extend(records)
        self.embeddings.extend(embeddings if embeddings is not None else ())
        self.unreadable_keys.extend(unreadable_keys)
        if len(self.records) >= EMBEDDING_SHARD_SIZE:
            self._write()

    def flush(self) -> None:
        # Batches with no readable image left at the end are not recorded: a rerun reads them again in their places.
        if self.records:
            self._write()

    def _write(self) -> None:
        records, embeddings, unreadable_keys = self.records, torch.stack(self.embeddings), self.unreadable_keys
        self.records, self.embeddings, self.unreadable_keys = [], [], []
        count = len(records)
        columns = {name: [record[name] for record in records] for name in self.columns if name != EMBEDDING_COLUMN}
        columns[EMBEDDING_COLUMN] = embeddings.numpy()
        features = {
            KEY_COLUMN: datasets.Value("string"),
            CAPTIONS_COLUMN: datasets.Sequence(datasets.Value("string")),
            **self.keep_features,
            EMBEDDING_COLUMN: datasets.Sequence(datasets.Value("float32"), length=embeddings.shape[1]),
        }
        features = datasets.Features({name: features[name] for name in columns})
        shard = datasets.Dataset.from_dict(columns, features=features)
        name = f"{self.prefix}{self.next_number:05d}"
        self.next_number += 1
        temporary = self.directory / f".tmp-{name}-{uuid.uuid4().hex}"
        try:
            shard.save_to_disk(str(temporary))
            if unreadable_keys:
                (temporary / UNREADABLE_KEYS_NAME).write_text(json.dumps(unreadable_keys), encoding="utf-8")
            os.replace(temporary, self.directory / name)  # complete once renamed into place
            self.num_written += count
        except OSError as error:
            raise OSError(_unwritable(self.directory, error)) from error
        finally:
            shutil.rmtree(temporary, ignore_errors=True)


def _complete_shards(directory: Path) -> list[Path]:
    # Shards still being written (or left by a killed run) have a temporary name and are not matched here.
    return sorted(path for path in Path(directory).glob("shard-*") if path.is_dir())


def _remove_leftovers(directory: Path) -> None:
    """
    Settle what killed runs left in an embeddings folder, in process 0 holding the folder's lock before its other
    processes write anything: temporary shards (`.tmp-shard-...`, written whole and renamed when complete), temporary
    info files and shared-folder markers are removed; a shard moved aside by [`_drop_replaced_files`] is put back
    when the run died before the rewritten shard took its name, and removed otherwise, holding the rewrite lock
    (readers list and open such a copy in place of its shard).
    """
    asides = list(directory.glob(f"{_ASIDE_PREFIX}shard-*"))
    if asides:  # left by a rewrite, so the rewrite lock file exists; readers may be opening these copies
        with _rewriting(directory):
            for aside in asides:
                _settle_aside(aside)
    leftovers = [
        *directory.glob(".tmp-shard-*"),
        *directory.glob(f".{EMBEDDINGS_INFO_NAME}.*.tmp"),
        *directory.glob(".shared-folder-check-*"),
    ]
    for leftover in leftovers:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


# A shard being rewritten without some rows is moved aside under this prefix until its new version takes its name.
# An aside is always a whole shard: it appears by a rename of one, and leaves by a rename (back, or to be deleted).
_ASIDE_PREFIX = ".aside-"


def _settle_aside(aside: Path) -> None:
    """Put a shard moved aside back if its name is free (its rewrite never took its place), or delete it."""
    shard = aside.with_name(aside.name[len(_ASIDE_PREFIX) :])
    if shard.exists():
        _delete_aside(aside)
    else:
        os.replace(aside, shard)


def _delete_aside(aside: Path) -> None:
    # Renamed to a temporary shard's name first: a deletion cut short leaves a leftover, never a partial aside.
    garbage = aside.with_name(f".tmp-{aside.name[len(_ASIDE_PREFIX) :]}-{uuid.uuid4().hex}")
    os.replace(aside, garbage)
    shutil.rmtree(garbage, ignore_errors=True)


# A shard is rewritten (see `_drop_replaced_files`) holding this lock file exclusively, and readers list and open the
# shards holding it shared, so that none sees a shard moved aside or half replaced; the shards they opened are
# memory-mapped, and a mapped file stays readable when a rewrite renames or removes it later. The first rewrite in a
# folder creates it: readers never write into the folder (it may be read-only, or another user's).
_REWRITE_LOCK_NAME = ".embeddings-rewrite.lock"
# How long a reader waits for a shard's rewrite (seconds: it takes one shard's save) before it gives up with an error.
_REWRITE_WAIT_SECONDS = 300
_REWRITE_POLL_SECONDS = 0.1


def _open_shards(directory: Path) -> list[datasets.Dataset]:
    """
    The folder's shards, memory-mapped, as they stand between two rewrites. A folder never rewritten (the common case)
    has no lock file and is read without one; should its first rewrite begin meanwhile (the lock file appears before
    any shard moves), it is read again under the lock.
    """
    lock_file = directory / _REWRITE_LOCK_NAME

    def open_all() -> list[datasets.Dataset]:
        return [_load_shard(path) for path in _readable_shards(directory)]

    if not lock_file.exists():
        try:
            shards = open_all()
        except ValueError:  # a shard gone as it was opened: moved aside by that first rewrite, or really damaged
            if not lock_file.exists():
                raise
        else:
            if not lock_file.exists():
                return shards
    with _shared_lock(lock_file, directory):
        return open_all()


def _readable_shards(directory: Path) -> list[Path]:
    """
    The shards a reader opens: the complete ones and, in place of a missing one, the copy of it that a rewrite killed
    midway left aside (the next writer puts it back: see [`_settle_aside`]).
    """
    shards = {path.name: path for path in _complete_shards(directory)}
    for aside in directory.glob(f"{_ASIDE_PREFIX}shard-*"):
        shards.setdefault(aside.name[len(_ASIDE_PREFIX) :], aside)
    return [shards[name] for name in sorted(shards)]


@contextmanager
def _shared_lock(lock_file: Path, directory: Path) -> Iterator[None]:
    """
    Hold `lock_file` shared while the body runs, once no rewrite holds it, waiting up to [`_REWRITE_WAIT_SECONDS`].

    By hand with `flock`: `filelock`'s `FileLock` is exclusive (readers would wait for each other) and opens the file
    for writing, which a reader of a read-only folder cannot; its `ReadWriteLock` (filelock 4) keeps its state in an
    SQLite file that readers write too, and filelock 3 has none. Where there is no lock to take (no `fcntl`, a lock
    file this user may not open, a filesystem without `flock`, where filelock 3 refuses every writer) the body runs
    unlocked.
    """
    try:
        import fcntl

        descriptor = os.open(lock_file, os.O_RDONLY)
    except (ImportError, OSError):
        descriptor = None
    deadline, announced = time.monotonic() + _REWRITE_WAIT_SECONDS, False
    try:
        while descriptor is not None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):  # not a rewrite: no flock
                    os.close(descriptor)
                    descriptor = None
                    break
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Gave up reading the embeddings folder {directory} after {_REWRITE_WAIT_SECONDS} s: a run "
                    f"rewriting its shards holds {lock_file.name} (dropping rows of replaced image files). Read it "
                    "again once that run is done; if none is running, stop the process stuck holding the lock."
                )
            if not announced:
                logger.warning(f"Waiting for a run rewriting shards of the embeddings folder {directory}.")
                announced = True
            time.sleep(_REWRITE_POLL_SECONDS)
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)  # releases the lock


@contextmanager
def _rewriting(directory: Path) -> Iterator[None]:
    """Hold the folder's rewrite lock exclusively, once the readers listing and opening its shards are done."""
    from filelock import Timeout  # a dependency of huggingface_hub, so always installed

    lock_file = directory / _REWRITE_LOCK_NAME
    try:
        lock = acquire_file_lock(lock_file, "the embeddings folder", timeout=0)
    except Timeout:  # readers open shards for a moment each: no limit
        logger.warning(f"Waiting for processes reading the embeddings folder {directory} to open its shards.")
        lock = acquire_file_lock(lock_file, "the embeddings folder")
    try:
        yield
    finally:
        lock.release()


# The end of a file's key, `|<size>|<mtime_ns>` (see `image_cache_key`); `sha256:` keys, of image bytes, have none.
_FILE_KEY_TAIL = r"\|\d+\|\d+$"


def _drop_replaced_files(directory: Path) -> int:
    """
    Keep at most one row per image file: a file replaced at its path (another size or modification time, so another
    key) and embedded again leaves the row of its earlier version behind, which `clipcap train --embeddings` would
    otherwise train on as one more image with the file's captions. For each path stored under several keys, only the
    row of the file's current key is kept (none if the file changed again since).

    A shard losing rows is saved again without them under a temporary name, the old one is moved aside (`.aside-`
    and its name), the new one takes its name, and only then is the old one removed: the folder stays memory-mapped
    shards, and a run interrupted in between keeps every row (the old shard is put back, at once or by the next run,
    which drops the rows again). Run by process 0 holding the folder's lock; each shard is rewritten holding the
    rewrite lock too, so that readers see it before or after ([`_open_shards`]). Returns how many rows were dropped.
    """
    # Only file keys (`<path>|<size>|<mtime_ns>`, see `image_cache_key`) name a path; `sha256:` keys name the content.
    # Through 64-bit digests of the paths, as the rest of the pass: 24 bytes per stored image file.
    shards = _complete_shards(directory)
    digests, shard_numbers, rows = [np.empty(0, dtype=np.uint64)], [np.empty(0, dtype=np.int64)], [np.empty(0, int)]
    for number, shard in enumerate(shards):
        keys = _load_shard(shard).data.column(KEY_COLUMN)
        file_rows = pc.indices_nonzero(pc.match_substring_regex(keys, _FILE_KEY_TAIL))
        paths = pc.replace_substring_regex(keys.take(file_rows), _FILE_KEY_TAIL, "")
        digests.append(key_digests(paths.to_pylist())[1])
        shard_numbers.append(np.full(len(file_rows), number))
        rows.append(file_rows.to_numpy())
    digests, shard_numbers, rows = np.concatenate(digests), np.concatenate(shard_numbers), np.concatenate(rows)
    _, inverse, counts = np.unique(digests, return_inverse=True, return_counts=True)
    stale: dict[int, set[int]] = {}  # shard -> its rows to drop
    for entry in np.flatnonzero(counts[inverse.reshape(-1)] > 1):  # a path stored more than once (rare)
        number, row = int(shard_numbers[entry]), int(rows[entry])
        key = _load_shard(shards[number])[row][KEY_COLUMN]
        if key != image_cache_key(key.rsplit("|", 2)[0]):
            stale.setdefault(number, set()).add(row)
    for number, dropped in stale.items():
        shard = shards[number]
        table = _load_shard(shard)
        kept = table.select([row for row in range(table.num_rows) if row not in dropped])
        replacement = directory / f".tmp-{shard.name}-{uuid.uuid4().hex}"
        aside = directory / f"{_ASIDE_PREFIX}{shard.name}"
        try:
            if kept.num_rows:
                kept.save_to_disk(str(replacement))
                if (shard / UNREADABLE_KEYS_NAME).exists():
                    shutil.copyfile(shard / UNREADABLE_KEYS_NAME, replacement / UNREADABLE_KEYS_NAME)
            with _rewriting(directory):
                try:
                    os.replace(shard, aside)
                    if kept.num_rows:
                        os.replace(replacement, shard)
                    # Only now: until the new shard has its name, the old one is its rows' only copy.
                    _delete_aside(aside)
                except BaseException:  # Ctrl-C too; after a SIGKILL, the next run's `_remove_leftovers` does this
                    if aside.exists():
                        _settle_aside(aside)
                    raise
        finally:
            shutil.rmtree(replacement, ignore_errors=True)
    num_dropped = sum(map(len, stale.values()))
    if num_dropped:
        logger.info(f"Removed {num_dropped} row(s) of image files replaced since they were embedded.")
    return num_dropped


class _Stored(enum.Enum):
    """Where an image of the source stands in the embeddings folder."""

    NO = "no"
    YES = "yes"
    UNREADABLE = "unreadable"  # unreadable to an earlier pass, in a batch it stored: read again


class _StoredKeys(NamedTuple):
    """The sorted digests (see [`key_digests`]) of one process's keys that earlier runs stored, and of those that their
    stored batches could not read."""

    stored: np.ndarray
    unreadable: np.ndarray

    def of(self, digests: np.ndarray) -> list[_Stored]:
        """Where each image (by digest) stands."""
        stored, unreadable = _is_in(digests, self.stored).tolist(), _is_in(digests, self.unreadable).tolist()
        return [
            _Stored.YES if is_stored else _Stored.UNREADABLE if was_unreadable else _Stored.NO
            for is_stored, was_unreadable in zip(stored, unreadable)
        ]


def _stored_keys(directory: Path, rank: int, world_size: int) -> _StoredKeys:
    """This process's [`_StoredKeys`] in the folder (a rerun may use another number of processes)."""
    stored, unreadable = [np.empty(0, dtype=np.uint64)], [np.empty(0, dtype=np.uint64)]

    def mine(keys: list[str]) -> np.ndarray:
        owners, digests = key_digests(keys, world_size)
        return digests[owners == rank]

    for shard in _complete_shards(directory):
        for batch in _load_shard(shard).select_columns(KEY_COLUMN).iter(batch_size=10_000):
            stored.append(mine(batch[KEY_COLUMN]))
        if (shard / UNREADABLE_KEYS_NAME).exists():
            unreadable.append(mine(read_json(shard / UNREADABLE_KEYS_NAME)))
    return _StoredKeys(np.sort(np.concatenate(stored)), np.sort(np.concatenate(unreadable)))


def key_digests(keys: Sequence[str], world_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """
    Each key's process (a hash of the key modulo `world_size`, so that each image has exactly one) and a 64-bit digest
    of it: 8 bytes per image instead of a Python string, so that a pass over millions of images keeps its bookkeeping
    small (two keys share a digest with odds of about n²/2⁶⁵).
    """
    digests = np.fromiter(
        (int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") for key in keys),
        dtype=np.uint64,
        count=len(keys),
    )
    return (digests % np.uint64(world_size)).astype(np.int64), digests


class _KeyIndex:
    """
    Image keys -> rows of an embedding table (offset by the tables before it), through the keys' sorted 64-bit
    digests: 16 bytes per image rather than a dictionary of strings. Built when first needed.
    """

    def __init__(self, table: datasets.Dataset, offset: int):
        self.table, self.offset = table, offset
        self._digests: np.ndarray | None = None
        self._rows: np.ndarray | None = None

    def rows(self, keys: list[str]) -> np.ndarray:
        """Each key's row, -1 for a key the table does not hold."""
        if self._digests is None:
            batches = self.table.select_columns(KEY_COLUMN).iter(batch_size=10_000)
            digests = np.concatenate([key_digests(batch[KEY_COLUMN])[1] for batch in batches])
            order = np.argsort(digests, kind="stable")
            self._digests, self._rows = digests[order], order + self.offset
        digests = key_digests(keys)[1]
        positions = np.searchsorted(self._digests, digests).clip(max=max(len(self._digests) - 1, 0))
        found = self._digests[positions] == digests if len(self._digests) else np.zeros(len(keys), dtype=bool)
        return np.where(found, self._rows[positions] if len(self._rows) else -1, -1)


def _is_in(digests: np.ndarray, sorted_digests: np.ndarray) -> np.ndarray:
    positions = np.searchsorted(sorted_digests, digests).clip(max=max(len(sorted_digests) - 1, 0))
    return sorted_digests[positions] == digests if len(sorted_digests) else np.zeros(len(digests), dtype=bool)


def _describe_tower(info: dict[str, Any]) -> str:
    vision = info.get("vision", {})
    return ", ".join(f"{name} {vision.get(name)}" for name in ("vision_backend", "vision_model_type", "vision_pooling"))


def _where(row: dict[str, Any], index: int | None, streamed_from: str | None = None) -> str:
    """
    A source row as an error names it: its shard (tar or parquet file) and sample (or its row in that file), or its
    image file, or its row (`__row__` of a map-style source; `index` in the stream that `streamed_from` describes, whose
    rows have no file).
    """
    image = row["image"]
    number = row.get(SOURCE_ROW_COLUMN)
    if row.get(SHARD_COLUMN):
        sample = f", sample {row[WEBDATASET_KEY]}" if row.get(WEBDATASET_KEY) else ""
        row_number = f", row {number} (from 0)" if number is not None and not sample else ""
        return f"shard {row[SHARD_COLUMN]}{sample}{row_number}"
    if image.get("bytes") is None and image.get("path"):
        return str(image["path"])
    if streamed_from is not None:
        return (
            f"a streamed row of {streamed_from} (row {index} of the stream, from 0; embed it without --streaming to "
            "have the row's file and number named)"
        )
    number = number if number is not None else index
    return f"row {number} (from 0)" if number is not None else "a streamed row"


def _read(
    row: dict[str, Any], index: int | None, image_processor=None, streamed_from: str | None = None
) -> tuple[Any, str | None]:
    """
    `(pixel_values, None)` for a readable image (`(None, None)` without an image processor: only checked),
    `(None, "<where>: <problem> (key ...)")` otherwise (see [`_where`]).
    """
    try:
        image = decode_image(row["image"])
        if image_processor is None:
            return None, None
        return image_processor(image, return_tensors="pt")["pixel_values"][0], None
    except Exception as error:  # any decoding or preprocessing failure is reported with the image named
        return None, f"  {_unreadable_image(row, index, error, streamed_from)}"


def _non_finite_error(records: list[dict[str, Any]], embeddings: torch.Tensor, dtype: torch.dtype) -> str:
    """The error for a batch whose embeddings hold NaN or inf, naming its images by key."""
    bad = (~torch.isfinite(embeddings)).any(dim=1).nonzero().flatten().tolist()
    keys = "\n".join(f"  {records[row][KEY_COLUMN]}" for row in bad[:10])
    more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
    overflow = " or float16 overflows (run the tower in float32)" if dtype == torch.float16 else ""
    return (
        f"The vision tower gave NaN or infinite embeddings for {len(bad)} of the {len(records)} images of a batch; "
        f"the tower's weights are likely corrupt (check the model checkpoint, load it again){overflow}. That batch "
        "was not stored; the images embedded before it are, and a rerun with a sound model embeds only the others. "
        f"Images (keys) with non-finite embeddings:\n{keys}{more}"
    )


def _unreadable_image(
    row: dict[str, Any], index: int | None, error: Exception, streamed_from: str | None = None
) -> str:
    """`<where>: <problem> (key ...)` for an image that cannot be read."""
    problem = "file not found" if isinstance(error, FileNotFoundError) else describe_image_error(error)
    return f"{_where(row, index, streamed_from)}: {problem} (key {row[KEY_COLUMN]})"


class _SourceImages(torch.utils.data.Dataset):
    """One process's unique images of a map-style source, decoded in DataLoader workers, with their rows' captions."""

    def __init__(self, source, first_rows: np.ndarray, repeats: dict[int, list[int]], image_processor, keep_columns):
        self.source = _undecoded_images(source)
        self.captions = source.select_columns(CAPTIONS_COLUMN) if CAPTIONS_COLUMN in source.column_names else None
        self.first_rows, self.repeats = first_rows, repeats
        self.image_processor = image_processor
        self.keep_columns = keep_columns

    def __len__(self) -> int:
        return len(self.first_rows)

    def __getitem__(self, position: int):
        first = int(self.first_rows[position])
        others = self.repeats.get(first, ())
        row = self.source[first]
        pixels, problem = _read(row, first, self.image_processor)
        record = {KEY_COLUMN: row[KEY_COLUMN], **{name: row[name] for name in self.keep_columns}}
        if self.captions is not None:
            record[CAPTIONS_COLUMN] = list(row[CAPTIONS_COLUMN])
            for other in others:  # the same image in other rows: their captions too
                record[CAPTIONS_COLUMN].extend(self.captions[other][CAPTIONS_COLUMN])
        return pixels, record, problem


def _undecoded_images(dataset):
    """
    `dataset` with its image columns undecoded (`{"bytes", "path"}`): the image to embed is decoded where its error
    can name it, and a kept image column (`keep_columns`) is stored as its source bytes, not re-encoded from a decoded
    image (lossy for JPEG), and compared by them with what a folder stores.
    """
    for name, feature in (dataset.features or {}).items():
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset


def _collate(items) -> tuple[Any, list[dict[str, Any]], list[tuple[str, int, str]]]:
    """Pixels and records of the readable images; each unreadable one's problem, how many captions it had, its key."""
    good = [(pixels, record) for pixels, record, problem in items if problem is None]
    problems = [
        (problem, len(record.get(CAPTIONS_COLUMN, [])), record[KEY_COLUMN])
        for _, record, problem in items
        if problem is not None
    ]
    pixels = torch.stack([pixels for pixels, _ in good]) if good else None
    return pixels, [record for _, record in good], problems


def _source_key_digests(source: datasets.Dataset, world_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """[`key_digests`] of a map-style source's image keys, row by row (read in batches)."""
    owners, digests = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.uint64)]
    for batch in source.select_columns(KEY_COLUMN).iter(batch_size=10_000):
        batch_owners, batch_digests = key_digests(batch[KEY_COLUMN], world_size)
        owners.append(batch_owners)
        digests.append(batch_digests)
    return np.concatenate(owners), np.concatenate(digests)


def _first_rows(rows: np.ndarray, digests: np.ndarray) -> np.ndarray:
    """For each of the source rows `rows` (ascending), the first of them that gives the same image (key digest)."""
    _, first, inverse = np.unique(digests[rows], return_index=True, return_inverse=True)
    return rows[first[inverse.reshape(-1)]]


def _batches_to_embed(images: Iterable[tuple[Any, _Stored]], batch_size: int) -> Iterator[list[Any]]:
    """
    The batches of the images not stored yet, from `(item, stored)` pairs, one per unique image in source order, read
    as it goes (a stream's image is read only when its pair is asked for). An uninterrupted pass's batches with no
    image stored are kept as they are; the images left in the others ("scattered" among stored ones, as in a folder
    shared by several sources) are batched together, each batch yielded once full. On the CPU an image's embedding
    differs in its last bits with the batch it is computed in, and a killed pass stores whole batches
    ([`_ShardWriter`]): rerun, it embeds the rest in the batches an uninterrupted pass would, where batching everything
    left anew would shift them after a skipped unreadable image; scattered images still fill whole batches. The images
    that an earlier pass could not read in a batch it stored are read again in batches of their own: among the
    scattered ones they would shift those too.
    """
    batch, scattered, unreadable, batch_has_stored = [], [], [], False
    for position, (item, stored) in enumerate(images, start=1):
        batch_has_stored = batch_has_stored or stored is not _Stored.NO
        if stored is _Stored.NO:
            batch.append(item)
        elif stored is _Stored.UNREADABLE:
            unreadable.append(item)
        if position % batch_size == 0:  # an uninterrupted pass's batch ends here
            if batch_has_stored:
                scattered += batch
            else:
                yield batch
            batch, batch_has_stored = [], False
        if len(scattered) >= batch_size:
            yield scattered[:batch_size]
            scattered = scattered[batch_size:]
        if len(unreadable) == batch_size:
            yield unreadable
            unreadable = []
    if batch_has_stored:
        scattered, batch = scattered + batch, []
    for start in range(0, len(scattered), batch_size):
        yield scattered[start : start + batch_size]
    if batch:
        yield batch
    if unreadable:
        yield unreadable


def _map_style_batches(source, image_processor, done, rank, world_size, batch_size, num_workers, keep_columns):
    """This process's images not yet stored, each once (with every row that gives it), in the batches of
    [`_batches_to_embed`]."""
    owners, digests = _source_key_digests(source, world_size)
    mine = np.flatnonzero(owners == rank)
    # The first row of each image, in source order; the rows that repeat an image give it their captions too.
    first_row_of = _first_rows(mine, digests)
    first_rows = np.unique(first_row_of)
    stored = done.of(digests[first_rows])
    repeats: dict[int, list[int]] = {}  # only for images to embed: a rerun with little left does not walk them all
    repeated = np.flatnonzero(mine != first_row_of)
    repeated = repeated[~_is_in(digests[first_row_of[repeated]], done.stored)]
    for row in repeated:
        repeats.setdefault(int(first_row_of[row]), []).append(int(mine[row]))
    images = _SourceImages(source, first_rows, repeats, image_processor, keep_columns)
    # A private generator leaves the global random state alone (see loaders._image_file_loader).
    loader = torch.utils.data.DataLoader(
        images,
        batch_sampler=list(_batches_to_embed(enumerate(stored), batch_size)),
        num_workers=num_workers,
        collate_fn=_collate,
        generator=torch.Generator(),
    )
    yield from loader


def _iterable_batches(
    source, image_processor, done, rank, world_size, batch_size, keep_columns, repeated_rows: list[int], source_name
) -> Iterator:
    """
    The same from an `IterableDataset`, read once; an image seen again later keeps its first row's captions (its
    first batch may already be written), and each later row's caption count goes to `repeated_rows`. A bad image
    without a file of its own is named by its row in the stream of `source_name`; a data file that does not read, by
    its path (see [`read_stream`]).
    """

    def unique_images() -> Iterator[tuple[Any, _Stored]]:  # this process's images, each once, read if not stored
        seen: set[int] = set()
        undecoded = _undecoded_images(source)
        for index, row in enumerate(read_stream(undecoded, undecoded)):
            owners, digests = key_digests([row[KEY_COLUMN]], world_size)
            digest = int(digests[0])
            if owners[0] != rank:
                continue
            stored = done.of(digests)[0]
            if digest in seen:
                if stored is not _Stored.YES:
                    repeated_rows.append(len(row.get(CAPTIONS_COLUMN) or []))
                continue
            seen.add(digest)
            if stored is _Stored.YES:
                yield None, stored
            else:
                pixels, problem = _read(row, index, image_processor, streamed_from=source_name or "the source")
                record = {name: row[name] for name in (KEY_COLUMN, CAPTIONS_COLUMN, *keep_columns) if name in row}
                yield (pixels, record, problem), stored

    for batch in _batches_to_embed(unique_images(), batch_size):
        yield _collate(batch)


def _process_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _all_gather(value: Any) -> list[Any]:
    if not torch.distributed.is_initialized():
        return [value]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _load_shard(shard: Path) -> datasets.Dataset:
    try:
        return datasets.load_from_disk(str(shard))
    except (OSError, ValueError) as error:  # a shard written in place (older versions) by a run that was stopped
        raise ValueError(
            f"The embedding cache shard {shard} is incomplete or damaged ({type(error).__name__}: {error}). Delete "
            "that folder; its images are embedded again on the next run."
        ) from error


# ---------------------------------------------------------------------------------------------------------------------
# Caption datasets held in memory (the rows of a loader): the same folders, the table as a tensor


def embedding_cache_folder(cache_dir: PathLike, model, image_processor, root_as_is: bool = True) -> Path:
    """
    The embeddings folder of `model`'s vision tower and `image_processor` under a cache root: `<fingerprint[:16]>/`,
    so that another tower or preprocessing gets a folder of its own. A root that is itself an embeddings folder is
    used as is ([`embed_source`] then refuses it if another tower wrote it), unless `root_as_is=False`.
    """
    cache_dir = Path(cache_dir)
    if root_as_is and (cache_dir / EMBEDDINGS_INFO_NAME).exists():
        return cache_dir
    fingerprints = _accepted_fingerprints(model, image_processor)
    folder = cache_dir / next(fingerprints)[:16]
    if not folder.exists():  # a folder named by the fingerprint an earlier version gave this tower is still its own
        folder = next((cache_dir / other[:16] for other in fingerprints if (cache_dir / other[:16]).exists()), folder)
    return folder


def embed_images(
    dataset: datasets.Dataset | datasets.DatasetDict,
    model,
    image_processor,
    cache_dir: PathLike,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    on_bad_image: BadImagePolicy = "error",
) -> tuple[datasets.Dataset | datasets.DatasetDict, torch.Tensor]:
    """
    Give every row of a caption dataset the CLIP embedding of its image, computing each unique image once.

    The images are embedded with [`embed_source`] into the embeddings folder of this vision tower and preprocessing
    under `cache_dir` (see [`embedding_cache_folder`]; `clipcap train --embedding_cache_dir` uses the same folders):
    images already there are reused, the others are computed in batches with a progress bar and added.

    Args:
        dataset: rows with `image_path` and `image_id` (from one of the loaders), and usually `caption`; a
            `DatasetDict`'s splits share one embedding table.
        model: the [`ClipCapForConditionalGeneration`] whose vision tower embeds the images.
        image_processor: its image processor.
        cache_dir: where the embeddings folders live.
        batch_size: images per vision forward.
        device: where the vision tower runs; CUDA when available by default.
        num_workers: DataLoader workers that decode and preprocess images.
        on_bad_image: a missing or unreadable image raises a `ValueError` naming the files (`"error"`), or drops its
            rows with a warning that counts them (`"skip"`). Either way the readable images' embeddings are stored
            first, so a rerun loses no work.

    Returns:
        `(dataset, image_embeds)`: the dataset with an `image_index` column (rows of skipped images removed), and
        the `(num_unique_images, dim)` float32 embeddings it indexes, for [`ClipCapDataCollator`].
    """
    check_bad_image_policy(on_bad_image)
    splits = _splits(dataset)
    paths = _image_keys(splits)
    # Each unique image (in order) and the captions of its rows. Always a captions column, empty for rows without a
    # `caption` (evaluation rows grouped by image), so that every caption dataset can share the folder.
    captions: dict[str, list[str]] = {}
    for name, split in splits.items():
        split_captions = split["caption"] if "caption" in split.column_names else None
        for row, path in enumerate(paths[name]):
            captions.setdefault(path, []).extend([split_captions[row]] if split_captions is not None else [])
    keys = [image_cache_key(path) for path in captions]
    source = datasets.Dataset.from_dict(
        {"image": list(captions), KEY_COLUMN: keys, CAPTIONS_COLUMN: list(captions.values())},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                KEY_COLUMN: datasets.Value("string"),
                CAPTIONS_COLUMN: datasets.Sequence(datasets.Value("string")),
            }
        ),
    )
    folder = embedding_cache_folder(cache_dir, model, image_processor)
    for directory in (Path(cache_dir), folder):
        if (directory / LEGACY_CACHE_INFO_NAME).exists():
            raise ValueError(
                f"{directory} is an embedding cache of an earlier version of clipcap_hf, which is not read any more: "
                "delete that folder (its images are embedded again on the next call) or give another `cache_dir`."
            )
    embed_source(source, model, image_processor, folder, batch_size, device, num_workers, on_bad_image)

    stored = load_embeddings(folder) if _complete_shards(folder) else None  # none: every image skipped, a new folder
    # Through the keys' digests: the folder may be a large one that training shares, whose keys stay on disk.
    stored_rows = _KeyIndex(stored, offset=0).rows(keys) if stored is not None else np.full(len(keys), -1)
    readable = [(path, int(row)) for path, row in zip(captions, stored_rows) if row >= 0]  # not skipped
    if not readable:
        raise ValueError("None of the images could be read; there is nothing to train on.")
    position = {path: index for index, (path, _) in enumerate(readable)}
    rows = stored.select([row for _, row in readable]).with_format("numpy")[:]
    table = torch.from_numpy(rows[EMBEDDING_COLUMN])
    for name, split in splits.items():
        keep = [row for row, path in enumerate(paths[name]) if path in position]
        split = split.select(keep) if len(keep) < len(split) else split
        if "image_index" in split.column_names:
            split = split.remove_columns("image_index")
        splits[name] = split.add_column("image_index", [position[paths[name][row]] for row in keep])
    return _rebuild(dataset, splits), table


class ImageEmbeddingCache:
    """
    Deprecated (removed in clipcap_hf 0.2): the embedding caches are embeddings folders now. Write them with
    [`embed_images`] or [`embed_source`], read them with [`load_embeddings`], check them with [`check_embeddings`].

    The embeddings folder of one vision tower and preprocessing under `cache_dir` (see [`embedding_cache_folder`]).
    """

    def __init__(self, cache_dir: PathLike, model, image_processor):
        warnings.warn(
            "`ImageEmbeddingCache` is deprecated and will be removed in clipcap_hf 0.2: write embeddings folders with "
            "`embed_images` or `embed_source`, read them with `load_embeddings` and check them with "
            "`check_embeddings`.",
            FutureWarning,
            stacklevel=2,
        )
        self.model, self.image_processor = model, image_processor
        self.fingerprint = vision_fingerprint(model, image_processor)
        self.directory = embedding_cache_folder(cache_dir, model, image_processor)
        if self.info_path.exists():
            check_embeddings(self.directory, model, image_processor)

    @property
    def info_path(self) -> Path:
        return self.directory / EMBEDDINGS_INFO_NAME

    def load(self) -> tuple[dict[str, int], torch.Tensor | None]:
        """The stored images (key -> row) and their embeddings, `(num_images, dim)` float32."""
        if not self.info_path.exists() or not _complete_shards(self.directory):
            return {}, None
        stored = load_embeddings(self.directory).select_columns([KEY_COLUMN, EMBEDDING_COLUMN])
        columns = stored.with_format("numpy")[:]
        rows = {str(key): row for row, key in enumerate(columns[KEY_COLUMN])}
        return rows, torch.from_numpy(columns[EMBEDDING_COLUMN])

    def compute(
        self,
        paths: list[str],
        keys: list[str],
        batch_size: int = 64,
        device: str | torch.device | None = None,
        num_workers: int = 0,
    ) -> dict[str, str]:
        """Embed image files and store them under `keys`; returns the files that could not be read."""
        if not paths:
            return {}
        columns = {"image": list(paths), KEY_COLUMN: list(keys), CAPTIONS_COLUMN: [[] for _ in paths]}
        features = {"image": datasets.Image(), KEY_COLUMN: datasets.Value("string"),
                    CAPTIONS_COLUMN: datasets.Sequence(datasets.Value("string"))}  # as `embed_images` writes them
        source = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
        embed_source(source, self.model, self.image_processor, self.directory, batch_size, device, num_workers, "skip")
        stored = self.load()[0]
        return {path: "cannot be read (see the warning)" for path, key in zip(paths, keys) if key not in stored}

    def add(self, keys: list[str], embeddings: torch.Tensor) -> None:
        """Store the embeddings of new images as one more shard."""
        if not keys:
            return
        # A new folder gets the columns `embed_images` writes.
        columns = load_embeddings_info(self.directory)["columns"] if self.info_path.exists() else [CAPTIONS_COLUMN]
        keep_columns = [name for name in columns if name not in (KEY_COLUMN, EMBEDDING_COLUMN, CAPTIONS_COLUMN)]
        with _folder_lock(self.directory, 0, 1):
            _remove_leftovers(self.directory)
            shards = _complete_shards(self.directory)
            # The kept columns' types of the folder's shards; all null in a folder without any.
            stored = _load_shard(shards[0]).features if shards else {}
            keep_features = {name: stored.get(name, datasets.Value("null")) for name in keep_columns}
            writer = _ShardWriter(self.directory, 0, 1, CAPTIONS_COLUMN in columns, datasets.Features(keep_features))
            if not self.info_path.exists():
                info = _folder_info(self.model, self.image_processor, writer.columns, source_name=None)
                write_text_atomically(self.info_path, json.dumps(info, indent=2, default=str))
            records = [{KEY_COLUMN: key, CAPTIONS_COLUMN: [], **dict.fromkeys(keep_columns)} for key in keys]
            writer.add(records, embeddings.float().cpu())
            writer.flush()
