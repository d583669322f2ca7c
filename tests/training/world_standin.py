"""A stand-in for `magicid.data.world` (the composite world) in the fit-world tests: the same constructor, attributes
and sample types, built from any IDZoom version's face crops, cheaply.

It places 1-4 of the version's face crops at random positions and sizes (face side 10-45 % of the image side,
non-overlapping: the Clone Face grid rule) on smooth random backgrounds, with the exact face boxes, the 478-point
mesh template moved into each box, 5-point keypoints, a landmark map drawn from them, box masks and identity
labels. Samples are a pure function of (seed, index). `StandinWorldDataset.__getitem__` returns exactly
`IDZoomDataset.__getitem__`'s dict (Clone Face samples included), so `trainer.train(dataset=...)` consumes it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from magicid.config import CloneFaceParams, Params
from magicid.data.manifest import read_manifest
from magicid.imaging.boxes import box_mask
from magicid.imaging.conditions import render_landmark_map
from magicid.imaging.layout import caption_for, place_clones
from magicid.imaging.mesh_template import MESH_TEMPLATE_XY
from magicid.training.clone_face import make_clone_face_sample

_KPS5 = (468, 473, 1, 61, 291)  # mesh indices of the eye centres (irises), nose tip, mouth corners


@dataclasses.dataclass
class WorldSample:
    image: np.ndarray  # uint8 (R, R, 3)
    boxes: np.ndarray  # float32 (n, 4) x0 y0 x1 y1 px
    identities: list[str]
    identity_index: np.ndarray  # int64 (n,)
    embeddings: np.ndarray  # float32 (n, D), unit norm
    crops: np.ndarray  # uint8 (n, C, C, 3)
    landmarks: np.ndarray  # float32 (n, 478, 2)
    kps5: np.ndarray  # float32 (n, 5, 2)
    skeleton_map: np.ndarray  # uint8 (R, R, 3)
    landmark_map: np.ndarray  # uint8 (R, R, 3)
    masks: np.ndarray  # float32 (n, R, R)
    caption: str


class StandinWorld:
    """Composite scenes of an IDZoom version's labelled faces (see the module doc)."""

    def __init__(self, dataset_dir: str | Path, params: Params, resolution: int, seed: int) -> None:
        root = Path(dataset_dir)
        _, faces = read_manifest(root)
        faces = faces[faces["identity"].notna()].sort_values("face_id")
        self.identities: list[str] = sorted(set(faces["identity"].astype(str)))
        self.params, self.resolution, self.seed = params, resolution, seed
        self.margin = params.data.crop_margin
        self.crop_size = params.model.id_crop_size
        self._faces = []
        for row in faces.itertuples():
            with Image.open(root / row.crop_path) as crop:
                pixels = np.asarray(crop.convert("RGB"))
            embedding = np.asarray(row.embedding, np.float32)
            self._faces.append(
                (self.identities.index(str(row.identity)), embedding / np.linalg.norm(embedding), pixels)
            )

    def sample(self, index: int) -> WorldSample:
        rng = np.random.default_rng([self.seed, index])
        size = self.resolution
        coarse = rng.integers(0, 255, size=(4, 4, 3), dtype=np.uint8)
        image = np.array(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
        n = int(rng.integers(1, 5))
        # Face side 10-45 % of the image; the pasted crop is the face box grown by the crop margin on each side.
        grow = 1 + 2 * self.margin
        scale_max = min(0.45 * grow, 1 / math.ceil(math.sqrt(n)))
        squares = place_clones(size, n, min(0.1 * grow, scale_max), scale_max, rng)
        boxes, picks, landmarks, crops = [], [], [], []
        template = np.asarray(MESH_TEMPLATE_XY, np.float32)
        for x0, y0, x1, y1 in squares:
            pick = self._faces[int(rng.integers(len(self._faces)))]
            side = int(x1 - x0)
            image[y0:y1, x0:x1] = np.asarray(
                Image.fromarray(pick[2]).resize((side, side), Image.Resampling.BILINEAR)
            )
            inset = side * self.margin / grow
            box = np.array([x0 + inset, y0 + inset, x1 - inset, y1 - inset], np.float32)
            boxes.append(box)
            picks.append(pick)
            landmarks.append(box[:2] + template * (box[2:] - box[:2]))
            crops.append(
                np.asarray(Image.fromarray(pick[2]).resize((self.crop_size,) * 2, Image.Resampling.BILINEAR))
            )
        landmarks_array = np.stack(landmarks).astype(np.float32)
        return WorldSample(
            image=image,
            boxes=np.stack(boxes),
            identities=[self.identities[p[0]] for p in picks],
            identity_index=np.array([p[0] for p in picks], np.int64),
            embeddings=np.stack([p[1] for p in picks]).astype(np.float32),
            crops=np.stack(crops),
            landmarks=landmarks_array,
            kps5=landmarks_array[:, list(_KPS5)],
            skeleton_map=np.zeros((size, size, 3), np.uint8),
            landmark_map=render_landmark_map(size, size, list(landmarks_array)),
            masks=np.stack([box_mask(b, size) for b in boxes]),
            caption=caption_for(n),
        )


def _signed(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, np.float32)).permute(2, 0, 1).div(127.5).sub(1.0)


def _unit(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, np.float32)).permute(2, 0, 1).div(255.0)


class StandinWorldDataset(torch.utils.data.Dataset):
    """World samples as `IDZoomDataset` items; sample i of epoch e is world scene f(seed, e, i)."""

    def __init__(
        self, world: StandinWorld, length: int, clone_params: CloneFaceParams | None = None, seed: int = 0
    ) -> None:
        self.world, self.length, self.seed, self.epoch = world, int(length), int(seed), 0
        self.clone_params = clone_params or CloneFaceParams(prob=0.0)

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        scene = int(rng.integers(2**62))
        sample = self.world.sample(scene)
        size = self.world.resolution
        if self.clone_params.prob > 0 and rng.random() < self.clone_params.prob:
            face = int(rng.integers(len(sample.identities)))
            crop = sample.crops[face]
            grow = 1 + 2 * self.world.margin
            inset = self.world.margin / grow
            clone = make_clone_face_sample(
                crop, size, self.clone_params, rng, background=sample.image[::-1].copy(),
                face_box=(inset, inset, 1 - inset, 1 - inset),
            )  # fmt: skip
            union = torch.from_numpy(clone.union)
            return {
                "pixel_values": _signed(clone.image),
                "skeleton": torch.zeros(3, size, size),
                "landmark": torch.zeros(3, size, size),
                "id_embeddings": torch.from_numpy(sample.embeddings[face : face + 1]),
                "id_crops": _signed(crop)[None],
                "id_masks": union[None],
                "face_mask": union,
                "n_ids": 1,
                "is_clone": True,
                "image_id": f"world-{scene}-clone",
                "caption": caption_for(clone.k),
            }
        masks = torch.from_numpy(sample.masks)
        return {
            "pixel_values": _signed(sample.image),
            "skeleton": _unit(sample.skeleton_map),
            "landmark": _unit(sample.landmark_map),
            "id_embeddings": torch.from_numpy(sample.embeddings),
            "id_crops": torch.stack([_signed(c) for c in sample.crops]),
            "id_masks": masks,
            "face_mask": masks.amax(dim=0),
            "n_ids": len(sample.identities),
            "is_clone": False,
            "image_id": f"world-{scene}",
            "caption": sample.caption,
        }
