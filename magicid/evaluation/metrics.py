"""Evaluation metrics (DESIGN §5): small pure functions over arrays, each returning `dict[str, float]`.

These are the one place the project's quality figures are defined; the evaluation command, the promotion
gate and the benchmarks all call them:
- `id_similarity`: cosine similarity of each reference to the generated face matched to it (Hungarian
  matching on similarity; a reference left without a detected face scores 0), averaged over references;
- `id_confusion_rate`: share of faces, placed for identity i, that are nearer to another reference;
- `id_top1_accuracy`: share of faces whose nearest reference is the intended one;
- `generation_id_top1`: the same over generations, a generation without a detected face counting as a miss;
- `face_detection_rate`: share of the layout's faces that the detector finds (IoU-matched);
- `any_face_rate`: share of images in which at least one face is found;
- `count_accuracy`: share of generations with exactly the requested number of detected faces
  (MultiHuman-Testbench, NeurIPS 2025);
- `detect_in_box`: share of requested boxes holding a detected face (its centre inside the box, its size
  within a factor of the box's), reported per face-size slice by the evaluation;
- `landmark_nme`: mean landmark error against the conditioning landmarks, over the inter-ocular distance;
- `background_psnr_ssim`: PSNR and SSIM of an edited image against the original outside face masks;
- `reconstruction_psnr`: mean PSNR of reconstructions (VAE round trips);
- `seconds_per_image`: wall time over images;
- `mean_gain`: mean of after - before (e.g. DIIR's identity-similarity gain).

Embeddings are (N, D) float arrays (normalised here, so any scale works); boxes are (N, 4) `x0, y0, x1, y1`
pixels; images are uint8 (H, W, 3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np

from magicid.errors import MagicIDError
from magicid.faces import matching
from magicid.faces.matching import EmbeddingInputError
from magicid.imaging.boxes import box_iou


class MetricInputError(MagicIDError, ValueError):
    """A metric was given arrays of the wrong shape or inconsistent sizes."""


# Which way each gated figure improves: the promotion gate orients differences with this.
HIGHER_IS_BETTER: dict[str, bool] = {
    "id_similarity": True,
    "id_confusion_rate": False,
    "id_top1_accuracy": True,
    "face_detection_rate": True,
    "any_face_rate": True,
    "count_accuracy": True,
    "detect_in_box": True,
    "landmark_nme": False,
    "background_psnr": True,
    "background_ssim": True,
    "eval_seconds_per_image": False,
}


@contextlib.contextmanager
def _embedding_inputs(metric: str) -> Iterator[None]:
    """Embedding problems found by `magicid.faces.matching` as this module's `MetricInputError`."""
    try:
        yield
    except EmbeddingInputError as error:
        raise MetricInputError(f"{metric}: {error}") from error


def cosine_matrix(faces: np.ndarray, references: np.ndarray) -> np.ndarray:
    """(F, R) cosine similarities between face embeddings (F, D) and reference embeddings (R, D)
    (`magicid.faces.matching.cosine_matrix`, its input errors as `MetricInputError`)."""
    with _embedding_inputs("cosine"):
        return matching.cosine_matrix(faces, references)


def id_similarity(face_embeddings: np.ndarray, reference_embeddings: np.ndarray) -> dict[str, float]:
    """Identity similarity of one generated image with R reference identities.

    Faces and references are matched one-to-one by the Hungarian algorithm maximising total cosine similarity
    (`magicid.faces.matching.hungarian_match`, as DIIR assigns identities); each reference scores the cosine with its matched face, and a
    reference left without a face (the detector found fewer faces than identities) scores 0.

    Args:
        face_embeddings: (F, D) embeddings of the faces detected in the generated image (F may be 0).
        reference_embeddings: (R, D) embeddings of the references, R >= 1.

    Returns:
        `id_similarity` (mean over references, in [-1, 1]), `id_matched` (references with a face).
    """
    if len(reference_embeddings) == 0:
        raise MetricInputError("id_similarity: needs at least one reference embedding")
    with _embedding_inputs("id_similarity"):
        similarity = matching.cosine_matrix(face_embeddings, reference_embeddings)  # (F, R)
        assigned = matching.hungarian_match(face_embeddings, reference_embeddings)
    per_reference = np.zeros(similarity.shape[1])
    for face, reference in enumerate(assigned):
        if reference is not None:
            per_reference[reference] = similarity[face, reference]
    matched = sum(reference is not None for reference in assigned)
    return {"id_similarity": float(per_reference.mean()), "id_matched": float(matched)}


