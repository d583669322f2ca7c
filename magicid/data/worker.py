"""The dataset builder's worker and its process pool: one input file -> one record (DESIGN.md §2).

`process_input` decodes and normalises an input (`ingest.load_image`), analyses its faces, estimates pose per
person, and writes the image, the zoomed crops and the condition maps; any input that cannot be used becomes a
quarantine record with a reason (it never raises for bad input). `run_tasks` runs it in this process or in a
`spawn` pool of `data.workers` processes, each pinned to one thread with the models loaded once.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from magicid.config import Params
from magicid.data import manifest as mf
from magicid.errors import InputRejected
from magicid.imaging.png import encode_png
from magicid.utils import atomic_write_bytes

BUILD_VERSION = 3  # bump when the worker's outputs change (3: embeddings by the torch port of dlib's ResNet)
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


@dataclass(frozen=True)
class Task:
    path: str  # absolute path of the input
    source: str  # relative to the input root (posix)
    image_id: str
    out_dir: str


# This process's worker state (set by `init_worker`): the params it was made for, the analyzer, the pose model.
_WORKER: dict = {}


def config_hash(params: Params) -> str:
    """Hash of every setting that changes the worker's outputs (a change forces reprocessing)."""
    relevant = {
        "version": BUILD_VERSION,
        "crop_size": params.data.crop_size,
        "crop_margin": params.data.crop_margin,
        "max_pixels": params.data.max_pixels,
        "faces": params.faces.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def pin_threads() -> None:
    """One thread per worker process: OpenCV, torch and BLAS/OpenMP pools (numbers of cores are the pool's job)."""
    import cv2

    for name in THREAD_ENV:
        os.environ[name] = "1"
    cv2.setNumThreads(1)
    # torch runs the face-embedding ResNet (faces/dlib_resnet.py); its pool is sized at first use, so pin
    # it explicitly rather than trusting that the environment above was read in time.
    import torch

    torch.set_num_threads(1)


def init_worker(params_json: str, pin: bool = True, quiet: bool = True) -> None:
    """Pool initializer: pin threads, quiet native logs, load the analyzer and the pose model once."""
    from magicid.faces import get_analyzer
    from magicid.faces.pose import PoseEstimator
    from magicid.native_logs import quiet_native_logs

    if pin:
        pin_threads()
    if quiet and not _WORKER.get("quiet"):
        quiet_native_logs()
        _WORKER["quiet"] = True
    params = Params.model_validate_json(params_json)
    if _WORKER.get("params_json") != params_json:
        _WORKER.update(
            params_json=params_json, params=params, analyzer=get_analyzer(params.faces), pose=PoseEstimator()
        )


def _flat(array: np.ndarray | None) -> list[float] | None:
    return None if array is None else [float(v) for v in np.asarray(array, dtype=np.float32).reshape(-1)]


def _quarantine(task: Task, reason: str, detail: str) -> dict:
    return {
        "status": "quarantine",
        "source": task.source,
        "image_id": task.image_id,
        "reason": reason,
        # decoders quote the file's absolute path: store its source instead (the same wherever it was staged)
        "detail": detail.replace(task.path, task.source)[:500],
    }


def process_input(task: Task) -> dict:
    """Decode, analyse and write one input (runs in a worker; `init_worker` must have run in this process).

    Returns:
        A record: `{"status": "image", "image": {...}, "faces": [...]}` with manifest rows (identity and split
        are filled at assembly), or `{"status": "quarantine", ...}` with a reason. Never raises for bad input.
    """
    from magicid.data.ingest import load_image
    from magicid.imaging.conditions import render_landmark_map, render_skeleton_map
    from magicid.imaging.crops import zoom_crop

    params: Params = _WORKER["params"]
    try:
        loaded = load_image(task.path, params.data.max_pixels)
    except InputRejected as rejected:
        return _quarantine(task, rejected.reason, rejected.detail)
    except OSError as error:
        return _quarantine(task, "corrupt", f"cannot read the file: {error}")
    image = loaded.array
    height, width = image.shape[:2]
    try:
        faces = _WORKER["analyzer"].analyze(image)
        if not faces:
            return _quarantine(task, "no_face", f"the {params.faces.backend} face analyser found no face")
        skeletons = _WORKER["pose"].estimate(image, faces)
    except Exception as error:  # noqa: BLE001 - an input that breaks a model must not stop the build
        detail = f"{type(error).__name__}: {error} | {traceback.format_exc(limit=3)}"
        return _quarantine(task, "analysis_error", detail)

    out = Path(task.out_dir)
    if loaded.pristine:
        suffix = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}[loaded.format]
        image_path = f"{mf.IMAGES_DIR}/{task.image_id}{suffix}"
        atomic_write_bytes(out / image_path, Path(task.path).read_bytes())
    else:
        image_path = f"{mf.IMAGES_DIR}/{task.image_id}.png"
        atomic_write_bytes(out / image_path, encode_png(image))
    conditions = {
        "skeleton": render_skeleton_map(height, width, skeletons),
        "landmark": render_landmark_map(height, width, [f.landmarks for f in faces]),
    }
    for kind, condition in conditions.items():
        atomic_write_bytes(
            out / mf.CONDITIONS_DIR / f"{task.image_id}_{kind}.png", encode_png(condition, photo=False)
        )
    face_rows = []
    for index, (face, skeleton) in enumerate(zip(faces, skeletons, strict=True)):
        face_id = f"{task.image_id}_{index:02d}"
        crop, _ = zoom_crop(image, face.bbox, params.data.crop_size, params.data.crop_margin)
        crop_path = f"{mf.CROPS_DIR}/{face_id}.png"
        atomic_write_bytes(out / crop_path, encode_png(crop))
        x0, y0, x1, y1 = (float(v) for v in face.bbox)
        face_rows.append(
            {
                "face_id": face_id,
                "image_id": task.image_id,
                "person_idx": index,
                "bbox": _flat(face.bbox),
                "det_score": float(face.det_score),
                "kps5": _flat(face.kps5),
                "landmarks": _flat(face.landmarks),
                "embedding": _flat(face.embedding),
                "face_area_ratio": float((x1 - x0) * (y1 - y0) / (width * height)),
                "crop_path": crop_path,
                "identity": None,
                "skeleton": _flat(skeleton),
            }
        )
    image_row = {
        "image_id": task.image_id,
        "path": image_path,
        "width": width,
        "height": height,
        "n_faces": len(faces),
        "source": task.source,
        "split": None,
    }
    return {
        "status": "image",
        "source": task.source,
        "image_id": task.image_id,
        "image": image_row,
        "faces": face_rows,
    }


