"""`magicid evaluate`: generate the evaluation set with a registered model, with and without DIIR, and score it.

The one place that drives the model for evaluation (the pipeline and DIIR call sites are here only):
1. resolve `--model` (`models:/NAME@ALIAS` or `models:/NAME/VERSION`) and load it (`registry.load_pipeline`);
2. build the evaluation set (`evalset.build_eval_set`) at the model's resolution;
3. generate batched: the items sharing a layout (same people and boxes; they differ in seed and prompt) go
   through the pipeline together, timed (`eval_seconds_per_image`);
4. DIIR on every generation (`faces="small"`, below `diir.max_face_ratio`), timed apart;
5. score each image before and after DIIR with the recognizer of `eval.face_backend` (offline: the same
   dlib network that conditions the model, and the report says so);
6. write the report (`report.write_report`) and log it to the model version's MLflow run, with the per-item
   table the promotion gate pairs on (`registry.log_eval_items`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from magicid.config import Params
from magicid.evaluation import metrics as M
from magicid.evaluation.evalset import EvalItem, EvalSet, build_eval_set

SLICE_COLUMNS = ("n_people", "face_size")
SCORED = ("id_similarity", "id_confusion_rate", "id_top1_accuracy", "face_detection_rate", "landmark_nme",
          "count_accuracy", "detect_in_box")  # fmt: skip


@dataclasses.dataclass
class Generation:
    """One evaluated image: before and after DIIR, and DIIR's blend mask (uint8 (H, W), 0 = untouched)."""

    item: EvalItem
    before: np.ndarray
    after: np.ndarray
    diir_mask: np.ndarray
    diir_faces: int


@dataclasses.dataclass
class EvalResult:
    """What `evaluate_model` produced."""

    model_uri: str
    version: str
    run_id: str
    eval_set: EvalSet
    items: pd.DataFrame
    metrics: dict[str, Any]
    out_dir: Path


def score_image(
    image: np.ndarray, item: EvalItem, reference_embeddings: np.ndarray, analyzer, min_iou: float
) -> dict[str, float]:
    """Detect faces in one generated image and score them against the item's layout and references.

    Args:
        image: uint8 (H, W, 3) generated image.
        item: its eval item (boxes, conditioning landmarks, eye centres; references in box order).
        reference_embeddings: (n, D) the references' embeddings in the scoring backend's space, box order.
        analyzer: the scoring `FaceAnalyzer`.
        min_iou: a detected face belongs to a layout box at IoU >= this.

    Returns:
        `id_similarity`, `id_confusion_rate`, `id_top1_accuracy`, `face_detection_rate`, `landmark_nme`,
        `count_accuracy` (1 when the image shows exactly as many faces as boxes, else 0), `detect_in_box`,
        `n_detected` (NaN where undefined: no face placed in a box was found).
    """
    faces = analyzer.analyze(np.ascontiguousarray(image))
    dim = reference_embeddings.shape[1]
    embeddings = np.stack([f.embedding for f in faces]) if faces else np.zeros((0, dim))
    detected = np.stack([f.bbox for f in faces]) if faces else np.zeros((0, 4))
    out = {
        **M.id_similarity(embeddings, reference_embeddings),
        "face_detection_rate": M.face_detection_rate(detected, item.boxes, min_iou)["face_detection_rate"],
        "n_detected": float(len(faces)),
        # 2025 multi-person benchmarks: exactly the requested number of faces; a face inside each requested box
        "count_accuracy": M.count_accuracy([len(faces)], [len(item.boxes)])["count_accuracy"],
        "detect_in_box": M.detect_in_box(detected, item.boxes)["detect_in_box"],
    }
    matches = M.match_boxes(detected, item.boxes, min_iou)  # per box: its detected face or None
    intended: list[int | None] = [None] * len(faces)
    for box_index, face_index in enumerate(matches):
        if face_index is not None:
            intended[face_index] = box_index
    placed = [f for f, r in enumerate(intended) if r is not None]
    out["id_confusion_rate"] = (
        M.id_confusion_rate(embeddings, reference_embeddings, intended)["id_confusion_rate"]
        if len(reference_embeddings) > 1
        else float("nan")
    )
    out["id_top1_accuracy"] = (
        M.id_top1_accuracy(embeddings[placed], reference_embeddings, [intended[f] for f in placed])[
            "id_top1_accuracy"
        ]
        if placed
        else float("nan")
    )
    errors = []
    for f in placed:
        target = item.landmarks[intended[f]]
        if faces[f].landmarks.shape == target.shape:
            eyes = item.eyes[intended[f]]
            errors.append(M.landmark_nme(faces[f].landmarks, target, eyes[0], eyes[1])["landmark_nme"])
    out["landmark_nme"] = float(np.mean(errors)) if errors else float("nan")
    return out


def _reference_images(eval_set: EvalSet) -> dict[str, np.ndarray]:
    from PIL import Image

    images = {}
    for face_id, ref in eval_set.references.items():
        with Image.open(ref.crop_path) as image:
            images[face_id] = np.asarray(image.convert("RGB"))
    return images


