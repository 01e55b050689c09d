"""Image sources through `datasets` (load_image_source): webdataset tars, parquet bytes, saved datasets, image folders,
JSON files of paths and the caption formats, all as rows of `image`, `image_key` and `captions`."""

import hashlib
import io
import json
import os
import re
import shutil
from unittest import mock

import datasets
import numpy as np
import PIL.Image
import pytest
from conftest import CAPTIONED_IMAGES, random_images, write_webdataset_shards

from clipcap_hf.data import decode_image, load_image_source
from clipcap_hf.data.sources import read_stream


def sha256_key(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_key(path) -> str:
    stat = os.stat(path)
    return f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_webdataset_shards_map_style_and_streaming(webdataset_shards):
    shards, samples = webdataset_shards
    source = load_image_source(data_files=[str(path) for path in shards], caption_column="txt")
    assert source["__key__"] == list(samples)
    assert source["image_key"] == [sha256_key(data) for data, _ in samples.values()]
    assert source["captions"] == [[caption] for _, caption in samples.values()]
    assert source["__url__"] == [str(shards[0])] * 3 + [str(shards[1])] * 2
    first_jpeg = next(iter(samples.values()))[0]
    assert np.array_equal(np.asarray(source[0]["image"]), np.asarray(PIL.Image.open(io.BytesIO(first_jpeg))))

    # Streamed: the same keys (the stored bytes, not re-encoded ones), images left undecoded until used.
    streamed = list(load_image_source(data_files=[str(path) for path in shards], caption_column="txt", streaming=True))
    assert [row["image_key"] for row in streamed] == source["image_key"]
    assert [row["captions"] for row in streamed] == source["captions"]
    assert streamed[0]["image"]["bytes"] == first_jpeg
    assert np.array_equal(np.asarray(decode_image(streamed[0]["image"])), np.asarray(source[0]["image"]))


def test_parquet_with_image_bytes_names_each_rows_file(tmp_path):
    images = random_images(3)
    features = datasets.Features({"jpg": datasets.Image(), "caption": datasets.Value("string")})
    parts = [[0, 1], [2]]
    for number, part in enumerate(parts):
        rows = {
            "jpg": [{"bytes": png_bytes(images[i]), "path": None} for i in part],
            "caption": [f"c{i}" for i in part],
        }
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / f"part{number}.parquet"))
    files = [str(tmp_path / "part0.parquet"), str(tmp_path / "part1.parquet")]
    source = load_image_source(data_files=files, image_column="jpg", caption_column="caption")
    assert source.column_names[0] == "image" and "jpg" not in source.column_names
    assert source["image_key"] == [sha256_key(png_bytes(image)) for image in images]
    assert source["captions"] == [["c0"], ["c1"], ["c2"]]
    assert source["__url__"] == [files[0], files[0], files[1]]

    # A bad row of the second file is named with that file and its row there; a stream of several files numbers its
    # rows in the order its readers take them, so it names the files and asks for a read without --streaming.
    rows = {"jpg": [{"bytes": png_bytes(images[0]), "path": None}] * 2, "caption": ["c3", None]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(files[1])
    with pytest.raises(ValueError, match=re.escape(f"{files[1]}, row 1 (from 0): the image ")):
        load_image_source(data_files=files, image_column="jpg", caption_column="caption")
    message = re.escape(f"A streamed row of {files[0]} (and 1 more files) (read it without --streaming to have the row")
    with pytest.raises(ValueError, match=message + r".*: the image sha256:\w+ has 'caption' = None"):
        list(load_image_source(data_files=files, image_column="jpg", caption_column="caption", streaming=True))


def test_a_dataset_saved_to_disk_and_a_hub_style_dataset_folder(tmp_path):
    images = random_images(2)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.List(datasets.Value("string"))})
    rows = {"image": [{"bytes": png_bytes(image), "path": None} for image in images], "text": [["a", "b"], ["c"]]}
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)})
    saved.save_to_disk(str(tmp_path / "saved"))
    source = load_image_source(data_files=str(tmp_path / "saved"), caption_column="text")
    assert source["captions"] == [["a", "b"], ["c"]]
    assert source["image_key"] == [sha256_key(png_bytes(image)) for image in images]
    with pytest.raises(ValueError, match=r"saved \(save_to_disk\) has no split 'test'; it has \['train'\]"):
        load_image_source(data_files=str(tmp_path / "saved"), split="test")

    # --dataset_name: datasets.load_dataset's own path, here on a local folder of parquet files (offline).
    (tmp_path / "hub" / "data").mkdir(parents=True)
    saved["train"].to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    from_name = load_image_source(dataset_name=str(tmp_path / "hub"), split="train", caption_column="text")
    assert from_name["image_key"] == source["image_key"] and from_name["captions"] == source["captions"]


