"""The Gradio demo, driven end to end in headless Chromium: upload, click, read what the page shows."""

import re
import sys

import PIL.Image
import pytest
from conftest import PREFIX_LENGTH, random_images, tiny_config, tiny_model

from clipcap_hf import ClipCapForConditionalGeneration
from clipcap_hf.commands import main
from clipcap_hf.commands.demo import build_demo, caption_and_interpret

WAIT_S = 30
GRADIO_MISSING = 'Gradio is not installed (pip install -e ".[dev]")'

# The cells of a Gradio dataframe, as rows of text; its cells are marked `data-testid="cell-ROW-COLUMN"`.
READ_TABLE = """
const rows = [];
for (const cell of document.querySelectorAll(`#${arguments[0]} [data-testid^="cell-"]`)) {
  const [row, column] = cell.dataset.testid.split("-").slice(1).map(Number);
  (rows[row] ??= [])[column] = cell.innerText.trim();
}
return rows;
"""


@pytest.fixture(scope="module")
def demo_app(tokenizer, processor):
    """The demo of a tiny model, served on 127.0.0.1; yields (url, model)."""
    pytest.importorskip("gradio", reason=GRADIO_MISSING)
    model = tiny_model(tokenizer, "mlp")
    demo = build_demo(model, processor, top_k=3)
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, share=False)
    try:
        yield url, model
    finally:
        demo.close()


def expected_captions(model, processor, path, **generate_kwargs):
    with PIL.Image.open(path) as image:
        inputs = processor(images=[image])
    generated = model.generate(**inputs, do_sample=False, **generate_kwargs)
    return [caption.strip() for caption in processor.batch_decode(generated, skip_special_tokens=True)]


def wait_for(browser, condition, what):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, WAIT_S).until(lambda _: condition(), message=f"waiting for {what}")


def element(browser, css):
    return browser.find_element("css selector", css)


def upload(browser, url, path):
    browser.get(url)
    wait_for(browser, lambda: browser.find_elements("css selector", "#image input[type=file]"), "the upload field")
    element(browser, "#image input[type=file]").send_keys(str(path))


def set_slider(browser, elem_id, value):
    field = element(browser, f"#{elem_id} input[type=number]")
    field.clear()
    field.send_keys(str(value), "\t")  # Gradio takes the number when the field loses focus


def caption_text(browser):
    return element(browser, "#captions textarea").get_attribute("value")


def press_caption_and_read(browser, previous=""):
    element(browser, "#caption-button").click()
    wait_for(browser, lambda: caption_text(browser) not in ("", previous), "the captions")
    return caption_text(browser).split("\n")


def page_text(browser):
    return element(browser, "body").text


def test_uploaded_image_is_captioned_as_generate_does(demo_app, browser, processor, tmp_path):
    url, model = demo_app
    path = tmp_path / "photo.png"
    random_images(1, seed=11, size=(60, 45))[0].save(path)
    upload(browser, url, path)
    wait_for(browser, lambda: browser.find_elements("css selector", "#preview img"), "the preview")

    # Default settings: greedy, one caption, 30 tokens.
    captions = press_caption_and_read(browser)
    assert captions == expected_captions(model, processor, path, max_new_tokens=30)

    # The prefix interpretation lists every prefix vector's 3 nearest tokens, as model.interpret_prefix does.
    rows = browser.execute_script(READ_TABLE, "interpretation")
    with PIL.Image.open(path) as image:
        pixel_values = processor(images=[image])["pixel_values"]
        (interpretation,) = model.interpret_prefix(pixel_values, tokenizer=processor, top_k=3)
    assert [row[0] for row in rows] == [str(position) for position in range(model.config.prefix_length)]
    shown = [[cell.rsplit(" ", 1) for cell in row[1:]] for row in rows]  # each cell: "'token' similarity"
    assert [[token for token, _ in row] for row in shown] == [
        [repr(match.token) for match in position] for position in interpretation.matches
    ]
    assert [[float(similarity) for _, similarity in row] for row in shown] == [
        pytest.approx([match.similarity for match in position], abs=5e-4) for position in interpretation.matches
    ]

    # Beam search, two captions, 6 tokens at most.
    browser.find_element("xpath", "//*[@id='decoding']//label[contains(., 'beam search')]").click()
    set_slider(browser, "num-beams", 3)
    set_slider(browser, "num-captions", 2)
    set_slider(browser, "max-length", 6)
    captions = press_caption_and_read(browser, previous=caption_text(browser))
    assert captions == expected_captions(model, processor, path, num_beams=3, num_return_sequences=2, max_new_tokens=6)


