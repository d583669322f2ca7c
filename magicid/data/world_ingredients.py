"""The composite training world's ingredients in an IDZoom version (`data/world.py` draws the scenes).

`build-data` calls `write_world` after writing the manifests: from the identity-labelled faces and the photos it
writes `world/cutouts.parquet` (one row per labelled face: its zoomed crop in `crops/`, its soft cut-out
`world/masks/<face_id>.png` (`imaging.composite.face_alpha`, with any neighbour's face cut away), its face box,
5 keypoints and landmarks in crop pixels) and `world/backgrounds.parquet` (scikit-image photos without people,
copied to `world/backgrounds/skimage_<name>.png`, and each photo's largest region clear of every person, as a
rectangle of its `images/` file). DVC versions them with the rest of the dataset version; `validation.py`
checks them; `forget` drops a person's rows and masks (`forget_world`). Kept apart from `world.py` so the
builder does not import torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from magicid.config import Params
from magicid.data import manifest as mf
from magicid.errors import DataError
from magicid.imaging.png import encode_png
from magicid.utils import atomic_write_bytes

WORLD_DIR = "world"
CUTOUTS = f"{WORLD_DIR}/cutouts.parquet"
BACKGROUNDS = f"{WORLD_DIR}/backgrounds.parquet"
MASKS_DIR = f"{WORLD_DIR}/masks"
BACKGROUNDS_DIR = f"{WORLD_DIR}/backgrounds"
# scikit-image photos that show people: never a background
PERSON_PHOTOS = frozenset({"astronaut", "camera", "lfw_subset"})
# scikit-image data set images without people that ship in its wheel (loaded without a download)
SHIPPED_PHOTOS = frozenset({"brick", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel", "horse",
                            "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "page",
                            "retina", "rocket", "text"})  # fmt: skip
MAX_BACKGROUND_SIDE = 1024  # package photos are stored with their long side at most this

_FLOATS = pa.list_(pa.float32())
CUTOUTS_SCHEMA = pa.schema(
    [
        ("face_id", pa.string()),  # the face in faces.parquet
        ("image_id", pa.string()),
        ("identity", pa.string()),
        ("split", pa.string()),  # its image's split
        ("crop_path", pa.string()),  # crops/<face_id>.png: the pixels pasted
        ("mask_path", pa.string()),  # world/masks/<face_id>.png: uint8 cut-out alpha, the crop's size
        ("crop_size", pa.int32()),  # side (px) of the crop file
        ("crop_box", _FLOATS),  # 4: the crop's square in its image (px)
        ("face_box", _FLOATS),  # 4: the face box in crop pixels
        ("kps5", _FLOATS),  # 10: crop pixels
        ("landmarks", _FLOATS),  # N * 2: crop pixels
    ]
)
BACKGROUNDS_SCHEMA = pa.schema(
    [
        ("background_id", pa.string()),  # skimage_<name> | <image_id>_region
        ("kind", pa.string()),  # package | photo_region
        ("path", pa.string()),  # the image file, relative to the dataset root
        ("source", pa.string()),  # skimage.data.<name> | the photo's source
        ("width", pa.int32()),  # of the file
        ("height", pa.int32()),
        ("region", _FLOATS),  # 4: the usable rectangle x0, y0, x1, y1 in the file (px)
        ("split", pa.string()),  # a photo region's image split; null for package photos
    ]
)


# ---------------------------------------------------------------------------------------------------------------
# ingredients: written by build-data, filtered by forget
# ---------------------------------------------------------------------------------------------------------------
def mask_path(face_id: str) -> str:
    return f"{MASKS_DIR}/{face_id}.png"


def person_extent(bbox, height: int) -> tuple[float, float, float, float]:
    """Where the person of a face may be in its photo: 1.75 face sides either side of the face centre, from 0.75
    sides above the face down to the bottom of the image (shoulders are ~3 face widths apart; a body continues
    down), so a photo region clear of it shows no one."""
    x0, y0, x1, y1 = (float(v) for v in bbox)
    side = max(x1 - x0, y1 - y0)
    centre = (x0 + x1) / 2
    return centre - 1.75 * side, y0 - 0.75 * side, centre + 1.75 * side, float(height)


def _png(array: np.ndarray) -> bytes:
    """Deterministic PNG bytes of a uint8 (H, W) or (H, W, 3) array."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def package_background(name: str) -> np.ndarray:
    """uint8 (H, W, 3) of `skimage.data.<name>()`, long side at most `MAX_BACKGROUND_SIDE`.

    Raises:
        DataError: the name shows a person, is not a scikit-image photo, or is not shipped in the wheel.
    """
    import cv2
    from skimage import data as skdata

    if name in PERSON_PHOTOS:
        raise DataError(
            f"data.world.backgrounds: {name!r} is a photo of a person; backgrounds must show nobody (remove it)"
        )
    if name not in SHIPPED_PHOTOS:
        raise DataError(
            f"data.world.backgrounds: {name!r} is not a scikit-image data set photo shipped in its wheel; use "
            f"some of {', '.join(sorted(SHIPPED_PHOTOS))}"
        )
    photo = np.asarray(getattr(skdata, name)())
    if photo.dtype == bool:
        photo = photo.astype(np.uint8) * 255
    if photo.dtype != np.uint8 or photo.ndim not in (2, 3):
        raise DataError(
            f"data.world.backgrounds: skimage.data.{name}() is not an 8-bit image ({photo.dtype})"
        )
    if photo.ndim == 2:
        photo = np.stack([photo] * 3, axis=-1)
    photo = np.ascontiguousarray(photo[..., :3])
    long_side = max(photo.shape[:2])
    if long_side > MAX_BACKGROUND_SIDE:
        scale = MAX_BACKGROUND_SIDE / long_side
        size = (round(photo.shape[1] * scale), round(photo.shape[0] * scale))
        photo = cv2.resize(photo, size, interpolation=cv2.INTER_AREA)
    return photo


