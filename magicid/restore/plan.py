"""DIIR's face plan (DESIGN §4, steps 1-2 and 5): which faces, their crop boxes and resolution buckets, and
how a restored crop is blended back so that every pixel outside its mask is the input's, bit for bit.

Pure numpy geometry; no model here. Crop geometry comes from `magicid.imaging.crops`, landmark maps from
`magicid.imaging.conditions`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from magicid.errors import DataError, MagicIDError
from magicid.imaging.crops import expand_box

FaceSelection = Literal["small", "all"]


def effective_buckets(buckets: Sequence[int], floor: int) -> list[int]:
    """`buckets` with none below `floor` (the backbone's native size): smaller ones are raised to it.

    A real backbone degrades below the resolution it was trained at (SD 1.5: 512 px), so a face is never
    restored there; `[64, 128, 192, 256]` with floor 512 is `[512]`, with floor 0 unchanged.
    """
    if not buckets:
        raise MagicIDError("diir.buckets is empty: give increasing multiples of 64, e.g. [64, 128, 256]")
    if floor % 8:
        raise MagicIDError(f"bucket floor {floor}: must be a multiple of 8 (the VAE factor)")
    return sorted({max(int(b), int(floor)) for b in buckets})


def choose_bucket(crop_side: float, buckets: Sequence[int], zoom: float) -> int:
    """The crop resolution a face is restored at: the smallest bucket >= `zoom` x its crop side.

    Rule: a face whose square crop (face box plus margin) is `crop_side` px in the image needs about
    `zoom * crop_side` px of model resolution (the zoom that gives a small face enough latent cells for
    identity detail). It gets the smallest bucket that covers that need, so never more resolution than it
    needs (a 24 px face with margin 0.5 needs 2 x 48 = 96 px: bucket 128, not 512). Faces larger than the
    largest bucket get the largest (they are downscaled into it).

    Args:
        crop_side: side (px, in the input image) of the face's square crop box.
        buckets: increasing crop resolutions (multiples of 64).
        zoom: > 0.

    Returns:
        One of `buckets`.
    """
    if not buckets:
        raise MagicIDError("diir.buckets is empty: give increasing multiples of 64, e.g. [64, 128, 256]")
    need = zoom * float(crop_side)
    for bucket in buckets:
        if bucket >= need:
            return int(bucket)
    return int(buckets[-1])


def blend_alpha(
    crop_box: Sequence[int], face_box: Sequence[float], feather: float, image_size: tuple[int, int]
):
    """Feathered blend mask of one face over its crop box, uint8 (side, side) in [0, 255].

    255 inside the face box, falling linearly (smoothstep) to 0 over `feather * side` px outside it, and
    brought to 0 at the crop box's edges that lie inside the image (so the restored crop never leaves a
    seam). 0 means "the input pixel, exactly".
    """
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    side = x1 - x0
    width, height = image_size
    feather_px = max(feather * side, 1.0)
    centres = np.arange(side, dtype=np.float32) + 0.5
    fx0, fy0, fx1, fy1 = (float(face_box[0]) - x0, float(face_box[1]) - y0, float(face_box[2]) - x0,
                          float(face_box[3]) - y0)  # fmt: skip
    dx = np.maximum(np.maximum(fx0 - centres, centres - fx1), 0.0)  # (side,) distance outside the box
    dy = np.maximum(np.maximum(fy0 - centres, centres - fy1), 0.0)
    distance = np.hypot(dy[:, None], dx[None, :])  # (side, side)
    alpha = np.clip(1.0 - distance / feather_px, 0.0, 1.0)

    def edge_ramp(touches_border_low: bool, touches_border_high: bool) -> np.ndarray:
        ramp = np.ones(side, np.float32)
        ramp_px = feather_px / 2
        if not touches_border_low:
            ramp = np.minimum(ramp, (centres - 0.5) / ramp_px)
        if not touches_border_high:
            ramp = np.minimum(ramp, (side - 0.5 - centres) / ramp_px)
        return np.clip(ramp, 0.0, 1.0)

    alpha *= edge_ramp(y0 == 0, y1 == height)[:, None] * edge_ramp(x0 == 0, x1 == width)[None, :]
    alpha = alpha * alpha * (3.0 - 2.0 * alpha)  # smoothstep: no visible kink at either end
    return np.round(alpha * 255.0).astype(np.uint8)


def compose(image: np.ndarray, patch: np.ndarray, alpha: np.ndarray, box: Sequence[int]) -> None:
    """Blend `patch` into `image[box]` in place, in integers: where alpha is 0 the input byte is kept.

    out = (in * (255 - a) + patch * a + 127) // 255, which is `in` exactly for a = 0 and `patch` for a = 255.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    region = image[y0:y1, x0:x1]
    a = alpha.astype(np.uint32)[..., None]
    mixed = (region.astype(np.uint32) * (255 - a) + patch.astype(np.uint32) * a + 127) // 255
    image[y0:y1, x0:x1] = np.where(a > 0, mixed, region).astype(np.uint8)


