"""Text files in and out: the files users hand the package (caption lists, predictions, arguments, configs), and
the results it writes.

Each read failure names the file: a caption file in another encoding or a JSON typo otherwise surfaces as a bare
`UnicodeDecodeError` or `JSONDecodeError` that does not say which of several input files is at fault. Results are
written whole or not at all, so that a failed run never destroys the output of an earlier one. The lock files that
keep two runs out of one output folder are taken here too.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import unicodedata
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

if TYPE_CHECKING:
    from filelock import BaseFileLock


@contextlib.contextmanager
def open_text(path: str | os.PathLike[str], newline: str | None = None) -> Iterator[TextIO]:
    """Open a UTF-8 text file, skipping a byte-order mark (Excel writes one); another encoding is an error naming it."""
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as file:
            yield file
    except UnicodeDecodeError as error:  # raised while reading, inside the caller's `with`
        # The error's position counts from the chunk being decoded: the line comes from reading the file again.
        problem = not_utf8_error(path) or f"{path} is not valid UTF-8 ({error.reason}); the file must be UTF-8 encoded."
        raise ValueError(problem) from None


# Bytes decoded at a time when a file is checked for UTF-8.
UTF8_CHECK_CHUNK_BYTES = 1 << 24


def not_utf8_error(path: str | os.PathLike[str]) -> str | None:
    """
    The error naming `path` and the line of its first byte that is not UTF-8, or None if the file is UTF-8. Read in
    chunks of `UTF8_CHECK_CHUNK_BYTES` and decoded in C (about a second per gigabyte, in constant memory): cheap
    enough to check large files before streaming them, whose readers would meet a bad byte midway and fail naming no
    file.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    newlines = 0  # before the bad byte
    with open(path, "rb") as file:
        try:
            while chunk := file.read(UTF8_CHECK_CHUNK_BYTES):
                held = len(decoder.getstate()[0])  # a character's first bytes, held from the chunk before
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as error:  # `start` counts the held bytes first, which are never newlines
                    newlines += chunk[: max(0, error.start - held)].count(b"\n")
                    raise
                newlines += chunk.count(b"\n")
            decoder.decode(b"", final=True)  # a character cut off by the end of the file
        except UnicodeDecodeError as error:
            return (
                f"{path} is not valid UTF-8 ({error.reason}); the file must be UTF-8 encoded (the first bad byte is on "
                f"line {newlines + 1})."
            )
    return None


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON value in a UTF-8 file; a decoding or syntax error names the file."""
    with open_text(path) as file:
        try:
            return json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None


def holds_clipcap_model(folder: str | os.PathLike[str]) -> bool:
    """Whether `folder` holds a saved ClipCap model: a `config.json` with `model_type` "clipcap"."""
    try:
        return read_json(os.path.join(folder, "config.json")).get("model_type") == "clipcap"
    except (OSError, ValueError, AttributeError):  # no config, not UTF-8 JSON, not a JSON object
        return False


def escape_controls(text: str) -> str:
    """
    `text` with its control characters written as escapes (a newline as `\\n`, a tab as `\\t`), so that a file name
    holding them keeps to its field of one line of plain output or of an error message.
    """
    return "".join(
        char.encode("unicode_escape").decode("ascii") if unicodedata.category(char) == "Cc" else char for char in text
    )


def sampled_sha256(
    path: str | os.PathLike[str], whole_limit: int = 2**20, sample_bytes: int = 2**16, header_bytes: int = 0
) -> str:
    """
    A cheap SHA-256 of a file's content: of the whole file up to `whole_limit` bytes; of a larger one's first
    `header_bytes` (a header, hashed whole) and the first and last `sample_bytes` after them. Record the size beside
    it: a change in the middle of a large file alone goes unseen, which is the price of not reading gigabytes.
    """
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        if size <= whole_limit:
            digest.update(file.read())
        else:
            digest.update(file.read(header_bytes))
            digest.update(file.read(sample_bytes))
            file.seek(max(file.tell(), size - sample_bytes))
            digest.update(file.read(sample_bytes))
    return digest.hexdigest()


def write_text_atomically(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` (UTF-8, its line ends as they are) to `path` whole or not at all: [`write_atomically`]."""
    write_atomically(path, lambda file: file.write(text.encode("utf-8")))