def test_an_image_folder_through_the_datasets_builder(tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for name, image in zip(["a.png", "sub/b.png"], random_images(2)):
        image.save(folder / name)
    lines = [{"file_name": "a.png", "text": ["A dog.", "A cat."]}, {"file_name": "sub/b.png", "text": ["A car."]}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    source = load_image_source(data_files=str(folder), caption_column="text")
    assert source["image_key"] == [file_key(folder / "a.png"), file_key(folder / "sub/b.png")]
    assert source["captions"] == [["A dog.", "A cat."], ["A car."]]

    # A single caption after a list: pyarrow refuses the column; the file, the lines and the fix are named.
    lines.append({"file_name": "a.png", "text": "A bird."})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    message = (
        re.escape(f"{folder / 'metadata.jsonl'}: line 3 gives 'text' as a string, but line 1 gives it as a list; ")
        + r".*every caption as a list.*--dataset_format imagefolder"
    )
    for streaming in (False, True):
        with pytest.raises(ValueError, match=message):
            load_image_source(data_files=str(folder), caption_column="text", streaming=streaming)


def test_images_an_image_folders_metadata_leaves_out_are_warned_of(tmp_path, caplog):
    # datasets' imagefolder reader reads only the images its metadata lists: 1 row of 3 images, without a word.
    folder = tmp_path / "folder"
    for split in ("train", "test"):  # the test split's images are not the train split's to list
        (folder / split).mkdir(parents=True)
        for name, image in zip(["a.png", "b.png", "c.png"], random_images(3)):
            image.save(folder / split / name)
        (folder / split / "metadata.csv").write_text("file_name,text\nb.png,A dog.\n")
    with caplog.at_level("WARNING"):
        source = load_image_source(data_files=str(folder), caption_column="text")
    assert source["captions"] == [["A dog."]]
    assert (
        f"{folder}: 2 of its 3 images are not listed in its metadata file, and datasets' imagefolder reader leaves "
        f"them out (the first: {folder / 'train' / 'a.png'}); list them there to read them."
    ) in caplog.text
    caplog.clear()
    (folder / "train" / "metadata.csv").write_text("file_name,text\na.png,A\nb.png,B\nc.png,C\n")
    with caplog.at_level("WARNING"):
        assert len(load_image_source(data_files=str(folder), caption_column="text")) == 3
    assert "not listed" not in caplog.text


def test_an_image_folder_reached_through_a_link_is_not_said_to_leave_its_images_out(tmp_path, caplog):
    # datasets reads the images at their real paths: compared with the link's, every image was warned of as unlisted.
    real = tmp_path / "real"
    real.mkdir()
    for name, image in zip(["a.png", "b.png", "c.png"], random_images(3)):
        image.save(real / name)
    (real / "metadata.csv").write_text("file_name,text\na.png,A\nb.png,B\nc.png,C\n")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    with caplog.at_level("WARNING"):
        assert load_image_source(data_files=str(tmp_path / "link"), caption_column="text")["captions"] == [
            ["A"], ["B"], ["C"]
        ]
    assert "not listed" not in caplog.text
    (real / "metadata.csv").write_text("file_name,text\na.png,A\nc.png,C\n")  # one left out: still said
    with caplog.at_level("WARNING"):
        assert len(load_image_source(data_files=str(tmp_path / "link"), caption_column="text")) == 2
    assert f"{tmp_path / 'link'}: 1 of its 3 images are not listed in its metadata file" in caplog.text
    assert f"(the first: {real / 'b.png'})" in caplog.text

    # Image files that link to one stored file (a DVC or git-annex store) stay apart: the unlisted one is said.
    store = tmp_path / "store" / "x.png"
    store.parent.mkdir()
    random_images(1)[0].save(store)
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in ("a.png", "b.png"):
        (linked / name).symlink_to(store)
    (linked / "metadata.csv").write_text("file_name,text\na.png,A\n")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert len(load_image_source(data_files=str(linked), caption_column="text")) == 1
    assert f"{linked}: 1 of its 2 images are not listed in its metadata file" in caplog.text


def test_json_lines_of_relative_image_paths(tmp_path):
    (tmp_path / "img").mkdir()
    for name, image in zip(["x.png", "y.png"], random_images(2)):
        image.save(tmp_path / "img" / name)
    lines = [{"path": "img/x.png", "caption": "A dog."}, {"path": "img/y.png", "caption": "A cat."}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    source = load_image_source(data_files=str(tmp_path / "data.jsonl"), image_column="path", caption_column="caption")
    assert source["image_key"] == [file_key(tmp_path / "img/x.png"), file_key(tmp_path / "img/y.png")]
    assert source["captions"] == [["A dog."], ["A cat."]]
    assert np.array_equal(np.asarray(source[1]["image"]), np.asarray(PIL.Image.open(tmp_path / "img/y.png")))


def test_caption_formats_are_converted_to_one_row_per_image(caption_folder):
    source = load_image_source(data_files=str(caption_folder), dataset_format="imagefolder")
    assert source["captions"] == [[texts] if isinstance(texts, str) else texts for texts in CAPTIONED_IMAGES.values()]
    assert source["image_key"] == [file_key(caption_folder / name) for name in CAPTIONED_IMAGES]
    assert source["image_id"] == list(CAPTIONED_IMAGES)

    # One row per image id: two COCO ids listing one file are two rows (one key, so embedded once).
    random_images(1)[0].save(caption_folder / "x.png")
    data = {
        "images": [{"id": 1, "file_name": "x.png"}, {"id": 2, "file_name": "x.png"}],
        "annotations": [{"image_id": 1, "caption": "A dog."}, {"image_id": 2, "caption": "A cat."}],
    }
    (caption_folder / "c.json").write_text(json.dumps(data))
    coco_file = str(caption_folder / "c.json")
    coco = load_image_source(data_files=coco_file, dataset_format="coco", image_root=caption_folder)
    assert coco["image_id"] == [1, 2]
    assert coco["captions"] == [["A dog."], ["A cat."]]
    assert coco["image_key"] == [file_key(caption_folder / "x.png")] * 2


def test_a_missing_column_lists_the_columns_and_a_bad_caption_is_named(tmp_path, webdataset_shards):
    shards, _ = webdataset_shards
    columns = "its columns are: jpg, txt, __key__, __url__"
    with pytest.raises(ValueError, match=rf"00000.tar has no column 'caption'; {columns}"):
        load_image_source(data_files=str(shards[0]), caption_column="caption")
    with pytest.raises(ValueError, match=r"has no column 'png'; its columns are: jpg, txt, __key__, __url__"):
        load_image_source(data_files=str(shards[0]), image_column="png")
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "x.png", "caption": ""}) + "\n")
    empty_caption = r"data.jsonl, row 0 \(from 0\): the image .*x.png has 'caption' = ''; give each image a"
    with pytest.raises(ValueError, match=empty_caption):
        load_image_source(data_files=str(tmp_path / "data.jsonl"), caption_column="caption")
    with pytest.raises(ValueError, match=r"Cannot tell how to read .*notes.txt"):
        (tmp_path / "notes.txt").write_text("hello")
        load_image_source(data_files=str(tmp_path / "notes.txt"))


