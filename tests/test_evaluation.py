import html
import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    PREFIX_LENGTH,
    distinct_captioning_model,
    mkldnn_disabled,
    packs_run,
    random_images,
    tiny_model,
)

from clipcap_hf import ClipCapForConditionalGeneration, ClipCapProcessor, onednn
from clipcap_hf.commands import main
from clipcap_hf.data import load_caption_dataset
from clipcap_hf.evaluation import (
    EvaluationResult,
    UnreadableImagesError,
    fill_model_card,
    generate_captions,
    iter_captions,
    metrics,
    score_predictions,
    write_evaluation,
)
from clipcap_hf.evaluation.metrics import compute_caption_metrics
from clipcap_hf.modeling_clipcap import DEFAULT_MAX_NEW_TOKENS
from clipcap_hf.onednn import onednn_linear_available
from clipcap_hf.utils.memory import on_glibc, reuses_freed_memory

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="the COCO tokenizer needs Java")

CAPTIONS = {
    1: ["A dog runs on the beach.", "A brown dog on the sand."],
    2: ["Two cats sleep on a sofa!", "Cats sleeping."],
    3: ["A man rides a bicycle down the street."],
    4: ["People walk in the park near the lake.", "A park with people."],
}
DOMAINS = {1: "in-domain", 2: "in-domain", 3: "near-domain", 4: "out-domain"}
FAST_METRICS = ["--metrics", "bleu", "rouge", "cider"]


@pytest.fixture
def coco_files(tmp_path):
    """A COCO-format annotation file (with nocaps' `domain`) over generated images."""
    (tmp_path / "images").mkdir()
    images = []
    for (image_id, _), image in zip(CAPTIONS.items(), random_images(4, seed=3)):
        image.save(tmp_path / "images" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "domain": DOMAINS[image_id]})
    annotations = [{"image_id": i, "caption": c} for i, captions in CAPTIONS.items() for c in captions]
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path, tmp_path / "images"


def write_first_references(path: Path, image_ids=tuple(CAPTIONS)) -> Path:
    """A predictions file (COCO results format) captioning each image with its first reference."""
    path.write_text(json.dumps([{"image_id": i, "caption": CAPTIONS[i][0]} for i in image_ids]))
    return path


def rescore_argv(coco_files, predictions: Path, output_dir: Path, *extra: str) -> list[str]:
    """`clipcap evaluate` arguments that score a predictions file against `coco_files`."""
    annotations, image_root = coco_files
    return ["evaluate", "--predictions", str(predictions), "--data", str(annotations), "--data-format", "coco",
            "--image-root", str(image_root), "--output-dir", str(output_dir), *extra]


def test_evaluate_writes_predictions_metrics_and_table(saved_model_dir, coco_files, tmp_path, capsys):
    annotations, image_root = coco_files
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(saved_model_dir), "--data", str(annotations), "--data-format", "coco",
            "--image-root", str(image_root), "--output-dir", str(out), "--num-beams", "2", "--max-new-tokens", "6",
            "--batch-size", "3", *FAST_METRICS]
    assert main(argv) == 0

    predictions = json.loads((out / "predictions.json").read_text())
    assert [p["image_id"] for p in predictions] == [1, 2, 3, 4]
    model = ClipCapForConditionalGeneration.from_pretrained(saved_model_dir).eval()
    processor = ClipCapProcessor.from_pretrained(saved_model_dir)
    import PIL.Image

    images = [PIL.Image.open(image_root / f"{i}.png") for i in CAPTIONS]
    expected = processor.batch_decode(model.generate(**processor(images=images), num_beams=2, max_new_tokens=6),
                                      skip_special_tokens=True)
    assert [p["caption"] for p in predictions] == [c.strip() for c in expected]

    metrics = json.loads((out / "metrics.json").read_text())
    independent = compute_caption_metrics({p["image_id"]: p["caption"] for p in predictions}, CAPTIONS,
                                          metrics=["bleu", "rouge", "cider"])
    assert metrics["scores"] == pytest.approx(independent)
    assert metrics["num_images"] == 4
    assert metrics["run"] == {"data": str(annotations), "data_format": "coco", "split": None, "limit": None,
                              "model": str(saved_model_dir), "num_beams": 2, "max_new_tokens": 6}
    table = (out / "metrics.md").read_text()
    assert table.splitlines()[0] == "| | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L | CIDEr |"
    assert f"{100 * independent['CIDEr']:.2f}" in table.splitlines()[2]
    assert table in capsys.readouterr().out


@pytest.mark.parametrize("length_settings, recorded", [
    ({"max_length": PREFIX_LENGTH + 3}, 3),  # it counts the image tokens, as ClipCap's `generate` reads it
    ({"max_new_tokens": 4}, 4),
    ({}, DEFAULT_MAX_NEW_TOKENS),  # no length chosen
])
def test_metrics_json_records_the_caption_length_the_generation_config_gives(
    saved_model_dir, coco_files, tmp_path, length_settings, recorded
):
    config_path = saved_model_dir / "generation_config.json"
    settings = json.loads(config_path.read_text())
    settings = {name: value for name, value in settings.items() if name not in ("max_length", "max_new_tokens")}
    config_path.write_text(json.dumps({**settings, **length_settings}))
    annotations, image_root = coco_files
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(saved_model_dir), "--data", str(annotations), "--data-format", "coco",
                 "--image-root", str(image_root), "--output-dir", str(out), "--limit", "1", "--num-beams", "1",
                 "--metrics", "bleu"]) == 0
    assert json.loads((out / "metrics.json").read_text())["run"]["max_new_tokens"] == recorded


