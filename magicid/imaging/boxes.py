"""Face boxes (x0, y0, x1, y1 pixels): checks, overlaps, masks, the default layout, and drawing them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import PIL.Image

from magicid.errors import ModelInputError

Box = tuple[float, float, float, float]


def check_boxes(boxes: Sequence[Box], height: int, width: int) -> np.ndarray:
    """Boxes as a float32 (n, 4) array; each must satisfy 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height."""
    array = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) if len(boxes) else np.zeros((0, 4), np.float32)
    for i, (x0, y0, x1, y1) in enumerate(array):
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ModelInputError(
                f"layout box {i} = ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is not inside the {width}x{height} image "
                "with x0 < x1, y0 < y1 (pixels)"
            )
    return array


def box_overlaps(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise intersection over union and intersection over the smaller box of (A, 4) and (B, 4) boxes.

    Returns:
        (iou, ios): two (A, B) float64 arrays; 0 where boxes do not meet (or have no area).
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    area_b = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None, :]
    union = np.maximum(area_a + area_b - inter, 1e-9)
    smaller = np.maximum(np.minimum(area_a, area_b), 1e-9)
    return inter / union, inter / smaller


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(A, B) intersection over union of boxes a (A, 4) and b (B, 4) (`box_overlaps`' first array)."""
    return box_overlaps(a, b)[0]


def box_masks(boxes: Sequence[Box], height: int, width: int, feather: float = 0.0) -> np.ndarray:
    """One mask a box: 1 inside, 0 outside, ramping linearly over `feather` x box side inside the box edges.

    Returns:
        (n, height, width) float32 in [0, 1]; zero everywhere outside each box.
    """
    array = check_boxes(boxes, height, width)
    ys, xs = np.arange(height, dtype=np.float32) + 0.5, np.arange(width, dtype=np.float32) + 0.5
    masks = np.zeros((len(array), height, width), np.float32)
    for i, (x0, y0, x1, y1) in enumerate(array):
        ramp_x = max(feather * (x1 - x0), 1e-6)
        ramp_y = max(feather * (y1 - y0), 1e-6)
        mx = np.clip(np.minimum(xs - x0, x1 - xs) / ramp_x, 0, 1)
        my = np.clip(np.minimum(ys - y0, y1 - ys) / ramp_y, 0, 1)
        masks[i] = my[:, None] * mx[None, :]
    return masks


def default_boxes(n: int, height: int, width: int) -> list[Box]:
    """n face boxes in a row across the upper middle of the image (the layout when none is given)."""
    side = min(width / n, height / 2) * 0.6
    cy = height * 0.4
    return [
        (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        for cx in ((i + 0.5) * width / n for i in range(n))
    ]


def draw_boxes(
    image: PIL.Image.Image | np.ndarray,
    boxes: Sequence[Sequence[float]] | np.ndarray,
    colour: tuple[int, int, int] = (0, 255, 0),
    width: int | None = None,
) -> PIL.Image.Image:
    """A copy of `image` (PIL, or uint8 (H, W, 3)) with each box outlined; RGB result.

    Args:
        width: line width in pixels (default: max(2, shorter side / 128), visible at any size).
    """
    from PIL import ImageDraw

    out = (image if isinstance(image, PIL.Image.Image) else PIL.Image.fromarray(np.asarray(image))).convert(
        "RGB"
    )
    line = width if width is not None else max(2, round(min(out.size) / 128))
    draw = ImageDraw.Draw(out)
    for box in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        draw.rectangle([float(v) for v in box], outline=tuple(colour), width=line)
    return out


def box_mask(box: np.ndarray, size: int) -> np.ndarray:
    """float32 (size, size) mask of the pixels whose centres lie inside `box` (x0, y0, x1, y1), at least 1 px."""
    x0, y0 = math.floor(box[0] + 0.5), math.floor(box[1] + 0.5)
    x1, y1 = max(x0 + 1, math.floor(box[2] + 0.5)), max(y0 + 1, math.floor(box[3] + 0.5))
    mask = np.zeros((size, size), dtype=np.float32)
    mask[max(0, y0) : min(size, y1), max(0, x0) : min(size, x1)] = 1.0
    return mask
