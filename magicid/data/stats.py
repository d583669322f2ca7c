"""`stats.json` of a dataset version (DESIGN.md §2): counts and distributions (face sizes, faces per image,
splits, quarantine reasons), logged to MLflow. Written by the builder and rewritten by `forget`."""

from __future__ import annotations

from collections import Counter

import numpy as np

from magicid.config import Params

QUANTILES = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
RATIO_EDGES = [0.0, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]


def dataset_stats(
    images: list[dict],
    faces: list[dict],
    quarantine: list[dict],
    n_inputs: int,
    params: Params,
    cfg_hash: str,
) -> dict:
    """The content of `stats.json` for these manifest rows.

    Args:
        images, faces, quarantine: the rows of the three manifests.
        n_inputs: inputs of the build (images + quarantine).
        params: `faces.backend` and `data.crop_size` are recorded.
        cfg_hash: the analysis settings' hash (`data.worker.config_hash`): a later build reuses rows only
            under the same hash.
    """
    ratios = np.array([f["face_area_ratio"] for f in faces], dtype=np.float64)
    sides = np.array(
        [min(f["bbox"][2] - f["bbox"][0], f["bbox"][3] - f["bbox"][1]) for f in faces], np.float64
    )
    embedding_dims = {len(f["embedding"]) for f in faces}
    landmark_counts = {len(f["landmarks"]) // 2 for f in faces}

    def q(values: np.ndarray) -> dict[str, float]:
        if values.size == 0:
            return {}
        return {f"p{int(p * 100)}": round(float(np.quantile(values, p)), 6) for p in QUANTILES}

    return {
        "config_hash": cfg_hash,
        "face_backend": params.faces.backend,
        "n_inputs": n_inputs,
        "n_images": len(images),
        "n_faces": len(faces),
        "n_quarantined": len(quarantine),
        "quarantine_reasons": dict(sorted(Counter(r["reason"] for r in quarantine).items())),
        "splits": dict(sorted(Counter(r["split"] for r in images).items())),
        "faces_per_image": {str(k): v for k, v in sorted(Counter(r["n_faces"] for r in images).items())},
        "n_identities": len({f["identity"] for f in faces if f["identity"]}),
        "n_faces_with_identity": sum(1 for f in faces if f["identity"]),
        "n_faces_with_skeleton": sum(1 for f in faces if f["skeleton"] is not None),
        "face_area_ratio": q(ratios),
        "face_area_ratio_histogram": {
            "edges": list(RATIO_EDGES),
            "counts": np.histogram(ratios, bins=RATIO_EDGES)[0].tolist() if ratios.size else [0] * 10,
        },
        "face_side_px": q(sides),
        "embedding_dim": sorted(embedding_dims)[0] if len(embedding_dims) == 1 else sorted(embedding_dims),
        "landmark_count": sorted(landmark_counts)[0]
        if len(landmark_counts) == 1
        else sorted(landmark_counts),
        "crop_size": params.data.crop_size,
    }