def test_rescoring_written_predictions_gives_the_same_numbers_with_domains(saved_model_dir, coco_files, tmp_path):
    annotations, image_root = coco_files
    common = ["--data", str(annotations), "--data-format", "nocaps", "--image-root", str(image_root), *FAST_METRICS]
    assert main(["evaluate", "--model", str(saved_model_dir), "--output-dir", str(tmp_path / "a"), *common]) == 0
    assert main(["evaluate", "--predictions", str(tmp_path / "a" / "predictions.json"),
                 "--output-dir", str(tmp_path / "b"), *common]) == 0
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())
    second = json.loads((tmp_path / "b" / "metrics.json").read_text())
    # Without --max-new-tokens the model's generation config decides, and the record says what it was.
    saved_length = ClipCapForConditionalGeneration.from_pretrained(saved_model_dir).generation_config.max_new_tokens
    # Greedy by default, as `clipcap caption`.
    assert (first["run"]["max_new_tokens"], first["run"]["num_beams"]) == (saved_length, 1)
    assert second["run"]["predictions"] == str(tmp_path / "a" / "predictions.json")
    del first["run"], second["run"]
    assert first == second
    assert sorted(first["domains"]) == ["in-domain", "near-domain", "out-domain"]
    predictions = {p["image_id"]: p["caption"] for p in json.loads((tmp_path / "a" / "predictions.json").read_text())}
    in_domain = {i: c for i, c in predictions.items() if DOMAINS[i] == "in-domain"}
    assert first["domains"]["in-domain"] == pytest.approx(
        compute_caption_metrics(in_domain, CAPTIONS, metrics=["bleu", "rouge", "cider"])
    )
    assert "| out-domain |" in (tmp_path / "a" / "metrics.md").read_text()


def test_model_card_is_filled_and_refilled(coco_files, tmp_path):
    annotations, image_root = coco_files
    card = tmp_path / "model_card.md"
    card.write_text(
        "---\nlicense: mit\nlibrary_name: transformers\n---\n# ClipCap\n\n## Evaluation\n\n"
        "<!-- clipcap-results-start -->\n(none yet)\n<!-- clipcap-results-end -->\n\n## Limitations\n"
    )
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps([{"image_id": i, "caption": c[0]} for i, c in CAPTIONS.items()]))
    argv = ["evaluate", "--predictions", str(predictions), "--data", str(annotations), "--data-format", "coco",
            "--image-root", str(image_root), "--output-dir", str(tmp_path / "eval"), "--model-card", str(card),
            "--dataset-name", "toy", *FAST_METRICS]
    assert main(argv) == 0
    first = card.read_bytes()
    assert main(argv) == 0  # a second run replaces the results rather than adding to them
    assert card.read_bytes() == first
    text = card.read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    results = metadata["model-index"][0]["results"]
    assert len(results) == 1
    # Hub metric ids as types, the variants as names, as the paper's rows in model_card.md have them.
    assert [(m["type"], m["name"]) for m in results[0]["metrics"]] == [
        ("bleu", "BLEU-1"), ("bleu", "BLEU-2"), ("bleu", "BLEU-3"), ("bleu", "BLEU-4"), ("rouge", "ROUGE-L"),
        ("cider", "CIDEr"),
    ]
    assert results[0]["task"] == {"type": "image-to-text", "name": "Image captioning"}
    values = {m["name"]: m["value"] for m in results[0]["metrics"]}
    scores = json.loads((tmp_path / "eval" / "metrics.json").read_text())["scores"]
    assert values["CIDEr"] == round(100 * scores["CIDEr"], 2)
    assert results[0]["dataset"]["name"] == "toy" and "split" not in results[0]["dataset"]  # a COCO file has none
    assert "(none yet)" not in text and "| overall |" in text and text.rstrip().endswith("## Limitations")
    assert text.count("clipcap-results-start") == 1


def test_model_card_records_the_karpathy_split(coco_files, tmp_path):
    annotations, image_root = coco_files
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": [
        {"filename": f"{i}.png", "split": "test" if i < 4 else "val", "cocoid": i,
         "sentences": [{"raw": caption} for caption in captions]}
        for i, captions in CAPTIONS.items()
    ]}))
    card = tmp_path / "model_card.md"
    card.write_text("---\nlicense: mit\n---\n# ClipCap\n<!-- clipcap-results-start -->\n<!-- clipcap-results-end -->\n")
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps([{"image_id": i, "caption": c[0]} for i, c in CAPTIONS.items() if i < 4]))
    assert main(["evaluate", "--predictions", str(predictions), "--data", str(karpathy), "--image-root",
                 str(image_root), "--output-dir", str(tmp_path / "eval"), "--model-card", str(card),
                 "--dataset-name", "toy", *FAST_METRICS]) == 0
    results = yaml.safe_load(card.read_text().split("---")[1])["model-index"][0]["results"]
    assert results[0]["dataset"]["split"] == "test"
    assert "on toy (test, 3 images)" in card.read_text()


def test_model_card_without_markers_is_refused(coco_files, tmp_path, capsys):
    annotations, image_root = coco_files
    card = tmp_path / "card.md"
    card.write_text("---\nlicense: mit\n---\n# A card\n")
    predictions = write_first_references(tmp_path / "predictions.json")
    argv = ["evaluate", "--predictions", str(predictions), "--data", str(annotations), "--data-format", "coco",
            "--image-root", str(image_root), "--output-dir", str(tmp_path / "eval"), "--model-card", str(card),
            *FAST_METRICS]
    assert main(argv) == 2
    assert "has no results section to fill" in capsys.readouterr().err


MARKERS = "<!-- clipcap-results-start -->\n<!-- clipcap-results-end -->\n"
HEADER = "its YAML header (the lines between the --- lines at the top)"


