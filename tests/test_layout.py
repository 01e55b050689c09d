"""The package's import boundaries: `import clipcap_hf` loads only what registering the model needs, and
`clipcap caption` runs where only torch, transformers, tokenizers, safetensors and pillow are installed."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import random_images

import clipcap_hf

OPTIONAL_DEPENDENCIES = (
    "datasets", "evaluate", "peft", "gradio", "open_clip", "pycocoevalcap",
    "onnx", "onnxruntime", "onnxscript", "ray", "matplotlib",
)  # not torchao: transformers' modeling_utils imports it whenever it is installed
SUBPACKAGES = sorted(path.parent.name for path in Path(clipcap_hf.__file__).parent.glob("*/__init__.py"))


def run_python(code: str) -> str:
    """Run `code` in a fresh interpreter; return what it printed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_loads_no_optional_dependency_and_no_subpackage():
    assert {"commands", "conversion", "data", "evaluation", "training"} <= set(SUBPACKAGES)
    loaded = json.loads(
        run_python(
            """
            import json, sys
            import clipcap_hf
            before = sorted(sys.modules)
            clipcap_hf.convert_original_checkpoint  # loaded on first use
            print(json.dumps([before, "clipcap_hf.conversion.convert_original" in sys.modules]))
            """
        )
    )
    modules, converter_loaded_on_use = loaded
    assert [name for name in modules if name.split(".")[0] in OPTIONAL_DEPENDENCIES] == []
    assert [name for name in modules if name.split(".")[:2] in [["clipcap_hf", sub] for sub in SUBPACKAGES]] == []
    assert converter_loaded_on_use


def test_caption_runs_without_the_optional_dependencies(saved_model_dir, tmp_path):
    image = tmp_path / "photo.png"
    random_images(1)[0].save(image)
    blocked = (*OPTIONAL_DEPENDENCIES, "accelerate")
    output = run_python(
        f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None  # as if not installed: `import` fails and `importlib.util.find_spec` finds none
        from clipcap_hf.commands import main
        sys.exit(main(["caption", {str(image)!r}, "--model", {str(saved_model_dir)!r}, "--max-new-tokens", "5"]))
        """
    )
    path, caption = output.splitlines()[-1].split("\t")
    assert path == str(image)
