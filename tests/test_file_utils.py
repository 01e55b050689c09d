import shutil
import warnings

import pytest

from clipcap_hf.utils import file_utils
from clipcap_hf.utils.file_utils import not_utf8_error, open_text, read_json


def test_read_json_skips_a_byte_order_mark(tmp_path):
    path = tmp_path / "excel.json"
    path.write_bytes("\ufeff{\"caption\": \"un café\"}".encode("utf-8"))
    assert read_json(path) == {"caption": "un café"}


def test_other_encodings_and_bad_json_name_the_file(tmp_path):
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('{"caption": "un café"}'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.json is not valid UTF-8 \(invalid continuation byte\); the file"):
        read_json(latin1)
    broken = tmp_path / "broken.json"
    broken.write_text('{"caption": "a dog",}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON: Expecting property name .* column 21"):
        read_json(broken)


def test_open_text_names_the_file_when_reading_fails_midway(tmp_path):
    path = tmp_path / "captions.tsv"
    path.write_bytes(b"a dog\n" * 10_000 + "un caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"captions\.tsv is not valid UTF-8"), open_text(path) as file:
        for _ in file:
            pass


def test_a_file_written_atomically_keeps_its_mode_its_link_and_its_line_ends(tmp_path):
    import os
    import stat

    from clipcap_hf.utils.file_utils import write_text_atomically

    new = tmp_path / "new.txt"
    write_text_atomically(new, "a\r\nb\n")  # line ends as given, on every platform
    assert new.read_bytes() == b"a\r\nb\n"
    kept = tmp_path / "kept.txt"
    kept.write_text("old")
    kept.chmod(0o640)  # neither a new file's mode under the usual umask nor a temporary file's
    write_text_atomically(kept, "new")
    assert kept.read_text() == "new" and stat.S_IMODE(kept.stat().st_mode) == 0o640
    link = tmp_path / "link.txt"
    link.symlink_to("kept.txt")
    write_text_atomically(link, "through the link")
    assert link.is_symlink() and os.readlink(link) == "kept.txt"
    assert kept.read_text() == "through the link" and stat.S_IMODE(kept.stat().st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["kept.txt", "link.txt", "new.txt"]  # no temporary file left


def test_a_file_written_atomically_has_its_mode_before_its_content_and_a_broken_link_is_named(tmp_path):
    import os
    import stat

    from clipcap_hf.utils.file_utils import write_atomically, write_text_atomically

    secret = tmp_path / "secret.txt"
    secret.write_text("old")
    secret.chmod(0o600)
    modes = []

    def write(file):  # the new file's mode as its content goes in
        modes.append(stat.S_IMODE(os.fstat(file.fileno()).st_mode))
        file.write(b"new secret")

    write_atomically(secret, write)
    assert modes == [0o600] and secret.read_text() == "new secret"

    dangling = tmp_path / "metrics.json"
    dangling.symlink_to(tmp_path / "gone" / "metrics.json")
    with pytest.raises(FileNotFoundError) as error:
        write_text_atomically(dangling, "{}")
    target = tmp_path / "gone" / "metrics.json"
    assert str(error.value) == f"{dangling} is a link to {target}, in a folder that does not exist: cannot write it."
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "secret.txt"]


def test_a_file_written_atomically_in_a_folder_that_is_not_there_is_named_with_its_folder(tmp_path, monkeypatch):
    import os
    import re

    from clipcap_hf.utils.file_utils import write_text_atomically

    # Named as given, a relative path too, with the folder missing: not the hidden temporary file.
    monkeypatch.chdir(tmp_path)
    for given, folder in ((tmp_path / "out" / "eval" / "metrics.json", tmp_path / "out" / "eval"),
                          ("out/metrics.json", "out")):
        message = (f"Cannot write {given}: the folder {folder} does not exist; create it, or give a path in a folder "
                   "that does.")
        with pytest.raises(FileNotFoundError, match=f"^{re.escape(message)}$"):
            write_text_atomically(given, "{}")
    # A file where a folder of the path is due, also further up (no folder can be created in it): the file named.
    (tmp_path / "results").write_text("a file")
    for given, file in (("results/m.json", "results"), ("results/sub/m.json", "results"),
                        (tmp_path / "results" / "sub" / "eval" / "m.json", tmp_path / "results")):
        message = f"Cannot write {given}: {file} is a file, not a folder."
        with pytest.raises(NotADirectoryError, match=f"^{re.escape(message)}$"):
            write_text_atomically(given, "{}")
    assert os.listdir(tmp_path) == ["results"]


def test_the_utf8_check_reads_in_chunks_and_names_the_line_of_the_first_bad_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(file_utils, "UTF8_CHECK_CHUNK_BYTES", 4)  # characters and lines cut across chunks
    good = tmp_path / "good.txt"
    good.write_bytes("\ufeffcaf\u00e9\r\n\u4e2d\U0001f600\n\n".encode("utf-8"))  # 2-, 3- and 4-byte characters
    assert not_utf8_error(good) is None
    cases = {
        b"ab\ncd\nef\xe9gh\n": (3, "invalid continuation byte"),  # the bad byte in the third chunk
        b"a\n\n\n\xe4\xb8": (4, "unexpected end of data"),  # a character cut off by the end of the file
        b"\xff\n": (1, "invalid start byte"),
        "\n\u4e2d\n".encode("utf-8")[:-2] + b"\n\n": (2, "invalid continuation byte"),
    }
    for data, (line, reason) in cases.items():
        bad = tmp_path / "bad.txt"
        bad.write_bytes(data)
        expected = (
            f"{bad} is not valid UTF-8 ({reason}); the file must be UTF-8 encoded (the first bad byte is on line "
            f"{line})."
        )
        assert not_utf8_error(bad) == expected, data
        with pytest.raises(ValueError) as error, open_text(bad) as file:  # open_text words its error the same way
            file.read()
        assert str(error.value) == expected


def _write_model(files):
    def write(staging):
        for name, text in files.items():
            (staging / name).write_text(text)

    return write


def _listing(folder):
    return {path.name: path.read_text() for path in folder.iterdir()}


def test_a_folder_written_atomically_through_a_link_is_written_where_it_points(tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    file_utils.write_folder_atomically(real, _write_model({"config.json": "old", "notes.txt": "old"}))
    link.symlink_to(real)
    file_utils.write_folder_atomically(link, _write_model({"config.json": "new"}))
    assert link.is_symlink() and link.resolve() == real
    assert _listing(real) == {"config.json": "new"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["link", "real"]  # nothing hidden left beside


def test_a_mount_point_is_written_into_not_renamed_and_put_back_when_the_move_fails(tmp_path, monkeypatch):
    import os

    volume = tmp_path / "volume"
    volume.mkdir()
    monkeypatch.setattr(file_utils.os.path, "ismount", lambda path: os.fspath(path) == os.fspath(volume))
    rename = type(volume).rename

    def no_rename_of_the_volume(self, target):  # as the kernel refuses (EBUSY)
        if self == volume:
            raise OSError(16, "Device or resource busy", str(self))
        return rename(self, target)

    monkeypatch.setattr(type(volume), "rename", no_rename_of_the_volume)
    file_utils.write_folder_atomically(volume, _write_model({"config.json": "first", "old.txt": "first"}))
    assert _listing(volume) == {"config.json": "first", "old.txt": "first"}
    file_utils.write_folder_atomically(volume, _write_model({"config.json": "second", "model.bin": "second"}))
    assert _listing(volume) == {"config.json": "second", "model.bin": "second"}  # replaced whole, nothing hidden

    replace, moves = os.replace, []

    def stopped_on_the_second_new_entry(source, target):
        if os.path.dirname(source).endswith(".partial"):
            moves.append(target)
            if len(moves) == 2:
                raise KeyboardInterrupt
        replace(source, target)

    monkeypatch.setattr(file_utils.os, "replace", stopped_on_the_second_new_entry)
    with pytest.raises(KeyboardInterrupt):
        file_utils.write_folder_atomically(volume, _write_model({"config.json": "third", "a.txt": "third"}))
    assert _listing(volume) == {"config.json": "second", "model.bin": "second"}


def test_the_umask_mode_is_given_to_saved_files_not_to_what_a_link_points_at(tmp_path):
    import os
    import stat

    secret = tmp_path / "token"
    secret.write_text("hf_secret")
    secret.chmod(0o600)
    saved = tmp_path / "model"
    saved.mkdir()
    (saved / "model.safetensors").write_bytes(b"weights")
    (saved / "model.safetensors").chmod(0o600)  # as safetensors writes it
    (saved / "old.safetensors").symlink_to(secret)  # planted in a shared output folder
    previous = os.umask(0o022)
    try:
        file_utils.give_files_the_umask_mode(saved)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((saved / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_entries_that_cannot_be_put_back_are_named_and_kept(tmp_path, monkeypatch):
    import os

    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "model.safetensors").write_text("earlier")
    monkeypatch.setattr(file_utils.os.path, "ismount", lambda path: os.fspath(path) == os.fspath(volume))
    replace = os.replace

    def stopped_then_unable_to_put_back(source, target):
        if os.path.dirname(source).endswith(".partial") and os.path.basename(source) == "model.safetensors":
            raise KeyboardInterrupt  # the new entry moving in
        if os.path.dirname(source).endswith(".old"):
            raise OSError(5, "Input/output error")  # the earlier one going back
        replace(source, target)

    monkeypatch.setattr(file_utils.os, "replace", stopped_then_unable_to_put_back)
    with pytest.raises(OSError) as error:
        file_utils.write_folder_atomically(volume, _write_model({"model.safetensors": "new"}))
    aside = next(volume.glob(".*.old"))
    assert str(error.value) == (
        f"Could not put back the entries of {volume} after KeyboardInterrupt ([Errno 5] Input/output error): they "
        f"are in {aside}; move them back by hand."
    )
    assert (aside / "model.safetensors").read_text() == "earlier"  # kept, not deleted with the staging folder


def test_a_folder_written_beside_itself_needs_its_parent_writable_not_itself(tmp_path, monkeypatch):
    import os

    output = tmp_path / "out"
    output.mkdir()
    not_writable = set()
    monkeypatch.setattr(file_utils.os, "access", lambda path, mode: os.fspath(path) not in not_writable)
    not_writable.add(os.fspath(tmp_path))  # the new folder is written beside the old one, in its parent
    with pytest.raises(PermissionError) as error:
        file_utils.check_output_folder(output, "--output", "write to", written_beside=True)
    assert str(error.value) == (
        f"--output: {output} cannot be written: the folder {tmp_path} is not writable; name another folder."
    )
    file_utils.check_output_folder(output, "--output", "write to")  # written into: its own mode counts
    not_writable = {os.fspath(output)}
    file_utils.check_output_folder(output, "--output", "write to", written_beside=True)
    with pytest.raises(PermissionError):
        file_utils.check_output_folder(output, "--output", "write to")


def test_a_link_written_beside_itself_needs_the_folder_it_points_into_writable(tmp_path, monkeypatch):
    import os

    (tmp_path / "writable" / "out").mkdir(parents=True)
    (tmp_path / "read-only").mkdir()
    link = tmp_path / "read-only" / "out"
    link.symlink_to(tmp_path / "writable" / "out")
    not_writable = {os.fspath(tmp_path / "read-only")}
    monkeypatch.setattr(file_utils.os, "access", lambda path, mode: os.fspath(path) not in not_writable)
    file_utils.check_output_folder(link, "--output", "write to", written_beside=True)  # written beside its target
    not_writable = {os.fspath(tmp_path / "writable")}
    with pytest.raises(PermissionError, match=r"the folder .*writable is not writable"):
        file_utils.check_output_folder(link, "--output", "write to", written_beside=True)


def test_an_output_in_the_folder_a_glob_pattern_searches_is_refused_naming_the_pattern(tmp_path, monkeypatch):
    import re

    data = tmp_path / "data"
    (data / "sub[1]").mkdir(parents=True)

    def check(output, pattern):
        file_utils.check_output_outside_inputs(output, "--output", [("--data-files", pattern)], "it would be read")

    # Refused: an output folder the pattern may read files from, or a folder below which it may.
    for pattern, output, where in [
        (f"{data}/*.parquet", data, "is"),
        (f"{data}/**/train-?.parquet", data / "a" / "b", "lies inside"),
        (f"{data}/**", data / "a", "lies inside"),
        (f"{data}/shard-[0-9]/*.parquet", data / "shard-1", "lies inside"),
        (f"{data}/*/*/*.parquet", data / "out", "lies inside"),
    ]:
        with pytest.raises(ValueError) as refused:
            check(output, pattern)
        assert str(refused.value) == (
            f"--output {output} {where} the folder {data} that --data-files {pattern} searches: it would be read. "
            "Give --output a folder outside it."
        )
    monkeypatch.chdir(data)
    with pytest.raises(ValueError, match=re.escape("--output . is the folder . that --data-files *.parquet searches")):
        check(".", "*.parquet")
    # Folders the pattern cannot read (below or beside the ones it matches), outside the searched folder, a pattern of
    # a folder not there (a Hub dataset's files) and a folder whose own name holds a wildcard (taken as that folder, as
    # the loaders take it): no refusal.
    check("out", "*.parquet")
    check(data / "out", f"{data}/*.parquet")
    check(data / "out", f"{data}/shard-[0-9]/*.parquet")
    check(data / "out" / "a" / "b", f"{data}/*/*/*.parquet")
    check(tmp_path / "out", f"{data}/*.parquet")
    # Given the names of the files the command writes, a pattern matching none of them reads none of them.
    written = ("captions-00000-of-00001.parquet", "caption_run.json")
    for pattern in (f"{data}/**/*.jpg", f"{data}/train-[0-9]*.parquet"):
        file_utils.check_output_outside_inputs(data, "--output", [("--data-files", pattern)], "x", written)
    # Numbers and character classes match the run's, whatever its number of shards.
    for pattern in (f"{data}/**/*.parquet", f"{data}/*.json", f"{data}/**", f"{data}/*-of-00004.parquet",
                    f"{data}/captions-[0-9][0-9]*"):
        with pytest.raises(ValueError, match="that --data-files .* searches: x"):
            file_utils.check_output_outside_inputs(data, "--output", [("--data-files", pattern)], "x", written)
    check(data / "out", f"{tmp_path}/missing/*.parquet")
    check(data / "out", f"{data}/sub[1]")
    with pytest.raises(ValueError, match=re.escape(f"lies inside the --data-files folder {data}/sub[1]: ")):
        check(data / "sub[1]" / "out", f"{data}/sub[1]")
    assert file_utils.glob_folder("/*.parquet") == "/" and file_utils.glob_folder("data/x.parquet") is None


def test_a_file_written_atomically_has_its_folder_synced_after_the_rename(tmp_path, monkeypatch):
    import errno
    import os
    import stat

    from clipcap_hf.utils.file_utils import write_text_atomically

    folder = tmp_path / "run"
    folder.mkdir()
    (tmp_path / "elsewhere").mkdir()
    target = folder / "caption_run.json"
    (tmp_path / "elsewhere" / "link.json").symlink_to(target)
    real_fsync, real_open = os.fsync, os.open
    synced = []  # each fsync: the folder's inode (or the bytes of the file synced) and the target's text then

    def watched_fsync(descriptor):
        status = os.fstat(descriptor)
        what = status.st_ino if stat.S_ISDIR(status.st_mode) else f"file of {status.st_size} bytes"
        synced.append((what, target.read_text() if target.exists() else None))
        return real_fsync(descriptor)

    monkeypatch.setattr(file_utils.os, "fsync", watched_fsync)
    write_text_atomically(target, "{}")
    # Through a link: the folder of the file it points to, where the rename happens.
    write_text_atomically(tmp_path / "elsewhere" / "link.json", "[]]")
    # The new text synced before the rename, the folder after it.
    assert synced == [
        ("file of 2 bytes", None), (folder.stat().st_ino, "{}"),
        ("file of 3 bytes", "{}"), (folder.stat().st_ino, "[]]"),
    ]

    # Where nothing can be synced (EINVAL on some filesystems) or a folder cannot be opened (Windows), the file is
    # written as ever; a failed write is raised, the earlier file kept.
    def failed(descriptor):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(file_utils.os, "fsync", failed)
    with pytest.raises(OSError, match="Input/output error"):
        write_text_atomically(target, "0")
    assert target.read_text() == "[]]" and sorted(os.listdir(folder)) == ["caption_run.json"]

    def unsupported(descriptor):
        raise OSError(errno.EINVAL, "Invalid argument")

    def no_folders(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(file_utils.os, "fsync", unsupported)
    write_text_atomically(target, "1")
    assert target.read_text() == "1"
    monkeypatch.setattr(file_utils.os, "fsync", real_fsync)
    monkeypatch.setattr(file_utils.os, "open", no_folders)
    write_text_atomically(target, "2")
    assert target.read_text() == "2" and sorted(os.listdir(folder)) == ["caption_run.json"]


def test_a_folder_written_atomically_names_the_leftovers_of_killed_writes_without_deleting_them(tmp_path):
    # A killed write's hidden folder (hundreds of MB for a model) was neither removed nor mentioned by the next one.
    partial, old = tmp_path / ".model.0123456789abcdef.partial", tmp_path / ".model.fedcba9876543210.old"
    others = [tmp_path / ".model2.0123456789abcdef.partial", tmp_path / ".model.partial", tmp_path / "model.partial"]
    for folder in (partial, old, *others):
        folder.mkdir()
        (folder / "model.safetensors").write_text("weights")
    model = tmp_path / "model"
    with pytest.warns(UserWarning) as caught:
        file_utils.write_folder_atomically(model, _write_model({"config.json": "new"}))
    assert [str(warning.message) for warning in caught] == [
        f"Found {partial}, {old}: hidden folders that a write of {model} leaves behind when its process is killed "
        "part-way (a `.partial` folder holds an unfinished new model, an `.old` one the model it was replacing). Not "
        f"deleted, as another process may be writing {model} now; once none is, delete them (where {model} itself is "
        "missing, rename its `.old` folder back to it first)."
    ]
    assert caught[0].filename == __file__  # the caller's line
    assert _listing(model) == {"config.json": "new"}
    assert all((folder / "model.safetensors").exists() for folder in (partial, old, *others))
    shutil.rmtree(partial)
    shutil.rmtree(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        file_utils.write_folder_atomically(model, _write_model({"config.json": "newer"}))
    assert _listing(model) == {"config.json": "newer"}
