import contextlib
import html
import io
import json
import re
import sys

import pytest
import torch
from conftest import random_images, tiny_config

from clipcap_hf import ClipCapForConditionalGeneration, ClipCapProcessor
from clipcap_hf.commands import main
from clipcap_hf.commands._utils import expand_image_paths, resolve_device


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
        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
        (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["--num-beams", "0"], "argument --num-beams: must be at least 1, got 0"),
        (["--num-beams", "-2"], "argument --num-beams: must be at least 1, got -2"),
        (["--batch-size", "two"], "argument --batch-size: must be a whole number, got 'two'"),
        (["--shard-size", "3"], "--shard-size splits a dataset or embeddings folder (with --output), not image files"),
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


def test_on_bad_image_skip_leaves_an_unreadable_file_out_with_a_warning_and_status_0(
    saved_model_dir, image_folder, capsys
):
    unreadable = image_folder / "img1x.png"
    unreadable.write_bytes(b"definitely not a png")
    argv = ["caption", str(image_folder), "--model", str(saved_model_dir), "--batch-size", "2", "--max-new-tokens",
            "3", "--on-bad-image", "skip"]
    paths = sorted(image_folder.glob("img[0-9].png"))
    captions = expected_captions(saved_model_dir, paths, max_new_tokens=3)
    warning = (f"Warning: 1 of 6 images could not be read:\n  {unreadable_error(unreadable)}\n"
               "Left out of the captions (--on-bad-image skip).\n")

    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"{path}\t{caption}" for path, caption in zip(paths, captions)]
    assert captured.err.endswith(warning)
    assert main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == [{"image": str(p), "caption": caption} for p, caption in zip(paths, captions)]
    assert captured.err.endswith(warning)


def test_on_bad_image_skip_fails_when_no_image_at_all_could_be_read(saved_model_dir, tmp_path, capsys):
    # Skipping some unreadable images still captions the others; skipping every one captions nothing, which a
    # pipeline must not take for success.
    folder = tmp_path / "images"
    folder.mkdir()
    unreadable = [folder / "a.png", folder / "b.jpg"]
    for path in unreadable:
        path.write_bytes(b"definitely not an image")
    gallery = tmp_path / "gallery.html"
    argv = ["caption", str(folder), "--model", str(saved_model_dir), "--on-bad-image", "skip"]
    message = ("clipcap caption: error: 2 of 2 images could not be read:\n"
               f"  {unreadable_error(unreadable[0])}\n  {unreadable_error(unreadable[1])}\n"
               "None could be captioned: --on-bad-image skip leaves out images that cannot be read, and here every one "
               "was. Check that the files are images Pillow reads, and rerun.\n")

    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.endswith(message)
    assert main([*argv, "--json", "--gallery", str(gallery)]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out) == [] and captured.err.endswith(message)
    assert not gallery.exists()  # no page of no captions


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


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), SystemExit(143)])
def test_a_run_stopped_by_the_user_keeps_an_earlier_gallery_and_a_failed_one_writes_its_captions(
    saved_model_dir, image_folder, tmp_path, monkeypatch, capsys, stop
):
    import clipcap_hf.commands.caption as caption_command

    gallery = tmp_path / "gallery.html"
    argv = ["caption", str(image_folder), "--model", str(saved_model_dir), "--gallery", str(gallery),
            "--batch-size", "1", "--max-new-tokens", "3"]
    assert main(argv) == 0
    complete = gallery.read_bytes()
    assert all(str(image_folder / f"img{index}.png").encode() in complete for index in range(5))
    real = caption_command.iter_captions

    def after_the_first_batch(error):
        def captions(*args, **kwargs):
            # Closed as the error leaves, as a Ctrl-C raised inside it would end it.
            with contextlib.closing(real(*args, **kwargs)) as batches:
                yield next(batches)
                raise error  # while the second image is being captioned

        return captions

    # Ctrl-C (or SIGTERM, which `main` turns into SystemExit): the earlier page stays as it was.
    monkeypatch.setattr(caption_command, "iter_captions", after_the_first_batch(stop))
    with pytest.raises(type(stop)):
        main(argv)
    assert gallery.read_bytes() == complete
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"{image_folder / 'img0.png'}\t")

    # A failure keeps the captions made before it, in the gallery too.
    monkeypatch.setattr(caption_command, "iter_captions", after_the_first_batch(OSError("No space left on device")))
    assert main(argv) == 2
    assert capsys.readouterr().err.endswith("clipcap caption: error: No space left on device\n")
    page = gallery.read_text()
    assert str(image_folder / "img0.png") in page and str(image_folder / "img1.png") not in page


