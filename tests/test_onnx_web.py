"""The browser captioner (web/): onnxruntime-web in headless Chromium captions as the Python ONNX captioner does.

onnxruntime-web comes from npm: the first run installs it into web/node_modules (git-ignored) with `npm ci` (the
versions of web/package-lock.json); the test is skipped, with the reason, where npm is missing or the install fails
(no registry).
"""

import json
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from browser import serve_folder
from conftest import IMAGE_SIZE, random_images

WEB = Path(__file__).resolve().parent.parent / "web"
WAIT_S = 60


@pytest.fixture(scope="module")
def onnxruntime_web():
    """web/node_modules with onnxruntime-web, installed from npm when missing."""
    runtime = WEB / "node_modules" / "onnxruntime-web" / "dist" / "ort.min.js"
    if not runtime.is_file():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed (apt-get install -y npm), so onnxruntime-web cannot be installed")
        result = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=WEB, capture_output=True,
                                text=True, timeout=600, check=False)
        if result.returncode != 0 or not runtime.is_file():
            pytest.skip(f"npm ci (onnxruntime-web) failed in {WEB}: {result.stderr.strip()[-300:]}")
    return runtime


@pytest.fixture(scope="module")
def site(tmp_path_factory, onnx_export, onnxruntime_web):
    """A folder serving the page (web/) and the exported model (model/) side by side."""
    root = tmp_path_factory.mktemp("site")
    os.symlink(WEB, root / "web")
    os.symlink(onnx_export[2], root / "model")
    with serve_folder(root) as url:
        yield url


def caption_in_browser(browser, url, image_path, quantized=False, model="../model/"):
    """The page's caption of `image_path` with the exported folder at `model` (?model=): (tokens, text)."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{url}/web/index.html?model={quote(model)}" + ("&quantized=1" if quantized else ""))
    def status():
        return browser.find_element("id", "status").text

    WebDriverWait(browser, WAIT_S).until(lambda _: status() != "loading", message="waiting for the model to load")
    assert status() == "ready", status()
    browser.find_element("id", "image").send_keys(str(image_path))
    caption = browser.find_element("id", "caption")
    WebDriverWait(browser, WAIT_S).until(lambda _: caption.get_attribute("data-state") in ("done", "error"),
                                         message="waiting for the caption")
    assert caption.get_attribute("data-state") == "done", caption.text
    return json.loads(caption.get_attribute("data-tokens")), caption.get_attribute("textContent")


def greedy_tokens(captioner, image):
    """`OnnxCaptioner`'s greedy tokens for one image, up to its EOS (the page stops there; a batch pads after it)."""
    pixel_values = captioner.processor.image_processor([image], return_tensors="np")["pixel_values"]
    row = captioner.generate(pixel_values=pixel_values)[0]
    eos = captioner.generation_config.eos_token_id
    return row[: row.index(eos) + 1] if eos in row else row


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
def test_browser_caption_equals_the_python_onnx_captioner(browser, site, onnx_export, tmp_path, quantized):
    from clipcap_hf.onnx import OnnxCaptioner

    captioner = OnnxCaptioner(onnx_export[2], quantized=quantized)
    # At the model's input size, so the page's canvas resampling (not PIL's bicubic) leaves the pixels as they are.
    images = random_images(3, seed=5, size=(IMAGE_SIZE, IMAGE_SIZE))
    expected = captioner.caption(images)
    assert all(expected)
    for index, image in enumerate(images):
        path = tmp_path / f"image{index}.png"
        image.save(path)
        tokens, caption = caption_in_browser(browser, site, path, quantized)
        assert tokens == greedy_tokens(captioner, image)
        assert caption == expected[index]


@pytest.mark.parametrize("model", ["../model", "{site}/model", "../model?download=true"],
                         ids=["relative", "absolute", "with-a-query"])