# ---------------------------------------------------------------------------------------------------------------
# the pool
# ---------------------------------------------------------------------------------------------------------------
@contextmanager
def _single_thread_env():
    """Children spawned inside inherit one-thread BLAS/OpenMP settings (read when they import numpy/torch)."""
    saved = {name: os.environ.get(name) for name in THREAD_ENV}
    os.environ.update({name: "1" for name in THREAD_ENV})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def worker_pool(params: Params, workers: int):
    """A `spawn` pool whose processes each hold one analyzer and are pinned to one thread.

    `spawn`, not `fork`: MediaPipe, onnxruntime and torch keep threads that a fork would copy mid-state.
    """
    context = multiprocessing.get_context("spawn")
    with _single_thread_env():
        pool = context.Pool(workers, initializer=init_worker, initargs=(params.model_dump_json(),))
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def run_tasks(tasks: list[Task], params: Params, progress: bool) -> Iterator[dict]:
    """Yield records as they finish (unordered): in this process when `data.workers` is 1 or there is one task,
    else in a `worker_pool`."""
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="build-data", unit="img", disable=not progress or not tasks)
    try:
        if params.data.workers == 1 or len(tasks) <= 1:
            init_worker(params.model_dump_json(), pin=False, quiet=False)
            for task in tasks:
                yield process_input(task)
                bar.update()
        else:
            with worker_pool(params, min(params.data.workers, len(tasks))) as pool:
                for record in pool.imap_unordered(process_input, tasks):
                    yield record
                    bar.update()
    finally:
        bar.close()