def test_a_replaced_image_file_gets_a_new_key(tmp_path):
    # The map that adds the keys is cached on the JSON file alone: the key must still follow the image file.
    random_images(1, size=(8, 8))[0].save(tmp_path / "x.png")
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "x.png", "caption": "A dog."}) + "\n")
    before = load_image_source(data_files=str(tmp_path / "data.jsonl"), caption_column="caption")["image_key"]
    assert before == [file_key(tmp_path / "x.png")]
    random_images(1, seed=1, size=(32, 24))[0].save(tmp_path / "x.png")
    after = load_image_source(data_files=str(tmp_path / "data.jsonl"), caption_column="caption")["image_key"]
    assert after == [file_key(tmp_path / "x.png")] and after != before


def _write_tar(path, members: dict[str, bytes]) -> None:
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


@pytest.mark.parametrize("streaming", [False, True])
def test_a_row_without_an_image_is_named_or_skipped_with_a_warning_naming_it(tmp_path, streaming, caplog):
    image = png_bytes(random_images(1)[0])
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    # The row without an image has no caption either: a row left out is not checked further.
    rows = {"image": [{"bytes": image, "path": None}, None, {"bytes": image, "path": None}]}
    rows["caption"] = ["A dog.", None, "A bird."]
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "data.parquet"))
    random_images(1)[0].save(tmp_path / "x.png")
    lines = [{"image": "x.png", "caption": "A dog."}, {"image": None, "caption": "A cat."}]
    lines.append({"image": "x.png", "caption": "A bird."})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    # A webdataset sample with a caption and no image file (after 6 whole ones: datasets infers the types from 5).
    members = {f"s{i}.{suffix}": data for i in range(6) for suffix, data in (("png", image), ("txt", b"A dog."))}
    _write_tar(tmp_path / "00000.tar", {**members, "s6.txt": b"A cat.", "s7.png": image, "s7.txt": b"A bird."})
    sources = [
        ("data.parquet", "caption", r"data.parquet, row 1 \(from 0\)", ["A dog.", "A bird."]),
        ("data.jsonl", "caption", r"data.jsonl, row 1 \(from 0\)", ["A dog.", "A bird."]),
        ("00000.tar", "txt", r"00000.tar, sample 's6'", ["A dog."] * 6 + ["A bird."]),
    ]
    no_image = r" has no image \(it is null or missing\); drop that row or give it an image.*, skip such rows"
    for name, column, location, captions in sources:
        path = str(tmp_path / name)
        with pytest.raises(ValueError, match=location + no_image):
            list(load_image_source(data_files=path, caption_column=column, streaming=streaming))
        caplog.clear()
        with caplog.at_level("WARNING"):
            kept = load_image_source(data_files=path, caption_column=column, streaming=streaming, on_bad_image="skip")
            kept = list(kept)
        assert [row["captions"] for row in kept] == [[caption] for caption in captions]
        assert all(row["image_key"] == kept[0]["image_key"] for row in kept)  # the one image, each time
        warnings = "\n".join(record.getMessage() for record in caplog.records if record.levelname == "WARNING")
        assert re.search(location, warnings) and "skip" in warnings, warnings
    # A sample whose image has another extension (a .jpg among .png) arrives without one: its shards need one format.
    with pytest.raises(ValueError, match=r"'s6' has no image .* give it an image \(all of the shards' images in one"):
        list(load_image_source(data_files=str(tmp_path / "00000.tar"), caption_column="txt", streaming=streaming))
    with pytest.raises(ValueError, match=r"on_bad_image .* must be 'error' or 'skip', got 'drop'"):
        load_image_source(data_files=str(tmp_path / "data.parquet"), on_bad_image="drop")


@pytest.mark.parametrize("null_rows", [[0], [2], [0, 1]], ids=["first", "last", "first two"])
def test_rows_without_an_image_at_the_start_or_end_are_skipped(tmp_path, null_rows):
    # The rows kept are then one run, which `datasets` selects as a slice (it failed on unsigned row numbers).
    image = png_bytes(random_images(1)[0])
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    captions = ["A dog.", "A cat.", "A bird."]
    images = [None if row in null_rows else {"bytes": image, "path": None} for row in range(3)]
    datasets.Dataset.from_dict({"image": images, "caption": captions}, features=features).to_parquet(
        str(tmp_path / "data.parquet")
    )
    kept = load_image_source(data_files=str(tmp_path / "data.parquet"), caption_column="caption", on_bad_image="skip")
    assert [row["captions"] for row in kept] == [[captions[row]] for row in range(3) if row not in null_rows]


@pytest.mark.parametrize(
    "files, message",
    [
        ({"empty.jsonl": ""}, r"empty.jsonl cannot be read as json data \(it holds no rows\); fix or remove it"),
        ({"a.jsonl": '{"image": "x.png", "caption": "A dog."}\n', "bad.jsonl": '{"image": "x.png", "cap\n'},
         r"bad.jsonl cannot be read as json data \(line 1: ArrowInvalid: JSON parse error.*\); fix or remove it"),
        ({"header.csv": "image,caption\n"}, r"header.csv cannot be read as csv data \(it holds no rows\)"),
        ({"a.jsonl": '{"image": "x.png", "caption": "A dog."}\n', "b.jsonl": '{"image": "x.png", "caption": "A '
          'cat.", "extra": 1}\n'},
         r"b.jsonl and .*a.jsonl give their columns differently \(image: .*, extra: Value\('int64'\) against image: "
         r".*\); write every file with the same columns and types"),
        ({"00000.tar": "not a tar file" * 50},
         r"00000.tar cannot be read as webdataset data \(a damaged or incomplete tar file: ReadError: "),
    ],
)
def test_a_data_file_that_does_not_read_is_named_with_the_reason(tmp_path, files, message):
    # datasets' errors named no file: "An error occurred while generating the dataset", a bare StopIteration.
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        load_image_source(data_files=[str(tmp_path / name) for name in files], caption_column="caption")


