"""The HTML gallery, read back from headless Chromium the way a person would see it."""

import re

import pytest
from browser import browser, serve_folder  # noqa: F401 (`browser` is a fixture)
from conftest import random_images

from clipcap_hf import ClipCapForConditionalGeneration, ClipCapProcessor
from clipcap_hf.cli import main
from clipcap_hf.gallery import GalleryRecord, render_gallery, write_gallery

# What a person sees in each row: the cells' rendered text, and the thumbnail's decoded size when there is one.
READ_ROWS = """
return Array.from(document.querySelectorAll("#gallery tbody tr")).map((row) => {
  const image = row.querySelector("img");
  return {
    cells: Array.from(row.cells).map((cell) => cell.innerText.trim()),
    image: image && {alt: image.alt, width: image.naturalWidth, height: image.naturalHeight,
                     inline: image.src.startsWith("data:image/jpeg;base64,")},
  };
});
"""


def open_page(browser, path):
    with serve_folder(path.parent) as base_url:
        browser.get(f"{base_url}/{path.name}")
        # Everything the page needs is inside it: the only request the browser made is the page itself.
        assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    return browser.execute_script(READ_ROWS)


def open_images(paths):
    import PIL.Image

    return [PIL.Image.open(path) for path in paths]


def click_header(browser, name):
    browser.execute_script(
        "for (const b of document.querySelectorAll('#gallery th button')) if (b.innerText.trim() === arguments[0]) "
        "{ b.click(); return; } throw new Error('no header ' + arguments[0]);",
        name,
    )


