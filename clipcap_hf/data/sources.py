"""Image sources through `datasets`: any image (and caption) data, one row per image with a stable key.

[`load_image_source`] reads a Hub dataset, data files that a `datasets` builder reads (webdataset `.tar` shards,
parquet, JSON Lines/JSON/CSV naming image files, Arrow), a folder written by `Dataset.save_to_disk`, an image folder,
or one of the caption formats of [`DATASET_FORMATS`], and gives every source the same columns: `image`, `image_key`
and, when it has captions, `captions`.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import datasets
import pandas
import PIL.Image
import pyarrow
import pyarrow.compute as pc
from datasets.data_files import DEFAULT_PATTERNS_ALL, SPLIT_KEYWORDS, DataFilesDict, get_data_patterns
from datasets.fingerprint import Hasher
from transformers.utils import logging

from ..utils.bad_images import BadImagePolicy, check_bad_image_policy
from ..utils.file_utils import not_utf8_error
from .loaders import DATASET_FORMATS, PathLike, group_by_image, load_caption_dataset

# The `datasets` builder of each data file suffix.
BUILDERS = {
    ".tar": "webdataset",
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".arrow": "arrow",
}
# Columns that datasets' webdataset builder adds to every row: the sample's key and its shard.
WEBDATASET_KEY, SHARD_COLUMN = "__key__", "__url__"
# A map-style row's number in its parquet file (beside `__url__`), else in the source: it names a bad row in errors, and
# stays right when rows before it are left out (`on_bad_image="skip"`), as a position counted afterwards would not.
SOURCE_ROW_COLUMN = "__row__"
# The key of a row without an image while it is being left out (`on_bad_image="skip"`): no image's key is empty.
NULL_IMAGE_KEY = ""
# The usual caption columns, in order of preference: most sources' `caption`, webdataset shards' `txt` (the captions'
# file extension), image folders' `text`.
DEFAULT_CAPTION_COLUMNS = ("caption", "txt", "text")
# The suffixes of data files that a folder given as data files may hold (its shards), read with their builder.
SHARD_SUFFIXES = (".tar", ".parquet")
# Image files per input shard of a streamed image folder (see `_stream_in_file_groups`).
IMAGE_FOLDER_SHARD_SIZE = 1000
# What a data file that does not read raises through `datasets`: its own errors, the tar reader's, and pyarrow's (an
# `ArrowInvalid` is a ValueError; a damaged parquet file's `Couldn't deserialize thrift` an OSError).
_DATA_FILE_ERRORS = (datasets.exceptions.DatasetGenerationError, StopIteration, tarfile.TarError, ValueError, OSError)
# What a stream's data file that does not read raises midway, bare: pyarrow's errors (a malformed JSON line's
# `ArrowInvalid`, a damaged parquet or Arrow file's `OSError`), pandas' (a CSV line with too many fields) and the tar
# reader's. Not the plain ValueErrors of its rows (a row without an image), which name their row themselves.
_STREAM_READ_ERRORS = (pyarrow.ArrowException, OSError, tarfile.TarError, pandas.errors.ParserError)

logger = logging.get_logger(__name__)


def load_image_source(
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_files: PathLike | Sequence[PathLike] | None = None,
    split: str = "train",
    image_column: str | None = None,
    caption_column: str | Sequence[str] | None = None,
    streaming: bool = False,
    dataset_format: str | None = None,
    image_root: PathLike | None = None,
    captions_optional: bool = False,
    return_caption_column: bool = False,
    on_bad_image: BadImagePolicy = "error",
) -> datasets.Dataset | datasets.IterableDataset | tuple[datasets.Dataset | datasets.IterableDataset, str | None]:
    """
    Load images (and their captions) from any source `datasets` reads, one row per source row, with the columns

    - `image`: a `datasets.Image` feature: a PIL image on access (cast it to `Image(decode=False)` for the
      `{"bytes", "path"}` value); with `streaming`, the undecoded `{"bytes", "path"}` value ([`decode_image`]
      decodes it),
    - `image_key`: a stable key of the image: for a file its absolute path, size and modification time (see
      [`image_cache_key`]), for image bytes (parquet, webdataset, Hub datasets) `sha256:<hash of the bytes>`,
    - `captions` (when there is a caption column): the row's captions, a list of strings,
    - `__row__` (not with `streaming`, nor for webdataset shards, whose samples have `__key__`): the row's number
      (from 0) in its parquet or Arrow file (named in `__url__`), or else in the source, by which errors name the row,

    and the source's other columns (webdataset shards keep `__key__` and `__url__`, the shard's file).

    Args:
        dataset_name: a Hub dataset (or a local dataset script/folder) for `datasets.load_dataset`.
        dataset_config_name: its configuration.
        data_files: data files (or one folder) instead: webdataset `.tar` shards, `.parquet`, `.jsonl`/`.json`/
            `.csv` (whose image column holds file paths, relative to `image_root` or else to the files' folder: files
            in several folders need `image_root`), `.arrow`, a folder of `.tar`/`.parquet` shards (those of `split`
            when their names carry split names, as `train-00000-of-00001.parquet`), a folder written by
            `save_to_disk`, or an image folder (`metadata.jsonl`/`.csv` beside the images).
        split: the split to read (`train`, `validation`, ...).
        image_column: the column holding the image (a `datasets.Image`, image bytes, a `{bytes, path}` struct or a
            file path); default `image`, or the first image column of the source (`jpg`, `png`, ... in webdataset
            shards).
        caption_column: the column holding a caption string or a list of captions (`text`, `caption`, `txt`, ...);
            several names (such as [`DEFAULT_CAPTION_COLUMNS`]): the first one the source has (with a warning naming
            it when the source has several of them); `None` for images without captions.
        streaming: return an `IterableDataset` read lazily, without preparing the whole source first.
        dataset_format: one of [`DATASET_FORMATS`] (`coco-karpathy`, `coco`, `conceptual-captions`, `nocaps`,
            `imagefolder`): `data_files` is then that format's file (or folder), read by its loader and grouped by
            image; captions come in `captions` whatever `caption_column` says.
        image_root: the folder that image paths are relative to (caption formats, JSON/CSV files).
        captions_optional: a source without `caption_column` is read without captions instead of refused.
        return_caption_column: also return the column the captions were read from (the one chosen of several names;
            `captions` for a `dataset_format`; None without captions), for a caller to record or check it.
        on_bad_image: a row without an image (null) raises naming it (`"error"`), or is left out with a warning that
            names it (`"skip"`, the policy that embedding, training and captioning apply to unreadable images; those
            are found when the images are decoded, not here).

    Returns:
        A `datasets.Dataset` (or `IterableDataset` with `streaming`); with `return_caption_column`, a tuple of it and
        the caption column. A missing column is a `ValueError` listing the
        columns the source has; a row without an image (unless skipped) or caption is one naming its file (or shard
        and `__key__`) and row.
    """
    check_bad_image_policy(on_bad_image)
    source = dataset_name or dataset_format or _describe(data_files)
    if dataset_format is not None:
        dataset = _from_caption_format(dataset_format, data_files, image_root, split)
        image_column, caption_column = "image", "captions"
    elif dataset_name is not None:
        # No loading script runs (datasets 3.x runs one where HF_DATASETS_TRUST_REMOTE_CODE is set; 4.x has none).
        dataset = datasets.load_dataset(
            dataset_name, dataset_config_name, split=split, streaming=streaming, trust_remote_code=False
        )
    elif data_files is not None:
        # The split's shards, of a folder or of listed files (a shell-expanded `data/*.parquet`) alike.
        data_files = _folder_shards(data_files, split) or _listed_shards_of_split(data_files, split)
        dataset = _from_data_files(data_files, split, streaming)
    else:
        raise ValueError("Give a source: --dataset_name, or --train_file/--validation_file (data files or a folder).")
    if streaming and isinstance(dataset, datasets.Dataset):
        dataset = dataset.to_iterable_dataset()
    if isinstance(dataset, datasets.IterableDataset) and dataset.features is None:
        try:
            dataset = dataset._resolve_features()  # reads the first rows only
        except _STREAM_READ_ERRORS as error:  # the first file's first rows do not read
            _raise_naming_the_data_file(error, dataset)
    image_column = image_column or _default_image_column(dataset, source)
    if caption_column is not None and not isinstance(caption_column, str):
        caption_column = _first_caption_column(dataset.features, caption_column, source)
    if captions_optional and caption_column not in (dataset.features or {}):
        caption_column = None  # decided before any key is computed: the keys are computed once
    _require_columns(dataset, [image_column] + ([caption_column] if caption_column else []), source)
    feature = dataset.features[image_column]
    # Relative image paths: relative to --image_root, else to the folder of the files.
    root = image_root if image_root is not None else _files_folder(data_files)
    if _holds_paths(feature):  # paths in a JSON/CSV file
        dataset = _rooted(dataset, image_column, root, source)
    elif not isinstance(feature, datasets.Image) and not _holds_image_bytes(feature):
        raise ValueError(
            f"{source}: the image column {image_column!r} holds {feature}, not images; give a column of image files' "
            "paths (strings), image bytes or {bytes, path} structs, and name it with --image_column."
        )
    # Parquet written without datasets' schema (a {bytes, path} struct or raw bytes) becomes an Image column here.
    # Undecoded from here on: keys hash the stored bytes (renaming a decoded column of an IterableDataset would
    # re-encode them), and nothing is decoded before it is used.
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if _builder_of(_file_list(data_files)) in ("parquet", "arrow") and _has_relative_paths(dataset, image_column):
        # Images stored as a path without bytes ({bytes: None, path: "a.png"}, as datasets writes an Image column of
        # files): as path strings are, not relative to the working folder.
        dataset = _rooted(dataset, image_column, root, source)
    if image_column != "image":
        if "image" in dataset.column_names:
            dataset = dataset.remove_columns("image")
        dataset = dataset.rename_column(image_column, "image")
    shards = file_rows = None
    if dataset_format is None and dataset_name is None:  # rows read from `data_files` themselves
        shards = _counted_shards(dataset, data_files)
        file_rows = shards if shards is not None else _rows_per_file_on_error(dataset, data_files)
    dataset = _add_keys_and_captions(dataset, caption_column, source, shards, file_rows, on_bad_image == "skip")
    return (dataset, caption_column) if return_caption_column else dataset


def image_key(image: dict[str, Any] | None) -> str:
    """The stable key of an undecoded `datasets.Image` value (`{"bytes", "path"}`): see [`load_image_source`]."""
    if _is_null_image(image):
        raise ValueError("No image (the image is null).")
    if image.get("bytes") is not None:
        return "sha256:" + hashlib.sha256(image["bytes"]).hexdigest()
    from .embeddings import image_cache_key

    return image_cache_key(os.path.abspath(image["path"]))


def _is_null_image(image: dict[str, Any] | None) -> bool:
    return image is None or (image.get("bytes") is None and image.get("path") is None)


def decode_image(image: dict[str, Any]) -> PIL.Image.Image:
    """Fully decode an undecoded `datasets.Image` value (a truncated image fails here, not in a training step)."""
    import io

    if _is_null_image(image):
        raise ValueError("the image holds neither bytes nor a path")
    with PIL.Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image["path"]) as opened:
        opened.load()
        return opened.copy()


def describe_image_error(error: Exception) -> str:
    """`<type>: <message>` of an image that failed to decode, without the in-memory file PIL names for image bytes
    (`<_io.BytesIO object at 0x...>`, which says nothing)."""
    message = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error))
    return f"{type(error).__name__}: {message}"


def _folder_shards(data_files, split: str) -> list[str] | None:
    """
    The shards (`.tar` or `.parquet` files, see [`SHARD_SUFFIXES`]) directly in a folder given as the data files, which
    are read as those files; None for anything else (files, an image folder: its `metadata.parquet` is no shard). Shards
    whose names carry split names as `datasets` reads them (`train-00000-of-00001.parquet`, `test_0.tar`, ...) are
    those of `split` only; a folder without the split asked for is refused.
    """
    files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    if len(files) != 1 or not os.path.isdir(files[0]):
        return None
    shards = [
        str(path)
        for path in sorted(Path(files[0]).iterdir())
        if path.is_file() and path.suffix.lower() in SHARD_SUFFIXES and path.stem != "metadata"
    ]
    by_split = _shards_by_split(files[0], shards) if shards else {}
    if not by_split:
        return shards or None
    if split not in by_split:
        named = ", ".join(os.path.basename(shard) for shards_of_split in by_split.values() for shard in shards_of_split)
        raise ValueError(
            f"{files[0]} holds shards of the splits {', '.join(by_split)} ({named}), none of split {split!r}: ask for "
            "one of those splits (--train_split/--validation_split), or give the data files themselves."
        )
    return by_split[split]


def _shards_by_split(folder: PathLike, shards: list[str]) -> dict[str, list[str]]:
    """
    The shards of each split that their file names carry, found by `datasets`' own data file patterns (as
    `load_dataset` finds the splits of a folder); empty when no shard's name carries a split.
    """
    patterns = get_data_patterns(str(folder))
    if patterns == DEFAULT_PATTERNS_ALL:  # no file named for a split: all of it is `train`
        return {}
    # The patterns may match files below the folder too; only its own shards are read.
    by_split = {}
    for name, split_files in DataFilesDict.from_patterns(patterns, base_path=str(folder)).items():
        split_files = set(map(os.path.abspath, split_files))
        split_shards = [shard for shard in shards if os.path.abspath(shard) in split_files]
        if split_shards:
            by_split[str(name)] = split_shards
    return by_split


def _listed_shards_of_split(data_files, split: str):
    """
    Of listed `.tar`/`.parquet` files whose names carry several splits (a shell-expanded `data/*.parquet` holding
    `train-00000-of-00001.parquet` and `validation-00000-of-00001.parquet`), those of `split`, as [`_folder_shards`]
    reads a folder of them; a split they lack is refused. Files of one split only, or without split names, are read as
    listed: they are the split (`--validation_file data/test-*.parquet`).
    """
    if isinstance(data_files, (str, os.PathLike)):
        return data_files
    files = [str(path) for path in data_files]
    shards = [path for path in files if Path(path).suffix.lower() in SHARD_SUFFIXES and os.path.isfile(path)]
    # Their folders are scanned only where a name may carry a split: img2dataset's hold three files a shard.
    named_for_splits = any(_may_name_a_split(os.path.basename(path)) for path in shards)
    if len(files) < 2 or len(shards) < len(files) or not named_for_splits:
        return data_files
    by_split: dict[str, list[str]] = {}
    for folder in dict.fromkeys(os.path.dirname(os.path.abspath(path)) for path in shards):
        in_folder = [path for path in shards if os.path.dirname(os.path.abspath(path)) == folder]
        for name, split_shards in _shards_by_split(folder, in_folder).items():
            by_split.setdefault(name, []).extend(split_shards)
    if len(by_split) < 2:
        return data_files
    if split not in by_split:
        named = ", ".join(os.path.basename(shard) for shards_of_split in by_split.values() for shard in shards_of_split)
        raise ValueError(
            f"{_describe(files)}: the files are shards of the splits {', '.join(by_split)} ({named}), none of split "
            f"{split!r}: ask for one of those splits (--train_split/--validation_split, `clipcap caption --split`), or "
            "give only the files to read."
        )
    chosen = set(by_split[split])
    left_out = [os.path.basename(path) for path in files if path not in chosen]
    logger.warning(
        f"Reading the {len(chosen)} listed file(s) of split {split!r}; {len(left_out)} of other splits are left out "
        f"({', '.join(left_out[:5])}{', ...' if len(left_out) > 5 else ''}). Ask for their split to read those."
    )
    return [path for path in files if path in chosen]  # in the order listed


# A file name or relative path `datasets` may read a split from: `<split>-00000-of-00001.parquet`, or a split keyword
# between separators (`test_0.tar`, `coco-val.parquet`, `validation/0001.png`); see `datasets.data_files`.
_SPLIT_IN_NAME = re.compile(
    r"-\d{5}-of-\d{5}|(^|[-._ \d/])("
    + "|".join(re.escape(str(keyword)) for keywords in SPLIT_KEYWORDS.values() for keyword in keywords)
    + r")[-._ \d/]"
)


def _may_name_a_split(name: str) -> bool:
    return _SPLIT_IN_NAME.search(name) is not None


def _not_utf8(paths: Sequence[PathLike]) -> str | None:
    """The error naming the first of the text files `paths` that is not UTF-8 (and the line of its bad byte), if any."""
    return next(filter(None, map(not_utf8_error, paths)), None)


def _first_caption_column(features: datasets.Features, candidates: Sequence[str], source: str) -> str:
    """
    The first of the candidate caption columns the source has, else the first, which the column checks name as
    missing. A source with several of them is warned of, naming the one read: the others may be the captions meant
    (an image folder's `text` was read over its `caption` by earlier versions).
    """
    present = [name for name in candidates if name in features]
    if len(present) > 1:
        logger.warning(
            f"{source} has several caption columns ({', '.join(present)}): reading the captions from {present[0]!r}, "
            f"the first of {', '.join(candidates)}; name another with --caption_column."
        )
    return present[0] if present else candidates[0]


def _from_data_files(data_files, split: str, streaming: bool):
    files = _file_list(data_files)
    if len(files) == 1 and os.path.isdir(files[0]):
        folder = Path(files[0])
        if (folder / datasets.config.DATASET_STATE_JSON_FILENAME).exists() or (
            folder / datasets.config.DATASETDICT_JSON_FILENAME
        ).exists():
            loaded = datasets.load_from_disk(str(folder))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"{folder} (save_to_disk) has no split {split!r}; it has {sorted(loaded)}.")
                loaded = loaded[split]
            return loaded
        return _load_image_folder(folder, split, streaming)
    missing = [path for path in files if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(f"Data file {missing[0]} does not exist.")
    builder = _builder_of(files)
    if builder is None:
        raise ValueError(
            f"Cannot tell how to read {_describe(files)}: give files of one kind, with one of the suffixes "
            f"{', '.join(BUILDERS)}, a folder (image folder or save_to_disk), or a --dataset_format."
        )
    if streaming and builder in ("json", "csv") and (problem := _not_utf8(files)):
        raise ValueError(problem)
    if streaming and builder == "webdataset" and (problem := next(filter(None, map(_undecodable_shard, files)), None)):
        raise ValueError(problem)  # else it fails midway with the decoder's bare error
    try:
        dataset = datasets.load_dataset(builder, data_files={"train": files}, split="train", streaming=streaming)
    except _DATA_FILE_ERRORS as error:
        # datasets' own errors name no file ("An error occurred while generating the dataset"): read each file alone.
        # (pandas reads a CSV file that is not UTF-8 with a bare UnicodeDecodeError: named with its line instead.)
        problem = (builder == "csv" and _not_utf8(files)) or _unreadable_data_file(builder, files)
        if problem is None:
            raise
        raise ValueError(problem) from error
    if builder == "json" and isinstance(dataset, datasets.Dataset):
        # pyarrow's JSON reader keeps text that is not UTF-8 as it is: it would fail later, naming no file.
        try:
            dataset.data.table.validate(full=True)
        except pyarrow.ArrowInvalid as error:
            problem = _not_utf8(files)
            if problem is None:
                raise
            raise ValueError(problem) from error
    return dataset


def _unreadable_data_file(builder: str, files: list[str], streaming: bool = False) -> str | None:
    """
    What keeps `files` from reading together, naming the file: the first that does not read alone (or holds no rows),
    or the first whose columns differ from the first file's; None if neither (the error is another). `streaming`:
    the files of a stream, read through as a stream (see [`_read_alone`]).
    """
    features = []
    for path in files:
        try:
            num_rows, columns = _read_alone(builder, path, streaming)
        except _DATA_FILE_ERRORS as error:
            cause = error
            while cause.__cause__ is not None:  # the reader's own words, beneath datasets' wrapping
                cause = cause.__cause__
            reason = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
            if isinstance(cause, StopIteration) or "corresponds to no data" in str(cause):
                reason = "it holds no rows"
            elif builder == "json" and _ARROW_JSON_ROW.search(reason):
                reason = _naming_the_json_line(reason, path)
            elif builder == "webdataset" and (problem := _undecodable_shard(path)):
                return problem
            return f"{path} cannot be read as {builder} data ({reason}); fix or remove it."
        if num_rows == 0:
            return f"{path} cannot be read as {builder} data (it holds no rows); fix or remove it."
        features.append(columns)
        if columns != features[0]:
            return (
                f"{path} and {files[0]} give their columns differently ({_describe_features(columns)} against "
                f"{_describe_features(features[0])}); write every file with the same columns and types."
            )
    return None


# The row that pyarrow's JSON reader names in its parse errors, counted from the start of the block it was reading
# (a few thousand lines in): not the file's line.
_ARROW_JSON_ROW = re.compile(r"\s*in row \d+")


def _naming_the_json_line(reason: str, path: PathLike) -> str:
    """pyarrow's JSON parse error `reason` with its row (see [`_ARROW_JSON_ROW`]) replaced by the file's first line
    that is not a JSON object (see [`_first_non_object_line`]); dropped if there is none."""
    reason = _ARROW_JSON_ROW.sub("", reason)
    number = _first_non_object_line(path)
    return f"line {number}: {reason}" if number is not None else reason


def _first_non_object_line(path: PathLike) -> int | None:
    """The first line (from 1) of a JSON Lines file that is not blank and not a JSON object (or not UTF-8), if any.
    Read only when pyarrow's reader has failed: its error names a row of the block it was reading, not the line."""
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                if not isinstance(json.loads(line), dict):
                    return number
            except ValueError:  # not JSON, or not UTF-8
                return number
    return None


def _malformed_metadata(paths: Iterable[PathLike], error: Exception) -> str | None:
    """
    What keeps an image folder's `metadata.jsonl` files (among `paths`) from reading, with pyarrow's `error`: the
    first line that is no JSON object, named with its file; None if every line is one. `datasets`' imagefolder reader
    raises pyarrow's bare error, which names neither.
    """
    for path in paths:
        if os.path.basename(path) == "metadata.jsonl" and (number := _first_non_object_line(path)) is not None:
            reason = _ARROW_JSON_ROW.sub("", f"{type(error).__name__}: {error}")
            return (
                f"{path} cannot be read as the image folder's metadata (line {number}: {reason}); fix that line: each "
                'line is one JSON object, such as {"file_name": "0001.png", "text": "A dog."}.'
            )
    return None


def _undecodable_shard(path: str) -> str | None:
    """
    What keeps a webdataset shard from reading, naming its first member that `datasets`' decoder for its suffix
    rejects (a `.txt` caption that is not UTF-8, a `.json` that does not parse, a `.cls` that is no number); None if
    every member decodes. The builder's own error names neither the member nor its sample. Members without a decoder
    (the images) are skipped unread; a tar file cut short is found as its members are listed.
    """
    from datasets.packaged_modules.webdataset.webdataset import WebDataset

    try:
        with tarfile.open(path) as tar:
            for member in tar:
                decode = WebDataset.DECODERS.get(member.name.rsplit(".", 1)[-1].lower())
                if decode is None or not member.isfile():
                    continue
                try:
                    decode(tar.extractfile(member).read())
                except Exception as error:  # each decoder raises its own kind (UnicodeDecodeError, ValueError, ...)
                    reason = f"its member {member.name}: {type(error).__name__}: {error}"
                    return f"{path} cannot be read as webdataset data ({reason}); fix or remove it."
    except tarfile.TarError as error:  # cut short (a partial copy) or damaged: the builder's error is as bare
        return (
            f"{path} cannot be read as webdataset data (a damaged or incomplete tar file: {type(error).__name__}: "
            f"{error}); copy it again, or fix or remove it."
        )
    return None


def read_stream(rows: Iterable, dataset) -> Iterator:
    """
    `rows` (rows or batches) as read from `dataset`, an `IterableDataset`: a data file that does not read raises midway
    naming no file (pyarrow's bare `ArrowInvalid` of a malformed JSON line), so the stream's local data files are then
    read again, each alone, to name it (see [`_unreadable_data_file`]) in a ValueError chained to the original. Other
    errors, and those of streams whose files are not known or not of one builder, are raised as they are.
    """
    try:
        yield from rows
    except _STREAM_READ_ERRORS as error:
        _raise_naming_the_data_file(error, dataset)


def _raise_naming_the_data_file(error: Exception, dataset) -> NoReturn:
    """Raise `error`, met reading the stream `dataset`, as a ValueError naming the data file that does not read (see
    [`read_stream`]); as it is if none is found."""
    files = stream_data_files(dataset)
    builder = _builder_of(files)
    problem = builder and _unreadable_data_file(builder, files, streaming=True)  # read again only on a failure
    if builder is None and isinstance(error, pyarrow.ArrowInvalid):  # an image folder's files: images and metadata
        problem = _malformed_metadata(files, error)
    if not problem:
        raise error
    raise ValueError(problem) from error


def stream_data_files(dataset) -> list[str]:
    """
    Each local data file an `IterableDataset` reads, once, as its loader spells it, in the order of its input shards;
    none where they are not known (one not read from local files, such as one made with `to_iterable_dataset` or
    streamed from the Hub). They are the `datasets` loader's arguments, found under the dataset's wrapping iterables:
    paths, or an image folder's tuples holding the path.
    """
    iterable = getattr(dataset, "_ex_iterable", None)
    while getattr(iterable, "ex_iterable", None) is not None:
        iterable = iterable.ex_iterable
    paths = []
    for value in (getattr(iterable, "kwargs", None) or {}).values():
        if isinstance(value, (list, tuple)):
            items = [part for item in value for part in (item if isinstance(item, tuple) else (item,))]
            paths += [item for item in items if isinstance(item, str) and os.path.isfile(item)]
    return list(dict.fromkeys(paths))  # JSON and Parquet loaders name each file twice, an image folder's tuples too


def _read_alone(builder: str, path: str, streaming: bool = False) -> tuple[int, datasets.Features]:
    """
    One data file of a source read on its own by the source's builder: its row count and columns. Map-style it is
    prepared into `datasets`' cache (once: the source's own load reads that next); streamed it is read through as
    Arrow batches, nothing decoded and nothing written (a stream's files are not to be copied).
    """
    if not streaming:
        alone = datasets.load_dataset(builder, data_files={"train": [path]}, split="train")
        return alone.num_rows, alone.features
    alone = datasets.load_dataset(builder, data_files={"train": [path]}, split="train", streaming=True)
    alone = alone._resolve_features()  # reads the first rows
    return sum(batch.num_rows for batch in alone.with_format("arrow").iter(batch_size=10_000)), alone.features


def _describe_features(features: datasets.Features) -> str:
    return ", ".join(f"{name}: {feature}" for name, feature in features.items())


def _builder_of(files: list[str]) -> str | None:
    """The `datasets` builder that reads every one of `files` (by suffix, `BUILDERS`); None if they need several, or
    one has a suffix no builder reads."""
    builders = {BUILDERS.get(Path(path).suffix.lower()) for path in files}
    return builders.pop() if len(builders) == 1 else None


def _load_image_folder(folder: Path, split: str, streaming: bool):
    """
    An image folder through `datasets`' imagefolder builder: its `split` (a folder of train/ and validation/, ...), or
    the whole folder when it has no split folders or files, as a folder of shards without split names is read. It
    parses `metadata.jsonl` with pyarrow, which refuses a field that changes type between lines (a caption on one, a
    list on another) naming neither file nor line, and a metadata file that is not UTF-8 fails naming none: these are
    found here and named, with the fix. Images its metadata files do not list, which it leaves out, are warned of.
    """
    from datasets.utils.info_utils import is_small_dataset

    try:
        # `load_dataset`'s steps, with the builder kept: its data files are the split's files the reader resolved,
        # which the unlisted images are found among (resolving them again walked the whole folder a second time).
        builder = datasets.load_dataset_builder("imagefolder", data_dir=str(folder))
        splits = [str(name) for name in builder.config.data_files]
        if split not in splits:
            train_files = builder.config.data_files.get("train", [])
            if splits == ["train"] and not any(_may_name_a_split(os.path.relpath(f, folder)) for f in train_files):
                split = "train"  # no split names: all of it is `train`, whichever split is asked for
            else:
                raise ValueError(
                    f"{folder} (an image folder) has no split {split!r}; it has the splits {', '.join(splits)}: ask "
                    "for one of those (--train_split/--validation_split), or give that split's folder."
                )
        if streaming:
            metadata = [path for path in builder.config.data_files[split] if _is_metadata_file(path)]
            if problem := _not_utf8(metadata):
                raise ValueError(problem)
            return _stream_in_file_groups(builder, split)  # not read ahead to count its rows
        builder.download_and_prepare()
        dataset = builder.as_dataset(split=split, in_memory=is_small_dataset(builder.info.dataset_size))
    except pyarrow.ArrowInvalid as error:
        metadata = sorted(folder.rglob("metadata.jsonl"))
        if problem := _malformed_metadata(metadata, error):
            raise ValueError(problem) from error
        mismatch = next(filter(None, map(_mixed_json_types, metadata)), None)
        if mismatch is None:
            raise
        raise ValueError(
            f"{mismatch}; datasets' imagefolder reader needs each field in one form on every line: write them alike "
            '(every caption as a list: "text": ["A dog."]), or read the folder with --dataset_format imagefolder, '
            "which takes single captions and lists."
        ) from error
    except (UnicodeDecodeError, datasets.exceptions.DatasetGenerationError) as error:
        # pandas (metadata.csv) raises a bare UnicodeDecodeError, pyarrow (metadata.jsonl) datasets' generic error.
        problem = _not_utf8(sorted(path for path in folder.rglob("metadata.*") if _is_metadata_file(path)))
        if problem is None:
            raise
        raise ValueError(problem) from error
    _warn_of_unlisted_images(folder, dataset, builder.config.data_files[split])
    return dataset


def _stream_in_file_groups(builder, split: str) -> datasets.IterableDataset:
    """
    An image folder streamed in input shards (`IterableDataset.num_shards`) of its files, as parquet or tar files are:
    `datasets`' imagefolder builder gives it as one shard, so a reader of shards (`clipcap caption --streaming`, a
    DataLoader's workers) could neither resume it part by part nor split it between processes. Without metadata
    each run of [`IMAGE_FOLDER_SHARD_SIZE`] image files is a shard; with metadata (whose rows it gives) each
    metadata file is one, in path order (a single `metadata.jsonl` stays one shard: it is not read ahead).
    """
    split_generators = builder._split_generators
    builder._split_generators = functools.partial(_file_group_split_generators, split_generators)
    builder._generate_examples = functools.partial(_examples_of_file_groups, builder._generate_examples)
    return builder.as_streaming_dataset(split=split)


def _file_group_split_generators(split_generators, dl_manager) -> list:
    """The imagefolder builder's splits with their `gen_kwargs` lists sharded by `datasets` (one shard per item)."""
    generators = split_generators(dl_manager)
    for generator in generators:
        kwargs = generator.gen_kwargs
        if kwargs["add_metadata"]:
            kwargs["metadata_files"] = sorted(kwargs["metadata_files"], key=str)  # a set, which datasets does not shard
            continue
        # Each entry is `(file, None, downloaded file)`; an archive's gives an iterator of its files, kept unsharded.
        if all(isinstance(entry[2], str) for entry in kwargs["files"]):
            paths = [entry[2] for entry in kwargs["files"]]
            size = IMAGE_FOLDER_SHARD_SIZE
            kwargs["files"] = [tuple(paths[start : start + size]) for start in range(0, len(paths), size)]
            kwargs["metadata_files"] = ()  # an empty list, which datasets would count as a list of no shard
    return generators


def _examples_of_file_groups(generate_examples, files, **kwargs):
    """The imagefolder builder's examples of a shard's groups of files (see [`_file_group_split_generators`])."""
    if isinstance(files, list):  # groups of file paths, back to the builder's entries
        files = tuple((path, None, path) for group in files for path in group)
    yield from generate_examples(files=files, **kwargs)


def _is_metadata_file(path: PathLike) -> bool:
    """Whether `path` is an image folder's metadata file, which the imagefolder reader parses as text."""
    return os.path.basename(path) in ("metadata.csv", "metadata.jsonl")


def _warn_of_unlisted_images(folder: Path, dataset: datasets.Dataset, split_files: Sequence[str]) -> None:
    """
    Warn of the image files among the split's (`split_files`, as the reader resolved them: under train/ in a folder of
    train/ and test/) that the folder's metadata files do not list: `datasets`' imagefolder reader leaves them out
    without a word (a `metadata.csv` naming 1 of 4 images gave 1 row).
    """
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    if not any(Path(path).stem == "metadata" for path in split_files):  # without metadata every image is a row
        return
    extensions = set(ImageFolder.EXTENSIONS)
    files = [path for path in split_files if Path(path).suffix.lower() in extensions]
    column = dataset.cast_column("image", datasets.Image(decode=False)).select_columns("image")
    read = [path for path in column.with_format("arrow")[:]["image"].combine_chunks().field("path").to_pylist() if path]
    unlisted = {os.path.abspath(path) for path in files} - {os.path.abspath(path) for path in read}
    if unlisted:  # the reader gives a file in its folder's real path where the folder is reached through a link
        real_folder = functools.cache(os.path.realpath)  # each folder resolved once, not once per image

        def in_real_folder(path: str) -> str:  # the file's own link not resolved: two linking to one stay two
            folder, name = os.path.split(os.path.abspath(path))
            return os.path.join(real_folder(folder), name)

        unlisted = {in_real_folder(path) for path in files} - {in_real_folder(path) for path in read}
    if unlisted:
        logger.warning(
            f"{folder}: {len(unlisted)} of its {len(files)} images are not listed in its metadata file, and datasets' "
            f"imagefolder reader leaves them out (the first: {min(unlisted)}); list them there to read them."
        )


def _mixed_json_types(path: Path) -> str | None:
    """The first line of a JSON Lines file giving a field another JSON type than an earlier line did, if any."""
    kinds = {str: "a string", list: "a list", dict: "an object", bool: "true/false", int: "a number", float: "a number"}
    first: dict[str, tuple[str, int]] = {}
    with path.open(encoding="utf-8", errors="replace") as file:  # bad bytes are another error
        for number, line in enumerate(file, start=1):
            try:
                record = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError:
                return None  # not this problem; pyarrow's error stands
            for key, value in record.items() if isinstance(record, dict) else ():
                if value is None:
                    continue
                kind = kinds.get(type(value), type(value).__name__)
                earlier, first_seen = first.setdefault(key, (kind, number))
                if kind != earlier:
                    return f"{path}: line {number} gives {key!r} as {kind}, but line {first_seen} gives it as {earlier}"
    return None


def _from_caption_format(dataset_format: str, path, image_root, split: str) -> datasets.Dataset:
    """A caption format's rows (one per caption) grouped into one row per image id with its `captions`."""
    if dataset_format not in DATASET_FORMATS:
        raise ValueError(f"Unknown dataset format {dataset_format!r}; expected one of {sorted(DATASET_FORMATS)}.")
    if path is None:
        raise ValueError(f"The {dataset_format!r} format needs its file (--train_file/--validation_file).")
    if not isinstance(path, (str, os.PathLike)):
        if len(path) != 1:  # each format's loader reads one file, whose image ids are its own
            raise ValueError(
                f"The {dataset_format!r} format reads one file, not {len(path)} ({', '.join(map(str, path))}): give "
                "one (merge their images and captions into one file first)."
            )
        path = path[0]
    loaded = load_caption_dataset(dataset_format, path, image_root)
    if isinstance(loaded, datasets.DatasetDict):  # the Karpathy file holds every split
        name = {"val": "validation", "eval": "validation"}.get(split, split)
        if name not in loaded:
            raise ValueError(
                f"{path} ({dataset_format}) has no images of split {split!r}; it has {sorted(loaded)}."
            )
        loaded = loaded[name]
    images = group_by_image(loaded).rename_column("references", "captions")
    return images.add_column("image", images["image_path"]).cast_column("image", datasets.Image())


def _add_keys_and_captions(
    dataset,
    caption_column: str | None,
    source: str,
    shards: list[tuple[str, int]] | None,
    file_rows: list[tuple[str, int]] | _RowsPerFile | None,
    skip_null_images: bool = False,
):
    """
    Add `image_key` (and `captions`) computed from the undecoded images, without decoding any; and, for parquet or
    Arrow files (`shards`: each file and its row count), each row's file as `__url__`, as webdataset rows have it, and
    to map-style sources each row's number there (or in the source) as `__row__`, which names it in later errors. A bad
    row is named by its file and its row there from `file_rows` (the `shards`, or the counts of several JSON/CSV
    files, read when an error needs them). A stream of several shards numbers its rows in the order its readers take
    them (shuffled shards, one count per worker), not in its files: its bad rows are named without a row number. With
    `skip_null_images`, rows without an image are left out, with a warning naming them.

    A source that already has `image_key` or `captions` (one this function wrote, saved and read again) has them
    computed again in their place.
    """
    columns = ["image"] + ([caption_column] if caption_column else [])
    columns += [name for name in (WEBDATASET_KEY, SHARD_COLUMN) if name in dataset.column_names]  # to name a bad row
    streamed = isinstance(dataset, datasets.IterableDataset)
    # A source saved with its files' names (`__url__`) keeps each row's number in its file, which the saved copy
    # cannot tell; without them a row's number is computed again in the source read (a stream's rows have none).
    keeps_row_numbers = SHARD_COLUMN in dataset.column_names
    keys_and_captions = dict(
        function=_keys_and_captions,
        batched=True,
        with_indices=not (streamed and dataset.num_shards > 1),
        fn_kwargs={
            "caption_column": caption_column,
            "source": source,
            "shards": shards,
            "file_rows": file_rows,
            "number_rows": not streamed and not keeps_row_numbers,
            # A stream is not read ahead: each row left out is warned of as it is read.
            "null_images": ("warn and skip" if streamed else "skip") if skip_null_images else "error",
        },
    )
    replaced = [caption_column] if caption_column else []
    computed = ("image_key", "captions", *([] if keeps_row_numbers else [SOURCE_ROW_COLUMN]))
    replaced += [name for name in computed if name in dataset.column_names and name not in replaced]
    if streamed:
        features = datasets.Features({name: f for name, f in dataset.features.items() if name not in replaced})
        features["image_key"] = datasets.Value("string")
        if caption_column:
            features["captions"] = datasets.Sequence(datasets.Value("string"))
        features["image"] = datasets.Image(decode=False)
        # Left undecoded: datasets does not decode the images of a mapped IterableDataset (see decode_image).
        keyed = dataset.map(**keys_and_captions, remove_columns=replaced, features=features)
        return keyed.filter(bool, input_columns="image_key") if skip_null_images else keyed
    # Only the new columns are written (the images are not copied), then joined to the source's memory-mapped ones.
    # The cache of this map knows only the source's own files: a key naming an image file (its size and mtime) is
    # computed again each time, so a replaced image gets a new key, and the keys are part of the result's fingerprint
    # (else what is cached from it, such as the caption rows of training, would be reused for the old image).
    image_files = _has_image_files(dataset)
    new_columns = dataset.select_columns(columns).map(
        **keys_and_captions, remove_columns=columns, load_from_cache_file=not image_files
    )
    keyed = datasets.concatenate_datasets([dataset.remove_columns(replaced), new_columns], axis=1)
    if skip_null_images:
        keyed = _without_null_images(keyed, source, file_rows)
    fingerprint = Hasher.hash([keyed._fingerprint, _column_digest(new_columns, "image_key")]) if image_files else None
    return keyed.cast_column("image", datasets.Image(), new_fingerprint=fingerprint)


def _without_null_images(
    keyed: datasets.Dataset, source: str, file_rows: list[tuple[str, int]] | _RowsPerFile | None
) -> datasets.Dataset:
    """The rows of a keyed map-style source that have an image, with a warning naming (up to 10 of) the others."""
    null = pc.equal(keyed.select_columns("image_key").with_format("arrow")[:]["image_key"], NULL_IMAGE_KEY)
    missing = pc.indices_nonzero(null).to_pylist()
    if not missing:
        return keyed
    named = missing[:10]
    if isinstance(file_rows, _RowsPerFile):
        file_rows = file_rows.count()  # once for all the rows named
    naming = [name for name in (WEBDATASET_KEY, SHARD_COLUMN) if name in keyed.column_names]
    batch = keyed.select(named).select_columns(naming)[:]
    report = "\n".join(f"  {_row_location(batch, named, row, source, file_rows)}" for row in range(len(named)))
    more = f"\n  ... and {len(missing) - len(named)} more" if len(missing) > len(named) else ""
    logger.warning(f"Skipped {len(missing)} row(s) without an image (on_bad_image='skip'):\n{report}{more}")
    # Signed: `datasets` selects a contiguous run of rows as a slice, and fails on unsigned row numbers.
    return keyed.select(pc.indices_nonzero(pc.invert(null)).cast(pyarrow.int64()).to_numpy())


def _column_digest(dataset: datasets.Dataset, column: str) -> str:
    """A hash of a string column's values, read chunk by chunk."""
    digest = hashlib.sha256()
    for chunk in dataset.data.column(column).chunks:
        digest.update("\0".join(chunk.to_pylist()).encode() + b"\1")
    return digest.hexdigest()


def _keys_and_captions(batch, indices=None, *, caption_column, source, shards, file_rows, number_rows, null_images):
    new: dict[str, list] = {"image_key": []}
    for position, image in enumerate(batch["image"]):
        if not _is_null_image(image):
            new["image_key"].append(image_key(image))
            continue
        if null_images == "error":
            # datasets takes a webdataset's columns from its first shard: a sample whose image has another extension
            # (a .png among .jpg shards) arrives without one.
            formats = " (all of the shards' images in one format, as datasets reads the image columns of the first)"
            raise ValueError(
                f"{_row_location(batch, indices, position, source, file_rows)} has no image (it is null or missing); "
                "drop that row or give it an image"
                f"{formats if WEBDATASET_KEY in batch else ''}, skip such rows (`--on_bad_image skip`; `clipcap "
                "caption --on-bad-image skip`), or name the image column with --image_column."
            )
        if null_images == "warn and skip":
            location = _row_location(batch, indices, position, source, file_rows)
            logger.warning(f"{location} has no image (it is null or missing): skipped (on_bad_image='skip').")
        new["image_key"].append(NULL_IMAGE_KEY)
    if shards is not None:
        ends = _file_ends(shards)  # once per batch: a source may have thousands of files
        located = [_file_and_row(index, shards, ends) for index in indices]
        new[SHARD_COLUMN], new[SOURCE_ROW_COLUMN] = [file for file, _ in located], [row for _, row in located]
    elif number_rows:
        new[SOURCE_ROW_COLUMN] = list(indices)
    if caption_column is not None:
        new["captions"] = [
            _caption_list(
                value, caption_column, key, lambda: _row_location(batch, indices, position, source, file_rows)
            )
            if key != NULL_IMAGE_KEY
            else []  # a row left out
            for position, (value, key) in enumerate(zip(batch[caption_column], new["image_key"]))
        ]
    return new


def _file_ends(file_rows: list[tuple[str, int]]) -> list[int]:
    """Where each file's rows end in the source (`file_rows`: each file and its row count, in order)."""
    return list(itertools.accumulate(rows for _, rows in file_rows))


def _file_and_row(index: int, file_rows: list[tuple[str, int]], ends: list[int] | None = None) -> tuple[str, int]:
    """The file of a source's row `index` and its row there (`ends`: `_file_ends(file_rows)`, if computed already)."""
    ends = _file_ends(file_rows) if ends is None else ends
    file = bisect.bisect_right(ends, index)
    return file_rows[file][0], index - (ends[file - 1] if file else 0)


def _row_location(
    batch, indices, position: int, source: str, file_rows: list[tuple[str, int]] | _RowsPerFile | None
) -> str:
    """Where a row comes from, for an error: its shard and `__key__`, its data file and row there, or its row."""
    if WEBDATASET_KEY in batch:
        return f"{batch[SHARD_COLUMN][position]}, sample {batch[WEBDATASET_KEY][position]!r}"
    if indices is None:
        return f"A streamed row of {source} (read it without --streaming to have the row's file and number named)"
    index = indices[position]
    if isinstance(file_rows, _RowsPerFile):
        file_rows = file_rows.count()
    if file_rows is not None:
        file, row = _file_and_row(index, file_rows)
        return f"{file}, row {row} (from 0)"
    return f"{source}, row {index} (from 0)"


class _RowsPerFile:
    """
    The files of a map-style source of several JSON or CSV files, whose row counts are read only when a bad row is
    to be named: unlike parquet's footers and Arrow's record batches these files state no row count, and `datasets`
    keeps no record of which file a row came from, so each file is read again on its own by the same builder.
    """

    def __init__(self, builder: str, files: list[str]):
        self.builder, self.files = builder, files

    def count(self) -> list[tuple[str, int]] | None:
        """
        Each file with its row count, in row order; None if a file does not read on its own. Each file is prepared
        again into `datasets`' cache, once: only an error pays for it.
        """
        try:
            return [(path, _read_alone(self.builder, path)[0]) for path in self.files]
        except (datasets.exceptions.DatasetGenerationError, ValueError, OSError):
            return None  # its columns' types, inferred from it alone, do not read: rows counted through all files


def _rows_per_file_on_error(dataset, data_files) -> _RowsPerFile | None:
    """A `_RowsPerFile` for a map-style source of several JSON or CSV files; None for others."""
    if data_files is None or isinstance(data_files, (str, os.PathLike)) or not isinstance(dataset, datasets.Dataset):
        return None
    files = [str(path) for path in data_files]
    builder = _builder_of(files)
    if len(files) < 2 or builder not in ("json", "csv"):
        return None
    return _RowsPerFile(builder, [os.path.abspath(path) for path in files])


def _caption_list(value: Any, column: str, key: str, location) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(
            f"{location()}: the image {key} has {column!r} = {value!r}; give each image a caption, or a list of "
            "non-empty captions."
        )
    return [text.strip() for text in texts]


def _has_relative_paths(dataset, column: str) -> bool:
    """Whether an undecoded image column has an image given by a relative path (a stream is not read ahead to tell)."""
    if isinstance(dataset, datasets.IterableDataset):
        return True
    for chunk in dataset.data.column(column).chunks:
        paths = chunk.field("path").filter(chunk.field("bytes").is_null()).drop_null().to_pylist()
        if not all(map(os.path.isabs, paths)):
            return True
    return False


def _has_image_files(dataset: datasets.Dataset) -> bool:
    """Whether some image of the (undecoded) `image` column is a file path rather than stored bytes."""
    return any(chunk.field("bytes").null_count for chunk in dataset.data.column("image").chunks)


def _counted_shards(dataset, data_files) -> list[tuple[str, int]] | None:
    """
    The parquet or Arrow files of a map-style source and their row counts, in row order: read from parquet footers,
    and from the headers of Arrow record batches (memory-mapped: their data is not read), so each row's file is known
    at no cost, as JSON or CSV files do not tell theirs without being parsed again (see [`_RowsPerFile`]).
    """
    if data_files is None or not isinstance(dataset, datasets.Dataset) or SHARD_COLUMN in dataset.column_names:
        return None
    files = _file_list(data_files)
    builder = _builder_of(files)
    if builder == "parquet":
        import pyarrow.parquet

        return [(os.path.abspath(path), pyarrow.parquet.ParquetFile(path).metadata.num_rows) for path in files]
    if builder == "arrow":
        return [(os.path.abspath(path), _arrow_rows(path)) for path in files]
    return None


def _arrow_rows(path: str) -> int:
    """The row count of an Arrow file, in the IPC stream format or the file format (both read by `datasets`)."""
    with pyarrow.memory_map(path) as source:
        try:
            return sum(batch.num_rows for batch in pyarrow.ipc.open_stream(source))
        except (OSError, pyarrow.ArrowInvalid):  # the file format, as datasets' arrow builder tries it
            reader = pyarrow.ipc.open_file(source)
            return sum(reader.get_batch(index).num_rows for index in range(reader.num_record_batches))


def _rooted(dataset, column: str, root: str | list[str], source: str):
    """`dataset` with the relative image paths of `column` joined to `root`, as an undecoded Image column."""
    return dataset.map(
        _absolute_paths,
        input_columns=column,
        fn_kwargs={"column": column, "root": root, "source": source},
        batched=True,
        features=datasets.Features({**dataset.features, column: datasets.Image(decode=False)}),
    )


def _absolute_paths(paths, *, column: str, root: str | list[str], source: str):
    absolute = []
    for path in paths:
        if isinstance(path, dict):  # a {bytes, path} struct: its path names the image only without its bytes
            if path["bytes"] is not None or path["path"] is None:
                absolute.append(path)
                continue
            path = path["path"]
        if path is not None and path.startswith(("http://", "https://")):  # joined to the folder, it named no file
            raise ValueError(
                f"{source}: the image column {column!r} holds an image URL ({path}); download the images first (for "
                "example with img2dataset, into webdataset or parquet shards) and give those, or local file paths."
            )
        if path is not None and not os.path.isabs(path):
            if isinstance(root, list):
                raise ValueError(
                    f"{source}: the image path {path!r} is relative, and the data files are in several folders "
                    f"({', '.join(root)}); give --image_root (the folder the paths are relative to), or absolute paths."
                )
            path = os.path.join(root, path)
        absolute.append(None if path is None else {"bytes": None, "path": path})  # as datasets.Image stores a file
    return {column: absolute}


def _holds_paths(feature) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _holds_image_bytes(feature) -> bool:
    """Raw image bytes, or the `{bytes, path}` struct of an image column that pyarrow/pandas wrote."""
    if isinstance(feature, datasets.Value):
        return feature.dtype in ("binary", "large_binary")
    return isinstance(feature, dict) and "bytes" in feature and set(feature) <= {"bytes", "path"}


def _default_image_column(dataset, source: str) -> str:
    features = dataset.features
    if "image" in features:
        return "image"
    images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if not images:
        raise ValueError(
            f"{source} has no image column (columns: {', '.join(features) or 'none'}); name it with --image_column."
        )
    return images[0]


def _require_columns(dataset, columns: list[str], source: str) -> None:
    have = list(dataset.features)
    missing = [column for column in columns if column not in have]
    if missing:
        raise ValueError(
            f"{source} has no column {missing[0]!r}; its columns are: {', '.join(have)}. Name the right one with "
            "--image_column / --caption_column."
        )


def _files_folder(data_files) -> str | list[str]:
    """The folder of the data files (or the folder given); the sorted folders when the files are in several."""
    files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files or ["."])
    folders = sorted({str(Path(path) if os.path.isdir(path) else Path(path).parent) for path in files})
    return folders[0] if len(folders) == 1 else folders


def _file_list(data_files) -> list[str]:
    """The data files (one path or several) as a list of strings; none for no data files."""
    if data_files is None:
        return []
    return [str(data_files)] if isinstance(data_files, (str, os.PathLike)) else [str(path) for path in data_files]


def _describe(data_files) -> str:
    if data_files is None:
        return "the source"
    files = _file_list(data_files)
    return files[0] if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more files)"
