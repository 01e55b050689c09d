#!/usr/bin/env python3
"""
Run transformers' own common tests (ModelTesterMixin, ConfigTester, ProcessorTesterMixin, ImageProcessingTestMixin)
against ClipCap, with the transformers version installed in this interpreter.

transformers' test files are not copied into this repository: they are taken at run time from transformers' source
distribution on PyPI (`pip download --no-binary :all:`), whose tests/ holds the common test modules. What it lacks
is stubbed here: tests/generation/ (GenerationTesterMixin: an empty mixin, so no generation test runs here; the
generation conventions are checked by tests/test_conformance.py), tests/exporters/ (ExportTesterMixin),
tests/utils/test_configuration_utils.py and utils/fetch_hub_objects_for_ci.py. ClipCap's testers, our own code, are
tests/transformers_common/*.py; tests/transformers_common/expectations.py lists the tests skipped for documented
design reasons and the known bugs (strict xfails).

Needs PyPI only (the sdist, and `parameterized` when it is not installed), never the Hugging Face Hub.

    python .ci/transformers_common_tests.py                      # download the sdist, run everything
    python .ci/transformers_common_tests.py --sdist PATH.tar.gz  # use a downloaded sdist
    python .ci/transformers_common_tests.py -- -k Llama -x       # arguments after -- go to pytest
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
TESTERS = REPOSITORY / "tests" / "transformers_common"
# Our testers, and the names they take in transformers' tree.
TESTER_FILES = {
    "expectations.py": "expectations.py",
    "modeling.py": "test_modeling_clipcap.py",
    "processing.py": "test_processing_clipcap.py",
    "image_processing.py": "test_image_processing_clipcap.py",
}
STUBS = {
    "tests/generation/test_utils.py": '''\
# Stub: tests/generation/ is not in transformers' source distribution.
class GenerationTesterMixin:
    pass
''',
    "tests/exporters/test_export.py": '''\
# Stub: tests/exporters/ is not in transformers' source distribution.
class ExportTesterMixin:
    pass
''',
    "tests/utils/test_configuration_utils.py": '''\
# Stub: test_configuration_common imports `config_common_kwargs` for ConfigTester.check_config_arguments_init, which
# returns before using it for composite configs such as ClipCapConfig.
config_common_kwargs = {}
''',
    "utils/fetch_hub_objects_for_ci.py": '''\
# Stub: no Hub objects are fetched in advance here; a URL stays a URL.
import os


def url_to_local_path(url, return_url_if_not_found=True):
    filename = url.split("/")[-1]
    if not os.path.exists(filename) and return_url_if_not_found:
        return url
    return filename
''',
    "conftest.py": '''\
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def pytest_configure(config):
    for marker in ("generate", "slow", "accelerate_tests", "is_training_test", "is_pipeline_test", "is_staging_test",
                   "torch_compile_test", "torch_export_test", "flash_attn_test", "flash_attn_3_test",
                   "flash_attn_4_test"):
        config.addinivalue_line("markers", f"{marker}: transformers' test marker")
''',
}
PACKAGES = ("tests", "tests/generation", "tests/exporters", "tests/utils", "tests/models", "tests/models/clipcap",
            "utils")


def download_sdist(version: str, folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"transformers=={version}", "--dest", str(folder)]
    subprocess.run(command, check=True)
    return next(folder.glob(f"transformers-{version}.tar.gz"))


def extract_common_tests(sdist: Path, version: str, tree: Path) -> list[str]:
    """transformers' top-level tests/*.py (the common test modules), and nothing else, into `tree`/tests."""
    pattern = re.compile(rf"transformers-{re.escape(version)}/tests/([A-Za-z0-9_]+\.py)")
    names = []
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            match = pattern.fullmatch(member.name)
            if match and member.isfile():
                (tree / "tests" / match.group(1)).write_bytes(archive.extractfile(member).read())
                names.append(match.group(1))
    if "test_modeling_common.py" not in names:
        raise SystemExit(f"{sdist.name} has no tests/test_modeling_common.py; found {sorted(names)}")
    return names


def build_tree(sdist: Path, version: str, tree: Path) -> None:
    for package in PACKAGES:
        (tree / package).mkdir(parents=True, exist_ok=True)
        (tree / package / "__init__.py").touch()
    extract_common_tests(sdist, version, tree)
    for path, text in STUBS.items():
        (tree / path).write_text(text)
    for source, name in TESTER_FILES.items():
        shutil.copyfile(TESTERS / source, tree / "tests" / "models" / "clipcap" / name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdist", type=Path, help="transformers' source distribution (default: pip download it)")
    parser.add_argument("--keep", type=Path, help="build the test tree in this folder and keep it")
    parser.add_argument("pytest_args", nargs="*", help="arguments for pytest (after --)")
    args = parser.parse_args()

    version = importlib.metadata.version("transformers")
    work = Path(tempfile.mkdtemp(prefix="transformers-common-tests-"))
    try:
        tree = args.keep.resolve() if args.keep else work / "tree"
        if tree.exists():
            if any(tree.iterdir()) and not (tree / "tests" / "models" / "clipcap").is_dir():
                raise SystemExit(f"--keep {tree}: not empty and not a tree this script built; give a new folder.")
            shutil.rmtree(tree)
        sdist = args.sdist.resolve() if args.sdist else download_sdist(version, work)
        build_tree(sdist, version, tree)

        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if importlib.util.find_spec("parameterized") is None:  # transformers' test modules import it
            deps = work / "deps"
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(deps), "parameterized"],
                           check=True)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(deps), env.get("PYTHONPATH")]))

        print(f"transformers {version}: common tests from {sdist.name}, in {tree}", flush=True)
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", str(tree), "-q", "-rfEX",
                   "tests/models/clipcap", *args.pytest_args]
        return subprocess.run(command, cwd=tree, env=env, check=False).returncode
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
