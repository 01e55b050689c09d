"""CLIPScore and RefCLIPScore (Hessel et al., 2021) against an independent computation, in `clipcap evaluate`'s
metrics.json and gallery."""

import html
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from conftest import IMAGE_SIZE, random_images
from torchvision import transforms
from transformers import AutoProcessor, CLIPModel
from transformers.activations import QuickGELUActivation
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from clipcap_hf.commands import main
from clipcap_hf.evaluation.metrics import compute_clip_metrics
from clipcap_hf.inference import CLIPScorer
from clipcap_hf.modeling_clipcap import QuickGELUInPlace

CAPTIONS = ["a dog runs on the beach", "two cats sleep", "a red circle", "people walk in a park", "x"]
REFERENCES = [["a dog on sand", "a brown dog"], ["cats sleeping"], ["a circle", "red", "a round shape"],
              ["a park"], ["y", "z"]]


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return CLIPModel.from_pretrained(tiny_clip_dir).eval(), AutoProcessor.from_pretrained(tiny_clip_dir)


def clip_pixels(images) -> torch.Tensor:
    """OpenAI CLIP's own preprocessing (clip.load's `_transform`, from torchvision) at the tiny CLIP's 32 pixels:
    transformers' CLIPImageProcessor resizes otherwise on transformers 5 (torchvision on tensors)."""
    transform = transforms.Compose([
        transforms.Resize(IMAGE_SIZE, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(IMAGE_SIZE),
        lambda image: image.convert("RGB"),
        transforms.ToTensor(),
        transforms.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    ])
    return torch.stack([transform(image) for image in images])


@torch.no_grad()
def hessel_scores(model, processor, images, captions, references):
    """The paper's formulas from CLIPModel's forward (logits = exp(logit_scale) * cosine) and its text tower's
    pooled output through the text projection, written out here independently of CLIPScorer."""
    prompted = [f"A photo depicts {caption}" for caption in captions]
    tokens = processor(text=prompted, return_tensors="pt", padding=True)
    output = model(**tokens, pixel_values=clip_pixels(images))
    cosine = output.logits_per_image.diagonal() / model.logit_scale.exp()
    clip_s = 2.5 * cosine.clamp(min=0)

    def text_vectors(texts):
        tokens = processor(text=[f"A photo depicts {text}" for text in texts], return_tensors="pt", padding=True)
        pooled = model.text_model(**tokens).pooler_output
        vectors = model.text_projection(pooled)
        return vectors / vectors.norm(dim=-1, keepdim=True)

    ref_s = []
    for index, (caption, refs) in enumerate(zip(captions, references)):
        best = max(0.0, float((text_vectors(refs) @ text_vectors([caption])[0]).max()))
        c = float(clip_s[index])
        ref_s.append(0.0 if c + best == 0 else 2 * c * best / (c + best))
    return clip_s.tolist(), ref_s


def test_clip_score_and_ref_clip_score_follow_the_paper(clip):
    model, processor = clip
    images = random_images(len(CAPTIONS), seed=5)
    expected_clip, expected_ref = hessel_scores(model, processor, images, CAPTIONS, REFERENCES)
    assert any(score == 0 for score in expected_clip) and any(score > 0 for score in expected_clip)  # clamp shows
    clip_s, ref_s = CLIPScorer(model, processor).ref_clip_score(images, CAPTIONS, REFERENCES)
    assert clip_s.tolist() == pytest.approx(expected_clip, abs=1e-5)
    assert ref_s.tolist() == pytest.approx(expected_ref, abs=1e-5)


def test_ref_clip_score_runs_the_text_tower_once_over_each_caption_and_reference(clip, monkeypatch):
    model, processor = clip
    scorer = CLIPScorer(model, processor)
    images = random_images(len(CAPTIONS), seed=5)
    rows = []  # the texts of each call of the text tower
    real = type(model).get_text_features

    def counted(self, input_ids=None, **kwargs):
        rows.append(len(input_ids))
        return real(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(model), "get_text_features", counted)
    clip_s, _ = scorer.ref_clip_score(images, CAPTIONS, REFERENCES)
    assert sum(rows) == len(CAPTIONS) + sum(map(len, REFERENCES))
    assert torch.equal(clip_s, scorer.clip_score(images, CAPTIONS))  # the same CLIPScore as scored alone


def test_rerank_keeps_the_candidate_with_the_highest_score(clip):
    model, processor = clip
    images = random_images(2, seed=6)
    candidates = [CAPTIONS[:3], CAPTIONS[2:]]
    best, scores = CLIPScorer(model, processor).rerank(images, candidates)
    for image, texts, index, score in zip(images, candidates, best, scores):
        expected, _ = hessel_scores(model, processor, [image] * len(texts), texts, [["r"]] * len(texts))
        assert index == max(range(len(texts)), key=lambda i: expected[i])
        assert score == pytest.approx(max(expected), abs=1e-5)


@pytest.mark.parametrize(
    "call, error, message",
    [
        # One reference string per image, where a list per image is due: otherwise read as one per character.
        (lambda scorer, images: scorer.ref_clip_score(images, CAPTIONS[:2], ["a dog on sand", "cats sleeping"]),
         TypeError, "`references[0]` must be a list of strings (the texts of image 0), got the str 'a dog on sand'; "
                    "for a single one give ['a dog on sand']."),
        (lambda scorer, images: scorer.ref_clip_score(images, CAPTIONS[:2], [["a dog"], ["cats", None]]),
         TypeError, "`references[1]` must be a list of strings (the texts of image 1), got ['cats', None]."),
        (lambda scorer, images: scorer.ref_clip_score(images, CAPTIONS[:2], [["a dog"], []]),
         ValueError, "`references[1]` is empty: RefCLIPScore needs at least one reference per image."),
        (lambda scorer, images: scorer.ref_clip_score(images, CAPTIONS[:2], "a dog"),
         TypeError, "`references` must be a list with a list of strings for each image; got the str 'a dog'."),
        (lambda scorer, images: scorer.ref_clip_score(images[:1], "a dog", [["a dog"]]),
         TypeError, "`captions` must be a list of strings, one per image; got the str 'a dog'."),
        (lambda scorer, images: scorer.clip_score(images[:1], "a dog"),
         TypeError, "`captions` must be a list of strings, one per image; got the str 'a dog'."),
        (lambda scorer, images: scorer.rerank(images, ["a dog runs", "two cats"]),
         TypeError, "`candidates[0]` must be a list of strings (the texts of image 0), got the str 'a dog runs'; "
                    "for a single one give ['a dog runs']."),
        (lambda scorer, images: scorer.rerank(images, [["a dog"], []]),
         ValueError, "`candidates[1]` is empty: rerank needs at least one candidate per image."),
        (lambda scorer, images: scorer.rerank(images, [np.array(["a dog"]), np.array([], dtype=str)]),
         ValueError, "`candidates[1]` is empty: rerank needs at least one candidate per image."),
    ],
)
def test_texts_not_given_as_a_list_per_image_are_refused_naming_the_argument_and_image(clip, call, error, message):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        call(CLIPScorer(*clip), random_images(2, seed=5))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda scorer, images: scorer.clip_score(images, CAPTIONS[:3]),
         "Got 2 images and 3 captions; give one per image."),
        (lambda scorer, images: scorer.clip_score(torch.ones(2, 8), CAPTIONS[:1]),  # image embeddings given
         "Got 2 images and 1 captions; give one per image."),
        (lambda scorer, images: scorer.ref_clip_score(images, CAPTIONS[:3], REFERENCES[:3]),
         "Got 2 images and 3 captions; give one per image."),
        (lambda scorer, images: scorer.ref_clip_score(images, CAPTIONS[:2], REFERENCES[:3]),
         "Got 2 images and 3 reference lists; give one per image."),
        (lambda scorer, images: scorer.rerank(images, [CAPTIONS[:2]]),
         "Got 2 images and 1 candidate lists; give one per image."),
    ],
    ids=["clip_score", "clip_score-embeddings", "ref_clip_score-captions", "ref_clip_score-references", "rerank"],
)
def test_texts_not_one_per_image_are_refused_before_either_tower_runs(clip, monkeypatch, call, message):
    model, processor = clip
    scorer = CLIPScorer(model, processor)
    towers = []  # the towers run

    def tower(name):
        def run(self, *args, **kwargs):
            towers.append(name)
            raise AssertionError(f"CLIP's {name} tower ran")
        return run

    monkeypatch.setattr(type(model), "get_text_features", tower("text"))
    monkeypatch.setattr(type(model), "get_image_features", tower("image"))
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call(scorer, random_images(2, seed=5))
    assert towers == []