def write_atomically(
    path: str | os.PathLike[str], write: Callable[[BinaryIO], object], *, temporary_name: str | None = None
) -> None:
    """
    Write a file whole or not at all: `write` is handed a new file in the same folder, open for binary writing, and
    that file is synced to disk and renamed over `path` once `write` returns. A failure (or a crash) leaves the
    earlier file or the new one, never part of one or an emptied one, and removes the temporary file.

    A file replaced keeps what a rewrite in place keeps: its permission bits (given to the new file before anything is
    written to it, so the file is never readable more widely than it was) and, where `path` is a symbolic link, the
    link: the file it points to is replaced. The folder is synced after the rename ([`_sync_folder`]), so that after a
    crash the new file is there, whole (a resumed run trusts its run file).

    The temporary file is hidden and named at random, unless `temporary_name` names it: for a file that one process
    writes at a time, so that the leftover of a run killed while writing it is replaced by the next run's. Either way
    it is created anew, never written through a link found at its name.
    """
    given, path = Path(path), Path(os.path.realpath(path))
    if not path.parent.is_dir():  # else the error would name the hidden temporary file
        if given.is_symlink():
            raise FileNotFoundError(f"{given} is a link to {path}, in a folder that does not exist: cannot write it.")
        # The nearest of its folders that is there: where that is a file, no folder can be created below it.
        nearest = next((folder for folder in (given.parent, *given.parent.parents) if folder.exists()), None)
        if nearest is not None and not nearest.is_dir():
            raise NotADirectoryError(f"Cannot write {given}: {nearest} is a file, not a folder.")
        raise FileNotFoundError(
            f"Cannot write {given}: the folder {given.parent} does not exist; create it, or give a path in a folder "
            "that does."
        )
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = None  # a new file: the umask's mode
    temporary = path.with_name(temporary_name or f".{path.name}.{uuid.uuid4().hex}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        if temporary_name is not None:
            temporary.unlink(missing_ok=True)  # a killed run's leftover, or a link planted at that name
        with open(os.open(temporary, flags, 0o666 if mode is None else 0o600), "wb") as file:
            if mode is not None:
                os.chmod(temporary, mode)
            write(file)
            file.flush()
            _fsync(file.fileno())  # on disk before the rename makes it the file: none empty after a crash
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(OSError):  # a folder that cannot be written may not let it go: the first error stands
            temporary.unlink(missing_ok=True)
    _sync_folder(path.parent)


def _sync_folder(folder: str | os.PathLike[str]) -> None:
    """
    Flush `folder`'s entries to disk, so that a file renamed into it stays there after a crash (POSIX: a rename is
    durable once its folder is synced). Nothing where a folder cannot be opened or synced (Windows, some network
    filesystems): the rename stands, only not yet flushed.
    """
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # EINVAL, EBADF where a folder cannot be synced
        pass
    finally:
        os.close(descriptor)


def _fsync(descriptor: int) -> None:
    """Flush a written file's data to disk; nothing on filesystems that cannot (EINVAL, ENOTSUP), but a write error
    that surfaces here (a full disk, EIO) is raised."""
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise


def _umask() -> int:
    """The process's umask, read from /proc where Linux shows it: setting it, even for a moment, is process-wide."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# What `save_pretrained` writes without the umask's mode: safetensors writes weights 0600 (safetensors/safetensors#782),
# and transformers 4.x copies the model code files with the mode of the installed package's.
_FILES_WITHOUT_UMASK_MODE = ("*.safetensors", "*.py")


def give_files_the_umask_mode(folder: str | os.PathLike[str]) -> None:
    """
    Give the weights and code files a `save_pretrained` wrote in `folder` the mode `open()` gives under the umask, as
    every other file of a saved model has: other users and containers can then read them where the umask allows.
    Links are left alone: `save_pretrained` writes none, and their targets may be anyone's files (a private token
    that a link planted in a shared folder points at would be made readable).
    """
    file_mode = 0o666 & ~_umask()
    for pattern in _FILES_WITHOUT_UMASK_MODE:
        for path in Path(folder).glob(pattern):
            mode = path.lstat().st_mode
            if stat.S_ISREG(mode) and stat.S_IMODE(mode) != file_mode:
                path.chmod(file_mode)


def save_pretrained(folder: str | os.PathLike[str], *parts: Any) -> None:
    """`part.save_pretrained(folder)` for each part (a model, a processor), every file with the umask's mode."""
    for part in parts:
        part.save_pretrained(folder)
    give_files_the_umask_mode(folder)