def test_an_upload_is_read_only_in_the_common_image_formats(tmp_path):
    from clipcap_hf.commands.demo import load_user_image

    random_images(1)[0].save(tmp_path / "photo.webp")
    assert load_user_image(tmp_path / "photo.webp").size == (48, 40)
    # PIL takes this for an EPS file and hands it to Ghostscript, a program a page served to strangers should not run.
    eps = tmp_path / "upload.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    with pytest.raises(ValueError) as error:
        load_user_image(eps)
    assert str(error.value).startswith("Cannot read image upload.eps: cannot identify image file")
    assert str(error.value).endswith("(the demo reads JPEG, PNG, WEBP, GIF, BMP, TIFF images)")
    assert "Ghostscript" not in str(error.value)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("broken.png", b"not really a png", "Cannot read image broken.png: cannot identify image file"),
        ("notes.txt", b"just some text", "Cannot read image notes.txt: cannot identify image file"),
    ],
)
def test_a_file_that_is_not_an_image_shows_a_readable_message(demo_app, browser, tmp_path, name, content, message):
    url, _ = demo_app
    path = tmp_path / name
    path.write_bytes(content)
    upload(browser, url, path)
    wait_for(browser, lambda: message in page_text(browser), f"the message {message!r}")
    assert caption_text(browser) == ""


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"decoding": "greedy", "num_captions": 2}, "Greedy decoding gives exactly one caption"),
        ({"decoding": "beam search", "num_beams": 2, "num_captions": 3}, "with 2 beams gives at most 2 captions"),
        ({"decoding": "sampling"}, "Decoding must be one of greedy, beam search"),
        ({"decoding": "beam search", "num_captions": 0}, "The number of captions must be at least 1, got 0"),
    ],
)
def test_settings_that_do_not_go_together_are_explained(mlp_model, processor, tmp_path, settings, message):
    path = tmp_path / "photo.png"
    random_images(1)[0].save(path)
    with pytest.raises(ValueError, match=message):
        caption_and_interpret(mlp_model, processor, path, **settings)


def test_preview_shows_the_image_as_the_model_sees_it(mlp_model, processor, tmp_path):
    pytest.importorskip("gradio", reason=GRADIO_MISSING)
    from clipcap_hf.image_processing_clipcap import to_rgb_image

    (preview,) = [f.fn for f in build_demo(mlp_model, processor).fns.values() if f.outputs[0].elem_id == "preview"]
    # Stored 60x20 with EXIF "rotate 90 degrees clockwise to display": previewed upright, as the processor takes it.
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    random_images(1, size=(60, 20))[0].save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    shown = preview(str(tmp_path / "rotated.jpg"))
    assert shown.size == (20, 60)
    assert shown.tobytes() == to_rgb_image(PIL.Image.open(tmp_path / "rotated.jpg")).tobytes()
    # Transparent areas on white, not on the black they hide.
    PIL.Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "transparent.png")
    shown = preview(str(tmp_path / "transparent.png"))
    assert (shown.mode, shown.getpixel((4, 4))) == ("RGB", (255, 255, 255))


