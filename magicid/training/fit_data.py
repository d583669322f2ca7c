"""The fitted backbone's training data: pictures (whole images and zoomed face crops) in memory.

Kept apart from `training/fit.py` (the fitting itself), as the adapter's dataset is kept apart from its trainer.
Two sources fill it: an IDZoom version (`load_fit_data`, `magicid fit-backbone`) and a pool of composite-world
scenes (`magicid.training.world_fit.world_fit_data`, `magicid fit-world`).

Pictures are held as uint8 (a quarter of float32's memory: a pool of 640 world scenes plus their face crops at
256 px is ~250 MB) and converted to [-1, 1] floats only for the batch a step draws, on the fit's device.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from magicid.config import FitParams
from magicid.data.manifest import read_manifest
from magicid.errors import DataError

# Captions of the fitting samples. Whole images use the adapter trainer's (`dataset.caption_for`) or the world's
# own; a zoomed face crop is a close-up. Every word is in the tiny tokenizer's corpus.
FACE_CROP_CAPTION = "a close up photo of a face"
NULL_CAPTION = ""  # caption 0 of every caption table: the empty prompt of text dropout and CFG


@dataclasses.dataclass
class FitData:
    """The fit's pictures, uint8.

    Attributes:
        whole: (N, 3, R, R) uint8 whole images (IDZoom: letterboxed to `fit.resolution`, black outside the image).
        whole_captions: N captions.
        crops: (M, 3, R, R) uint8 zoomed face crops resized to `fit.resolution`.
        crop_identities: M identity labels (None where unknown).
        version: the dataset version (`data.version.dataset_version`); origin: where it came from.
    """

    whole: torch.Tensor
    whole_captions: list[str]
    crops: torch.Tensor
    crop_identities: list[str | None]
    version: str
    origin: str

    def __post_init__(self) -> None:
        for name in ("whole", "crops"):
            value = getattr(self, name)
            if value.dtype != torch.uint8 or value.ndim != 4 or value.shape[1] != 3:
                raise ValueError(
                    f"FitData.{name}: expected uint8 (n, 3, R, R), got {value.dtype} {tuple(value.shape)}"
                )
        if len(self.whole_captions) != self.whole.shape[0]:
            raise ValueError("FitData: one caption per whole image")

    @property
    def n_pictures(self) -> int:
        return self.whole.shape[0] + self.crops.shape[0]

    def captions(self) -> tuple[list[str], torch.Tensor]:
        """The caption table and each picture's caption index into it.

        Returns:
            (table, ids): `table[0]` is the empty prompt (`NULL_CAPTION`), then the distinct captions in first-seen
            order; `ids` (N + M,) long: picture i (whole images first, then crops) has caption `table[ids[i]]`.
        """
        table = [NULL_CAPTION]
        index = {NULL_CAPTION: 0}
        ids = []
        for caption in [*self.whole_captions, *[FACE_CROP_CAPTION] * self.crops.shape[0]]:
            if caption not in index:
                index[caption] = len(table)
                table.append(caption)
            ids.append(index[caption])
        return table, torch.tensor(ids, dtype=torch.long)

    def to(self, device: torch.device | str) -> FitData:
        """The same data with its pictures on `device` (the captions stay Python strings)."""
        return dataclasses.replace(self, whole=self.whole.to(device), crops=self.crops.to(device))


def to_signed(pictures: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 in [-1, 1], on the pictures' device."""
    return pictures.float().div_(127.5).sub_(1.0)


def _chw(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> uint8 (3, H, W)."""
    return torch.from_numpy(np.array(array, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # a writable copy


def load_fit_data(data_dir: str | Path, fit: FitParams) -> FitData:
    """Read the images and face crops of `fit.splits` from an IDZoom dataset version.

    Raises:
        DataError: not an IDZoom dataset, a missing file, or no image in the chosen splits.
    """
    from PIL import Image

    from magicid.data.version import dataset_version
    from magicid.imaging.layout import caption_for
    from magicid.training.dataset import Letterbox

    root = Path(data_dir)
    if not (root / "images.parquet").is_file() or not (root / "faces.parquet").is_file():
        raise DataError(
            f"--data {root}: no images.parquet/faces.parquet there; build a dataset version with "
            "`magicid build-data` (e.g. data/idzoom)"
        )
    images, faces = read_manifest(root, arrays=False)
    images = images[images["split"].isin(fit.splits)].sort_values("image_id")
    if images.empty:
        raise DataError(f"--data {root}: no image in splits {fit.splits} (fit.splits); widen fit.splits")
    faces = faces[faces["image_id"].isin(set(images["image_id"]))].sort_values("face_id")
    size = fit.resolution

    def read(relative: str) -> np.ndarray:
        path = root / str(relative)
        if not path.is_file():
            raise DataError(f"{path}: listed in the manifest but missing; restore it (dvc pull) or rebuild")
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))

    whole, captions = [], []
    for row in images.itertuples():
        array = read(row.path)
        whole.append(_chw(Letterbox.fit(array.shape[1], array.shape[0], size).image(array)))
        captions.append(caption_for(int(row.n_faces)))
    crops, identities = [], []
    for row in faces.itertuples():
        array = read(row.crop_path)
        crops.append(_chw(np.asarray(Image.fromarray(array).resize((size, size), Image.Resampling.BICUBIC))))
        identity = row.identity
        identities.append(None if identity is None or identity != identity else str(identity))
    if not crops:
        raise DataError(f"--data {root}: no face crops in splits {fit.splits}; the fit needs faces")
    version, origin = dataset_version(root)
    return FitData(torch.stack(whole), captions, torch.stack(crops), identities, version, origin)