@pytest.mark.parametrize(
    "card_text, message",
    [
        ("---\nfoo: [unclosed\n---\n" + MARKERS,
         f": {HEADER} is not valid YAML: expected ',' or ']', but got '<stream end>' (line 1, column 15 of the "
         "header). Correct the header."),
        ("---\n- a\n- b\n---\n" + MARKERS,
         f": {HEADER} is not model card metadata: repo card metadata block should be a dict. Correct the header."),
        ("---\n1: a\n---\n" + MARKERS,
         f": {HEADER} is not model card metadata: keywords must be strings. Correct the header."),
        ("---\nmodel-index: 5\n---\n" + MARKERS,
         f": {HEADER} is not model card metadata: Invalid `model_index` in metadata cannot be parsed: <class "
         "'TypeError'> 'int' object is not iterable. Correct the header."),
        (b"\xff\xfe card\n" + MARKERS.encode(),
         " is not UTF-8 text ('utf-8' codec can't decode byte 0xff in position 0: invalid start byte); save it as "
         "UTF-8."),
        ("---\nlicense: mit\n---\n# A card\n",
         " has no results section to fill: add the lines <!-- clipcap-results-start --> and "
         "<!-- clipcap-results-end --> (in this order) where the evaluation table belongs."),
        ("---\nlicense: mit\n---\n<!-- clipcap-results-end -->\n<!-- clipcap-results-start -->\n",
         " has no results section to fill: add the lines <!-- clipcap-results-start --> and "
         "<!-- clipcap-results-end --> (in this order) where the evaluation table belongs."),
    ],
    ids=["bad-yaml", "list-header", "number-key", "bad-model-index", "not-utf8", "no-markers", "markers-reversed"],
)
def test_a_model_card_that_cannot_be_filled_is_refused_before_any_work(
    coco_files, tmp_path, monkeypatch, capsys, card_text, message
):
    import clipcap_hf.commands.evaluate

    def no_data(*args, **kwargs):
        raise AssertionError("the model card must be checked before the data is loaded")

    monkeypatch.setattr(clipcap_hf.commands.evaluate, "load_caption_dataset", no_data)
    card = tmp_path / "card.md"
    card.write_bytes(card_text if isinstance(card_text, bytes) else card_text.encode())
    before = card.read_bytes()
    predictions = write_first_references(tmp_path / "predictions.json")
    assert main(rescore_argv(coco_files, predictions, tmp_path / "eval", "--model-card", str(card),
                             *FAST_METRICS)) == 2
    assert capsys.readouterr().err == f"clipcap evaluate: error: --model-card: {card}{message}\n"
    assert card.read_bytes() == before and not (tmp_path / "eval").exists()


def test_the_model_card_is_replaced_atomically(tmp_path, monkeypatch):
    card = tmp_path / "model_card.md"
    text = "---\nlicense: mit\n---\n# ClipCap\n" + MARKERS
    card.write_text(text)
    result = EvaluationResult(scores={"CIDEr": 0.5}, predictions={1: "a dog"}, references={1: ["a dog"]})

    def disk_full(descriptor):  # where a full disk surfaces: the new text flushed to it
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(os, "fsync", disk_full)
        with pytest.raises(OSError, match="No space left on device"):
            fill_model_card(card, result, "toy", "coco", None)
    assert card.read_text() == text and os.listdir(tmp_path) == ["model_card.md"]  # whole, no temporary file left
    fill_model_card(card, result, "toy", "coco", None)
    assert "| overall | 50.00 |" in card.read_text() and os.listdir(tmp_path) == ["model_card.md"]


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits and symbolic links")
def test_the_model_card_keeps_its_permissions_and_a_link_to_it_stays_a_link(tmp_path):
    result = EvaluationResult(scores={"CIDEr": 0.5}, predictions={1: "a dog"}, references={1: ["a dog"]})
    text = "---\nlicense: mit\n---\n# ClipCap\n" + MARKERS
    # Neither the mode a new file gets under the usual umask (0644) nor a temporary file's (0600).
    card = tmp_path / "model_card.md"
    card.write_text(text)
    card.chmod(0o640)
    fill_model_card(card, result, "toy", "coco", None)
    assert "| overall | 50.00 |" in card.read_text()
    assert stat.S_IMODE(card.stat().st_mode) == 0o640

    # A card that is a link (into a repository checked out elsewhere): the file it points to is filled.
    target = tmp_path / "repo" / "README.md"
    target.parent.mkdir()
    target.write_text(text)
    target.chmod(0o664)
    link = tmp_path / "linked" / "model_card.md"
    link.parent.mkdir()
    link.symlink_to(Path("..") / "repo" / "README.md")
    fill_model_card(link, result, "toy", "coco", None)
    assert link.is_symlink() and os.readlink(link) == str(Path("..") / "repo" / "README.md")
    assert "| overall | 50.00 |" in target.read_text()
    assert stat.S_IMODE(target.stat().st_mode) == 0o664
    assert sorted(os.listdir(target.parent)) == ["README.md"] and os.listdir(link.parent) == ["model_card.md"]
    # The model is named after the card's real folder, as before.
    assert yaml.safe_load(target.read_text().split("---")[1])["model-index"][0]["name"] == "repo"


