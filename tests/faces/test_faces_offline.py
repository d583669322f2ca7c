"""The offline backend: detection (tiles + mesh verification), keypoints, landmarks, embeddings, pose."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from magicid.faces import Face, FaceAnalyzer, backend_status


def _inside(points: np.ndarray, box: np.ndarray, tol: float = 0.5) -> bool:
    return bool(
        (
            (points[:, 0] >= box[0] - tol)
            & (points[:, 0] <= box[2] + tol)
            & (points[:, 1] >= box[1] - tol)
            & (points[:, 1] <= box[3] + tol)
        ).all()
    )


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union)


def _best_match(box: np.ndarray, faces: list[Face]) -> tuple[int, float]:
    """(index, IoU) of the face in `faces` whose box overlaps `box` most."""
    ious = [_iou(box, f.bbox) for f in faces]
    return int(np.argmax(ious)), max(ious)


def test_false_face_check_can_fail(t1_faces):
    """The no-false-face check catches a box on no person even when the count is unchanged."""
    planted = np.array([0, 0, 40, 40], np.float32)  # the top-left corner: nobody there
    assert _best_match(planted, t1_faces)[1] < 0.4


def _check_face(face: Face, image: np.ndarray) -> None:
    h, w = image.shape[:2]
    x0, y0, x1, y1 = face.bbox
    assert face.bbox.dtype == np.float32 and face.bbox.shape == (4,)
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert 0 <= face.det_score <= 1
    assert face.kps5.shape == (5, 2) and _inside(face.kps5, face.bbox)
    assert face.landmarks.shape == (478, 2) and np.isfinite(face.landmarks).all()
    assert face.embedding.shape == (128,) and face.embedding.dtype == np.float32
    assert abs(float(np.linalg.norm(face.embedding)) - 1) < 1e-5


def test_analyzer_follows_protocol(analyzer):
    assert isinstance(analyzer, FaceAnalyzer)
    assert analyzer.name == "offline" and analyzer.embedding_dim == 128


def test_astronaut_has_one_face_with_consistent_geometry(astronaut, astronaut_faces):
    # The mission patch fools dlib HOG; mesh verification must leave exactly the one real face.
    assert len(astronaut_faces) == 1
    face = astronaut_faces[0]
    _check_face(face, astronaut)
    left_eye, right_eye, nose, left_mouth, right_mouth = face.kps5
    assert left_eye[0] < nose[0] < right_eye[0]  # image-left eye first
    assert left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])


def test_t1_faces_are_sorted_left_to_right_and_valid(t1, t1_faces):
    assert len(t1_faces) == 6
    centres = [float(f.bbox[0] + f.bbox[2]) for f in t1_faces]
    assert centres == sorted(centres)
    for face in t1_faces:
        _check_face(face, t1)
    # Six different people: no two embeddings as close as one person's views (L2 < 0.6 is dlib's rule).
    embeddings = np.stack([f.embedding for f in t1_faces])
    distances = np.linalg.norm(embeddings[:, None] - embeddings[None], axis=-1)
    assert (distances[~np.eye(6, dtype=bool)] > 0.45).all()


@pytest.mark.slow
def test_t1_small_face_detection_counts(analyzer, t1, t1_faces, capsys):
    """All six at full size, >= 5 at half size; counts at 0.35x and 0.25x (faces ~0.5-1 % of the image)."""
    counts = {1.0: len(t1_faces)}
    found_at = {}
    for scale in (0.5, 0.35, 0.25):
        small = cv2.resize(t1, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        found_at[scale] = analyzer.analyze(small)
        counts[scale] = len(found_at[scale])
    with capsys.disabled():
        print(f"\n[offline] t1 faces found by scale: {counts}")
    assert counts[1.0] == 6
    assert counts[0.5] >= 5
    # No false face: every face found at a smaller scale, scaled back, is one of the six found at full size,
    # and no two of them are the same person (a false face plus a missed one would keep the count).
    for scale, found in found_at.items():
        matched = [_best_match(face.bbox / scale, t1_faces) for face in found]
        assert all(iou > 0.4 for _, iou in matched), (scale, matched)
        assert len({index for index, _ in matched}) == len(found), (scale, matched)


def test_embedding_same_person_closer_than_different(analyzer, astronaut, astronaut_faces, hanks):
    reference = astronaut_faces[0].embedding
    flipped = analyzer.analyze(np.ascontiguousarray(astronaut[:, ::-1]))
    ok, jpeg = cv2.imencode(".jpg", astronaut[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 60])
    recompressed = analyzer.analyze(np.ascontiguousarray(cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[:, :, ::-1]))
    other = analyzer.analyze(hanks)
    assert len(flipped) == len(recompressed) == len(other) == 1
    same = [float(reference @ f[0].embedding) for f in (flipped, recompressed)]
    different = float(reference @ other[0].embedding)
    assert min(same) > 0.97
    assert min(same) > different + 0.03


def test_embed_reproduces_analyze(analyzer, astronaut, astronaut_faces):
    face = astronaut_faces[0]
    np.testing.assert_allclose(analyzer.embed(astronaut, face), face.embedding, atol=1e-6)


def test_analyze_is_deterministic(analyzer, astronaut, astronaut_faces):
    again = analyzer.analyze(astronaut)
    np.testing.assert_array_equal(again[0].bbox, astronaut_faces[0].bbox)
    np.testing.assert_array_equal(again[0].embedding, astronaut_faces[0].embedding)


def test_blank_image_has_no_face(analyzer):
    assert analyzer.analyze(np.full((240, 320, 3), 127, np.uint8)) == []


@pytest.mark.parametrize(
    "bad", [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8)]
)
def test_analyze_rejects_non_rgb_uint8(analyzer, bad):
    with pytest.raises(ValueError, match="uint8"):
        analyzer.analyze(bad)


def test_pose_skeleton_belongs_to_the_face(astronaut, astronaut_faces):
    from magicid.faces.pose import PoseEstimator

    skeletons = PoseEstimator().estimate(astronaut, astronaut_faces)
    assert len(skeletons) == 1 and skeletons[0] is not None
    skeleton = skeletons[0]
    assert skeleton.shape == (33, 3)
    nose = skeleton[0, :2]
    assert _inside(nose[None], astronaut_faces[0].bbox)
    shoulders = skeleton[11:13]
    assert (shoulders[:, 1] > astronaut_faces[0].bbox[3]).all()  # shoulders below the face


def test_backend_status_reports_both_backends(default_params, tmp_path):
    """Each backend's status follows what is on disk: the offline one ships its models, insightface needs a
    model folder (none by default; an empty one is named; a complete one is usable)."""
    from magicid.faces.insightface_backend import EXPECTED_FILES

    status = backend_status(default_params)
    assert status["offline"].startswith("usable")
    assert default_params.faces.insightface_root is None
    assert (
        status["insightface"].startswith("unusable: ")
        and "insightface_root is not set" in status["insightface"]
    )
    empty = default_params.faces.model_copy(update={"insightface_root": str(tmp_path)})
    assert backend_status(empty)["insightface"].startswith("unusable: ")
    folder = tmp_path / "models" / empty.insightface_model
    folder.mkdir(parents=True)
    for name in EXPECTED_FILES[empty.insightface_model]:
        (folder / name).write_bytes(b"")  # status only checks the files are there; nothing is loaded
    assert backend_status(empty)["insightface"] == f"usable (models in {folder})"
