"""`magicid sample-data`: a small raw image set built only from photographs that ship inside pip packages.

Sources (no download), every photograph of a person that ships in the installed wheels (platform facts):
scikit-image's `astronaut` (Eileen Collins, NASA, public domain; 512x512, one face) and `camera` (the
"cameraman", 512x512 greyscale, one face), matplotlib's `grace_hopper.jpg` (512x600, one face), insightface's
`t1.jpg` (a 1280x886 group photo of six unnamed people, labelled `t1_person_1`..`t1_person_6` left to right)
and `Tom_Hanks_54745.png` (a 112x112 aligned face): ten identities. Composites: for each scale `s` in
`data.sample_scales`, a 1024x768 group photo of the single-portrait people (the later ones mirrored) on a
seeded synthetic background, each face covering about `s x 10 %` of the image (s = 0.2 -> faces of ~2 % of
the image area: the small-face end of IDZoom). Identity labels with face boxes go into the sidecar
`identities.json` (read by `build-data`).
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


def matplotlib_photo(name: str) -> Path:
    """Path of a photo shipped in matplotlib's `mpl-data/sample_data` (`grace_hopper.jpg`).

    Raises:
        DataError: matplotlib is not installed or no longer ships the file.
    """
    try:
        import matplotlib
    except ImportError as error:
        raise DataError(
            f"matplotlib is not installed, so its sample photo {name} is missing: {error}"
        ) from error
    path = Path(matplotlib.get_data_path()) / "sample_data" / name
    if not path.is_file():
        raise DataError(f"{path}: sample photo not shipped by matplotlib {matplotlib.__version__}")
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


def _person(photo: np.ndarray, face_box, face_side: float, mirror: bool):
    """Head and shoulders around `face_box`, placed so the face is `face_side` px: returns (region, its
    placement with the top-left corner at 0, 0, the face box in region pixels)."""
    from magicid.imaging.composite import Placement

    x0, y0, x1, y1 = (float(v) for v in face_box)
    f = max(x1 - x0, y1 - y0)
    cx = (x0 + x1) / 2
    h, w = photo.shape[:2]
    rx0, rx1 = max(0, int(cx - 1.0 * f)), min(w, int(math.ceil(cx + 1.0 * f)))
    ry0, ry1 = max(0, int(y0 - 0.5 * f)), min(h, int(math.ceil(y1 + 1.2 * f)))
    region = np.ascontiguousarray(photo[ry0:ry1, rx0:rx1])
    placement = Placement.scaled((region.shape[1], region.shape[0]), 0, 0, face_side / f, mirror)
    return region, placement, np.array([x0 - rx0, y0 - ry0, x1 - rx0, y1 - ry0])


def _composite(people: list[tuple[str, np.ndarray, np.ndarray]], scale: float, rng: np.random.Generator):
    """Place the people left to right (`magicid.imaging.composite.paste`, opaque); returns (image, labels)."""
    from magicid.imaging.composite import Placement, paste

    width, height = CANVAS
    face_side = math.sqrt(FACE_AREA_AT_SCALE_1 * scale * width * height)
    canvas = _background(rng)
    patches = []
    for index, (identity, photo, box) in enumerate(people):
        region, placement, face = _person(photo, box, face_side, mirror=index >= 2)
        patches.append((identity, region, placement, face))

    def span(placement: Placement) -> int:
        return placement.box[2] - placement.box[0]

    fitting = []
    for item in patches:  # as many as fit side by side
        if sum(span(p) for _, _, p, _ in fitting) + span(item[2]) > width:
            break
        fitting.append(item)
    if len(fitting) < 2:
        raise DataError(
            f"data.sample_scales: scale {scale} leaves room for {len(fitting)} person(s) on "
            f"{width}x{height}; use scales <= 1.0"
        )
    gap = (width - sum(span(p) for _, _, p, _ in fitting)) / (len(fitting) + 1)
    x = gap
    labels = []
    for identity, region, sized, face in fitting:
        pw, ph = span(sized), sized.box[3] - sized.box[1]
        left = int(round(x))
        top = int(rng.integers(0, max(1, height - ph + 1))) if ph < height else 0
        placement = Placement((left, top, left + pw, top + ph), sized.patch_size, sized.mirror)
        paste(canvas, region, placement)
        fx0, fy0, fx1, fy1 = placement.boxes(face)[0].astype(np.float64)
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
    cameraman = np.ascontiguousarray(np.stack([skdata.camera()] * 3, axis=-1))  # greyscale -> RGB
    hanks_path = package_photo("Tom_Hanks_54745.png")
    hanks = np.asarray(Image.open(hanks_path).convert("RGB"))
    hopper_path = matplotlib_photo("grace_hopper.jpg")
    hopper = np.asarray(Image.open(hopper_path).convert("RGB"))
    t1_path = package_photo("t1.jpg")
    t1 = np.asarray(Image.open(t1_path).convert("RGB"))
    analyzer = get_analyzer(params.faces)

    def faces_of(name: str, photo: np.ndarray) -> list:
        faces = analyzer.analyze(photo)
        if not faces:
            raise DataError(f"sample photo {name}: the {params.faces.backend} backend finds no face in it")
        return faces

    def main_face(name: str, photo: np.ndarray) -> np.ndarray:
        return max(faces_of(name, photo), key=lambda f: f.width * f.height).bbox

    def label(identity: str, box) -> dict:
        return {"identity": identity, "bbox": [round(float(v), 2) for v in box]}

    portraits = [  # (file name, identity, photo, face box): the single-person photos
        ("astronaut.png", "eileen_collins", astronaut, main_face("astronaut", astronaut)),
        ("tom_hanks.png", "tom_hanks", hanks, main_face("Tom_Hanks_54745.png", hanks)),
        ("grace_hopper.jpg", "grace_hopper", hopper, main_face("grace_hopper.jpg", hopper)),
        ("camera.png", "cameraman", cameraman, main_face("camera", cameraman)),
    ]
    labels: dict[str, list[dict]] = {name: [label(who, box)] for name, who, _, box in portraits}
    # t1's six people have no names: one label each, numbered left to right by face centre.
    t1_faces = sorted(faces_of("t1.jpg", t1), key=lambda f: float(f.bbox[0] + f.bbox[2]))
    labels["t1.jpg"] = [label(f"t1_person_{i + 1}", f.bbox) for i, f in enumerate(t1_faces)]
    atomic_write_bytes(out / "astronaut.png", _png_bytes(astronaut))
    atomic_write_bytes(out / "camera.png", _png_bytes(cameraman))
    shutil.copyfile(hanks_path, out / "tom_hanks.png")
    shutil.copyfile(hopper_path, out / "grace_hopper.jpg")
    shutil.copyfile(t1_path, out / "t1.jpg")
    people = [(who, photo, box) for _, who, photo, box in portraits][:MAX_PEOPLE]
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
