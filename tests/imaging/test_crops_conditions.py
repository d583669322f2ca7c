"""Zoomed crops (expand_box, zoom_crop) and condition maps (skeleton, landmark)."""

from __future__ import annotations

import numpy as np
import pytest

from magicid.imaging.conditions import render_landmark_map, render_skeleton_map
from magicid.imaging.crops import expand_box, person_box, zoom_crop


def test_expand_box_is_square_inside_and_contains_the_face():
    rng = np.random.default_rng(0)
    for _ in range(500):
        width, height = (int(v) for v in rng.integers(20, 800, size=2))
        x0, y0 = rng.uniform(0, width - 2), rng.uniform(0, height - 2)
        x1, y1 = rng.uniform(x0 + 1, width), rng.uniform(y0 + 1, height)
        margin = float(rng.uniform(0, 1))
        bx0, by0, bx1, by1 = expand_box((x0, y0, x1, y1), margin, width, height)
        assert bx1 - bx0 == by1 - by0 > 0
        assert 0 <= bx0 and 0 <= by0 and bx1 <= width and by1 <= height
        side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
        if side + 2 <= min(width, height):  # fits: the whole face is inside the crop
            assert bx0 <= x0 + 1 and by0 <= y0 + 1 and bx1 >= x1 - 1 and by1 >= y1 - 1


def test_expand_box_centres_the_face_away_from_borders():
    assert expand_box((40, 40, 60, 60), 0.5, 200, 200) == (30, 30, 70, 70)


@pytest.mark.parametrize("bad", [(5, 5, 5, 10), (0, 0, float("nan"), 3)])
def test_expand_box_rejects_degenerate_boxes(bad):
    with pytest.raises(ValueError):
        expand_box(bad, 0.2, 100, 100)


def test_zoom_crop_zooms_the_face_region():
    image = np.zeros((300, 400, 3), np.uint8)
    image[100:140, 200:240] = 255  # a 40x40 "face"
    crop, box = zoom_crop(image, (200, 100, 240, 140), size=64, margin=0.5)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    assert box == (180, 80, 260, 160)
    assert crop[16:48, 16:48].min() == 255 and crop[:12].max() == 0  # face in the middle half


def test_person_box_extends_below_the_face():
    x0, y0, x1, y1 = person_box((100, 50, 140, 90), 1000, 1000)
    assert x1 - x0 == y1 - y0 == 200 and y1 > 90 + 100 and x0 < 100 and x1 > 140


def test_landmark_map_draws_only_near_the_landmarks():
    points = np.random.default_rng(0).uniform(50, 100, size=(478, 2))
    canvas = render_landmark_map(200, 300, [points])
    assert canvas.shape == (200, 300, 3) and canvas.dtype == np.uint8
    ys, xs = np.nonzero(canvas.max(axis=2))
    assert len(xs) > 0 and xs.min() >= 45 and xs.max() <= 105 and ys.min() >= 45 and ys.max() <= 105
    dots = render_landmark_map(200, 300, [points[:106]])  # non-mesh landmark sets are drawn as dots
    assert dots.max() == 255 and render_landmark_map(10, 10, []).max() == 0


def test_skeleton_map_skips_invisible_points_and_missing_people():
    skeleton = np.zeros((33, 3), np.float32)
    skeleton[:, 0] = np.linspace(20, 80, 33)
    skeleton[:, 1] = 50
    skeleton[:, 2] = 1.0
    visible = render_skeleton_map(100, 100, [skeleton, None])
    assert visible.max() > 0
    skeleton[:, 2] = 0.1
    assert render_skeleton_map(100, 100, [skeleton]).max() == 0
    with pytest.raises(ValueError, match="33"):
        render_skeleton_map(100, 100, [np.zeros((10, 2))])
