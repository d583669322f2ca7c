"""The copied mesh and pose edge lists equal mediapipe's, and drawing a landmark map needs no mediapipe."""

from __future__ import annotations

import subprocess
import sys

import pytest

from magicid.imaging import mesh_edges

PARTS = (
    "FACE_OVAL", "LIPS", "LEFT_EYE", "RIGHT_EYE", "LEFT_EYEBROW", "RIGHT_EYEBROW", "LEFT_IRIS", "RIGHT_IRIS", "NOSE",
)  # fmt: skip


def test_edge_lists_equal_mediapipes():
    pytest.importorskip("mediapipe")
    from mediapipe.python.solutions import face_mesh_connections as fmc
    from mediapipe.python.solutions.pose_connections import POSE_CONNECTIONS

    for part in PARTS:
        assert set(getattr(mesh_edges, f"FACEMESH_{part}")) == set(getattr(fmc, f"FACEMESH_{part}")), part
    assert set(mesh_edges.POSE_CONNECTIONS) == set(POSE_CONNECTIONS)
    assert all(
        0 <= i < 478 for part in PARTS for edge in getattr(mesh_edges, f"FACEMESH_{part}") for i in edge
    )


def test_landmark_and_skeleton_maps_draw_without_mediapipe():
    """A fresh interpreter in which `import mediapipe` fails still draws both maps of a box-only layout."""
    code = (
        "import sys; sys.modules['mediapipe'] = None\n"
        "import numpy as np\n"
        "from magicid.imaging.conditions import render_landmark_map, render_skeleton_map\n"
        "from magicid.imaging.mesh_template import MESH_TEMPLATE_XY\n"
        "mesh = np.array(MESH_TEMPLATE_XY) * 40 + 10\n"
        "assert render_landmark_map(64, 64, [mesh]).any()\n"
        "assert render_skeleton_map(64, 64, [np.full((33, 2), 32.0)]).any()\n"
        "assert 'mediapipe' not in sys.modules or sys.modules['mediapipe'] is None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