def test_scores_of_part_of_the_split_are_not_written_into_a_model_card(coco_files, tmp_path, capsys):
    card = tmp_path / "card.md"
    text = "---\nlicense: mit\n---\n# m\n<!-- clipcap-results-start -->\n<!-- clipcap-results-end -->\n"
    card.write_text(text)
    partial = write_first_references(tmp_path / "partial.json", image_ids=(1, 2))
    assert main(rescore_argv(coco_files, partial, tmp_path / "a", "--model-card", str(card), *FAST_METRICS)) == 2
    assert re.search(r"partial.json has captions for 2 of the 4 images of the split, and --model-card records "
                     r"scores of the whole split", capsys.readouterr().err)
    full = write_first_references(tmp_path / "full.json")
    assert main(rescore_argv(coco_files, full, tmp_path / "b", "--model-card", str(card), "--limit", "2",
                             *FAST_METRICS)) == 2
    assert "--model-card records scores of the whole split, and --limit scores only part of it" in (
        capsys.readouterr().err
    )
    assert card.read_text() == text and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_image_ids_that_mix_integers_and_strings_are_refused_naming_the_first_that_differs(
    coco_files, tmp_path, capsys
):
    annotations, _ = coco_files
    data = json.loads(annotations.read_text())
    data["images"][2]["id"] = "3"  # a string among integers, as its annotation refers to it
    data["annotations"] = [{**a, "image_id": "3"} if a["image_id"] == 3 else a for a in data["annotations"]]
    annotations.write_text(json.dumps(data))
    predictions = write_first_references(tmp_path / "predictions.json")
    assert main(rescore_argv(coco_files, predictions, tmp_path / "eval", *FAST_METRICS)) == 2
    assert capsys.readouterr().err == (
        f"clipcap evaluate: error: {annotations}: images[2] has the id '3' (a string), but images[0] has the id 1 (an "
        "integer): the ids in `images` (and the `image_id` of each annotation) must be all integers or all strings.\n"
    )


def test_predictions_for_unknown_images_are_reported(coco_files, tmp_path, capsys):
    annotations, image_root = coco_files
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps([{"image_id": 99, "caption": "A dog."}]))
    argv = ["evaluate", "--predictions", str(predictions), "--data", str(annotations), "--data-format", "coco",
            "--image-root", str(image_root), "--output-dir", str(tmp_path / "eval"), *FAST_METRICS]
    assert main(argv) == 2
    assert "99" in capsys.readouterr().err


@pytest.mark.parametrize("limit", [[], ["--limit", "9"]])
def test_captions_of_images_outside_the_split_are_left_out_with_a_warning_naming_them(coco_files, tmp_path, limit):
    # With or without --limit (which here keeps every image), the split's images are scored and the others named.
    predictions = tmp_path / "predictions.json"
    entries = [{"image_id": i, "caption": CAPTIONS[i][0]} for i in CAPTIONS]
    predictions.write_text(json.dumps(entries + [{"image_id": 99, "caption": "A bird."}]))
    with pytest.warns(UserWarning, match=r"predictions\.json has captions of images that are not in .*captions\.json, "
                                         r"which are not scored: 1 of its 5 \(image ids: 99\)"):
        assert main(rescore_argv(coco_files, predictions, tmp_path / "eval", "--metrics", "bleu", *limit)) == 0
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["num_images"] == 4 and written["scores"]["Bleu_1"] == pytest.approx(1.0)


