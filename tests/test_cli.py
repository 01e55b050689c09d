import html
import json

import pytest
from conftest import random_images

from clipcap_hf import ClipCapForConditionalGeneration, ClipCapProcessor
from clipcap_hf.cli import main


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(random_images(5, seed=9)):
        image.save(folder / f"img{index}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def expected_captions(model_dir, paths, **generate_kwargs):
    import PIL.Image

    model = ClipCapForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = ClipCapProcessor.from_pretrained(model_dir)
    images = [PIL.Image.open(path) for path in paths]
    generated = model.generate(**processor(images=images), **generate_kwargs)
    return [caption.strip() for caption in processor.batch_decode(generated, skip_special_tokens=True)]


def test_caption_folder_prints_one_line_per_image(saved_model_dir, image_folder, capsys):
    assert main(["caption", str(image_folder), "--model", str(saved_model_dir), "--max-new-tokens", "6",
                 "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    paths = sorted(image_folder.glob("*.png"))
    assert [line.split("\t")[0] for line in lines] == [str(path) for path in paths]
    assert [line.split("\t")[1] for line in lines] == expected_captions(saved_model_dir, paths, max_new_tokens=6)


def test_caption_glob_and_files_as_json_with_beams(saved_model_dir, image_folder, capsys):
    first = image_folder / "img0.png"
    argv = ["caption", str(first), str(image_folder / "img[12].png"), str(first), "--model", str(saved_model_dir),
            "--json", "--num-beams", "3", "--max-new-tokens", "5"]
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    paths = [first, image_folder / "img1.png", image_folder / "img2.png"]  # duplicates dropped, order kept
    assert [r["image"] for r in results] == [str(p) for p in paths]
    assert [r["caption"] for r in results] == expected_captions(saved_model_dir, paths, max_new_tokens=5, num_beams=3)


def test_caption_length_defaults_to_the_model_generation_config(saved_model_dir, image_folder, capsys):
    config_path = saved_model_dir / "generation_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "max_new_tokens": 3}))
    assert main(["caption", str(image_folder), "--model", str(saved_model_dir), "--json"]) == 0
    captions = [result["caption"] for result in json.loads(capsys.readouterr().out)]
    paths = sorted(image_folder.glob("*.png"))
    assert captions == expected_captions(saved_model_dir, paths)  # generate's own default: 3 tokens
    assert captions != expected_captions(saved_model_dir, paths, max_new_tokens=30)


def unreadable_error(path) -> str:
    return f"Cannot read image {path}: cannot identify image file '{path}'"


def test_unreadable_image_is_named_and_the_others_are_captioned(saved_model_dir, image_folder, capsys):
    unreadable = image_folder / "img1x.png"  # sorts between img1 and img2
    unreadable.write_bytes(b"definitely not a png")
    status = main(["caption", str(image_folder), "--model", str(saved_model_dir), "--batch-size", "2",
                   "--max-new-tokens", "3"])
    captured = capsys.readouterr()
    assert status == 2
    assert captured.err.endswith(f"clipcap caption: error: 1 of 6 images could not be read:\n  "
                                 f"{unreadable_error(unreadable)}\n")
    paths = sorted(image_folder.glob("img[0-9].png"))
    lines = captured.out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(path) for path in paths]
    assert [line.split("\t")[1] for line in lines] == expected_captions(saved_model_dir, paths, max_new_tokens=3)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--num-beams", "0"], "--num-beams must be at least 1, got 0"),
        (["--num-beams", "-2"], "--num-beams must be at least 1, got -2"),
    ],
)
def test_bad_options_are_rejected(saved_model_dir, image_folder, capsys, extra, message):
    assert main(["caption", str(image_folder), "--model", str(saved_model_dir), *extra]) == 2
    assert message in capsys.readouterr().err


def test_missing_images_are_reported(saved_model_dir, tmp_path, capsys):
    assert main(["caption", str(tmp_path / "nothing*.jpg"), "--model", str(saved_model_dir)]) == 2
    assert "No image matches" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["caption", str(tmp_path / "empty"), "--model", str(saved_model_dir)]) == 2
    assert "No images found" in capsys.readouterr().err


