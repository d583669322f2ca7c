"""The fitted-backbone figure definitions: each checked on inputs whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from magicid.evaluation import fitted_figures as figures


def test_psnr_of_a_known_error():
    reference = np.full((2, 8, 8, 3), 100, np.uint8)
    noisy = reference.copy()
    noisy[0] += 10  # MSE 100 -> 10 log10(255^2 / 100) = 28.13 dB
    noisy[1] += 1  # MSE 1 -> 48.13 dB
    assert figures.psnr_db(reference, noisy) == pytest.approx((28.1308 + 48.1308) / 2, abs=1e-3)
    assert figures.psnr_db(reference[0], reference[0]) == 100.0
    with pytest.raises(ValueError):
        figures.psnr_db(reference, reference[:1])


def test_detection_rate_counts_images_with_a_face():
    assert figures.detection_rate([0, 1, 3, 0]) == 0.5


def test_id_top1_counts_missing_faces_as_misses():
    references = np.eye(3)
    embeddings = [np.array([0.9, 0.1, 0.0]), np.array([0.2, 0.1, 0.9]), None, np.array([0.0, 1.0, 0.0])]
    assert figures.id_top1(embeddings, [0, 2, 1, 0], references) == 0.5


def test_id_confusion_is_the_share_nearer_to_another_reference():
    references = np.array([[1.0, 0.0], [0.0, 1.0]])
    faces = [np.array([1.0, 0.2]), np.array([0.3, 1.0]), np.array([1.0, 0.1])]
    assert figures.id_confusion(faces, [0, 1, 1], references) == pytest.approx(1 / 3)
    assert math.isnan(figures.id_confusion([], [], references))


def test_similarity_gain_and_background_identity():
    assert figures.similarity_gain([0.5, 0.7], [0.6, 0.9]) == pytest.approx(0.15)
    before = np.zeros((4, 4, 3), np.uint8)
    after = before.copy()
    after[1, 1] = 9
    mask = np.zeros((4, 4), np.uint8)
    assert not figures.background_identical(before, after, mask)
    mask[1, 1] = 255
    assert figures.background_identical(before, after, mask)
