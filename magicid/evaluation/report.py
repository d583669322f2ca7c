"""The evaluation report: `metrics.json` (a DVC metrics file), PNG plots, an image grid, and the generations.

Layout of `out_dir` (`eval.out_dir`):
- `metrics.json`: run identifiers, notes, overall figures (after DIIR, and `*_no_diir`), `slices`; NaN and
  infinity are written as null (JSON has neither; `background_psnr_inf_fraction` says how many were infinite);
- `items.csv`: one row per eval item (the table the promotion gate pairs on);
- `plots/metrics_by_slice.png`, `plots/diir_before_after.png`, `grid.png`.
Generations (`review.generations_dir/v<version>/`, written by `write_generations`): `<item_id>.png` (final,
after DIIR), `<item_id>_before.png`, `references/<face_id>.png` (copies of the reference crops the items used),
and one manifest, `manifest.jsonl`: the review app's contract (`magicid/reviews/manifest.py`) with evaluation's
detail as extra keys on each record (item id, slice, references with face id and identity, eval set id, DIIR face
count). Its path rule: every path is relative to the folder holding the manifest and stays inside it, so the
folder is self-contained (it does not point into the dataset, which may move, be forgotten or be on another
machine).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from magicid.config import Params
from magicid.data import forgotten
from magicid.imaging.boxes import draw_boxes
from magicid.reviews.manifest import write_generation_manifest
from magicid.utils import atomic_save_image, atomic_write, atomic_write_text


def _clean(value: Any) -> Any:
    """JSON-safe: NaN / inf -> None, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def generation_id(model_name: str, version: str, item_id: str) -> str:
    """The stable id of one model version's image for one eval item."""
    return f"{model_name}-v{version}-{item_id}"


def image_grid(images: list[Image.Image], columns: int, thumb: int = 128, gutter: int = 2) -> Image.Image:
    """Thumbnails (thumb px) in rows of `columns`, white gutters."""
    rows = max(1, math.ceil(len(images) / columns))
    cols = min(columns, max(1, len(images)))
    grid = Image.new("RGB", (cols * (thumb + gutter) + gutter, rows * (thumb + gutter) + gutter), "white")
    for k, image in enumerate(images):
        r, c = divmod(k, columns)
        grid.paste(
            image.resize((thumb, thumb)), (gutter + c * (thumb + gutter), gutter + r * (thumb + gutter))
        )
    return grid


def _save_figure(figure, path: Path) -> None:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))


def plot_slices(metrics: dict[str, Any], path: Path) -> None:
    """Bar charts per slice: identity similarity, detection rate, confusion, detection in box and count accuracy,
    before and after DIIR."""
    from matplotlib.figure import Figure

    slices = metrics["slices"]
    names = list(slices)
    shown = ("id_similarity", "face_detection_rate", "id_confusion_rate", "detect_in_box", "count_accuracy")
    figure = Figure(figsize=(16, 3.6))
    for k, metric in enumerate(shown):
        axis = figure.add_subplot(1, len(shown), k + 1)
        x = np.arange(len(names))
        for offset, suffix, label in ((-0.2, "_no_diir", "before DIIR"), (0.2, "", "after DIIR")):
            values = [slices[n].get(f"{metric}{suffix}") for n in names]
            axis.bar(x + offset, [np.nan if v is None else v for v in values], width=0.4, label=label)
        axis.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
        axis.set_title(metric, fontsize=9)
        if k == 0:
            axis.legend(fontsize=7)
    figure.suptitle(f"{metrics['model_name']} v{metrics['model_version']}: metrics per slice", fontsize=10)
    _save_figure(figure, path)


