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
    from magicid.models.pipeline import render_box_landmarks

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
