"""Decoding and normalisation of single files (magicid.data.ingest)."""

from __future__ import annotations

import numpy as np
import pytest

from magicid.data.ingest import load_image
from magicid.errors import InputRejected
from tests.data.conftest import EXPECTED, MAX_PIXELS, astronaut_array


@pytest.mark.parametrize(
    "source", [s for s, r in EXPECTED.items() if r not in ("image", "no_face", "duplicate")]
)
def test_bad_files_are_rejected_with_their_reason(raw_dir, source):
    with pytest.raises(InputRejected) as info:
        load_image(raw_dir / source, MAX_PIXELS)
    assert info.value.reason == EXPECTED[source]


def test_normalised_variants_match_the_original(raw_dir):
    astro = astronaut_array().astype(np.float64)
    gray = load_image(raw_dir / "odd/gray.png", MAX_PIXELS)
    gray16 = load_image(raw_dir / "odd/gray16.png", MAX_PIXELS)
    for loaded in (gray, gray16):
        assert loaded.array.dtype == np.uint8 and loaded.array.shape == (512, 512, 3)
        assert not loaded.pristine
    np.testing.assert_array_equal(gray.array, gray16.array)  # 16-bit is the same picture, scaled
    assert (gray.array[..., 0] == gray.array[..., 1]).all()
    cmyk = load_image(raw_dir / "odd/cmyk.jpg", MAX_PIXELS).array.astype(np.int16)
    assert np.abs(cmyk - astro).mean() < 12  # JPEG + CMYK round trip, same picture
    rgba = load_image(raw_dir / "odd/rgba.png", MAX_PIXELS).array.astype(np.int16)
    expected = np.round(astro * 200 / 255 + 255 * 55 / 255)  # composited on white
    assert np.abs(rgba - expected).max() <= 2


def test_exif_rotation_is_applied(raw_dir):
    loaded = load_image(raw_dir / "odd/rotated.jpg", MAX_PIXELS)
    # Stored turned 90 degrees counter-clockwise and cut to its top 400 rows, orientation 6: upright it is
    # 400 wide x 512 high, the astronaut's right 400 columns.
    assert loaded.array.shape == (512, 400, 3)
    astro = astronaut_array()[:, 112:].astype(np.int16)
    assert np.abs(loaded.array.astype(np.int16) - astro).mean() < 6
    assert not loaded.pristine


def test_plain_rgb_png_is_pristine(raw_dir):
    loaded = load_image(raw_dir / "good/astronaut.png", MAX_PIXELS)
    assert loaded.pristine
    np.testing.assert_array_equal(loaded.array, astronaut_array())
