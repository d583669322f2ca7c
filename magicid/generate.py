"""Text-to-image generation with the configured backbone (the `magicid generate` command's science)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from magicid.config import Params
from magicid.errors import ConfigError, DataError, ModelInputError
from magicid.models.backbone import Backbone, load_backbone
from magicid.utils import atomic_save_image


def load_adapter(params: Params, backbone: Backbone):
    """The trained adapter of `model.adapter_path` (installs MGMICA on `backbone.unet`).

    With `model.adapter_path` null, a freshly initialised (untrained) adapter only when asked for explicitly
    (`model.untrained_adapter`, the CLI's `--untrained-adapter`): its identities have no learned effect.

    Raises:
        ConfigError: no trained adapter and none asked for (the message says how to train or ask).
    """
    from magicid.models.adapter import MagicIDAdapter

    if params.model.adapter_path:
        return MagicIDAdapter.load(params.model.adapter_path, backbone, params)
    if not params.model.untrained_adapter:
        raise ConfigError(
            "identities, face layouts and restoring need a trained MagicID adapter, and model.adapter_path is "
            "null: train one with `magicid train` (it writes <train.out_dir>/adapter, e.g. runs/train/adapter) "
            "and pass `--set model.adapter_path=runs/train/adapter`; or ask for an untrained, freshly "
            "initialised adapter explicitly with --untrained-adapter (model.untrained_adapter=true): its "
            "identity features then have no learned effect"
        )
    return MagicIDAdapter.create(backbone, params)


def with_untrained_adapter(params: Params, untrained: bool) -> Params:
    """`params` with `model.untrained_adapter` set when `untrained` (the CLI's `--untrained-adapter`)."""
    if not untrained:
        return params
    return params.model_copy(update={"model": params.model.model_copy(update={"untrained_adapter": True})})


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
            `model.adapter_path`, MGMICA is installed on its UNet (see `load_adapter`: a trained adapter, or an
            untrained one only with `model.untrained_adapter`).
        identities: reference faces (PIL / uint8 (H, W, 3) images) or (D,) embeddings; None = plain generation.
        layout: a `FaceLayout` or a list of (x0, y0, x1, y1) boxes in pixels (see `MagicIDPipeline`).

    Returns:
        An RGB PIL image of size (resolution, resolution).
    """
    from magicid.models.pipeline import MagicIDPipeline

    backbone = backbone or load_backbone(params)
    backbone.require_sd1("generation (magicid generate)")
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


def _read_image(path: str | Path, what: str, max_pixels: int) -> np.ndarray:
    """An untrusted image file -> uint8 (H, W, 3) RGB; size checked from the header before decoding."""
    from magicid.data.ingest import load_image
    from magicid.errors import InputRejected
    from magicid.safety import check_input_file

    path = check_input_file(path, what)
    try:
        return load_image(path, max_pixels).array
    except InputRejected as exc:
        raise DataError(f"{what} {str(path)!r}: cannot be used ({exc})") from exc


def check_generate_args(
    params: Params, refs: Sequence | None, boxes: str | None, out: str | Path
) -> tuple[list | None, list[str]]:
    """Check `magicid generate`'s arguments before any model loads.

    Returns:
        (the parsed boxes or None, notes to print: what the arguments mean where it is not obvious).

    Raises:
        OutputPathError: `out` is a folder, unwritable, or not a .png; ModelInputError: malformed `--boxes`,
            a box outside the image, or a different number of boxes and `--ref`s.
    """
    from magicid.imaging.boxes import check_boxes
    from magicid.safety import check_output_file

    check_output_file(out, "--out")
    notes = []
    parsed = parse_boxes(boxes) if boxes is not None else None
    if parsed is not None:
        size = params.model.resolution
        check_boxes(parsed, size, size)
        if refs and len(parsed) != len(refs):
            raise ModelInputError(
                f"--boxes gives {len(parsed)} boxes but {len(refs)} --ref images were given; give one box per "
                "--ref (matched in order)"
            )
        if not refs:
            notes.append(
                f"--boxes without --ref: {len(parsed)} faces are placed (landmark layout) with no identity"
            )
    return parsed, notes


def generate_to_file(
    params: Params,
    prompt: str,
    seed: int,
    out: str | Path,
    refs: Sequence[str | Path] | None = None,
    boxes: str | None = None,
    skeleton: str | Path | None = None,
) -> Path:
    """`magicid generate`: reference face files, a `--boxes` string and/or a `--skeleton` map file -> one PNG.

    Every argument is checked (`check_generate_args`, image sizes from their headers) before a model loads.
    """
    from magicid.imaging.layout import FaceLayout

    parsed_boxes, _ = check_generate_args(params, refs, boxes, out)
    identities = [_read_image(path, "--ref", params.data.max_pixels) for path in refs or []]
    layout = None
    if boxes is not None or skeleton is not None:
        layout = FaceLayout(
            boxes=parsed_boxes,
            skeleton=_read_image(skeleton, "--skeleton", params.data.max_pixels)
            if skeleton is not None
            else None,
        )
    image = generate_image(params, prompt, seed, identities=identities or None, layout=layout)
    return atomic_save_image(image, out)


# -- `magicid restore`: files in, files out around DIIR -----------------------------------------------------


def comparison_image(before: Image.Image, after: Image.Image) -> Image.Image:
    """Before (left) and after (right), side by side with a 4 px white gutter."""
    gutter = 4
    canvas = Image.new(
        "RGB", (before.width + gutter + after.width, max(before.height, after.height)), "white"
    )
    canvas.paste(before.convert("RGB"), (0, 0))
    canvas.paste(after.convert("RGB"), (before.width + gutter, 0))
    return canvas


def restore_file(
    params: Params,
    image_path: str | Path,
    reference_paths: Sequence[str | Path],
    out: str | Path,
    prompt: str = "",
    faces: str = "small",
    progress: bool = True,
):
    """Restore the faces of an image file against reference photos; write the result and a comparison.

    Loads the configured backbone and adapter (`model.adapter_path`, or a freshly initialised one when
    null) and the configured face backend. Writes `out` and `<out stem>_compare<suffix>` (before | after).
    `progress` shows the restore's progress bar (inverse and denoising steps of each face batch).

    Returns:
        (the `RestoreResult`, the output path, the comparison path).

    Raises:
        DataError: unreadable image or reference, or a reference photo without a face.
    """
    from magicid.restore.diir import DIIR

    out = Path(out)
    pixels = _read_image(image_path, "image", params.data.max_pixels)
    references = [_read_image(p, f"--ref {i}", params.data.max_pixels) for i, p in enumerate(reference_paths)]
    backbone = load_backbone(params)
    adapter = load_adapter(params, backbone)
    diir = DIIR.from_backbone(backbone, adapter=adapter, params=params)
    diir.set_progress_bar_config(disable=not progress)
    refs = [
        diir.reference_from_image(r, Path(p).name) for r, p in zip(references, reference_paths, strict=True)
    ]
    result = diir.restore(pixels, identities=refs or None, prompt=prompt, faces=faces)
    atomic_save_image(result.image, out)
    compare = out.with_name(f"{out.stem}_compare{out.suffix or '.png'}")
    atomic_save_image(comparison_image(Image.fromarray(pixels), result.image), compare)
    return result, out, compare
