"""The python blocks of README.md and docs/*.md run as written, offline, against a tiny model.

The rule:

- Every ```python block of README.md and of each page in docs/ is a test of its own. It runs in a fresh interpreter
  (nothing of clipcap_hf is imported unless the block says so), offline, in a folder holding the files the blocks
  name: `dog.jpg`, `cat.jpg`, a Karpathy-format `dataset_coco.json` with its images under `coco/`, and a LoRA run's
  folder `clipcap-lora`.
- The model names the blocks use, the placeholder "path/or/hub-name" and "clipcap-coco-mlp" (the folder that
  README's `clipcap convert-original` command makes), are replaced by a tiny saved model.
- A block is skipped, with the reason, only when it contains one of SKIP_MARKERS, which mark what an offline CPU
  machine cannot have: a quoted Hub repository id ("owner/name"), `push_to_hub`, a released checkpoint file
  (`coco_weights.pt` and the like: a download) or `cuda`. Blocks that use the COCO metrics are skipped when
  pycocoevalcap (the `eval` extra) is not installed, as the metric tests are.

So a new block must either run as written here or carry one of the markers; there is no other way to leave it out.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import random_images, tiny_model

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

MODEL_NAMES = ("path/or/hub-name", "clipcap-coco-mlp")
SKIP_MARKERS = {
    r"""["'][A-Za-z0-9][\w.-]*/[\w.-]+["']""": "downloads from the Hub",
    r"\bpush_to_hub\b": "uploads to the Hub",
    r"\w+_weights\.pt\b": "needs a checkpoint released with the paper (a download)",
    r"\bcuda\b": "needs a GPU",
}
NEEDS_METRICS = r"\b(CocoCaptionMetric|compute_caption_metrics)\b"


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def all_blocks() -> list:
    return [
        pytest.param(page, block, id=f"{page.relative_to(ROOT)}-{number}")
        for page in PAGES
        for number, block in enumerate(python_blocks(page), start=1)
    ]


def skip_reason(block: str) -> str | None:
    for pattern, reason in SKIP_MARKERS.items():
        if re.search(pattern, block):
            return reason
    if re.search(NEEDS_METRICS, block) and importlib.util.find_spec("pycocoevalcap") is None:
        return "the COCO caption metrics need pycocoevalcap (the `eval` extra)"
    return None


def run_block(block: str, cwd: Path) -> str:
    """Run a block in a fresh interpreter, as a user would: nothing of clipcap_hf is imported unless it says so."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", block],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer, processor):
    """The folder the blocks run in, and the tiny saved model that stands in for the model names."""
    folder = tmp_path_factory.mktemp("blocks")
    model_dir = tmp_path_factory.mktemp("model") / "clipcap"
    model = tiny_model(tokenizer, "mlp")
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)

    images = random_images(8)
    for name, image in zip(("dog.jpg", "cat.jpg"), images):
        image.save(folder / name)
    # A Karpathy-format COCO split file with two images per split.
    records = []
    splits = ["train", "train", "restval", "val", "val", "test", "test"]
    for index, (split, image) in enumerate(zip(splits, images[1:])):
        subfolder = "val2014" if split in ("val", "test") else "train2014"
        (folder / "coco" / subfolder).mkdir(parents=True, exist_ok=True)
        image.save(folder / "coco" / subfolder / f"{index}.jpg")
        sentences = [{"raw": f"A photo number {index}."}, {"raw": "Some shapes on a background."}]
        records.append(
            {"filepath": subfolder, "filename": f"{index}.jpg", "split": split, "cocoid": index, "sentences": sentences}
        )
    (folder / "dataset_coco.json").write_text(json.dumps({"images": records}))
    # A LoRA run's folder, as `clipcap train --recipe lora` leaves it: adapters and mapper, naming their base model.
    from peft import LoraConfig, get_peft_model

    base = type(model).from_pretrained(model_dir)
    lora = LoraConfig(r=2, target_modules=r"language_model\..*\.(c_attn)", modules_to_save=["mapping_network"],
                      fan_in_fan_out=True)
    get_peft_model(base, lora).save_pretrained(folder / "clipcap-lora")
    processor.save_pretrained(folder / "clipcap-lora")
    return folder, model_dir


@pytest.mark.parametrize(("page", "block"), all_blocks())
def test_python_block_runs(page, block, workspace):
    reason = skip_reason(block)
    if reason:
        pytest.skip(reason)
    folder, model_dir = workspace
    for name in MODEL_NAMES:
        block = block.replace(f'"{name}"', f'"{model_dir}"')
    printed = run_block(block, folder)
    if page == README and "batch_decode" in block:
        assert printed.startswith("[") and printed.count("'") >= 4  # two decoded captions


def test_readme_blocks_are_found_and_most_docs_blocks_run():
    blocks = [block for page in PAGES for block in python_blocks(page)]
    assert len(python_blocks(README)) >= 2
    assert sum(skip_reason(block) is None for block in blocks) >= 8


def test_blocks_that_load_clipcap_folders_import_the_package():
    # The Auto classes and the pipelines know "clipcap" only once clipcap_hf is imported.
    for page in PAGES:
        for block in python_blocks(page):
            if re.search(r"\bAuto\w+\.from_pretrained\(|\bpipeline\(", block) and "trust_remote_code" not in block:
                assert re.search(r"^(import|from) clipcap_hf\b", block, flags=re.M), block


def test_readme_is_short_and_links_every_docs_page():
    readme = README.read_text()
    assert len(readme.splitlines()) <= 200
    assert "(docs/index.md)" in readme
    index = (DOCS / "index.md").read_text()
    for page in DOCS.glob("*.md"):
        if page.name != "index.md":
            assert f"({page.name})" in index, f"docs/index.md does not list {page.name}"


def test_links_and_paths_stay_inside_the_repository():
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if "://" in target:
                continue
            resolved = (page.parent / target).resolve()
            assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{page.name}: broken link {target}"
        for path in re.findall(r"(?:\.\./)+[\w.-]*", text):
            assert (page.parent / path).resolve().is_relative_to(ROOT), f"{page.name} names {path}, outside the repo"
