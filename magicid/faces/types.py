"""The face-analysis contract shared by every backend: `Face` and the `FaceAnalyzer` protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class Face:
    """One detected face, all coordinates in pixels of the analysed image.

    Attributes:
        bbox: (4,) float32 `x0, y0, x1, y1`; inside the image.
        det_score: detector confidence in [0, 1].
        kps5: (5, 2) float32 keypoints in insightface's order: image-left eye, image-right eye, nose tip,
            image-left mouth corner, image-right mouth corner (for a frontal face image-left is the subject's
            right); inside `bbox`.
        landmarks: (N, 2) float32 dense landmarks (N = 478 MediaPipe face mesh offline, 106 insightface);
            may reach slightly outside the image for faces cut by the frame.
        embedding: (D,) float32 L2-normalised identity embedding (D = 128 dlib offline, 512 ArcFace).
    """

    bbox: np.ndarray
    det_score: float
    kps5: np.ndarray
    landmarks: np.ndarray
    embedding: np.ndarray

    @property
    def width(self) -> float:
        return float(self.bbox[2] - self.bbox[0])

    @property
    def height(self) -> float:
        return float(self.bbox[3] - self.bbox[1])


@runtime_checkable
class FaceAnalyzer(Protocol):
    """Detect faces with keypoints, dense landmarks and an identity embedding.

    `analyze(image)` takes a uint8 (H, W, 3) RGB array and returns faces sorted left to right (by box centre).
    `embed(image, face)` recomputes the (D,) L2-normalised embedding of one face of `image`.
    """

    name: str
    embedding_dim: int
    landmark_count: int

    def analyze(self, image: np.ndarray) -> list[Face]: ...

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray: ...


def check_image(image: np.ndarray) -> np.ndarray:
    """Validate an analyser input: uint8 (H, W, 3) RGB; returns it C-contiguous.

    Raises:
        ValueError: wrong dtype, rank or channel count (converting is the caller's job: see
            `magicid.data.ingest.load_image`).
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected a numpy uint8 (H, W, 3) RGB array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"expected a uint8 (H, W, 3) RGB array, got dtype {image.dtype} shape {image.shape} "
            "(convert with magicid.data.ingest.load_image or PIL .convert('RGB'))"
        )
    return np.ascontiguousarray(image)


def sort_left_to_right(faces: list[Face]) -> list[Face]:
    return sorted(faces, key=lambda f: (float(f.bbox[0] + f.bbox[2]), float(f.bbox[1] + f.bbox[3])))


def l2_normalise(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("embedding has zero or non-finite norm")
    return (vector / norm).astype(np.float32)
