"""imaging.boxes and imaging.images: the one box IoU, box drawing and uint8 image coercion."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from magicid.errors import DataError, ModelInputError
from magicid.imaging.boxes import box_iou, box_overlaps, draw_boxes
from magicid.imaging.images import as_uint8_image


def test_box_overlaps_give_iou_and_intersection_over_the_smaller_box():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[5, 0, 15, 10], [2, 2, 4, 4], [20, 20, 30, 30], [0, 0, 0, 0]])
    iou, ios = box_overlaps(a, b)
    np.testing.assert_allclose(iou, [[50 / 150, 4 / 100, 0.0, 0.0]])
    np.testing.assert_allclose(ios, [[0.5, 1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(box_iou(a, b), iou)


def test_draw_boxes_outlines_each_box_on_a_copy_of_a_pil_image_or_an_array():
    array = np.zeros((32, 48, 3), np.uint8)
    drawn = draw_boxes(array, [(4, 4, 20, 20)], colour=(255, 0, 0), width=1)
    out = np.asarray(drawn)
    assert out[4, 10].tolist() == [255, 0, 0] and out[12, 12].tolist() == [
        0,
        0,
        0,
    ]  # the edge, not the inside
    assert not array.any()  # the input is untouched
    np.testing.assert_array_equal(np.asarray(draw_boxes(PIL.Image.fromarray(array), [(4, 4, 20, 20)],
                                                        colour=(255, 0, 0), width=1)), out)  # fmt: skip


def test_as_uint8_image_converts_pil_and_refuses_other_arrays_in_both_error_families():
    grey = PIL.Image.new("L", (5, 4), 7)
    assert as_uint8_image(grey).shape == (4, 5, 3)
    array = np.zeros((4, 5, 3), np.uint8)
    assert as_uint8_image(array) is array and as_uint8_image(array, copy=True) is not array
    for bad in (np.zeros((4, 5, 3), np.float32), np.zeros((4, 5), np.uint8), "a.png"):
        with pytest.raises(ModelInputError, match="reference ada: expected a PIL image"):
            as_uint8_image(bad, "reference ada")
        with pytest.raises(DataError):
            as_uint8_image(bad)
