"""The IDZoom training dataset: one sample per source image (or a Clone Face sample built from one of its faces).

Reads a dataset version directory (DESIGN §2: `images.parquet`, `faces.parquet`, `conditions/`, `crops/`) and
yields tensors at `model.resolution`:

- images are letterboxed: resized so the long side is the resolution (aspect kept), centred on a black square;
  face boxes, face masks and the condition maps go through the same transform, so they stay aligned;
- each face contributes its identity embedding, its zoomed crop (resized to `crop_size`) and a box mask;
- with probability `train.clone_face.prob` a sample is instead a Clone Face sample (`clone_face.py`): one of
  the image's faces cloned k times on a face-free background, fed as one identity with the union mask.

Randomness (Clone Face choice, face pick, placement) is a function of `(seed, epoch, index)` only, so a resumed
run sees the same samples as an uninterrupted one. Rows are checked when the dataset is opened: a missing file,
an embedding of the wrong shape, or a box outside its image raises `DataError` naming the row and the file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from magicid.config import Params
from magicid.data.manifest import read_manifest
from magicid.errors import DataError
from magicid.imaging.boxes import box_mask
from magicid.imaging.layout import caption_for, check_clone_params
from magicid.training.clone_face import flat_background, make_clone_face_sample

_BOX_TOLERANCE = 1e-3  # pixels: float rounding in the manifest, not real overflow


def _read_tables(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`magicid.data.manifest.read_manifest(root)`, the IDZoom reader (stream A)."""
    for name in ("images.parquet", "faces.parquet"):
        if not (root / name).is_file():
            raise DataError(
                f"{root / name}: not found; {root} is not an IDZoom dataset (run `magicid build-data`)"
            )
    return read_manifest(root)


def _array(value: Any, shape: tuple[int | None, ...], what: str, row: str, file: Path) -> np.ndarray:
    """A manifest cell (list, nested list or object array) as float32 of `shape` (None = any), else DataError."""
    try:
        if isinstance(value, np.ndarray) and value.dtype == object:  # parquet nested lists: arrays of arrays
            array = np.stack([np.asarray(v, dtype=np.float32) for v in value])
        else:
            array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{file}: {row}: {what} is not numeric ({exc})") from exc
    if array.ndim != len(shape) or any(
        want is not None and got != want for got, want in zip(array.shape, shape, strict=False)
    ):
        want_text = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
        raise DataError(
            f"{file}: {row}: {what} has shape {array.shape}, expected {want_text}; rebuild the dataset"
        )
    if not np.isfinite(array).all():
        raise DataError(f"{file}: {row}: {what} has non-finite values; rebuild the dataset")
    return array


def _safe_path(root: Path, relative: str, row: str, table: Path) -> Path:
    rel = Path(str(relative))
    if rel.is_absolute() or ".." in rel.parts:
        raise DataError(f"{table}: {row}: path {relative!r} must be relative and inside the dataset root")
    path = root / rel
    if not path.is_file():
        raise DataError(
            f"{table}: {row}: file {path} is missing; restore it (dvc pull) or rebuild the dataset"
        )
    return path


def _load_rgb(path: Path, row: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{path}: {row}: unreadable image ({exc}); restore it or rebuild the dataset"
        ) from exc


@dataclasses.dataclass(frozen=True)
class _Face:
    face_id: str
    bbox: np.ndarray  # (4,) x0, y0, x1, y1 px in the source image
    embedding: np.ndarray  # (D,)
    crop_path: Path


@dataclasses.dataclass(frozen=True)
class _Image:
    image_id: str
    path: Path
    width: int
    height: int
    skeleton_path: Path
    landmark_path: Path
    faces: tuple[_Face, ...]