def test_caption_command_gallery_shows_every_image_with_its_caption(saved_model_dir, tmp_path, browser, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = [(48, 40), (30, 64), (300, 150)]
    for index, size in enumerate(sizes):
        random_images(1, seed=index, size=size)[0].save(folder / f"img{index}.png")
    page = tmp_path / "gallery.html"
    argv = ["caption", str(folder), "--model", str(saved_model_dir), "--max-new-tokens", "5", "--gallery", str(page)]
    assert main(argv) == 0
    assert f"Gallery: {page}" in capsys.readouterr().err

    model = ClipCapForConditionalGeneration.from_pretrained(saved_model_dir).eval()
    processor = ClipCapProcessor.from_pretrained(saved_model_dir)
    paths = sorted(folder.glob("*.png"))
    generated = model.generate(**processor(images=open_images(paths)), max_new_tokens=5)
    expected = [caption.strip() for caption in processor.batch_decode(generated, skip_special_tokens=True)]

    rows = open_page(browser, page)
    assert [row["cells"][0] for row in rows] == ["1", "2", "3"]
    assert [row["cells"][2] for row in rows] == expected
    assert [row["cells"][1] for row in rows] == [str(path) for path in paths]  # each thumbnail is named
    assert [row["image"]["alt"] for row in rows] == [str(path) for path in paths]
    assert all(row["image"]["inline"] for row in rows)
    # Small images keep their size; large ones shrink to fit 192 pixels, keeping their shape.
    assert [(row["image"]["width"], row["image"]["height"]) for row in rows] == [(48, 40), (30, 64), (192, 96)]
    assert browser.title == f"Captions by {saved_model_dir}"


def test_gallery_sorts_by_score_worst_first(tmp_path, browser):
    images = random_images(4, seed=5)
    cider = [0.5, 0.125, None, 0.875]
    bleu = [0.25, 0.75, 0.5, None]
    records = [
        {"image": image, "caption": f"caption {letter}", "references": [f"ref {letter} 1", f"ref {letter} 2"],
         "scores": {key: value for key, value in (("CIDEr", c), ("Bleu_4", b)) if value is not None}}
        for image, letter, c, b in zip(images, "abcd", cider, bleu)
    ]
    page = write_gallery(records, tmp_path / "scores.html", title="Scored")
    rows = open_page(browser, page)
    # Columns: #, image, caption, references, then the scores in the order the records name them.
    assert rows[0]["cells"][2:] == ["caption a", "ref a 1\nref a 2", "0.500", "0.250"]
    assert [row["cells"][5] for row in rows] == ["0.250", "0.750", "0.500", "\u2013"]

    def captions():
        return [row["cells"][2] for row in browser.execute_script(READ_ROWS)]

    click_header(browser, "CIDEr")
    assert captions() == ["caption b", "caption a", "caption d", "caption c"]  # worst first, unscored last
    click_header(browser, "CIDEr")
    assert captions() == ["caption d", "caption a", "caption b", "caption c"]
    click_header(browser, "Bleu_4")
    assert captions() == ["caption a", "caption c", "caption b", "caption d"]
    click_header(browser, "#")  # back to the original order
    assert captions() == ["caption a", "caption b", "caption c", "caption d"]
    sort_states = browser.execute_script(
        "return Array.from(document.querySelectorAll('#gallery th[aria-sort]')).map((h) => h.getAttribute('aria-sort'))"
    )
    assert sort_states == ["ascending", "none", "none"]


def test_unreadable_images_and_markup_in_text_are_shown_as_text(tmp_path, browser):
    broken = tmp_path / "broken <1>.png"
    broken.write_bytes(b"not a png")
    caption = '<img src=x onerror="window.injected = 1"> & "quoted"'
    records = [
        GalleryRecord(broken, caption, references=["<b>bold</b>"], scores={"<CIDEr>": 0.5}),
        GalleryRecord(tmp_path / "missing.jpg", "second"),
        GalleryRecord(random_images(1)[0], "third", name="generated & named"),
    ]
    page = write_gallery(records, tmp_path / "odd.html", title="<script>window.injected = 2</script>")
    rows = open_page(browser, page)
    assert browser.execute_script("return window.injected") is None
    assert browser.title == "<script>window.injected = 2</script>"

    first, second, third = rows
    assert first["image"] is None
    name, error = first["cells"][1].split("\n", 1)  # the file name, then the error, in place of the thumbnail
    assert name == str(broken)
    assert error.strip().startswith(f"Cannot read image {broken}: cannot identify image file")
    assert first["cells"][2:] == [caption, "<b>bold</b>", "0.500"]
    assert second["image"] is None
    name, error = second["cells"][1].split("\n", 1)
    assert name == str(tmp_path / "missing.jpg")
    assert "No such file or directory" in error
    assert second["cells"][3:] == ["", "\u2013"]
    assert third["image"]["alt"] == third["cells"][1] == "generated & named"
    assert (third["image"]["width"], third["image"]["height"]) == (48, 40)
    assert browser.execute_script("return document.querySelector('#gallery th:last-child').innerText") == "<CIDEr>"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("image_id", 3, "image_id"),
        ("caption", None, "`caption` must be a string, got None"),
        ("references", "one ref", "`references` must be a list of strings, got 'one ref'"),
        ("scores", {"CIDEr": "0.5"}, "Score 'CIDEr' must be a number, got '0.5'"),
    ],
)
def test_bad_records_are_named_with_their_index(tmp_path, field, value, message):
    good = {"image": "a.png", "caption": "x"}
    with pytest.raises(ValueError, match=rf"Gallery record 1: .*{re.escape(message)}"):
        write_gallery([good, {**good, field: value}], tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()


def test_thumbnail_size_must_be_positive():
    with pytest.raises(ValueError, match="`thumbnail_size` must be at least 1 pixel, got 0"):
        render_gallery([{"image": "a.png", "caption": "x"}], thumbnail_size=0)


def test_gallery_folder_must_exist_before_captioning(saved_model_dir, tmp_path, capsys):
    image = tmp_path / "a.png"
    random_images(1)[0].save(image)
    missing = tmp_path / "nowhere" / "gallery.html"
    assert main(["caption", str(image), "--model", str(saved_model_dir), "--gallery", str(missing)]) == 2
    captured = capsys.readouterr()
    assert f"--gallery: folder {missing.parent} does not exist" in captured.err
    assert captured.out == ""


def test_per_image_metrics_plug_into_the_gallery(tmp_path, browser):
    pytest.importorskip("pycocoevalcap", reason='pycocoevalcap is not installed (pip install -e ".[dev]")')
    from clipcap_hf.metrics import compute_caption_metrics

    predictions = {7: "a dog runs on the beach", 8: "a cat on a sofa", 9: "a red circle"}
    references = {7: ["a dog runs on the beach", "a dog on the sand"], 8: ["two cats sleep on a sofa"],
                  9: ["a man rides a bicycle down the street"]}
    _, per_image = compute_caption_metrics(
        predictions, references, metrics=["bleu", "cider"], tokenize=False, return_per_image=True
    )
    records = [
        {"image": image, "caption": predictions[image_id], "references": references[image_id],
         "scores": per_image[image_id], "name": f"COCO {image_id}"}
        for image, image_id in zip(random_images(3), predictions)
    ]
    page = write_gallery(records, tmp_path / "evaluation.html")
    open_page(browser, page)
    click_header(browser, "CIDEr")
    rows = browser.execute_script(READ_ROWS)
    worst_first = sorted(predictions, key=lambda image_id: per_image[image_id]["CIDEr"])
    assert [row["cells"][1] for row in rows] == [f"COCO {image_id}" for image_id in worst_first]
    assert [row["cells"][-1] for row in rows] == [f"{per_image[image_id]['CIDEr']:.3f}" for image_id in worst_first]