@pytest.mark.parametrize("streaming", [False, True])
def test_a_malformed_json_line_deep_in_a_file_is_named_by_its_line_in_the_file(tmp_path, streaming):
    # pyarrow reads JSON Lines in blocks of a few thousand lines here, and its error's "in row N" counted from the
    # block's start: line 5001 was "row 65".
    lines = [json.dumps({"image": f"{number}.png", "caption": "A caption of a hundred characters or so. " * 2})
             for number in range(8000)]  # fmt: skip
    lines[5000] = '{"image": "5000.png", "caption": "cut short'
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    assert (tmp_path / "big.jsonl").stat().st_size > 3 * 256 * 1024  # several of pyarrow's blocks
    with pytest.raises(ValueError) as raised:
        source = load_image_source(data_files=str(tmp_path / "big.jsonl"), streaming=streaming)
        list(read_stream(iter(source), source))
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / 'big.jsonl'} cannot be read as json data (line 5001: ArrowInvalid: JSON ")
    assert message.endswith("); fix or remove it.") and "in row" not in message


@pytest.mark.parametrize("streaming", [False, True])
def test_an_image_folders_malformed_metadata_line_is_named_with_its_file_and_the_fix(caption_folder, streaming):
    lines = (caption_folder / "metadata.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]  # cut short: pyarrow's bare ArrowInvalid, naming a row of its block and no file
    (caption_folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    path = caption_folder / "metadata.jsonl"
    message = re.escape(f"{path} cannot be read as the image folder's metadata (line 3: ArrowInvalid: JSON parse ") + (
        r"error[^)]*\); fix that line: each line is one JSON object, such as \{\"file_name\""
    )
    with pytest.raises(ValueError, match=message):
        source = load_image_source(data_files=str(caption_folder), streaming=streaming)
        list(read_stream(iter(source), source))


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    random_images(1, seed=seed)[0].save(buffer, "PNG")
    return buffer.getvalue()


def test_a_damaged_parquet_file_or_a_tar_file_cut_short_is_named(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    for number in range(2):
        rows = {"image": [{"bytes": _png(3 * number + row), "path": None} for row in range(3)], "caption": ["a"] * 3}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / f"{number}.parquet"))
    data = (tmp_path / "1.parquet").read_bytes()
    (tmp_path / "1.parquet").write_bytes(data[: len(data) // 2] + data[-200:])  # its middle lost: pyarrow's OSError
    files = [str(tmp_path / "0.parquet"), str(tmp_path / "1.parquet")]
    with pytest.raises(ValueError, match=re.escape(f"{files[1]} cannot be read as parquet data (OSError: ")):
        load_image_source(data_files=files, caption_column="caption")

    shards, _ = write_webdataset_shards(tmp_path / "shards", [["a", "b", "c"], ["d", "e"]])
    shards[1].write_bytes(shards[1].read_bytes()[: 512 * 3 + 100])  # a partial copy
    message = re.escape(f"{shards[1]} cannot be read as webdataset data (a damaged or incomplete tar file: ReadError")
    for streaming in (False, True):  # streamed, the shards are checked before any is read
        with pytest.raises(ValueError, match=message + r".*copy it again"):
            load_image_source(data_files=[str(path) for path in shards], caption_column="txt", streaming=streaming)


def test_a_streamed_image_folder_has_an_input_shard_per_group_of_files_or_metadata_file(tmp_path, monkeypatch):
    import clipcap_hf.data.sources as sources

    monkeypatch.setattr(sources, "IMAGE_FOLDER_SHARD_SIZE", 2, raising=False)  # (raising: absent before the fix)
    folder = tmp_path / "images"
    folder.mkdir()
    for number, image in enumerate(random_images(5, size=(8, 8))):
        image.save(folder / f"{number}.png")
    whole = load_image_source(data_files=str(folder))["image_key"]
    streamed = load_image_source(data_files=str(folder), streaming=True)
    assert streamed.num_shards == 3  # 2 + 2 + 1 files
    shards = [list(streamed.shard(num_shards=3, index=index)) for index in range(3)]
    assert [len(rows) for rows in shards] == [2, 2, 1]
    assert [row["image_key"] for rows in shards for row in rows] == [row["image_key"] for row in streamed] == whole

    # With metadata (whose rows it gives), one shard per metadata file, in path order.
    folder = tmp_path / "captioned"
    for part in ("b", "a"):
        (folder / part).mkdir(parents=True)
        for number, image in enumerate(random_images(2, size=(8, 8))):
            image.save(folder / part / f"{number}.png")
        lines = [json.dumps({"file_name": f"{number}.png", "text": f"{part}{number}"}) for number in range(2)]
        (folder / part / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    streamed = load_image_source(data_files=str(folder), caption_column="text", streaming=True)
    assert streamed.num_shards == 2
    shards = [[row["captions"] for row in streamed.shard(num_shards=2, index=index)] for index in range(2)]
    assert shards == [[["a0"], ["a1"]], [["b0"], ["b1"]]]


def test_image_urls_are_refused_and_a_data_file_named_twice_is_read_once(tmp_path, caplog):
    from clipcap_hf.data.prepare import load_source
    from clipcap_hf.training.arguments import DataArguments

    (tmp_path / "urls.jsonl").write_text(json.dumps({"image": "https://example.com/cat.jpg", "caption": "A cat."}))
    # It was joined to the file's folder and reported as a missing file at embedding time.
    message = r"urls.jsonl: the image column 'image' holds an image URL \(https://example.com/cat.jpg\); download"
    with pytest.raises(ValueError, match=message):
        load_image_source(data_files=str(tmp_path / "urls.jsonl"), caption_column="caption")

    random_images(1)[0].save(tmp_path / "x.png")
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"image": "x.png", "caption": f"caption {name}"}) + "\n")
    files = f"{tmp_path}/[ab].jsonl,{tmp_path}/a.jsonl"  # a.jsonl matched twice
    with caplog.at_level("WARNING"):
        source = load_source(DataArguments(train_file=files, caption_column="caption"))
    assert source["captions"] == [["caption a"], ["caption b"]]
    assert "names 1 data file(s) more than once; each is read once" in caplog.text


def test_parquet_written_without_datasets_and_a_column_that_is_not_images(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = png_bytes(random_images(1)[0])
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = {"image": pa.array([{"bytes": image, "path": None}], type=struct), "jpg": [image], "size": [7]}
    pq.write_table(pa.table({**table, "caption": ["A dog."]}), str(tmp_path / "plain.parquet"))
    for column in ("image", "jpg"):  # a {bytes, path} struct, raw bytes
        source = load_image_source(data_files=str(tmp_path / "plain.parquet"), image_column=column)
        assert source["image_key"] == [sha256_key(image)]
        assert np.array_equal(np.asarray(source[0]["image"]), np.asarray(random_images(1)[0]))
    with pytest.raises(ValueError, match=r"plain.parquet: the image column 'size' holds Value\('int64'\), not images;"):
        load_image_source(data_files=str(tmp_path / "plain.parquet"), image_column="size")


@pytest.mark.parametrize("write", ["new_stream", "new_file"])
def test_each_row_of_several_arrow_files_is_numbered_in_its_own_file(tmp_path, write):
    # datasets keeps no file per row: an Arrow file's row count is read from its record batches (of either IPC
    # format datasets reads), as a parquet file's from its footer, so a bad row is named by its file and row there.
    import pyarrow

    images = random_images(2)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    files = [str(tmp_path / "part0.arrow"), str(tmp_path / "part1.arrow")]
    for path, captions in zip(files, [["c0", "c1"], ["c2", "c3", None]]):
        rows = {"image": [{"bytes": png_bytes(images[0]), "path": None}] * len(captions), "caption": captions}
        table = datasets.Dataset.from_dict(rows, features=features).data.table
        with pyarrow.OSFile(path, "wb") as sink, getattr(pyarrow.ipc, write)(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=2)  # several record batches
    with pytest.raises(ValueError, match=re.escape(f"{files[1]}, row 2 (from 0): the image sha256:")):
        load_image_source(data_files=files, caption_column="caption")
    source = load_image_source(data_files=files)  # without captions
    assert source["__url__"] == [files[0]] * 2 + [files[1]] * 3
    assert source["__row__"] == [0, 1, 0, 1, 2]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_bad_row_of_several_json_or_csv_files_is_named_by_its_file_and_row_there(tmp_path, suffix):
    random_images(1)[0].save(tmp_path / "x.png")
    parts = [[("x.png", "A dog."), ("x.png", "A cat.")], [("x.png", "A bird."), ("x.png", ""), ("x.png", "A cow.")]]
    files = [str(tmp_path / f"part{number}{suffix}") for number in range(len(parts))]
    for path, rows in zip(files, parts):
        if suffix == ".jsonl":
            text = "".join(json.dumps({"image": image, "caption": caption}) + "\n" for image, caption in rows)
        else:
            text = "image,caption\n" + "".join(f'{image},"{caption}"\n' for image, caption in rows)
        (tmp_path / path).write_text(text)
    # Row 3 of the two files together is row 1 of the second file.
    message = re.escape(f"{files[1]}, row 1 (from 0): the image ") + r".*x\.png\|.* has 'caption' = (''|None)"
    with pytest.raises(ValueError, match=message):
        load_image_source(data_files=files, caption_column="caption")


def test_relative_paths_of_json_files_in_several_folders_need_an_image_root(tmp_path):
    for sub, image in zip(["one", "two"], random_images(2)):
        (tmp_path / sub).mkdir()
        image.save(tmp_path / sub / f"{sub}.png")
        (tmp_path / sub / "data.jsonl").write_text(json.dumps({"image": f"{sub}/{sub}.png", "caption": sub}) + "\n")
    files = [str(tmp_path / "one" / "data.jsonl"), str(tmp_path / "two" / "data.jsonl")]
    folders = re.escape(f"several folders ({tmp_path / 'one'}, {tmp_path / 'two'}); give --image_root")
    with pytest.raises(ValueError, match=r"the image path 'one/one.png' is relative, .* are in " + folders):
        load_image_source(data_files=files, caption_column="caption")
    source = load_image_source(data_files=files, caption_column="caption", image_root=str(tmp_path))
    assert source["image_key"] == [file_key(tmp_path / "one/one.png"), file_key(tmp_path / "two/two.png")]


def test_a_saved_dataset_dict_as_validation_file_reads_its_validation_split(tmp_path):
    from clipcap_hf.data.prepare import load_source
    from clipcap_hf.training.arguments import DataArguments

    images = random_images(3)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    rows = {"image": [{"bytes": png_bytes(image), "path": None} for image in images], "caption": ["a", "b", "c"]}
    splits = {"train": [0, 1], "validation": [2]}
    saved = datasets.DatasetDict(
        {name: datasets.Dataset.from_dict(rows, features=features).select(part) for name, part in splits.items()}
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    data_args = DataArguments(train_file=str(tmp_path / "saved"), validation_file=str(tmp_path / "saved"))
    assert load_source(data_args, "train")["captions"] == [["a"], ["b"]]
    assert load_source(data_args, "validation")["captions"] == [["c"]]  # no --validation_split: "validation"


@pytest.mark.parametrize("streaming", [False, True])
def test_a_source_that_already_has_keys_and_captions_has_them_computed_again(tmp_path, streaming):
    images = random_images(2)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    rows = {"image": [{"bytes": png_bytes(image), "path": None} for image in images], "caption": ["a", "b"]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    # An output of load_image_source saved with stale keys and captions, read again with captions from `caption`.
    load_image_source(data_files=str(tmp_path / "saved"), caption_column="caption").map(
        lambda row: {"caption": row["captions"][0], "captions": ["stale"], "image_key": "stale", "__row__": 7}
    ).save_to_disk(str(tmp_path / "resaved"))
    source = load_image_source(data_files=str(tmp_path / "resaved"), caption_column="caption", streaming=streaming)
    # Map-style rows are numbered for errors (`__row__`), again in their place; a stream's are not.
    assert sorted(source.features) == sorted(["captions", "image", "image_key"] + ["__row__"] * (not streaming))
    rows = list(source)
    assert [row["captions"] for row in rows] == [["a"], ["b"]]
    assert [row.get("__row__") for row in rows] == ([None, None] if streaming else [0, 1])
    assert [row["image_key"] for row in rows] == [sha256_key(png_bytes(image)) for image in images]


def test_a_saved_parquet_source_keeps_each_rows_number_in_its_file(tmp_path):
    # Saved with its files' names (`__url__`), a source's row numbers cannot be computed again from the saved copy:
    # they were dropped as stale, and its bad rows then named only by their file.
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    rows = {"image": [{"bytes": png_bytes(image), "path": None} for image in random_images(3)], "caption": list("abc")}
    files = [str(tmp_path / f"part{number}.parquet") for number in range(2)]
    for file in files:
        datasets.Dataset.from_dict(rows, features=features).to_parquet(file)
    source = load_image_source(data_files=files, caption_column="caption")
    assert source["__row__"] == [0, 1, 2, 0, 1, 2] and source["__url__"] == [files[0]] * 3 + [files[1]] * 3
    source.save_to_disk(str(tmp_path / "saved"))
    again = load_image_source(data_files=str(tmp_path / "saved"), caption_column="captions")
    assert again["__row__"] == [0, 1, 2, 0, 1, 2] and again["__url__"] == source["__url__"]


@pytest.mark.parametrize("suffix", ["tar", "parquet"])
def test_a_folder_of_shards_is_read_as_its_shards(tmp_path, webdataset_shards, suffix):
    from clipcap_hf.data.prepare import load_source
    from clipcap_hf.training.arguments import DataArguments

    if suffix == "tar":
        folder = webdataset_shards[0][0].parent
        expected = [["A dog runs."], ["Two cats sleep!"], ["A red circle."], ["A man rides."], ["People walk."]]
    else:
        folder = tmp_path / "parquet"
        folder.mkdir()
        features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
        for number, caption in enumerate(["A dog.", "A cat."]):
            rows = {"image": [{"bytes": png_bytes(random_images(1, seed=number)[0]), "path": None}]}
            datasets.Dataset.from_dict({**rows, "caption": [caption]}, features=features).to_parquet(
                str(folder / f"part{number}.parquet")
            )
        expected = [["A dog."], ["A cat."]]
    # The default caption column of each kind (`txt` in webdataset shards) is found without --caption_column.
    source = load_source(DataArguments(train_file=str(folder)), "train")
    assert sorted(source["captions"]) == sorted(expected)
    shards = sorted(str(path) for path in folder.glob(f"*.{suffix}"))
    assert sorted(set(source["__url__"])) == shards


def write_split_shards(folder, captions_by_split: dict[str, list[str]]) -> None:
    """One parquet shard per split in the Hub's layout (`<split>-00000-of-00001.parquet`), one image per caption."""
    folder.mkdir()
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    for seed, (split, captions) in enumerate(captions_by_split.items()):
        rows = {"image": [{"bytes": png_bytes(image), "path": None} for image in random_images(len(captions), seed)]}
        datasets.Dataset.from_dict({**rows, "caption": captions}, features=features).to_parquet(
            str(folder / f"{split}-00000-of-00001.parquet")
        )


def test_a_folder_of_split_shards_reads_the_asked_split_only(tmp_path):
    from clipcap_hf.data.prepare import load_source
    from clipcap_hf.training.arguments import DataArguments

    write_split_shards(tmp_path / "data", {"train": ["A dog.", "A cat."], "test": ["A bird."]})
    folder = str(tmp_path / "data")
    data_args = DataArguments(train_file=folder, validation_file=folder, validation_split="test")
    train = load_source(data_args, "train")
    assert sorted(train["captions"]) == [["A cat."], ["A dog."]]
    assert set(train["__url__"]) == {str(tmp_path / "data" / "train-00000-of-00001.parquet")}
    assert load_source(data_args, "validation")["captions"] == [["A bird."]]


def test_a_folder_of_split_shards_without_the_asked_split_is_refused(tmp_path):
    from clipcap_hf.data.prepare import load_source
    from clipcap_hf.training.arguments import DataArguments

    write_split_shards(tmp_path / "data", {"train": ["A dog.", "A cat."], "test": ["A bird."]})
    folder = str(tmp_path / "data")
    # No --validation_split: the validation source asks for `validation`, which no shard is named for.
    with pytest.raises(ValueError, match="--validation_file") as error:
        load_source(DataArguments(train_file=folder, validation_file=folder), "validation")
    message = str(error.value)
    assert folder in message and "'validation'" in message
    assert "train-00000-of-00001.parquet" in message and "test-00000-of-00001.parquet" in message


def test_a_source_with_several_default_caption_columns_warns_naming_the_one_read(caption_folder, caplog):
    from clipcap_hf.data.prepare import load_source
    from clipcap_hf.training.arguments import DataArguments

    row = {"text": "From text.", "caption": "From caption."}
    lines = [json.dumps({"file_name": name, **row}) for name in CAPTIONED_IMAGES]
    (caption_folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING"):
        source, column = load_source(DataArguments(train_file=str(caption_folder)), "train", return_caption_column=True)
    assert column == "caption" and {caption for captions in source["captions"] for caption in captions} == {
        "From caption."
    }
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warnings == [
        f"{caption_folder} has several caption columns (caption, text): reading the captions from 'caption', the "
        "first of caption, txt, text; name another with --caption_column."
    ]
    # Named, the column is read without a warning.
    caplog.clear()
    with caplog.at_level("WARNING"):
        source = load_source(DataArguments(train_file=str(caption_folder), caption_column="text"), "train")
    assert {caption for captions in source["captions"] for caption in captions} == {"From text."}
    assert not [record for record in caplog.records if record.levelname == "WARNING"]


def test_an_image_folder_of_split_folders_reads_the_asked_split(tmp_path):
    from clipcap_hf.data.prepare import load_source
    from clipcap_hf.training.arguments import DataArguments

    folder = tmp_path / "folder"
    captions = {"train": ["A dog.", "A cat.", "A car."], "validation": ["A bird.", "A boat."]}
    for seed, (split, texts) in enumerate(captions.items()):
        (folder / split).mkdir(parents=True)
        for number, image in enumerate(random_images(len(texts), seed)):
            image.save(folder / split / f"{number}.png")
        lines = [json.dumps({"file_name": f"{number}.png", "text": text}) for number, text in enumerate(texts)]
        (folder / split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    # The same folder as --train_file and --validation_file: each option reads its own split.
    data_args = DataArguments(train_file=str(folder), validation_file=str(folder))
    train, validation = load_source(data_args, "train"), load_source(data_args, "validation")
    assert train["captions"] == [["A dog."], ["A cat."], ["A car."]]
    assert validation["captions"] == [["A bird."], ["A boat."]]
    assert validation["image_key"] == [file_key(folder / "validation" / f"{number}.png") for number in range(2)]
    streamed = load_image_source(data_files=str(folder), split="validation", caption_column="text", streaming=True)
    assert [row["captions"] for row in streamed] == [["A bird."], ["A boat."]]
    with pytest.raises(ValueError) as error:
        load_image_source(data_files=str(folder), split="test", caption_column="text")
    assert str(error.value).startswith(
        f"{folder} (an image folder) has no split 'test'; it has the splits train, validation: ask for one of those"
    )
    # A folder of validation/ only is read as its validation split; a folder without split folders whole, whatever
    # split is asked for (as a folder of shards without split names).
    (folder / "train" / "metadata.jsonl").unlink()
    for number in range(3):
        (folder / "train" / f"{number}.png").unlink()
    (folder / "train").rmdir()
    assert load_source(data_args, "validation")["captions"] == [["A bird."], ["A boat."]]
    flat = folder / "validation"
    assert load_image_source(data_files=str(flat), split="validation", caption_column="text")["captions"] == [
        ["A bird."],
        ["A boat."],
    ]


def test_listed_shards_of_several_splits_are_read_as_the_asked_split(tmp_path):
    from clipcap_hf.data.prepare import load_source
    from clipcap_hf.training.arguments import DataArguments

    write_split_shards(tmp_path / "data", {"train": ["A dog.", "A cat.", "A car."], "validation": ["A bird."]})
    shards = sorted(str(path) for path in (tmp_path / "data").glob("*.parquet"))  # as a shell expands data/*.parquet
    with mock.patch("clipcap_hf.data.sources.logger.warning") as warning:  # the files left out are named
        validation = load_image_source(data_files=shards, split="validation", caption_column="caption")
    assert validation["captions"] == [["A bird."]]
    warning.assert_called_once_with(
        "Reading the 1 listed file(s) of split 'validation'; 1 of other splits are left out "
        "(train-00000-of-00001.parquet). Ask for their split to read those."
    )
    assert validation["__url__"] == [str(tmp_path / "data" / "validation-00000-of-00001.parquet")]
    # train_split/validation_split reach the listed files as they reach a folder of them.
    data_args = DataArguments(train_file=str(tmp_path / "data" / "*.parquet"), validation_file=",".join(shards))
    assert sorted(load_source(data_args, "train")["captions"]) == [["A car."], ["A cat."], ["A dog."]]
    assert load_source(data_args, "validation")["captions"] == [["A bird."]]
    with pytest.raises(ValueError) as error:
        load_image_source(data_files=shards, split="test", caption_column="caption")
    assert str(error.value).startswith(
        f"{shards[0]} (and 1 more files): the files are shards of the splits train, validation (train-00000-of-00001."
        "parquet, validation-00000-of-00001.parquet), none of split 'test': ask for one of those splits"
    )
    # Files of one split are that split, whatever the option reading them asks for.
    only_train = load_image_source(data_files=shards[:1], split="validation", caption_column="caption")
    assert sorted(only_train["captions"]) == [["A car."], ["A cat."], ["A dog."]]


def test_listed_shards_whose_names_carry_no_split_are_read_as_listed_without_scanning_their_folder(tmp_path):
    # img2dataset's folders hold three files a shard: scanning them for split names at every load cost seconds.
    write_split_shards(tmp_path / "data", {"train": ["A dog.", "A cat."]})
    first = (tmp_path / "data" / "train-00000-of-00001.parquet").rename(tmp_path / "data" / "00000.parquet")
    shards = [str(first), shutil.copyfile(first, tmp_path / "data" / "00001.parquet")]
    with mock.patch("clipcap_hf.data.sources.get_data_patterns", side_effect=AssertionError("scanned")):
        source = load_image_source(data_files=shards, split="validation", caption_column="caption")
    assert sorted(source["captions"]) == [["A cat."], ["A cat."], ["A dog."], ["A dog."]]


def test_relative_paths_of_parquet_image_structs_are_relative_to_the_files_folder(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    meant, other = random_images(2)
    (tmp_path / "data").mkdir()
    meant.save(tmp_path / "data" / "a.png")
    other.save(tmp_path / "a.png")  # a file of the same name in the working folder is not the image meant
    monkeypatch.chdir(tmp_path)
    image = png_bytes(other)
    rows = [{"bytes": None, "path": "a.png"}, {"bytes": image, "path": "b.png"}]
    pq.write_table(pa.table({"image": rows, "caption": ["A dog.", "A cat."]}), str(tmp_path / "data" / "x.parquet"))
    for streaming in (False, True):
        source = list(load_image_source(data_files=str(tmp_path / "data" / "x.parquet"), streaming=streaming))
        assert [row["image_key"] for row in source] == [file_key(tmp_path / "data" / "a.png"), sha256_key(image)]
        decoded = [decode_image(row["image"]) if streaming else row["image"] for row in source]
        assert np.array_equal(np.asarray(decoded[0]), np.asarray(meant))
        assert np.array_equal(np.asarray(decoded[1]), np.asarray(other))
    # An Image column that datasets wrote with relative paths: relative to --image_root.
    features = datasets.Features({"image": datasets.Image()})
    rows = {"image": [{"bytes": None, "path": "a.png"}]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "hf.parquet"))
    source = load_image_source(data_files=str(tmp_path / "hf.parquet"), image_root=str(tmp_path / "data"))
    assert source["image_key"] == [file_key(tmp_path / "data" / "a.png")]
    assert np.array_equal(np.asarray(source[0]["image"]), np.asarray(meant))


@pytest.mark.parametrize("streaming", [False, True])  # streamed, checked before the first row is read
def test_data_files_that_are_not_utf8_are_named(tmp_path, streaming):
    random_images(1)[0].save(tmp_path / "a.png")
    (tmp_path / "good.jsonl").write_text('{"image": "a.png", "caption": "A caf\xe9."}\n', encoding="utf-8")
    bad_lines = '{"image": "a.png", "caption": "A dog."}\n{"image": "a.png", "caption": "Un caf\xe9."}\n'
    (tmp_path / "data.jsonl").write_bytes(bad_lines.encode("cp1252"))
    files = [str(tmp_path / "good.jsonl"), str(tmp_path / "data.jsonl")]
    with pytest.raises(ValueError) as error:
        list(load_image_source(data_files=files, caption_column="caption", streaming=streaming))
    assert str(error.value) == (
        f"{tmp_path / 'data.jsonl'} is not valid UTF-8 (invalid continuation byte); the file must be UTF-8 encoded "
        "(the first bad byte is on line 2)."
    )
    (tmp_path / "good.csv").write_text("image,caption\na.png,A caf\xe9.\n", encoding="utf-8")
    (tmp_path / "data.csv").write_bytes("image,caption\na.png,A dog.\na.png,Un caf\xe9.\n".encode("cp1252"))
    with pytest.raises(ValueError) as error:  # pandas' bare UnicodeDecodeError named no line
        list(load_image_source(data_files=[str(tmp_path / "good.csv"), str(tmp_path / "data.csv")],
                               caption_column="caption", streaming=streaming))
    assert str(error.value) == (
        f"{tmp_path / 'data.csv'} is not valid UTF-8 (invalid continuation byte); the file must be UTF-8 encoded "
        "(the first bad byte is on line 3)."
    )
    for name, text in (
        ("metadata.csv", "file_name,text\na.png,Un caf\xe9.\n"),
        ("metadata.jsonl", '{"file_name": "a.png", "text": "Un caf\xe9."}\n'),
    ):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        random_images(1)[0].save(folder / "a.png")
        (folder / name).write_bytes(text.encode("cp1252"))
        with pytest.raises(ValueError) as error:
            list(load_image_source(data_files=str(folder), caption_column="text", streaming=streaming))
        line = 2 if name == "metadata.csv" else 1
        assert str(error.value) == (
            f"{folder / name} is not valid UTF-8 (invalid continuation byte); the file must be UTF-8 encoded (the "
            f"first bad byte is on line {line})."
        )


@pytest.mark.parametrize("streaming", [False, True])  # streamed, checked before the first sample is read
def test_a_webdataset_member_that_does_not_decode_is_named(tmp_path, streaming):
    image = png_bytes(random_images(1)[0])
    _write_tar(tmp_path / "00000.tar", {"s0.png": image, "s0.txt": b"A dog.", "s1.png": image, "s1.txt": b"A cat."})
    bad_members = {
        "s3.txt": ("Un caf\xe9.".encode("cp1252"), "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9"),
        "s3.json": (b'{"caption": ', "JSONDecodeError: Expecting value"),
        "s3.cls": (b"seven", "ValueError: invalid literal for int"),
    }
    for name, (data, reason) in bad_members.items():
        _write_tar(tmp_path / "00001.tar", {"s2.png": image, "s2.txt": b"A bird.", "s3.png": image, name: data})
        files = [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
        with pytest.raises(ValueError) as error:
            list(load_image_source(data_files=files, caption_column="txt", streaming=streaming))
        message = str(error.value)
        assert message.startswith(f"{tmp_path / '00001.tar'} cannot be read as webdataset data (its member {name}: ")
        assert reason in message and message.endswith("); fix or remove it."), message


def test_a_caption_format_given_several_files_is_refused(tmp_path):
    from clipcap_hf.data.prepare import load_source
    from clipcap_hf.training.arguments import DataArguments

    for name, ids in (("a", [1, 2]), ("b", [3])):
        images = [{"id": i, "file_name": f"{i}.png"} for i in ids]
        annotations = [{"image_id": i, "caption": f"Caption {i}."} for i in ids]
        (tmp_path / f"{name}.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    files = f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}"
    with pytest.raises(ValueError) as error:
        load_source(DataArguments(train_file=files, dataset_format="coco", image_root=str(tmp_path)), "train")
    assert str(error.value) == (
        f"--train_file: The 'coco' format reads one file, not 2 ({tmp_path / 'a.json'}, {tmp_path / 'b.json'}): give "
        "one (merge their images and captions into one file first)."
    )
