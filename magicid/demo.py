"""The demo's two science stages after training (`magicid demo` = `flows/demo.py`, which runs the `retrain` flow
first: sample data, IDZoom, validation, the fitted tiny backbone, training, evaluation, promotion):

- `generate_group_photo`: a two-person group photo with MGMICA, each identity bound to its own face box;
- `restore_group_photo`: the small faces of a real group photo restored with DIIR (background bit-identical),
  with a before/after comparison image.

Kept here, not in the flow, because they are science (the flow's tasks are thin wrappers of them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from magicid.config import Params


def _with(params: Params, **sections: dict) -> Params:
    """A copy of `params` with some section fields replaced (validated)."""
    updated = params.model_copy(deep=True)
    for section, values in sections.items():
        target = getattr(updated, section)
        for key, value in values.items():
            setattr(target, key, value)
    return updated


def generate_group_photo(
    params: Params, adapter_dir: str | Path, raw_dir: str | Path, out_dir: str | Path, progress: bool = True
) -> str:
    """Stage 5: two identities (the sample set's Tom Hanks and astronaut photos), each bound to its own face box
    by MGMICA; writes `out_dir/group_photo.png` and returns its path."""
    from magicid.generate import generate_image
    from magicid.models.backbone import load_backbone
    from magicid.utils import atomic_save_image

    trained = _with(params, model={"adapter_path": str(adapter_dir)})
    side = trained.model.resolution
    raw_dir = Path(raw_dir)
    references = [
        np.asarray(Image.open(raw_dir / "tom_hanks.png").convert("RGB")),
        np.asarray(Image.open(raw_dir / "astronaut.png").convert("RGB")),
    ]
    boxes = [
        (0.12 * side, 0.2 * side, 0.4 * side, 0.5 * side),
        (0.6 * side, 0.2 * side, 0.88 * side, 0.5 * side),
    ]
    group = generate_image(
        trained,
        "a photo of two people",
        params.seed,
        backbone=load_backbone(trained),
        progress=progress,
        identities=references,
        layout=boxes,
    )
    return str(atomic_save_image(group, Path(out_dir) / "group_photo.png"))


def restore_group_photo(
    params: Params, adapter_dir: str | Path, out_dir: str | Path, progress: bool = True
) -> dict[str, str]:
    """Stage 6: DIIR on a real group photo (insightface's t1.jpg): faces under `diir.max_face_ratio`, each with
    its own embedding (no references). Returns `restored` (+ `restore_note`) summary lines."""
    from magicid.data.sample import package_photo
    from magicid.generate import restore_file

    trained = _with(params, model={"adapter_path": str(adapter_dir)})
    restored, out_path, compare_path = restore_file(
        trained,
        package_photo("t1.jpg"),
        [],
        Path(out_dir) / "restored_t1.png",
        prompt="a group photo",
        faces="small",
        progress=progress,
    )
    summary = {"restored": f"{out_path} ({len(restored.faces)} faces; compare: {compare_path})"}
    if restored.note:
        summary["restore_note"] = restored.note
    return summary