def test_texts_per_image_may_be_numpy_arrays_as_pandas_reads_a_parquet_list_column(clip):
    import pyarrow as pa

    scorer, images = CLIPScorer(*clip), random_images(2, seed=5)
    candidates = [["a dog runs", "a dog"], ["two cats", "a cat sleeping", "a car"]]
    column = pa.table({"candidates": candidates}).to_pandas()["candidates"]  # a Series of object arrays of str
    assert all(isinstance(texts, np.ndarray) for texts in column)
    assert scorer.rerank(images, column) == scorer.rerank(images, candidates)
    unicode_arrays = [np.array(texts) for texts in candidates]  # of np.str_
    assert scorer.rerank(images, unicode_arrays) == scorer.rerank(images, candidates)
    for got, expected in zip(scorer.ref_clip_score(images, CAPTIONS[:2], column),
                             scorer.ref_clip_score(images, CAPTIONS[:2], candidates)):
        assert torch.equal(got, expected)
    # Still refused: an array of other than strings, and one that is no list (0-d).
    refused = re.escape("`candidates[1]` must be a list of strings (the texts of image 1), got ")
    for texts in (np.array([1, 2]), np.array("a dog")):
        with pytest.raises(TypeError, match=f"^{refused}"):
            scorer.rerank(images, [["a dog"], texts])


