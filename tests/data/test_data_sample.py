"""sample-data: package photos plus composites down to ~2 % face area, labelled in a sidecar; the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from magicid.imaging.boxes import box_overlaps


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    from magicid.config import load_params
    from magicid.data.sample import build_sample_set

    return build_sample_set(
        tmp_path_factory.mktemp("sample"), load_params(None, ["data.sample_scales=[1.0, 0.2]"])
    )


def test_sample_set_files_and_labels(sample_dir):
    names = sorted(p.name for p in sample_dir.iterdir())
    assert names == [
        "astronaut.png",
        "camera.png",
        "grace_hopper.jpg",
        "group_s0.20.png",
        "group_s1.00.png",
        "identities.json",
        "t1.jpg",
        "tom_hanks.png",
    ]
    labels = json.loads((sample_dir / "identities.json").read_text())
    assert labels["astronaut.png"][0]["identity"] == "eileen_collins"
    assert labels["grace_hopper.jpg"][0]["identity"] == "grace_hopper"
    assert labels["camera.png"][0]["identity"] == "cameraman"
    t1 = labels["t1.jpg"]
    assert [e["identity"] for e in t1] == [f"t1_person_{i}" for i in range(1, 7)]
    centres = [(e["bbox"][0] + e["bbox"][2]) / 2 for e in t1]
    assert centres == sorted(centres)  # numbered left to right
    identities = {e["identity"] for entries in labels.values() for e in entries}
    assert len(identities) == 10
    group = labels["group_s0.20.png"]
    assert len(group) >= 3 and {e["identity"] for e in group} <= {
        "eileen_collins",
        "tom_hanks",
        "grace_hopper",
        "cameraman",
    }
    assert len({e["identity"] for e in group}) == len(group)  # each person once
    width, height = Image.open(sample_dir / "group_s0.20.png").size
    ratios = [(b[2] - b[0]) * (b[3] - b[1]) / (width * height) for b in (e["bbox"] for e in group)]
    assert all(0.012 < r < 0.03 for r in ratios)  # the small-face end: ~2 % of the image area


def test_composite_labels_match_detected_faces(sample_dir):
    from magicid.config import FacesParams
    from magicid.faces import get_analyzer

    labels = json.loads((sample_dir / "identities.json").read_text())["group_s0.20.png"]
    image = np.asarray(Image.open(sample_dir / "group_s0.20.png").convert("RGB"))
    faces = get_analyzer(FacesParams()).analyze(image)
    assert len(faces) == len(labels)
    iou, _ = box_overlaps(np.array([e["bbox"] for e in labels]), np.stack([f.bbox for f in faces]))
    assert (iou.max(axis=1) > 0.5).all()


def test_cli_validate_missing_dataset_exits_nonzero(tmp_path, repo_root):
    from typer.testing import CliRunner

    from magicid.cli import app

    result = CliRunner().invoke(
        app, ["--params", str(repo_root / "params.yaml"), "validate", str(tmp_path / "nope")]
    )
    assert result.exit_code == 2
    assert "not found" in result.output or "not found" in (result.stderr or "")
