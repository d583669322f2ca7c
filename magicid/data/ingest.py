"""Ingest: decode one input file into a normalised uint8 RGB image, or say why it cannot be used.

Normalisation (never a quarantine): EXIF orientation applied; grayscale, palette, CMYK, YCbCr/LAB/HSV converted
to RGB; alpha composited on white; 16-bit samples scaled to 8 bits; multi-frame files use their first frame.
Rejections raise `InputRejected(reason, detail)` with one of `REASONS`; the builder writes them to
quarantine.parquet, so nothing is dropped silently.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from magicid.errors import InputRejected
from magicid.safety import file_kind_problem, pixel_problem

REASONS = (
    "zero_byte",  # empty file
    "not_an_image",  # no image format recognises it
    "corrupt",  # recognised, but decoding fails
    "truncated",  # the data ends before the image does
    "too_large",  # more than data.max_pixels pixels or a side over safety.MAX_SIDE, read from the header
    "unsupported_mode",  # a pixel format with no faithful RGB mapping (e.g. float images)
    "too_small",  # under MIN_SIDE pixels on a side: no face can be analysed
    "no_face",  # decoded fine, the face analyser finds no face
    "duplicate",  # same bytes as another input (the first in path order is kept)
    # found while listing the input folder (magicid/data/inputs.py); these are never opened:
    "not_a_file",  # a FIFO, socket or device (opening a FIFO blocks), or a folder where a file was expected
    "unreadable",  # a file or folder without read permission
    "broken_link",  # a symlink whose target does not exist
    "link_outside_input",  # a symlink resolving outside the input folder
    "linked_folder",  # a symlink to a folder: not followed (put the files in the input folder itself)
    "bad_name",  # a file name that is not valid UTF-8 (manifests store names as text)
    "forgotten",  # removed by `magicid forget` (its image id or identity is in the dataset's forgotten.json)
)
MIN_SIDE = 16


@dataclass
class LoadedImage:
    """A decoded input. `array` uint8 (H, W, 3) RGB; `pristine` is True when the file decodes to exactly
    `array` (8-bit RGB, no EXIF rotation), so its bytes can be stored as they are."""

    array: np.ndarray
    format: str
    pristine: bool


def _to_rgb(image: Image.Image) -> tuple[Image.Image, bool]:
    """Convert any PIL mode to RGB; returns (image, changed)."""
    mode = image.mode
    if mode == "RGB":
        return image, False
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        array = np.asarray(image, dtype=np.uint16)
        return Image.fromarray((array >> 8).astype(np.uint8), "L").convert("RGB"), True
    if mode == "I":
        array = np.asarray(image, dtype=np.int64)
        if array.min() < 0 or array.max() > 65535:
            raise InputRejected("unsupported_mode", f"32-bit integer samples outside 0..65535 (mode {mode})")
        # PIL opens 16-bit grayscale PNGs as mode I: the samples are 16-bit.
        return Image.fromarray((array >> 8).astype(np.uint8), "L").convert("RGB"), True
    if mode == "F":
        raise InputRejected("unsupported_mode", "floating-point samples have no defined 8-bit range (mode F)")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), True
    if mode == "CMYK":
        # PIL's CMYK->RGB ignores ICC profiles: a plain conversion, as most viewers without colour management.
        return image.convert("RGB"), True
    try:
        return image.convert("RGB"), True
    except (ValueError, OSError) as error:
        raise InputRejected("unsupported_mode", f"cannot convert mode {mode} to RGB: {error}") from error


def load_image(path: str | Path, max_pixels: int) -> LoadedImage:
    """Decode and normalise one image file.

    Args:
        path: the file.
        max_pixels: images with more pixels are rejected before their pixels are decoded.

    Returns:
        `LoadedImage` with a uint8 (H, W, 3) RGB array.

    Raises:
        InputRejected: with a reason from `REASONS` and a detail naming the problem.
    """
    path = Path(path)
    problem = file_kind_problem(path)
    if problem is not None:
        reason = "unreadable" if "readable" in problem or "inspected" in problem else "not_a_file"
        raise InputRejected(reason, problem)
    if path.stat().st_size == 0:
        raise InputRejected("zero_byte", "empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except UnidentifiedImageError as error:
            raise InputRejected("not_an_image", f"no image format recognises it ({error})") from error
        except Image.DecompressionBombError as error:
            raise InputRejected("too_large", str(error)) from error
        except Image.DecompressionBombWarning as error:
            raise InputRejected("too_large", str(error)) from error
        except (OSError, SyntaxError, ValueError) as error:
            raise InputRejected("corrupt", f"cannot read the header: {error}") from error
        with image:
            width, height = image.size
            problem = pixel_problem(width, height, max_pixels)
            if problem is not None:
                raise InputRejected("too_large", problem)
            if min(width, height) < MIN_SIDE:
                raise InputRejected("too_small", f"{width}x{height}: under {MIN_SIDE} px on a side")
            fmt = image.format or "unknown"
            previous = ImageFile.LOAD_TRUNCATED_IMAGES
            try:
                ImageFile.LOAD_TRUNCATED_IMAGES = False  # never accept grey-filled partial images
                image.load()
            except Image.DecompressionBombWarning as error:
                raise InputRejected("too_large", str(error)) from error
            except OSError as error:
                message = str(error)
                if (
                    "truncated" in message
                    or "broken data stream" in message
                    or "end of file" in message.lower()
                ):
                    raise InputRejected("truncated", message) from error
                raise InputRejected("corrupt", message) from error
            except (SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
                raise InputRejected("corrupt", str(error)) from error
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = previous
            orientation = image.getexif().get(0x0112, 1)
            upright = ImageOps.exif_transpose(image) if orientation not in (0, 1) else image
            rgb, converted = _to_rgb(upright)
            array = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    pristine = (
        not converted and orientation in (0, 1) and fmt in ("PNG", "JPEG", "WEBP") and image.mode == "RGB"
    )
    return LoadedImage(array=array, format=fmt, pristine=pristine)