@pytest.mark.parametrize("text_batch_size", [0, -1, 2.5, True])
def test_a_text_batch_size_that_is_no_positive_integer_is_refused(clip, text_batch_size):
    with pytest.raises(ValueError, match=rf"^`text_batch_size` must be a positive integer, got {text_batch_size!r}\.$"):
        CLIPScorer(*clip, text_batch_size=text_batch_size)


def test_a_clip_folder_given_as_a_path_is_loaded(tiny_clip_dir, clip):
    model, processor = clip
    images = random_images(2, seed=7)
    expected, _ = hessel_scores(model, processor, images, CAPTIONS[:2], [["r"]] * 2)
    scorer = CLIPScorer(Path(tiny_clip_dir))
    scores = scorer.clip_score(images, CAPTIONS[:2])
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)
    # Its own model computes quick_gelu into one new tensor, as ClipCap's tower; a model given in memory is left alone.
    activations = [type(module) for module in scorer.model.modules() if isinstance(module, QuickGELUActivation)]
    assert activations and set(activations) == {QuickGELUInPlace}
    CLIPScorer(model, processor)
    assert not any(isinstance(module, QuickGELUInPlace) for module in model.modules())


def test_images_are_scored_upright_and_on_white_as_the_captioner_sees_them(clip):
    """An EXIF-rotated photo is scored as it is viewed, and a transparent image on white (as ClipCapCaptioner
    captions them), on both transformers lines alike."""
    model, processor = clip
    scorer = CLIPScorer(model, processor)
    stored = random_images(1, seed=11, size=(64, 40))[0]
    exif = stored.getexif()
    exif[0x0112] = 6  # Orientation: the stored pixels are viewed turned by 90 degrees clockwise
    encoded = io.BytesIO()
    stored.save(encoded, "PNG", exif=exif)
    photo = PIL.Image.open(io.BytesIO(encoded.getvalue()))
    upright = stored.transpose(PIL.Image.Transpose.ROTATE_270)
    expected, _ = hessel_scores(model, processor, [upright] * len(CAPTIONS), CAPTIONS, REFERENCES)
    sideways, _ = hessel_scores(model, processor, [stored] * len(CAPTIONS), CAPTIONS, REFERENCES)
    assert sideways != pytest.approx(expected, abs=1e-3)  # so that scoring the stored pixels shows
    assert scorer.clip_score([photo] * len(CAPTIONS), CAPTIONS).tolist() == pytest.approx(expected, abs=1e-5)

    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[10:30, 10:30] = (200, 30, 30, 255)  # a red square; the rest transparent black
    on_white = PIL.Image.fromarray(np.where(rgba[:, :, 3:] == 255, rgba[:, :, :3], 255).astype(np.uint8))
    expected, _ = hessel_scores(model, processor, [on_white] * len(CAPTIONS), CAPTIONS, REFERENCES)
    assert max(expected) > 0
    scores = scorer.clip_score([PIL.Image.fromarray(rgba, "RGBA")] * len(CAPTIONS), CAPTIONS)
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)


