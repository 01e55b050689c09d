"""Caption dataset loaders, embedding caption datasets into embeddings folders, and the data collator."""

import io
import json
import os
import re
from unittest import mock

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import IMAGE_SIZE, build_tokenizer, count_vision_images, random_images, tiny_model, tiny_processor

from clipcap_hf import ClipCapImageProcessor, ClipCapProcessor
from clipcap_hf.data import (
    ClipCapDataCollator,
    ImageEmbeddingCache,
    add_caption_lengths,
    check_images,
    embed_images,
    embedding_cache_folder,
    group_by_image,
    image_cache_key,
    load_caption_dataset,
    load_coco_captions,
    load_coco_karpathy,
    load_conceptual_captions,
    load_embeddings,
    load_embeddings_info,
    load_image_folder,
    load_nocaps,
)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def write_images(folder, names, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, random_images(len(names), seed=seed)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(folder / name)


@pytest.fixture
def image_folder(caption_folder):
    return caption_folder


# ---------------------------------------------------------------- loaders


def test_karpathy_split_one_row_per_caption_restval_is_training(tmp_path):
    data = {
        "images": [
            {
                "filepath": "train2014",
                "filename": "t1.jpg",
                "split": "train",
                "cocoid": 1,
                "sentences": [{"raw": "A cat."}, {"raw": " A dog. "}],
            },
            {
                "filepath": "val2014",
                "filename": "r1.jpg",
                "split": "restval",
                "cocoid": 2,
                "sentences": [{"raw": "A car."}],
            },
            {
                "filepath": "val2014",
                "filename": "v1.jpg",
                "split": "val",
                "cocoid": 3,
                "sentences": [{"raw": "A bus."}],
            },
            {
                "filepath": "val2014",
                "filename": "e1.jpg",
                "split": "test",
                "cocoid": 4,
                "sentences": [{"raw": "A boat."}, {"raw": "A ship."}],
            },
        ]
    }
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    splits = load_coco_karpathy(tmp_path / "dataset_coco.json", tmp_path / "coco")
    assert sorted(splits) == ["test", "train", "validation"]
    assert splits["train"]["caption"] == ["A cat.", "A dog.", "A car."]
    assert splits["train"]["image_id"] == [1, 1, 2]
    assert splits["train"]["image_path"] == [
        str(tmp_path / "coco/train2014/t1.jpg"),
        str(tmp_path / "coco/train2014/t1.jpg"),
        str(tmp_path / "coco/val2014/r1.jpg"),
    ]
    assert splits["validation"]["caption"] == ["A bus."]
    assert splits["test"]["image_id"] == [4, 4]


def test_coco_captions_and_nocaps(tmp_path):
    data = {
        "images": [
            {"id": 7, "file_name": "x.jpg", "domain": "out-domain"},
            {"id": 9, "file_name": "y.jpg", "domain": "in-domain"},
        ],
        "annotations": [
            {"image_id": 9, "caption": "A tree."},
            {"image_id": 7, "caption": "A lamp."},
            {"image_id": 9, "caption": "A big tree."},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(data))
    coco = load_coco_captions(tmp_path / "captions.json", tmp_path)
    assert coco["image_id"] == [9, 7, 9]
    assert coco["image_path"] == [str(tmp_path / "y.jpg"), str(tmp_path / "x.jpg"), str(tmp_path / "y.jpg")]
    assert "domain" not in coco.column_names
    nocaps = load_nocaps(tmp_path / "captions.json", tmp_path)
    assert nocaps["domain"] == ["in-domain", "out-domain", "in-domain"]

    data["annotations"].append({"image_id": 5, "caption": "A ghost."})
    (tmp_path / "captions.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotations\[3\] refers to image_id 5, which is not listed"):
        load_coco_captions(tmp_path / "captions.json", tmp_path)


def test_conceptual_captions_tsv(tmp_path):
    (tmp_path / "train.tsv").write_text('caption\timage\na "quoted" sky\t0001.jpg\na road\tdir/0002.jpg\n')
    dataset = load_conceptual_captions(tmp_path / "train.tsv", tmp_path / "cc")
    assert dataset["caption"] == ['a "quoted" sky', "a road"]
    assert dataset["image_path"] == [str(tmp_path / "cc/0001.jpg"), str(tmp_path / "cc/dir/0002.jpg")]
    assert dataset["image_id"] == ["0001.jpg", "dir/0002.jpg"]

    (tmp_path / "urls.tsv").write_text("a sky\thttps://example.com/1.jpg\n")
    with pytest.raises(ValueError, match=r"urls.tsv: line 1 gives an image URL \(https://example.com/1.jpg\)"):
        load_conceptual_captions(tmp_path / "urls.tsv", tmp_path)


def test_image_folder_jsonl_lists_and_csv(image_folder):
    dataset = load_image_folder(image_folder)
    assert len(dataset) == 7
    assert dataset["image_id"][:3] == ["a.png", "a.png", "b.png"]
    assert dataset["caption"][4] == "A man rides a bicycle down the street."
    assert dataset["image_path"][-1] == str(image_folder / "sub/d.png")

    (image_folder / "metadata.jsonl").unlink()
    (image_folder / "metadata.csv").write_text('file_name,text\na.png,"A dog, running."\nb.png,A cat.\n')
    dataset = load_caption_dataset("imagefolder", image_folder)
    assert dataset["caption"] == ["A dog, running.", "A cat."]


def test_a_csv_row_with_an_unquoted_comma_is_refused_not_cut(image_folder):
    (image_folder / "metadata.jsonl").unlink()
    (image_folder / "metadata.csv").write_text("file_name,text\na.png,A dog.\nb.png,A dog, running.\n")
    message = (
        r"metadata.csv: line 3 has 3 fields but the header names 2; put a caption that contains a comma in double "
        r'quotes \("A dog, running."\)'
    )
    with pytest.raises(ValueError, match=message):
        load_image_folder(image_folder)


def karpathy(path):
    return load_coco_karpathy(path, ".")


def coco(path):
    return load_coco_captions(path, ".")


def conceptual(path):
    return load_conceptual_captions(path, ".")


def image_folder_of(path):
    return load_image_folder(path.parent)


@pytest.mark.parametrize(
    "file_name, content, loader, error",
    [
        # Empty captions
        (
            "k.json",
            {"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "ok"}, {"raw": "  "}]}]},
            karpathy,
            r"k.json: images\[0\] \(a.jpg\) sentences\[1\] has an empty caption",
        ),
        (
            "c.json",
            {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": ""}]},
            coco,
            r"c.json: annotations\[0\] \(image a.jpg\) has an empty caption",
        ),
        (
            "t.tsv",
            "fine\ta.jpg\n \t\tb.jpg\n",
            conceptual,
            r"t.tsv: line 2 \(\) has an empty caption|t.tsv: line 2 .* has an empty caption",
        ),
        (
            "metadata.jsonl",
            '{"file_name": "a.png", "text": ["fine", "\\t"]}\n',
            image_folder_of,
            r"metadata.jsonl: line 1 \(a.png\) text\[1\] has an empty caption",
        ),
        # Records or fields of the wrong type
        ("k.json", {"images": ["a.jpg"]}, karpathy, r"k.json: images\[0\] is not an object \(got 'a.jpg'\)"),
        ("k.json", {"images": {"a": 1}}, karpathy, r"k.json has 'images' = \{'a': 1\}; expected list"),
        (
            "k.json",
            {"images": [{"filename": None, "split": "train", "sentences": []}]},
            karpathy,
            r"k.json: images\[0\] has 'filename' = None; expected str",
        ),
        (
            "k.json",
            {"images": [{"filename": "a.jpg", "split": "train", "sentences": None}]},
            karpathy,
            r"k.json: images\[0\] has 'sentences' = None; expected list",
        ),
        ("c.json", [1, 2], coco, r"c.json is not an object"),
        ("c.json", {"images": None, "annotations": []}, coco, r"c.json has 'images' = None; expected list"),
        (
            "c.json",
            {"images": [{"id": [1], "file_name": "a.jpg"}], "annotations": []},
            coco,
            r"c.json: images\[0\] has 'id' = \[1\]; expected int or str",
        ),
        (
            "c.json",
            {"images": [{"id": 1, "file_name": "x.jpg"}, {"id": 1, "file_name": "z.jpg"}], "annotations": []},
            coco,
            r"c.json: images\[1\] repeats the id 1 of images\[0\]; every entry of `images` needs its own id",
        ),
        (
            "c.json",
            {"images": [{"id": 1, "file_name": 7}], "annotations": [{"image_id": 1, "caption": "A dog."}]},
            coco,
            r"c.json: image 1 has 'file_name' = 7; expected str",
        ),
        # Image ids: an integer or a string, one kind per file, each image its own (Arrow refused a mix unnamed; a
        # repeated Karpathy id merged two images' references; floats and `true` were kept as ids)
        *(
            (
                "k.json",
                {"images": [{"filename": "a.jpg", "split": "test", "cocoid": value, "sentences": [{"raw": "A."}]}]},
                karpathy,
                rf"k.json: images\[0\] has 'cocoid' = {pattern}; expected int or str",
            )
            for value, pattern in ((1.5, r"1\.5"), (True, "True"), ({"a": 1}, r"\{'a': 1\}"))
        ),
        (
            "k.json",
            {"images": [{"filename": "a.jpg", "split": "test", "imgid": 0, "sentences": [{"raw": "A."}]},
                        {"filename": "b.jpg", "split": "test", "imgid": "b", "sentences": [{"raw": "B."}]}]},
            karpathy,
            r"k.json: images\[1\] has the id 'b' \(a string\), but images\[0\] has the id 0 \(an integer\): the "
            r"images' `cocoid` \(or `imgid`\) must be all integers or all strings",
        ),
        (
            "k.json",
            {"images": [{"filename": "a.jpg", "split": "train", "cocoid": 7, "sentences": [{"raw": "A."}]},
                        {"filename": "b.jpg", "split": "test", "cocoid": 7, "sentences": [{"raw": "B."}]}]},
            karpathy,
            r"k.json: images\[1\] repeats the id 7 of images\[0\]; every entry of `images` needs its own id",
        ),
        (  # an entry without an id is its position, and said to be
            "k.json",
            {"images": [{"filename": "a.jpg", "split": "test", "sentences": [{"raw": "A."}]},
                        {"filename": "b.jpg", "split": "test", "imgid": 0, "sentences": [{"raw": "B."}]}]},
            karpathy,
            r"k.json: images\[1\] repeats the id 0 of images\[0\] \(its position there: it names no id\); every entry",
        ),
        (
            "k.json",
            {"images": [{"filename": "a.jpg", "split": "test", "cocoid": "x", "sentences": [{"raw": "A."}]},
                        {"filename": "b.jpg", "split": "test", "sentences": [{"raw": "B."}]}]},
            karpathy,
            r"k.json: images\[1\] has the id 1 \(an integer; its position: it names no id\), but images\[0\] has the "
            r"id 'x' \(a string\)",
        ),
        (
            "c.json",
            {"images": [{"id": True, "file_name": "a.jpg"}], "annotations": []},
            coco,
            r"c.json: images\[0\] has 'id' = True; expected int or str",
        ),
        ("metadata.jsonl", '{"file_name": 3, "text": "A dog."}\n', image_folder_of, r"line 1 has 'file_name' = 3"),
        ("metadata.jsonl", '{"file_name": null, "text": "A dog."}\n', image_folder_of, r"'file_name' = None"),
    ],
)
def test_bad_records_are_rejected_naming_the_file_record_and_field(tmp_path, file_name, content, loader, error):
    path = tmp_path / file_name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=error):
        loader(path)


def test_a_karpathy_entry_with_a_null_cocoid_takes_its_imgid(tmp_path):
    image = {"filename": "a.jpg", "split": "test", "cocoid": None, "imgid": 5, "sentences": [{"raw": "A dog."}]}
    (tmp_path / "k.json").write_text(json.dumps({"images": [image]}))
    assert load_coco_karpathy(tmp_path / "k.json", tmp_path)["test"]["image_id"] == [5]


def test_text_files_may_start_with_a_bom_and_must_be_utf8(tmp_path):
    (tmp_path / "metadata.csv").write_text("\ufefffile_name,text\na.png,A dog.\n", encoding="utf-8")
    assert load_image_folder(tmp_path)["image_id"] == ["a.png"]
    (tmp_path / "train.tsv").write_text("\ufeffcaption\timage\nA cat.\tb.png\n", encoding="utf-8")
    assert load_conceptual_captions(tmp_path / "train.tsv", tmp_path)["caption"] == ["A cat."]

    (tmp_path / "latin1.tsv").write_bytes("Un caf\xe9.\ta.png\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.tsv is not valid UTF-8 .*must be UTF-8 encoded"):
        load_conceptual_captions(tmp_path / "latin1.tsv", tmp_path)
    (tmp_path / "latin1.json").write_bytes('{"images": ["caf\xe9"]}'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.json is not valid UTF-8"):
        load_coco_karpathy(tmp_path / "latin1.json", tmp_path)


def test_unknown_format_and_missing_metadata(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset format 'flickr'"):
        load_caption_dataset("flickr", tmp_path)
    with pytest.raises(FileNotFoundError, match="has no metadata.jsonl or metadata.csv"):
        load_image_folder(tmp_path)


def test_group_by_image_collects_references(image_folder):
    grouped = group_by_image(load_image_folder(image_folder))
    assert grouped["image_id"] == ["a.png", "b.png", "c.png", "sub/d.png"]
    assert grouped["references"][0] == ["A dog runs on the beach.", "Two cats sleep!"]
    assert grouped["references"][2] == ["A man rides a bicycle down the street."]


def test_evaluation_groups_by_image_id_and_an_id_names_one_file(tmp_path):
    # Evaluation scores each image id: two ids listing one file are two images, each with its own references.
    data = {
        "images": [{"id": 1, "file_name": "x.jpg"}, {"id": 2, "file_name": "x.jpg"}],
        "annotations": [{"image_id": 1, "caption": "A dog."}, {"image_id": 2, "caption": "A cat."}],
    }
    (tmp_path / "c.json").write_text(json.dumps(data))
    grouped = group_by_image(load_coco_captions(tmp_path / "c.json", tmp_path))
    assert grouped["image_id"] == [1, 2]
    assert grouped["references"] == [["A dog."], ["A cat."]]
    assert grouped["image_path"] == [str(tmp_path / "x.jpg")] * 2

    one_id_two_files = datasets.Dataset.from_dict(
        {"image_id": [1, 1], "image_path": ["x.jpg", "z.jpg"], "caption": ["A dog.", "A cat."]}
    )
    with pytest.raises(ValueError, match=r"The image id 1 names two files, x.jpg and z.jpg; an id must name one"):
        group_by_image(one_id_two_files)


# ---------------------------------------------------------------- embedding caption datasets (embeddings folders)


@pytest.fixture
def tokenizer_and_processor():
    tokenizer = build_tokenizer()
    return tokenizer, tiny_processor(tokenizer)


def test_embedding_cache_embeds_each_image_once_in_batches_and_is_reused(
    tmp_path, image_folder, tokenizer_and_processor
):
    tokenizer, processor = tokenizer_and_processor
    model = tiny_model(tokenizer)
    dataset = load_image_folder(image_folder)
    seen, patch = count_vision_images(model)
    with patch:
        embedded, table = embed_images(dataset, model, processor.image_processor, tmp_path / "cache", batch_size=3)
    assert seen == [3, 1]  # 4 unique images of 7 captions, in batches of 3
    assert embedded["image_index"] == [0, 0, 1, 1, 2, 3, 3]
    assert table.shape == (4, 24) and table.dtype == torch.float32
    names = ["a.png", "b.png", "c.png", "sub/d.png"]
    pixels = processor.image_processor([PIL.Image.open(image_folder / name) for name in names])["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(table, model.get_image_embeds(pixels), atol=1e-5, rtol=1e-5)

    # A second run, or another split of the same images, reads the cache: no vision forward.
    seen.clear()
    with patch:
        again, table_again = embed_images(dataset.select([4, 6]), model, processor.image_processor, tmp_path / "cache")
    assert seen == []
    assert again["image_index"] == [0, 1]
    assert torch.equal(table_again, table[[2, 3]])
    # One embeddings folder, the one `clipcap train --embedding_cache_dir` uses, with each image's captions.
    (folder,) = (tmp_path / "cache").iterdir()
    assert folder == embedding_cache_folder(tmp_path / "cache", model, processor.image_processor)
    assert load_embeddings(folder)["captions"] == [
        ["A dog runs on the beach.", "Two cats sleep!"],
        ["A red circle above a blue square.", "People walk."],
        ["A man rides a bicycle down the street."],
        ["A small green triangle.", "A dog runs."],
    ]


def test_embedding_and_checking_images_leave_the_global_random_state_alone(
    tmp_path, image_folder, tokenizer_and_processor
):
    """What a run draws afterwards (LoRA's initial weights) must not depend on whether the cache was warm."""
    tokenizer, processor = tokenizer_and_processor
    model = tiny_model(tokenizer)
    dataset = load_image_folder(image_folder)
    torch.manual_seed(0)
    expected = torch.rand(3)
    for step in (
        lambda: embed_images(dataset, model, processor.image_processor, tmp_path / "cache"),  # cold cache: embeds
        lambda: check_images(dataset),
    ):
        torch.manual_seed(0)
        step()
        assert torch.equal(torch.rand(3), expected)


def test_an_image_replaced_at_the_same_path_is_embedded_again(tmp_path, image_folder, tokenizer_and_processor):
    tokenizer, processor = tokenizer_and_processor
    model = tiny_model(tokenizer)
    dataset = load_image_folder(image_folder)
    _, table = embed_images(dataset, model, processor.image_processor, tmp_path / "cache")

    new_image = random_images(1, seed=9)[0]
    new_image.save(image_folder / "b.png")
    later = os.stat(image_folder / "b.png").st_mtime_ns + 10**9  # a later write, even on a coarse clock
    os.utime(image_folder / "b.png", ns=(later, later))
    seen, patch = count_vision_images(model)
    with patch:
        _, again = embed_images(dataset, model, processor.image_processor, tmp_path / "cache")
    assert seen == [1]
    with torch.no_grad():
        expected = model.get_image_embeds(processor.image_processor(new_image, return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(again[1:2], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(again[[0, 2, 3]], table[[0, 2, 3]])


def test_an_interrupted_embedding_pass_keeps_what_it_embedded(
    tmp_path, image_folder, tokenizer_and_processor, monkeypatch
):
    tokenizer, processor = tokenizer_and_processor
    model = tiny_model(tokenizer)
    dataset = load_image_folder(image_folder)
    monkeypatch.setattr("clipcap_hf.data.embeddings.EMBEDDING_SHARD_SIZE", 2)
    original, batches = model.get_image_embeds, []

    def interrupted_on_the_fourth_batch(pixel_values):
        batches.append(pixel_values)
        if len(batches) == 4:
            raise KeyboardInterrupt
        return original(pixel_values)

    with mock.patch.object(model, "get_image_embeds", interrupted_on_the_fourth_batch):
        with pytest.raises(KeyboardInterrupt):
            embed_images(dataset, model, processor.image_processor, tmp_path / "cache", batch_size=1)
    folder = embedding_cache_folder(tmp_path / "cache", model, processor.image_processor)
    assert len(load_embeddings(folder)) == 3
    assert len(list(folder.glob("shard-*"))) == 2  # a full shard of 2, then what was done when interrupted
    assert "num_images" not in load_embeddings_info(folder)  # the info says the pass is incomplete

    seen, patch = count_vision_images(model)
    with patch:
        _, table = embed_images(dataset, model, processor.image_processor, tmp_path / "cache")
    assert seen == [1]
    assert table.shape == (4, 24)


def test_shards_are_written_whole_and_a_folder_that_cannot_be_written_is_named(
    tmp_path, image_folder, tokenizer_and_processor
):
    tokenizer, processor = tokenizer_and_processor
    model = tiny_model(tokenizer)
    dataset = load_image_folder(image_folder)
    folder = embedding_cache_folder(tmp_path / "cache", model, processor.image_processor)
    embed_images(dataset.select([0, 2]), model, processor.image_processor, tmp_path / "cache")

    def dies_halfway(self, path, **kwargs):
        os.makedirs(path)
        (tmp_path / "cache").joinpath(path, "data-00000-of-00001.arrow").write_bytes(b"half")
        raise PermissionError(13, "Permission denied")

    # A folder that cannot be written (as root, chmod would not stop the writes: a mock does) stops the run, named.
    message = rf"Cannot write to the embeddings folder {re.escape(str(folder))} \(PermissionError: .*Permission denied"
    with mock.patch.object(datasets.Dataset, "save_to_disk", dies_halfway), pytest.raises(OSError, match=message):
        embed_images(dataset, model, processor.image_processor, tmp_path / "cache")
    assert sorted(path.name for path in folder.iterdir()) == [
        ".embeddings-writer.lock", "embeddings_info.json", "shard-rank00000-of-00001-00000"
    ]
    # Also when not even the folder's first file can be written: before any image is embedded.
    denied = PermissionError(13, "Permission denied")
    message = rf"Cannot write to the embeddings folder {re.escape(str(tmp_path))}.*Permission denied\); give a writable"
    unwritable = mock.patch("clipcap_hf.data.embeddings.write_text_atomically", side_effect=denied)
    with unwritable, pytest.raises(OSError, match=message):
        embed_images(dataset, model, processor.image_processor, tmp_path / "elsewhere")
    assert not list((tmp_path / "elsewhere").rglob("shard-*"))

    (folder / ".tmp-shard-of-a-killed-run").mkdir()  # left by a run killed mid-write: ignored
    _, table = embed_images(dataset, model, processor.image_processor, tmp_path / "cache")
    assert table.shape == (4, 24) and len(list(folder.glob("shard-*"))) == 2

    (folder / "shard-written-in-place").mkdir()
    with pytest.raises(ValueError, match=r"shard-written-in-place is incomplete or damaged .* Delete that folder"):
        embed_images(dataset, model, processor.image_processor, tmp_path / "cache")


def test_changed_preprocessing_or_weights_recompute_and_a_foreign_cache_is_refused(
    tmp_path, image_folder, tokenizer_and_processor
):
    tokenizer, processor = tokenizer_and_processor
    model = tiny_model(tokenizer)
    dataset = load_image_folder(image_folder)
    _, table = embed_images(dataset, model, processor.image_processor, tmp_path / "cache")

    other_processor = ClipCapImageProcessor(size=IMAGE_SIZE + 8, crop_size=IMAGE_SIZE)
    seen, patch = count_vision_images(model)
    with patch:
        _, resized = embed_images(dataset, model, other_processor, tmp_path / "cache")
    assert sum(seen) == 4
    assert not torch.allclose(resized, table)

    with torch.no_grad():
        model.vision_model.visual_projection.weight.mul_(2)
    seen.clear()
    with patch:
        _, doubled = embed_images(dataset, model, processor.image_processor, tmp_path / "cache")
    assert sum(seen) == 4
    torch.testing.assert_close(doubled, 2 * table, atol=1e-5, rtol=1e-5)
    assert len(list((tmp_path / "cache").iterdir())) == 3

    # Pointing at one embeddings folder made by another tower is an error, not a silent reuse.
    first_cache = embedding_cache_folder(tmp_path / "cache", tiny_model(tokenizer), processor.image_processor)
    with pytest.raises(ValueError, match="were computed with another vision tower or image preprocessing"):
        embed_images(dataset, model, processor.image_processor, first_cache)


def test_a_saved_and_reloaded_image_processor_reuses_the_cache(tmp_path, image_folder, tokenizer_and_processor):
    tokenizer, processor = tokenizer_and_processor
    model = tiny_model(tokenizer)
    dataset = load_image_folder(image_folder)
    _, table = embed_images(dataset, model, processor.image_processor, tmp_path / "cache")
    processor.save_pretrained(tmp_path / "saved")
    reloaded = ClipCapProcessor.from_pretrained(tmp_path / "saved").image_processor
    assert "auto_map" in reloaded.to_dict()  # what save_pretrained adds, which is no preprocessing setting

    seen, patch = count_vision_images(model)
    with patch:
        _, again = embed_images(dataset, model, reloaded, tmp_path / "cache")
    assert seen == [] and torch.equal(again, table)
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_dataset_dict_splits_share_one_table(tmp_path, image_folder, tokenizer_and_processor):
    import datasets

    tokenizer, processor = tokenizer_and_processor
    dataset = load_image_folder(image_folder)
    splits = datasets.DatasetDict({"train": dataset.select(range(4)), "eval": dataset.select([2, 4, 5])})
    embedded, table = embed_images(splits, tiny_model(tokenizer), processor.image_processor, tmp_path / "cache")
    assert embedded["train"]["image_index"] == [0, 0, 1, 1]
    assert embedded["eval"]["image_index"] == [1, 2, 3]
    assert table.shape[0] == 4


def test_rows_without_captions_share_the_folder_of_captioned_rows(tmp_path, image_folder, tokenizer_and_processor):
    tokenizer, processor = tokenizer_and_processor
    model = tiny_model(tokenizer)
    dataset = load_image_folder(image_folder)
    _, table = embed_images(dataset, model, processor.image_processor, tmp_path / "cache")
    evaluation = group_by_image(dataset)  # one row per image, `references` instead of `caption`
    assert "caption" not in evaluation.column_names
    seen, patch = count_vision_images(model)
    with patch:
        embedded, evaluation_table = embed_images(evaluation, model, processor.image_processor, tmp_path / "cache")
    assert seen == []  # the images the training rows stored
    assert embedded["image_index"] == [0, 1, 2, 3]
    torch.testing.assert_close(evaluation_table, table)
    # And the other way round: a folder begun by rows without captions takes captioned ones.
    embed_images(evaluation.select([0]), model, processor.image_processor, tmp_path / "other")
    _, other_table = embed_images(dataset, model, processor.image_processor, tmp_path / "other")
    torch.testing.assert_close(other_table, table)


def test_an_embedding_cache_of_an_earlier_version_is_refused_with_the_fix(
    tmp_path, image_folder, tokenizer_and_processor
):
    tokenizer, processor = tokenizer_and_processor
    model = tiny_model(tokenizer)
    dataset = load_image_folder(image_folder)
    folder = embedding_cache_folder(tmp_path / "cache", model, processor.image_processor)
    # Under the cache root, or given as the root itself (as the earlier version took one cache folder).
    for old, cache_dir in ((folder, tmp_path / "cache"), (tmp_path / "one-cache", tmp_path / "one-cache")):
        old.mkdir(parents=True)
        (old / "cache_info.json").write_text("{}")
        message = (
            f"{re.escape(str(old))} is an embedding cache of an earlier version of clipcap_hf, which is not read any "
            r"more: delete that folder \(its images are embedded again on the next call\) or give another `cache_dir`."
        )
        with pytest.raises(ValueError, match=message):
            embed_images(dataset, model, processor.image_processor, cache_dir)
        assert [path.name for path in old.iterdir()] == ["cache_info.json"]  # nothing written into it


def test_training_from_an_embeddings_folder_names_an_unwritable_cache_for_its_caption_rows(
    tmp_path, image_folder, tokenizer_and_processor
):
    from clipcap_hf.data.prepare import load_training_data
    from clipcap_hf.training.arguments import DataArguments

    tokenizer, processor = tokenizer_and_processor
    model = tiny_model(tokenizer)
    embed_images(load_image_folder(image_folder), model, processor.image_processor, tmp_path / "cache")
    folder = embedding_cache_folder(tmp_path / "cache", model, processor.image_processor)
    data_args = DataArguments(embeddings=str(folder), embedding_cache_dir=str(tmp_path / "read-only"))
    denied = mock.patch("pathlib.Path.mkdir", side_effect=PermissionError(13, "Permission denied"))
    message = (
        rf"Cannot write the caption rows of --embeddings to {re.escape(str(tmp_path / 'read-only' / 'caption_rows'))} "
        r"\(PermissionError: .*Permission denied\); give a writable --embedding_cache_dir."
    )
    with denied, pytest.raises(OSError, match=message):
        load_training_data(data_args, model, processor, train=True, evaluate=False)
    data = load_training_data(data_args, model, processor, train=True, evaluate=False)
    assert len(data.train) == 7  # one row per caption


@pytest.mark.parametrize("use_embedding_cache", [True, False])
def test_evaluation_images_are_one_per_image_id_even_with_identical_bytes(
    tmp_path, tokenizer_and_processor, use_embedding_cache
):
    import pandas as pd

    from clipcap_hf.data.prepare import load_training_data
    from clipcap_hf.training.arguments import DataArguments

    tokenizer, processor = tokenizer_and_processor
    model = tiny_model(tokenizer)
    same, other = [png_bytes(image) for image in random_images(2)]
    rows = {"image": [same, same, other], "image_id": [1, 2, 3], "caption": ["A dog.", "A cat.", "A bus."]}
    pd.DataFrame(rows).to_parquet(tmp_path / "val.parquet")
    data_args = DataArguments(
        validation_file=str(tmp_path / "val.parquet"),
        use_embedding_cache=use_embedding_cache,
        embedding_cache_dir=str(tmp_path / "cache"),
    )
    data = load_training_data(data_args, model, processor, train=False, evaluate=True)
    # Ids 1 and 2 share one embedding row (the same bytes) but are two evaluated images.
    assert data.eval_images["image_id"] == [1, 2, 3]
    assert data.eval_images["references"] == [["A dog."], ["A cat."], ["A bus."]]
    if use_embedding_cache:
        assert data.eval_images["image_index"][0] == data.eval_images["image_index"][1]


@pytest.mark.parametrize("use_embedding_cache", [True, False])
def test_max_eval_samples_keeps_n_captions_and_every_reference_of_their_images(
    tmp_path, image_folder, tokenizer_and_processor, use_embedding_cache
):
    import pandas as pd

    from clipcap_hf.data.prepare import load_training_data
    from clipcap_hf.training.arguments import DataArguments

    tokenizer, processor = tokenizer_and_processor
    model = tiny_model(tokenizer)
    # A row per caption, the captions of two images interleaved.
    first, second = [png_bytes(image) for image in random_images(2)]
    rows = {"image": [first, second, first, second], "image_id": [1, 2, 1, 2], "caption": ["a1", "b1", "a2", "b2"]}
    pd.DataFrame(rows).to_parquet(tmp_path / "val.parquet")
    sources = {
        "parquet": ({}, str(tmp_path / "val.parquet"), ["a1", "b1", "a2"], [1, 2], [["a1", "a2"], ["b1", "b2"]]),
        # Image folder: a.png and b.png have two captions each.
        "imagefolder": (
            {"dataset_format": "imagefolder"}, str(image_folder),
            ["A dog runs on the beach.", "Two cats sleep!", "A red circle above a blue square."], ["a.png", "b.png"],
            [["A dog runs on the beach.", "Two cats sleep!"], ["A red circle above a blue square.", "People walk."]],
        ),
    }  # fmt: skip
    for options, validation_file, captions, image_ids, references in sources.values():
        data_args = DataArguments(
            validation_file=validation_file,
            max_eval_samples=3,
            use_embedding_cache=use_embedding_cache,
            embedding_cache_dir=str(tmp_path / "cache"),
            **options,
        )
        data = load_training_data(data_args, model, processor, train=False, evaluate=True)
        # The loss is computed on the first 3 captions; the images they belong to keep all their references.
        assert data.eval["caption"] == captions
        assert data.eval_images["image_id"] == image_ids
        assert data.eval_images["references"] == references


def test_training_names_this_towers_cache_of_an_earlier_version_with_the_fix(
    tmp_path, image_folder, tokenizer_and_processor
):
    from clipcap_hf.data.prepare import load_training_data
    from clipcap_hf.training.arguments import DataArguments

    tokenizer, processor = tokenizer_and_processor
    model = tiny_model(tokenizer)
    old = embedding_cache_folder(tmp_path / "cache", model, processor.image_processor)
    old.mkdir(parents=True)
    (old / "cache_info.json").write_text("{}")
    lines = [{"image": str(image_folder / "a.png"), "caption": "A dog."}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    data_args = DataArguments(train_file=str(tmp_path / "data.jsonl"), image_column="image", caption_column="caption",
                              embedding_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    message = (
        rf"--embedding_cache_dir {re.escape(str(tmp_path / 'cache'))}: {re.escape(str(old))} is an embedding cache of "
        r"an earlier version of clipcap_hf, which is not read any more. Delete that folder \(its images are embedded "
        r"again on the next run\) or give another --embedding_cache_dir."
    )
    with pytest.raises(ValueError, match=message):
        load_training_data(data_args, model, processor, train=True, evaluate=False)
    assert [path.name for path in old.iterdir()] == ["cache_info.json"]  # nothing written into it


def corrupt_images(image_folder):
    (image_folder / "b.png").write_bytes(b"not a png at all")
    (image_folder / "c.png").unlink()


def test_bad_images_stop_the_run_naming_file_and_record_but_keep_the_good_embeddings(
    tmp_path, image_folder, tokenizer_and_processor
):
    tokenizer, processor = tokenizer_and_processor
    model = tiny_model(tokenizer)
    corrupt_images(image_folder)
    dataset = load_image_folder(image_folder)
    with pytest.raises(ValueError) as error:
        embed_images(dataset, model, processor.image_processor, tmp_path / "cache")
    lines = str(error.value).splitlines()
    folder = embedding_cache_folder(tmp_path / "cache", model, processor.image_processor)
    assert lines[0] == (
        f"2 image(s) cannot be read; the readable ones are stored in {folder}. Fix or remove them, or skip them "
        '(`--on_bad_image skip`, `on_bad_image="skip"`):'
    )
    b_key = f"{image_folder / 'b.png'}|{os.path.getsize(image_folder / 'b.png')}|"
    assert lines[1].startswith(f"  {image_folder / 'b.png'}: UnidentifiedImageError") and f"(key {b_key}" in lines[1]
    assert lines[2] == f"  {image_folder / 'c.png'}: file not found (key {image_folder / 'c.png'})"

    # The two readable images were cached: after fixing the files, only the fixed ones are computed.
    write_images(image_folder, ["b.png", "c.png"], seed=5)
    seen, patch = count_vision_images(model)
    with patch:
        embed_images(dataset, model, processor.image_processor, tmp_path / "cache")
    assert sum(seen) == 2


def test_bad_images_can_be_skipped_with_a_count(tmp_path, image_folder, tokenizer_and_processor, caplog):
    tokenizer, processor = tokenizer_and_processor
    corrupt_images(image_folder)
    dataset = load_image_folder(image_folder)
    model, image_processor = tiny_model(tokenizer), processor.image_processor
    with caplog.at_level("WARNING"):
        embedded, table = embed_images(dataset, model, image_processor, tmp_path / "cache", on_bad_image="skip")
    assert embedded["image_id"] == ["a.png", "a.png", "sub/d.png", "sub/d.png"]
    assert embedded["image_index"] == [0, 0, 1, 1]
    assert table.shape[0] == 2
    assert "Skipped 2 unreadable image(s) and their 3 caption(s)" in caplog.text

    only_bad = dataset.filter(lambda row: row["image_id"] in ("b.png", "c.png"))
    for cache in ("cache", "new-cache"):  # a folder holding other images, and one left without any
        with pytest.raises(ValueError, match="None of the images could be read; there is nothing to train on"):
            embed_images(only_bad, model, image_processor, tmp_path / cache, on_bad_image="skip")

    checked = check_images(dataset, on_bad_image="skip")
    assert checked["image_id"] == embedded["image_id"]
    with pytest.raises(ValueError, match="2 image.s. cannot be read"):
        check_images(dataset)
    with pytest.raises(ValueError, match=r"on_bad_image \(`--on_bad_image`\) must be 'error' or 'skip', got 'ignore'"):
        check_images(dataset, on_bad_image="ignore")


def test_the_deprecated_image_embedding_cache_reads_and_writes_the_embeddings_folder(
    tmp_path, image_folder, tokenizer_and_processor
):
    tokenizer, processor = tokenizer_and_processor
    model = tiny_model(tokenizer)
    deprecated = r"`ImageEmbeddingCache` is deprecated .* in clipcap_hf 0.2: .*`embed_source`.*`load_embeddings`"
    with pytest.warns(FutureWarning, match=deprecated):
        cache = ImageEmbeddingCache(tmp_path / "cache", model, processor.image_processor)
    assert cache.directory == embedding_cache_folder(tmp_path / "cache", model, processor.image_processor)
    assert cache.load() == ({}, None)
    paths = [str(image_folder / name) for name in ("a.png", "b.png", "missing.png")]
    keys = [image_cache_key(path) for path in paths]
    assert cache.compute(paths, keys) == {paths[2]: "cannot be read (see the warning)"}
    cache.add(["extra"], torch.ones(1, 24))
    rows, embeddings = cache.load()
    assert rows == {keys[0]: 0, keys[1]: 1, "extra": 2}
    stored = load_embeddings(cache.directory).with_format("torch")[:]  # the same store
    assert stored["image_key"] == [keys[0], keys[1], "extra"] and torch.equal(stored["embedding"], embeddings)
    assert torch.equal(embeddings[2], torch.ones(24))
    pixels = processor.image_processor([PIL.Image.open(path) for path in paths[:2]])["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(embeddings[:2], model.get_image_embeds(pixels), atol=1e-5, rtol=1e-5)

    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="were computed with another vision tower"):
        ImageEmbeddingCache(cache.directory, tiny_model(tokenizer, seed=1), processor.image_processor)
    # Its folder is embed_images' own: the images it stored are not embedded again.
    dataset = load_image_folder(image_folder).filter(lambda row: row["image_id"] in ("a.png", "b.png"))
    seen, patch = count_vision_images(model)
    with patch:
        embedded, table = embed_images(dataset, model, processor.image_processor, tmp_path / "cache")
    assert seen == []
    assert torch.equal(table, embeddings[:2])


# ---------------------------------------------------------------- collator


def test_collator_pads_dynamically_appends_eos_and_masks_padding(tokenizer_and_processor):
    tokenizer, processor = tokenizer_and_processor
    eos = tokenizer.eos_token_id
    table = torch.arange(12, dtype=torch.float32).view(3, 4)
    collator = ClipCapDataCollator(processor, image_embeds=table)
    captions = ["A dog runs.", "Two cats sleep on a sofa!"]
    tokens = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in captions]
    batch = collator([{"caption": captions[0], "image_index": 2}, {"caption": captions[1], "image_index": 0}])
    image = [processor.image_token_id] * 4
    longest = len(tokens[1]) + 1
    assert batch["input_ids"].shape == (2, 4 + longest)  # the longest caption of this batch, not a global length
    assert batch["input_ids"][0, : 4 + len(tokens[0]) + 1].tolist() == image + tokens[0] + [eos]
    assert batch["input_ids"][1].tolist() == image + tokens[1] + [eos]
    padding = longest - len(tokens[0]) - 1
    assert batch["labels"][0].tolist() == [-100] * 4 + tokens[0] + [eos] + [-100] * padding
    assert batch["attention_mask"][0].tolist() == [1] * (4 + len(tokens[0]) + 1) + [0] * padding
    assert torch.equal(batch["image_embeds"], table[[2, 0]])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "image_embeds"}


def test_collator_truncates(tokenizer_and_processor):
    tokenizer, processor = tokenizer_and_processor
    long_caption, short_caption = "A man rides a bicycle down the street.", "A dog."
    limit = len(tokenizer(short_caption, add_special_tokens=False)["input_ids"]) + 1  # the short one just fits
    collator = ClipCapDataCollator(processor, image_embeds=torch.zeros(1, 4), max_caption_length=limit)
    features = [{"caption": long_caption, "image_index": 0}, {"caption": short_caption, "image_index": 0}]
    batch = collator(features)
    assert batch["input_ids"].shape[1] == 4 + limit  # the image tokens, then the captions
    caption = tokenizer(long_caption, add_special_tokens=False)["input_ids"][:limit]
    assert batch["input_ids"][0].tolist() == [processor.image_token_id] * 4 + caption
    assert batch["input_ids"][1, -1] == tokenizer.eos_token_id
    assert "num_truncated" not in batch


def test_caption_lengths_for_group_by_length_and_the_truncation_count(image_folder, tokenizer_and_processor):
    tokenizer, processor = tokenizer_and_processor
    dataset = load_image_folder(image_folder)
    counts = [len(tokenizer(caption, add_special_tokens=False)["input_ids"]) + 1 for caption in dataset["caption"]]
    with_lengths, num_truncated = add_caption_lengths(dataset, processor, max_length=12, batch_size=3)
    assert with_lengths["length"] == [min(count, 12) for count in counts]
    assert num_truncated == sum(count > 12 for count in counts) == 4
    assert add_caption_lengths(with_lengths, processor)[0]["length"] == counts


def test_collator_with_a_tokenizer_without_pad_token():
    tokenizer = build_tokenizer()
    assert tokenizer.pad_token is None
    processor = tiny_processor(tokenizer)
    batch = ClipCapDataCollator(processor, image_embeds=torch.zeros(1, 4))(
        [{"caption": "A dog.", "image_index": 0}, {"caption": "Two cats sleep on a sofa!", "image_index": 0}]
    )
    eos = tokenizer.eos_token_id
    length = int(batch["attention_mask"][0].sum())
    # Padding uses EOS, yet the caption's own EOS keeps its label and the padding's are -100.
    assert batch["input_ids"][0, length - 1] == eos and batch["labels"][0, length - 1] == eos
    assert (batch["input_ids"][0, length:] == eos).all() and (batch["labels"][0, length:] == -100).all()


def test_collator_reads_images_from_pil_or_files(image_folder, tokenizer_and_processor):
    _, processor = tokenizer_and_processor
    collator = ClipCapDataCollator(processor)
    image = PIL.Image.open(image_folder / "a.png")
    from_pil = collator([{"caption": "A dog.", "image": image}])
    from_file = collator([{"caption": "A dog.", "image_path": str(image_folder / "a.png")}])
    expected = processor.image_processor([image])["pixel_values"]
    assert torch.equal(from_pil["pixel_values"], expected) and torch.equal(from_file["pixel_values"], expected)
    with pytest.raises(ValueError, match="A row has no image"):
        collator([{"caption": "A dog."}])


def test_collator_names_the_row_of_an_image_it_cannot_read(image_folder, tokenizer_and_processor):
    _, processor = tokenizer_and_processor
    good = {"caption": "A dog.", "image": {"bytes": (image_folder / "a.png").read_bytes(), "path": None}}
    for bad, problem in [
        ({"bytes": b"not an image", "path": None}, "UnidentifiedImageError: cannot identify image file"),
        ({"bytes": None, "path": None}, "ValueError: the image holds neither bytes nor a path"),
    ]:
        with pytest.raises(ValueError) as error:
            ClipCapDataCollator(processor)([good, {"caption": "A cat.", "image": bad}])
        assert str(error.value) == f"Row 1 of the batch: its image cannot be decoded ({problem})."
    with pytest.raises(ValueError) as error:  # was a bare KeyError
        ClipCapDataCollator(processor, image_embeds=torch.zeros(2, 24))([{"image_index": 0, "caption": "A dog."},
                                                                         good])
    assert str(error.value) == (
        "Row 1 of the batch has no `image_index` (columns ['caption', 'image']), which the collator's `image_embeds` "
        "are looked up by: give every row one, or leave `image_embeds` out."
    )


def test_image_files_are_fully_decoded(tmp_path):
    """A truncated file fails when opened for embedding, not later."""
    path = tmp_path / "truncated.jpg"
    PIL.Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8) + 128).save(path)
    path.write_bytes(path.read_bytes()[:200])
    dataset = load_caption_dataset("imagefolder", _folder_with(tmp_path, "truncated.jpg"))
    with pytest.raises(ValueError, match=r"truncated.jpg: OSError"):
        check_images(dataset)


def _folder_with(folder, name):
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "A grey square."}) + "\n")
    return folder


def test_an_image_file_broken_since_the_last_run_is_not_trained_from_cached_caption_rows(
    tmp_path, tokenizer_and_processor
):
    from clipcap_hf.data.prepare import load_training_data
    from clipcap_hf.training.arguments import DataArguments

    tokenizer, processor = tokenizer_and_processor
    model = tiny_model(tokenizer)
    write_images(tmp_path, ["0.png", "1.png", "2.png"])
    lines = [json.dumps({"image": f"{i}.png", "caption": f"caption {i}"}) for i in range(3)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    data_args = DataArguments(
        train_file=str(tmp_path / "data.jsonl"), embedding_cache_dir=str(tmp_path / "cache"), on_bad_image="skip"
    )
    data = load_training_data(data_args, model, processor, train=True, evaluate=False)
    assert sorted(data.train["caption"]) == ["caption 0", "caption 1", "caption 2"]
    (tmp_path / "1.png").write_bytes(b"broken")  # skipped as unreadable by the next run
    data = load_training_data(data_args, model, processor, train=True, evaluate=False)
    assert sorted(data.train["caption"]) == ["caption 0", "caption 2"]


def test_a_training_row_without_an_image_is_named_or_left_out_with_on_bad_image_skip(
    tmp_path, tokenizer_and_processor
):
    from clipcap_hf.data.prepare import load_training_data
    from clipcap_hf.training.arguments import DataArguments

    tokenizer, processor = tokenizer_and_processor
    model = tiny_model(tokenizer)
    write_images(tmp_path, ["0.png", "2.png"])
    images = ["0.png", None, "2.png"]
    lines = [json.dumps({"image": image, "caption": f"caption {i}"}) for i, image in enumerate(images)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    options = dict(train_file=str(tmp_path / "data.jsonl"), embedding_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"--train_file: .*data.jsonl, row 1 \(from 0\) has no image"):
        load_training_data(DataArguments(**options), model, processor, train=True, evaluate=False)
    data_args = DataArguments(**options, on_bad_image="skip")
    data = load_training_data(data_args, model, processor, train=True, evaluate=False)
    assert sorted(data.train["caption"]) == ["caption 0", "caption 2"]


def test_webdataset_evaluation_images_are_named_by_shard_and_key_and_an_id_of_two_images_is_refused(
    tmp_path, tokenizer_and_processor
):
    import tarfile

    from clipcap_hf.data.prepare import load_training_data
    from clipcap_hf.training.arguments import DataArguments

    tokenizer, processor = tokenizer_and_processor
    model = tiny_model(tokenizer)
    images = iter(random_images(4))
    shards = []
    for shard in range(2):  # each shard numbers its samples from 0, as shards written one by one may
        shards.append(str(tmp_path / f"val-{shard}.tar"))
        with tarfile.open(shards[-1], "w") as tar:
            for sample in range(2):
                encoded = io.BytesIO()
                next(images).save(encoded, "PNG")
                for suffix, data in (("png", encoded.getvalue()), ("txt", f"shard {shard} image {sample}".encode())):
                    member = tarfile.TarInfo(f"{sample:06d}.{suffix}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
    data_args = DataArguments(validation_file=",".join(shards), embedding_cache_dir=str(tmp_path / "cache"))
    data = load_training_data(data_args, model, processor, train=False, evaluate=True)
    named = {row["image_id"]: row["references"] for row in data.eval_images}
    assert named == {
        f"val-{shard}.tar/{sample:06d}": [f"shard {shard} image {sample}"] for shard in range(2) for sample in range(2)
    }
    assert len(set(data.eval_images["image_index"])) == 4

    write_images(tmp_path, ["a.png", "b.png"])
    lines = [{"image": name, "caption": f"caption {name}", "image_id": 7} for name in ("a.png", "b.png")]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    data_args = DataArguments(validation_file=str(tmp_path / "val.jsonl"), embedding_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"gives the image id 7 to two different images \(rows 0 and 1 of its"):
        load_training_data(data_args, model, processor, train=False, evaluate=True)


def test_evaluation_images_are_not_written_into_the_embeddings_folder_trained_from(tmp_path, tokenizer_and_processor):
    from clipcap_hf.data import embed_source, load_image_source
    from clipcap_hf.data.prepare import load_training_data
    from clipcap_hf.training.arguments import DataArguments

    tokenizer, processor = tokenizer_and_processor
    model = tiny_model(tokenizer)
    write_images(tmp_path, [f"{i}.png" for i in range(4)])
    for name, numbers in (("train", (0, 1)), ("val", (2, 3))):
        lines = [json.dumps({"image": f"{i}.png", "caption": f"{name} caption {i}"}) for i in numbers]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines))
    folder = tmp_path / "embeddings"
    embed_source(load_image_source(data_files=str(tmp_path / "train.jsonl"), caption_column="caption"), model,
                 processor.image_processor, folder)
    # The cache root is the --embeddings folder itself: the evaluation images go to a subfolder of their own.
    data_args = DataArguments(
        embeddings=str(folder), embedding_cache_dir=str(folder), validation_file=str(tmp_path / "val.jsonl")
    )
    for _ in range(2):  # the second run trains on what the first left in the folder
        data = load_training_data(data_args, model, processor, train=True, evaluate=True)
        assert sorted(data.train["caption"]) == ["train caption 0", "train caption 1"]
        assert sorted(data.eval["caption"]) == ["val caption 2", "val caption 3"]
    assert len(load_embeddings(folder)) == 2
    assert load_embeddings_info(folder)["num_images"] == 2


@pytest.mark.parametrize("kind", ["imagefolder", "webdataset"])
def test_a_dataset_name_gets_the_default_caption_column_of_its_kind(tmp_path, webdataset_shards, kind):
    from clipcap_hf.data.prepare import load_source
    from clipcap_hf.training.arguments import DataArguments

    if kind == "imagefolder":
        folder = tmp_path / "images"
        write_images(folder, ["0.png", "1.png"])
        lines = [json.dumps({"file_name": f"{i}.png", "text": f"cap {i}"}) for i in range(2)]
        (folder / "metadata.jsonl").write_text("\n".join(lines))
        expected = [["cap 0"], ["cap 1"]]  # `text`
    else:
        folder = webdataset_shards[0][0].parent
        expected = [["A dog runs."], ["Two cats sleep!"], ["A red circle."], ["A man rides."], ["People walk."]]
    source = load_source(DataArguments(dataset_name=str(folder), train_split="train"), "train")
    assert sorted(source["captions"]) == sorted(expected)
