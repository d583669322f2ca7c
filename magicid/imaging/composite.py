"""The one compositor: a patch resized into a box of a canvas (optionally mirrored, optionally through an alpha),
and the same transform applied to points and boxes, so that what is pasted and what is said about it agree.

Used by the sample set's group photos (`data/sample.py`: people cut from portraits), Clone Face Tuning
(`training/clone_face.py`: one face crop pasted k times) and the composite training world (`data/world.py`:
face crops pasted through a soft elliptical alpha on backgrounds). A `Placement` maps patch pixels to canvas
pixels by `x' = x0 + sx * x` (`x' = x0 + sx * (w - x)` when mirrored), `y' = y0 + sy * y`, with `sx = box width /
patch width`: the pixel-centre convention of `cv2.resize`, so a landmark at patch coordinate `x` lands on the
canvas pixel that shows it. A box may reach past the canvas: the part outside is cut, nothing is shrunk.

`face_alpha` is the world's cut-out: an ellipse around the face box (forehead and some hair included), feathered
to zero, and zero along the crop's border, so no pasted face carries a square seam; `largest_free_rect` finds
the largest region of a photo clear of every person (the world's backgrounds from real photos).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import numpy as np

# The world's face cut-out, as fractions of the face box side (the box spans brows to chin, the mesh forehead
# reaches ~0.14 above it on the sample photos): an ellipse 1.24 wide and 1.6 high, centred 0.1 above the box
# centre, opaque inside 80 % of its radius and ramping to 0 at its edge.
ALPHA_HALF_WIDTH = 0.62
ALPHA_HALF_HEIGHT = 0.80
ALPHA_LIFT = 0.10
ALPHA_FEATHER = 0.20
ALPHA_BORDER = 0.08  # fraction of the crop side over which the alpha fades to 0 at the crop's own border


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a patch goes: into the integer canvas box `box` (x0, y0, x1, y1, exclusive ends), from a patch of
    `patch_size` (width, height) pixels, mirrored left-right when `mirror`."""

    box: tuple[int, int, int, int]
    patch_size: tuple[int, int]
    mirror: bool = False

    def __post_init__(self) -> None:
        x0, y0, x1, y1 = self.box
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"placement box must have x0 < x1, y0 < y1, got {self.box}")
        if self.patch_size[0] < 1 or self.patch_size[1] < 1:
            raise ValueError(f"patch size must be positive, got {self.patch_size}")

    @classmethod
    def scaled(cls, patch_size: tuple[int, int], left: int, top: int, scale: float, mirror: bool = False):
        """The patch scaled by `scale` (its size rounded to whole pixels) with its top-left corner at (left, top)."""
        width = max(1, round(patch_size[0] * scale))
        height = max(1, round(patch_size[1] * scale))
        return cls((int(left), int(top), int(left) + width, int(top) + height), tuple(patch_size), mirror)

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): canvas pixels per patch pixel."""
        x0, y0, x1, y1 = self.box
        return (x1 - x0) / self.patch_size[0], (y1 - y0) / self.patch_size[1]

    def points(self, xy: np.ndarray) -> np.ndarray:
        """float32 (..., 2) patch coordinates (px) -> canvas coordinates (px). Mirroring moves points; reordering
        left/right point labels (eyes, mouth corners) is the caller's (see `mesh_template.MESH_MIRROR`)."""
        xy = np.asarray(xy, np.float64)
        sx, sy = self.scale
        x = self.patch_size[0] - xy[..., 0] if self.mirror else xy[..., 0]
        out = np.stack([self.box[0] + sx * x, self.box[1] + sy * xy[..., 1]], axis=-1)
        return out.astype(np.float32)

    def boxes(self, boxes: np.ndarray) -> np.ndarray:
        """float32 (n, 4) patch boxes x0, y0, x1, y1 -> canvas boxes (x0 < x1 kept when mirrored)."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        corners = self.points(boxes.reshape(-1, 2, 2))  # (n, 2, 2): (x0, y0), (x1, y1)
        low, high = corners.min(axis=1), corners.max(axis=1)
        return np.concatenate([low, high], axis=1).astype(np.float32)


def _resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """`cv2.resize` keeping the channel axis: area averaging when shrinking, bilinear when enlarging."""
    import cv2

    if (width, height) == (array.shape[1], array.shape[0]):
        return array

    shrinking = width < array.shape[1] or height < array.shape[0]
    out = cv2.resize(array, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return out.reshape(height, width, *array.shape[2:])


def paste(
    canvas: np.ndarray,
    patch: np.ndarray,
    placement: Placement,
    alpha: np.ndarray | None = None,
    adjust: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Paste `patch` into `canvas` IN PLACE at `placement` and return `canvas`.

    Args:
        canvas: (H, W, C) uint8, written in place.
        patch: (h, w, C) uint8 with (w, h) == `placement.patch_size`.
        placement: target box (may extend past the canvas: that part is cut) and mirroring.
        alpha: (h, w) float32 in [0, 1] or uint8 (0..255) aligned with `patch`, resized and mirrored with it;
            None pastes the patch opaque (every pixel of the box replaced).
        adjust: a colour transform of the patch once resized to its box (uint8 (h', w', C) -> same), e.g. the
            world's colour and light jitter, which costs less at the pasted size than at the patch's.

    Returns:
        `canvas`.
    """
    if canvas.dtype != np.uint8 or patch.dtype != np.uint8:
        raise ValueError(f"canvas and patch must be uint8, got {canvas.dtype} and {patch.dtype}")
    if canvas.ndim != 3 or patch.ndim != 3 or canvas.shape[2] != patch.shape[2]:
        raise ValueError(f"canvas {canvas.shape} and patch {patch.shape} must both be (H, W, C) with equal C")
    if (patch.shape[1], patch.shape[0]) != tuple(placement.patch_size):
        raise ValueError(
            f"patch is {patch.shape[1]}x{patch.shape[0]}, placement expects {placement.patch_size}"
        )
    x0, y0, x1, y1 = placement.box
    height, width = canvas.shape[:2]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if cx1 <= cx0 or cy1 <= cy0:
        return canvas  # entirely outside
    resized = _resize(patch, x1 - x0, y1 - y0)
    if adjust is not None:
        resized = adjust(resized)
    if placement.mirror:
        resized = resized[:, ::-1]
    part = resized[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    if alpha is None:
        canvas[cy0:cy1, cx0:cx1] = part
        return canvas
    alpha = np.asarray(alpha)
    if alpha.shape != patch.shape[:2]:
        raise ValueError(f"alpha {alpha.shape} must be the patch's (h, w) {patch.shape[:2]}")
    # uint8 alphas are resized as they are (cheaper; within half a level of resizing them as floats)
    weights = _resize(alpha if alpha.dtype == np.uint8 else alpha.astype(np.float32), x1 - x0, y1 - y0)
    if placement.mirror:
        weights = weights[:, ::-1]
    weights = weights[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0, None].astype(np.float32)
    if alpha.dtype == np.uint8:
        weights /= 255.0
    under = canvas[cy0:cy1, cx0:cx1].astype(np.float32)
    blended = under + weights * (part.astype(np.float32) - under)
    canvas[cy0:cy1, cx0:cx1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return canvas


def face_alpha(size: int, face_box, exclude=()) -> np.ndarray:
    """The soft cut-out of a face in its zoomed crop: uint8 (size, size), 255 on the face, 0 at the crop border.

    An ellipse around `face_box` (`ALPHA_*` constants: forehead and some hair included, corners of the box
    excluded), feathered to 0 at its edge, times a ramp to 0 along the crop's border, so the pasted crop never
    shows a straight edge even where the crop was cut tight (a face near its photo's border). Other faces that
    reach into the crop (`exclude`: a neighbour in a group photo) are cut out with a soft edge, so a pasted face
    never brings an unlabelled piece of another face along.

    Args:
        size: the crop's side (px).
        face_box: the face box in crop pixels `x0, y0, x1, y1`.
        exclude: other faces' boxes in crop pixels: alpha 0 on each grown by a tenth of its side, ramping back to
            full over another tenth.
    """
    x0, y0, x1, y1 = (float(v) for v in face_box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"expected a face box x0 < x1, y0 < y1, got {tuple(face_box)}")
    side = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 - ALPHA_LIFT * side
    grid = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    dx = (grid[None, :] - cx) / (ALPHA_HALF_WIDTH * side)
    dy = (grid[:, None] - cy) / (ALPHA_HALF_HEIGHT * side)
    radius = np.sqrt(dx * dx + dy * dy)
    ellipse = np.clip((1.0 - radius) / ALPHA_FEATHER, 0.0, 1.0)
    ellipse = ellipse * ellipse * (3 - 2 * ellipse)  # smoothstep: no visible ring where the ramp starts
    ramp = max(1.0, ALPHA_BORDER * size)
    edge = np.minimum(grid, size - grid) - 0.5  # 0 on the outermost pixels
    border = np.clip(edge / ramp, 0.0, 1.0)
    alpha = ellipse * border[None, :] * border[:, None]
    for other in exclude:
        ox0, oy0, ox1, oy1 = (float(v) for v in other)
        grow = 0.1 * max(ox1 - ox0, oy1 - oy0)
        # distance outside the grown box along each axis (0 inside it), in units of `grow`
        out_x = np.maximum(np.maximum(ox0 - grow - grid, grid - ox1 - grow), 0.0) / grow
        out_y = np.maximum(np.maximum(oy0 - grow - grid, grid - oy1 - grow), 0.0) / grow
        alpha = alpha * np.clip(np.maximum(out_x[None, :], out_y[:, None]), 0.0, 1.0)
    return np.rint(alpha * 255).astype(np.uint8)


def alpha_extent(alpha: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) exclusive bounding box of an alpha's non-zero pixels (the region a paste can change)."""
    ys, xs = np.nonzero(np.asarray(alpha) > 0)
    if xs.size == 0:
        raise ValueError("alpha is zero everywhere: it would paste nothing")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def boxes_overlap(a, b) -> bool:
    """Whether boxes a and b (x0, y0, x1, y1) share area."""
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def largest_free_rect(
    width: int, height: int, obstacles, min_side: int = 1
) -> tuple[int, int, int, int] | None:
    """The largest-area axis-aligned rectangle of a `width x height` image that overlaps none of `obstacles`.

    Exhaustive over the rectangles whose edges lie on the image border or on obstacle edges (the largest empty
    rectangle always has such edges), which is cheap for the few people a photo holds.

    Args:
        width, height: image size (px).
        obstacles: boxes `x0, y0, x1, y1` (px; may reach past the image).
        min_side: rectangles with a side below this are not returned.

    Returns:
        `(x0, y0, x1, y1)` ints, or None when no free rectangle has both sides >= `min_side`.
    """
    boxes = np.asarray(obstacles, np.float64).reshape(-1, 4)
    xs = sorted(
        {0, width, *np.clip(np.floor(boxes[:, 0]), 0, width), *np.clip(np.ceil(boxes[:, 2]), 0, width)}
    )
    ys = sorted(
        {0, height, *np.clip(np.floor(boxes[:, 1]), 0, height), *np.clip(np.ceil(boxes[:, 3]), 0, height)}
    )
    best, best_area = None, 0
    for x0, x1 in itertools.combinations(xs, 2):
        if x1 - x0 < min_side:
            continue
        for y0, y1 in itertools.combinations(ys, 2):
            area = (x1 - x0) * (y1 - y0)
            if y1 - y0 < min_side or area <= best_area:
                continue
            if not any(boxes_overlap((x0, y0, x1, y1), box) for box in boxes):
                best, best_area = (int(x0), int(y0), int(x1), int(y1)), area
    return best
