"""Zoomed face crops: the "zoom" of IDZoom that turns a small face into a model-sized image.

A crop is a square box around the face, grown by `margin` (a fraction of the face's longer side on each
side), kept inside the image, and resized to `size` x `size`.
"""

from __future__ import annotations

import math

import numpy as np


def expand_box(bbox, margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Square box around `bbox`, grown by `margin`, inside the image.

    The square's side is `max(w, h) * (1 + 2 * margin)`; it is shifted (not cut) to fit inside the image, and
    only where the side exceeds the image's shorter side is it shrunk to that side. The result is always square.

    Args:
        bbox: `x0, y0, x1, y1` in pixels.
        margin: >= 0, fraction of the face's longer side added on each side.
        width, height: image size (px).

    Returns:
        `(x0, y0, x1, y1)` ints with `0 <= x0 < x1 <= width`, `0 <= y0 < y1 <= height`, `x1 - x0 == y1 - y0`.

    Raises:
        ValueError: degenerate box, negative margin or empty image.
    """
    x0, y0, x1, y1 = (float(v) for v in bbox)
    if not (x1 > x0 and y1 > y0) or not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"expected a box x0 < x1, y0 < y1, got {tuple(bbox)}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if width < 1 or height < 1:
        raise ValueError(f"empty image {width}x{height}")
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    side = int(min(max(round(side), 1), width, height))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(round(cx - side / 2))
    top = int(round(cy - side / 2))
    left = min(max(left, 0), width - side)
    top = min(max(top, 0), height - side)
    return left, top, left + side, top + side


def zoom_crop(
    image: np.ndarray, bbox, size: int, margin: float
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Cut the face's square box (see `expand_box`) and resize it to `size` x `size`.

    Args:
        image: uint8 (H, W, 3).
        bbox: face box `x0, y0, x1, y1` (px).
        size: output side (px).
        margin: see `expand_box`.

    Returns:
        crop uint8 (size, size, 3) and the crop box `(x0, y0, x1, y1)` in image pixels.
    """
    import cv2

    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected a uint8 (H, W, C) image, got {image.dtype} {image.shape}")
    if size < 1:
        raise ValueError(f"crop size must be >= 1, got {size}")
    height, width = image.shape[:2]
    box = expand_box(bbox, margin, width, height)
    x0, y0, x1, y1 = box
    region = image[y0:y1, x0:x1]
    # Area averaging when shrinking (no aliasing), bicubic when zooming a small face in.
    interpolation = cv2.INTER_AREA if (x1 - x0) > size else cv2.INTER_CUBIC
    crop = cv2.resize(region, (size, size), interpolation=interpolation)
    return np.ascontiguousarray(crop), box


def person_box(face_bbox, width: int, height: int) -> tuple[int, int, int, int]:
    """Square box around the person a face belongs to (head to hips), for pose estimation on one person.

    The side is 5 face heights (shoulders are ~3 face widths apart; hips ~4 face heights below the chin),
    placed from 0.75 face heights above the face; shifted and shrunk to fit like `expand_box`.
    """
    x0, y0, x1, y1 = (float(v) for v in face_bbox)
    face = max(x1 - x0, y1 - y0)
    side = int(min(max(round(5.0 * face), 1), width, height))
    cx = (x0 + x1) / 2
    left = min(max(int(round(cx - side / 2)), 0), width - side)
    top = min(max(int(round(y0 - 0.75 * face)), 0), height - side)
    return left, top, left + side, top + side
