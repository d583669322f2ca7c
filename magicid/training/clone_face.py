"""Clone Face Tuning: training samples holding k copies of one identity's face, and the face-weighted loss.

MagicID's Clone Face Tuning (DESIGN §3) teaches the masked identity attention (MGMICA) to put one identity
exactly where its mask says, at any position and scale, instead of "somewhere in the picture". A sample is
built from one identity's zoomed face crop (IDZoom `crops/<face_id>.png`):

1. `k` is drawn uniformly from `[k_min, k_max]` (`train.clone_face`), and each clone's side from
   `[scale_min, scale_max] * image side`.
2. Placement rule (`imaging.layout.place_clones`, shared with the composite world's clone scenes; non-overlapping
   by construction): the canvas is split into a `g x g` grid with
   `g = ceil(sqrt(k))`; the clones take `k` distinct cells drawn at random and a uniformly random position
   inside their cell. A clone never exceeds its cell, so `scale_max <= 1 / ceil(sqrt(k_max))` is required
   (checked: `ConfigError` otherwise) and no clone is ever shrunk to fit.
3. The crop is resized to each clone's side and pasted as a square; clone `i`'s mask is its face box
   (`masks[i]`: where the face lies in the pasted crop, given as `face_box`, as for non-clone samples and at
   inference; without `face_box`, the whole pasted square), and `union` is their union. The condition maps (skeleton/landmark) cut out at the
   same crop box are pasted at the same places, so pose/landmark conditioning stays aligned with the clones.

How the identity is fed to MGMICA: all clones are one person, so the sample carries ONE identity (its
embedding and crop) whose mask is the union of the clone masks. MGMICA adds
`sum_i M_i * attn(Q, K(T_i), V(T_i))`; with identical tokens T and disjoint masks this equals
`union * attn(Q, K(T), V(T))`, i.e. the same output as k identities with equal tokens at a k-th of the cost.

The face-region weighted diffusion loss weights each latent position by
`1 + (face_loss_weight - 1) * area-downsampled face mask`, so the face pixels count `face_loss_weight`
times as much as the background (for every sample, clone or not).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from magicid.config import CloneFaceParams
from magicid.imaging.layout import check_clone_params, place_clones


@dataclasses.dataclass
class CloneFaceSample:
    """One Clone Face Tuning sample.

    Attributes:
        image: the composed image, uint8 (H, W, 3).
        masks: per-clone masks, float32 (k, H, W), exactly 1 on clone i's face box (`face_boxes[i]`), 0 elsewhere.
        union: float32 (H, W), the union of `masks` (clones never overlap, so it is also their sum).
        boxes: int64 (k, 4), each clone's pixel box x0, y0, x1, y1 (x1, y1 exclusive).
        layers: extra canvases composed with the same boxes (e.g. `skeleton`, `landmark`), uint8 (H, W, C).
        face_boxes: int64 (k, 4), each clone's face box (inside its box; equal to it without `face_box`).
    """

    image: np.ndarray
    masks: np.ndarray
    union: np.ndarray
    boxes: np.ndarray
    layers: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    face_boxes: np.ndarray | None = None

    @property
    def k(self) -> int:
        return int(self.boxes.shape[0])


def clone_masks(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Per-box masks, float32 (k, height, width): 1 inside `boxes[i]` (exclusive ends), 0 elsewhere."""
    masks = np.zeros((len(boxes), height, width), dtype=np.float32)
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, dtype=np.int64)):
        masks[i, y0:y1, x0:x1] = 1.0
    return masks


