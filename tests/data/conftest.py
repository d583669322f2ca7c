"""Data fixtures: a raw folder with good, odd and broken inputs, and one IDZoom build of it per session."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# source -> expected outcome: a quarantine reason, or "image"
EXPECTED = {
    "good/astronaut.png": "image",
    "good/tom_hanks.png": "image",
    "odd/gray.png": "image",
    "odd/cmyk.jpg": "image",
    "odd/rgba.png": "image",
    "odd/gray16.png": "image",
    "odd/rotated.jpg": "image",
    "bad/zero.png": "zero_byte",
    "bad/notes.txt": "not_an_image",
    "bad/corrupt.png": "corrupt",
    "bad/truncated.jpg": "truncated",
    "bad/bomb.png": "too_large",
    "bad/blank.png": "no_face",
    "zdup/astronaut_copy.png": "duplicate",
}
MAX_PIXELS = 2_000_000


def astronaut_array() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


def _save(image: Image.Image, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def make_raw_folder(root: Path) -> Path:
    """Write every case of EXPECTED (plus an identities.json sidecar) under `root`."""
    from magicid.data.sample import package_photo

    astro = astronaut_array()
    pil = Image.fromarray(astro)
    _save(pil, root / "good/astronaut.png")
    shutil.copyfile(package_photo("Tom_Hanks_54745.png"), root / "good/tom_hanks.png")
    # Normalised, not rejected: grayscale, CMYK, RGBA (alpha composited), 16-bit, EXIF-rotated.
    _save(pil.convert("L"), root / "odd/gray.png")
    _save(pil.convert("CMYK"), root / "odd/cmyk.jpg", quality=95)
    rgba = pil.convert("RGBA")
    rgba.putalpha(Image.new("L", pil.size, 200))
    _save(rgba, root / "odd/rgba.png")
    gray16 = (np.asarray(pil.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    _save(Image.fromarray(gray16, mode="I;16"), root / "odd/gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    _save(
        pil.transpose(Image.Transpose.ROTATE_90).crop((0, 0, 512, 400)),
        root / "odd/rotated.jpg",
        exif=exif.tobytes(),
        quality=95,
    )
    # Rejected.
    (root / "bad").mkdir(parents=True, exist_ok=True)
    (root / "bad/zero.png").write_bytes(b"")
    (root / "bad/notes.txt").write_text("not an image\n")
    png = io.BytesIO()
    pil.save(png, format="PNG")
    data = bytearray(png.getvalue())
    data[200:400] = b"\x00" * 200  # damage compressed data inside the IDAT chunk (CRC now wrong)
    (root / "bad/corrupt.png").write_bytes(bytes(data))
    jpeg = io.BytesIO()
    pil.save(jpeg, format="JPEG", quality=95)
    (root / "bad/truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    _save(Image.new("RGB", (2000, 1500), (10, 20, 30)), root / "bad/bomb.png")  # 3 MP > MAX_PIXELS
    _save(Image.new("RGB", (320, 240), (127, 127, 127)), root / "bad/blank.png")
    (root / "zdup").mkdir()
    shutil.copyfile(
        root / "good/astronaut.png", root / "zdup/astronaut_copy.png"
    )  # after good/ in path order
    sidecar = {
        "good/astronaut.png": [{"identity": "eileen_collins"}],
        "good/tom_hanks.png": [{"identity": "tom_hanks"}],
        "odd/gray.png": [{"identity": "eileen_collins", "bbox": [173, 68, 278, 172]}],
    }
    (root / "identities.json").write_text(json.dumps(sidecar))
    return root


@pytest.fixture(scope="session")
def data_params():
    from magicid.config import load_params

    return load_params(None, [f"data.max_pixels={MAX_PIXELS}", "data.workers=1", "data.crop_size=128"])


@pytest.fixture(scope="session")
def raw_dir(tmp_path_factory) -> Path:
    return make_raw_folder(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="session")
def built(raw_dir, data_params, tmp_path_factory):
    """(dataset dir, BuildReport) of one build of `raw_dir`."""
    from magicid.data.builder import build_idzoom

    out = tmp_path_factory.mktemp("idzoom") / "v1"
    report = build_idzoom(raw_dir, out, data_params, progress=False)
    return out, report
