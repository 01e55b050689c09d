"""Headless Chromium for the browser tests, driven by selenium and kept off every network but 127.0.0.1.

conftest.py makes the `browser` fixture available to every test module; import `serve_folder` where needed. Tests
that use the fixture are skipped, with the reason, when Chromium, chromedriver or selenium is not installed; CI
installs them: `apt-get install -y chromium chromium-driver` and `pip install -e ".[dev]"`.
"""

import contextlib
import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Without these Chromium keeps calling out (updates, sync, field trials) to a network that is closed here.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Nothing but the test's own servers resolves, so a page can never reach past this machine.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--window-size=1280,1600",
]


def missing_browser_tools() -> str | None:
    """Why the browser tests cannot run here, or `None` when they can."""
    if not Path(CHROMIUM).exists():
        return "Chromium is not installed (apt-get install -y chromium)"
    if not Path(CHROMEDRIVER).exists():
        return "chromedriver is not installed (apt-get install -y chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return 'selenium is not installed (pip install -e ".[dev]")'
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium with a fresh profile, for the tests of one module."""
    reason = missing_browser_tools()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def serve_folder(folder: Path):
    """Serve `folder` over HTTP on 127.0.0.1 (a free port) and yield its base URL."""
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep request logs out of the test output
        pass