@pytest.mark.parametrize(
    "gallery, message",
    [
        ("img0.png", "--gallery: {target} is not an .html file name; name the HTML page to write, e.g. gallery.html."),
        ("page.html", ("--gallery: {target} is also a file this command reads or writes ({target}); name another "
                       "HTML file.")),
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


def test_folders_give_every_image_pil_opens_and_skip_hidden_files_and_sub_folders(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    image = random_images(1)[0]
    for name, image_format in [("a.jpg", "JPEG"), ("b.jfif", "JPEG"), ("c.ppm", "PPM"), ("d.TIFF", "TIFF")]:
        image.save(folder / name, format=image_format)
    (folder / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble sidecar")  # what macOS leaves beside a.jpg
    (folder / "e.jpg").mkdir()  # a folder named like an image
    (folder / "notes.txt").write_text("not an image")
    expected = [folder / name for name in ("a.jpg", "b.jfif", "c.ppm", "d.TIFF")]
    assert expand_image_paths([str(folder)]) == expected
    assert expand_image_paths([str(folder / "*")]) == expected


def test_one_file_named_several_ways_is_listed_once_as_first_named(image_folder, monkeypatch):
    monkeypatch.chdir(image_folder.parent)
    first = f"{image_folder.name}/../{image_folder.name}/img2.png"
    names = [first, str(image_folder / "img2.png"), f"{image_folder.name}/img2.png", f"./{image_folder.name}"]
    others = [image_folder.name + f"/img{index}.png" for index in (0, 1, 3, 4)]
    assert [str(path) for path in expand_image_paths(names)] == [first, *others]


def test_interpret_reports_an_unreadable_image_and_interprets_the_others(saved_model_dir, image_folder, capsys):
    broken = image_folder / "img1x.png"  # sorts between img1 and img2
    broken.write_bytes(b"definitely not a png")
    argv = ["interpret", str(image_folder / "img0.png"), str(broken), str(image_folder / "img2.png"),
            "--model", str(saved_model_dir), "--top-k", "1"]
    assert main([*argv, "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.err.endswith(f"clipcap interpret: error: 1 of 3 images could not be read:\n  "
                                 f"{unreadable_error(broken)}\n")
    results = json.loads(captured.out)
    assert [result["image"] for result in results] == argv[1:4]
    assert results[1] == {"image": str(broken), "prefix": None, "error": unreadable_error(broken)}
    assert all(len(result["prefix"]) == 4 for result in (results[0], results[2]))  # prefix_length 4, top-1 each
    assert main(argv) == 2
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in printed if not line.startswith(" ")] == [argv[1], argv[3]]


def test_interpret_names_a_file_the_processor_refuses_and_interprets_the_others(saved_model_dir, image_folder, capsys):
    import numpy as np
    import PIL.Image

    # A float image of [0, 255] values: PIL opens it, the processor refuses it (floats must be in [0, 1]).
    refused = image_folder / "img1x.tif"
    PIL.Image.fromarray(np.full((8, 8), 200.0, dtype=np.float32), mode="F").save(refused)
    argv = ["interpret", str(image_folder / "img0.png"), str(refused), str(image_folder / "img2.png"),
            "--model", str(saved_model_dir), "--top-k", "1", "--json"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    error = (f"Cannot read image {refused}: Float image arrays must hold values in [0, 1], this one holds [200, 200]; "
             "divide [0, 255] data by 255 or pass it as uint8.")
    assert captured.err.endswith(f"clipcap interpret: error: 1 of 3 images could not be read:\n  {error}\n")
    results = json.loads(captured.out)
    assert [result["image"] for result in results] == argv[1:4]
    assert results[1] == {"image": str(refused), "prefix": None, "error": error}
    assert all(len(result["prefix"]) == 4 for result in (results[0], results[2]))


@pytest.mark.parametrize("model", ["./clipcap-quikstart", "{tmp}/clipcap-quikstart", "../models/clipcap"])
def test_a_model_folder_that_does_not_exist_is_named(image_folder, tmp_path, monkeypatch, capsys, model):
    monkeypatch.chdir(tmp_path)
    model = model.format(tmp=tmp_path)
    assert main(["caption", str(image_folder / "img0.png"), "--model", model]) == 2
    assert capsys.readouterr().err == f"clipcap caption: error: --model: folder {model} does not exist.\n"


@pytest.mark.parametrize("control", ["\n", "\x1b"])  # a newline; ESC, which starts terminal escape sequences
def test_captions_with_control_characters_stay_on_one_line_and_reach_no_terminal(
    saved_model_dir, image_folder, tokenizer, capsys, control
):
    # Bias the tiny model towards "A\nA\n...", as GPT-2, which has newline tokens, can write (or a model can be
    # made to write escape sequences, with no code: its generation config alone).
    newline, letter = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in (control, "A"))
    config_path = saved_model_dir / "generation_config.json"
    config = json.loads(config_path.read_text())
    config.update(sequence_bias=[[letter, 50.0], [letter + newline, 100.0]], max_new_tokens=6)
    config_path.write_text(json.dumps(config))
    paths = [image_folder / "img0.png", image_folder / "img1.png"]
    assert main(["caption", *map(str, paths), "--model", str(saved_model_dir), "--json"]) == 0
    captions = [result["caption"] for result in json.loads(capsys.readouterr().out)]
    assert all(control in caption for caption in captions)  # JSON keeps the caption as generated
    assert main(["caption", *map(str, paths), "--model", str(saved_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    collapsed = [" ".join(caption.split()).replace("\x1b", "\\x1b") for caption in captions]
    assert out.splitlines() == [f"{path}\t{caption}" for path, caption in zip(paths, collapsed)]


def test_output_survives_a_stdout_encoding_that_cannot_show_the_file_names(saved_model_dir, image_folder,
                                                                          monkeypatch):
    # Windows gives a redirected stdout the ANSI code page, e.g. cp1252, which has no CJK characters.
    named = image_folder / "ünï 画像.png"
    (image_folder / "img0.png").rename(named)
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["caption", str(named), str(image_folder / "img1.png"), "--model", str(saved_model_dir),
                 "--json", "--max-new-tokens", "3"]) == 0
    stdout.flush()
    results = json.loads(stdout.buffer.getvalue().decode("cp1252"))
    assert [result["image"] for result in results] == [str(named), str(image_folder / "img1.png")]
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["caption", str(named), "--model", str(saved_model_dir), "--max-new-tokens", "3"]) == 0
    stdout.flush()
    escaped = str(named).replace("画像", "\\u753b\\u50cf")
    assert stdout.buffer.getvalue().decode("cp1252").startswith(f"{escaped}\t")


@pytest.mark.parametrize(
    "device, message",
    [("gpu", "--device: 'gpu' is not a device; use cpu, cuda, cuda:N or mps."),
     pytest.param("cuda", "--device cuda: no CUDA GPU is available here; use --device cpu.",
                  marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")),
     ("meta", "--device meta: the meta device holds no data, so it cannot run a model; use --device cpu."),
     # torch knows these device types but has no backend for hpu, and no XPU here
     ("hpu", "--device hpu: no hpu device is available here; use --device cpu."),
     pytest.param("xpu:0", "--device xpu:0: no xpu device is available here; use --device cpu.",
                  marks=pytest.mark.skipif(torch.xpu.is_available(), reason="needs a machine without an XPU"))],
)
def test_a_bad_device_is_reported_before_the_model_is_loaded(image_folder, tmp_path, capsys, device, message):
    # The --model folder does not exist: the device is checked first.
    for command in (["caption", str(image_folder)], ["interpret", str(image_folder)]):
        assert main([*command, "--model", str(tmp_path / "missing"), "--device", device]) == 2
        assert capsys.readouterr().err == f"clipcap {command[0]}: error: {message}\n"


def test_a_device_type_is_taken_where_its_backend_says_it_is_available(monkeypatch):
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: 2)
    assert resolve_device("xpu") == torch.device("xpu")
    assert resolve_device("xpu:1") == torch.device("xpu", 1)
    with pytest.raises(ValueError, match=re.escape("--device xpu:2: there are only 2 xpu devices (xpu:0 to xpu:1).")):
        resolve_device("xpu:2")


def test_cuda_given_or_by_default_is_each_torchrun_process_s_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_device("cuda") == resolve_device(None) == torch.device("cuda")  # one process: the current GPU
    # Process 3 of a node's 8 (LOCAL_RANK 3 of WORLD_SIZE 8): a bare cuda would be GPU 0 for every process.
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == resolve_device(None) == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # a GPU named by number is taken as named


class BrokenPipe(io.StringIO):
    """stdout whose reader has gone, as with `clipcap caption ... | head -1`."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_pipe_ends_the_run_quietly_with_the_sigpipe_status(saved_model_dir, image_folder, monkeypatch,
                                                                   capsys):
    monkeypatch.setattr(sys, "stdout", BrokenPipe())
    assert main(["caption", str(image_folder), "--model", str(saved_model_dir), "--max-new-tokens", "3"]) == 141
    err = capsys.readouterr().err  # only transformers' weight-loading progress bar
    assert "error" not in err and "Broken pipe" not in err


def test_a_folder_of_another_model_type_is_refused_without_a_prompt_or_its_code(
    saved_model_dir, image_folder, tmp_path, monkeypatch, capsys
):
    # A saved folder carries code and an auto_map: with another model_type, transformers would ask whether to run it.
    marker = tmp_path / "code-ran"
    (saved_model_dir / "configuration_clipcap.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((saved_model_dir / "config.json").read_text())
    config["model_type"] = "evilcap"
    (saved_model_dir / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # a prompt, if any, would read a yes
    assert main(["caption", str(image_folder / "img0.png"), "--model", str(saved_model_dir), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"clipcap caption: error: --model: {saved_model_dir} holds a model of type 'evilcap' (config.json's "
        "model_type), not a ClipCap model; give a ClipCap folder or Hub name.\n"
    )
    assert not marker.exists()


def test_a_hub_name_that_is_not_cached_fails_at_once_offline_naming_the_option(image_folder, capsys):
    assert main(["caption", str(image_folder / "img0.png"), "--model", "someone/clipcap-not-cached"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipcap caption: error: --model someone/clipcap-not-cached: ")
    assert "HF_HUB_OFFLINE is set" in err and "Give --model a local folder" in err


def record_connections_and_sleeps(monkeypatch) -> tuple[list, list]:
    """Every address a socket connects to from now on, and every `time.sleep` (a retry's back-off, here skipped)."""
    import socket
    import time

    connections, sleeps = [], []
    real_connect = socket.socket.connect

    def connect(sock, address):
        connections.append(address)
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(time, "sleep", sleeps.append)
    return connections, sleeps


def test_a_hub_name_that_is_not_cached_fails_at_once_when_the_hub_cannot_be_reached(image_folder, monkeypatch, capsys):
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    connections, sleeps = record_connections_and_sleeps(monkeypatch)
    assert main(["caption", str(image_folder / "img0.png"), "--model", "someone/clipcap-not-cached"]) == 2
    assert connections == [("127.0.0.1", 9)] and sleeps == []  # the Hub tried once: no retry, no back-off
    err = capsys.readouterr().err
    assert "--model someone/clipcap-not-cached: " in err and "http://127.0.0.1:9 cannot be reached" in err


def test_file_names_with_newlines_or_tabs_are_escaped_in_plain_output(saved_model_dir, tmp_path, capsys):
    folder = tmp_path / "odd"
    folder.mkdir()
    paths = [folder / "two\nlines.png", folder / "a\ttab.png"]
    for path, image in zip(paths, random_images(2)):
        image.save(path, format="PNG")
    assert main(["caption", *map(str, paths), "--model", str(saved_model_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [f"{folder}/two\\nlines.png", f"{folder}/a\\ttab.png"]
    assert all(line.count("\t") == 1 for line in lines)
    assert main(["interpret", str(paths[0]), "--model", str(saved_model_dir), "--top-k", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{folder}/two\\nlines.png"


def test_caption_and_evaluate_decode_alike_by_default_and_say_so(capsys):
    from clipcap_hf.commands import build_parser

    parser = build_parser()
    caption = parser.parse_args(["caption", "x.png", "--model", "m"])
    evaluate = parser.parse_args(["evaluate", "--model", "m", "--data", "d", "--output-dir", "o"])
    # evaluate leaves --num-beams unset ("not given", which --predictions refuses) until its argument check.
    from clipcap_hf.commands.evaluate import _check_arguments

    assert caption.num_beams == _check_arguments(evaluate)["num_beams"] == 1
    helps = []
    for command in ("caption", "evaluate"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        helps.append(" ".join(capsys.readouterr().out.split()))
    for text in helps:
        assert "(default: 1, greedy decoding, for both `clipcap caption` and `clipcap evaluate`)" in text


def test_the_hub_is_probed_through_the_proxy_when_one_is_set(image_folder, monkeypatch, capsys):
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    assert main(["caption", str(image_folder / "img0.png"), "--model", "someone/clipcap-not-cached"]) == 2
    assert "https://hub.invalid cannot be reached (through the proxy http://127.0.0.1:9): " in capsys.readouterr().err


def test_an_unreadable_file_with_a_newline_in_its_name_keeps_to_one_line_of_the_error(
    saved_model_dir, tmp_path, capsys
):
    path = tmp_path / "bad\nname.png"
    path.write_bytes(b"not an image")
    assert main(["caption", str(path), "--model", str(saved_model_dir)]) == 2
    err = capsys.readouterr().err
    lines = err[err.index("clipcap caption: error: "):].splitlines()
    assert lines[0] == "clipcap caption: error: 1 of 1 images could not be read:"
    assert lines[1].startswith(f"  Cannot read image {tmp_path}/bad\\nname.png: ")
    assert len(lines) == 2


@pytest.mark.parametrize("option", ["--tokenizer", "--vision-model"])
def test_convert_original_fails_at_once_when_a_part_is_on_an_unreachable_hub(
    tmp_path, tokenizer, tokenizer_dir, monkeypatch, capsys, option
):
    from huggingface_hub import constants
    from test_convert import make_original, save_release

    checkpoint = save_release(make_original("mlp", tokenizer), tmp_path / "release.pt")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    parts = {"--tokenizer": str(tokenizer_dir), "--vision-model": "someone/clip-not-cached"}
    parts[option] = "someone/part-not-cached"
    connections, sleeps = record_connections_and_sleeps(monkeypatch)
    argv = ["convert-original", str(checkpoint), "--output", str(tmp_path / "out"), "--vision-backend", "clip"]
    assert main([*argv, *(item for pair in parts.items() for item in pair)]) == 2
    assert connections == [("127.0.0.1", 9)] and sleeps == []  # the Hub tried once: no retry, no back-off
    spelled = f"`{option.lstrip('-').replace('-', '_')}` ({option})"
    assert capsys.readouterr().err.startswith(
        f"clipcap convert-original: error: {spelled} someone/part-not-cached: no such folder, and this Hub model is "
        "not in the local cache (http://127.0.0.1:9 cannot be reached: "
    )
    assert not (tmp_path / "out").exists()


def underscored(option: str) -> str:
    return "--" + option[2:].replace("-", "_")


@pytest.mark.parametrize(
    "command, option, values, dest, expected",
    [
        (["caption", "--model", "m"], "--data-files", ["a.parquet", "b.parquet"], "data_files",
         ["a.parquet", "b.parquet"]),
        (["caption", "x.png", "--model", "m", "--do-sample"], "--top-p=0.5", [], "top_p", 0.5),
        (["evaluate", "--data", "d", "--output-dir", "o"], "--max-new-tokens", ["7"], "max_new_tokens", 7),
        (["interpret", "x.png", "--model", "m"], "--top-k", ["3"], "top_k", 3),
        (["demo", "--model", "m"], "--top-k", ["4"], "top_k", 4),
        (["convert-original", "x.pt", "--output", "o"], "--no-normalize-prefix", [], "normalize_prefix", False),
        (["ablate", "--output-dir", "o"], "--prefix-lengths", ["2", "4"], "prefix_lengths", [2, 4]),
        (["export-onnx", "m", "--output", "o"], "--no-int8", [], "int8", False),
        (["quickstart"], "--output-dir", ["q"], "output_dir", "q"),
    ],
)
def test_argparse_subcommands_take_options_with_dashes_or_underscores(command, option, values, dest, expected):
    from clipcap_hf.commands import build_parser

    for spelling in (option, underscored(option)):
        args = build_parser().parse_args([*command, spelling, *values])
        assert getattr(args, dest) == expected, spelling


def test_an_underscored_option_is_named_as_help_spells_it_and_abbreviations_still_work(capsys):
    from clipcap_hf.commands import build_parser

    assert main(["caption", "x.png", "--model", "m", "--top_p", "2"]) == 2
    assert "argument --top-p: must be above 0 and at most 1, got 2" in capsys.readouterr().err
    args = build_parser().parse_args(["caption", "--model", "m", "--rerank", "c", "--", "--data_files"])
    assert args.rerank_model == "c"
    assert (args.images, args.data_files) == (["--data_files"], None)  # after `--`, nothing is an option


@pytest.mark.parametrize("dashed", [False, True])
def test_train_and_embed_take_options_with_underscores_or_dashes(tmp_path, dashed):
    from transformers import HfArgumentParser

    from clipcap_hf.training.arguments import EmbedArguments
    from clipcap_hf.training.run import parse_args

    def spell(option: str) -> str:
        return "--" + option[2:].replace("_", "-") if dashed else option

    _, data_args, training_args = parse_args([spell("--output_dir"), str(tmp_path), spell("--train_file"), "a.json"])
    assert (data_args.train_file, training_args.output_dir) == ("a.json", str(tmp_path))
    # What `clipcap embed` parses its arguments with.
    (embed_args,) = HfArgumentParser(EmbedArguments).parse_args_into_dataclasses(
        ["--model", "m", "--output", "o", spell("--train_file"), "a.json", spell("--image_column"), "jpg"]
    )
    assert (embed_args.train_file, embed_args.image_column) == ("a.json", "jpg")


@pytest.fixture
def config_only_model(tmp_path, tokenizer):
    """A ClipCap folder holding only its config.json (a GPT-2 of 128 positions, 4 image tokens): no weights to load."""
    folder = tmp_path / "config-only"
    tiny_config(tokenizer).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "command, source_error",
    [
        (["caption", "{tmp}/missing.png"], "No image matches '{tmp}/missing.png'."),
        (["caption", "--data-files", "{tmp}/missing.parquet", "--output", "{tmp}/captions"],
         "Data file {tmp}/missing.parquet does not exist."),
        (["evaluate", "--data", "{tmp}/missing.json", "--image-root", "{tmp}", "--output-dir", "{tmp}/scores"],
         "[Errno 2] No such file or directory: '{tmp}/missing.json'"),
    ],
)
def test_a_max_new_tokens_past_the_positions_is_refused_by_its_option_before_the_source_and_the_model_load(
    config_only_model, tmp_path, capsys, command, source_error
):
    # Neither the source nor the weights exist: the length is checked from the config before either is read.
    argv = [part.format(tmp=tmp_path) for part in command] + ["--model", str(config_only_model)]
    assert main([*argv, "--max-new-tokens", "125"]) == 2
    assert capsys.readouterr().err == (
        f"clipcap {command[0]}: error: --max-new-tokens 125 needs 129 positions (4 image tokens, then the caption), "
        f"but the language model of --model {config_only_model} has 128 (max_position_embeddings): give "
        "--max-new-tokens 124 or less.\n"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config-only"]  # no caption_run.json, no output

    # 124 fits: the run goes on to read its source (which is missing here).
    assert main([*argv, "--max-new-tokens", "124"]) == 2
    assert capsys.readouterr().err == f"clipcap {command[0]}: error: {source_error.format(tmp=tmp_path)}\n"


def test_rotary_positions_take_any_max_new_tokens_as_generate_does(tokenizer, tmp_path, capsys):
    from transformers import LlamaConfig

    from clipcap_hf.utils.loading import check_caption_fits_positions

    # Rotary positions have no table to run off: `generate` goes past max_position_embeddings, so the check lets it.
    text_config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8)
    tiny_config(tokenizer, text_config=text_config).save_pretrained(tmp_path / "llama")
    check_caption_fits_positions(str(tmp_path / "llama"), 100, "--max-new-tokens")
    # A folder of another model type is named as --model is, before its config is read as ClipCap's.
    (tmp_path / "gpt2").mkdir()
    text_config.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"^--model: .*gpt2 holds a model of type 'llama'"):
        check_caption_fits_positions(str(tmp_path / "gpt2"), 100, "--max-new-tokens")


def test_loading_a_model_announces_no_slow_image_processor_and_keeps_its_fast_tokenizer(saved_model_dir):
    import logging

    from transformers.utils import logging as transformers_logging

    from clipcap_hf.utils.loading import load_clipcap

    # transformers 4.x said once per process, of ClipCapImageProcessor, which has no fast variant, that it used "a
    # slow image processor as `use_fast` is unset" and that outputs would change: forget that it was said.
    transformers_logging.warning_once.cache_clear()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        _, processor = load_clipcap(str(saved_model_dir))
    finally:
        transformers_logger.removeHandler(handler)
    assert [record.getMessage() for record in records if "image processor" in record.getMessage()] == []
    assert processor.tokenizer.is_fast  # use_fast=False would have silenced it by loading the slow tokenizer
