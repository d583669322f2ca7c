"""Box geometry for detection: tiling an image and fusing overlapping detections (NMS)."""

from __future__ import annotations

import numpy as np

from magicid.imaging.boxes import box_overlaps


def tile_grid(
    height: int, width: int, rows: int, cols: int, overlap: float
) -> list[tuple[int, int, int, int]]:
    """Overlapping tiles covering the image.

    Args:
        height, width: image size (px).
        rows, cols: tile grid.
        overlap: fraction of a tile shared with its neighbour, in [0, 1).

    Returns:
        `(x0, y0, x1, y1)` integer tiles, row-major; they cover every pixel.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"tile grid must be at least 1x1, got {rows}x{cols}")
    if not 0 <= overlap < 1:
        raise ValueError(f"tile overlap must be in [0, 1), got {overlap}")
    tile_h = height / (rows - (rows - 1) * overlap)
    tile_w = width / (cols - (cols - 1) * overlap)
    tiles = []
    for r in range(rows):
        y0 = int(np.floor(r * tile_h * (1 - overlap)))
        y1 = height if r == rows - 1 else min(height, int(np.ceil(y0 + tile_h)))
        for c in range(cols):
            x0 = int(np.floor(c * tile_w * (1 - overlap)))
            x1 = width if c == cols - 1 else min(width, int(np.ceil(x0 + tile_w)))
            tiles.append((x0, y0, x1, y1))
    return tiles


def fit_grid(height: int, width: int, rows: int, cols: int, overlap: float) -> tuple[int, int]:
    """The smallest grid whose tiles are no larger than the `rows` x `cols` grid's longer tile side.

    The detector letterboxes each tile into its square input, so a tile's scale is set by its longer side: a
    2x3 grid on a square image has 0.55x0.38 tiles, as zoomed as a 2x2 grid's 0.55x0.55 ones, for 6 detector
    calls instead of 4. Fewer rows or columns are used only where the tiles stay at most that long, so small
    faces are seen at the same scale (t1.jpg's 1280x886 keeps 2x3; the 512x512 astronaut gets 2x2).
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"tile grid must be at least 1x1, got {rows}x{cols}")

    def side(length: int, count: int) -> float:
        return length / (count - (count - 1) * overlap)

    longest = max(side(height, rows), side(width, cols)) * (1 + 1e-9)
    fit_rows = next(r for r in range(1, rows + 1) if side(height, r) <= longest)
    fit_cols = next(c for c in range(1, cols + 1) if side(width, c) <= longest)
    return fit_rows, fit_cols


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, containment: float = 0.7) -> list[int]:
    """Greedy non-maximum suppression.

    A box is suppressed by a higher-scoring kept box when their IoU exceeds `iou`, or when most of the smaller
    one lies inside the other (`containment`): a tile that cuts a face yields a partial box inside the full one.

    Returns:
        Indices of kept boxes, highest score first.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    keep: list[int] = []
    for index in order:
        if keep:
            overlap_iou, overlap_small = box_overlaps(boxes[index], boxes[keep])
            if (overlap_iou > iou).any() or (overlap_small > containment).any():
                continue
        keep.append(int(index))
    return keep