@torch.no_grad()
def test_a_clip_processor_that_squashes_then_crops_gives_its_own_pixels(clip):
    model, processor = clip
    pil_processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    crop_size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    squash_then_crop = pil_processor(size={"height": 40, "width": 40}, crop_size=crop_size)
    images = random_images(2, seed=1, size=(60, 44))
    pixel_values = squash_then_crop(images, return_tensors="pt")["pixel_values"]
    features = model.get_image_features(pixel_values=pixel_values)
    features = features if isinstance(features, torch.Tensor) else features.pooler_output  # transformers 5
    expected = torch.nn.functional.normalize(features, dim=-1)
    clip_processor = transformers.CLIPProcessor(image_processor=squash_then_crop, tokenizer=processor.tokenizer)
    scorer = CLIPScorer(model, clip_processor)
    torch.testing.assert_close(scorer.image_embeddings(images), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "setting, named",
    [({"do_rescale": False}, "do_rescale=False"), ({"rescale_factor": 1 / 127.5}, "rescale_factor=0.00784313725490196"),
     ({"do_resize": False}, "do_resize=False"), ({"do_convert_rgb": False}, "do_convert_rgb=False")],
)
def test_a_clip_processor_setting_the_scorer_cannot_apply_is_refused_naming_it(clip, setting, named):
    model, processor = clip
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, **setting)
    with pytest.raises(ValueError) as error:
        CLIPScorer(model, transformers.CLIPProcessor(image_processor=image_processor, tokenizer=processor.tokenizer))
    assert str(error.value) == (
        "CLIPScorer cannot apply the CLIP processor's image settings: ClipCapImageProcessor cannot reproduce this "
        f"checkpoint's preprocessing with {named}; it always resizes, center-crops (or squashes), converts to RGB and "
        "scales by 1/255."
    )


def test_a_clip_vision_model_alone_is_refused_before_loading(tiny_clip_dir, tmp_path):
    # CLIPModel.from_pretrained would load it with a random text tower, and score.
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8, projection_dim=24)
    CLIPVisionModelWithProjection(vision_config).save_pretrained(tmp_path)
    AutoProcessor.from_pretrained(tiny_clip_dir).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"^CLIPScorer's `model` argument: {tmp_path} holds a model of type "
                                         "'clip_vision_model' "
                                         r"\(config.json\), not a whole CLIP model"):
        CLIPScorer(str(tmp_path))


def test_a_clip_model_that_cannot_be_loaded_is_named_as_the_argument(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=f"^CLIPScorer's `model` argument: folder {tmp_path / 'no'} does not "
                                                "exist.$"):
        CLIPScorer(tmp_path / "no")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="^CLIPScorer's `model` argument someone/uncached-clip: no such folder, and this "
                                      r"Hub model is not in the local cache \(HF_HUB_OFFLINE is set\)\. Give "
                                      "CLIPScorer's `model` argument a local folder, or download"):
        CLIPScorer("someone/uncached-clip")


def test_a_clip_folder_under_the_home_folder_is_named_with_a_tilde(tiny_clip_dir, clip, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_clip_dir, tmp_path / "clip")
    images = random_images(2, seed=7)
    expected, _ = hessel_scores(*clip, images, CAPTIONS[:2], [["r"]] * 2)
    assert CLIPScorer("~/clip").clip_score(images, CAPTIONS[:2]).tolist() == pytest.approx(expected, abs=1e-5)


