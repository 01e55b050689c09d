"""COCO caption metrics against the reference implementation's scores (offline).

Reference data: ../shared/reference/ (see its README.md). `coco_val2014_loo` holds 4,800 COCO val2014 images
with the scores pycocoevalcap 1.2 gives them; `nlgeval` holds nlg-eval's published scores for a tiny case.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pycocoevalcap", reason="the COCO caption metrics need pycocoevalcap (the `eval` extra)")

from clipcap_hf.evaluation import metrics  # noqa: E402
from clipcap_hf.evaluation.coco_metric import CocoCaptionMetric  # noqa: E402
from clipcap_hf.evaluation.metrics import (  # noqa: E402
    compute_caption_metrics,
    load_coco_predictions,
    load_coco_references,
    ptb_tokenize,
)

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
COCO_DIR = REFERENCE_DIR / "coco_val2014_loo"
NLGEVAL_DIR = REFERENCE_DIR / "nlgeval"

# nlg-eval's published scores for nlgeval/ (whitespace tokenization), from ../shared/reference/README.md.
NLGEVAL_PUBLISHED = {
    "Bleu_1": 0.55,
    "Bleu_2": 0.428174,
    "Bleu_3": 0.284043,
    "Bleu_4": 0.201143,
    "METEOR": 0.295797,
    "ROUGE_L": 0.522104,
    "CIDEr": 1.242192,
}
JAVA_FREE_KEYS = {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="PTB tokenization and METEOR need Java")
needs_coco = pytest.mark.skipif(not COCO_DIR.is_dir(), reason=f"reference data {COCO_DIR} is absent")
needs_nlgeval = pytest.mark.skipif(not NLGEVAL_DIR.is_dir(), reason=f"reference data {NLGEVAL_DIR} is absent")


@pytest.fixture(scope="module")
def coco_data() -> tuple[dict, dict]:
    if not COCO_DIR.is_dir():
        pytest.skip(f"reference data {COCO_DIR} is absent")
    return load_coco_predictions(COCO_DIR / "predictions.json"), load_coco_references(COCO_DIR / "references.json")


@pytest.fixture(scope="module")
def coco_subset(coco_data) -> tuple[dict, dict]:
    predictions, references = coco_data
    image_ids = list(predictions)[:300]
    return {i: predictions[i] for i in image_ids}, {i: references[i] for i in image_ids}


@pytest.fixture(scope="module")
def coco_scores(coco_data) -> tuple[dict, dict]:
    """The full 4,800-image run (about 25 s, mostly METEOR), shared by the tests of this module."""
    if shutil.which("java") is None:
        pytest.skip("PTB tokenization and METEOR need Java")
    predictions, references = coco_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SPICE's models are not available offline.
        return compute_caption_metrics(predictions, references, return_per_image=True)


@pytest.fixture(scope="module")
def nlgeval_data() -> tuple[list[str], list[list[str]]]:
    if not NLGEVAL_DIR.is_dir():
        pytest.skip(f"reference data {NLGEVAL_DIR} is absent")
    hypotheses = (NLGEVAL_DIR / "hyp.txt").read_text(encoding="utf-8").splitlines()
    first, second = (
        (NLGEVAL_DIR / name).read_text(encoding="utf-8").splitlines() for name in ("ref1.txt", "ref2.txt")
    )
    return hypotheses, [list(refs) for refs in zip(first, second, strict=True)]


@pytest.fixture(scope="module")
def nlgeval_scores(nlgeval_data) -> dict[str, float]:
    if shutil.which("java") is None:
        pytest.skip("METEOR needs Java")
    hypotheses, references = nlgeval_data
    return compute_caption_metrics(
        dict(enumerate(hypotheses)),
        dict(enumerate(references)),
        metrics=["bleu", "meteor", "rouge", "cider"],
        tokenize=False,
    )


@pytest.fixture
def no_java(monkeypatch, tmp_path):
    """A PATH without Java (an empty folder), as on a machine without a Java runtime."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("java") is None


def _write(path: Path, content: object) -> Path:
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


# --- Equality with the reference tools ---------------------------------------------------------------------


@needs_coco
def test_coco_scores_equal_pycocoevalcap(coco_scores):
    expected = json.loads((COCO_DIR / "expected_scores.json").read_text(encoding="utf-8"))["scores"]
    scores, _ = coco_scores
    assert expected, "expected_scores.json lists no scores"
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value, abs=5e-5), key


