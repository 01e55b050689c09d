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


def caption_in_browser(browser, url, image_path, quantized=False):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{url}/web/index.html?model=../model/" + ("&quantized=1" if quantized else ""))
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


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
def test_browser_caption_equals_the_python_onnx_captioner(browser, site, onnx_export, tmp_path, quantized):
    from clipcap_hf.onnx import OnnxCaptioner

    captioner = OnnxCaptioner(onnx_export[2], quantized=quantized)
    # At the model's input size, so the page's canvas resampling (not PIL's bicubic) leaves the pixels as they are.
    images = random_images(3, seed=5, size=(IMAGE_SIZE, IMAGE_SIZE))
    expected = captioner.caption(images)
    pixel_values = captioner.processor.image_processor(images, return_tensors="np")["pixel_values"]
    expected_tokens = captioner.generate(pixel_values=pixel_values)
    eos = captioner.generation_config.eos_token_id
    assert all(expected)
    for index, image in enumerate(images):
        path = tmp_path / f"image{index}.png"
        image.save(path)
        tokens, caption = caption_in_browser(browser, site, path, quantized)
        # Python's greedy rows are padded after their EOS to the longest; the page stops at the EOS.
        row = expected_tokens[index]
        assert tokens == (row[: row.index(eos) + 1] if eos in row else row)
        assert caption == expected[index]


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
    captioner = OnnxCaptioner(model)
    pixel_values = captioner.processor.image_processor([image], return_tensors="np")["pixel_values"]
    expected = captioner.generate(pixel_values=pixel_values)[0]
    assert len(expected) == 124
    with serve_folder(tmp_path / "site") as url:
        tokens, _ = caption_in_browser(browser, url, tmp_path / "image.png")
    assert tokens == expected