def match_boxes(detected: np.ndarray, expected: np.ndarray, min_iou: float) -> list[int | None]:
    """For each expected box, the index of the detected box matched to it (Hungarian on IoU), or None.

    A pair with IoU below `min_iou` is not a match.
    """
    from scipy.optimize import linear_sum_assignment

    iou = box_iou(detected, expected)  # (F, E)
    matches: list[int | None] = [None] * iou.shape[1]
    if iou.size:
        rows, cols = linear_sum_assignment(iou, maximize=True)
        for row, col in zip(rows, cols, strict=True):
            if iou[row, col] >= min_iou:
                matches[int(col)] = int(row)
    return matches


def face_detection_rate(
    detected_boxes: np.ndarray, expected_boxes: np.ndarray, min_iou: float = 0.3
) -> dict[str, float]:
    """Share of the faces a layout asked for that the detector finds in the generated image.

    Args:
        detected_boxes: (F, 4) detected face boxes.
        expected_boxes: (E, 4) layout boxes, E >= 1.
        min_iou: a detection counts for a layout box when their IoU (Hungarian-matched) is at least this.

    Returns:
        `face_detection_rate` in [0, 1], `n_expected`, `n_detected`.
    """
    expected = np.asarray(expected_boxes, dtype=np.float64).reshape(-1, 4)
    if len(expected) == 0:
        raise MetricInputError("face_detection_rate: needs at least one expected box")
    matches = match_boxes(detected_boxes, expected, min_iou)
    found = sum(m is not None for m in matches)
    return {
        "face_detection_rate": found / len(expected),
        "n_expected": float(len(expected)),
        "n_detected": float(np.asarray(detected_boxes).reshape(-1, 4).shape[0]),
    }


def any_face_rate(faces_per_image: Sequence[int]) -> dict[str, float]:
    """Share of images in which the detector finds at least one face (`faces_per_image`: one count per image)."""
    counts = np.asarray(faces_per_image)
    if counts.size == 0:
        raise MetricInputError("any_face_rate: no images")
    return {"any_face_rate": float((counts > 0).mean())}


def count_accuracy(detected_counts: Sequence[int], requested_counts: Sequence[int]) -> dict[str, float]:
    """Share of generations showing exactly as many faces as were asked for (MultiHuman-Testbench's count accuracy).

    A generation with a missing face, or an extra one (a face drawn where no box asked for one, a duplicated
    person), is wrong; the detector's count is the measurement.

    Args:
        detected_counts: per generation the number of faces the detector finds.
        requested_counts: per generation the number of people asked for (layout boxes), each >= 1.

    Returns:
        `count_accuracy` in [0, 1], `mean_abs_count_error` (faces), `n_generations`.
    """
    detected = np.asarray(detected_counts, dtype=np.int64).reshape(-1)
    requested = np.asarray(requested_counts, dtype=np.int64).reshape(-1)
    if detected.shape != requested.shape or detected.size == 0:
        raise MetricInputError(
            f"count_accuracy: {detected.size} detected counts for {requested.size} requested counts (need >= 1)"
        )
    if (requested < 1).any() or (detected < 0).any():
        raise MetricInputError("count_accuracy: requested counts must be >= 1 and detected counts >= 0")
    return {
        "count_accuracy": float((detected == requested).mean()),
        "mean_abs_count_error": float(np.abs(detected - requested).mean()),
        "n_generations": float(detected.size),
    }


