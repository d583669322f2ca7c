"""The IDZoom browser renders a real dataset (built once for the data tests) and reports a missing one."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[2] / "dashboards" / "idzoom_browser.py"


def _run(root: Path):
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(str(APP), default_timeout=60)
    app.run()
    app.sidebar.text_input[0].set_value(str(root)).run()
    return app


def test_dashboards_hold_no_science():
    found = subprocess.run(
        ["grep", "-rlE", "import torch|diffusers", str(APP.parent)], capture_output=True, text=True
    )
    assert found.stdout == ""


def test_missing_dataset_is_an_error_naming_it(tmp_path):
    app = _run(tmp_path / "absent")
    assert not app.exception
    assert app.error and "absent" in app.error[0].value


@pytest.mark.slow
def test_browser_shows_images_faces_and_quarantine(tmp_path):
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    from magicid.config import load_params
    from magicid.data.builder import build_idzoom

    raw = tmp_path / "raw"
    raw.mkdir()
    Image.fromarray(np.ascontiguousarray(skdata.astronaut())).save(raw / "astronaut.png")
    (raw / "empty.png").write_bytes(b"")
    root = tmp_path / "idzoom"
    build_idzoom(raw, root, load_params(None, ["data.workers=1"]), progress=False)
    app = _run(root)
    assert not app.exception
    metrics = {m.label: m.value for m in app.metric}
    assert metrics == {"images": "1", "faces": "1", "quarantined": "1"}
    assert len(app.dataframe) == 1


@pytest.mark.slow
def test_browser_images_load_in_chromium(tmp_path, chromium_page):
    """In a real browser every image decodes (naturalWidth > 0): the photo, its two condition maps and the
    face crop. AppTest cannot see a broken `/media` image (starlette >= 1.5 with streamlit 1.60)."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    from magicid.config import load_params
    from magicid.data.builder import build_idzoom
    from tests.dashboards.conftest import streamlit_server, wait_for_images

    raw = tmp_path / "raw"
    raw.mkdir()
    Image.fromarray(np.ascontiguousarray(skdata.astronaut())).save(raw / "astronaut.png")
    root = tmp_path / "idzoom"
    build_idzoom(raw, root, load_params(None, ["data.workers=1"]), progress=False)
    with streamlit_server(APP, ["--root", str(root)], tmp_path / "streamlit.log") as url:
        chromium_page.goto(url)
        chromium_page.get_by_text("skeleton map").wait_for()
        wait_for_images(chromium_page, 4)
        chromium_page.screenshot(path=str(tmp_path / "idzoom_browser.png"), full_page=True)
    assert (tmp_path / "idzoom_browser.png").stat().st_size > 10_000
