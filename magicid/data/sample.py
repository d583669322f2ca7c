"""`magicid sample-data`: a small raw image set built only from photographs that ship inside pip packages.

Sources (no download): scikit-image's `astronaut` (Eileen Collins, NASA, public domain; 512x512, one face),
insightface's `t1.jpg` (a 1280x886 group photo of six unnamed people) and `Tom_Hanks_54745.png` (a 112x112
aligned face). Composites: for each scale `s` in `data.sample_scales`, a 1024x768 group photo of the
astronaut and Tom Hanks (and their mirror images) on a seeded synthetic background, each face covering about
`s x 10 %` of the image (s = 0.2 -> faces of ~2 % of the image area: the small-face end of IDZoom).
Identity labels with face boxes go into the sidecar `identities.json` (read by `build-data`).
"""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from magicid.config import Params
from magicid.errors import DataError
from magicid.utils import atomic_write_bytes, atomic_write_text

CANVAS = (1024, 768)  # width, height of the composites
FACE_AREA_AT_SCALE_1 = 0.10  # a face's box area / canvas area at scale 1
MAX_PEOPLE = 4


def package_photo(name: str) -> Path:
    """Path of a photo shipped with insightface (`t1.jpg`, `Tom_Hanks_54745.png`).

    Raises:
        DataError: insightface is not installed or no longer ships the file.
    """
    try:
        import insightface
    except ImportError as error:
        raise DataError(
            f"insightface is not installed, so its sample photo {name} is missing: {error}"
        ) from error
    path = Path(insightface.__file__).parent / "data" / "images" / name
    if not path.is_file():
        raise DataError(f"{path}: sample photo not shipped by insightface {insightface.__version__}")
    return path


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _background(rng: np.random.Generator) -> np.ndarray:
    """Smooth seeded colour gradient plus mild low-frequency texture: (H, W, 3) uint8."""
    import cv2

    width, height = CANVAS
    top, bottom = rng.uniform(60, 200, size=3), rng.uniform(60, 200, size=3)
    ramp = np.linspace(0, 1, height)[:, None, None]
    gradient = top[None, None, :] * (1 - ramp) + bottom[None, None, :] * ramp
    texture = cv2.resize(rng.normal(0, 12, size=(12, 16, 3)), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(gradient + texture, 0, 255).astype(np.uint8)


def _person(photo: np.ndarray, face_box, face_side: float, mirror: bool) -> tuple[np.ndarray, np.ndarray]:
    """Cut head and shoulders around `face_box`, scale so the face is `face_side` px; returns (patch, face box
    in patch coordinates)."""
    import cv2

    x0, y0, x1, y1 = (float(v) for v in face_box)
    f = max(x1 - x0, y1 - y0)
    cx = (x0 + x1) / 2
    h, w = photo.shape[:2]
    rx0, rx1 = max(0, int(cx - 1.0 * f)), min(w, int(math.ceil(cx + 1.0 * f)))
    ry0, ry1 = max(0, int(y0 - 0.5 * f)), min(h, int(math.ceil(y1 + 1.2 * f)))
    region = photo[ry0:ry1, rx0:rx1]
    k = face_side / f
    size = (max(1, round(region.shape[1] * k)), max(1, round(region.shape[0] * k)))
    patch = cv2.resize(region, size, interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC)
    box = np.array([(x0 - rx0) * k, (y0 - ry0) * k, (x1 - rx0) * k, (y1 - ry0) * k])
    if mirror:
        patch = patch[:, ::-1]
        box = np.array([patch.shape[1] - box[2], box[1], patch.shape[1] - box[0], box[3]])
    return np.ascontiguousarray(patch), box


def _composite(people: list[tuple[str, np.ndarray, np.ndarray]], scale: float, rng: np.random.Generator):
    """Place the people left to right; returns (image, labels)."""
    width, height = CANVAS
    face_side = math.sqrt(FACE_AREA_AT_SCALE_1 * scale * width * height)
    canvas = _background(rng)
    patches = []
    for index, (identity, photo, box) in enumerate(people):
        patch, face = _person(photo, box, face_side, mirror=index >= 2)
        patches.append((identity, patch, face))
    fitting = []
    for item in patches:  # as many as fit side by side
        if sum(p.shape[1] for _, p, _ in fitting) + item[1].shape[1] > width:
            break
        fitting.append(item)
    if len(fitting) < 2:
        raise DataError(
            f"data.sample_scales: scale {scale} leaves room for {len(fitting)} person(s) on "
            f"{width}x{height}; use scales <= 1.0"
        )
    gap = (width - sum(p.shape[1] for _, p, _ in fitting)) / (len(fitting) + 1)
    x = gap
    labels = []
    for identity, patch, face in fitting:
        ph, pw = patch.shape[:2]
        left = int(round(x))
        top = int(rng.integers(0, max(1, height - ph + 1))) if ph < height else 0
        visible = patch[: height - top, : width - left]
        canvas[top : top + visible.shape[0], left : left + visible.shape[1]] = visible
        fx0, fy0, fx1, fy1 = face + np.array([left, top, left, top])
        labels.append(
            {
                "identity": identity,
                "bbox": [round(float(v), 2) for v in (fx0, fy0, min(fx1, width), min(fy1, height))],
            }
        )
        x += pw + gap
    return canvas, labels


def build_sample_set(out_dir: str | Path, params: Params) -> Path:
    """Write the sample raw set (see the module docstring) to `out_dir`; deterministic for `params.seed`.

    Args:
        out_dir: target folder (created; files written there are overwritten).
        params: `seed`, `data.sample_scales` and `faces.*` (the face box of each source photo is found with the
            configured face backend).

    Returns:
        `out_dir`.

    Raises:
        DataError: a sample photo is missing, no face is found in a source photo, or a scale does not fit.
    """
    from skimage import data as skdata

    from magicid.faces import get_analyzer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    astronaut = np.ascontiguousarray(skdata.astronaut())
    hanks_path = package_photo("Tom_Hanks_54745.png")
    hanks = np.asarray(Image.open(hanks_path).convert("RGB"))
    analyzer = get_analyzer(params.faces)

    def main_face(name: str, photo: np.ndarray) -> np.ndarray:
        faces = analyzer.analyze(photo)
        if not faces:
            raise DataError(f"sample photo {name}: the {params.faces.backend} backend finds no face in it")
        return max(faces, key=lambda f: f.width * f.height).bbox

    astronaut_box, hanks_box = main_face("astronaut", astronaut), main_face("Tom_Hanks_54745.png", hanks)
    labels: dict[str, list[dict]] = {
        "astronaut.png": [
            {"identity": "eileen_collins", "bbox": [round(float(v), 2) for v in astronaut_box]}
        ],
        "tom_hanks.png": [{"identity": "tom_hanks", "bbox": [round(float(v), 2) for v in hanks_box]}],
    }
    atomic_write_bytes(out / "astronaut.png", _png_bytes(astronaut))
    shutil.copyfile(hanks_path, out / "tom_hanks.png")
    shutil.copyfile(package_photo("t1.jpg"), out / "t1.jpg")
    people = [("eileen_collins", astronaut, astronaut_box), ("tom_hanks", hanks, hanks_box)] * (
        MAX_PEOPLE // 2
    )
    for scale in params.data.sample_scales:
        if not 0 < scale <= 1:
            raise DataError(f"data.sample_scales: {scale} is outside (0, 1]")
        rng = np.random.default_rng([params.seed, int(round(scale * 1000))])
        image, group_labels = _composite(people, scale, rng)
        name = f"group_s{scale:.2f}.png"
        atomic_write_bytes(out / name, _png_bytes(image))
        labels[name] = group_labels
    atomic_write_text(out / "identities.json", json.dumps(labels, indent=2, sort_keys=True) + "\n")
    return out
