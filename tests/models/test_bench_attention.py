"""benchmarks/bench_attention.py's pure parts: the face layouts of its sweep and the crossover it reports."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
try:
    import bench_attention as bench
finally:
    sys.path.pop(0)


@pytest.mark.parametrize("n", bench.ID_COUNTS)
@pytest.mark.parametrize("fraction", [*bench.AREAS, bench.FACE_FRACTION])
def test_sweep_faces_cover_the_asked_fraction_without_overlapping(n, fraction):
    masks = bench.face_masks(n, fraction=fraction)
    assert masks.shape == (n, bench.IMAGE, bench.IMAGE)
    assert masks.sum(0).max() == 1  # no two faces share a pixel
    assert all(m.any() for m in masks)
    assert masks.sum() / bench.IMAGE**2 == pytest.approx(fraction, rel=0.1)  # sides rounded to 8 px


def test_faces_that_cannot_fit_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        bench.face_masks(3, fraction=0.9)  # 2 x 2 cells of 25 % each, faces of 30 %


def test_crossover_is_the_load_from_which_dense_always_won():
    assert bench.dense_above_measured([(0.1, 1.2), (0.5, 1.01), (0.6, 0.97), (0.9, 0.95)]) == 0.6
    # A loss above a win moves the crossover above that loss.
    assert bench.dense_above_measured([(0.1, 1.2), (0.5, 0.9), (0.6, 1.05), (0.9, 0.95)]) == 0.9
    assert math.isnan(bench.dense_above_measured([(0.1, 0.9), (0.9, 1.02)]))
    assert bench.dense_above_measured([(0.1, 0.9), (0.9, 0.99)]) == 0.1