def write_world(root: str | Path, images: list[dict], faces: list[dict], params: Params) -> set[str]:
    """Write the world's ingredients of a dataset version (see the module docstring) from its manifest rows.

    Args:
        root: the dataset version directory.
        images, faces: the rows of images.parquet and faces.parquet as written (flat lists).
        params: `data.crop_margin` (the crops' margin), `data.world` (backgrounds, photo regions).

    Returns:
        The files written besides the two tables (masks, package backgrounds; relative paths), for the builder's
        ledger.

    Raises:
        DataError: a background name that is not a shipped scikit-image photo without people.
    """
    from magicid.imaging.composite import face_alpha, largest_free_rect
    from magicid.imaging.crops import expand_box

    root = Path(root)
    world = params.data.world
    by_image = {row["image_id"]: row for row in images}
    faces_by_image: dict[str, list[dict]] = {}
    for face in faces:
        faces_by_image.setdefault(face["image_id"], []).append(face)
    written: set[str] = set()
    cutouts = []
    for face in sorted(faces, key=lambda row: row["face_id"]):
        if not face.get("identity") or face["image_id"] not in by_image:
            continue
        image = by_image[face["image_id"]]
        crop_path = root / face["crop_path"]
        with Image.open(crop_path) as crop:
            crop_size = crop.size[0]
        bbox = np.asarray(face["bbox"], np.float64)
        crop_box = np.asarray(
            expand_box(bbox, params.data.crop_margin, int(image["width"]), int(image["height"])), np.float64
        )
        scale = crop_size / (crop_box[2] - crop_box[0])
        origin = crop_box[:2]
        face_box = np.concatenate([(bbox[:2] - origin) * scale, (bbox[2:] - origin) * scale])
        kps5 = (np.asarray(face["kps5"], np.float64).reshape(-1, 2) - origin) * scale
        landmarks = (np.asarray(face["landmarks"], np.float64).reshape(-1, 2) - origin) * scale
        neighbours = [
            np.concatenate([(np.asarray(other["bbox"], np.float64)[:2] - origin) * scale,
                            (np.asarray(other["bbox"], np.float64)[2:] - origin) * scale])
            for other in faces_by_image[face["image_id"]] if other["face_id"] != face["face_id"]
        ]  # fmt: skip
        relative = mask_path(face["face_id"])
        atomic_write_bytes(root / relative, _png(face_alpha(crop_size, face_box, exclude=neighbours)))
        written.add(relative)
        cutouts.append(
            {
                "face_id": face["face_id"],
                "image_id": face["image_id"],
                "identity": face["identity"],
                "split": image.get("split"),
                "crop_path": face["crop_path"],
                "mask_path": relative,
                "crop_size": crop_size,
                "crop_box": crop_box.tolist(),
                "face_box": face_box.tolist(),
                "kps5": kps5.ravel().tolist(),
                "landmarks": landmarks.ravel().tolist(),
            }
        )
    backgrounds = []
    for name in world.backgrounds:
        photo = package_background(name)
        relative = f"{BACKGROUNDS_DIR}/skimage_{name}.png"
        atomic_write_bytes(root / relative, encode_png(photo))
        written.add(relative)
        height, width = photo.shape[:2]
        backgrounds.append({"background_id": f"skimage_{name}", "kind": "package", "path": relative,
                            "source": f"skimage.data.{name}", "width": width, "height": height,
                            "region": [0.0, 0.0, float(width), float(height)], "split": None})  # fmt: skip
    if world.photo_regions:
        for image in sorted(images, key=lambda row: row["image_id"]):
            width, height = int(image["width"]), int(image["height"])
            people = [person_extent(f["bbox"], height) for f in faces_by_image.get(image["image_id"], [])]
            region = largest_free_rect(width, height, people, world.min_region)
            if region is None:
                continue
            backgrounds.append({"background_id": f"{image['image_id']}_region", "kind": "photo_region",
                                "path": image["path"], "source": image["source"], "width": width,
                                "height": height, "region": [float(v) for v in region],
                                "split": image.get("split")})  # fmt: skip
    mf.write_table(cutouts, CUTOUTS_SCHEMA, root / CUTOUTS)
    mf.write_table(backgrounds, BACKGROUNDS_SCHEMA, root / BACKGROUNDS)
    return written


