"""The HTML gallery, read back from headless Chromium the way a person would see it."""

import base64
import html.parser
import io
import json
import os
import re

import PIL.Image
import pytest
from browser import serve_folder
from conftest import random_images

from clipcap_hf import ClipCapForConditionalGeneration, ClipCapProcessor
from clipcap_hf.commands import main
from clipcap_hf.evaluation.gallery import GalleryRecord, render_gallery, write_gallery
from clipcap_hf.image_processing_clipcap import to_rgb_image

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
    # Shown x100, on the scale of `clipcap evaluate`'s metrics table, and the page says so.
    assert rows[0]["cells"][2:] == ["caption a", "ref a 1\nref a 2", "50.00", "25.00"]
    assert [row["cells"][5] for row in rows] == ["25.00", "75.00", "50.00", "\u2013"]
    assert browser.find_element("css selector", ".summary").text == (
        "4 images. Scores are \u00d7100, as in the metrics table and captioning papers. Click a score to sort by it, "
        "worst first; click again for best first."
    )

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
    assert first["cells"][2:] == [caption, "<b>bold</b>", "50.00"]
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
        ("scores", {0: 0.5}, "Score names must be strings, got 0"),  # integer keys, as from a DataFrame's columns
        ("columns", {1: "a caption"}, "`columns` must map column titles to strings, got {1: 'a caption'}"),
        ("image", None, "`image` must be an image file's path or a PIL image, got NoneType"),
        ("image", b"\x89PNG", "`image` must be an image file's path or a PIL image, got bytes: open other forms"),
        ("name", 123, "`name` must be a string, got 123"),
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


def test_evaluate_gallery_scores_match_the_metrics_table_and_unreadable_images_are_named(tmp_path, browser, capsys):
    pytest.importorskip("pycocoevalcap", reason='pycocoevalcap is not installed (pip install -e ".[dev]")')
    references = {7: ["a dog runs on the beach", "a dog on the sand"], 8: ["two cats sleep on a sofa"],
                  9: ["a man rides a bicycle down the street"]}
    predictions = {7: "a dog runs on the beach", 8: "a cat on a sofa", 9: "a red circle"}
    images = tmp_path / "images"
    images.mkdir()
    for image_id, image in zip((7, 8), random_images(2)):
        image.save(images / f"{image_id}.png")
    (images / "9.png").write_bytes(b"not a png")  # scored from its caption, but shown as unreadable
    annotations = tmp_path / "captions.json"
    annotations.write_text(json.dumps({
        "images": [{"id": image_id, "file_name": f"{image_id}.png"} for image_id in references],
        "annotations": [{"image_id": i, "caption": c} for i, captions in references.items() for c in captions],
    }))
    predictions_file = tmp_path / "predictions.json"
    predictions_file.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in predictions.items()]))
    page = tmp_path / "gallery.html"
    assert main(["evaluate", "--predictions", str(predictions_file), "--data", str(annotations), "--data-format",
                 "coco", "--image-root", str(images), "--output-dir", str(tmp_path / "eval"), "--gallery", str(page),
                 "--metrics", "bleu", "cider"]) == 0
    header, _, overall = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line[:1] == "|"]
    table_cider = float(overall[[cell.strip() for cell in header].index("CIDEr")])

    open_page(browser, page)
    click_header(browser, "CIDEr")
    rows = browser.execute_script(READ_ROWS)
    assert [row["cells"][1].split("\n")[0] for row in rows] == ["9", "8", "7"]  # worst caption first
    assert [row["cells"][2] for row in rows] == [predictions[9], predictions[8], predictions[7]]
    assert [row["cells"][3] for row in rows] == ["\n".join(references[image_id]) for image_id in (9, 8, 7)]
    assert rows[0]["image"] is None
    assert rows[0]["cells"][1].split("\n", 1)[1].strip().startswith(
        f"Cannot read image {images / '9.png'}: cannot identify image file"
    )
    assert all(row["image"]["inline"] for row in rows[1:])
    # The page shows per-image CIDEr on the table's scale: the overall CIDEr is their mean.
    shown = [float(row["cells"][-1]) for row in rows]
    assert shown[0] == 0.0 and shown[2] > shown[1] > 0
    assert sum(shown) / len(shown) == pytest.approx(table_cider, abs=0.01)


def thumbnails(page: str) -> list:
    """The JPEG thumbnails embedded in a page, decoded."""
    return [PIL.Image.open(io.BytesIO(base64.b64decode(data))) for data in re.findall(r'base64,([^"]+)"', page)]


