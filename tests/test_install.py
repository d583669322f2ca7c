"""Install smoke test: three wheels (opencv-python-headless, opencv-contrib-python, opencv-python) write one
`cv2` folder, and mediapipe/dlib need numpy<2 and protobuf<5: the stack must import together."""

import importlib.metadata


def test_stack_imports_together():
    import cv2
    import dlib  # noqa: F401
    import face_recognition_models  # noqa: F401
    import insightface  # noqa: F401
    import mediapipe as mp
    import numpy
    import onnxruntime  # noqa: F401

    assert cv2.__version__.startswith("4.11.")
    assert numpy.__version__.startswith("1.")
    assert importlib.metadata.version("protobuf").startswith("4.")
    assert (
        mp.solutions.face_detection is not None
    )  # 0.10.21 still ships the legacy solutions and their models


def test_cv2_wheels_pinned_to_one_version():
    versions = {
        name: importlib.metadata.version(name)
        for name in ("opencv-python-headless", "opencv-contrib-python", "opencv-python")
    }
    assert len(set(versions.values())) == 1, versions


def test_importing_magicid_has_no_side_effects(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    subprocess.run(
        [sys.executable, "-c", "import magicid, magicid.config, magicid.cli"], check=True, cwd=tmp_path
    )
    assert list(tmp_path.iterdir()) == []