def _scoring_embeddings(eval_set: EvalSet, crops: dict[str, np.ndarray], analyzer, same_backend: bool):
    """Reference embeddings in the scoring backend's space: the dataset's, or re-embedded from the crops."""
    if same_backend:
        return {face_id: ref.embedding for face_id, ref in eval_set.references.items()}
    from magicid.errors import FaceBackendError

    out = {}
    for face_id, crop in crops.items():
        found = analyzer.analyze(crop)
        if not found:
            raise FaceBackendError(
                f"eval.face_backend={analyzer.name!r} finds no face in reference crop {face_id}; "
                "score with the backend the dataset was built with"
            )
        out[face_id] = max(found, key=lambda f: f.width * f.height).embedding
    return out


def generate_eval_images(
    pipe,
    model_params: Params,
    params: Params,
    eval_set: EvalSet,
    crops: dict[str, np.ndarray],
    progress: bool,
) -> tuple[dict[str, np.ndarray], float]:
    """Generate every item, batched per layout (`eval.batch_size` images a call). Returns images by item id
    (uint8 (H, W, 3)) and the generation seconds."""
    import torch
    from tqdm.auto import tqdm

    from magicid.imaging.conditions import render_landmark_map
    from magicid.imaging.layout import FaceLayout

    cfg, res = model_params.model, eval_set.resolution
    by_layout: dict[str, list[EvalItem]] = {}
    for item in eval_set.items:
        by_layout.setdefault(item.layout_id, []).append(item)
    batches = [
        group[start : start + params.eval.batch_size]
        for group in by_layout.values()
        for start in range(0, len(group), params.eval.batch_size)
    ]
    images: dict[str, np.ndarray] = {}
    seconds = 0.0
    for batch in tqdm(batches, desc="evaluate: generate", disable=not progress):
        first = batch[0]
        layout = FaceLayout(
            boxes=first.boxes.tolist(), landmark=render_landmark_map(res, res, first.landmarks)
        )
        start = time.perf_counter()
        result = pipe(
            [item.prompt for item in batch],
            identities=[crops[face_id] for face_id in first.references],
            layout=layout,
            height=res,
            width=res,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            id_scale=cfg.id_scale,
            generator=[torch.Generator().manual_seed(item.seed) for item in batch],
        )
        seconds += time.perf_counter() - start
        for item, image in zip(batch, result.images, strict=True):
            images[item.item_id] = np.asarray(image.convert("RGB"))
    return images, seconds


def aggregate(items: pd.DataFrame) -> dict[str, Any]:
    """Overall means (NaN-skipping) of the scored metrics after DIIR, before DIIR, and per slice (number of
    people, face size: `slices["face_size=small"]["detect_in_box"]` is detection in box on the small slice)."""

    def means(frame: pd.DataFrame, suffix: str = "") -> dict[str, float]:
        return {
            f"{m}{suffix}": float(frame[f"{m}{suffix}"].mean())
            if frame[f"{m}{suffix}"].notna().any()
            else None
            for m in SCORED
        }

    out: dict[str, Any] = {**means(items), **means(items, "_no_diir")}
    sims = M.mean_gain(items["id_similarity_no_diir"], items["id_similarity"])
    out["diir_id_sim_gain"] = sims["mean_gain"]
    out["background_max_abs_diff"] = float(items["background_max_abs_diff"].max())
    finite = items["background_psnr"].replace([np.inf], np.nan)
    out["background_psnr"] = float(finite.mean()) if finite.notna().any() else None
    out["background_psnr_inf_fraction"] = float(np.isinf(items["background_psnr"]).mean())
    out["background_ssim"] = float(items["background_ssim"].mean())
    slices: dict[str, Any] = {}
    for column in SLICE_COLUMNS:
        for value, frame in items.groupby(column):
            slices[f"{column}={value}"] = {**means(frame), **means(frame, "_no_diir"), "n_items": len(frame)}
    out["slices"] = slices
    return out