def resize_square(image: np.ndarray, side: int) -> np.ndarray:
    """Square uint8 image -> (side, side): area averaging when shrinking, bicubic when enlarging."""
    import cv2

    if image.shape[0] == side:
        return image
    interpolation = cv2.INTER_AREA if image.shape[0] > side else cv2.INTER_CUBIC
    return cv2.resize(image, (side, side), interpolation=interpolation)


def to_tensor(images: Sequence[np.ndarray], device, dtype) -> torch.Tensor:
    """uint8 (S, S, 3) images -> (B, 3, S, S) in [-1, 1]."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return (batch.to(device=device, dtype=torch.float32) / 127.5 - 1.0).to(dtype)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) in [-1, 1] -> uint8 (B, S, S, 3)."""
    scaled = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@dataclasses.dataclass
class PlannedFace:
    """One detected face and, if selected, where and at what resolution it is restored.

    Attributes:
        index: its position among the detected (or given) faces.
        bbox: (4,) float32 face box `x0, y0, x1, y1` in input pixels.
        landmarks: (N, 2) float32 in input pixels, or None (a bare box).
        embedding: (D,) face-recognition embedding, or None (a bare box: embedded on demand).
        selected: restored (True) or only taking part in identity matching (False).
        crop_box: the square restore crop `(x0, y0, x1, y1)` (face box grown by `diir.crop_margin`).
        bucket: the crop resolution it goes through the UNet at.
        identity: index of the reference assigned, or None (its own embedding).
        similarity: cosine similarity of the best match (None: not matched by embedding).
    """

    index: int
    bbox: np.ndarray
    landmarks: np.ndarray | None
    embedding: np.ndarray | None
    selected: bool
    crop_box: tuple[int, int, int, int]
    bucket: int
    identity: int | None = None
    similarity: float | None = None


def plan_faces(
    found: Sequence[tuple[np.ndarray, Any | None]],
    image_size: tuple[int, int],
    selection: FaceSelection,
    cfg: Any,
    bucket_floor: int = 0,
) -> list[PlannedFace]:
    """Plan every face: selected or not (`selection`), its crop box and bucket.

    Args:
        found: per face its box (4,) and its `Face` (landmarks, embedding) or None (a bare box).
        image_size: `(width, height)` of the input.
        selection: "small" (box area below `cfg.max_face_ratio` of the image) or "all".
        cfg: `DIIRParams` (`max_face_ratio`, `crop_margin`, `buckets`, `zoom`).
        bucket_floor: the backbone's native size; no bucket is below it (see `effective_buckets`).

    Returns:
        One `PlannedFace` per entry of `found`, in order.
    """
    if selection not in ("small", "all"):
        raise MagicIDError(f"faces={selection!r}: use 'small' (below diir.max_face_ratio) or 'all'")
    width, height = image_size
    buckets = effective_buckets(cfg.buckets, bucket_floor)
    planned = []
    for index, (bbox, face) in enumerate(found):
        area_ratio = float((bbox[2] - bbox[0]) * (bbox[3] - bbox[1])) / float(width * height)
        landmarks = getattr(face, "landmarks", None)
        landmarks = None if landmarks is None or np.asarray(landmarks).size == 0 else np.asarray(landmarks)
        embedding = getattr(face, "embedding", None)
        crop_box = expand_box(bbox, cfg.crop_margin, width, height)
        planned.append(
            PlannedFace(
                index=index,
                bbox=np.asarray(bbox, np.float32),
                landmarks=landmarks,
                embedding=None if embedding is None else np.asarray(embedding, np.float32),
                selected=selection == "all" or area_ratio < cfg.max_face_ratio,
                crop_box=crop_box,
                bucket=choose_bucket(crop_box[2] - crop_box[0], buckets, cfg.zoom),
            )
        )
    return planned