def test_decompression_bomb_is_explained_by_file_name(mlp_model, processor, tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    PIL.Image.new("RGB", (30, 20)).save(path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 250)  # 600 pixels is over twice the limit: refused
    message = "Cannot read image huge.png: Image size (600 pixels) exceeds limit of 500 pixels"
    with pytest.raises(ValueError, match=re.escape(message)):
        caption_and_interpret(mlp_model, processor, path)


def test_a_folder_is_named_as_given_when_it_has_no_file_name(mlp_model, processor, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # "." has no name to shorten it to: the message keeps it, and the dots elsewhere in the message.
    with pytest.raises(ValueError, match=re.escape("Cannot read image .: [Errno 21] Is a directory: '.'")):
        caption_and_interpret(mlp_model, processor, ".")
    # An upload's temporary folder is left out wherever the message names it.
    (tmp_path / "photo.png").mkdir()
    with pytest.raises(ValueError) as caught:
        caption_and_interpret(mlp_model, processor, tmp_path / "photo.png")
    assert str(caught.value) == "Cannot read image photo.png: [Errno 21] Is a directory: 'photo.png'"


def test_no_image_is_explained(mlp_model, processor):
    with pytest.raises(ValueError, match="Upload an image or pick an example first"):
        caption_and_interpret(mlp_model, processor, None)


def test_demo_command_serves_examples_to_pick(saved_model_dir, tmp_path, browser, processor, monkeypatch):
    gradio = pytest.importorskip("gradio", reason=GRADIO_MISSING)

    from clipcap_hf import ClipCapForConditionalGeneration

    example = tmp_path / "examples" / "beach.png"
    example.parent.mkdir()
    random_images(1, seed=8, size=(40, 40))[0].save(example)
    launched = {}
    launch = gradio.Blocks.launch

    def launch_in_background(demo, **kwargs):
        # `clipcap demo` serves until interrupted; here it returns once the server is up, so the test can browse it.
        launched.update(kwargs, demo=demo)
        return launch(demo, **kwargs, prevent_thread_lock=True, quiet=True)

    monkeypatch.setattr(gradio.Blocks, "launch", launch_in_background)
    assert main(["demo", "--model", str(saved_model_dir), "--examples", str(example.parent)]) == 0
    demo = launched["demo"]
    try:
        assert launched["server_name"] == "127.0.0.1"
        browser.get(demo.local_url)
        wait_for(browser, lambda: browser.find_elements("xpath", "//*[text()='beach.png']"), "the example")
        browser.find_element("xpath", "//*[text()='beach.png']").click()
        wait_for(browser, lambda: browser.find_elements("css selector", "#preview img"), "the preview")
        captions = press_caption_and_read(browser)
    finally:
        demo.close()
    model = ClipCapForConditionalGeneration.from_pretrained(saved_model_dir).eval()
    assert captions == expected_captions(model, processor, example, max_new_tokens=30)


def test_demo_command_checks_top_k_before_launching(saved_model_dir, processor, monkeypatch, capsys):
    gradio = pytest.importorskip("gradio", reason=GRADIO_MISSING)
    monkeypatch.setattr(gradio.Blocks, "launch", lambda demo, **kwargs: pytest.fail("the demo was launched"))
    candidates = len(processor.tokenizer) - 1  # the image token is never one
    assert main(["demo", "--model", str(saved_model_dir), "--top-k", str(candidates + 1)]) == 2
    message = f"--top-k must be at most the vocabulary size less the image token ({candidates}), got {candidates + 1}"
    assert message in capsys.readouterr().err


def test_demo_command_without_gradio_says_what_to_install(saved_model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` fail as if it were not installed
    assert main(["demo", "--model", str(saved_model_dir)]) == 2
    assert 'The web demo needs Gradio: `pip install "clipcap_hf[demo]"`' in capsys.readouterr().err


def test_caption_and_interpret_matches_generate_for_beam_search(mlp_model, processor, tmp_path):
    path = tmp_path / "photo.png"
    random_images(1, seed=4)[0].save(path)
    captions, interpretation = caption_and_interpret(
        mlp_model, processor, path, decoding="beam search", num_beams=4, num_captions=3, max_new_tokens=5, top_k=2
    )
    assert captions == expected_captions(mlp_model, processor, path, num_beams=4, num_return_sequences=3,
                                         max_new_tokens=5)
    with PIL.Image.open(path) as image:
        inputs = processor(images=[image])
    assert interpretation == mlp_model.interpret_prefix(inputs["pixel_values"], tokenizer=processor, top_k=2)[0]


def test_caption_length_starts_at_the_model_generation_config(tokenizer, processor, tmp_path):
    pytest.importorskip("gradio", reason=GRADIO_MISSING)
    model = tiny_model(tokenizer, "mlp")
    model.generation_config.max_new_tokens = 67  # as converted paper checkpoints save it
    model.generation_config.eos_token_id = None  # every caption runs to its full length
    sliders = [block for block in build_demo(model, processor).blocks.values() if block.elem_id == "max-length"]
    assert [(slider.value, slider.maximum) for slider in sliders] == [(67, 100)]

    path = tmp_path / "photo.png"
    random_images(1, seed=4)[0].save(path)
    captions, _ = caption_and_interpret(model, processor, path)
    assert captions == expected_captions(model, processor, path, max_new_tokens=67)
    assert captions != expected_captions(model, processor, path, max_new_tokens=30)


def test_caption_length_starts_at_the_length_a_max_length_gives(tokenizer, processor, tmp_path):
    pytest.importorskip("gradio", reason=GRADIO_MISSING)
    model = tiny_model(tokenizer, "mlp")
    model.generation_config.max_new_tokens = None
    model.generation_config.max_length = PREFIX_LENGTH + 8  # counts the image tokens: 8 caption tokens
    model.generation_config.eos_token_id = None  # every caption runs to its full length
    sliders = [block for block in build_demo(model, processor).blocks.values() if block.elem_id == "max-length"]
    assert [(slider.value, slider.maximum) for slider in sliders] == [(8, 100)]

    path = tmp_path / "photo.png"
    random_images(1, seed=4)[0].save(path)
    captions, _ = caption_and_interpret(model, processor, path, max_new_tokens=sliders[0].value)
    assert captions == expected_captions(model, processor, path)  # generate's own length
    assert captions == expected_captions(model, processor, path, max_new_tokens=8)
    assert captions != expected_captions(model, processor, path, max_new_tokens=30)


def test_caption_length_ends_where_the_language_models_positions_do(tokenizer, processor, tmp_path):
    pytest.importorskip("gradio", reason=GRADIO_MISSING)
    config = tiny_config(tokenizer)
    # 20 positions after the 4 prefix vectors: the caption and the prefix fit the context, as training requires of
    # its generated captions (--generation_max_new_tokens).
    config.text_config.n_positions = 24
    model = ClipCapForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None  # every caption runs to its full length
    sliders = [block for block in build_demo(model, processor).blocks.values() if block.elem_id == "max-length"]
    assert [(slider.value, slider.maximum) for slider in sliders] == [(24 - PREFIX_LENGTH, 24 - PREFIX_LENGTH)]

    path = tmp_path / "photo.png"
    random_images(1, seed=4)[0].save(path)
    captions, _ = caption_and_interpret(model, processor, path, max_new_tokens=sliders[0].maximum)
    assert captions == expected_captions(model, processor, path, max_new_tokens=24 - PREFIX_LENGTH)


@pytest.mark.parametrize(
    "option, message",
    [
        (["--top-k", "0"], "argument --top-k: must be at least 1, got 0"),
        (["--port", "99999"], "argument --port: must be between 1 and 65535, got 99999"),
    ],
)
def test_demo_command_checks_options_before_loading_anything(tmp_path, monkeypatch, capsys, option, message):
    monkeypatch.setitem(sys.modules, "gradio", None)  # checked before Gradio is imported, and before the model
    assert main(["demo", "--model", str(tmp_path / "missing"), *option]) == 2
    assert capsys.readouterr().err.endswith(f"clipcap demo: error: {message}\n")