def test_a_scoring_failure_keeps_the_new_captions_and_no_stale_metrics(
    saved_model_dir, coco_files, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "eval"
    out.mkdir()
    for name, text in [("predictions.json", "[]"), ("metrics.json", "{}"), ("metrics.md", "old")]:  # an earlier run
        (out / name).write_text(text)
    fake = tmp_path / "bin"  # a `java` that fails, as a broken Java installation does
    fake.mkdir()
    (fake / "java").write_text('#!/bin/sh\necho "Error: broken JVM" >&2\nexit 1\n')
    (fake / "java").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    annotations, image_root = coco_files
    assert main(["evaluate", "--model", str(saved_model_dir), "--data", str(annotations), "--data-format", "coco",
                 "--image-root", str(image_root), "--output-dir", str(out), "--max-new-tokens", "3",
                 *FAST_METRICS]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last_line = err.splitlines()[-1]
    assert last_line.startswith("clipcap evaluate: error: The PTB tokenizer (`java -cp ")
    assert last_line.endswith("failed with exit status 1 and returned 1 lines for 11 captions: Error: broken JVM")
    assert [p["image_id"] for p in json.loads((out / "predictions.json").read_text())] == [1, 2, 3, 4]
    assert sorted(os.listdir(out)) == ["predictions.json"]


def test_unreadable_images_are_listed_and_nothing_is_scored(saved_model_dir, coco_files, tmp_path, capsys):
    annotations, image_root = coco_files
    (image_root / "3.png").write_bytes(b"not a png")
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text("{}")  # an earlier run's
    gallery = out / "gallery.html"
    assert main(["evaluate", "--model", str(saved_model_dir), "--data", str(annotations), "--data-format", "coco",
                 "--image-root", str(image_root), "--output-dir", str(out), "--max-new-tokens", "3",
                 "--batch-size", "2", "--gallery", str(gallery), *FAST_METRICS]) == 2
    err = capsys.readouterr().err
    assert err.endswith(
        f"clipcap evaluate: error: 1 of 4 images could not be read:\n  Cannot read image {image_root / '3.png'}: "
        f"cannot identify image file '{image_root / '3.png'}'\nNothing was scored, since scores over part of a "
        "split are not comparable with published ones. The captions of the other images are in "
        f"{out / 'predictions.json'}.\n"
    )
    predictions = json.loads((out / "predictions.json").read_text())
    assert [p["image_id"] for p in predictions] == [1, 2, 4]  # the images after the unreadable one too
    assert sorted(os.listdir(out)) == ["gallery.html", "predictions.json"]
    page = gallery.read_text()
    assert page.count('class="unreadable"') == 1 and html.escape(f"Cannot read image {image_root / '3.png'}") in page
    assert all(html.escape(p["caption"]) in page for p in predictions)


def test_generate_captions_names_every_unreadable_file(mlp_model, processor, tmp_path):
    paths = []
    for index, image in enumerate(random_images(3)):
        image.save(tmp_path / f"{index}.png")
        paths.append(tmp_path / f"{index}.png")
    paths[0].write_bytes(b"")
    paths.append(tmp_path / "missing.png")
    with pytest.raises(UnreadableImagesError) as error:
        generate_captions(mlp_model, processor, paths, batch_size=2, max_new_tokens=2)
    assert error.value.errors == [
        f"Cannot read image {paths[0]}: cannot identify image file '{paths[0]}'",
        f"Cannot read image {paths[3]}: [Errno 2] No such file or directory: '{paths[3]}'",
    ]
    assert str(error.value).startswith("2 of 4 images could not be read:\n  Cannot read image ")


def test_a_file_the_processor_refuses_is_named_as_unreadable_and_the_others_are_captioned(
    mlp_model, processor, tmp_path
):
    import numpy as np
    import PIL.Image

    good, refused = tmp_path / "good.png", tmp_path / "float255.tif"
    random_images(1)[0].save(good)
    # A float image of [0, 255] values: PIL opens it, the processor refuses it (floats must be in [0, 1]).
    PIL.Image.fromarray(np.full((8, 8), 200.0, dtype=np.float32), mode="F").save(refused)
    (results,) = iter_captions(mlp_model, processor, [good, refused], max_new_tokens=2)
    assert results[0].caption == generate_captions(mlp_model, processor, [good], max_new_tokens=2)[0]
    assert results[1].caption is None
    assert results[1].error.startswith(f"Cannot read image {refused}: Float image arrays must hold values in [0, 1]")


def test_generate_captions_gives_one_caption_per_image_whatever_the_generation_config(
    tokenizer, processor, tmp_path, monkeypatch
):
    model = tiny_model(tokenizer)
    paths = []
    for index, image in enumerate(random_images(3)):
        image.save(tmp_path / f"{index}.png")
        paths.append(tmp_path / f"{index}.png")
    expected = generate_captions(model, processor, paths, num_beams=2, max_new_tokens=4)
    model.generation_config.num_beams = 2
    model.generation_config.num_return_sequences = 2  # generate() alone gives two captions per image
    generated_rows = []
    generate = model.generate

    def recording_generate(**kwargs):
        sequences = generate(**kwargs)
        generated_rows.append(sequences.shape[0])
        return sequences

    monkeypatch.setattr(model, "generate", recording_generate)
    assert generate_captions(model, processor, paths, max_new_tokens=4) == expected
    assert generated_rows == [3]  # no caption decoded only to be dropped


@pytest.mark.skipif(not onednn_linear_available(), reason="needs PyTorch with oneDNN on x86-64")
def test_captioning_in_batches_packs_each_weight_once_and_gives_the_captions_of_plain_kernels(
    tokenizer, processor, tmp_path, monkeypatch
):
    monkeypatch.setenv(onednn.CPU_LINEAR_ENV, "onednn")
    model = distinct_captioning_model(tokenizer)
    images = random_images(5)
    paths = []
    for index, image in enumerate(images):
        image.save(tmp_path / f"{index}.png")
        paths.append(tmp_path / f"{index}.png")
    with torch.no_grad(), onednn.cpu_linear_kernels(model, prepack=True):
        _, one_batch = packs_run(lambda: model.generate(**processor(images=images[:2]), max_new_tokens=2))

    # 5 images in batches of 2: 3 generate calls.
    captions, packs = packs_run(lambda: generate_captions(model, processor, paths, batch_size=2, max_new_tokens=4))
    assert packs == one_batch > 0  # once per run, not per batch
    assert all("forward" not in vars(module) for module in model.modules())  # the block ended with the batches
    with mkldnn_disabled():
        assert generate_captions(model, processor, paths, batch_size=2, max_new_tokens=4) == captions
    assert len(set(captions)) > 1  # captions that tell a reordering apart


@pytest.mark.skipif(not onednn_linear_available(), reason="needs PyTorch with oneDNN on x86-64")
def test_a_caption_generator_holds_its_block_between_batches_and_ends_it_when_closed(
    mlp_model, processor, tmp_path, monkeypatch
):
    monkeypatch.setenv(onednn.CPU_LINEAR_ENV, "onednn")
    paths = []
    for index, image in enumerate(random_images(3)):
        image.save(tmp_path / f"{index}.png")
        paths.append(tmp_path / f"{index}.png")
    batches = iter_captions(mlp_model, processor, paths, batch_size=1, max_new_tokens=2)
    next(batches)
    routed = [module for module in mlp_model.modules() if "forward" in vars(module)]
    assert any(isinstance(module, torch.nn.Linear) for module in routed)  # held while the consumer works
    assert reuses_freed_memory() == on_glibc()  # the next batch reuses the memory this one freed
    batches.close()  # a consumer stopping early
    assert all("forward" not in vars(module) for module in mlp_model.modules())
    assert not reuses_freed_memory()


def test_rescoring_into_its_own_folder_leaves_the_predictions_file_as_it_is(coco_files, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    predictions = out / "predictions.json"
    predictions.write_text(json.dumps([{"image_id": i, "caption": c[0], "score": 0.5} for i, c in CAPTIONS.items()]))
    before = predictions.read_bytes()
    assert main(rescore_argv(coco_files, predictions, out, "--limit", "2", *FAST_METRICS)) == 0
    assert predictions.read_bytes() == before  # neither cut to the 2 images scored nor stripped of "score"
    assert json.loads((out / "metrics.json").read_text())["num_images"] == 2
    assert sorted(os.listdir(out)) == ["metrics.json", "metrics.md", "predictions.json"]


def test_outputs_are_replaced_atomically(tmp_path, monkeypatch):
    result = EvaluationResult(scores={"CIDEr": 0.5}, predictions={1: "a dog"}, references={1: ["a dog"]})
    paths = write_evaluation(result, tmp_path)
    before = {path: path.read_bytes() for path in paths.values()}

    def disk_full(descriptor):  # where a full disk surfaces: the new text flushed to it
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        write_evaluation(result, tmp_path, with_predictions=False)
    assert {path: path.read_bytes() for path in paths.values()} == before  # whole, and no temporary file left
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "metrics.md", "predictions.json"]
    # New predictions first remove the metrics of the old ones: if they cannot be written, the old ones stay alone.
    with pytest.raises(OSError, match="No space left on device"):
        write_evaluation(result, tmp_path)
    assert os.listdir(tmp_path) == ["predictions.json"]
    assert (tmp_path / "predictions.json").read_bytes() == before[paths["predictions"]]


def test_a_run_where_no_metric_can_run_fails_and_changes_nothing(coco_files, tmp_path, monkeypatch, capsys):
    card = tmp_path / "model_card.md"
    card.write_text("---\nlicense: mit\n---\n# ClipCap\n<!-- clipcap-results-start -->\n<!-- clipcap-results-end -->\n")
    out = tmp_path / "eval"
    predictions = write_first_references(tmp_path / "predictions.json")
    assert main(rescore_argv(coco_files, predictions, out, "--model-card", str(card), *FAST_METRICS)) == 0
    before = {path: path.read_bytes() for path in [card, out / "metrics.json", out / "metrics.md"]}
    capsys.readouterr()

    monkeypatch.setattr(metrics, "_spice_problem", lambda: "SPICE is skipped: its models are missing.")
    with pytest.warns(UserWarning, match="SPICE is skipped: its models are missing."):
        status = main(rescore_argv(coco_files, predictions, out, "--model-card", str(card), "--metrics", "spice"))
    assert status == 2
    assert capsys.readouterr().err == (
        "clipcap evaluate: error: No metric could be computed: spice cannot run here (see the warnings above). "
        f"No metrics were written; {card} is left as it was.\n"
    )
    assert all(path.read_bytes() == content for path, content in before.items())


def test_metrics_json_records_the_tokenization_and_skipped_metrics(coco_files, tmp_path, monkeypatch):
    predictions = write_first_references(tmp_path / "predictions.json")
    monkeypatch.setattr(metrics, "_spice_problem", lambda: "SPICE is skipped: its models are missing.")
    with pytest.warns(UserWarning, match="SPICE is skipped"):
        assert main(rescore_argv(coco_files, predictions, tmp_path / "a", "--metrics", "bleu", "spice")) == 0
    recorded = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert (recorded["tokenization"], recorded["skipped_metrics"]) == ("ptb", ["spice"])

    monkeypatch.setenv("PATH", str(tmp_path))  # no Java
    with pytest.warns(UserWarning, match="METEOR is skipped"), pytest.warns(UserWarning, match="approximation"):
        assert main(rescore_argv(coco_files, predictions, tmp_path / "b", "--metrics", "bleu", "meteor")) == 0
    recorded = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert (recorded["tokenization"], recorded["skipped_metrics"]) == ("python-approximation", ["meteor"])


def test_a_predictions_file_for_part_of_the_split_is_scored_with_a_warning(coco_files, tmp_path, recwarn):
    predictions = write_first_references(tmp_path / "predictions.json", image_ids=[1, 3, 4])
    with pytest.warns(UserWarning, match=r"predictions\.json has captions for 3 of the 4 images evaluated: the "
                                         r"scores cover only those, so do not report them as scores of the whole"):
        assert main(rescore_argv(coco_files, predictions, tmp_path / "eval", *FAST_METRICS)) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_images"] == 3

    recwarn.clear()
    write_first_references(predictions)
    assert main(rescore_argv(coco_files, predictions, tmp_path / "eval", *FAST_METRICS)) == 0
    assert not [w for w in recwarn if "has captions for" in str(w.message)]


def test_empty_predictions_are_scored(coco_files, tmp_path):
    """A model that emits end-of-text first gives empty captions, which COCOEvalCap scores (near zero)."""
    annotations, image_root = coco_files
    predictions = tmp_path / "predictions.json"
    captions = [{"image_id": i, "caption": "" if i == 1 else c[0]} for i, c in CAPTIONS.items()]
    predictions.write_text(json.dumps(captions))
    with pytest.warns(UserWarning, match=r"^1 of 4 predictions are empty \(image ids: 1\); they are scored"):
        assert main(["evaluate", "--predictions", str(predictions), "--data", str(annotations), "--data-format",
                     "coco", "--image-root", str(image_root), "--output-dir", str(tmp_path / "eval"),
                     *FAST_METRICS]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_images"] == 4


def test_empty_predictions_are_named_once_with_domains():
    predictions = {1: "", 2: "Two cats.", 3: "A man.", 4: "A park."}
    with pytest.warns(UserWarning) as record:
        result = score_predictions(predictions, CAPTIONS, DOMAINS, metrics=["bleu", "cider"])
    assert [str(warning.message) for warning in record] == [
        "1 of 4 predictions are empty (image ids: 1); they are scored as COCOEvalCap scores them, near zero. A model "
        "that emits end-of-text first gives empty captions."
    ]
    assert sorted(result.domain_scores) == ["in-domain", "near-domain", "out-domain"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--num-beams", "0"], "argument --num-beams: must be at least 1, got 0"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
        (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["--limit", "0"], "argument --limit: must be at least 1, got 0"),
        (["--output-dir", "{tmp}/captions.json"],
         "--output-dir: .*captions.json is a file; name a folder to write the predictions and scores to"),
        (["--output-dir", "{tmp}/captions.json/eval"], "--output-dir: .*captions.json/eval cannot be created: "
                                                       ".*captions.json is a file; name a folder to write the"),
        (["--model-card", "{tmp}/missing.md"], "--model-card: .*missing.md does not exist"),
        (["--split", "val"], "--split: the coco format has no splits"),
        (["--gallery", "{tmp}"], "--gallery: .* is a folder; name the HTML file to write"),
        (["--gallery", "{tmp}/eval/metrics.json"], r"--gallery: .*/eval/metrics.json is not an \.html file name"),
        (["--model-card", "{tmp}/card.htm", "--gallery", "{tmp}/card.htm"],
         r"--gallery: (.*)/card.htm is also a file this command reads or writes \(\1/card.htm\)"),
        # --predictions scores captions already made: the captioning options would be ignored.
        (["--predictions", "{tmp}/p.json"], r"^clipcap evaluate: error: --model only applies when captioning, "
                                            r"but --predictions scores captions already made: leave it out"),
        (["--predictions", "{tmp}/p.json", "--num-beams", "1", "--max-new-tokens", "5", "--device", "cpu"],
         r"--model, --num-beams, --max-new-tokens and --device only apply when captioning, .* leave them out, or "
         r"leave out --predictions to caption"),
    ],
)
def test_arguments_are_checked_before_captioning(coco_files, tmp_path, monkeypatch, capsys, arguments, message):
    import clipcap_hf.commands.evaluate

    def no_captioning(*args, **kwargs):
        raise AssertionError("the arguments must be checked before the model is loaded")

    monkeypatch.setattr(clipcap_hf.commands.evaluate, "load_model_and_processor", no_captioning)
    (tmp_path / "card.htm").write_text("<!-- clipcap-results-start -->\n<!-- clipcap-results-end -->\n")
    annotations, image_root = coco_files
    argv = ["evaluate", "--model", "unused", "--data", str(annotations), "--data-format", "coco", "--image-root",
            str(image_root), "--output-dir", str(tmp_path / "eval"), *FAST_METRICS]
    assert main(argv + [argument.format(tmp=tmp_path) for argument in arguments]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(
    "extra, refused",
    [
        (["--batch-size", "8"], "--batch-size"),
        (["--batch_size", "8"], "--batch-size"),  # named as --help spells it
        (["--batch-size", "32"], "--batch-size"),  # given, though it is the default: refused too
        (["--num-beams", "1", "--batch-size", "4"], "--num-beams and --batch-size"),
    ],
)
def test_a_predictions_file_refuses_the_captioning_options_given(coco_files, tmp_path, capsys, extra, refused):
    # Each was ignored: the captions are already made. Those left out (at their defaults) are not refused: the
    # other tests rescore predictions without them.
    predictions = write_first_references(tmp_path / "predictions.json")
    assert main(rescore_argv(coco_files, predictions, tmp_path / "eval", *extra, *FAST_METRICS)) == 2
    verb, them = ("apply", "them") if " and " in refused else ("applies", "it")
    assert capsys.readouterr().err == (
        f"clipcap evaluate: error: {refused} only {verb} when captioning, but --predictions scores captions already "
        f"made: leave {them} out, or leave out --predictions to caption the images with --model.\n"
    )
    assert not (tmp_path / "eval").exists()


def test_limit_applies_to_a_predictions_file(coco_files, tmp_path, capsys):
    annotations, image_root = coco_files
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps([{"image_id": i, "caption": c[0]} for i, c in CAPTIONS.items()]))
    assert main(["evaluate", "--predictions", str(predictions), "--data", str(annotations), "--data-format", "coco",
                 "--image-root", str(image_root), "--output-dir", str(tmp_path / "eval"), "--limit", "2",
                 *FAST_METRICS]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_images"] == 2
    assert "Flattening the indices" not in capsys.readouterr().err  # datasets' bars for its own bookkeeping


def test_a_predictions_file_with_nothing_to_score_is_named(coco_files, tmp_path, capsys):
    predictions = tmp_path / "predictions.json"
    predictions.write_text("[]")
    assert main(rescore_argv(coco_files, predictions, tmp_path / "eval", *FAST_METRICS)) == 2
    assert capsys.readouterr().err.endswith(
        f"error: {predictions} holds no caption, so there is nothing to score; give captions of the images evaluated "
        "(image ids 1, 2, 3, 4).\n"
    )
    write_first_references(predictions, image_ids=[3, 4])  # images that --limit 2 leaves out
    assert main(rescore_argv(coco_files, predictions, tmp_path / "eval", "--limit", "2", *FAST_METRICS)) == 2
    assert capsys.readouterr().err.endswith(
        f"error: {predictions} holds no caption of the 2 images --limit keeps, so there is nothing to score; give "
        "captions of the images evaluated (image ids 1, 2).\n"
    )
    assert not (tmp_path / "eval").exists()


def test_evaluate_gallery_shows_scores_and_references(coco_files, tmp_path):
    annotations, image_root = coco_files
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps([{"image_id": i, "caption": c[0]} for i, c in CAPTIONS.items()]))
    gallery = tmp_path / "eval" / "gallery.html"  # in the --output-dir, which the command creates
    argv = ["evaluate", "--predictions", str(predictions), "--data", str(annotations), "--data-format", "coco",
            "--image-root", str(image_root), "--output-dir", str(tmp_path / "eval"), "--gallery", str(gallery),
            *FAST_METRICS]
    assert main(argv) == 0
    page = gallery.read_text()
    assert page.count("data:image/") >= 4  # every thumbnail embedded
    for captions in CAPTIONS.values():
        for caption in captions:
            assert html.escape(caption) in page
    assert "CIDEr" in page


def test_the_shipped_model_card_is_fillable(coco_files, tmp_path):
    annotations, image_root = coco_files
    card = tmp_path / "model_card.md"
    shutil.copy(Path(__file__).resolve().parents[1] / "model_card.md", card)
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps([{"image_id": i, "caption": c[0]} for i, c in CAPTIONS.items()]))
    argv = ["evaluate", "--predictions", str(predictions), "--data", str(annotations), "--data-format", "coco",
            "--image-root", str(image_root), "--output-dir", str(tmp_path / "eval"), "--model-card", str(card),
            "--dataset-name", "toy", *FAST_METRICS]
    assert main(argv) == 0
    metadata = yaml.safe_load(card.read_text().split("---")[1])
    results = metadata["model-index"][0]["results"]
    assert [r["dataset"]["name"] for r in results] == ["COCO Captions (Karpathy test split)", "toy"]
    assert results[0]["task"] == results[1]["task"]
    paper_types = {m["type"] for m in results[0]["metrics"]}
    assert paper_types <= {m["type"] for m in results[1]["metrics"]} | {"meteor", "spice"}  # not run here
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-to-text"
    assert "Not measured yet" not in card.read_text()


def test_clip_metrics_alone_check_the_image_ids_as_the_coco_metrics_do(tmp_path):
    # The checks come before any CLIP model is loaded: "unused" names none.
    paths = {1: str(tmp_path / "1.png")}
    with pytest.raises(ValueError, match=r"1 of 2 predicted images have no reference captions \(image ids: 99\)"):
        score_predictions({1: "a dog", 99: "a cat"}, CAPTIONS, metrics=["clipscore"], image_paths=paths,
                          clip_model="unused")
    with pytest.raises(ValueError, match="There are no predictions to score"):
        score_predictions({}, CAPTIONS, metrics=["clipscore"], image_paths=paths, clip_model="unused")
    with pytest.raises(ValueError, match=r"1 of 2 predicted images have no image file \(image ids: 2\). Give "
                                         r"`image_paths` for every predicted image"):
        score_predictions({1: "a dog", 2: "a cat"}, CAPTIONS, metrics=["refclipscore"], image_paths=paths,
                          clip_model="unused")


def test_predictions_of_some_nocaps_domains_score_those_domains(coco_files, tmp_path):
    in_domain = write_first_references(tmp_path / "in_domain.json", image_ids=(1, 2))
    annotations, image_root = coco_files
    assert main(["evaluate", "--predictions", str(in_domain), "--data", str(annotations), "--data-format", "nocaps",
                 "--image-root", str(image_root), "--output-dir", str(tmp_path / "eval"), *FAST_METRICS]) == 0
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert list(written["domains"]) == ["in-domain"]
    expected = compute_caption_metrics({i: CAPTIONS[i][0] for i in (1, 2)}, CAPTIONS,
                                       metrics=["bleu", "rouge", "cider"])
    assert written["domains"]["in-domain"] == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"`domains` has no domain for the predicted image ids \[4\]"):
        score_predictions({1: "a dog", 4: "a park"}, CAPTIONS, {1: "in-domain"}, metrics=["bleu"])