@needs_coco
def test_coco_per_image_scores(coco_data, coco_scores):
    predictions, references = coco_data
    scores, per_image = coco_scores
    assert list(per_image) == list(predictions)
    assert all(set(image_scores) == set(scores) for image_scores in per_image.values())
    # COCO's ROUGE_L and CIDEr are means over images (BLEU is corpus-level and METEOR aggregates its statistics).
    for key in ("ROUGE_L", "CIDEr"):
        mean = sum(image_scores[key] for image_scores in per_image.values()) / len(per_image)
        assert mean == pytest.approx(scores[key], rel=1e-9), key

    # Each image's score belongs to that image: recompute ROUGE_L of a few with the reference scorer alone.
    from pycocoevalcap.rouge.rouge import Rouge

    for image_id in list(predictions)[::1000]:
        tokenized = ptb_tokenize([predictions[image_id], *references[image_id]])
        expected = Rouge().calc_score(tokenized[:1], tokenized[1:])
        assert per_image[image_id]["ROUGE_L"] == pytest.approx(expected, abs=1e-12)


@needs_coco
@needs_java
def test_ptb_tokenize_equals_pycocoevalcap_tokenizer(coco_data):
    from pycocoevalcap.tokenizer import ptbtokenizer

    if not os.access(Path(ptbtokenizer.__file__).parent, os.W_OK):
        pytest.skip("pycocoevalcap's own PTBTokenizer writes into its package folder, which is read-only here")
    predictions, references = coco_data
    captions = {image_id: [{"caption": caption} for caption in references[image_id]] for image_id in predictions}
    expected = ptbtokenizer.PTBTokenizer().tokenize(captions)
    flat = [caption for image_id in predictions for caption in references[image_id]]
    tokenized = iter(ptb_tokenize(flat))
    assert {image_id: [next(tokenized) for _ in references[image_id]] for image_id in predictions} == expected


