"""Helpers for the dashboards' real-browser tests: a Streamlit server on a free loopback port and Debian's
`chromium` driven by Playwright (`executable_path`; never `playwright install`, which downloads a browser)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# Wait until the image has decoded: Playwright's to_be_visible() passes on a broken image too.
IMAGES_LOADED_JS = """
(minCount) => {
  const imgs = Array.from(document.querySelectorAll('[data-testid="stImage"] img, [data-testid="stFullScreenFrame"] img'));
  return imgs.length >= minCount && imgs.every(img => img.complete && img.naturalWidth > 0);
}
"""


BROKEN_IMAGES_JS = """
() => Array.from(document.querySelectorAll('img'))
  .filter(img => !(img.complete && img.naturalWidth > 0)).map(img => img.src)
"""


def wait_for_images(page, min_count: int, timeout_ms: int = 30_000) -> None:
    """Wait until at least `min_count` Streamlit images are on the page and every one has decoded;
    on timeout fail naming the broken image URLs (a `/media` 500 shows here)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(IMAGES_LOADED_JS, arg=min_count, timeout=timeout_ms)
    except PlaywrightTimeout:
        broken = page.evaluate(BROKEN_IMAGES_JS)
        pytest.fail(f"images did not load in the browser (need {min_count}); broken: {broken}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def streamlit_server(app: Path, args: list[str], log: Path, timeout_s: float = 60.0):
    """Run `streamlit run APP -- ARGS` headless on 127.0.0.1; yields its base URL once /_stcore/health is ok."""
    port = _free_port()
    command = [
        sys.executable, "-m", "streamlit", "run", str(app),
        "--server.headless=true", "--server.address=127.0.0.1", f"--server.port={port}",
        "--browser.gatherUsageStats=false", "--server.fileWatcherType=none",
        "--", *args,
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + timeout_s
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"streamlit exited ({process.returncode}): {log.read_text()[-2000:]}")
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                        if answer.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"streamlit did not answer /_stcore/health in {timeout_s} s: {log}")
                time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture()
def chromium_page():
    """A Playwright page in headless Debian chromium. Missing chromium is a failure, not a skip: `make test`
    installs it (Makefile target `browser`)."""
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("Debian's chromium is not installed: run `make browser` (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()