def world_files(root: str | Path) -> set[str]:
    """The files the world tables of `root` name that are the world's own (masks, package backgrounds), relative;
    empty without world tables."""
    import pyarrow.parquet as pq

    root = Path(root)
    if not (root / CUTOUTS).is_file() or not (root / BACKGROUNDS).is_file():
        return set()
    masks = {row["mask_path"] for row in pq.read_table(root / CUTOUTS).to_pylist()}
    packages = {
        row["path"] for row in pq.read_table(root / BACKGROUNDS).to_pylist() if row["kind"] == "package"
    }
    return masks | packages


def world_masks_of(root: str | Path, image_ids: set[str]) -> set[str]:
    """The cut-out masks only the faces of `image_ids` use (what forgetting those images deletes), relative;
    empty without world tables."""
    import pyarrow.parquet as pq

    root = Path(root)
    if not (root / CUTOUTS).is_file():
        return set()
    cutouts = pq.read_table(root / CUTOUTS).to_pylist()
    doomed = {row["mask_path"] for row in cutouts if row["image_id"] in image_ids}
    return doomed - {row["mask_path"] for row in cutouts if row["image_id"] not in image_ids}


def forget_world(root: str | Path, image_ids: set[str]) -> set[str]:
    """Drop the world rows that come from `image_ids` (their faces' cut-outs, their photo regions); returns the
    files those rows named that only they used (the masks), for `forget` to delete. No-op without world tables."""
    import pyarrow.parquet as pq

    root = Path(root)
    if not (root / CUTOUTS).is_file() or not (root / BACKGROUNDS).is_file():
        return set()
    cutouts = pq.read_table(root / CUTOUTS).to_pylist()
    backgrounds = pq.read_table(root / BACKGROUNDS).to_pylist()
    doomed = {row["mask_path"] for row in cutouts if row["image_id"] in image_ids}
    kept = [row for row in cutouts if row["image_id"] not in image_ids]
    regions = [
        row for row in backgrounds
        if not (row["kind"] == "photo_region" and row["background_id"].split("_")[0] in image_ids)
    ]  # fmt: skip
    mf.write_table(kept, CUTOUTS_SCHEMA, root / CUTOUTS)
    mf.write_table(regions, BACKGROUNDS_SCHEMA, root / BACKGROUNDS)
    return doomed - {row["mask_path"] for row in kept}
