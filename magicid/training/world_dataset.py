"""The composite world as training items (`magicid.data.world.CompositeWorld` scenes in `IDZoomDataset`'s item
format), so `magicid train`'s loop trains on the world unchanged (`fit-world`'s adapter phase, `bench_world`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from magicid.config import CloneFaceParams
from magicid.data.world import CompositeWorld
from magicid.imaging.layout import check_clone_params
from magicid.training.dataset import to_signed, to_unit


class WorldDataset(Dataset):
    """World scenes as training items: exactly the dict `IDZoomDataset.__getitem__` returns (same keys, dtypes,
    value ranges), so `collate_idzoom` and the trainer take it unchanged.

    Item `i` of epoch `e` is scene `e * length + i` (a new scene every epoch: the world is unbounded); with
    probability `clone_params.prob` (decided from `(seed, e, i)`) it is instead a Clone Face scene of the world,
    fed as one identity whose mask is the union of its clones (as `IDZoomDataset`'s clone samples).

    Args:
        world: the scenes.
        length: items per epoch.
        clone_params: Clone Face settings (default: the world's `train.clone_face`; `prob` 0 disables).
        seed: seeds the clone decision (default: the world's seed).
    """

    def __init__(
        self,
        world: CompositeWorld,
        length: int,
        clone_params: CloneFaceParams | None = None,
        seed: int | None = None,
    ) -> None:
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.world = world
        self.length = int(length)
        self.clone_params = clone_params or world.params.train.clone_face
        if self.clone_params.prob > 0:
            check_clone_params(self.clone_params)
        self.seed = world.seed if seed is None else int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """New scenes (and clone draws) each epoch, as `IDZoomDataset.set_epoch`."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        scene = self.epoch * self.length + int(index)
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        clone = self.clone_params.prob > 0 and rng.random() < self.clone_params.prob
        sample = self.world.clone_sample(scene, self.clone_params) if clone else self.world.sample(scene)
        # (n, C, C, 3) uint8 -> (n, 3, C, C) in [-1, 1], as `to_signed` does for one crop (numpy, then torch)
        crops = torch.from_numpy(
            sample.crops.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(127.5) - np.float32(1.0)
        )
        item = {
            "pixel_values": to_signed(sample.image),
            "skeleton": to_unit(sample.skeleton_map),
            "landmark": to_unit(sample.landmark_map),
        }
        if clone:
            union = torch.from_numpy(sample.masks.max(axis=0))
            item.update({
                "id_embeddings": torch.from_numpy(sample.embeddings[:1].copy()),
                "id_crops": crops[:1],
                "id_masks": union[None],
                "face_mask": union,
                "n_ids": 1,
                "is_clone": True,
                "clone_boxes": torch.from_numpy(sample.paste_boxes),
                "image_id": f"world-clone:{scene}",
            })  # fmt: skip
        else:
            item.update({
                "id_embeddings": torch.from_numpy(sample.embeddings),
                "id_crops": crops,
                "id_masks": torch.from_numpy(sample.masks),
                "face_mask": torch.from_numpy(sample.masks.max(axis=0)),
                "n_ids": len(sample.identities),
                "is_clone": False,
                "image_id": f"world:{scene}",
            })  # fmt: skip
        item["caption"] = sample.caption
        item["latent_key"] = None  # a new scene every epoch: nothing to reuse (`train.cache_latents`)
        return item