def test_evaluate_writes_clip_scores_to_metrics_json_and_gallery(tiny_clip_dir, clip, tmp_path):
    (tmp_path / "images").mkdir()
    images = random_images(len(CAPTIONS), seed=5)
    entries, annotations = [], []
    for image_id, (image, refs) in enumerate(zip(images, REFERENCES), start=1):
        image.save(tmp_path / "images" / f"{image_id}.png")
        entries.append({"id": image_id, "file_name": f"{image_id}.png"})
        annotations += [{"image_id": image_id, "caption": ref} for ref in refs]
    (tmp_path / "refs.json").write_text(json.dumps({"images": entries, "annotations": annotations}))
    predictions = [{"image_id": i, "caption": c} for i, c in enumerate(CAPTIONS, start=1)]
    (tmp_path / "predictions.json").write_text(json.dumps(predictions))
    out = tmp_path / "eval"
    argv = ["evaluate", "--predictions", str(tmp_path / "predictions.json"), "--data", str(tmp_path / "refs.json"),
            "--data-format", "coco", "--image-root", str(tmp_path / "images"), "--output-dir", str(out),
            "--metrics", "clipscore", "refclipscore", "--clip-model", str(tiny_clip_dir),
            "--gallery", str(tmp_path / "gallery.html")]
    assert main(argv) == 0
    # The images as they read back from the PNG files: the same pixels.
    expected_clip, expected_ref = hessel_scores(*clip, images, CAPTIONS, REFERENCES)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["scores"]["CLIPScore"] == pytest.approx(sum(expected_clip) / len(CAPTIONS), abs=1e-5)
    assert metrics["scores"]["RefCLIPScore"] == pytest.approx(sum(expected_ref) / len(CAPTIONS), abs=1e-5)
    assert metrics["run"]["clip_model"] == str(tiny_clip_dir)
    page = html.unescape((tmp_path / "gallery.html").read_text())
    assert ">CLIPScore</button>" in page and ">RefCLIPScore</button>" in page
    cells = [float(value) for value in re.findall(r'class="score" data-value="([^"]+)"', page)]
    assert cells[0::2] == pytest.approx(expected_clip, abs=1e-5)  # each image's own scores, in its row
    assert cells[1::2] == pytest.approx(expected_ref, abs=1e-5)


def test_compute_clip_metrics_alone_and_its_errors(clip, tmp_path):
    model, processor = clip
    images = random_images(2, seed=5)
    paths = {}
    for index, image in enumerate(images):
        paths[index] = tmp_path / f"{index}.png"
        image.save(paths[index])
    scorer = CLIPScorer(model, processor)
    scores, per_image = compute_clip_metrics(dict(enumerate(CAPTIONS[:2])), paths, scorer, metrics="clipscore")
    expected, _ = hessel_scores(model, processor, images, CAPTIONS[:2], REFERENCES[:2])
    assert [per_image[i]["CLIPScore"] for i in range(2)] == pytest.approx(expected, abs=1e-5)
    assert set(scores) == {"CLIPScore"}
    with pytest.raises(ValueError, match="RefCLIPScore needs the reference captions"):
        compute_clip_metrics({0: "a"}, paths, scorer, metrics=["refclipscore"])


def test_a_file_the_processor_refuses_is_named(clip, tmp_path):
    good, refused = tmp_path / "good.png", tmp_path / "float255.tif"
    random_images(1)[0].save(good)
    PIL.Image.fromarray(np.full((8, 8), 200.0, dtype=np.float32), mode="F").save(refused)  # floats not in [0, 1]
    with pytest.raises(ValueError, match=rf"^Cannot read image {re.escape(str(refused))}: Float image arrays must"):
        compute_clip_metrics({0: "a", 1: "b"}, {0: good, 1: refused}, CLIPScorer(*clip), metrics="clipscore")


def test_an_empty_prediction_gets_its_clip_score_with_a_warning_that_says_so(clip, tmp_path):
    model, processor = clip
    image = random_images(1, seed=6)[0]
    image.save(tmp_path / "0.png")
    with pytest.warns(UserWarning) as caught:
        _, per_image = compute_clip_metrics(
            {0: ""}, {0: tmp_path / "0.png"}, CLIPScorer(model, processor), metrics="clipscore"
        )
    assert [str(w.message) for w in caught] == [
        "1 of 1 predictions are empty (image ids: 0); CLIP scores them as the empty text against their images, not "
        "as zero. A model that emits end-of-text first gives empty captions."
    ]
    expected, _ = hessel_scores(model, processor, [image], [""], [["a"]])
    assert per_image[0]["CLIPScore"] == pytest.approx(expected[0], abs=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--metrics", "clipscore"], "--metrics clipscore score the captions with CLIP: give --clip-model."),
        (["--metrics", "bleu", "--clip-model", "x"], "--clip-model is for --metrics clipscore and refclipscore"),
    ],
)
def test_clip_metric_options_are_checked_before_any_work(tmp_path, capsys, extra, message):
    argv = ["evaluate", "--predictions", str(tmp_path / "p.json"), "--data", str(tmp_path / "r.json"),
            "--data-format", "coco", "--output-dir", str(tmp_path / "out"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "clip_model, message",
    [
        ("{tmp}/no-clip", "--clip-model: folder {tmp}/no-clip does not exist."),
        ("{tmp}/clipcap", "--clip-model: {tmp}/clipcap holds a model of type 'clipcap' (config.json), not a whole "
                          "CLIP model: scoring captions needs both towers. Give a transformers CLIPModel folder or Hub "
                          "name, such as openai/clip-vit-base-patch32."),
    ],
    ids=["missing", "clipcap-folder"],
)
def test_a_bad_clip_model_is_named_as_the_option_before_any_work(tmp_path, capsys, clip_model, message):
    # The data files do not exist: the option is checked before they are read (and the split captioned).
    (tmp_path / "clipcap").mkdir()
    (tmp_path / "clipcap" / "config.json").write_text(json.dumps({"model_type": "clipcap"}))
    argv = ["evaluate", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "r.json"), "--data-format", "coco",
            "--output-dir", str(tmp_path / "out"), "--metrics", "bleu", "clipscore",
            "--clip-model", clip_model.format(tmp=tmp_path)]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"clipcap evaluate: error: {message.format(tmp=tmp_path)}\n"
    assert not (tmp_path / "out").exists()


