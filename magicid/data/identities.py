"""Identity labels of a raw input folder: the sidecar `identities.json` at its root, and how its labels go to
the detected faces (DESIGN.md §2: `identity` of faces.parquet, the known label where the source gives one).

Sidecar form: `{"<source path>": [{"identity": "<name>", "bbox": [x0, y0, x1, y1]}, ...], ...}` (`bbox`
optional when the image shows one face).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from magicid.errors import DataError

IDENTITY_SIDECAR = "identities.json"
MIN_LABEL_IOU = 0.3  # a labelled box names the detected face it overlaps most, if at least this much


def load_identity_labels(input_dir: Path) -> dict[str, list[dict]]:
    """Identity labels from `<input_dir>/identities.json`: `{source: [{"identity": str, "bbox": [4 floats]?}]}`.

    Raises:
        DataError: the sidecar is not valid JSON or has the wrong shape (the message shows the expected form).
    """
    from magicid.safety import file_kind_problem

    path = input_dir / IDENTITY_SIDECAR
    if not path.exists() and not path.is_symlink():
        return {}
    form = '{"<source path>": [{"identity": "<name>", "bbox": [x0, y0, x1, y1]}, ...], ...}'
    problem = file_kind_problem(path)
    if problem is None and path.is_symlink():
        problem = "is a symlink (the sidecar must be a regular file in the input folder)"
    if problem is not None:
        raise DataError(f"{path}: the identity sidecar {problem}")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise DataError(f"{path}: not valid UTF-8 JSON ({str(error)[:200]}); expected {form}") from error
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected {form}")
    labels = {}
    for source, entries in raw.items():
        if not isinstance(entries, list) or not all(
            isinstance(e, dict)
            and isinstance(e.get("identity"), str)
            and (e.get("bbox") is None or _is_box(e["bbox"]))
            for e in entries
        ):
            raise DataError(
                f"{path}: entry {source!r} is malformed (each bbox: four finite numbers x0 < x1, y0 < y1); "
                f"expected {form}"
            )
        labels[source] = entries
    return labels


def _is_box(value) -> bool:
    """Four finite numbers (not booleans) with x0 < x1 and y0 < y1."""
    if not isinstance(value, list) or len(value) != 4:
        return False
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) for v in value):
        return False
    return value[0] < value[2] and value[1] < value[3]


def match_identities(faces: list[dict], labels: list[dict]) -> list[str | None]:
    """Identity per face: each labelled box goes to the face of highest IoU (>= 0.3); a label without a box
    goes to the image's only face.

    Args:
        faces: the image's face rows (`bbox` as 4 floats, pixels).
        labels: the image's sidecar entries.
    """
    from magicid.imaging.boxes import box_overlaps

    identities: list[str | None] = [None] * len(faces)
    if not faces:
        return identities
    boxes = np.array([f["bbox"] for f in faces], dtype=np.float64)
    for label in labels:
        if label.get("bbox") is None:
            if len(faces) == 1 and len(labels) == 1:
                identities[0] = label["identity"]
            continue
        iou, _ = box_overlaps(np.asarray(label["bbox"], np.float64), boxes)
        best = int(np.argmax(iou[0]))
        if iou[0, best] >= MIN_LABEL_IOU and identities[best] is None:
            identities[best] = label["identity"]
    return identities