@pytest.mark.parametrize("domain", ["missing", None])
def test_a_nocaps_image_without_a_domain_is_refused_naming_the_file_and_the_image(coco_files, tmp_path, domain):
    annotations, image_root = coco_files
    data = json.loads(annotations.read_text())
    if domain == "missing":
        del data["images"][2]["domain"]
    else:
        data["images"][2]["domain"] = domain
    annotations.write_text(json.dumps(data))
    found = "has no 'domain' field" if domain == "missing" else "has 'domain' = None"
    with pytest.raises(ValueError) as refused:
        load_caption_dataset("nocaps", annotations, image_root)
    assert str(refused.value) == (
        f"{annotations}: images[2] {found}; every image of this format needs its domain (a string): add it, or read "
        "the file in the `coco` format, which keeps no domain.")
    assert "domain" not in load_caption_dataset("coco", annotations, image_root).column_names
    # Scored directly: a None domain is named, not sorted among the others.
    with pytest.raises(ValueError, match=r"`domains` has no domain for the predicted image ids \[4\]"):
        score_predictions({1: "a dog", 4: "a park"}, CAPTIONS, {1: "in-domain", 4: None}, metrics=["bleu"])


def test_a_coco_annotation_with_a_boolean_image_id_is_refused_naming_it(coco_files):
    annotations, image_root = coco_files
    data = json.loads(annotations.read_text())
    data["annotations"][1]["image_id"] = True  # an int to Python: image 1's
    annotations.write_text(json.dumps(data))
    with pytest.raises(ValueError) as refused:
        load_caption_dataset("coco", annotations, image_root)
    assert str(refused.value) == f"{annotations}: annotations[1] has 'image_id' = True; expected int or str."


