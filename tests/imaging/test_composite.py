"""The one compositor: pasted pixels and mapped points agree, alpha blending, the world's cut-out, free regions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from magicid.imaging.composite import (
    Placement,
    alpha_extent,
    boxes_overlap,
    face_alpha,
    largest_free_rect,
    paste,
)


@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize("box", [(10, 20, 40, 50), (5, 7, 95, 97), (-12, 30, 18, 60), (70, 70, 110, 110)])
def test_a_marked_pixel_lands_where_its_point_is_mapped(box, mirror):
    """Pixels and points move together, scaled up or down, mirrored or not, cut at the canvas border."""
    patch = np.zeros((40, 40, 3), np.uint8)
    patch[9:11, 25:27] = 255  # a 2x2 mark whose centre is the point (26, 10)
    placement = Placement(box, (40, 40), mirror)
    canvas = paste(np.zeros((100, 100, 3), np.uint8), patch, placement)
    x, y = placement.points(np.array([26.0, 10.0]))
    if not (0 <= x < 100 and 0 <= y < 100):
        assert not canvas.any()  # the mark fell past the canvas border, and nothing else was drawn
        return
    ys, xs = np.nonzero(canvas[..., 0] > 0)
    weights = canvas[ys, xs, 0].astype(float)
    centre = np.array([(xs + 0.5) @ weights, (ys + 0.5) @ weights]) / weights.sum()
    np.testing.assert_allclose(centre, [x, y], atol=0.5)


def test_boxes_stay_ordered_when_mirrored():
    placement = Placement((0, 0, 80, 80), (40, 40), mirror=True)
    mapped = placement.boxes(np.array([[5.0, 10.0, 15.0, 30.0]]))
    np.testing.assert_allclose(mapped, [[50.0, 20.0, 70.0, 60.0]])


def test_opaque_paste_replaces_exactly_the_visible_box_and_alpha_blends():
    canvas = np.full((50, 60, 3), 10, np.uint8)
    patch = np.full((20, 20, 3), 200, np.uint8)
    out = paste(canvas.copy(), patch, Placement((50, -5, 70, 15), (20, 20)))
    changed = (out != 10).any(axis=2)
    expected = np.zeros((50, 60), bool)
    expected[0:15, 50:60] = True  # cut at the right and top borders
    np.testing.assert_array_equal(changed, expected)
    alpha = np.full((20, 20), 0.25, np.float32)
    half = paste(canvas.copy(), patch, Placement((0, 0, 20, 20), (20, 20)), alpha)
    assert (half[:20, :20] == round(10 + 0.25 * 190)).all() and (half[20:] == 10).all()
    zero = paste(canvas.copy(), patch, Placement((0, 0, 20, 20), (20, 20)), np.zeros((20, 20), np.uint8))
    np.testing.assert_array_equal(zero, canvas)
    adjusted = paste(canvas.copy(), patch, Placement((0, 0, 10, 10), (20, 20)), adjust=lambda p: p // 2)
    assert (adjusted[:10, :10] == 100).all()
    with pytest.raises(ValueError, match="placement expects"):
        paste(canvas, patch, Placement((0, 0, 10, 10), (30, 30)))


def test_face_alpha_is_opaque_on_the_face_and_zero_at_the_crop_border():
    alpha = face_alpha(128, (36, 40, 92, 96))
    assert alpha.dtype == np.uint8 and alpha.shape == (128, 128)
    assert alpha[60:80, 50:80].min() == 255  # the face's middle
    assert alpha[0].max() == alpha[-1].max() == alpha[:, 0].max() == alpha[:, -1].max() == 0
    assert alpha[96 + 20 :, :].max() == 0  # well below the chin: cut away
    x0, y0, x1, y1 = alpha_extent(alpha)
    assert x0 > 0 and y0 > 0 and x1 < 128 and y1 < 128
    # A face cut tight against its crop's border still fades out at that border.
    tight = face_alpha(112, (8, 12, 101, 105))
    assert tight[:, 0].max() == tight[0].max() == 0 and tight[50:60, 50:60].min() == 255
    # A neighbour reaching into the crop is cut away.
    cut = face_alpha(128, (36, 40, 92, 96), exclude=[(90, 30, 140, 80)])
    assert cut[40:70, 85:128].max() == 0 and cut[60:80, 50:70].min() == 255


def test_largest_free_rect_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        obstacles = []
        for _ in range(rng.integers(0, 4)):
            x0, y0 = rng.integers(-5, 20, size=2)
            obstacles.append((x0, y0, x0 + rng.integers(1, 10), y0 + rng.integers(1, 10)))
        found = largest_free_rect(20, 16, obstacles)
        best = 0
        for x0, x1 in itertools.combinations(range(21), 2):
            for y0, y1 in itertools.combinations(range(17), 2):
                if not any(boxes_overlap((x0, y0, x1, y1), o) for o in obstacles):
                    best = max(best, (x1 - x0) * (y1 - y0))
        area = 0 if found is None else (found[2] - found[0]) * (found[3] - found[1])
        assert area == best
        if found is not None:
            assert not any(boxes_overlap(found, o) for o in obstacles)
    assert largest_free_rect(20, 16, [(0, 0, 20, 10)], min_side=8) is None  # only a 20x6 strip is left
