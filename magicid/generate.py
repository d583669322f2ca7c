"""Text-to-image generation with the configured backbone (the `magicid generate` command's science)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from magicid.config import Params
from magicid.errors import DataError, ModelInputError
from magicid.models.backbone import Backbone, load_backbone
from magicid.utils import atomic_save_image


def load_adapter(params: Params, backbone: Backbone):
    """The adapter of `model.adapter_path`, or a freshly initialised one (installs MGMICA on `backbone.unet`)."""
    from magicid.models.adapter import MagicIDAdapter

    if params.model.adapter_path:
        return MagicIDAdapter.load(params.model.adapter_path, backbone, params)
    return MagicIDAdapter.create(backbone, params)


def generate_image(
    params: Params,
    prompt: str,
    seed: int,
    backbone: Backbone | None = None,
    progress: bool = True,
    identities: Sequence | None = None,
    layout=None,
) -> Image.Image:
    """Generate one `model.resolution`-square image; the same prompt, seed and params give identical pixels.

    Args:
        params: typed parameters (model section: backbone, resolution, steps, guidance, adapter, id_scale).
        prompt: the text prompt.
        seed: seeds an explicit `torch.Generator` (no global RNG state is touched).
        backbone: a loaded backbone to reuse; loaded from `params` when None. With identities, a layout or
            `model.adapter_path`, MGMICA is installed on its UNet.
        identities: reference faces (PIL / uint8 (H, W, 3) images) or (D,) embeddings; None = plain generation.
        layout: a `FaceLayout` or a list of (x0, y0, x1, y1) boxes in pixels (see `MagicIDPipeline`).

    Returns:
        An RGB PIL image of size (resolution, resolution).
    """
    from magicid.models.pipeline import MagicIDPipeline

    backbone = backbone or load_backbone(params)
    use_adapter = bool(identities) or layout is not None or params.model.adapter_path is not None
    adapter = load_adapter(params, backbone) if use_adapter else None
    pipe = MagicIDPipeline.from_backbone(backbone, adapter, params)
    pipe.set_progress_bar_config(disable=not progress)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    result = pipe(
        prompt,
        identities=identities,
        layout=layout,
        height=params.model.resolution,
        width=params.model.resolution,
        num_inference_steps=params.model.num_inference_steps,
        guidance_scale=params.model.guidance_scale,
        id_scale=params.model.id_scale if adapter is not None else None,
        generator=generator,
    )
    return result.images[0]


def parse_boxes(text: str) -> list[tuple[float, float, float, float]]:
    """`"x0,y0,x1,y1;x0,y0,x1,y1"` -> boxes in pixels.

    Raises:
        ModelInputError: not four numbers per box.
    """
    boxes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        try:
            values = tuple(float(v) for v in part.split(","))
        except ValueError:
            values = ()
        if len(values) != 4:
            raise ModelInputError(
                f"--boxes: {part!r} is not x0,y0,x1,y1 (four numbers; boxes separated by ';')"
            )
        boxes.append(values)
    if not boxes:
        raise ModelInputError(f'--boxes {text!r}: no box given; use "x0,y0,x1,y1;..."')
    return boxes


def _read_image(path: str | Path, what: str) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path}: file not found")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as exc:
        raise DataError(f"{what} {path}: not a readable image ({exc})") from exc


def generate_to_file(
    params: Params,
    prompt: str,
    seed: int,
    out: str | Path,
    refs: Sequence[str | Path] | None = None,
    boxes: str | None = None,
    skeleton: str | Path | None = None,
) -> Path:
    """`magicid generate`: reference face files, a `--boxes` string and/or a `--skeleton` map file -> one PNG."""
    from magicid.models.pipeline import FaceLayout

    identities = [_read_image(path, "--ref") for path in refs or []]
    layout = None
    if boxes is not None or skeleton is not None:
        layout = FaceLayout(
            boxes=parse_boxes(boxes) if boxes is not None else None,
            skeleton=_read_image(skeleton, "--skeleton") if skeleton is not None else None,
        )
    image = generate_image(params, prompt, seed, identities=identities or None, layout=layout)
    return atomic_save_image(image, out)
