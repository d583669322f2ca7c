"""`imaging.png.encode_png`: lossless (decoders read back the same pixels), deterministic, refuses non-RGB."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from magicid.imaging.png import encode_png


@pytest.mark.parametrize("photo", [True, False], ids=["up-filter", "no-filter"])
def test_png_round_trips_exactly_and_is_deterministic(photo):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    array[5:9] = 0  # runs, as in condition maps
    data = encode_png(array, photo=photo)
    assert data == encode_png(array.copy(), photo=photo)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decoded, array)


def test_png_refuses_arrays_that_are_not_rgb():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        encode_png(np.zeros((4, 4), np.uint8))
