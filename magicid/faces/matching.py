"""Matching faces to reference identities: cosine similarity of face-recognition embeddings and the one-to-one
assignment maximising its total (Hungarian algorithm). DIIR assigns identities with it (`restore.matching`) and
evaluation scores identity with it (`evaluation.metrics.id_similarity`), so both match alike."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from magicid.errors import MagicIDError


class EmbeddingInputError(MagicIDError, ValueError):
    """Embeddings of the wrong shape, of different widths, or not finite and non-zero."""


def unit_rows(array: np.ndarray | Sequence, what: str, dim: int | None = None) -> np.ndarray:
    """(N, D) float64 with unit-norm rows; (0, D) allowed.

    Raises:
        EmbeddingInputError: not (N, D) (or not (N, `dim`)), or a row not finite or zero.
    """
    rows = np.asarray(array, dtype=np.float64)
    if rows.size == 0:
        return rows.reshape(0, dim or 0)
    if rows.ndim != 2 or (dim is not None and rows.shape[1] != dim):
        raise EmbeddingInputError(
            f"{what}: expected an (N, {dim or 'D'}) array, got shape {rows.shape} (use one face backend for "
            "images and references)"
        )
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if not np.all(np.isfinite(rows)) or np.any(norms == 0):
        raise EmbeddingInputError(f"{what}: embeddings must be finite and non-zero")
    return rows / norms


def cosine_matrix(faces: np.ndarray, references: np.ndarray) -> np.ndarray:
    """(F, R) cosine similarities between face embeddings (F, D) and reference embeddings (R, D)."""
    refs = unit_rows(references, "references")
    found = unit_rows(faces, "faces", refs.shape[1] if refs.size else None)
    if found.size == 0 or refs.size == 0:
        return np.zeros((len(found), len(refs)))
    return found @ refs.T


def hungarian_match(faces: np.ndarray, references: np.ndarray) -> list[int | None]:
    """Assign references to faces one-to-one, maximising total cosine similarity (scipy `linear_sum_assignment`).

    Args:
        faces: (F, D) face embeddings (F may be 0).
        references: (R, D) reference embeddings.

    Returns:
        Per face the reference index, or None for faces left over when F > R.
    """
    from scipy.optimize import linear_sum_assignment

    similarity = cosine_matrix(faces, references)  # (F, R)
    assigned: list[int | None] = [None] * similarity.shape[0]
    if similarity.size:
        rows, cols = linear_sum_assignment(similarity, maximize=True)
        for row, col in zip(rows, cols, strict=True):
            assigned[int(row)] = int(col)
    return assigned