def test_the_clip_scorer_of_evaluate_names_its_option(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    # Past the early check (a folder changed since), the scorer's own errors name --clip-model too.
    import clipcap_hf.commands.evaluate

    monkeypatch.setattr(clipcap_hf.commands.evaluate, "check_clip_model", lambda name, option: None)
    clip_dir = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, clip_dir)
    config = json.loads((clip_dir / "config.json").read_text())
    (clip_dir / "config.json").write_text(json.dumps({**config, "text_config": None}))
    random_images(1)[0].save(tmp_path / "1.png")
    (tmp_path / "refs.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "1.png"}],
                                                    "annotations": [{"image_id": 1, "caption": "a dog"}]}))
    (tmp_path / "predictions.json").write_text(json.dumps([{"image_id": 1, "caption": "a cat"}]))
    argv = ["evaluate", "--predictions", str(tmp_path / "predictions.json"), "--data", str(tmp_path / "refs.json"),
            "--data-format", "coco", "--image-root", str(tmp_path), "--output-dir", str(tmp_path / "out"),
            "--metrics", "clipscore", "--clip-model", str(clip_dir)]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"clipcap evaluate: error: --clip-model: {clip_dir} holds a CLIP model without a text_config (config.json), "
        "not a whole CLIP model: scoring captions needs both towers. Give a transformers CLIPModel folder or Hub name, "
        "such as openai/clip-vit-base-patch32.\n"
    )


def test_clip_score_is_torchmetrics_clip_score_over_40_where_torchmetrics_runs(clip):
    """torchmetrics' clip_score is max(100 * cos, 0) (of a batch's mean: one image at a time here); it calls
    `get_image_features` as a tensor, which transformers 5 no longer returns."""
    functional = pytest.importorskip("torchmetrics.functional.multimodal")
    model, processor = clip
    if not isinstance(model.get_image_features(pixel_values=torch.zeros(1, 3, 32, 32)), torch.Tensor):
        pytest.skip("torchmetrics' CLIPScore needs get_image_features to return a tensor (transformers 4)")
    images = random_images(len(CAPTIONS), seed=5)
    ours = CLIPScorer(model, processor).clip_score(images, CAPTIONS)
    for image, caption, score in zip(images, CAPTIONS, ours):
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        with torch.no_grad():
            theirs = functional.clip_score(pixels, f"A photo depicts {caption}", model_name_or_path=lambda: clip)
        assert float(score) == pytest.approx(float(theirs) / 40, abs=1e-4)


def test_rerank_picks_the_most_similar_candidate_when_every_score_is_clipped_to_zero(clip, monkeypatch):
    # CLIPScore clips cosines at 0; the choice among candidates that all point away from the image must not.
    scorer = CLIPScorer(*clip)
    texts = {"far": [-0.9, 0.4359], "near": [-0.2, 0.9798], "middle": [-0.5, 0.8660], "close": [0.6, 0.8]}
    monkeypatch.setattr(scorer, "image_embeddings", lambda images: torch.tensor([[1.0, 0.0]] * len(images)))
    monkeypatch.setattr(scorer, "text_embeddings", lambda captions: torch.tensor([texts[text] for text in captions]))
    best, scores = scorer.rerank(random_images(2), [["far", "near", "middle"], ["far", "close"]])
    assert best == [1, 1]
    assert scores == pytest.approx([0.0, 2.5 * 0.6], abs=1e-6)