def detect_in_box(
    detected_boxes: np.ndarray, requested_boxes: np.ndarray, max_size_ratio: float = 2.0
) -> dict[str, float]:
    """Share of the requested boxes that hold a detected face: the face's centre lies inside the box and its side
    (the longer one) is within `max_size_ratio` of the box's, each face counting for at most one box.

    Where a face is, not how well its box overlaps: detectors draw boxes of their own convention (MediaPipe's
    spans brows to chin, a layout's may include the forehead), which IoU punishes and this does not. Faces are
    assigned to boxes to hold as many boxes as possible (Hungarian matching, nearer centres preferred).

    Args:
        detected_boxes: (F, 4) detected face boxes `x0, y0, x1, y1` (F may be 0).
        requested_boxes: (E, 4) the layout's boxes, E >= 1.
        max_size_ratio: a face of side s holds a box of side b when 1 / ratio <= s / b <= ratio.

    Returns:
        `detect_in_box` in [0, 1], `n_requested`, `n_in_box`.
    """
    from scipy.optimize import linear_sum_assignment

    detected = np.asarray(detected_boxes, dtype=np.float64).reshape(-1, 4)
    requested = np.asarray(requested_boxes, dtype=np.float64).reshape(-1, 4)
    if len(requested) == 0:
        raise MetricInputError("detect_in_box: needs at least one requested box")
    if max_size_ratio < 1:
        raise MetricInputError(f"detect_in_box: max_size_ratio must be >= 1, got {max_size_ratio}")
    held = 0
    if len(detected):
        centres = (detected[:, :2] + detected[:, 2:]) / 2  # (F, 2)
        inside = (
            (centres[:, None, 0] >= requested[None, :, 0])
            & (centres[:, None, 0] <= requested[None, :, 2])
            & (centres[:, None, 1] >= requested[None, :, 1])
            & (centres[:, None, 1] <= requested[None, :, 3])
        )  # (F, E)
        face_side = (detected[:, 2:] - detected[:, :2]).max(axis=1)
        box_side = (requested[:, 2:] - requested[:, :2]).max(axis=1)
        ratio = face_side[:, None] / np.maximum(box_side[None, :], 1e-9)
        fits = inside & (ratio <= max_size_ratio) & (ratio >= 1.0 / max_size_ratio)
        # Maximise the boxes held; among equal counts prefer centres nearer the boxes' centres (< 1 in total).
        box_centres = (requested[:, :2] + requested[:, 2:]) / 2
        distance = np.linalg.norm(centres[:, None] - box_centres[None], axis=2) / np.maximum(
            box_side[None, :], 1e-9
        )
        score = fits * (1.0 - distance / (1.0 + distance) / (len(requested) + 1))
        rows, cols = linear_sum_assignment(score, maximize=True)
        held = int(fits[rows, cols].sum())
    return {
        "detect_in_box": held / len(requested),
        "n_requested": float(len(requested)),
        "n_in_box": float(held),
    }


def id_confusion_rate(
    face_embeddings: np.ndarray, reference_embeddings: np.ndarray, intended: Sequence[int | None]
) -> dict[str, float]:
    """Share of faces placed for identity i that are more similar to another reference than to reference i.

    Args:
        face_embeddings: (F, D) embeddings of detected faces.
        reference_embeddings: (R, D), R >= 2 for confusion to be possible.
        intended: per face the reference index it was placed for (its layout box), or None (not counted).

    Returns:
        `id_confusion_rate` in [0, 1] (NaN when no face has an intended identity), `n_faces` counted.
    """
    similarity = cosine_matrix(face_embeddings, reference_embeddings)
    if len(intended) != similarity.shape[0]:
        raise MetricInputError(
            f"id_confusion_rate: {len(intended)} intended entries for {similarity.shape[0]} faces"
        )
    counted = [(f, int(r)) for f, r in enumerate(intended) if r is not None]
    if not counted:
        return {"id_confusion_rate": float("nan"), "n_faces": 0.0}
    confused = sum(bool(np.any(np.delete(similarity[f], r) > similarity[f, r])) for f, r in counted)
    return {"id_confusion_rate": confused / len(counted), "n_faces": float(len(counted))}


def id_top1_accuracy(
    face_embeddings: np.ndarray, reference_embeddings: np.ndarray, target: Sequence[int]
) -> dict[str, float]:
    """Share of faces whose nearest reference (cosine) is `target[f]`; chance is 1 / R.

    Returns:
        `id_top1_accuracy` in [0, 1], `chance` = 1 / R.
    """
    similarity = cosine_matrix(face_embeddings, reference_embeddings)
    if len(target) != similarity.shape[0] or similarity.shape[0] == 0:
        raise MetricInputError(
            f"id_top1_accuracy: {len(target)} targets for {similarity.shape[0]} faces (need >= 1)"
        )
    hits = similarity.argmax(axis=1) == np.asarray(target)
    return {"id_top1_accuracy": float(hits.mean()), "chance": 1.0 / similarity.shape[1]}