def test_browser_loads_a_folder_url_without_its_trailing_slash(browser, site, onnx_export, tmp_path, model):
    from clipcap_hf.onnx import OnnxCaptioner

    # Files resolved against ".../model" were looked for in its parent (HTTP 404 for /config.json here; another
    # export there would have loaded silently), as a Hub ".../resolve/main" URL resolved to ".../resolve/config.json".
    # The "/" goes before a query string: after it, the files would still resolve in the parent.
    image = random_images(1, seed=7, size=(IMAGE_SIZE, IMAGE_SIZE))[0]
    image.save(tmp_path / "image.png")
    tokens, _ = caption_in_browser(browser, site, tmp_path / "image.png", model=model.format(site=site))
    assert tokens == greedy_tokens(OnnxCaptioner(onnx_export[2]), image)


def favour_the_image_token(decoder_path, image_token, vocab_size):
    """Make the decoder graph's logit of the image token 100 (0 from its all-zero head row), above every other."""
    import onnx
    from onnx import helper, numpy_helper

    graph_model = onnx.load(decoder_path)
    graph = graph_model.graph
    for node in graph.node:
        for index, name in enumerate(node.output):
            if name == "logits":
                node.output[index] = "logits_before_favour"
    favour = np.zeros(vocab_size, np.float32)
    favour[image_token] = 100
    graph.initializer.append(numpy_helper.from_array(favour, "image_token_favour"))
    graph.node.append(helper.make_node("Add", ["logits_before_favour", "image_token_favour"], ["logits"]))
    onnx.save(graph_model, decoder_path)


def test_browser_never_generates_the_image_token_whatever_suppress_tokens_says(browser, onnx_export,
                                                                                onnxruntime_web, tmp_path):
    from clipcap_hf.onnx import OnnxCaptioner

    # A generation config's list of its own (a hand-edited file, or a model's list replaced before `export_onnx`)
    # lacks the image token; generate() still suppresses it, and so must the page (it followed the list alone, and
    # with the image token favoured it generated nothing else).
    model = tmp_path / "site" / "model"
    shutil.copytree(onnx_export[2], model)
    config = json.loads((model / "config.json").read_text())
    generation = json.loads((model / "generation_config.json").read_text())
    assert config["image_token_id"] in generation["suppress_tokens"]
    (model / "generation_config.json").write_text(json.dumps({**generation, "suppress_tokens": [5]}))
    favour_the_image_token(model / "onnx" / "decoder_model_merged.onnx", config["image_token_id"],
                           config["text_config"]["vocab_size"])
    os.symlink(WEB, tmp_path / "site" / "web")
    image = random_images(1, seed=8, size=(IMAGE_SIZE, IMAGE_SIZE))[0]
    image.save(tmp_path / "image.png")
    expected = greedy_tokens(OnnxCaptioner(model), image)
    assert expected and config["image_token_id"] not in expected and 5 not in expected
    with serve_folder(tmp_path / "site") as url:
        tokens, _ = caption_in_browser(browser, url, tmp_path / "image.png")
    assert tokens == expected


def test_browser_cuts_a_generation_config_length_to_the_learned_positions(browser, onnx_export, onnxruntime_web,
                                                                         tmp_path):
    from clipcap_hf.onnx import OnnxCaptioner

    # The tiny GPT-2 has 128 learned positions, 4 of them the image tokens: a generation config asking for 200 new
    # tokens is cut to 124, as in Python (the page read no position limit and failed on a Gather index at 129).
    model = tmp_path / "site" / "model"
    shutil.copytree(onnx_export[2], model)
    generation = json.loads((model / "generation_config.json").read_text())
    generation.update(max_new_tokens=200, eos_token_id=None)
    (model / "generation_config.json").write_text(json.dumps(generation))
    os.symlink(WEB, tmp_path / "site" / "web")
    image = random_images(1, seed=6, size=(IMAGE_SIZE, IMAGE_SIZE))[0]
    image.save(tmp_path / "image.png")
    expected = greedy_tokens(OnnxCaptioner(model), image)
    assert len(expected) == 124
    with serve_folder(tmp_path / "site") as url:
        tokens, _ = caption_in_browser(browser, url, tmp_path / "image.png")
    assert tokens == expected
