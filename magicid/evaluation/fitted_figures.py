"""Definitions of the fitted-backbone figures (issue 13, `benchmarks/bench_fitted.py`), as pure functions.

The evaluation issue's metrics module (`magicid/evaluation/metrics.py`, DESIGN §5) should absorb these: they are
the same quantities (reconstruction PSNR, face detection rate, identity top-1, identity confusion, identity
similarity gain) and live here only because that module did not exist on this branch. Inputs are numbers and
arrays (no models): the benchmark runs the models and the offline face analyzer, these functions define what
the figures mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from magicid.evaluation.metrics import reconstruction_psnr


def psnr_db(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """Mean PSNR (dB) over images, peak 255: `metrics.reconstruction_psnr`'s figure, as a float.

    Args:
        reference, reconstruction: uint8 (N, H, W, 3) or (H, W, 3), same shape.

    Raises:
        MetricInputError (a ValueError): the shapes differ.
    """
    return reconstruction_psnr(reference, reconstruction)["psnr"]


def detection_rate(faces_per_image: Sequence[int]) -> float:
    """Share of generated images in which the detector found at least one face."""
    if not faces_per_image:
        raise ValueError("detection_rate: no images")
    return float(np.mean([n > 0 for n in faces_per_image]))


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.float64)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def nearest_reference(embedding: np.ndarray, references: np.ndarray) -> int:
    """Index of the reference (K, D) with the highest cosine similarity to `embedding` (D,)."""
    return int(np.argmax(_unit(references) @ _unit(embedding)))


def id_top1(
    embeddings: Sequence[np.ndarray | None], intended: Sequence[int], references: np.ndarray
) -> float:
    """Share of generations whose face's nearest reference is the one they were generated with.

    Args:
        embeddings: per generation the embedding (D,) of its detected face, or None when no face was found
            (counted as a miss: a generation without a face shows nobody).
        intended: per generation the index of its reference identity.
        references: (K, D) reference embeddings (chance level: 1 / K).
    """
    if len(embeddings) != len(intended) or not embeddings:
        raise ValueError("id_top1: need one intended index per generation, at least one generation")
    hits = [
        e is not None and nearest_reference(e, references) == k
        for e, k in zip(embeddings, intended, strict=True)
    ]
    return float(np.mean(hits))


def id_confusion(embeddings: Sequence[np.ndarray], intended: Sequence[int], references: np.ndarray) -> float:
    """Share of faces nearer (cosine) to another reference than to their own: identities leaking across faces.

    Args:
        embeddings: per detected face, its embedding (D,) (faces matched to their box; undetected faces are not
            counted: they are in the detection rate).
        intended: per face the index of the reference placed in its box.
        references: (K, D), K >= 2.
    """
    if len(embeddings) != len(intended):
        raise ValueError("id_confusion: need one intended index per face")
    if not embeddings:
        return float("nan")
    refs = _unit(references)
    confused = []
    for embedding, k in zip(embeddings, intended, strict=True):
        similarity = refs @ _unit(embedding)
        others = np.delete(similarity, k)
        confused.append(bool(others.max() > similarity[k]))
    return float(np.mean(confused))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(_unit(a) @ _unit(b))


def similarity_gain(before: Sequence[float], after: Sequence[float]) -> float:
    """Mean identity similarity after minus before (paired per face)."""
    if len(before) != len(after) or not before:
        raise ValueError("similarity_gain: need paired, non-empty similarities")
    return float(np.mean(after) - np.mean(before))


def background_identical(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> bool:
    """True when every pixel outside `mask` (H, W; 0 = outside) is byte-identical in (H, W, 3) `before`/`after`."""
    outside = np.asarray(mask) == 0
    return bool(np.array_equal(np.asarray(before)[outside], np.asarray(after)[outside]))