@dataclasses.dataclass(frozen=True)
class Letterbox:
    """Source (width, height) -> a `size`-square canvas: `x' = x * scale + offset_x` (same for y)."""

    size: int
    scale: float
    new_width: int
    new_height: int
    offset_x: int
    offset_y: int

    @classmethod
    def fit(cls, width: int, height: int, size: int) -> Letterbox:
        scale = size / max(width, height)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        return cls(size, scale, new_w, new_h, (size - new_w) // 2, (size - new_h) // 2)

    def image(self, array: np.ndarray) -> np.ndarray:
        """(H, W, C) uint8 -> (size, size, C) uint8, black outside the resized image."""
        resized = np.asarray(
            Image.fromarray(array).resize((self.new_width, self.new_height), Image.Resampling.BILINEAR)
        )
        out = np.zeros((self.size, self.size, array.shape[2]), dtype=np.uint8)
        out[
            self.offset_y : self.offset_y + self.new_height, self.offset_x : self.offset_x + self.new_width
        ] = resized.reshape(self.new_height, self.new_width, -1)
        return out

    def box(self, bbox: np.ndarray, width: int, height: int) -> np.ndarray:
        """A source box (x0, y0, x1, y1) in this canvas's pixels (float)."""
        sx, sy = self.new_width / width, self.new_height / height
        return np.array(
            [
                bbox[0] * sx + self.offset_x,
                bbox[1] * sy + self.offset_y,
                bbox[2] * sx + self.offset_x,
                bbox[3] * sy + self.offset_y,
            ],
            dtype=np.float32,
        )


# Conversions in numpy, then one `torch.from_numpy`: the same float32 values as torch's div/sub, without torch's
# intra-op thread pool, whose start-up per small op cost more than the arithmetic in data loading.
def to_signed(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    pixels = np.asarray(array, dtype=np.float32).transpose(2, 0, 1)
    return torch.from_numpy(pixels / np.float32(127.5) - np.float32(1.0))


def to_unit(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(array, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0))


class IDZoomDataset(Dataset):
    """Training samples over one IDZoom dataset version.

    Args:
        root: the dataset version directory.
        params: typed parameters (`model.resolution`, `model.id_embed_dim`, `data.crop_margin`, `train.clone_face`,
            `seed`).
        split: keep images of this split (`images.parquet` `split`), or None for all.
        crop_size: side of the identity crops fed to the ID encoder (default `model.id_crop_size`, the side the
            pipeline and DIIR feed it at inference).
        clone_prob: probability of a Clone Face sample (default `train.clone_face.prob`; 0 disables).

    Each item is a dict:
        pixel_values (3, R, R) in [-1, 1]; skeleton, landmark (3, R, R) in [0, 1];
        id_embeddings (n, D) float32; id_crops (n, 3, S, S) in [-1, 1]; id_masks (n, R, R) in {0, 1};
        face_mask (R, R) the union of the faces; n_ids, is_clone, image_id, caption;
        latent_key: a name for the pixels (two items with the same key have identical pixel_values: a non-clone
            sample is its letterboxed image, a function of the index), None for a Clone Face sample (drawn afresh);
            `train.cache_latents` encodes a keyed sample once (`train_data.LatentCache`).

    Raises:
        DataError: a missing table/file, a wrong embedding shape, a box outside its image, an empty split.
    """

    def __init__(
        self,
        root: str | Path,
        params: Params,
        split: str | None = "train",
        crop_size: int | None = None,
        clone_prob: float | None = None,
    ) -> None:
        self.root = Path(root)
        self.params = params
        self.resolution = params.model.resolution
        self.crop_size = int(crop_size or params.model.id_crop_size)
        self.clone_params = params.train.clone_face
        self.clone_prob = self.clone_params.prob if clone_prob is None else float(clone_prob)
        if self.clone_prob > 0:
            check_clone_params(self.clone_params)
        self.seed = params.seed
        self.epoch = 0
        images_df, faces_df = _read_tables(self.root)
        self.images_df, self.faces_df = images_df, faces_df
        self.items = self._index(images_df, faces_df, split, params.model.id_embed_dim)
        if not self.items:
            raise DataError(
                f"{self.root / 'images.parquet'}: no images with split={split!r} "
                f"(splits present: {sorted(map(str, images_df['split'].unique())) if 'split' in images_df else []})"
            )

    def _index(
        self, images_df: pd.DataFrame, faces_df: pd.DataFrame, split: str | None, dim: int
    ) -> list[_Image]:
        images_table, faces_table = self.root / "images.parquet", self.root / "faces.parquet"
        for table, df, columns in (
            (images_table, images_df, ("image_id", "path", "width", "height", "split")),
            (faces_table, faces_df, ("face_id", "image_id", "person_idx", "bbox", "embedding", "crop_path")),
        ):
            missing = [c for c in columns if c not in df.columns]
            if missing:
                raise DataError(
                    f"{table}: missing columns {missing}; rebuild the dataset with `magicid build-data`"
                )
        known = set(images_df["image_id"].astype(str))
        orphans = sorted(set(faces_df["image_id"].astype(str)) - known)
        if orphans:
            raise DataError(
                f"{faces_table}: faces refer to unknown image_id {orphans[:3]}; rebuild the dataset"
            )
        faces_by_image: dict[str, list[Any]] = {}
        for face in faces_df.sort_values(["image_id", "person_idx"]).itertuples(index=False):
            faces_by_image.setdefault(str(face.image_id), []).append(face)
        items: list[_Image] = []
        for image in images_df.sort_values("image_id").itertuples(index=False):
            if split is not None and str(image.split) != split:
                continue
            image_id = str(image.image_id)
            row = f"image_id={image_id}"
            width, height = int(image.width), int(image.height)
            path = _safe_path(self.root, image.path, row, images_table)
            skeleton = _safe_path(self.root, f"conditions/{image_id}_skeleton.png", row, images_table)
            landmark = _safe_path(self.root, f"conditions/{image_id}_landmark.png", row, images_table)
            faces = []
            for face in faces_by_image.get(image_id, []):
                face_row = f"face_id={face.face_id} (image_id={image_id})"
                bbox = _array(face.bbox, (4,), "bbox", face_row, faces_table)
                x0, y0, x1, y1 = bbox.tolist()
                eps = _BOX_TOLERANCE
                if not (-eps <= x0 < x1 <= width + eps and -eps <= y0 < y1 <= height + eps):
                    raise DataError(
                        f"{faces_table}: {face_row}: bbox {bbox.tolist()} is outside its {width}x{height} image "
                        f"{path}; rebuild the dataset (boxes must be clipped to the image)"
                    )
                embedding = _array(
                    face.embedding, (dim,), "embedding (model.id_embed_dim)", face_row, faces_table
                )
                crop = _safe_path(self.root, face.crop_path, face_row, faces_table)
                faces.append(_Face(str(face.face_id), bbox, embedding, crop))
            if not faces:
                raise DataError(
                    f"{images_table}: {row}: no rows in faces.parquet; IDZoom images hold >= 1 face"
                )
            items.append(_Image(image_id, path, width, height, skeleton, landmark, tuple(faces)))
        return items

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer's sampler (through accelerate) at each epoch: re-draws Clone Face samples."""
        self.epoch = int(epoch)

    def _crop(self, face: _Face, row: str) -> np.ndarray:
        crop = _load_rgb(face.crop_path, row)
        if crop.shape[:2] != (self.crop_size, self.crop_size):
            crop = np.asarray(
                Image.fromarray(crop).resize((self.crop_size, self.crop_size), Image.Resampling.BILINEAR)
            )
        return crop

    def _load_maps(self, item: _Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        row = f"image_id={item.image_id}"
        image = _load_rgb(item.path, row)
        if image.shape[:2] != (item.height, item.width):
            raise DataError(
                f"{item.path}: {row}: image is {image.shape[1]}x{image.shape[0]}, images.parquet says "
                f"{item.width}x{item.height}; rebuild the dataset"
            )
        maps = []
        for path in (item.skeleton_path, item.landmark_path):
            array = _load_rgb(path, row)
            if array.shape[:2] != image.shape[:2]:
                raise DataError(
                    f"{path}: {row}: condition map is {array.shape[1]}x{array.shape[0]}, image is "
                    f"{item.width}x{item.height}; rebuild the dataset"
                )
            maps.append(array)
        return image, maps[0], maps[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        image, skeleton, landmark = self._load_maps(item)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.clone_prob > 0 and rng.random() < self.clone_prob:
            return self._clone_sample(item, image, skeleton, landmark, rng)
        size = self.resolution
        box = Letterbox.fit(item.width, item.height, size)
        crops, masks = [], []
        for face in item.faces:
            crops.append(to_signed(self._crop(face, f"face_id={face.face_id}")))
            masks.append(box_mask(box.box(face.bbox, item.width, item.height), size))
        id_masks = torch.from_numpy(np.stack(masks))
        return {
            "pixel_values": to_signed(box.image(image)),
            "skeleton": to_unit(box.image(skeleton)),
            "landmark": to_unit(box.image(landmark)),
            "id_embeddings": torch.from_numpy(np.stack([f.embedding for f in item.faces])),
            "id_crops": torch.stack(crops),
            "id_masks": id_masks,
            "face_mask": id_masks.amax(dim=0),
            "n_ids": len(item.faces),
            "is_clone": False,
            "image_id": item.image_id,
            "caption": caption_for(len(item.faces)),
            "latent_key": f"idzoom:{item.image_id}",
        }

    def _clone_sample(
        self,
        item: _Image,
        image: np.ndarray,
        skeleton: np.ndarray,
        landmark: np.ndarray,
        rng: np.random.Generator,
    ) -> dict[str, Any]:
        from magicid.imaging.crops import expand_box

        face = item.faces[int(rng.integers(len(item.faces)))]
        crop = self._crop(face, f"face_id={face.face_id}")
        # The condition maps cut at the crop's box, so the clones' pose/landmark maps line up with their pixels.
        x0, y0, x1, y1 = (
            int(v) for v in expand_box(face.bbox, self.params.data.crop_margin, item.width, item.height)
        )
        layers = {"skeleton": skeleton[y0:y1, x0:x1], "landmark": landmark[y0:y1, x0:x1]}
        size = self.resolution
        # The clones' masks are their face boxes (as for non-clone samples), not the whole pasted crop.
        face_box = tuple((np.asarray(face.bbox, np.float64) - [x0, y0, x0, y0]) / (x1 - x0))
        sample = make_clone_face_sample(
            crop, size, self.clone_params, rng, background=flat_background(image, size), layers=layers,
            face_box=face_box,
        )  # fmt: skip
        union = torch.from_numpy(sample.union)
        return {
            "pixel_values": to_signed(sample.image),
            "skeleton": to_unit(sample.layers["skeleton"]),
            "landmark": to_unit(sample.layers["landmark"]),
            # One identity whose mask is the union of its clones (equal to k identities with the same tokens).
            "id_embeddings": torch.tensor(face.embedding[None]),
            "id_crops": to_signed(crop)[None],
            "id_masks": union[None],
            "face_mask": union,
            "n_ids": 1,
            "is_clone": True,
            "clone_boxes": torch.from_numpy(sample.boxes),  # (k, 4) the pasted crops' squares, x0 y0 x1 y1
            "image_id": item.image_id,
            "caption": caption_for(sample.k),
            "latent_key": None,  # placement drawn per (seed, epoch, index): new pixels each time
        }


def collate_idzoom(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples, padding the identity axis to the batch's largest `n_ids`.

    Returns:
        pixel_values (B, 3, R, R); skeleton, landmark (B, 3, R, R); face_mask (B, R, R);
        id_embeddings (B, n, D); id_crops (B, n, 3, S, S); id_masks (B, n, R, R) (zeros where padded);
        id_valid (B, n) bool; n_ids (B,) long; is_clone (B,) bool; image_id, caption, latent_key: lists (an item
        without `latent_key` counts as None: never cached).
    """
    n_max = max(s["n_ids"] for s in samples)
    batch = len(samples)
    first = samples[0]
    embeddings = torch.zeros(batch, n_max, first["id_embeddings"].shape[1])
    crops = torch.zeros(batch, n_max, *first["id_crops"].shape[1:])
    masks = torch.zeros(batch, n_max, *first["id_masks"].shape[1:])
    valid = torch.zeros(batch, n_max, dtype=torch.bool)
    for i, sample in enumerate(samples):
        n = sample["n_ids"]
        embeddings[i, :n] = sample["id_embeddings"]
        crops[i, :n] = sample["id_crops"]
        masks[i, :n] = sample["id_masks"]
        valid[i, :n] = True
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "skeleton": torch.stack([s["skeleton"] for s in samples]),
        "landmark": torch.stack([s["landmark"] for s in samples]),
        "face_mask": torch.stack([s["face_mask"] for s in samples]),
        "id_embeddings": embeddings,
        "id_crops": crops,
        "id_masks": masks,
        "id_valid": valid,
        "n_ids": torch.tensor([s["n_ids"] for s in samples], dtype=torch.long),
        "is_clone": torch.tensor([s["is_clone"] for s in samples], dtype=torch.bool),
        "image_id": [s["image_id"] for s in samples],
        "caption": [s["caption"] for s in samples],
        "latent_key": [s.get("latent_key") for s in samples],
    }


class EpochShuffleSampler(Sampler[int]):
    """A permutation of `range(n)` drawn from `seed + epoch`: the data order is a function of (seed, epoch) only,
    so resuming at (epoch, batch) replays exactly the batches an uninterrupted run would see."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n