def generation_id_top1(
    face_embeddings: Sequence[np.ndarray | None], reference_embeddings: np.ndarray, target: Sequence[int]
) -> dict[str, float]:
    """Share of generations whose face's nearest reference (cosine) is `target[g]`; no face found = a miss.

    `id_top1_accuracy` scores the faces that were found; this scores what was asked for: a generation that shows
    nobody did not show identity k (the fitted-backbone benchmark's `id_top1_generated`).

    Args:
        face_embeddings: per generation the embedding (D,) of its face, or None when the detector found none.
        reference_embeddings: (R, D).
        target: per generation the reference index it was generated with.

    Returns:
        `generation_id_top1` in [0, 1], `chance` = 1 / R, `n_generations`, `n_faces` (generations with a face).
    """
    if len(face_embeddings) != len(target) or not face_embeddings:
        raise MetricInputError(
            f"generation_id_top1: {len(target)} targets for {len(face_embeddings)} generations (need >= 1)"
        )
    found = [g for g, e in enumerate(face_embeddings) if e is not None]
    refs = np.asarray(reference_embeddings, dtype=np.float64)
    hits = 0
    if found:
        similarity = cosine_matrix(np.stack([face_embeddings[g] for g in found]), refs)
        hits = int((similarity.argmax(axis=1) == np.asarray([target[g] for g in found])).sum())
    return {
        "generation_id_top1": hits / len(face_embeddings),
        "chance": 1.0 / refs.shape[0],
        "n_generations": float(len(face_embeddings)),
        "n_faces": float(len(found)),
    }