@pytest.mark.parametrize(
    "text, line",
    [('file_name,text\n1.png,"A dog\non grass."\n2.png,A cat.\n3.png,   \n', 5),  # a caption over lines 2 and 3
     ("file_name,text\n1.png,A dog.\n\n\n2.png,A cat.\n3.png,   \n", 6)],  # blank lines 3 and 4
)
def test_metadata_csv_errors_name_the_line_of_the_row(coco_files, text, line):
    folder = coco_files[1]
    (folder / "metadata.csv").write_text(text)
    with pytest.raises(ValueError) as refused:
        load_caption_dataset("imagefolder", folder)
    assert str(refused.value) == (
        f"{folder / 'metadata.csv'}: line {line} (3.png) has an empty caption ('   '); every caption needs some text.")


def test_captioning_images_given_one_row_per_caption_names_a_repeated_image_id(coco_files):
    from clipcap_hf.evaluation.evaluate import caption_images

    annotations, image_root = coco_files
    rows = load_caption_dataset("coco", annotations, image_root=image_root)  # a row per caption, not per image
    with pytest.raises(ValueError) as error:
        caption_images(None, None, rows)  # refused before any model is used
    assert str(error.value) == (
        "image_id 1 is on several rows of `images`, which must hold one row per image: give "
        "group_by_image(dataset) (each image once, with its references)."
    )
