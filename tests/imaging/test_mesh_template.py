"""The box-only landmark map: the 478-point mesh template drawn as training draws a real mesh."""

from __future__ import annotations

import numpy as np
import pytest

from magicid.imaging.conditions import render_landmark_map, template_landmarks


def _drawn_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean symmetric distance (px) between the drawn pixels of two maps (uint8 (H, W, 3) on black)."""
    import cv2

    def one_way(src, dst):
        # Distance from every pixel to the nearest drawn pixel of `dst`, read at the drawn pixels of `src`.
        far = cv2.distanceTransform((dst.max(axis=2) == 0).astype(np.uint8), cv2.DIST_L2, 5)
        return float(far[src.max(axis=2) > 0].mean())

    return (one_way(a, b) + one_way(b, a)) / 2


def _colours(image: np.ndarray, min_pixels: int = 3) -> set[tuple[int, int, int]]:
    """The part colours (`_PART_COLOURS`) a drawing uses: drawn pixels brightened to full intensity (undoing
    anti-aliasing) and matched to the nearest part colour within 48 levels."""
    from magicid.imaging.conditions import _PART_COLOURS

    palette = np.array(list(_PART_COLOURS.values()), np.float32)  # (P, 3)
    pixels = image.reshape(-1, 3).astype(np.float32)
    pixels = pixels[pixels.max(axis=1) >= 128]
    full = pixels * (255.0 / pixels.max(axis=1, keepdims=True))
    gap = np.abs(full[:, None] - palette[None]).max(axis=2)  # (N, P)
    nearest = np.where(gap.min(axis=1) <= 48, gap.argmin(axis=1), -1)
    counts = np.bincount(nearest[nearest >= 0], minlength=len(palette))
    return {tuple(int(v) for v in palette[i]) for i in np.flatnonzero(counts >= min_pixels)}


@pytest.fixture(scope="module")
def astronaut_face():
    from skimage import data

    from magicid.config import FacesParams
    from magicid.faces import get_analyzer

    image = np.ascontiguousarray(data.astronaut())
    (face,) = get_analyzer(FacesParams()).analyze(image)
    return image, face


def test_template_drawing_matches_a_real_mesh(astronaut_face):
    """In the astronaut's detection box, the template's map lies within a few % of the box side of her real
    mesh's map, drawn with the same parts and colours; a template shifted by a fifth of the box does not."""
    image, face = astronaut_face
    height, width = image.shape[:2]
    side = float(face.bbox[2] - face.bbox[0])
    real = render_landmark_map(height, width, [face.landmarks])
    template = render_landmark_map(height, width, [template_landmarks(face.bbox)])
    distance = _drawn_distance(real, template)
    assert distance < 0.05 * side, (distance, side)
    assert _colours(template) == _colours(real)
    shifted = render_landmark_map(
        height, width, [template_landmarks(face.bbox + [0.2 * side, 0, 0.2 * side, 0])]
    )
    assert _drawn_distance(real, shifted) > 2 * distance  # the comparison can fail


def test_box_layout_draws_the_mesh_template():
    from magicid.imaging.layout import render_box_landmarks

    boxes = [(20.0, 30.0, 80.0, 100.0), (130.0, 40.0, 170.0, 90.0)]
    expected = render_landmark_map(128, 192, [template_landmarks(b) for b in boxes])
    assert np.array_equal(render_box_landmarks(128, 192, boxes), expected)
    assert len(_colours(expected)) >= 8  # contours in the mesh's part colours, not white dots


@pytest.mark.slow
def test_shipped_template_is_the_mean_mesh_of_the_package_photos():
    """Recompute the template from the 8 faces in the pip-shipped photos; the shipped one equals it."""
    from PIL import Image
    from skimage import data

    from magicid.config import FacesParams
    from magicid.data.sample import package_photo
    from magicid.faces import get_analyzer
    from magicid.imaging.mesh_template import MESH_TEMPLATE_XY

    analyzer = get_analyzer(FacesParams())
    photos = [np.ascontiguousarray(data.astronaut())] + [
        np.asarray(Image.open(package_photo(name)).convert("RGB"))
        for name in ("t1.jpg", "Tom_Hanks_54745.png")
    ]
    relative = [
        (f.landmarks - f.bbox[:2]) / (f.bbox[2:] - f.bbox[:2])
        for photo in photos
        for f in analyzer.analyze(photo)
    ]
    assert len(relative) == 8
    np.testing.assert_allclose(np.mean(relative, axis=0), np.asarray(MESH_TEMPLATE_XY), atol=2e-4)


def test_mirror_order_relabels_a_flipped_mesh_as_face_mesh_does(astronaut_face):
    """Mirroring the astronaut's mesh and relabelling it by MESH_MIRROR (KPS5_MIRROR) gives what face mesh finds
    on the mirrored photo, to within 1 % of the face's side; without relabelling the points are ~20 % off."""
    from mediapipe.python.solutions import face_mesh_connections as fmc

    from magicid.config import FacesParams
    from magicid.faces import get_analyzer
    from magicid.imaging.mesh_template import KPS5_MIRROR, MESH_MIDLINE, MESH_MIRROR

    order = np.array(MESH_MIRROR)
    assert sorted(MESH_MIRROR) == list(range(478)) and (order[order] == np.arange(478)).all()
    assert {i for i in range(478) if order[i] == i} == set(MESH_MIDLINE)

    def points(name: str) -> set[int]:
        return set(np.array(sorted(getattr(fmc, f"FACEMESH_{name}"))).ravel().tolist())

    for left, right in (("LEFT_EYE", "RIGHT_EYE"), ("LEFT_EYEBROW", "RIGHT_EYEBROW"), ("LEFT_IRIS", "RIGHT_IRIS"),
                        ("LIPS", "LIPS"), ("FACE_OVAL", "FACE_OVAL"), ("NOSE", "NOSE")):  # fmt: skip
        assert {int(order[i]) for i in points(left)} == points(right), left

    image, face = astronaut_face
    width = image.shape[1]
    (flipped,) = get_analyzer(FacesParams()).analyze(np.ascontiguousarray(image[:, ::-1]))
    side = float(face.bbox[2] - face.bbox[0])
    moved = np.stack([width - face.landmarks[:, 0], face.landmarks[:, 1]], axis=1)
    assert np.abs(moved[order] - flipped.landmarks).mean() < 0.01 * side
    assert np.abs(moved - flipped.landmarks).mean() > 0.1 * side
    kps = np.stack([width - face.kps5[:, 0], face.kps5[:, 1]], axis=1)
    assert np.abs(kps[list(KPS5_MIRROR)] - flipped.kps5).mean() < 0.01 * side


def test_head_skeleton_is_the_face_of_a_pose(astronaut_face):
    """From the mesh, a head's pose points lie on the real pose's face points (within a fifth of the face side);
    from 5 keypoints alone, near them; the body's points are invisible."""
    from magicid.faces.pose import PoseEstimator
    from magicid.imaging.conditions import head_skeleton

    image, face = astronaut_face
    (pose,) = PoseEstimator().estimate(image, [face])
    side = float(face.bbox[2] - face.bbox[0])
    for landmarks in (face.landmarks, face.landmarks[:68]):
        head = head_skeleton(landmarks, face.kps5)
        assert head.shape == (33, 3) and (head[:11, 2] == 1).all() and (head[11:, 2] == 0).all()
        error = np.linalg.norm(head[:11, :2] - pose[:11, :2], axis=1)
        assert error.max() < 0.35 * side and error.mean() < 0.2 * side, error / side
