"""Caption a dataset into parquet shards: one output file per input shard, each written whole, resumable, split
between the processes of a `torchrun` or `accelerate launch` run.

An input shard is a data file of a streaming dataset, or a run of `shard_size` rows of a loaded one. Output shard i is
`captions-0000i-of-0000n.parquet`, written to a temporary name and renamed when complete, so that the folder only
ever holds whole shards: a rerun skips those and redoes the rest (a run killed mid-way resumes without duplicates or
gaps). Process r of w takes the shards i with i % w == r; the names do not depend on w, so a rerun may use another
number of processes. Each process holds a lock file in the folder for its life, so that a second run into the same
folder is refused instead of writing the same shards over the first one's.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..utils.bad_images import BadImagePolicy, check_bad_image_policy
from ..utils.file_utils import acquire_file_lock, write_atomically, write_text_atomically
from ..utils.loading import same_model
from ..utils.settings_diff import ABSENT, changed_settings
from .captioner import ClipCapCaptioner, captioning_run

logger = logging.get_logger(__name__)

RUN_FILE = "caption_run.json"
# The key of a run's settings holding how its models were named (`{"model": path, ...}`): shown in the run file, not
# compared on a resume, since one model has many paths; the settings record each model's identity in its place.
SHOWN_ONLY = "paths"
DEFAULT_SHARD_SIZE = 10_000
# Unreadable rows named in an error or warning; the rest are counted.
_MAX_LISTED = 10
# A streaming source of more data files than this (an image folder's images) is identified by one digest of their
# names, sizes and modification times, not by each file's content: reading a million images on every run would be
# slow, and the run file would list them all.
_MAX_FILES_IDENTIFIED_BY_CONTENT = 256
# Seconds a process waits for a lock file before it calls it held: a process checking whether a run holds it (one
# of its own run, as they start) takes it for an instant, while another run holds it for its whole life.
_LOCK_WAIT_S = 2.0


def shard_file_name(index: int, num_shards: int) -> str:
    return f"captions-{index:05d}-of-{num_shards:05d}.parquet"


def _lock_file_name(rank: int, world_size: int) -> str:
    return f".caption-rank-{rank:05d}-of-{world_size:05d}.lock"


_LOCK_FILE = re.compile(r"\.caption-rank-(\d+)-of-(\d+)\.lock")


def distributed_rank() -> tuple[int, int]:
    """This process's rank and the number of processes, as `torchrun` and `accelerate launch` set them."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class CaptionRunSummary:
    """What one process did."""

    num_shards: int
    """Input shards in all (every process's)."""
    written: list[str] = field(default_factory=list)
    """Shards this process wrote."""
    skipped: list[str] = field(default_factory=list)
    """This process's shards that were already finished."""
    num_captions: int = 0
    """Captions this process wrote."""
    num_bad_rows: int = 0
    """Unreadable rows this process skipped."""


def resolve_local_paths(value: Any) -> Any:
    """
    A path setting (a str, or a list of them: data files, a folder) with each path of an existing file or folder as
    [`_path_as_recorded`] gives it, so that a resume naming it another way records the same source; other strings (Hub
    names, glob patterns) as they are.
    """
    if isinstance(value, list):
        return [resolve_local_paths(item) for item in value]
    if isinstance(value, str) and os.path.exists(value):
        return _path_as_recorded(value)
    return value


def _path_as_recorded(path: str) -> str:
    """
    `path` absolute, with the folders it lies in resolved and its own name kept: the same for a resume that names it
    relative, with `./` or `..`, or through a linked folder (a linked home or working folder, whose `$PWD` spelling
    differs from the one relative paths get), while a file that is itself a link keeps its name (a large folder's
    files are recorded by their names within it, as earlier versions recorded them: `_data_file_identities`).
    """
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(folder), name)


def _input_shards(dataset, shard_size: int) -> tuple[int, Any]:
    """The number of input shards and a function giving shard i."""
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        count = dataset.num_shards if hasattr(dataset, "num_shards") else dataset.n_shards
        return count, lambda index: dataset.shard(num_shards=count, index=index)
    count = max(1, math.ceil(len(dataset) / shard_size))
    return count, lambda index: dataset.shard(num_shards=count, index=index, contiguous=True)