@needs_java
def test_ptb_tokenize_keeps_each_caption_on_its_line(monkeypatch):
    # Java ends lines at \r, U+2028 and form feeds too; each caption must still map to its own output.
    captions = ["A dog\rruns.", "Two CATS\u2028sleep, (together)!", "A man's\fhat\n", "Ok."]
    assert ptb_tokenize(captions) == ["a dog runs", "two cats sleep -lrb- together -rrb-", "a man 's hat", "ok"]

    # No temporary file is needed (pycocoevalcap's wrapper writes one next to the jar, in site-packages).
    def no_temp_files(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr("tempfile.NamedTemporaryFile", no_temp_files)
    assert ptb_tokenize(["A dog."]) == ["a dog"]


def test_failing_ptb_tokenizer_is_a_one_line_os_error(monkeypatch, tmp_path):
    # A `java` that fails as a broken JVM does, with a stack frame that the message leaves out.
    java = tmp_path / "java"
    java.write_text('#!/bin/sh\necho "Exception in thread main: broken JVM" >&2\necho "\tat Main.run" >&2\nexit 1\n')
    java.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(OSError) as error:
        ptb_tokenize(["A dog.", "A cat."])
    assert str(error.value).endswith(
        "failed with exit status 1 and returned 1 lines for 2 captions: Exception in thread main: broken JVM"
    )
    assert "\n" not in str(error.value)


@needs_nlgeval
def test_nlgeval_published_scores_without_tokenization(nlgeval_scores):
    assert set(nlgeval_scores) == set(NLGEVAL_PUBLISHED)
    for key, value in NLGEVAL_PUBLISHED.items():
        assert nlgeval_scores[key] == pytest.approx(value, abs=1e-6), key


# --- The `evaluate` metric ---------------------------------------------------------------------------------


@needs_nlgeval
def test_evaluate_metric_equals_function(nlgeval_data, nlgeval_scores, tmp_path):
    hypotheses, references = nlgeval_data
    metric = CocoCaptionMetric(cache_dir=str(tmp_path))
    # METEOR is left out to save its 8 s start-up; the metric forwards `metrics` like any other option.
    scores = metric.compute(
        predictions=hypotheses, references=references, metrics=["bleu", "rouge", "cider"], tokenize=False
    )
    assert scores == {key: value for key, value in nlgeval_scores.items() if key != "METEOR"}


@needs_coco
@needs_java
def test_evaluate_metric_batches_and_tokenization(coco_subset, tmp_path):
    predictions, references = coco_subset
    java_free = ["bleu", "rouge", "cider"]
    expected = compute_caption_metrics(predictions, references, metrics=java_free)

    metric = CocoCaptionMetric(cache_dir=str(tmp_path))
    image_ids = list(predictions)
    for batch in (image_ids[:100], image_ids[100:]):
        metric.add_batch(predictions=[predictions[i] for i in batch], references=[references[i] for i in batch])
    assert metric.compute(metrics=java_free) == expected

    # A single reference per image may be given as a plain string.
    single = {i: references[i][:1] for i in image_ids}
    scores = CocoCaptionMetric(keep_in_memory=True).compute(
        predictions=list(predictions.values()), references=[single[i][0] for i in image_ids], metrics=java_free
    )
    assert scores == compute_caption_metrics(predictions, single, metrics=java_free)


def test_evaluate_metric_scores_captions_generated_by_seq2seq_trainer(tmp_path, tokenizer, processor):
    """The README's recipe: Seq2SeqTrainer(predict_with_generate=True) with the metric in `compute_metrics`."""
    import datasets
    import numpy as np
    import torch
    from conftest import tiny_model
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    model = tiny_model(tokenizer)
    captions = ["A dog runs on the beach.", "Two cats sleep!", "A man rides a bicycle.", "People walk."]
    image_embeds = torch.randn(len(captions), model.config.prefix_dim, generator=torch.Generator().manual_seed(0))
    labels = processor(captions=captions)["labels"]  # -100 on padding
    # Evaluation batches hold the image and the labels only, so that `generate` captions from the image alone.
    rows = datasets.Dataset.from_dict({"image_embeds": image_embeds.tolist(), "labels": labels.tolist()})
    metric = CocoCaptionMetric(keep_in_memory=True)

    def decode(token_ids: np.ndarray) -> list[str]:
        token_ids = np.where(token_ids == -100, tokenizer.eos_token_id, token_ids)  # label and batch padding
        return [text.strip() for text in processor.batch_decode(token_ids, skip_special_tokens=True)]

    def compute_metrics(prediction) -> dict:
        references = [[reference] for reference in decode(prediction.label_ids)]
        return metric.compute(predictions=decode(prediction.predictions), references=references,
                              metrics=["bleu", "cider"], tokenize=False)

    trainer = Seq2SeqTrainer(
        model=model,
        args=Seq2SeqTrainingArguments(output_dir=str(tmp_path), predict_with_generate=True, report_to=[],
                                      per_device_eval_batch_size=2, remove_unused_columns=False, use_cpu=True),
        eval_dataset=rows,
        processing_class=processor.tokenizer,  # pads the generated captions of different lengths
        data_collator=lambda batch: {key: torch.tensor([row[key] for row in batch]) for key in batch[0]},
        compute_metrics=compute_metrics,
    )
    scores = trainer.evaluate(max_new_tokens=6)

    generated = decode(model.generate(image_embeds=image_embeds, max_new_tokens=6).numpy())
    expected = compute_caption_metrics(dict(enumerate(generated)), {i: [c] for i, c in enumerate(captions)},
                                       metrics=["bleu", "cider"], tokenize=False)
    assert {key.removeprefix("eval_"): value for key, value in scores.items() if key[5:] in expected} == expected
    with torch.no_grad():  # the loss, from the labels alone, is the model's on the processor's inputs
        losses = [model(image_embeds=image_embeds[i : i + 2], **processor(captions=captions[i : i + 2])).loss
                  for i in (0, 2)]
    assert scores["eval_loss"] == pytest.approx(float(sum(losses) / 2), rel=1e-5)


def test_evaluate_metric_without_predictions_says_so():
    with pytest.raises(ValueError, match=r"^There are no predictions to score: `predictions` is an empty list\.$"):
        CocoCaptionMetric(keep_in_memory=True).compute(predictions=[], references=[])


# --- Missing pieces ----------------------------------------------------------------------------------------


@needs_coco
@needs_java
def test_without_java_meteor_is_skipped_and_tokenization_approximated(coco_subset, monkeypatch, tmp_path):
    predictions, references = coco_subset
    with_java = compute_caption_metrics(predictions, references, metrics=["bleu", "rouge", "cider"])

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.warns(UserWarning) as record:
        scores = compute_caption_metrics(predictions, references)
    messages = " ".join(str(warning.message) for warning in record)
    assert "METEOR is skipped" in messages and "SPICE is skipped" in messages
    assert "approximation of the PTB tokenizer" in messages and "Java" in messages
    assert set(scores) == JAVA_FREE_KEYS
    # The Python tokenization is close to PTB on COCO captions, not identical.
    for key in JAVA_FREE_KEYS:
        assert scores[key] == pytest.approx(with_java[key], abs=2e-3), key

    with pytest.raises(FileNotFoundError, match="needs Java"):
        ptb_tokenize(["A dog."])


def test_without_java_whitespace_tokenization_is_unaffected(no_java):
    predictions = {1: "a dog runs on grass", 2: "a cat sleeps"}
    references = {1: ["a dog running on the grass", "a dog on the grass"], 2: ["a cat is sleeping", "the cat sleeps"]}
    with pytest.warns(UserWarning, match="METEOR is skipped") as record:
        scores = compute_caption_metrics(predictions, references, metrics=["bleu", "meteor", "cider"], tokenize=False)
    assert len(record) == 1, [str(warning.message) for warning in record]
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"}
    # 4 of 5 and 3 of 3 words found in the references, whose closest lengths (5, 3) give no brevity penalty.
    assert scores["Bleu_1"] == pytest.approx(7 / 8)


def test_missing_spice_models_warn_and_other_metrics_run(monkeypatch):
    from pycocoevalcap.spice import get_stanford_models

    monkeypatch.setattr(get_stanford_models, "SPICELIB", "no-such-folder")
    monkeypatch.setattr(metrics, "_java_available", lambda: True)  # so that the models are what is missing
    predictions = {"a": "a dog runs"}
    references = {"a": ["a dog running", "dog runs"]}
    with pytest.warns(UserWarning, match=r"SPICE is skipped.*stanford-corenlp-3\.6\.0.*get_stanford_models"):
        scores, per_image = compute_caption_metrics(
            predictions, references, metrics=["rouge", "spice"], tokenize=False, return_per_image=True
        )
    assert set(scores) == {"ROUGE_L"} and set(per_image["a"]) == {"ROUGE_L"}


def test_spice_scores_are_mapped_to_their_images(monkeypatch):
    from pycocoevalcap.spice import spice

    class FakeSpice:
        """Answers like spice-1.0.jar would: images in sorted id order; here F-score = number of words."""

        def compute_score(self, references, predictions):
            return 0.5, [{"All": {"f": len(predictions[i][0].split())}} for i in sorted(references)]

    monkeypatch.setattr(metrics, "_spice_problem", lambda: None)  # SPICE's models are not available offline.
    monkeypatch.setattr(spice, "Spice", FakeSpice)
    predictions = {3: "one two three", 1: "one", 2: "one two"}
    references = {1: ["one"], 2: ["one"], 3: ["one"]}
    scores, per_image = compute_caption_metrics(
        predictions, references, metrics=["spice"], tokenize=False, return_per_image=True
    )
    assert scores == {"SPICE": 0.5}
    assert per_image == {3: {"SPICE": 3.0}, 1: {"SPICE": 1.0}, 2: {"SPICE": 2.0}}


def test_failing_spice_warns_and_other_metrics_run(monkeypatch):
    from pycocoevalcap.spice import spice

    class FailingSpice:
        def compute_score(self, references, predictions):
            raise subprocess.CalledProcessError(1, ["java", "-jar", "-Xmx8G", "spice-1.0.jar"])

    monkeypatch.setattr(metrics, "_spice_problem", lambda: None)
    monkeypatch.setattr(spice, "Spice", FailingSpice)
    with pytest.warns(UserWarning, match=r"spice-1\.0\.jar failed with exit status 1.*Java 8 or 11"):
        scores = compute_caption_metrics({1: "a dog"}, {1: ["a dog"]}, metrics=["cider", "spice"], tokenize=False)
    assert set(scores) == {"CIDEr"}


def test_missing_pycocoevalcap_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    with pytest.raises(ImportError, match=r"pycocoevalcap.*pip install"):
        compute_caption_metrics({1: "a dog"}, {1: ["a dog"]}, metrics=["bleu"], tokenize=False)


def test_metrics_benchmark_runs_without_java(tmp_path):
    references = [(1, "A dog runs."), (1, "A dog."), (2, "Two cats sleep.")]
    _write(tmp_path / "references.json", {"annotations": [{"image_id": i, "caption": c} for i, c in references]})
    _write(tmp_path / "predictions.json", [{"image_id": i, "caption": c} for i, c in [(1, "A dog."), (2, "Cats.")]])
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_metrics.py"
    env = {**os.environ, "PATH": str(tmp_path)}  # no java on it
    process = subprocess.run([sys.executable, str(bench), "--data-dir", str(tmp_path)], capture_output=True,
                             text=True, env=env, timeout=120)
    assert process.returncode == 0, process.stderr
    result = json.loads(process.stdout)
    assert result["java"] is None and result["tokenization"] == "python-approximation"
    assert result["skipped"] == ["meteor", "spice"]
    assert set(result["seconds"]) == {"tokenize", "bleu", "rouge", "cider"}
    assert set(result["scores"]) == JAVA_FREE_KEYS


# --- Bad input ---------------------------------------------------------------------------------------------


def test_predictions_without_references_are_named():
    predictions = {1: "a dog", 7: "a cat", 9: "a bird"}
    with pytest.raises(ValueError, match=r"2 of 3 predicted images have no reference captions.*7, 9"):
        compute_caption_metrics(predictions, {1: ["a dog"], 9: []}, metrics=["bleu"])


@needs_java
def test_empty_predictions_are_scored_as_pycocoevalcap_scores_them():
    """A model that emits end-of-text first captions an image with ""; COCOEvalCap scores it (near zero)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    predictions = {1: "", 2: "Two cats on a sofa!", 3: "   ", 4: "a red car"}
    references = {1: ["A dog runs on the beach.", "a dog on sand"], 2: ["two cats sleep on a sofa", "cats sleeping"],
                  3: ["a bird"], 4: ["a red car parked", "a car"]}
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": ref} for ref in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{"caption": caption}] for i, caption in predictions.items()})
    expected = dict(zip(("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"), Bleu(4).compute_score(gts, res, verbose=0)[0]))
    for key, scorer in [("METEOR", Meteor), ("ROUGE_L", Rouge), ("CIDEr", Cider)]:
        expected[key] = scorer().compute_score(gts, res)[0]
    with pytest.warns(UserWarning, match=r"^2 of 4 predictions are empty \(image ids: 1, 3\); they are scored"):
        scores = compute_caption_metrics(predictions, references, metrics=["bleu", "meteor", "rouge", "cider"])
    assert scores == pytest.approx(expected, abs=1e-12)


def test_lone_surrogates_are_named(tmp_path):
    # "\udc9f" is valid JSON and a valid Python string, but cannot be encoded for the Java tools.
    path = _write(tmp_path / "preds.json", [{"image_id": 1, "caption": "a"}, {"image_id": 7, "caption": "a \udc9f"}])
    with pytest.raises(ValueError, match=r"^.*preds\.json: the caption of entry 1 \(image id 7\) holds the lone "
                                         r"surrogate '\\udc9f' at position 2 "):
        load_coco_predictions(path)
    with pytest.raises(ValueError, match=r"^The prediction for image id 7 holds the lone surrogate '\\udc9f'"):
        compute_caption_metrics({7: "a \udc9f"}, {7: ["a dog"]}, metrics=["bleu"], tokenize=False)
    with pytest.raises(ValueError, match=r"^A reference caption of image id 7 holds the lone surrogate '\\ud83d'"):
        compute_caption_metrics({7: "a dog"}, {7: ["a dog", "\ud83d"]}, metrics=["bleu"], tokenize=False)


def test_non_string_captions_are_rejected():
    with pytest.raises(TypeError, match="image id 3 must be a string"):
        compute_caption_metrics({3: ["a dog"]}, {3: ["a dog"]}, metrics=["bleu"])
    with pytest.raises(TypeError, match="references for image id 3 must be a list of strings"):
        compute_caption_metrics({3: "a dog"}, {3: "a dog"}, metrics=["bleu"])


def test_captions_given_as_lists_are_refused_and_numpy_references_scored():
    # A list of predictions was read as image ids ("1 of 1 predicted images have no reference captions (image ids:
    # 'a dog')"), a list of references failed on `.get`, and a numpy array of references had no truth value.
    for predictions, references, name in ((["a dog"], {0: ["a dog"]}, "predictions"),
                                          ({0: "a dog"}, [["a dog"]], "references")):
        with pytest.raises(TypeError) as error:
            compute_caption_metrics(predictions, references, metrics=["bleu"], tokenize=False)
        kind = "caption" if name == "predictions" else "captions"
        assert str(error.value) == (
            f"`{name}` must be a mapping from image id to {kind}, got a list; for lists of captions in order, use "
            "CocoCaptionMetric().compute."
        )
    references = {0: ["a dog on the grass", "a dog runs"], 1: ["two cats", "cats sleeping"]}
    predictions = {0: "a dog runs on the grass", 1: "two cats sleeping"}
    as_arrays = {image_id: np.array(captions) for image_id, captions in references.items()}
    assert compute_caption_metrics(predictions, as_arrays, metrics=["bleu", "cider"], tokenize=False) == (
        compute_caption_metrics(predictions, references, metrics=["bleu", "cider"], tokenize=False)
    )


def test_unknown_metric_and_no_predictions():
    with pytest.raises(ValueError, match=r"Unknown caption metric\(s\) \['bleu4'\]"):
        compute_caption_metrics({1: "a dog"}, {1: ["a dog"]}, metrics=["bleu4"])
    with pytest.raises(ValueError, match="no predictions"):
        compute_caption_metrics({}, {1: ["a dog"]})


def test_load_coco_files(tmp_path):
    references = _write(
        tmp_path / "refs.json",
        {
            "images": [{"id": 1}, {"id": 2}],
            "annotations": [
                {"image_id": 1, "id": 10, "caption": "A dog."},
                {"image_id": 2, "id": 11, "caption": "A café."},
                {"image_id": 1, "id": 12, "caption": "A puppy."},
            ],
        },
    )
    predictions = _write(tmp_path / "preds.json", [{"image_id": 2, "caption": "A cat.", "score": 0.5}])
    assert load_coco_references(references) == {1: ["A dog.", "A puppy."], 2: ["A café."]}
    assert load_coco_predictions(predictions) == {2: "A cat."}


def test_duplicate_prediction_ids_are_named(tmp_path):
    path = _write(
        tmp_path / "preds.json",
        [{"image_id": 5, "caption": "a"}, {"image_id": 6, "caption": "b"}, {"image_id": 5, "caption": "c"}],
    )
    with pytest.raises(ValueError, match=r"preds\.json has more than one caption for 1 image id\(s\): 5\b"):
        load_coco_predictions(path)


@pytest.mark.parametrize("loader", [load_coco_references, load_coco_predictions])
def test_non_utf8_file_is_named(loader, tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"image_id": 1, "caption": "un café"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.json is not valid UTF-8 .*must be UTF-8 encoded"):
        loader(path)


def test_wrong_file_formats_are_named(tmp_path):
    results = _write(tmp_path / "results.json", [{"image_id": 1, "caption": "a dog"}])
    with pytest.raises(ValueError, match=r"results\.json is not in the COCO annotation format"):
        load_coco_references(results)
    annotations = _write(tmp_path / "annotations.json", {"annotations": [{"image_id": 1, "caption": "a dog"}]})
    with pytest.raises(ValueError, match=r"annotations\.json is not in the COCO results format"):
        load_coco_predictions(annotations)
    no_caption = _write(tmp_path / "no_caption.json", [{"image_id": 1, "caption": "a"}, {"image_id": 2}])
    with pytest.raises(ValueError, match=r"no_caption\.json: entry 1 must be an object"):
        load_coco_predictions(no_caption)
    broken = tmp_path / "broken.json"
    broken.write_text("[{", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON"):
        load_coco_predictions(broken)


def test_clip_metrics_check_their_inputs_before_loading_a_model(tmp_path):
    from clipcap_hf.evaluation.metrics import compute_clip_metrics

    paths = {1: str(tmp_path / "1.png")}
    # "unused" names no CLIP model: the checks come first.
    with pytest.raises(ValueError, match="There are no predictions to score"):
        compute_clip_metrics({}, paths, "unused", metrics=["clipscore"])
    with pytest.raises(ValueError, match=r"1 of 2 predicted images have no image file \(image ids: 7\)"):
        compute_clip_metrics({1: "a dog", 7: "a cat"}, paths, "unused", metrics=["clipscore"])
    with pytest.raises(TypeError, match=r"The prediction for image id 1 must be a string, got int"):
        compute_clip_metrics({1: 5}, paths, "unused", metrics=["clipscore"])
    with pytest.raises(ValueError, match=r"1 of 1 predicted images have no reference captions \(image ids: 1\)"):
        compute_clip_metrics({1: "a dog"}, paths, "unused", references={2: ["a cat"]}, metrics=["refclipscore"])