def test_thumbnails_show_the_image_as_the_model_sees_it(tmp_path):
    # Stored 60x20, left half red and right half blue, with EXIF "rotate 90 degrees clockwise to display".
    stored = PIL.Image.new("RGB", (60, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 30, 20))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    # Transparent everywhere but a red top half; the hidden colour is black.
    transparent = PIL.Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    transparent.paste((255, 0, 0, 255), (0, 0, 40, 20))
    transparent.save(tmp_path / "transparent.png")

    page = render_gallery([{"image": tmp_path / "rotated.jpg", "caption": "a"}, {"image": transparent, "caption": "b"}])
    rotated_thumbnail, transparent_thumbnail = thumbnails(page)
    assert rotated_thumbnail.size == to_rgb_image(PIL.Image.open(tmp_path / "rotated.jpg")).size == (20, 60)
    top, bottom = rotated_thumbnail.getpixel((10, 5)), rotated_thumbnail.getpixel((10, 55))
    assert max(abs(a - b) for a, b in zip(top, (255, 0, 0))) <= 8  # JPEG shifts colours a little
    assert max(abs(a - b) for a, b in zip(bottom, (0, 0, 255))) <= 8
    assert transparent_thumbnail.getpixel((20, 35)) == (255, 255, 255)  # white, not the hidden black
    assert transparent.mode == "RGBA"  # the caller's image is left as it was


def test_decompression_bomb_is_shown_as_an_unreadable_image(tmp_path, monkeypatch):
    PIL.Image.new("RGB", (30, 20)).save(tmp_path / "huge.png")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 250)  # 600 pixels is over twice the limit: refused
    small = random_images(1, size=(10, 10))[0]
    page = render_gallery([{"image": tmp_path / "huge.png", "caption": "a"}, {"image": small, "caption": "b"}])
    assert len(thumbnails(page)) == 1
    message = f"Cannot read image {tmp_path / 'huge.png'}: Image size (600 pixels) exceeds limit of 500 pixels"
    assert f'<div class="unreadable"><strong>{tmp_path / "huge.png"}</strong><p>{message}' in page


def test_names_that_are_not_utf8_are_shown_with_replacement_characters(tmp_path):
    # Linux file names are bytes; Python hands this one over as "bad\udcff.png", which UTF-8 cannot encode.
    name = os.fsdecode(b"bad\xff.png")
    random_images(1)[0].save(tmp_path / name)
    page = write_gallery([{"image": tmp_path / name, "caption": f"caption of {name}"}], tmp_path / "gallery.html")
    html = page.read_bytes().decode("utf-8")
    assert len(thumbnails(html)) == 1
    assert f'alt="{tmp_path}/bad\ufffd.png"' in html
    assert '<td class="caption">caption of bad\ufffd.png</td>' in html


def test_a_failed_write_leaves_the_earlier_page_in_place(tmp_path, monkeypatch):
    page = tmp_path / "gallery.html"
    page.write_text("earlier page")

    def fail(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space left on device"):
        write_gallery([{"image": random_images(1)[0], "caption": "new"}], page)
    assert page.read_text() == "earlier page"
    assert os.listdir(tmp_path) == ["gallery.html"]  # and no temporary file left behind


class _PageText(html.parser.HTMLParser):
    """The page as a parser reads it, without a browser: its elements, and the text of the title and of each cell."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.title, self.rows = [], "", []
        self._in_title = self._cell = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "title":
            self._in_title = True
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th") and self.rows:
            self.rows[-1].append("")
            self._cell = True

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag in ("td", "th"):
            self._cell = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        elif self._cell:
            self.rows[-1][-1] += data


def test_markup_in_captions_names_references_scores_and_title_is_escaped_in_the_page_text(tmp_path):
    markup = {
        "caption": '<img src=x onerror="alert(1)"> & "quoted" </td>',
        "reference": "<b>bold</b><script>alert(2)</script>",
        "score": "<CIDEr>",
        "name": "a<script>alert(3)</script>.png",
        "title": "</title><script>alert(4)</script>",
    }
    records = [GalleryRecord(random_images(1)[0], markup["caption"], references=[markup["reference"]],
                             scores={markup["score"]: 0.5}, name=markup["name"])]
    page = _PageText()
    page.feed(render_gallery(records, title=markup["title"]))
    # The page's own elements only, once each where it has one (the title, the sorting script, the thumbnail): none
    # comes from the text.
    tags = [tag for tag, _ in page.tags]
    assert set(tags) == {"html", "head", "meta", "link", "title", "style", "body", "h1", "p", "table", "thead", "tr",
                         "th", "button", "tbody", "td", "img", "div", "ul", "li", "script"}
    assert (tags.count("title"), tags.count("script"), tags.count("img"), tags.count("td")) == (1, 1, 1, 5)
    assert [attrs["alt"] for tag, attrs in page.tags if tag == "img"] == [markup["name"]]
    assert page.title == markup["title"]
    header, row = page.rows
    assert header[-1] == markup["score"]
    _, image, caption, references, score = row
    assert (caption, references.strip(), score) == (markup["caption"], markup["reference"], "50.00")
    assert image.strip() == markup["name"]