def landmark_nme(
    predicted: np.ndarray, target: np.ndarray, left_eye: np.ndarray, right_eye: np.ndarray
) -> dict[str, float]:
    """Normalised mean error of landmarks: mean point distance / inter-ocular distance (of the target).

    Args:
        predicted: (N, 2) landmarks found on the generated face (pixels).
        target: (N, 2) the conditioning landmarks the face was asked to follow (same order).
        left_eye, right_eye: (2,) the target's eye centres (e.g. `kps5[0]`, `kps5[1]`).

    Returns:
        `landmark_nme` (0 = perfect; 1 = errors as large as the eye distance).
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if predicted.shape != target.shape or predicted.ndim != 2 or predicted.shape[1] != 2:
        raise MetricInputError(
            f"landmark_nme: predicted {predicted.shape} and target {target.shape} must both be (N, 2) "
            "(use one face backend for conditioning and scoring)"
        )
    interocular = float(np.linalg.norm(np.asarray(right_eye, float) - np.asarray(left_eye, float)))
    if interocular <= 0:
        raise MetricInputError("landmark_nme: the eye centres coincide (inter-ocular distance 0)")
    error = np.linalg.norm(predicted - target, axis=1).mean()
    return {"landmark_nme": float(error / interocular)}


def background_psnr_ssim(
    reference: np.ndarray, edited: np.ndarray, face_mask: np.ndarray
) -> dict[str, float]:
    """PSNR and SSIM (scikit-image) of `edited` against `reference` over the pixels outside the face mask.

    SSIM is the mean of scikit-image's SSIM map (7x7 windows, per channel) over the background pixels; PSNR is
    computed from the background pixels' MSE, and is +inf where they are identical.

    Args:
        reference, edited: uint8 (H, W, 3) images.
        face_mask: (H, W), non-zero on faces (e.g. DIIR's blend mask); at least one pixel must be zero.

    Returns:
        `background_psnr` (dB, inf when identical), `background_ssim` (<= 1), `background_max_abs_diff`
        (0 = bit-identical), `background_fraction` (share of pixels scored).
    """
    from skimage.metrics import structural_similarity

    reference = np.asarray(reference)
    edited = np.asarray(edited)
    mask = np.asarray(face_mask)
    if reference.shape != edited.shape or reference.ndim != 3 or mask.shape != reference.shape[:2]:
        raise MetricInputError(
            f"background_psnr_ssim: images {reference.shape} / {edited.shape} and mask {mask.shape} must be "
            "(H, W, 3), (H, W, 3), (H, W)"
        )
    background = mask == 0
    if not background.any():
        raise MetricInputError("background_psnr_ssim: the face mask covers the whole image")
    ref = reference.astype(np.float64)[background]
    out = edited.astype(np.float64)[background]
    mse = float(np.mean((ref - out) ** 2))
    psnr = float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
    _, ssim_map = structural_similarity(
        reference, edited, channel_axis=2, data_range=255, full=True, win_size=7
    )
    return {
        "background_psnr": psnr,
        "background_ssim": float(ssim_map.mean(axis=2)[background].mean()),
        "background_max_abs_diff": float(np.abs(ref - out).max()),
        "background_fraction": float(background.mean()),
    }


def reconstruction_psnr(reference: np.ndarray, reconstruction: np.ndarray) -> dict[str, float]:
    """Mean PSNR (dB, peak 255) over images of a reconstruction (e.g. VAE encode-decode); an exact image is 100 dB.

    Args:
        reference, reconstruction: uint8 (N, H, W, 3) or (H, W, 3), same shape.

    Returns:
        `psnr` (mean over images; 100 caps the exact case so the mean stays finite).
    """
    ref = np.asarray(reference, np.float64)
    rec = np.asarray(reconstruction, np.float64)
    if ref.shape != rec.shape:
        raise MetricInputError(f"reconstruction_psnr: shapes differ, {ref.shape} vs {rec.shape}")
    if ref.ndim == 3:
        ref, rec = ref[None], rec[None]
    mse = ((ref - rec) ** 2).reshape(len(ref), -1).mean(axis=1)
    values = np.where(mse > 0, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-20)), 100.0)
    return {"psnr": float(values.mean())}


def seconds_per_image(total_seconds: float, n_images: int) -> dict[str, float]:
    """`eval_seconds_per_image`: wall time of a (batched) generation run over the images it produced."""
    if n_images < 1:
        raise MetricInputError(f"seconds_per_image: n_images must be >= 1, got {n_images}")
    return {"eval_seconds_per_image": float(total_seconds) / n_images}


def mean_gain(before: Sequence[float], after: Sequence[float]) -> dict[str, float]:
    """Mean of after - before over paired values (NaN pairs skipped), e.g. DIIR's identity-similarity gain."""
    b = np.asarray(before, dtype=np.float64)
    a = np.asarray(after, dtype=np.float64)
    if a.shape != b.shape:
        raise MetricInputError(f"mean_gain: {b.shape} before vs {a.shape} after")
    keep = np.isfinite(a) & np.isfinite(b)
    if not keep.any():
        return {"mean_gain": float("nan"), "n_pairs": 0.0}
    return {"mean_gain": float((a[keep] - b[keep]).mean()), "n_pairs": float(keep.sum())}


def paired_bootstrap(
    challenger: np.ndarray,
    champion: np.ndarray,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Percentile bootstrap interval of the mean paired difference challenger - champion.

    Items (rows) are resampled with replacement, the same rows for both models, so the interval reflects
    how much the difference depends on which prompts, layouts and seeds were drawn.

    Args:
        challenger, champion: (N,) per-item values on the same N items (NaN pairs are dropped).
        n_resamples: bootstrap resamples.
        confidence: interval coverage in (0, 1).
        seed: seeds the resampling (same inputs, same interval).

    Returns:
        `mean_diff`, `ci_low`, `ci_high`, `n_items`.
    """
    a = np.asarray(challenger, dtype=np.float64)
    b = np.asarray(champion, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise MetricInputError(f"paired_bootstrap: challenger {a.shape} and champion {b.shape} must be (N,)")
    if not 0 < confidence < 1:
        raise MetricInputError(f"paired_bootstrap: confidence must be in (0, 1), got {confidence}")
    keep = np.isfinite(a) & np.isfinite(b)
    diff = a[keep] - b[keep]
    if diff.size == 0:
        return {"mean_diff": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n_items": 0.0}
    rng = np.random.default_rng(seed)
    index = rng.integers(0, diff.size, size=(n_resamples, diff.size))
    means = diff[index].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return {
        "mean_diff": float(diff.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "n_items": float(diff.size),
    }
