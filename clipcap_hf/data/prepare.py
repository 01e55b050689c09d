"""Training data in one call: [`load_training_data`] turns the data options into datasets a `Trainer` takes.

The path of the data, top to bottom: the sources ([`load_image_source`]), their images embedded once into an
embeddings folder shared by all processes ([`embed_source`]; or an existing folder, `--embeddings`), one row per
caption pointing into that memory-mapped table, each caption's token count. Training from pixels (`--streaming`, or
`--no_use_embedding_cache`) skips the embeddings and keeps the images.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc
import torch
from datasets.fingerprint import Hasher
from transformers.utils import logging

from ..processing_clipcap import ClipCapProcessor
from .collator import add_caption_lengths
from .embeddings import (
    CAPTIONS_COLUMN,
    EMBEDDING_COLUMN,
    KEY_COLUMN,
    LEGACY_CACHE_INFO_NAME,
    _barrier,
    _KeyIndex,
    _process_rank,
    _read,
    _unreadable_image,
    check_embeddings,
    embed_source,
    embedding_cache_folder,
    load_embeddings,
)
from .sources import (
    DEFAULT_CAPTION_COLUMNS,
    SHARD_COLUMN,
    SOURCE_ROW_COLUMN,
    WEBDATASET_KEY,
    decode_image,
    load_image_source,
)

logger = logging.get_logger(__name__)


@dataclass
class TrainingData:
    """
    What training needs, ready: `train` and `eval` hold one row per caption (`caption`, `length`, and `image_index`
    into `image_embeds`, or the `image`), `eval_images` one row per evaluation image (`references`, `image_id`,
    `image_path`, and `image_index` or `image`) for caption evaluation, `image_embeds` the memory-mapped embedding
    table (a `datasets.Dataset` in torch format, indexed like a tensor), and `train_truncated_captions` how many
    training captions `max_caption_length` cuts, and `train_caption_column` the column of the training source the
    captions were read from (None without a training source, as with `--embeddings`).
    """

    train: datasets.Dataset | datasets.IterableDataset | None
    eval: datasets.Dataset | None
    eval_images: datasets.Dataset | None
    image_embeds: datasets.Dataset | None
    train_truncated_captions: int = 0
    train_caption_column: str | None = None

    @property
    def longest_caption(self) -> int:
        """The most tokens of any caption (after `max_caption_length`); 0 when the lengths are not known."""
        lengths = [_arrow_column(split, "length") for split in (self.train, self.eval) if _has_lengths(split)]
        return max((pc.max(column).as_py() or 0 for column in lengths), default=0)


def load_training_data(
    data_args, model, processor: ClipCapProcessor, train: bool = True, evaluate: bool = True
) -> TrainingData:
    """
    The training and evaluation data that `data_args` (a `clipcap_hf.training.DataArguments`) name, ready for the
    `Trainer` and [`ClipCapDataCollator`].

    With the embedding cache (the default) every unique image is embedded once into the embeddings folder under
    `--embedding_cache_dir`, named after the vision tower's fingerprint and reused by later runs; in a distributed run
    every process embeds its own share. `--embeddings DIR` trains from a folder written by `clipcap embed` instead.
    """
    train_source, train_caption_column = None, None
    if train and not data_args.embeddings:
        train_source, train_caption_column = load_source(data_args, "train", return_caption_column=True)
    eval_source = load_source(data_args, "validation") if evaluate else None
    if train and train_source is None and not data_args.embeddings:
        raise ValueError("--do_train needs a training source: --train_file, --dataset_name or --embeddings.")
    if evaluate and eval_source is None:
        raise ValueError(
            "--do_eval needs an evaluation source: --validation_file (or a coco-karpathy --train_file), or "
            "--dataset_name with --validation_split."
        )
    if train_source is not None and data_args.max_train_samples is not None:
        train_source = _first_captions(train_source, data_args.max_train_samples)
    if eval_source is not None and data_args.max_eval_samples is not None:
        eval_source = _first_captions(eval_source, data_args.max_eval_samples, whole_images=True)

    if data_args.streaming or not data_args.use_embedding_cache:
        train_rows = _pixel_rows(train_source, data_args, "training") if train_source is not None else None
        eval_rows = _pixel_rows(eval_source, data_args, "evaluation") if eval_source is not None else None
        table = None
    else:
        train_rows, eval_rows, table = _embedded_rows(train_source, eval_source, data_args, model, processor, train)
    if train_rows is not None and data_args.max_train_samples is not None:
        train_rows = _first(train_rows, data_args.max_train_samples)
    for name, rows in (("training", train_rows), ("evaluation", eval_rows)):
        if isinstance(rows, datasets.Dataset) and len(rows) == 0:
            raise ValueError(
                f"No {name} captions are left: every {name} image was unreadable and skipped (--on_bad_image skip). "
                "Fix the images named in the warning above."
            )

    num_truncated = 0
    if isinstance(train_rows, datasets.Dataset):
        train_rows, num_truncated = add_caption_lengths(train_rows, processor, data_args.max_caption_length)
        if num_truncated:
            logger.info(
                f"{num_truncated} of {len(train_rows)} training captions are longer than --max_caption_length "
                f"({data_args.max_caption_length} tokens, EOS included) and will be cut."
            )
    eval_images = None
    if eval_rows is not None:
        eval_images = _images_of(eval_rows)
        if data_args.max_eval_samples is not None:
            # The loss is computed on the first N captions; their images are scored against all their references,
            # those past the N-th caption included.
            eval_rows = _first(eval_rows, data_args.max_eval_samples)
            eval_images = eval_images.select(range(len(set(eval_rows["image_id"]))))  # the first images, in order
        eval_rows = add_caption_lengths(eval_rows, processor, data_args.max_caption_length)[0]
    return TrainingData(train_rows, eval_rows, eval_images, table, num_truncated, train_caption_column)


# ---------------------------------------------------------------------------------------------------------------------
# Sources


def load_source(
    data_args, split: str = "train", captions_required: bool = True, return_caption_column: bool = False
) -> datasets.Dataset | datasets.IterableDataset | tuple[Any, str | None] | None:
    """
    The training (`split="train"`) or evaluation (`"validation"`) source that the arguments (`DataArguments`, or
    `EmbedArguments` for the training source) name, or None; see [`load_image_source`]. Without `--caption_column`
    the source's usual caption column is used: the first of [`DEFAULT_CAPTION_COLUMNS`] it has (`caption`, else
    `txt` as in webdataset shards, else `text` as in image folders; a source with several is warned of); with
    `captions_required=False` (`clipcap embed`) only if the source has one. With `return_caption_column`, a tuple of
    the source and the column its captions were read from (`(None, None)` when there is no source).
    """
    if split == "train":
        files, data_format, image_root = data_args.train_file, data_args.dataset_format, data_args.image_root
        name_split = data_args.train_split
    else:
        files = data_args.validation_file
        data_format = data_args.validation_format or data_args.dataset_format
        image_root = data_args.validation_image_root or data_args.image_root
        name_split = data_args.validation_split
        if files is None and data_args.dataset_format == "coco-karpathy" and data_args.train_file is not None:
            files = data_args.train_file  # the Karpathy file holds every split
    dataset_name = data_args.dataset_name if files is None else None
    if files is None and (dataset_name is None or name_split is None):
        return (None, None) if return_caption_column else None
    streaming = data_args.streaming and split == "train"  # evaluation sets are small, and read whole
    load = functools.partial(
        load_image_source,
        dataset_name=dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        data_files=_one_or_all(expand_data_files(files)) if files is not None else None,
        # A split by its name (a Hub dataset's, a save_to_disk DatasetDict's, a Karpathy file's), else the default's.
        split=name_split or split,
        image_column=data_args.image_column,
        streaming=streaming,
        dataset_format=data_format,
        image_root=image_root,
        return_caption_column=return_caption_column,
        on_bad_image=data_args.on_bad_image,
    )
    caption_column = data_args.caption_column or DEFAULT_CAPTION_COLUMNS
    try:
        optional = not (captions_required or data_args.caption_column or data_format)
        return load(caption_column=caption_column, captions_optional=optional)
    except (ValueError, FileNotFoundError) as error:
        option = ("--train_file" if split == "train" else "--validation_file") if files else "--dataset_name"
        raise type(error)(f"{option}: {error}") from error


def data_file_patterns(files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """
    The files, folders and glob patterns that data file arguments name: a string (`--train_file`), or several
    (`clipcap caption --data-files`), each split at its commas (`a.tar,b.tar`) unless it is an existing path; `~`
    expanded.
    """
    given = [files] if isinstance(files, (str, os.PathLike)) else files
    patterns = []
    for argument in map(str, given):
        whole = os.path.expanduser(argument)
        parts = [whole] if os.path.exists(whole) else [os.path.expanduser(part.strip()) for part in argument.split(",")]
        patterns += [part for part in parts if part]
    return patterns


def expand_data_files(files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """
    The data files that data file arguments name ([`data_file_patterns`]), in order, each once: a glob pattern
    (`shards/*.tar`) by its matches, sorted; a folder stays one folder. A path that exists is taken as it is, also
    where its name holds a wildcard character, as the loaders take it.
    """
    patterns = data_file_patterns(files)
    if not patterns:
        raise FileNotFoundError(f"{files!r} names no data file; give files, folders or glob patterns.")
    paths = []
    for pattern in patterns:
        magic = glob.has_magic(pattern) and not os.path.exists(pattern)
        matches = sorted(glob.glob(pattern, recursive=True)) if magic else [pattern]  # `**`: any depth, as datasets
        if not matches:
            raise FileNotFoundError(f"No file matches {pattern!r}.")
        paths.extend(matches)
    # A file matched twice (`shards/*.parquet,shards/part0.parquet`) would be read twice, its captions trained twice.
    first: dict[str, str] = {}
    for path in paths:
        first.setdefault(os.path.abspath(path), path)
    unique = list(first.values())
    if len(unique) < len(paths):
        logger.warning(f"{files!r} names {len(paths) - len(unique)} data file(s) more than once; each is read once.")
    return unique


def _one_or_all(paths: list[str]) -> list[str] | str:
    """One data file or folder as a path, as the loaders take a lone one; several as a list."""
    return paths[0] if len(paths) == 1 else paths


def _first_captions(source, count: int, whole_images: bool = False):
    """
    The first source rows that hold `count` captions (embedding the others would be wasted); with `whole_images`, also
    the later rows of the same images (a source with a row per caption), which hold the rest of their references.
    """
    if isinstance(source, datasets.IterableDataset):
        return source.take(count)  # each row has at least one caption
    lengths = pc.list_value_length(_arrow_column(source, CAPTIONS_COLUMN))
    totals = pc.cumulative_sum(lengths).to_pylist()
    rows = list(range(next((row + 1 for row, total in enumerate(totals) if total >= count), len(totals))))
    if whole_images:
        keys = _arrow_column(source, KEY_COLUMN).to_pylist()
        kept = {keys[row] for row in rows}
        rows += [row for row in range(len(rows), len(keys)) if keys[row] in kept]
    return source.select(rows)


def _first(rows, count: int):
    if isinstance(rows, datasets.IterableDataset):
        return rows.take(count)
    return rows.select(range(min(count, len(rows))))


# ---------------------------------------------------------------------------------------------------------------------
# Rows pointing into the embeddings


def _embedded_rows(train_source, eval_source, data_args, model, processor, train: bool):
    """Embed the sources (all processes, each its share) and give each caption a row into the shared table."""
    tables, cache_index = [], None
    cache_root = data_args.embedding_cache_dir or os.path.join(datasets.config.HF_DATASETS_CACHE, "clipcap_embeddings")
    if data_args.embeddings:
        check_embeddings(data_args.embeddings, model, processor.image_processor, finished=True)
        tables.append(load_embeddings(data_args.embeddings))
        if CAPTIONS_COLUMN not in tables[0].column_names:
            raise ValueError(
                f"--embeddings {data_args.embeddings} holds no captions (its source had no caption column); embed a "
                "source with captions (`clipcap embed ... --caption_column COLUMN`) to train on it."
            )
    sources = [source for source in (train_source, eval_source) if source is not None]
    if sources:
        if (Path(cache_root) / LEGACY_CACHE_INFO_NAME).exists():
            raise ValueError(
                f"--embedding_cache_dir {cache_root} is one embedding cache folder of an earlier version of "
                "clipcap_hf, which is not read any more. Give the folder of the caches (its parent, or a new folder): "
                "the embeddings are computed again there, and the old folder can then be deleted."
            )
        # Not into the --embeddings folder itself, should the cache root be it: training reads all of it, so the
        # evaluation images written there would be trained on by the next run. Its own subfolder, as any cache root.
        is_embeddings = bool(data_args.embeddings) and _same_folder(cache_root, data_args.embeddings)
        cache = embedding_cache_folder(cache_root, model, processor.image_processor, root_as_is=not is_embeddings)
        if (cache / LEGACY_CACHE_INFO_NAME).exists():  # this tower's folder, written by an earlier version
            raise ValueError(
                f"--embedding_cache_dir {cache_root}: {cache} is an embedding cache of an earlier version of "
                "clipcap_hf, which is not read any more. Delete that folder (its images are embedded again on the next "
                "run) or give another --embedding_cache_dir."
            )
        for source in sources:
            embed_source(
                source,
                model,
                processor.image_processor,
                cache,
                batch_size=data_args.embedding_batch_size,
                device=_embedding_device(),
                num_workers=data_args.preprocessing_num_workers,
                on_bad_image=data_args.on_bad_image,
            )
        cache_index = _KeyIndex(load_embeddings(cache), offset=sum(len(table) for table in tables))
        tables.append(cache_index.table)
    with _main_process_first():
        if data_args.embeddings:
            # Their cache files go to the cache root, not beside the folder's shards: the folder is only read (it may
            # be read-only, or shared by other runs).
            rows_cache = Path(cache_root) / "caption_rows"
            train_rows = _caption_rows(tables[0], index=None, cache_dir=rows_cache) if train else None
        else:
            train_rows = _caption_rows(train_source, cache_index) if train_source is not None else None
        eval_rows = _caption_rows(eval_source, cache_index, for_evaluation=True) if eval_source is not None else None
    table = datasets.concatenate_datasets(tables) if len(tables) > 1 else tables[0]
    return train_rows, eval_rows, table.select_columns(EMBEDDING_COLUMN).with_format("torch")


# Part of the cached caption rows' fingerprint: rows cached by a version that named images otherwise (webdataset ids
# without their shard, before 2) are not reused.
CAPTION_ROWS_FORMAT = 2


def _caption_rows(
    source: datasets.Dataset, index: _KeyIndex | None, for_evaluation: bool = False, cache_dir: Path | None = None
) -> datasets.Dataset:
    """
    One row per caption (`caption`, `image_index`); images not in the table (skipped as unreadable) are left out.
    Without an `index` the source is the embeddings folder itself, and its rows are the table's. The rows are cached
    in `cache_dir` when given, else beside the source's own cache files (`datasets`' default).
    """
    columns = [KEY_COLUMN, CAPTIONS_COLUMN]
    if for_evaluation:  # predictions name each image
        source = source.cast_column("image", datasets.Image(decode=False))
        columns += ["image"] + [name for name in _ID_COLUMNS if name in source.column_names]
    # Named by what it is made of: hashing the key index would read every key.
    table_fingerprint = index.table._fingerprint if index is not None else None
    fingerprint = Hasher.hash(
        [CAPTION_ROWS_FORMAT, source._fingerprint, table_fingerprint, index and index.offset, for_evaluation]
    )
    cache_file_name = None
    if cache_dir is not None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OSError(
                f"Cannot write the caption rows of --embeddings to {cache_dir} ({type(error).__name__}: {error}); give "
                "a writable --embedding_cache_dir."
            ) from error
        cache_file_name = str(cache_dir / f"{fingerprint}.arrow")
    return source.select_columns(columns).map(
        _explode,
        batched=True,
        with_indices=index is None,
        remove_columns=columns,
        fn_kwargs={"index": index, "for_evaluation": for_evaluation},
        new_fingerprint=fingerprint,
        cache_file_name=cache_file_name,
        desc="Caption rows",
    )


# The columns that name an image in predictions (see `_image_id_and_path`).
_ID_COLUMNS = ("image_id", "image_path", WEBDATASET_KEY, SHARD_COLUMN)


def _explode(
    batch: dict[str, list], indices: list[int] | None = None, *, index: _KeyIndex | None, for_evaluation: bool
) -> dict[str, list]:
    rows: dict[str, list] = {"caption": [], "image_index": []}
    if for_evaluation:
        rows.update(image_id=[], image_path=[])
    image_rows = index.rows(batch[KEY_COLUMN]) if index is not None else indices
    for position, (key, captions) in enumerate(zip(batch[KEY_COLUMN], batch[CAPTIONS_COLUMN])):
        image_index = int(image_rows[position])
        if image_index < 0:
            continue
        rows["caption"].extend(captions)
        rows["image_index"].extend([image_index] * len(captions))
        if for_evaluation:
            image_id, image_path = _image_id_and_path(batch, position, key)
            rows["image_id"].extend([image_id] * len(captions))
            rows["image_path"].extend([image_path] * len(captions))
    return rows


def _image_id_and_path(batch: dict[str, list], position: int, key: str) -> tuple[Any, str | None]:
    """
    How predictions name an image: the source's `image_id`, else a webdataset sample's shard and `__key__`
    (`00001.tar/000123`: shards written one by one may each number their samples from 0), else the image key; and its
    file.
    """
    if "image_id" in batch:
        image_id = batch["image_id"][position]
    elif WEBDATASET_KEY in batch:
        image_id = f"{os.path.basename(batch[SHARD_COLUMN][position])}/{batch[WEBDATASET_KEY][position]}"
    else:
        image_id = key
    image = batch.get("image", [None] * (position + 1))[position] or {}
    path = batch["image_path"][position] if "image_path" in batch else image.get("path")
    return str(image_id) if not isinstance(image_id, int) else image_id, path


# ---------------------------------------------------------------------------------------------------------------------
# Rows with images (training from pixels)


def _pixel_rows(source, data_args, name: str):
    """One row per caption with its `image`, unreadable images raised or left out (`--on_bad_image`)."""
    # The shard (in the id columns) and the row's number also name an unreadable image.
    naming = (*_ID_COLUMNS, SOURCE_ROW_COLUMN)
    columns = [KEY_COLUMN, CAPTIONS_COLUMN, "image"] + [c for c in naming if c in (source.features or {})]
    source = source.select_columns(columns)
    if isinstance(source, datasets.IterableDataset):
        # Read lazily: each image is decoded (and checked) when its captions come up.
        return source.map(
            _explode_with_images, batched=True, remove_columns=columns, fn_kwargs={"policy": data_args.on_bad_image}
        )
    undecoded = source.cast_column("image", datasets.Image(decode=False))
    bad = _unreadable(undecoded, data_args, name)
    keep = [row for row, key in enumerate(undecoded[KEY_COLUMN]) if key not in bad]
    with _main_process_first():
        rows = undecoded.select(keep).map(_explode_paths, batched=True, remove_columns=columns, desc="Caption rows")
    return rows.cast_column("image", datasets.Image())


def _unreadable(source: datasets.Dataset, data_args, name: str) -> set[str]:
    """The keys of the images that do not open, after raising for them unless `--on_bad_image skip`."""
    problems: dict[str, str] = {}
    for row_index, row in enumerate(source):
        if row[KEY_COLUMN] in problems:
            continue
        _, problem = _read(row, row_index, image_processor=None)
        if problem is not None:
            problems[row[KEY_COLUMN]] = problem
    report = "\n".join(list(problems.values())[:10])
    if problems and data_args.on_bad_image == "error":
        raise ValueError(
            f"{len(problems)} {name} image(s) cannot be read; nothing was trained. Fix or remove them, or skip them "
            f"(`--on_bad_image skip`):\n{report}"
        )
    if problems:
        logger.warning(f"Skipped {len(problems)} unreadable {name} image(s) and their captions:\n{report}")
    return set(problems)


def _explode_paths(batch: dict[str, list]) -> dict[str, list]:
    rows: dict[str, list] = {"caption": [], "image": [], "image_id": [], "image_path": []}
    for position, (key, captions, image) in enumerate(zip(batch[KEY_COLUMN], batch[CAPTIONS_COLUMN], batch["image"])):
        image_id, image_path = _image_id_and_path(batch, position, key)
        for caption in captions:
            rows["caption"].append(caption)
            rows["image"].append(image)
            rows["image_id"].append(image_id)
            rows["image_path"].append(image_path)
    return rows


def _explode_with_images(batch: dict[str, list], policy: str) -> dict[str, list]:
    rows: dict[str, list] = {"caption": [], "image": []}
    for position, (captions, image) in enumerate(zip(batch[CAPTIONS_COLUMN], batch["image"])):
        try:
            decoded = decode_image(image)
        except Exception as error:  # any decoding failure, named with the image's shard, sample and key
            problem = _unreadable_image({name: values[position] for name, values in batch.items()}, None, error)
            if policy == "skip":
                logger.warning(f"Skipping an unreadable image: {problem}.")
                continue
            raise ValueError(
                f"An image cannot be read: {problem}; fix or remove it, or skip such images (`--on_bad_image skip`)."
            ) from error
        rows["caption"].extend(captions)
        rows["image"].extend([decoded] * len(captions))
    return rows


def _images_of(rows: datasets.Dataset) -> datasets.Dataset:
    """
    One row per image id of caption rows, with all its captions as `references` (evaluation sets are small). By id,
    not by embedding row: two ids whose files hold the same bytes share an embedding but are two evaluated images.
    """
    first_row: dict[Any, int] = {}
    references: dict[Any, list[str]] = {}
    embedding_rows = rows["image_index"] if "image_index" in rows.column_names else None
    for row, (image_id, caption) in enumerate(zip(rows["image_id"], rows["caption"])):
        first = first_row.setdefault(image_id, row)
        if embedding_rows is not None and embedding_rows[row] != embedding_rows[first]:
            raise ValueError(
                f"The evaluation source gives the image id {image_id!r} to two different images (rows {first} and "
                f"{row} of its captions); predictions are named by image id, so each image needs an id of its own."
            )
        references.setdefault(image_id, []).append(caption)
    per_caption = [name for name in ("caption", "length") if name in rows.column_names]
    images = rows.select(list(first_row.values())).remove_columns(per_caption)
    return images.add_column("references", list(references.values()))


# ---------------------------------------------------------------------------------------------------------------------
# Processes


@contextlib.contextmanager
def _main_process_first() -> Iterator[None]:
    """The main process writes the caption rows first; the others then find them in the datasets cache."""
    if _process_rank() != 0:
        _barrier()
    yield
    if _process_rank() == 0:
        _barrier()


def _same_folder(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    return os.path.realpath(first) == os.path.realpath(second)


def _embedding_device() -> torch.device:
    """Where the vision tower embeds: this process's GPU in a distributed run, else CUDA when there is one."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _arrow_column(dataset: datasets.Dataset, name: str):
    """One column as Arrow (what `select` left of it), for Arrow's compute functions."""
    return dataset.select_columns(name).with_format("arrow")[:][name]


def _has_lengths(split) -> bool:
    return isinstance(split, datasets.Dataset) and "length" in split.column_names and len(split) > 0