def evaluate_model(
    params: Params,
    model_uri: str,
    dataset_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    analyzer=None,
    progress: bool = True,
    log: bool = True,
) -> EvalResult:
    """Evaluate a registered model version on the evaluation set of `dataset_dir` (default `data.out_dir`).

    Args:
        params: `eval`, `diir`, `faces`, `tracking`, `promotion.model_name`, `review.generations_dir`.
        model_uri: `models:/NAME@ALIAS` or `models:/NAME/VERSION`.
        dataset_dir: IDZoom dataset version supplying the references.
        out_dir: report folder (default `eval.out_dir`).
        analyzer: the `FaceAnalyzer` for references, DIIR and scoring (default `eval.face_backend`); tests pass one.
        progress: progress bars; log: log the report and per-item table to the version's MLflow run.

    Returns:
        `EvalResult`.
    """
    from PIL import Image

    from magicid import registry
    from magicid.evaluation.report import write_report
    from magicid.faces import get_analyzer
    from magicid.restore.diir import DIIR, ReferenceIdentity

    loaded = registry.load_pipeline(params, model_uri)
    version, pipe, model_params = loaded.version, loaded.pipe, loaded.params
    pipe.set_progress_bar_config(disable=True)

    # 2. the evaluation set, at the model's resolution
    eval_params = params.model_copy(
        update={"model": params.model.model_copy(update={"resolution": model_params.model.resolution})}
    )
    eval_set = build_eval_set(dataset_dir or params.data.out_dir, eval_params)
    scoring = analyzer or get_analyzer(params.faces.model_copy(update={"backend": params.eval.face_backend}))
    conditioning = analyzer or get_analyzer(model_params.faces)
    pipe.face_analyzer = conditioning
    crops = _reference_images(eval_set)
    conditioning.analyze(next(iter(crops.values())))  # warm-up: model loading stays out of the timing
    same_backend = analyzer is not None or params.eval.face_backend == params.faces.backend
    ref_embeddings = _scoring_embeddings(eval_set, crops, scoring, same_backend)

    # 3. generation, batched per layout
    images, gen_seconds = generate_eval_images(pipe, model_params, params, eval_set, crops, progress)

    # 4. DIIR on each generation
    diir_params = model_params.model_copy(update={"diir": params.diir, "faces": model_params.faces})
    diir = DIIR.from_pipe(pipe, analyzer=conditioning, params=diir_params)
    diir.set_progress_bar_config(disable=True)
    crop_size = model_params.model.id_crop_size
    references = {
        face_id: ReferenceIdentity(
            np.asarray(ref.embedding, np.float32),
            np.asarray(
                Image.fromarray(crops[face_id]).resize((crop_size, crop_size), Image.Resampling.BICUBIC)
            ),
            ref.identity,
        )
        for face_id, ref in eval_set.references.items()
    }
    generations, diir_seconds = [], 0.0
    from tqdm.auto import tqdm

    for item in tqdm(eval_set.items, desc="evaluate: DIIR + score", disable=not progress):
        start = time.perf_counter()
        restored = diir.restore(
            images[item.item_id], [references[f] for f in item.references], prompt=item.prompt
        )
        diir_seconds += time.perf_counter() - start
        generations.append(Generation(item, images[item.item_id], np.asarray(restored.image),
                                      restored.mask, len(restored.faces)))  # fmt: skip

    # 5. scores before / after DIIR
    rows = []
    for gen in generations:
        refs = np.stack([ref_embeddings[f] for f in gen.item.references])
        before = score_image(gen.before, gen.item, refs, scoring, params.eval.detect_min_iou)
        after = score_image(gen.after, gen.item, refs, scoring, params.eval.detect_min_iou)
        background = (
            M.background_psnr_ssim(gen.before, gen.after, gen.diir_mask)
            if (gen.diir_mask == 0).any()
            else {"background_psnr": np.nan, "background_ssim": np.nan, "background_max_abs_diff": np.nan}
        )
        rows.append({
            "item_id": gen.item.item_id, "n_people": gen.item.n_people, "face_size": gen.item.face_size,
            "seed": gen.item.seed, "diir_faces": gen.diir_faces,
            **{k: after[k] for k in (*SCORED, "n_detected")},
            **{f"{k}_no_diir": before[k] for k in (*SCORED, "n_detected")},
            **{k: background[k] for k in ("background_psnr", "background_ssim", "background_max_abs_diff")},
        })  # fmt: skip
    items = pd.DataFrame(rows)
    n = len(eval_set.items)
    figures = aggregate(items)
    figures.update(M.seconds_per_image(gen_seconds, n))
    figures["diir_seconds_per_image"] = diir_seconds / n
    figures["n_items"] = n
    backend_note = f"identity scored with faces backend {params.eval.face_backend!r}" + (
        " (the offline dlib ResNet: the same network that conditions the model, so identity figures "
        "are not independent of it)"
        if params.eval.face_backend == "offline" and model_params.faces.backend == "offline"
        else ""
    )
    metrics = {
        "model_uri": model_uri,
        "model_name": version.name,
        "model_version": str(version.version),
        "run_id": version.run_id,
        "eval_set_id": eval_set.set_id,
        "dataset_version": eval_set.dataset_version,
        "reference_split": eval_set.reference_split,
        "references_seen_in_training": eval_set.references_seen_in_training,
        "face_backend": params.eval.face_backend,
        "notes": [*eval_set.notes, backend_note],
        **figures,
    }
    out = Path(out_dir or params.eval.out_dir)
    write_report(out, Path(params.review.generations_dir), metrics, items, generations, eval_set, params)
    if log:
        registry.log_eval_items(params, version, eval_set.set_id, items)
        registry.log_eval_report(params, version, out, metrics)
    return EvalResult(model_uri, str(version.version), version.run_id, eval_set, items, metrics, out)
