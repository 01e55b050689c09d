"""README's usage blocks run as written (with a tiny local model in place of the Hub name)."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import random_images

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str | None = None) -> list[str]:
    text = README.read_text()
    if section is not None:
        text = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def run_block(block: str, cwd: Path) -> str:
    """Run a block in a fresh interpreter, as a user would: nothing of clipcap_hf is imported unless it says so."""
    result = subprocess.run(
        [sys.executable, "-c", block], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_usage_and_pipeline_blocks_run(saved_model_dir, tmp_path):
    for name, image in zip(("dog.jpg", "cat.jpg"), random_images(2)):
        image.save(tmp_path / name)
    blocks = python_blocks("Use")
    assert len(blocks) >= 2
    # The core API and the pipelines (the later blocks download pretrained parts).
    printed = [run_block(block.replace("path/or/hub-name", str(saved_model_dir)), tmp_path) for block in blocks[:2]]
    assert printed[0].startswith("[") and printed[0].count("'") >= 4  # two decoded captions


def test_blocks_that_load_clipcap_folders_import_the_package():
    # The Auto classes and the pipelines know "clipcap" only once clipcap_hf is imported.
    for block in python_blocks():
        if re.search(r"\bAuto\w+\.from_pretrained\(|\bpipeline\(", block) and "trust_remote_code" not in block:
            assert re.search(r"^(import|from) clipcap_hf\b", block, flags=re.M), block
