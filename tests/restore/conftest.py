"""Helpers shared by the restore tests."""

from __future__ import annotations

import numpy as np


def detected_face(box, seed):
    """A detected face: box, landmarks inside it (the ControlNet runs) and a unit embedding."""
    from magicid.faces import Face

    rng = np.random.default_rng(seed)
    bbox = np.asarray(box, np.float32)
    side = bbox[2] - bbox[0]
    embedding = rng.standard_normal(128).astype(np.float32)
    return Face(bbox=bbox, det_score=1.0, kps5=np.zeros((5, 2), np.float32),
                landmarks=(bbox[:2] + rng.uniform(0.1, 0.9, (40, 2)) * side).astype(np.float32),
                embedding=embedding / np.linalg.norm(embedding))  # fmt: skip
