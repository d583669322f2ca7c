"""What DIIR returns: the restored image, each restored face, the union blend mask and counts."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

# The counts every `RestoreResult.stats` holds (all 0 when the input is returned unchanged).
STAT_NAMES = ("faces_detected", "faces_restored", "batches", "unet_calls", "unet_sample_evals",
              "controlnet_calls", "controlnet_sample_evals", "inversion_sample_evals")  # fmt: skip


@dataclasses.dataclass
class RestoredFace:
    """One face that DIIR restored.

    Attributes:
        bbox: (4,) float32 face box `x0, y0, x1, y1` in input pixels.
        crop_box: `(x0, y0, x1, y1)` the square crop that was restored and blended back.
        bucket: the crop resolution it went through the UNet at.
        identity: index of the reference identity assigned, or None (restored with its own embedding,
            or without identity features when there is no adapter).
        identity_name: the reference's name ("" if none).
        similarity: cosine similarity to its best-matching reference (None if not matched by embedding);
            below `diir.min_match_similarity` the match was not applied (identity None).
        alpha: uint8 (side, side) blend mask over `crop_box` (0 = input kept exactly).
        inversion_iterations: fixed-point refinements spent, per inverse step.
    """

    bbox: np.ndarray
    crop_box: tuple[int, int, int, int]
    bucket: int
    identity: int | None
    identity_name: str
    similarity: float | None
    alpha: np.ndarray
    inversion_iterations: list[int]


@dataclasses.dataclass
class RestoreResult:
    """What `DIIR.restore` returns.

    Attributes:
        image: the restored image (PIL RGB, the input's size).
        faces: the restored faces, in input order (left to right when detected).
        mask: uint8 (H, W) union of the faces' blend masks; where it is 0 the output equals the input byte
            for byte.
        note: what happened, in words ("" when every selected face was restored normally).
        stats: counts (`STAT_NAMES`): `faces_detected`, `faces_restored`, `batches`, `unet_calls`,
            `unet_sample_evals`, `controlnet_calls`, `controlnet_sample_evals`, `inversion_sample_evals`.
    """

    image: Image.Image
    faces: list[RestoredFace]
    mask: np.ndarray
    note: str = ""
    stats: dict[str, int] = dataclasses.field(default_factory=dict)


def zero_stats(**counts: int) -> dict[str, int]:
    """Every stat at 0, then `counts`."""
    unknown = set(counts) - set(STAT_NAMES)
    assert not unknown, f"unknown restore stats {sorted(unknown)}"
    return dict.fromkeys(STAT_NAMES, 0) | counts


def count_batch(stats: dict[str, int], inversion: Any, n: int, cfg: bool, controlnet: bool) -> None:
    """Add one batch of n faces to `stats`: its inversion (an `InversionResult`) and its denoising steps.

    Every noise evaluation runs the UNet and, with landmarks, the ControlNet on the same rows; CFG doubles
    the denoising rows.
    """
    steps = len(inversion.timesteps)
    calls = inversion.unet_calls + steps
    rows = inversion.sample_evals + (2 if cfg else 1) * n * steps
    stats["batches"] += 1
    stats["unet_calls"] += calls
    stats["unet_sample_evals"] += rows
    if controlnet:
        stats["controlnet_calls"] += calls
        stats["controlnet_sample_evals"] += rows
    stats["inversion_sample_evals"] += inversion.sample_evals