def given_faces(boxes: Sequence[Any], width: int, height: int) -> list[tuple[np.ndarray, Any | None]]:
    """(bbox (4,) float32, Face or None) per given box `(x0, y0, x1, y1)` px or `Face` object, checked.

    Raises:
        DataError: a box that is not 4 finite numbers with x0 < x1, y0 < y1 inside the image.
    """
    out = []
    for i, box in enumerate(boxes):
        face = box if hasattr(box, "bbox") else None
        bbox = np.asarray(face.bbox if face is not None else box, dtype=np.float32).reshape(-1)
        if (
            bbox.shape != (4,)
            or not np.isfinite(bbox).all()
            or not (0 <= bbox[0] < bbox[2] <= width and 0 <= bbox[1] < bbox[3] <= height)
        ):
            raise DataError(
                f"boxes[{i}]={bbox.tolist()}: expected x0 < x1, y0 < y1 inside the {width}x{height} image"
            )
        out.append((bbox, face))
    return out


def batches(jobs: list[PlannedFace], batch: int) -> list[list[PlannedFace]]:
    """The selected faces grouped by bucket (ascending), each group chunked by `batch` (`diir.batch`)."""
    chunks = []
    for bucket in sorted({j.bucket for j in jobs}):
        group = [j for j in jobs if j.bucket == bucket]
        chunks += [group[start : start + batch] for start in range(0, len(group), batch)]
    return chunks


def blend_back(out: np.ndarray, mask: np.ndarray, patch: np.ndarray, face: PlannedFace, feather: float):
    """Blend a restored crop uint8 (bucket, bucket, 3) into `out` in place and add its blend mask to the union
    `mask` (H, W); returns the face's alpha uint8 (side, side). Pixels where alpha is 0 keep their bytes."""
    x0, y0, x1, y1 = face.crop_box
    height, width = out.shape[:2]
    alpha = blend_alpha(face.crop_box, face.bbox, feather, (width, height))
    compose(out, resize_square(patch, x1 - x0), alpha, face.crop_box)
    mask[y0:y1, x0:x1] = np.maximum(mask[y0:y1, x0:x1], alpha)
    return alpha


def crop_transform(face: PlannedFace) -> tuple[np.ndarray, float]:
    """The map from input pixels to the face's crop at its bucket: `p_crop = (p - offset) * scale`."""
    x0, y0, x1, _ = face.crop_box
    return np.array([x0, y0], np.float32), face.bucket / (x1 - x0)


def face_mask_in_crop(face: PlannedFace) -> np.ndarray:
    """float32 (bucket, bucket): 1 inside the face box (in crop coordinates), 0 elsewhere (MGMICA's mask)."""
    offset, scale = crop_transform(face)
    fx0, fy0, fx1, fy1 = ((face.bbox - np.tile(offset, 2)) * scale).tolist()
    mask = np.zeros((face.bucket, face.bucket), np.float32)
    mask[max(int(np.floor(fy0)), 0) : int(np.ceil(fy1)), max(int(np.floor(fx0)), 0) : int(np.ceil(fx1))] = 1.0
    return mask


def landmark_map_in_crop(face: PlannedFace) -> np.ndarray:
    """uint8 (bucket, bucket, 3): the face's landmark map in its crop, drawn as training draws it.

    A bare box (no landmarks) gets an empty map: the face is in the image already, and a template would
    impose a pose it may not have.
    """
    from magicid.imaging.conditions import render_landmark_map

    if face.landmarks is None:
        return np.zeros((face.bucket, face.bucket, 3), np.uint8)
    offset, scale = crop_transform(face)
    return render_landmark_map(face.bucket, face.bucket, [(face.landmarks - offset) * scale])
