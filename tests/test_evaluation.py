import html
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import random_images

from clipcap_hf import ClipCapForConditionalGeneration, ClipCapProcessor
from clipcap_hf.cli import main
from clipcap_hf.metrics import compute_caption_metrics

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
    table = (out / "metrics.md").read_text()
    assert table.splitlines()[0] == "| | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L | CIDEr |"
    assert f"{100 * independent['CIDEr']:.2f}" in table.splitlines()[2]
    assert table in capsys.readouterr().out


def test_rescoring_written_predictions_gives_the_same_numbers_with_domains(saved_model_dir, coco_files, tmp_path):
    annotations, image_root = coco_files
    common = ["--data", str(annotations), "--data-format", "nocaps", "--image-root", str(image_root), *FAST_METRICS]
    assert main(["evaluate", "--model", str(saved_model_dir), "--output-dir", str(tmp_path / "a"),
                 "--max-new-tokens", "5", *common]) == 0
    assert main(["evaluate", "--predictions", str(tmp_path / "a" / "predictions.json"),
                 "--output-dir", str(tmp_path / "b"), *common]) == 0
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())
    second = json.loads((tmp_path / "b" / "metrics.json").read_text())
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
    assert main(argv) == 0  # a second run replaces the results rather than adding to them
    text = card.read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    results = metadata["model-index"][0]["results"]
    assert len(results) == 1
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
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps([{"image_id": 1, "caption": "A dog."}]))
    argv = ["evaluate", "--predictions", str(predictions), "--data", str(annotations), "--data-format", "coco",
            "--image-root", str(image_root), "--output-dir", str(tmp_path / "eval"), "--model-card", str(card),
            *FAST_METRICS]
    assert main(argv) == 2
    assert "has no results section to fill" in capsys.readouterr().err


def test_predictions_for_unknown_images_are_reported(coco_files, tmp_path, capsys):
    annotations, image_root = coco_files
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps([{"image_id": 99, "caption": "A dog."}]))
    argv = ["evaluate", "--predictions", str(predictions), "--data", str(annotations), "--data-format", "coco",
            "--image-root", str(image_root), "--output-dir", str(tmp_path / "eval"), *FAST_METRICS]
    assert main(argv) == 2
    assert "99" in capsys.readouterr().err


def test_predictions_are_written_before_scoring(saved_model_dir, coco_files, tmp_path, monkeypatch):
    import clipcap_hf.evaluation

    def failing_scorer(*args, **kwargs):
        raise RuntimeError("the PTB tokenizer failed")

    monkeypatch.setattr(clipcap_hf.evaluation, "compute_caption_metrics", failing_scorer)
    annotations, image_root = coco_files
    out = tmp_path / "eval"
    with pytest.raises(RuntimeError, match="the PTB tokenizer failed"):
        main(["evaluate", "--model", str(saved_model_dir), "--data", str(annotations), "--data-format", "coco",
              "--image-root", str(image_root), "--output-dir", str(out), "--max-new-tokens", "3", *FAST_METRICS])
    assert [p["image_id"] for p in json.loads((out / "predictions.json").read_text())] == [1, 2, 3, 4]


def test_empty_predictions_are_scored(coco_files, tmp_path):
    """A model that emits end-of-text first gives empty captions, which COCOEvalCap scores (near zero)."""
    annotations, image_root = coco_files
    predictions = tmp_path / "predictions.json"
    captions = [{"image_id": i, "caption": "" if i == 1 else c[0]} for i, c in CAPTIONS.items()]
    predictions.write_text(json.dumps(captions))
    assert main(["evaluate", "--predictions", str(predictions), "--data", str(annotations), "--data-format", "coco",
                 "--image-root", str(image_root), "--output-dir", str(tmp_path / "eval"), *FAST_METRICS]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_images"] == 4


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--num-beams", "0"], "--num-beams must be at least 1, got 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--limit", "0"], "--limit must be at least 1, got 0"),
        (["--output-dir", "{tmp}/captions.json"], "--output-dir: .*captions.json is a file, not a folder"),
        (["--model-card", "{tmp}/missing.md"], "--model-card: .*missing.md does not exist"),
        (["--split", "val"], "--split: the coco format has no splits"),
        (["--gallery", "{tmp}"], "--gallery: .* is a folder; name the HTML file to write"),
    ],
)
def test_arguments_are_checked_before_captioning(coco_files, tmp_path, monkeypatch, capsys, arguments, message):
    import clipcap_hf.cli

    def no_captioning(*args, **kwargs):
        raise AssertionError("the arguments must be checked before the model is loaded")

    monkeypatch.setattr(clipcap_hf.cli, "load_model_and_processor", no_captioning)
    annotations, image_root = coco_files
    argv = ["evaluate", "--model", "unused", "--data", str(annotations), "--data-format", "coco", "--image-root",
            str(image_root), "--output-dir", str(tmp_path / "eval"), *FAST_METRICS]
    assert main(argv + [argument.format(tmp=tmp_path) for argument in arguments]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_limit_applies_to_a_predictions_file(coco_files, tmp_path):
    annotations, image_root = coco_files
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps([{"image_id": i, "caption": c[0]} for i, c in CAPTIONS.items()]))
    assert main(["evaluate", "--predictions", str(predictions), "--data", str(annotations), "--data-format", "coco",
                 "--image-root", str(image_root), "--output-dir", str(tmp_path / "eval"), "--limit", "2",
                 *FAST_METRICS]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_images"] == 2


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
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-to-text"
    assert "Not measured yet" not in card.read_text()