def check_output_folder(
    folder: str | os.PathLike[str], option: str, purpose: str, written_beside: bool = False
) -> None:
    """
    Say before the work, not after it, that `folder` (given as `option`) cannot be written: it must be a folder, or
    be creatable under a folder that can be written. `purpose` ends the advice: "name a folder to {purpose}".
    `written_beside`: the folder is written whole beside itself and renamed into place ([`write_folder_atomically`]),
    so an existing one (not a mount point) needs its parent writable, not itself.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{option}: {folder} is a file; name a folder to {purpose}.")
    if written_beside and folder.is_symlink():  # written where it points, as `write_folder_atomically` does
        folder = folder.resolve()
    nearest = next(parent for parent in (folder, *folder.absolute().parents) if parent.exists())
    if written_beside and nearest == folder and not os.path.ismount(folder):
        nearest = folder.absolute().parent
    if not nearest.is_dir():
        raise NotADirectoryError(
            f"{option}: {folder} cannot be created: {nearest} is a file; name a folder to {purpose}."
        )
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{option}: {folder} cannot be written: the folder {nearest} is not writable; name another folder."
        )


def check_output_outside_inputs(
    output: str | os.PathLike[str],
    output_option: str,
    inputs: Iterable[tuple[str, str | os.PathLike[str] | None]],
    consequence: str,
    written: Sequence[str] | None = None,
) -> None:
    """
    Refuse, before any work, an output folder (given as `output_option`) that is, or lies inside, a folder the command
    reads: `inputs` are `(option, path)` pairs, of which those naming an existing folder count, and glob patterns
    that may match a file the command writes in the output folder or below it ([`glob_may_read`]: `data/*.parquet`
    reads `data` but not `data/out`), as the loaders read them (files, Hub names and unset options do not).
    `consequence` says what writing there would do; `written`, where known, names the files the command writes (a
    pattern of `*.jpg` reads none of a captioning run's), else any file counts.
    """
    resolved_output = Path(os.path.realpath(os.path.expanduser(output)))
    for option, path in inputs:
        if not path:
            continue
        named = os.path.expanduser(path)
        # A folder whose name holds a wildcard is that folder, as the loaders take it (a path that exists first).
        searched = None if os.path.exists(named) else glob_folder(named)
        if not os.path.isdir(searched or named) or (searched and not glob_may_read(named, resolved_output, written)):
            continue
        folder = Path(os.path.realpath(searched or named))
        if resolved_output == folder or folder in resolved_output.parents:
            where = "is" if resolved_output == folder else "lies inside"
            what = f"the {option} folder {path}"
            if searched is not None:
                what = f"the folder {searched} that {option} {path} searches"
            raise ValueError(
                f"{output_option} {output} {where} {what}: {consequence}. Give {output_option} a folder outside it."
            )


# The characters that make a path a glob pattern (as `glob` has them).
_GLOB_MAGIC = re.compile(r"[*?[]")


def glob_folder(pattern: str) -> str | None:
    """
    The folder a glob pattern searches: its path before the first part that holds a wildcard (`data` for
    `data/*.parquet` or `data/**/x.parquet`, `.` for `*.parquet`); None for a path without wildcards.
    """
    parts = os.path.normpath(pattern).split(os.sep)
    first = next((index for index, part in enumerate(parts) if _GLOB_MAGIC.search(part)), None)
    if first is None:
        return None
    return os.sep.join(parts[:first]) or (os.sep if pattern.startswith(os.sep) else ".")


def glob_may_read(pattern: str, folder: Path, names: Sequence[str] | None = None) -> bool:
    """
    Whether a glob pattern (with wildcards, see [`glob_folder`]) may match a file in `folder` (a real path) or in a
    folder below it: `data/*.parquet` reads `data` but not `data/out`, `data/*/x.parquet` reads `data/out`, and a
    pattern with `**` reads every folder below the folders its parts before `**` match. Only files like the given
    `names` count where they are given (`data/**/*.jpg` reads no `captions.parquet`), any file otherwise; since the
    numbers in the names written are not known yet, the pattern is compared with its numbers and character classes
    taken as any text (`*-of-00004.parquet` may read `captions-00000-of-00001.parquet`'s like).
    """
    searched = glob_folder(pattern)
    searched_real = Path(os.path.realpath(searched))
    if folder != searched_real and searched_real not in folder.parents:
        return False
    below = folder.relative_to(searched_real).parts
    parts = Path(os.path.normpath(pattern)).parts[len(Path(searched).parts) :]
    if names is not None and "**" not in parts[-1]:
        file_pattern = re.sub(r"\[[^]]*\]|[0-9]+", "*", parts[-1])
        if not any(fnmatch.fnmatchcase(name, file_pattern) for name in names):
            return False
    recursive = next((index for index, part in enumerate(parts) if "**" in part), None)
    if recursive is not None:
        folder_patterns = parts[:recursive]
    else:
        folder_patterns = parts[:-1]
        if len(below) > len(folder_patterns):
            return False
    return all(fnmatch.fnmatchcase(name, part) for name, part in zip(below, folder_patterns))


def write_folder_atomically(folder: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """
    `write(staging)` into a new folder beside `folder`, then rename it to `folder`: a folder there before (an earlier
    output, or an empty folder) is renamed aside first and deleted last. A failure leaves `folder` as it was and
    removes what was written, and the parent folders created here; a process killed part-way leaves its hidden
    `.partial` folder behind (or the earlier folder renamed aside, `.old`), never a half-written `folder` that a rerun
    would take as done. The next write of `folder` names such leftovers in a warning ([`_warn_of_leftovers`]).

    A `folder` that is a link is written where it points. One that is a mount point (a container's volume), which
    cannot be renamed, is written into a hidden folder inside it, and its entries are then replaced by the new ones
    ([`move_entries`]), put back if that fails.
    """
    folder = Path(folder)
    if folder.is_symlink():
        folder = folder.resolve()
    created_parents = [parent for parent in folder.parents if not parent.exists()]  # deepest first
    # A plain mkdir, so that the folder gets the umask's permissions (tempfile.mkdtemp would make it private).
    mount_point = os.path.ismount(folder)
    staging = (folder if mount_point else folder.parent) / f".{folder.name}.{secrets.token_hex(8)}.partial"
    aside = staging.with_suffix(".old")
    _warn_of_leftovers(folder, staging.parent)
    try:
        staging.mkdir(parents=True)
        write(staging)
        if mount_point:
            earlier = [entry.name for entry in folder.iterdir() if entry != staging]
            move_entries(staging, folder, aside, [entry.name for entry in staging.iterdir()], clear=earlier)
        else:
            if folder.exists():
                folder.rename(aside)
            staging.rename(folder)
    except BaseException:
        if mount_point:
            with contextlib.suppress(OSError):  # emptied by `move_entries`; else it holds the earlier entries: kept
                aside.rmdir()
        elif aside.exists() and not folder.exists():
            aside.rename(folder)
        shutil.rmtree(staging, ignore_errors=True)
        for parent in created_parents:
            with contextlib.suppress(OSError):  # not empty: something else wrote there meanwhile
                parent.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)
    if mount_point:
        staging.rmdir()


def _warn_of_leftovers(folder: Path, parent: Path) -> None:
    """
    Warn of the hidden folders that earlier writes of `folder` left in `parent` when their process was killed (no
    cleanup ran): `.partial` ones hold an unfinished new folder, `.old` ones the earlier folder renamed aside. They are
    named, not deleted: their writer may be another process, still running.
    """
    if not parent.is_dir():
        return
    leftover = re.compile(rf"\.{re.escape(folder.name)}\.[0-9a-f]{{16}}\.(partial|old)")
    found = sorted(path for path in parent.iterdir() if leftover.fullmatch(path.name))
    if not found:
        return
    names = ", ".join(str(path) for path in found)
    warnings.warn(
        f"Found {names}: hidden folders that a write of {folder} leaves behind when its process is killed part-way (a "
        f"`.partial` folder holds an unfinished new {folder.name}, an `.old` one the {folder.name} it was replacing). "
        f"Not deleted, as another process may be writing {folder} now; once none is, delete them (where {folder} "
        "itself is missing, rename its `.old` folder back to it first).",
        stacklevel=3,
    )


def move_entries(source: Path, folder: Path, aside: Path, names: list[str], clear: list[str] = ()) -> None:
    """
    Move the entries `names` of `source` into `folder` (on the same filesystem), each replacing its namesake there;
    `clear` names more entries of `folder` to take out. What is replaced or taken out is moved into `aside` (created
    here; the caller deletes it once done, and must not while it holds anything after a failure). A failure part-way,
    Ctrl-C included, puts `folder` back as it was; should putting back fail too, the error names `aside`, which then
    holds the earlier entries.
    """
    aside.mkdir()
    taken_out, moved = [], []
    try:
        for name in dict.fromkeys([*clear, *names]):  # each once, `clear`'s first
            if _exists(folder / name):
                taken_out.append(name)  # noted first: a stop right after the move still puts it back
                os.replace(folder / name, aside / name)
        for name in names:
            moved.append(name)
            os.replace(source / name, folder / name)
    except BaseException as error:
        try:
            for name in reversed(moved):
                if _exists(folder / name) and not _exists(source / name):
                    os.replace(folder / name, source / name)
            for name in reversed(taken_out):
                if _exists(aside / name):
                    os.replace(aside / name, folder / name)
        except BaseException as failure:
            raise OSError(
                f"Could not put back the entries of {folder} after {type(error).__name__} ({failure}): they are in "
                f"{aside}; move them back by hand."
            ) from error
        raise


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()  # a link, even one to nothing, is an entry


class FileLocksUnsupportedError(OSError):
    """A folder's filesystem has no file locks (`flock`), and the installed `filelock` cannot lock without them."""


def acquire_file_lock(lock_file: str | os.PathLike[str], folder_description: str, timeout: float = -1) -> BaseFileLock:
    """
    Take the `filelock` lock `lock_file` (created if missing) and return it held; the caller releases it.

    Args:
        lock_file: the lock file, in the folder it guards.
        folder_description: what errors call the folder ("the embeddings folder"), before its path.
        timeout: seconds to wait for another holder before `filelock.Timeout` (0: one try, -1: no limit).

    Raises:
        FileLocksUnsupportedError: the folder's filesystem has no `flock` and `filelock` 3 is installed (it raises a
            bare `NotImplementedError` there; `filelock` 4 falls back to lock files by itself).
    """
    from filelock import FileLock  # a dependency of huggingface_hub, so always installed

    lock = FileLock(lock_file)
    try:
        lock.acquire(timeout=timeout)
    except NotImplementedError:
        raise FileLocksUnsupportedError(
            f"Cannot lock {folder_description} {Path(lock_file).parent}: its filesystem does not support file locks "
            "(flock). Upgrade filelock (`pip install -U filelock`: version 4 locks without flock) or use a folder on "
            "another filesystem."
        ) from None
    return lock