def test_json_lists_an_unreadable_image_with_its_error(saved_model_dir, image_folder, capsys):
    unreadable = image_folder / "img1x.png"
    unreadable.write_bytes(b"definitely not a png")
    status = main(["caption", str(image_folder), "--model", str(saved_model_dir), "--json", "--batch-size", "2",
                   "--max-new-tokens", "3"])
    captured = capsys.readouterr()
    assert status == 2
    assert captured.err.endswith(f"could not be read:\n  {unreadable_error(unreadable)}\n")
    paths = sorted(image_folder.glob("img[0-9].png"))
    captions = expected_captions(saved_model_dir, paths, max_new_tokens=3)
    expected = [{"image": str(path), "caption": caption} for path, caption in zip(paths, captions)]
    expected.insert(2, {"image": str(unreadable), "caption": None, "error": unreadable_error(unreadable)})
    assert json.loads(captured.out) == expected


def test_gallery_shows_an_unreadable_image_with_its_error(saved_model_dir, image_folder, tmp_path, capsys):
    unreadable = image_folder / "img1x.png"
    unreadable.write_bytes(b"definitely not a png")
    gallery = tmp_path / "gallery.html"
    status = main(["caption", str(image_folder), "--model", str(saved_model_dir), "--gallery", str(gallery),
                   "--batch-size", "5", "--max-new-tokens", "3"])
    captured = capsys.readouterr()
    assert status == 2
    assert unreadable_error(unreadable) in captured.err
    page = gallery.read_text()
    assert all(str(image_folder / f"img{index}.png") in page for index in range(5))
    assert page.count('class="unreadable"') == 1
    assert f'<div class="unreadable"><strong>{html.escape(str(unreadable))}</strong>' in page
    assert html.escape(unreadable_error(unreadable)) in page


@pytest.mark.parametrize(
    "gallery, message",
    [
        ("img0.png", "--gallery: {target} is not an .html file name; name the HTML page to write, e.g. gallery.html."),
        ("page.html", "--gallery: {target} is also a file this command reads or writes ({target}); name another HTML "
                      "file."),
    ],
)
def test_gallery_must_be_an_html_file_the_command_does_not_use(saved_model_dir, image_folder, capsys, gallery, message):
    page = image_folder / "page.html"  # given as an input, as the images are
    page.write_text("<p>mine</p>")
    inputs = {path: path.read_bytes() for path in [page, *image_folder.glob("*.png")]}
    target = image_folder / gallery
    assert main(["caption", str(image_folder), str(page), "--model", str(saved_model_dir),
                 "--gallery", str(target)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"clipcap caption: error: {message.format(target=target)}\n"
    assert captured.out == ""
    assert {path: path.read_bytes() for path in inputs} == inputs


def test_gallery_naming_a_folder_is_rejected_before_captioning(saved_model_dir, image_folder, tmp_path, capsys):
    assert main(["caption", str(image_folder), "--model", str(saved_model_dir), "--gallery", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert f"--gallery: {tmp_path} is a folder; name the HTML file to write" in captured.err
    assert captured.out == ""


@pytest.mark.parametrize("model_dir", ["missing", "empty"])
def test_model_folder_without_weights_is_reported(image_folder, tmp_path, capsys, model_dir):
    (tmp_path / "empty").mkdir()
    path = tmp_path / model_dir
    assert main(["caption", str(image_folder), "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipcap caption: error: ") and str(path) in err
    assert "Traceback" not in err


def test_glob_keeps_only_images(saved_model_dir, image_folder, capsys):
    (image_folder / "sub").mkdir()
    argv = ["caption", str(image_folder / "*"), "--model", str(saved_model_dir), "--json", "--max-new-tokens", "3"]
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == [str(path) for path in sorted(image_folder.glob("*.png"))]
    # A pattern whose only matches are not images is still reported as matching none.
    assert main(["caption", str(image_folder / "*.txt"), "--model", str(saved_model_dir)]) == 2
    assert "No image matches" in capsys.readouterr().err


def test_progress_bar_when_more_images_than_batch_size(saved_model_dir, image_folder, capsys):
    paths = [str(image_folder / f"img{index}.png") for index in range(3)]
    assert main(["caption", *paths, "--model", str(saved_model_dir), "--batch-size", "1",
                 "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "Captioning" in err and "3/3" in err