def _undecoded(dataset, column: str):
    """The dataset with `column`'s images left as bytes, so that a bad one is named by its key instead of failing
    inside `datasets`."""
    import datasets

    feature = (dataset.features or {}).get(column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def _source_layout(dataset, num_shards: int) -> dict[str, Any]:
    """
    What fixes which rows each input shard holds, recorded so that a resume on a changed source is refused: the
    number of rows and a digest of their image keys in order (of a loaded Dataset; a streaming one's are not known),
    and the number of shards. The digest catches what the count misses: an image replaced by another, or rows that
    moved (an embeddings folder appends a replaced file's new row and drops its old one). A streaming source records
    its data files' identities in their place (see [`_data_file_identities`]).
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        return {
            "num_rows": None,
            "num_shards": num_shards,
            "image_keys_sha256": None,
            "data_files": _data_file_identities(dataset),
        }
    digest = hashlib.sha256()
    if "image_key" in dataset.column_names:  # else every shard's first batch names the missing column
        keys = dataset.select_columns(["image_key"]).with_format("arrow")[:]["image_key"]  # only that column is read
        digest.update("\0".join(map(str, keys.to_pylist())).encode())  # as the writer stores them: str(key)
    return {"num_rows": len(dataset), "num_shards": num_shards, "image_keys_sha256": digest.hexdigest()}


def _data_file_identities(dataset) -> list[dict[str, Any]] | dict[str, Any] | None:
    """
    Each local data file a streaming dataset reads, with its size and a sampled digest of its content (as
    `model_identity` identifies weight files), in the order of the input shards; for more than
    `_MAX_FILES_IDENTIFIED_BY_CONTENT` files (an image folder's images), their number and one digest of their paths
    (relative to their common folder), sizes and modification times instead. None where they are not known (see
    [`~data.sources.stream_data_files`]).
    """
    from ..data.sources import stream_data_files
    from ..utils.file_utils import sampled_sha256

    # As recorded: the loader keeps a data file's spelling (`dir/./a.parquet`), which a resume may change; once each.
    paths = list(dict.fromkeys(map(_path_as_recorded, stream_data_files(dataset))))
    if not paths:
        return None
    if len(paths) <= _MAX_FILES_IDENTIFIED_BY_CONTENT:
        return [{"path": path, "size": os.path.getsize(path), "sha256": sampled_sha256(path)} for path in paths]
    folder, listing = os.path.commonpath(paths), hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        listing.update(f"{os.path.relpath(path, folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"num_files": len(paths), "paths_sizes_mtimes_sha256": listing.hexdigest()}


def _check_run_file(output_dir: Path, recorded: dict[str, Any], own_lock: Path | None = None) -> dict[str, Any]:
    """
    Record the run's settings; refuse to add to a folder of captions made with other settings or from another
    source, or to finished shards without a run file (nothing says what made them). A run file without any finished
    shard (a first run that failed early) is replaced, unless a process other than this one (`own_lock`) holds its
    lock: another run of as many processes, whose shards are not finished yet. One of an earlier version, which
    recorded less, is resumed if what it recorded matches, with a warning naming what was not checked. The settings'
    `paths` (how the models were named, see `SHOWN_ONLY`) are recorded for people, not compared. Returns the
    settings as recorded, for [`_check_run_file_unchanged`].
    """
    path = output_dir / RUN_FILE
    recorded = json.loads(json.dumps(recorded))  # as it reads back from the file
    if path.exists():
        earlier = _read_run_file(path)
        # A model recorded in another form of the same identity (a Hub snapshot that has gained files since): as then.
        recorded.update({key: earlier[key] for key in recorded.get(SHOWN_ONLY) or {}
                         if key in earlier and same_model(earlier[key], recorded[key])})  # fmt: skip
        if earlier == recorded:
            return recorded
        finished = sorted(output_dir.glob("captions-*.parquet"))
        if _compared(earlier) != _compared(recorded):
            if finished:
                comparable, unchecked = _as_recorded_by(earlier, recorded)
                if _compared(earlier) != _compared(comparable):
                    raise ValueError(_difference(output_dir, earlier, comparable))
                _check_shard_names(output_dir, finished, recorded["source_layout"]["num_shards"])
                logger.warning(
                    f"{output_dir / RUN_FILE} was written by an earlier version, which "
                    + (f"did not record {unchecked}: resuming as if they have not changed." if unchecked else
                       "recorded the same settings in another form: resuming.")
                    + " This run's are recorded from now on."
                )
            else:
                _check_no_other_process(output_dir, own_lock)
    elif finished := sorted(output_dir.glob("captions-*.parquet")):
        raise ValueError(
            f"--output {output_dir} holds {len(finished)} finished caption shard(s) ({finished[0].name}"
            f"{', ...' if len(finished) > 1 else ''}) but no {RUN_FILE}: what they were captioned from and with is "
            "unknown, so this run could caption their images again or add captions of other settings. Remove the "
            "folder's captions-*.parquet files to start over there, or write to another folder."
        )
    write_text_atomically(path, json.dumps(recorded, indent=2) + "\n")
    return recorded


def _read_run_file(path: Path) -> dict[str, Any]:
    """The settings in a run file, refusing one that is not a JSON object, naming it and the way out."""
    from ..utils.file_utils import read_json

    # Its shards go with it: shards without a run file are refused (`_check_run_file`).
    way_out = f"Remove it and the captions-*.parquet files to start over in {path.parent}, or write to another folder."
    try:
        settings = read_json(path)
    except ValueError as error:
        raise ValueError(f"{error}. {way_out}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} does not hold a JSON object of settings but a {type(settings).__name__}. {way_out}")
    return settings


def _check_no_other_process(output_dir: Path, own_lock: Path | None) -> None:
    """
    Refuse to replace the run file while a process other than this one holds its lock in `output_dir`: one of a run
    of as many processes (`_folder_lock` lets those in), which may be another run than this one, with the settings the
    run file holds, whose shards are not finished yet.
    """
    for lock in sorted(output_dir.glob(".caption-rank-*.lock")):
        if lock != own_lock and _LOCK_FILE.fullmatch(lock.name) and _held(lock):
            raise ValueError(
                f"--output {output_dir} holds a {RUN_FILE} of other settings, and another process holds "
                f"{lock.name}: it may be another run, writing its first shards with those settings. Let it finish, "
                f"or stop it; or write to another folder. If it is a process of this run (which found an earlier "
                f"run's {RUN_FILE} without finished shards), remove {output_dir / RUN_FILE} and rerun."
            )


def _held(lock: Path) -> bool:
    """
    Whether a process holds `lock` for longer than `_LOCK_WAIT_S`: a run's process holds its own for the run's whole
    life, while the processes that check for one (`_folder_lock`, `_check_no_other_process`) take each for an
    instant, and several processes of one run check the same files as they start.
    """
    from filelock import Timeout

    try:
        acquire_file_lock(lock, "the output folder", timeout=_LOCK_WAIT_S).release()
    except Timeout:
        return True
    return False


def _check_run_file_unchanged(output_dir: Path, recorded: dict[str, Any], shard: str) -> None:
    """Before writing `shard`: refuse if another run has replaced (or removed) the run file since this one recorded
    it, so that the folder never holds shards of settings other than its run file's."""
    path = output_dir / RUN_FILE
    if not path.exists() or _compared(_read_run_file(path)) != _compared(recorded):
        raise ValueError(
            f"{path} was replaced or removed by another run while this one captioned {shard}, which is not written: "
            "the folder would mix captions of other settings. Let the other run finish, and write to another "
            "folder; or stop it, remove the folder's captions and rerun."
        )


def _compared(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share: all but `SHOWN_ONLY`."""
    return {key: value for key, value in settings.items() if key != SHOWN_ONLY}


def _as_recorded_by(earlier: dict[str, Any], recorded: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """
    `recorded` less what the version that wrote `earlier` did not record yet (first the source's layout and a seeded
    sampled run's batch size and device, then the digest of the image keys, then a streaming source's data files,
    listing each JSON and Parquet file twice, by their paths as the loader spelt them, and an image folder's as null;
    the models' identities, recorded as their paths before; the source's paths as given, not made absolute), and what
    that leaves unchecked (empty if nothing).
    """
    comparable, unchecked = dict(recorded), []
    if "source_layout" not in earlier:
        del comparable["source_layout"]
        unchecked.append("the source's rows")
        if comparable.pop("sampling", None) is not None:
            unchecked.append("the batch size and device of seeded sampling")
    else:
        layout = comparable["source_layout"] = dict(recorded["source_layout"])
        earlier_layout = earlier["source_layout"]
        for key, what in (("image_keys_sha256", "the source's image keys"), ("data_files", "the data files")):
            if key in layout and key not in earlier_layout:
                del layout[key]
                unchecked.append(what)
        files = earlier_layout.get("data_files")
        if "data_files" in earlier_layout and files is None and layout.get("data_files") is not None:
            # It recorded none for an image folder (it looked for paths only, not the loader's tuples of them)
            layout["data_files"] = None
            unchecked.append("the data files")
        elif isinstance(files, list) and _once_each(files, absolute=True) == layout.get("data_files"):
            layout["data_files"] = files  # it listed each JSON and Parquet file twice, each as the loader spelt it
    source, earlier_source = comparable.get("source"), earlier.get("source")
    if isinstance(source, dict) and isinstance(earlier_source, dict):
        # It recorded the source's paths as given: those naming the files this run names, made absolute, are as then.
        comparable["source"] = {
            key: earlier_source[key] if key in earlier_source and resolve_local_paths(earlier_source[key]) == value
            else value
            for key, value in source.items()
        }
    if SHOWN_ONLY not in earlier and SHOWN_ONLY in comparable:  # it recorded each model as the path given
        comparable.update(comparable.pop(SHOWN_ONLY))
        unchecked.append("the models themselves (only the paths naming them, which match)")
    for key, name in (comparable.get(SHOWN_ONLY) or {}).items():
        # It identified a Hub model by its name and cached commit ("name@commit"), or by its name while none was
        # cached; now by its files.
        before = earlier.get(key)
        if (
            isinstance(before, str) and not before.startswith("sha256:") and before.split("@")[0] == name
            and comparable.get(key) != before
        ):
            comparable[key] = before
            unchecked.append(f"the files of {name} (only its Hub name, which matches)")
    return comparable, " nor ".join(unchecked)


def _once_each(files: list[Any], absolute: bool = False) -> list[Any]:
    """A recorded list of data files without its repeated entries, in order; with `absolute`, each by its path as
    [`_data_file_identities`] records them now ([`_path_as_recorded`])."""
    unique = {}
    for file in files:
        if absolute and isinstance(file, dict) and isinstance(file.get("path"), str):
            file = {**file, "path": _path_as_recorded(file["path"])}
        unique.setdefault(json.dumps(file, sort_keys=True), file)
    return list(unique.values())


def _check_shard_names(output_dir: Path, finished: list[Path], num_shards: int) -> None:
    """The finished shards must be this source's: their names hold the number of input shards."""
    other = next((path.name for path in finished if not path.name.endswith(f"-of-{num_shards:05d}.parquet")), None)
    if other is not None:
        raise ValueError(
            f"--output {output_dir} holds {other}, but this source makes {num_shards} shard(s): the input shards would "
            "not line up with the finished ones, leaving rows out or captioning them twice. Write to a new output "
            "folder, or resume on the original source."
        )


def _difference(output_dir: Path, earlier: dict[str, Any], recorded: dict[str, Any]) -> str:
    """Why a run cannot add to `output_dir`'s captions, and what to do instead."""
    before, now = earlier.get("source_layout"), recorded.get("source_layout")
    if before is not None and before != now:

        def rows(layout: dict) -> str:
            count = "an unknown number of" if layout["num_rows"] is None else layout["num_rows"]
            return f"{count} rows in {layout['num_shards']} shard(s)"

        now_rows = rows(now)
        advice = "Write to a new output folder, or resume on the original source."
        if before.get("data_files") and before.get("data_files") != now.get("data_files"):
            now_rows += f" and other data files ({_data_files_change(before['data_files'], now.get('data_files'))})"
        elif rows(before) == now_rows:  # the same size: other image keys
            now_rows += " but other images (replaced, or rows that moved)"
        elif before.get("data_files") and before["num_shards"] == 1:  # the same files, now in several shards
            from ..data.sources import IMAGE_FOLDER_SHARD_SIZE

            now_rows += " of the same data files"
            advice = (
                "An earlier clipcap_hf streamed an image folder as one shard; this one streams it "
                f"{IMAGE_FOLDER_SHARD_SIZE} image files a shard. If that run finished, its captions are complete; "
                "otherwise write to a new output folder."
            )
        return (
            f"--output {output_dir} holds captions of a source of {rows(before)}, but this one has {now_rows}: "
            f"the input shards would not line up with the finished ones, leaving rows out or captioning them twice. "
            f"{advice}"
        )
    changes = changed_settings(_compared(earlier), _compared(recorded), _change)
    why = ""
    if earlier.get("sampling") is not None and earlier.get("sampling") != recorded.get("sampling"):
        why = (
            f" Seeded sampled captions depend on the batch size and the device: resume with batch size "
            f"{earlier['sampling']['batch_size']} on a {earlier['sampling']['device']} device."
        )
    return (
        f"--output {output_dir} holds captions made with other settings ({'; '.join(changes)}; see "
        f"{output_dir / RUN_FILE}).{why} Write to another folder, or remove it to start over."
    )


# Characters of a setting's value shown in an error; a longer one (a list of many data files) is cut.
_MAX_SHOWN = 200


def _change(name: str, before: Any, now: Any) -> str:
    """A setting that differs, as [`_difference`] names it: its key (a nested one as `source.data_files`) and both
    values (see [`changed_settings`])."""

    def shown(value: Any) -> str:
        if value is ABSENT:
            return "not recorded"
        text = json.dumps(value)
        return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."

    return f"{name} was {shown(before)}, now {shown(now)}"


def _data_files_change(before: list | dict, now: list | dict | None) -> str:
    """How a streaming source's data files (see [`_data_file_identities`]) changed, for [`_difference`]."""
    if isinstance(before, list):
        before = _once_each(before)  # an earlier version listed each JSON and Parquet file twice
    if isinstance(before, list) and isinstance(now, list):
        changed = [file["path"] for file in before if file not in now]
        if changed:
            return f"{', '.join(changed[:_MAX_LISTED])} changed or moved"

    def count(files: list | dict | None) -> str:
        if files is None:
            return "unknown"
        return str(len(files) if isinstance(files, list) else files["num_files"])

    return f"{count(before)} file(s) before, {count(now)} now: one was added, removed, renamed, resized or modified"


@contextmanager
def _folder_lock(output_dir: Path, rank: int, world_size: int) -> Iterator[Path]:
    """
    Hold this process's lock file in `output_dir` (yielded) while the body runs, once no other run's process holds
    one: two runs would write the same shards (through the same temporary file: one could rename the other's
    half-written file as finished) and replace each other's run file. The processes of one `torchrun` run write other
    shards (their number is the same and their ranks differ), so they go together (as would a run split alike: see
    [`_check_no_other_process`] and [`_check_run_file_unchanged`] for how its run file is kept).

    This process waits up to `_LOCK_WAIT_S` for each lock, which a process of its own run may hold for an instant
    (checking the same files as it starts, or [`_check_no_other_process`]), before calling it another run's.

    The locks are `filelock`'s (the OS's `flock` on Unix, which it releases when the process ends however it ends):
    a killed run's lock file holds nothing up. Lock files stay in the folder, as in the Hub cache, since removing one
    could race with a process opening it. A filesystem that cannot lock is refused, naming the folder (see
    [`acquire_file_lock`]).
    """
    from filelock import Timeout  # a dependency of huggingface_hub, so always installed

    own_file = output_dir / _lock_file_name(rank, world_size)
    try:
        own = acquire_file_lock(own_file, "the output folder", timeout=_LOCK_WAIT_S)
    except Timeout:
        raise ValueError(_busy(output_dir, own_file)) from None
    except PermissionError as error:  # the first file the run writes there
        message = f"Cannot write to --output {output_dir} ({error}): make it writable, or write to another folder."
        raise _same_kind_of_error(error, message) from error
    try:
        for path in sorted(output_dir.glob(".caption-rank-*.lock")):
            match = _LOCK_FILE.fullmatch(path.name)
            # The same run's other processes (as many, with other ranks) are left out: they write other shards. A
            # lock of another size that is free is a finished or killed run's.
            if match and int(match[2]) != world_size and _held(path):
                raise ValueError(_busy(output_dir, path))
        yield own_file
    finally:
        own.release()


def _busy(output_dir: Path, lock: Path) -> str:
    match = _LOCK_FILE.fullmatch(lock.name)
    return (
        f"--output {output_dir} is being written by another run (process {int(match[1])} of {int(match[2])} holds "
        f"{lock.name}): two runs would write the same shards over each other. Let it finish, or stop it and rerun "
        "this command to resume where it stopped; or write to another folder."
    )


# The errors of a disk (or a quota) full, for which the fix is to free space.
_NO_SPACE = {errno.ENOSPC} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())


def _same_kind_of_error(error: OSError, message: str) -> OSError:
    """`message` as an error of `error`'s class and errno, so that a caller still tells a full disk from a refusal."""
    arguments = (message,) if error.errno is None else (error.errno, message)  # else str() shows "[Errno None]"
    try:
        raised = type(error)(*arguments)
    except Exception:  # a subclass built from other arguments
        raised = None
    return raised if isinstance(raised, OSError) else OSError(*arguments)


def _write_parquet_atomically(columns: dict[str, list], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"image_key": pa.string(), "candidates": pa.list_(pa.string()), "clip_score": pa.float32()}
    schema = pa.schema([(name, types.get(name, pa.string())) for name in columns])  # typed even when empty
    table = pa.table(columns, schema=schema)
    try:  # one temporary name per shard: the leftover of a run killed while writing it is replaced by the rerun's
        write_atomically(path, lambda file: pq.write_table(table, file), temporary_name=f".{path.name}.partial")
    except OSError as error:  # e.g. a full disk: pyarrow's message names no file
        if error.errno in _NO_SPACE:
            fix = f"Free space in {path.parent}"
        elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = f"Make {path.parent} writable"
        else:
            fix = "Fix what the error names"
        message = (
            f"Cannot write the caption shard {path} ({type(error).__name__}: {error}); the shards written before it "
            f"are kept. {fix} (or give another --output) and rerun: it captions the rest."
        )
        raise _same_kind_of_error(error, message) from error


def caption_dataset_to_parquet(
    captioner: ClipCapCaptioner,
    dataset,
    output_dir: str | os.PathLike,
    *,
    batch_size: int = 32,
    shard_size: int = DEFAULT_SHARD_SIZE,
    on_bad_image: BadImagePolicy = "error",
    settings: Mapping[str, Any] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    seed: int | None = None,
) -> CaptionRunSummary:
    """
    Caption a `datasets` Dataset or IterableDataset with columns `image_key` and `image` (images) or `embedding`
    (CLIP embeddings) into parquet shards in `output_dir`, with columns `image_key`, `caption`, and `candidates`,
    `clip_score` when the captioner makes them.

    Args:
        captioner: the [`ClipCapCaptioner`] (its own `on_bad_image` is not used: see `on_bad_image`).
        dataset: the rows to caption, in a stable order (the shards are found again by position on a rerun).
        batch_size: images per `generate` call.
        shard_size: rows per input shard of a (non-streaming) Dataset.
        on_bad_image: `"error"` stops at the first batch holding unreadable rows, naming shard and key (the finished
            shards stay); `"skip"` leaves them out, counted and named in a warning. A run that reads rows and can
            caption none of them, leaving the folder without a caption, raises a ValueError instead, and removes the
            shards it wrote, which a rerun would otherwise take as finished (see [`_refuse_a_run_without_captions`]).
        settings: what produced the captions (model, decoding, source), kept in `caption_run.json` with the
            source's layout (its number of rows and shards, and a digest of its image keys or data files) and, when
            sampling with a `seed`, the batch size and device: a rerun with other settings, or on a source whose
            shards moved, is refused instead of mixing captions. Without settings the layout is still recorded and
            checked, but not the model or decoding. Its `SHOWN_ONLY` entry ("paths") is recorded but not compared.
        rank, world_size: this process's share (default: from `torchrun`'s or `accelerate launch`'s environment).
        seed: seeds `torch` with `seed + i` before input shard i, so that sampled captions do not depend on which
            process captions a shard, or on whether the run was resumed (with the same batch size and device).

    Each process holds a lock file in `output_dir` while it runs: a run whose shards would overlap this one's (any
    run but the other processes of this one) is refused with a ValueError naming the lock.

    The run holds one [`captioning_run`] block: on the CPU, each weight that oneDNN computes is packed once for the
    whole run (the packed copies, as large as the weights, are freed when it returns), and the memory one batch frees
    serves the next.
    """
    check_bad_image_policy(on_bad_image)
    if rank is None or world_size is None:
        rank, world_size = distributed_rank()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # Held from before the run file is read: a second run into the folder is refused before it touches it.
    with _folder_lock(output_dir, rank, world_size) as own_lock:
        dataset = _undecoded(dataset, captioner.image_column)
        num_shards, get_shard = _input_shards(dataset, shard_size)
        sampled_on = captioner.model.device.type if captioner.do_sample else None
        plan = _plan_run(
            dataset, output_dir, own_lock, num_shards, settings, seed, batch_size, sampled_on, rank, world_size
        )
        summary = plan.summary
        shards = [(index, name, get_shard(index)) for index, name in plan.left]
        sized = all(hasattr(shard, "__len__") for *_, shard in shards)
        total = sum(len(shard) for *_, shard in shards) if sized else None
        description = "Captioning" if world_size == 1 else f"Captioning (rank {rank})"
        first_bad: str | None = None  # the first unreadable row skipped, as its warning names it
        # One block over the whole run: on the CPU, each weight is packed for oneDNN once, not once per batch.
        with (
            tqdm(total=total, unit="image", desc=description, dynamic_ncols=True) as bar,
            captioning_run(captioner.model),
        ):
            for index, name, shard in shards:
                if seed is not None:
                    torch.manual_seed(seed + index)
                columns, bad = _caption_shard(captioner, shard, name, batch_size, on_bad_image, bar)
                _check_run_file_unchanged(output_dir, plan.recorded, name)  # as many processes may have replaced it
                _write_parquet_atomically(columns, output_dir / name)
                summary.written.append(name)
                summary.num_captions += len(columns["image_key"])
                summary.num_bad_rows += len(bad)
                if bad:
                    first_bad = first_bad or bad[0]
                    listed = "\n".join(f"  {line}" for line in bad[:_MAX_LISTED])
                    more = f"\n  ... and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
                    logger.warning(f"Skipped {len(bad)} unreadable row(s) of {name}:\n{listed}{more}")
        if summary.num_bad_rows and not summary.num_captions:  # checked while the folder's lock is held
            _refuse_a_run_without_captions(output_dir, summary, first_bad)
        return summary


def finished_caption_run(
    dataset,
    output_dir: str | os.PathLike,
    *,
    batch_size: int = 32,
    shard_size: int = DEFAULT_SHARD_SIZE,
    settings: Mapping[str, Any] | None = None,
    loaded_settings: tuple[str, ...] = (),
    do_sample: bool = False,
    device_type: str = "cpu",
    rank: int | None = None,
    world_size: int | None = None,
    seed: int | None = None,
) -> CaptionRunSummary | None:
    """
    What [`caption_dataset_to_parquet`] would do with no shard of this process left to caption in `output_dir` (all
    of them finished, or none given to it), found before any model is loaded, so that such a run loads none: None when
    some are left.

    A process with finished shards plans the run as [`caption_dataset_to_parquet`] does ([`_plan_run`], with the
    same arguments and the captioner's `do_sample` and device type in its place), so that a rerun with other settings
    is refused even when it would caption nothing. `loaded_settings` names the keys of `settings` that are known only
    once the model is loaded (the dtype it loads in by default): taken as the run file records them, since a run that
    captions nothing cannot mix captions. A process given no shard reads nothing there.
    """
    if rank is None or world_size is None:
        rank, world_size = distributed_rank()
    output_dir = Path(output_dir)
    num_shards, _ = _input_shards(dataset, shard_size)
    mine = _own_shards(num_shards, rank, world_size)
    if not mine:
        return CaptionRunSummary(num_shards)
    # Looked at before taking a lock there: a run with shards left may find no folder yet, and must not make one.
    if not all((output_dir / name).exists() for _, name in mine):
        return None
    with _folder_lock(output_dir, rank, world_size) as own_lock:
        sampled_on = device_type if do_sample else None
        plan = _plan_run(
            dataset, output_dir, own_lock, num_shards, settings, seed, batch_size, sampled_on, rank, world_size,
            loaded_settings,
        )
    return None if plan.left else plan.summary


@dataclass
class _RunPlan:
    """What a run into an output folder has to do, as [`_plan_run`] finds it."""

    summary: CaptionRunSummary
    """The run's number of shards, and this process's finished ones (`skipped`)."""
    left: list[tuple[int, str]]
    """This process's shards to caption: each input shard's index and output file's name."""
    recorded: dict[str, Any]
    """The settings as the run file records them, for [`_check_run_file_unchanged`]."""


def _plan_run(
    dataset,
    output_dir: Path,
    own_lock: Path,
    num_shards: int,
    settings: Mapping[str, Any] | None,
    seed: int | None,
    batch_size: int,
    sampled_on: str | None,
    rank: int,
    world_size: int,
    loaded_settings: tuple[str, ...] = (),
) -> _RunPlan:
    """
    Judge a run (or a rerun) of process `rank` of `world_size` into `output_dir`, whose lock `own_lock` it holds:
    record its settings ([`_run_record`]) in the run file, refusing a rerun of other settings or on another source
    ([`_check_run_file`]), and find which of its shards are finished and which are left. The one judge of
    [`caption_dataset_to_parquet`] and [`finished_caption_run`], so that both refuse alike. `loaded_settings`: keys of
    `settings` known only once the model is loaded, taken as the run file records them (see [`finished_caption_run`]).
    """
    recorded = _run_record(dataset, num_shards, settings, seed, batch_size, sampled_on)
    if loaded_settings:
        path = output_dir / RUN_FILE
        earlier = _read_run_file(path) if path.exists() else {}  # none: refused below if shards are finished
        for key in loaded_settings:
            if key in earlier:
                recorded[key] = earlier[key]
            else:
                recorded.pop(key, None)
    recorded = _check_run_file(output_dir, recorded, own_lock)
    mine = _own_shards(num_shards, rank, world_size)
    summary = CaptionRunSummary(num_shards, skipped=[name for _, name in mine if (output_dir / name).exists()])
    return _RunPlan(summary, [(index, name) for index, name in mine if name not in summary.skipped], recorded)


def _own_shards(num_shards: int, rank: int, world_size: int) -> list[tuple[int, str]]:
    """The input shards process `rank` of `world_size` captions, and their output files' names."""
    return [(index, shard_file_name(index, num_shards)) for index in range(rank, num_shards, world_size)]


def _run_record(
    dataset,
    num_shards: int,
    settings: Mapping[str, Any] | None,
    seed: int | None,
    batch_size: int,
    sampled_on: str | None,
) -> dict[str, Any]:
    """
    The settings a run records in its run file: `settings`, the source's layout, and for a seeded run that samples
    on a device of type `sampled_on` (None: it does not sample), the batch size and that device type.
    """
    # Recorded and checked with or without settings: a rerun on a changed source, or with another shard size, would
    # leave rows out or caption them twice.
    recorded = {**(settings or {}), "source_layout": _source_layout(dataset, num_shards)}
    if sampled_on is not None and seed is not None:  # the random draws are spread over a batch's images
        recorded["sampling"] = {"batch_size": batch_size, "device": sampled_on}
    return recorded


def _refuse_a_run_without_captions(output_dir: Path, summary: CaptionRunSummary, first_bad: str) -> None:
    """
    Raise when this process read rows, every one unreadable and skipped, and the folder holds no caption: such a run
    must not pass for one that captioned (a pipeline would go on with no captions). The folder's shards, which hold
    none, are removed first, so that a rerun reads their rows again rather than take them as finished.

    Captions in the folder's other finished shards (those of an earlier run, which this one resumed, or of this run's
    other processes) make it a run that captioned, as when some rows of a shard are readable. While other processes'
    shards are not all written yet, which this process cannot wait for, it warns instead. A shard whose footer cannot
    be read (a damaged file) raises a ValueError naming it, and no shard is removed.
    """
    import pyarrow.parquet as pq

    rows: list[int | None] = []  # each shard's captions, from its footer (no row is read); None: not written
    for index in range(summary.num_shards):
        path = output_dir / shard_file_name(index, summary.num_shards)
        try:
            rows.append(pq.read_metadata(path).num_rows)
        except FileNotFoundError:  # another process's, not written yet (or removed by one that found no caption)
            rows.append(None)
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError; raised before any removal
            raise ValueError(
                f"The caption shard {path} is incomplete or damaged ({type(error).__name__}: {error}), so whether "
                f"the run captioned any image is not known; this process could caption none of the "
                f"{summary.num_bad_rows} image(s) it read: every one was unreadable and skipped (--on-bad-image skip). "
                f"The first: {first_bad}. Remove that file and rerun: its rows are captioned again."
            ) from error
    if any(rows):
        return
    what = f"{summary.num_bad_rows} image(s)"
    if None in rows:
        logger.warning(
            f"None of the {what} this process read could be captioned: every one was unreadable and skipped "
            f"(--on-bad-image skip). The first: {first_bad}. Whether the run captioned any is not known here: the "
            "other processes' shards are not all written yet."
        )
        return
    for index in range(summary.num_shards):  # every process's: all written, none with a caption
        (output_dir / shard_file_name(index, summary.num_shards)).unlink(missing_ok=True)
    raise ValueError(
        f"None of the {what} read could be captioned: every one was unreadable and skipped (--on-bad-image skip), "
        f"so {output_dir} holds no caption. The first: {first_bad}\nCheck the source (its image column, and "
        "--image-root where it names image files) and rerun: the folder's shards, which hold no caption, are "
        "removed, so that the rerun reads their rows again."
    )


def _caption_shard(
    captioner: ClipCapCaptioner, shard, name: str, batch_size: int, on_bad_image: BadImagePolicy, bar
) -> tuple[dict[str, list], list[str]]:
    """One input shard's output columns, and a line naming each unreadable row that was skipped."""
    from ..data.sources import read_stream  # imported here, as in `_bad_row`

    names = ["image_key", captioner.caption_column]
    names += ["candidates"] * (captioner.num_sequences > 1) + ["clip_score"] * (captioner.reranker is not None)
    columns: dict[str, list] = {column: [] for column in names}
    bad = []
    # A streamed shard's data file that does not read is named (the reader's own error names none).
    for batch in read_stream(shard.iter(batch_size=batch_size), shard):
        if "image_key" not in batch:
            raise ValueError(f"Shard {name}: the dataset has no image_key column; it has {sorted(batch)}.")
        output, errors = captioner.caption_batch(batch)
        lines = [f"{_bad_row(name, batch, row)}: {error}" for row, error in errors.items()]
        if lines and on_bad_image == "error":
            listed = "\n".join(f"  {line}" for line in lines)
            # Fixing or removing an image changes its key or moves rows between shards: the run file's record of
            # the source then refuses a resume, so only a skip keeps the finished shards.
            raise ValueError(
                f"{len(lines)} image(s) cannot be read:\n{listed}\nThe shards finished before are kept: rerun with "
                "--on-bad-image skip to leave these images out and caption the rest. To fix or remove them instead, "
                "write the captions of the changed source to a new --output: it no longer matches the one the "
                "finished shards were captioned from, so it cannot resume here."
            )
        bad += lines
        kept = [row for row in range(len(batch["image_key"])) if row not in errors]
        columns["image_key"] += [str(batch["image_key"][row]) for row in kept]
        for column in names[1:]:
            columns[column] += [output[column][row] for row in kept]
        bar.update(len(batch["image_key"]))
    return columns, bad


def _bad_row(name: str, batch: dict[str, list], row: int) -> str:
    """A bad row as errors and warnings name it: its output shard and key, and where the source's rows say they come
    from (`__url__`: a parquet file or tar shard; its webdataset sample, or the row's number there or in the source)."""
    # Imported here: `data.sources` imports `datasets` (an optional dependency) as it loads, and rows naming a file
    # come from `datasets` anyway.
    from ..data.sources import SHARD_COLUMN, SOURCE_ROW_COLUMN, WEBDATASET_KEY

    origin = [batch[SHARD_COLUMN][row]] if batch.get(SHARD_COLUMN) else []
    if batch.get(WEBDATASET_KEY):
        origin.append(f"sample {batch[WEBDATASET_KEY][row]!r}")
    elif batch.get(SOURCE_ROW_COLUMN):
        origin.append(f"row {batch[SOURCE_ROW_COLUMN][row]} (from 0)")
    source = f" (from {', '.join(origin)})" if origin else ""
    return f"{name}, key {batch['image_key'][row]!r}{source}"


__all__ = [
    "DEFAULT_SHARD_SIZE",
    "RUN_FILE",
    "CaptionRunSummary",
    "caption_dataset_to_parquet",
    "distributed_rank",
    "finished_caption_run",
    "resolve_local_paths",
    "shard_file_name",
]