def paste_clones(canvas: np.ndarray, patch: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """A copy of `canvas` (H, W, C) uint8 with `patch` (S, S, C) uint8 resized into each box, opaque
    (`magicid.imaging.composite.paste`, the project's one compositor)."""
    from magicid.imaging.composite import Placement, paste

    out = np.array(canvas, copy=True)
    size = (patch.shape[1], patch.shape[0])
    for box in np.asarray(boxes, dtype=np.int64):
        paste(out, patch, Placement(tuple(int(v) for v in box), size))
    return out


def flat_background(image: np.ndarray, size: int, cells: int = 4) -> np.ndarray:
    """A face-free background of the image's colours: (size, size, 3) uint8, the image averaged to
    `cells x cells` blocks and upsampled smoothly (no recognisable face survives)."""
    small = Image.fromarray(image).resize((cells, cells), Image.Resampling.BOX)
    return np.asarray(small.resize((size, size), Image.Resampling.BILINEAR))


def make_clone_face_sample(
    crop: np.ndarray,
    size: int,
    params: CloneFaceParams,
    rng: np.random.Generator,
    background: np.ndarray | None = None,
    layers: dict[str, np.ndarray] | None = None,
    face_box: tuple[float, float, float, float] | None = None,
) -> CloneFaceSample:
    """Compose one Clone Face Tuning sample from one identity's face crop.

    Args:
        crop: the identity's zoomed face crop, uint8 (S, S, 3).
        size: output side (the model resolution).
        params: `train.clone_face` (k range, scale range).
        rng: the only source of randomness.
        background: uint8 (size, size, 3) to paste onto; default mid-grey.
        layers: patches aligned with `crop` (e.g. the skeleton/landmark maps cut at the crop box), each uint8
            (S', S', C); each is pasted at the same boxes onto a black canvas and returned in `layers`.
        face_box: where the face lies in `crop`, as fractions `x0, y0, x1, y1` of its side (the crop's
            margin around the face box); the clones' masks are then their face boxes. None: the whole crop.

    Returns:
        A `CloneFaceSample` with k in [k_min, k_max] clones.
    """
    check_clone_params(params)
    if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
        raise ValueError(f"crop must be uint8 (S, S, 3), got {crop.dtype} {crop.shape}")
    if background is None:
        background = np.full((size, size, 3), 127, dtype=np.uint8)
    if background.shape != (size, size, 3):
        raise ValueError(f"background must be ({size}, {size}, 3), got {background.shape}")
    k = int(rng.integers(params.k_min, params.k_max + 1))
    boxes = place_clones(size, k, params.scale_min, params.scale_max, rng)
    image = paste_clones(background, crop, boxes)
    face_boxes = boxes if face_box is None else clone_face_boxes(boxes, face_box)
    masks = clone_masks(face_boxes, size, size)
    composed = {
        name: paste_clones(np.zeros((size, size, patch.shape[2]), dtype=np.uint8), patch, boxes)
        for name, patch in (layers or {}).items()
    }
    return CloneFaceSample(image=image, masks=masks, union=masks.max(axis=0), boxes=boxes, layers=composed,
                           face_boxes=face_boxes)  # fmt: skip


def clone_face_boxes(boxes: np.ndarray, face_box: tuple[float, float, float, float]) -> np.ndarray:
    """int64 (k, 4): the face box (fractions of a crop's side) inside each pasted clone box (rounded outward)."""
    fractions = np.clip(np.asarray(face_box, np.float64), 0.0, 1.0)
    if not (fractions[2] > fractions[0] and fractions[3] > fractions[1]):
        raise ValueError(f"face_box must be x0 < x1, y0 < y1 fractions of the crop, got {tuple(face_box)}")
    boxes = np.asarray(boxes, np.int64)
    side = (boxes[:, 2] - boxes[:, 0]).astype(np.float64)[:, None]
    low = np.floor(boxes[:, :2] + fractions[None, :2] * side)
    high = np.ceil(boxes[:, :2] + fractions[None, 2:] * side)
    return np.concatenate([low, high], axis=1).astype(np.int64)


def face_weight_map(
    face_mask: torch.Tensor, latent_size: tuple[int, int], face_loss_weight: float
) -> torch.Tensor:
    """Per-latent-position loss weights: `1 + (face_loss_weight - 1) * area_downsample(face_mask)`.

    Args:
        face_mask: (B, H, W) or (B, 1, H, W) in [0, 1] at pixel resolution (the union of the sample's faces).
        latent_size: (h, w) of the latent grid (H/8, W/8).
        face_loss_weight: weight of a fully-face position (1 = unweighted; 0 ignores faces).

    Returns:
        float32 (B, 1, h, w).
    """
    if face_mask.ndim == 3:
        face_mask = face_mask[:, None]
    if face_mask.ndim != 4 or face_mask.shape[1] != 1:
        raise ValueError(f"face_mask must be (B, H, W) or (B, 1, H, W), got {tuple(face_mask.shape)}")
    coverage = F.interpolate(
        face_mask.float(), size=tuple(latent_size), mode="area"
    )  # fraction of face pixels
    return 1.0 + (float(face_loss_weight) - 1.0) * coverage


def weighted_diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Face-region weighted MSE: `mean(weight * (prediction - target)^2)`, computed in float32.

    Args:
        prediction, target: (B, C, h, w) (noise or velocity, as the scheduler's prediction type).
        weight: (B, 1, h, w) from `face_weight_map`, or None for plain MSE (same as an all-ones weight).
        reduction: "mean" (a scalar) or "none" (one value a sample, (B,)).

    Returns:
        The loss; with `weight` all ones it equals `F.mse_loss(prediction, target)`.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    error = (prediction.float() - target.float()) ** 2
    if weight is not None:
        error = error * weight.float()
    if reduction == "mean":
        return error.mean()
    if reduction == "none":
        return error.flatten(1).mean(dim=1)
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