def plot_before_after(items: pd.DataFrame, path: Path) -> None:
    """Per item, identity similarity after DIIR against before (points above the diagonal improved)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4, 4))
    axis = figure.add_subplot(1, 1, 1)
    for size, frame in items.groupby("face_size"):
        axis.scatter(frame["id_similarity_no_diir"], frame["id_similarity"], s=14, label=str(size))
    lo = float(np.nanmin([items["id_similarity"].min(), items["id_similarity_no_diir"].min(), 0.0]))
    hi = float(np.nanmax([items["id_similarity"].max(), items["id_similarity_no_diir"].max(), 1.0]))
    axis.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8)
    axis.set_xlabel("id_similarity before DIIR")
    axis.set_ylabel("id_similarity after DIIR")
    axis.legend(title="face size", fontsize=7)
    _save_figure(figure, path)


# The references/ folder beside each generation folder: named by data/forgotten.py, which erases a forgotten
# person's copies there.
REFERENCES_DIR = forgotten.REFERENCES_DIR


def write_generations(
    generations_dir: Path, model_name: str, version: str, generations: list, eval_set
) -> Path:
    """Write one model version's generations, its reference crops and its manifest (module docstring).

    Args:
        generations_dir: `review.generations_dir`; the version's folder `v<version>` is made under it.
        model_name, version: the registered model and version that generated them.
        generations: `run.Generation`s (item, before, after, diir_mask), in eval-set order.
        eval_set: the `EvalSet` (its references' crops are copied, re-encoded as PNG).

    Returns:
        The version's folder.

    Raises:
        ReviewError: a record breaks the manifest contract (the manifest is not written then).
    """
    folder = Path(generations_dir) / f"v{version}"
    references: dict[str, str] = {}  # face id -> its copy, relative to the folder
    for gen in generations:
        for face_id in gen.item.references:
            if face_id not in references:
                relative = f"{REFERENCES_DIR}/{face_id}.png"
                with Image.open(eval_set.references[face_id].crop_path) as crop:
                    atomic_save_image(crop.convert("RGB"), folder / relative)
                references[face_id] = relative
    records = []
    for gen in generations:
        item = gen.item
        atomic_save_image(Image.fromarray(gen.after), folder / f"{item.item_id}.png")
        atomic_save_image(Image.fromarray(gen.before), folder / f"{item.item_id}_before.png")
        row = item.manifest_row()
        records.append(
            _clean(
                {
                    # The review app's contract (magicid/reviews/manifest.py); one case per eval item, so two
                    # versions evaluated on the same set form the blind pairs of the compare page.
                    "generation_id": generation_id(model_name, version, item.item_id),
                    "model_version": str(version),
                    "prompt": row["prompt"],
                    "seed": row["seed"],
                    "reference_paths": [references[f] for f in item.references],
                    "boxes": row["boxes"],
                    "image_path": f"{item.item_id}.png",
                    "pre_diir_path": f"{item.item_id}_before.png",
                    "case_id": f"{eval_set.set_id}-{item.item_id}",
                    # Evaluation's own detail (other keys are allowed and ignored by the review app).
                    "item_id": item.item_id,
                    "n_people": row["n_people"],
                    "face_size": row["face_size"],
                    "layout_id": row["layout_id"],
                    "references": [
                        {"face_id": f, "identity": eval_set.references[f].identity} for f in item.references
                    ],
                    "diir_faces": gen.diir_faces,
                    "model_name": model_name,
                    "eval_set_id": eval_set.set_id,
                }
            )
        )
    # Validates every record and path first: a bad one leaves the manifest unwritten.
    write_generation_manifest(folder, records)
    return folder


def write_report(
    out_dir: Path,
    generations_dir: Path,
    metrics: dict[str, Any],
    items: pd.DataFrame,
    generations: list,
    eval_set,
    params: Params,
) -> Path:
    """Write metrics.json, items.csv, plots, the grid and the generations with their manifest.

    Args:
        generations: `run.Generation`s (item, before, after, diir_mask), in eval-set order.

    Returns:
        The path of metrics.json.
    """
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    write_generations(generations_dir, metrics["model_name"], metrics["model_version"], generations, eval_set)
    atomic_write(out_dir / "items.csv", lambda tmp: items.to_csv(tmp, index=False))
    plot_slices(metrics, out_dir / "plots" / "metrics_by_slice.png")
    plot_before_after(items, out_dir / "plots" / "diir_before_after.png")
    thumbs = [
        draw_boxes(g.after, g.item.boxes, (255, 64, 64), max(1, g.after.shape[1] // 128)) for g in generations
    ]
    atomic_save_image(image_grid(thumbs, params.eval.grid_columns), out_dir / "grid.png")
    path = out_dir / "metrics.json"
    atomic_write_text(path, json.dumps(_clean(metrics), indent=2, sort_keys=False) + "\n")
    return path
