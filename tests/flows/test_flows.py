"""The Prefect flows run locally (ephemeral API, no server) and only wire magicid functions together."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def test_flows_hold_no_science():
    found = subprocess.run(
        ["grep", "-rlE", "import torch|diffusers", str(ROOT / "flows")], capture_output=True, text=True
    )
    assert found.stdout == "", f"flows import model code directly: {found.stdout}"


@pytest.mark.slow
def test_build_idzoom_flow_builds_and_validates(prefect_home, tmp_path):
    from skimage import data as skdata

    from flows.build_idzoom import build_idzoom_flow

    raw = tmp_path / "raw"
    raw.mkdir()
    Image.fromarray(np.ascontiguousarray(skdata.astronaut())).save(raw / "astronaut.png")
    (raw / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    report = build_idzoom_flow(
        str(raw),
        str(tmp_path / "idzoom"),
        report_dir=str(tmp_path / "reports"),
        params_path=None,
        overrides=["data.workers=1"],
    )
    assert report["n_images"] == 1 and report["n_quarantined"] == 1 and report["n_faces"] == 1
    assert report["validation"]["passed"] > 0
    assert Path(report["validation"]["docs"]).is_file()
