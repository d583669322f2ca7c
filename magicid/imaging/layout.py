"""Face layouts: where faces go in a generated image (boxes and/or condition maps), the boxes a condition map
implies, and the face-mesh template drawn in boxes (no mediapipe needed: `imaging.conditions`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image

from magicid.config import CloneFaceParams
from magicid.errors import ConfigError
from magicid.imaging.boxes import Box, check_boxes


@dataclass
class FaceLayout:
    """Where faces go: boxes (x0, y0, x1, y1 px) and/or condition maps (uint8 (H, W, 3), black background).

    Masks come from `boxes` when given, else from the landmark map, else from the skeleton map. The maps also
    condition the ControlNet (both: `fused`); with boxes only, a template landmark map is drawn in the boxes.
    """

    boxes: Sequence[Box] | None = None
    skeleton: np.ndarray | PIL.Image.Image | None = None
    landmark: np.ndarray | PIL.Image.Image | None = None


def _component_boxes(binary: np.ndarray, join_px: int, min_area: int) -> list[Box]:
    """Boxes of the connected regions of `binary` after joining pixels closer than `join_px`, left to right."""
    from scipy import ndimage

    joined = ndimage.binary_dilation(binary, iterations=join_px) if join_px > 0 else binary
    labels, count = ndimage.label(joined)
    boxes = []
    for i, region in enumerate(ndimage.find_objects(labels), start=1):
        inside = (labels[region] == i) & binary[region]
        if inside.sum() < min_area:
            continue
        ys, xs = np.nonzero(inside)
        y0, x0 = region[0].start + ys.min(), region[1].start + xs.min()
        y1, x1 = region[0].start + ys.max() + 1, region[1].start + xs.max() + 1
        boxes.append((float(x0), float(y0), float(x1), float(y1)))
    return sorted(boxes, key=lambda b: (b[0] + b[2]) / 2)


def _grow(box: Box, margin: float, height: int, width: int) -> Box:
    x0, y0, x1, y1 = box
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    return (max(0.0, x0 - dx), max(0.0, y0 - dy), min(float(width), x1 + dx), min(float(height), y1 + dy))


def boxes_from_landmark_map(landmark_map: np.ndarray, margin: float = 0.1) -> list[Box]:
    """Face boxes of a landmark map (uint8 (H, W, 3), drawn on black): one a connected drawing, left to right."""
    height, width = landmark_map.shape[:2]
    drawn = landmark_map.max(axis=2) > 0
    join = max(1, round(max(height, width) / 128))
    boxes = _component_boxes(drawn, join, min_area=4)
    # A drawing is a face mesh: its face box is the one whose mesh template spans the drawing.
    from magicid.imaging.conditions import box_from_mesh_extent

    return [_grow(box_from_mesh_extent(b), margin, height, width) for b in boxes]


def boxes_from_skeleton_map(skeleton_map: np.ndarray, margin: float = 0.4) -> list[Box]:
    """Face boxes of a skeleton map (`magicid.imaging.conditions.render_skeleton_map`), one per person, left to right.

    MediaPipe's pose topology has no neck edge: a person's face (points 0-10: nose, eyes, ears, mouth) is drawn
    as its own connected figure, and only in white and grey, while every body figure has coloured limb edges.
    So a face is a connected drawing with (almost) no coloured pixels, grown by `margin`.
    """
    height, width = skeleton_map.shape[:2]
    drawn = skeleton_map.max(axis=2) > 0
    coloured = (skeleton_map.max(axis=2).astype(np.int16) - skeleton_map.min(axis=2)) > 60
    join = max(1, round(max(height, width) / 256))
    faces = []
    for box in _component_boxes(drawn, join, min_area=8):
        x0, y0, x1, y1 = (int(v) for v in box)
        region_drawn = drawn[y0:y1, x0:x1].sum()
        if coloured[y0:y1, x0:x1].sum() <= 0.02 * region_drawn:
            faces.append(_grow(box, margin, height, width))
    return sorted(faces, key=lambda b: (b[0] + b[2]) / 2)


def render_box_landmarks(height: int, width: int, boxes: Sequence[Box]) -> np.ndarray:
    """A landmark map with the 478-point face-mesh template drawn in each box, as training draws real meshes
    (uint8 (height, width, 3), black background; `magicid.imaging.conditions.template_landmarks`)."""
    from magicid.imaging.conditions import render_landmark_map, template_landmarks

    array = check_boxes(boxes, height, width)
    return render_landmark_map(height, width, [template_landmarks(box) for box in array])


_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}


def caption_for(n_people: int) -> str:
    """The fixed training caption of a sample with `n_people` faces ("a photo of a person", "... of three people")."""
    if n_people <= 1:
        return "a photo of a person"
    return f"a photo of {_NUMBER_WORDS.get(n_people, str(n_people))} people"


# Clone Face Tuning's placement rule (`magicid.training.clone_face`; the composite world's clone scenes use it too).
def check_clone_params(params: CloneFaceParams) -> None:
    """Raise `ConfigError` when `k_max` clones of side `scale_max` cannot all fit in their grid cells."""
    grid = math.ceil(math.sqrt(params.k_max))
    if params.scale_max > 1.0 / grid + 1e-9:
        raise ConfigError(
            f"train.clone_face.scale_max={params.scale_max} is too large for k_max={params.k_max}: clones are "
            f"placed in a {grid}x{grid} grid, so scale_max must be <= 1/{grid} = {1.0 / grid:.4f} "
            "(lower scale_max or k_max)"
        )


def place_clones(
    size: int, k: int, scale_min: float, scale_max: float, rng: np.random.Generator
) -> np.ndarray:
    """Non-overlapping square boxes for `k` clones on a `size x size` canvas (the grid rule in the module doc).

    Args:
        size: canvas side in pixels.
        k: number of clones (>= 1).
        scale_min, scale_max: clone side as a fraction of `size`; `scale_max <= 1 / ceil(sqrt(k))`.
        rng: the only source of randomness (same generator state, same boxes).

    Returns:
        int64 (k, 4) boxes x0, y0, x1, y1 (exclusive ends), pairwise disjoint, inside the canvas.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    grid = math.ceil(math.sqrt(k))
    cell = size // grid
    max_side = int(round(scale_max * size))
    if max_side > cell:
        raise ConfigError(
            f"clone side {max_side}px (scale_max={scale_max} of {size}px) exceeds the {cell}px grid cell for k={k}; "
            f"use scale_max <= {cell / size:.4f}"
        )
    cells = rng.permutation(grid * grid)[:k]
    boxes = np.zeros((k, 4), dtype=np.int64)
    for i, index in enumerate(cells):
        side = int(round(rng.uniform(scale_min, scale_max) * size))
        side = max(1, min(side, cell))
        row, col = divmod(int(index), grid)
        x0 = col * cell + int(rng.integers(0, cell - side + 1))
        y0 = row * cell + int(rng.integers(0, cell - side + 1))
        boxes[i] = (x0, y0, x0 + side, y0 + side)
    return boxes
