"""Images as the project passes them: PIL images or uint8 (H, W, 3) RGB arrays (DESIGN §7)."""

from __future__ import annotations

import numpy as np
import PIL.Image

from magicid.errors import ImageInputError


def as_uint8_image(
    image: PIL.Image.Image | np.ndarray, what: str = "image", *, copy: bool = False
) -> np.ndarray:
    """A PIL image (any mode, converted to RGB) or a uint8 (H, W, 3) array -> uint8 (H, W, 3) RGB array.

    Args:
        image: the image.
        what: how the caller names it in the error (`identity 0`, `layout.landmark`, `reference ada`).
        copy: return a fresh array the caller may write into (else a uint8 array comes back as given).

    Raises:
        ImageInputError: any other type, dtype or shape (named with `what`).
    """
    if isinstance(image, PIL.Image.Image):
        array = np.asarray(image.convert("RGB"))
        return array.copy() if copy else array
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image.copy() if copy else image
    got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
    raise ImageInputError(f"{what}: expected a PIL image or a uint8 (H, W, 3) RGB array, got {got}")
