"""Each metric on hand-made cases whose answers are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from magicid.evaluation import metrics as m
from magicid.imaging.boxes import box_iou


def unit(*values: float) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return v / np.linalg.norm(v)


def test_id_similarity_matches_faces_to_references_by_hungarian_assignment():
    refs = np.stack([unit(1, 0, 0), unit(0, 1, 0)])
    # Face 0 is ref 1 exactly, face 1 is 60 degrees from ref 0: greedy per face would still work, so make
    # face 1 also close to ref 1; Hungarian must give ref 1 to face 0 (1.0 + 0.5 > 0.8 + 0.0).
    faces = np.stack([unit(0, 1, 0), np.array([0.5, 0.8, math.sqrt(1 - 0.25 - 0.64)])])
    out = m.id_similarity(faces, refs)
    assert out["id_similarity"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["id_matched"] == 2
    # Faces given in the other order: same answer (matching, not position).
    assert m.id_similarity(faces[::-1], refs)["id_similarity"] == pytest.approx(0.75)


def test_id_similarity_scores_an_undetected_face_zero():
    refs = np.stack([unit(1, 0), unit(0, 1)])
    assert m.id_similarity(np.stack([unit(0, 1)]), refs) == {"id_similarity": 0.5, "id_matched": 1.0}
    assert m.id_similarity(np.zeros((0, 2)), refs) == {"id_similarity": 0.0, "id_matched": 0.0}
    # Extra faces (more faces than references) are not counted against the score.
    faces = np.stack([unit(1, 0), unit(0, 1), unit(1, 1)])
    assert m.id_similarity(faces, refs)["id_similarity"] == pytest.approx(1.0)


def test_id_similarity_rejects_mismatched_dimensions():
    with pytest.raises(m.MetricInputError, match="faces"):
        m.id_similarity(np.ones((1, 3)), np.ones((1, 2)))


def test_id_confusion_rate_counts_faces_nearer_to_another_reference():
    refs = np.stack([unit(1, 0), unit(0, 1)])
    faces = np.stack([unit(1, 0.2), unit(1, 0.1), unit(0.1, 1), unit(1, 1)])
    # Face 0 placed for ref 0 (fine), face 1 placed for ref 1 but nearer ref 0 (confused), face 2 for ref 1
    # (fine), face 3 not placed for anyone (not counted).
    out = m.id_confusion_rate(faces, refs, [0, 1, 1, None])
    assert out == {"id_confusion_rate": pytest.approx(1 / 3), "n_faces": 3.0}
    assert math.isnan(m.id_confusion_rate(faces, refs, [None] * 4)["id_confusion_rate"])
    with pytest.raises(m.MetricInputError, match="intended"):
        m.id_confusion_rate(faces, refs, [0])


def test_id_top1_accuracy_and_chance():
    refs = np.stack([unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)])
    faces = np.stack([unit(1, 0.1, 0), unit(0.9, 1, 0), unit(1, 0, 0.5)])
    out = m.id_top1_accuracy(faces, refs, [0, 1, 2])
    assert out["id_top1_accuracy"] == pytest.approx(2 / 3)
    assert out["chance"] == pytest.approx(1 / 3)


def test_generation_id_top1_counts_generations_without_a_face_as_misses():
    refs = np.eye(3)
    faces = [np.array([0.9, 0.1, 0.0]), np.array([0.2, 0.1, 0.9]), None, np.array([0.0, 1.0, 0.0])]
    out = m.generation_id_top1(faces, refs, [0, 2, 1, 0])
    assert out == {
        "generation_id_top1": 0.5,
        "chance": pytest.approx(1 / 3),
        "n_generations": 4.0,
        "n_faces": 3.0,
    }
    assert m.generation_id_top1([None, None], refs, [0, 1])["generation_id_top1"] == 0.0
    with pytest.raises(m.MetricInputError):
        m.generation_id_top1(faces, refs, [0, 1])


def test_box_iou_and_detection_rate():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30]])
    assert box_iou(a, b) == pytest.approx(np.array([[50 / 150, 0.0]]))
    expected = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]])
    detected = np.array([[21, 21, 31, 31], [0, 1, 10, 11], [100, 100, 110, 110]])
    out = m.face_detection_rate(detected, expected, min_iou=0.5)
    assert out == {"face_detection_rate": pytest.approx(2 / 3), "n_expected": 3.0, "n_detected": 3.0}
    # A detection overlapping too little does not count; nothing detected is 0.
    assert m.face_detection_rate(np.array([[5, 0, 15, 10]]), a, 0.5)["face_detection_rate"] == 0.0
    assert m.face_detection_rate(np.zeros((0, 4)), a)["face_detection_rate"] == 0.0
    assert m.match_boxes(detected, expected, 0.5) == [1, 0, None]


def test_count_accuracy_is_the_share_of_generations_with_the_requested_count():
    out = m.count_accuracy([1, 2, 3, 0, 4], [1, 2, 2, 1, 4])
    assert out == {"count_accuracy": pytest.approx(3 / 5), "mean_abs_count_error": pytest.approx(2 / 5),
                   "n_generations": 5.0}  # fmt: skip
    assert m.count_accuracy([2], [2])["count_accuracy"] == 1.0
    with pytest.raises(m.MetricInputError):
        m.count_accuracy([1, 2], [1])
    with pytest.raises(m.MetricInputError):
        m.count_accuracy([1], [0])


def test_detect_in_box_needs_the_face_centre_inside_at_a_similar_size():
    requested = np.array([[0, 0, 20, 20], [40, 0, 60, 20], [0, 40, 20, 60]], np.float64)
    detected = np.array([
        [4, 6, 22, 24],  # centre (13, 15) in box 0, side 18 vs 20: held
        [44, 2, 47, 5],  # centre in box 1 but a tenth of its size: not held
        [-30, 20, 50, 100],  # centre (10, 60) on box 2's edge, but 4x its size: not held
    ], np.float64)  # fmt: skip
    out = m.detect_in_box(detected, requested)
    assert out == {"detect_in_box": pytest.approx(1 / 3), "n_requested": 3.0, "n_in_box": 1.0}
    assert m.detect_in_box(detected, requested, max_size_ratio=8.0)["n_in_box"] == 3.0
    # One face holds one box, even when its centre lies in two overlapping ones; the assignment holds as many
    # boxes as it can.
    overlapping = np.array([[0, 0, 30, 30], [10, 10, 40, 40]], np.float64)
    assert m.detect_in_box(np.array([[12, 12, 32, 32]]), overlapping)["n_in_box"] == 1.0
    two = np.array([[12, 12, 32, 32], [0, 0, 16, 16]], np.float64)  # the second fits only box 0
    assert m.detect_in_box(two, overlapping)["n_in_box"] == 2.0
    assert m.detect_in_box(np.zeros((0, 4)), requested)["detect_in_box"] == 0.0
    with pytest.raises(m.MetricInputError):
        m.detect_in_box(detected, np.zeros((0, 4)))


def test_any_face_rate():
    assert m.any_face_rate([0, 2, 1, 0]) == {"any_face_rate": 0.5}


def test_landmark_nme_is_mean_error_over_interocular_distance():
    target = np.array([[0.0, 0.0], [10.0, 0.0], [5.0, 5.0]])
    predicted = target + np.array([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]])  # errors 5, 0, 2 -> mean 7/3
    out = m.landmark_nme(predicted, target, left_eye=np.array([0, 0]), right_eye=np.array([10, 0]))
    assert out["landmark_nme"] == pytest.approx(7 / 3 / 10)
    assert m.landmark_nme(target, target, target[0], target[1])["landmark_nme"] == 0.0
    with pytest.raises(m.MetricInputError, match="one face backend"):
        m.landmark_nme(predicted[:2], target, target[0], target[1])


def test_background_psnr_ssim_ignores_the_face_and_knows_identical_images():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:16, 8:16] = 255
    edited = image.copy()
    edited[8:16, 8:16] = 0  # only the face changed
    out = m.background_psnr_ssim(image, edited, mask)
    assert out["background_psnr"] == float("inf")
    assert out["background_max_abs_diff"] == 0.0
    assert out["background_fraction"] == pytest.approx(1 - 64 / 1024)
    # A uniform error of 5 grey levels on the background: PSNR = 10 log10(255^2 / 25).
    image_mid = np.full((32, 32, 3), 100, np.uint8)
    shifted = image_mid + 5
    out = m.background_psnr_ssim(image_mid, shifted, mask)
    assert out["background_psnr"] == pytest.approx(10 * math.log10(255**2 / 25))
    assert out["background_max_abs_diff"] == 5.0
    assert 0.9 < out["background_ssim"] < 1.0
    with pytest.raises(m.MetricInputError, match="whole image"):
        m.background_psnr_ssim(image, edited, np.ones((32, 32)))


def test_seconds_per_image_and_mean_gain():
    assert m.seconds_per_image(12.0, 4) == {"eval_seconds_per_image": 3.0}
    with pytest.raises(m.MetricInputError):
        m.seconds_per_image(1.0, 0)
    assert m.mean_gain([0.1, 0.2, float("nan")], [0.3, 0.1, 0.5]) == {
        "mean_gain": pytest.approx(0.05),
        "n_pairs": 2.0,
    }


def test_paired_bootstrap_interval_covers_a_constant_shift_exactly_and_widens_with_noise():
    base = np.linspace(0, 1, 40)
    out = m.paired_bootstrap(base + 0.1, base, n_resamples=500)
    assert out["mean_diff"] == pytest.approx(0.1)
    assert out["ci_low"] == pytest.approx(0.1) and out["ci_high"] == pytest.approx(0.1)
    noise = np.random.default_rng(1).normal(0, 0.2, size=40)
    noisy = m.paired_bootstrap(base + 0.01 + noise, base, n_resamples=2000)
    assert noisy["ci_low"] < 0 < noisy["ci_high"]  # +0.01 on the mean is inside the noise
    # Same inputs and seed: the same interval.
    assert m.paired_bootstrap(base + noise, base) == m.paired_bootstrap(base + noise, base)


def test_reconstruction_psnr():
    image = np.full((2, 4, 4, 3), 100, np.uint8)
    off = image.copy()
    off[1] += 5  # image 1: MSE 25; image 0 exact (100 dB)
    assert m.reconstruction_psnr(image, off)["psnr"] == pytest.approx(
        (100 + 10 * math.log10(255**2 / 25)) / 2
    )
