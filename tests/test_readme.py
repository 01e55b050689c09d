"""README's usage blocks run as written (with a tiny local model in place of the Hub name)."""

import re
from pathlib import Path

from conftest import random_images

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_usage_and_pipeline_blocks_run(saved_model_dir, tmp_path, monkeypatch, capsys):
    for name, image in zip(("dog.jpg", "cat.jpg"), random_images(2)):
        image.save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks("Use")
    assert len(blocks) >= 2
    for block in blocks[:2]:  # the core API and the pipelines
        exec(block.replace("path/or/hub-name", str(saved_model_dir)), {})
    printed = capsys.readouterr().out
    assert printed.startswith("[") and printed.count("'") >= 4  # two decoded captions
