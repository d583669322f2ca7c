"""The demo: MagicID's main job end to end on embedded offline defaults (`make demo`).

1. sample-data: a raw set from photos shipped in pip packages (+ composited group photos down to ~2 % faces);
2. build IDZoom (faces, landmarks, embeddings, zoomed crops, skeletons, condition maps; quarantine);
3. validate it (Great Expectations checkpoint; fails loudly with the data-docs path);
3b. fit the tiny backbone to it (`training/fit.py`), once: the fitted folder is reused while its inputs (dataset
   version + `fit` params + seed, its `fit_key.json`) are unchanged;
4. train the adapter (MMF schedule + Clone Face Tuning; MLflow on local SQLite);
5. generate a two-person group photo with MGMICA, each identity bound to its own face box;
6. restore the small faces of a real group photo with DIIR (background bit-identical) + a comparison image.

With `model.backbone=tiny` (the default) the demo uses the tiny backbone fitted to the sample set, so its
pictures show faces; it is fitted to about ten people and does not generalise beyond them. `random_backbone=True`
(`magicid demo --random-backbone`) keeps the random weights (noise-like pictures). A `model.backbone` folder (real
SD 1.5 weights) is used as given.
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


def run_demo(
    params: Params, out_dir: str | Path, progress: bool = True, random_backbone: bool = False
) -> dict[str, str]:
    """Run the six stages above into `out_dir`.

    Args:
        params: typed parameters (the embedded defaults when no params.yaml is present).
        out_dir: where raw data, the dataset, reports, the fitted backbone, the adapter and images go.
        progress: show progress bars.
        random_backbone: with `model.backbone=tiny`, keep the random tiny weights instead of fitting them.

    Returns:
        A summary mapping (printed by the CLI), with the paths of what was produced and key figures.
    """
    from magicid.data.builder import build_idzoom
    from magicid.data.sample import build_sample_set
    from magicid.data.validation import validate_idzoom
    from magicid.models.backbone import load_backbone
    from magicid.training.trainer import train

    out_dir = Path(out_dir)
    summary: dict[str, str] = {"backbone": params.model.backbone}

    # 1-3. Data: sample set -> IDZoom -> validation.
    raw_dir = build_sample_set(out_dir / "raw", params)
    report = build_idzoom(raw_dir, out_dir / "idzoom", params, progress=progress)
    summary["idzoom"] = (
        f"{report.out_dir} ({report.n_images} images, {report.n_faces} faces, {report.n_quarantined} quarantined)"
    )
    validation = validate_idzoom(out_dir / "idzoom", out_dir / "validation")
    summary["validation"] = (
        f"{validation.n_expectations - validation.n_failed}/{validation.n_expectations} passed"
    )
    summary["data_docs"] = validation.docs_path

    # 3b. The fitted tiny backbone (fitted once, reused while its inputs are unchanged), loaded as SD 1.5 is.
    if params.model.backbone == "tiny" and not random_backbone:
        from magicid.training.fit import ensure_fitted_backbone

        fitted = ensure_fitted_backbone(
            params, out_dir / "idzoom", out_dir / "fitted_backbone", progress=progress
        )
        params = _with(params, model={"backbone": str(fitted.out_dir)})
        summary["backbone"] = (
            f"{fitted.out_dir} ({'reused' if fitted.reused else f'fitted in {fitted.seconds:.0f} s'})"
        )

    # 4. Training (MMF + Clone Face Tuning), tracked in MLflow.
    train_params = _with(params, train={"out_dir": str(out_dir / "train")})
    backbone = load_backbone(train_params)
    result = train(train_params, out_dir / "idzoom", backbone=backbone, progress=progress)
    first, last = result.losses[min(result.losses)], result.losses[max(result.losses)]
    summary["train"] = f"{result.step} steps, loss {first:.4f} -> {last:.4f}, adapter {result.adapter_dir}"
    summary["mlflow_run_id"] = str(result.run_id)
    summary["dataset_version"] = result.dataset_version

    # 5-6. The science stages after training (also run as tasks of the demo flow, flows/demo.py).
    summary["group_photo"] = generate_group_photo(params, result.adapter_dir, raw_dir, out_dir, progress)
    summary.update(restore_group_photo(params, result.adapter_dir, out_dir, progress))
    return summary


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
