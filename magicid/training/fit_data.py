"""The fitted backbone's training data: an IDZoom version's images and zoomed face crops in memory.

Kept apart from `training/fit.py` (the fitting itself), as the adapter's dataset is kept apart from its trainer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from magicid.config import FitParams
from magicid.data.manifest import read_manifest
from magicid.errors import DataError


@dataclasses.dataclass
class FitData:
    """The dataset's pictures in memory, float32 in [-1, 1].

    Attributes:
        whole: (N, 3, R, R) whole images letterboxed to `fit.resolution` (black outside the image).
        whole_captions: N captions (`caption_for(n_faces)`).
        crops: (M, 3, R, R) zoomed face crops resized to `fit.resolution`.
        crop_identities: M identity labels (None where unknown).
        version: the dataset version (`trainer.dataset_version`).
    """

    whole: torch.Tensor
    whole_captions: list[str]
    crops: torch.Tensor
    crop_identities: list[str | None]
    version: str
    origin: str


def _to_signed(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(array, dtype=np.float32)).permute(2, 0, 1).div(127.5).sub(1.0)


def load_fit_data(data_dir: str | Path, fit: FitParams) -> FitData:
    """Read the images and face crops of `fit.splits` from an IDZoom dataset version.

    Raises:
        DataError: not an IDZoom dataset, a missing file, or no image in the chosen splits.
    """
    from PIL import Image

    from magicid.training.dataset import Letterbox, caption_for
    from magicid.training.trainer import dataset_version

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
        whole.append(_to_signed(Letterbox.fit(array.shape[1], array.shape[0], size).image(array)))
        captions.append(caption_for(int(row.n_faces)))
    crops, identities = [], []
    for row in faces.itertuples():
        array = read(row.crop_path)
        resized = np.asarray(Image.fromarray(array).resize((size, size), Image.Resampling.BICUBIC))
        crops.append(_to_signed(resized))
        identity = row.identity
        identities.append(None if identity is None or identity != identity else str(identity))
    if not crops:
        raise DataError(f"--data {root}: no face crops in splits {fit.splits}; the fit needs faces")
    version, origin = dataset_version(root)
    return FitData(torch.stack(whole), captions, torch.stack(crops), identities, version, origin)
