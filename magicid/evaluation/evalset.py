"""Evaluation sets from an IDZoom dataset version (DESIGN §5): references, prompts, layouts, slices.

An item is one image to generate: a prompt, a seed, n reference identities (n in `eval.n_people`, 1, 2 and 4
by default) and a layout placing their faces in boxes of one face-size slice (`eval.face_sizes`: small,
medium, large, as a fraction of the image side). The references come from the faces of the split named by
`eval.reference_split` (one face per identity: its largest); each face's conditioning landmarks are the
reference's own dataset landmarks mapped into its layout box, and its eye centres (from `kps5`) normalise
the landmark error.

Layouts are drawn from a generator seeded by the eval seeds, the number of people and the slice, not from the
dataset's images, and the prompts are `eval.prompts`: so the set uses seeds, layouts and prompts the model was
not trained on. Whether its people were seen in training is measured and reported (`references_seen_in_training`):
the sample world has no held-out people, so there it is true and the report says so.

Every item has a stable id (hash of what defines it), and the set an id (hash of its items and the dataset
version), which the registry uses to pair two models' scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from magicid.config import Params
from magicid.errors import DataError


class EvalSetError(DataError):
    """The dataset cannot supply the evaluation set asked for (too few identities, empty split)."""


@dataclasses.dataclass(frozen=True)
class Reference:
    """One reference identity: a face of the dataset.

    Attributes:
        face_id, identity: the dataset face and its identity label (the face id when unlabelled).
        crop_path: absolute path of its zoomed crop (the reference image given to the model).
        embedding: (D,) float32 L2-normalised dataset embedding (`faces.backend` of the build).
        landmarks: (N, 2) float32 landmarks relative to its box: (p - (x0, y0)) / box side.
        eyes: (2, 2) float32 its eye centres (kps5[0], kps5[1]), relative like `landmarks`.
    """

    face_id: str
    identity: str
    crop_path: str
    embedding: np.ndarray
    landmarks: np.ndarray
    eyes: np.ndarray


@dataclasses.dataclass
class EvalItem:
    """One image to generate and score.

    Attributes:
        item_id: stable id (16 hex digits).
        prompt, seed: text and generation seed.
        n_people: number of identities; face_size: slice name (small | medium | large).
        layout_id: the items sharing a layout (same references and boxes) are generated in one batch.
        references: face ids of the references, in box order.
        boxes: (n, 4) layout boxes `x0, y0, x1, y1` in output pixels.
        landmarks: n (N, 2) conditioning landmarks in output pixels; eyes: (n, 2, 2) eye centres.
    """

    item_id: str
    prompt: str
    seed: int
    n_people: int
    face_size: str
    layout_id: str
    references: list[str]
    boxes: np.ndarray
    landmarks: list[np.ndarray]
    eyes: np.ndarray

    def manifest_row(self) -> dict:
        return {
            "item_id": self.item_id,
            "prompt": self.prompt,
            "seed": self.seed,
            "n_people": self.n_people,
            "face_size": self.face_size,
            "layout_id": self.layout_id,
            "references": list(self.references),
            "boxes": np.round(self.boxes, 2).tolist(),
        }


@dataclasses.dataclass
class EvalSet:
    """Items, their references, and what the report must say about them."""

    set_id: str
    dataset_dir: str
    dataset_version: str
    resolution: int
    reference_split: str
    items: list[EvalItem]
    references: dict[str, Reference]
    references_seen_in_training: bool
    notes: list[str]

    def items_frame(self) -> pd.DataFrame:
        return pd.DataFrame([item.manifest_row() for item in self.items])


def _stable_id(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _references(faces: pd.DataFrame, root: Path) -> dict[str, Reference]:
    """One reference per identity (its largest face), ordered by identity."""
    faces = faces.assign(identity=faces["identity"].fillna(faces["face_id"]))
    faces = faces.sort_values(["identity", "face_area_ratio", "face_id"], ascending=[True, False, True])
    refs = {}
    for _, row in faces.drop_duplicates("identity").iterrows():
        x0, y0, x1, y1 = (float(v) for v in row["bbox"])
        side = max(x1 - x0, y1 - y0)
        origin = np.array([x0, y0], np.float32)
        landmarks = (np.asarray(row["landmarks"], np.float32) - origin) / side
        kps = np.asarray(row["kps5"], np.float32).reshape(5, 2)
        refs[row["identity"]] = Reference(
            face_id=str(row["face_id"]),
            identity=str(row["identity"]),
            crop_path=str(root / row["crop_path"]),
            embedding=np.asarray(row["embedding"], np.float32),
            landmarks=landmarks,
            eyes=(kps[:2] - origin) / side,
        )
    return refs


def _layout(n: int, side_fraction: float, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """n square boxes of side `side_fraction * resolution`, one per cell of a near-square grid, jittered.

    Raises:
        EvalSetError: the boxes do not fit their cells.
    """
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cell_w, cell_h = resolution / cols, resolution / rows
    side = side_fraction * resolution
    if side > min(cell_w, cell_h):
        raise EvalSetError(
            f"eval.face_sizes: a face of {side_fraction:g} x the side does not fit {n} people in a "
            f"{rows}x{cols} grid; lower it below {min(cell_w, cell_h) / resolution:.2f}"
        )
    boxes = []
    for k in range(n):
        r, c = divmod(k, cols)
        x0 = c * cell_w + rng.uniform(0, cell_w - side)
        y0 = r * cell_h + rng.uniform(0, cell_h - side)
        boxes.append([x0, y0, x0 + side, y0 + side])
    return np.asarray(boxes, np.float32)


def build_eval_set(dataset_dir: str | Path, params: Params) -> EvalSet:
    """The evaluation set of `params.eval` over a dataset version.

    Args:
        dataset_dir: an IDZoom dataset version directory (DESIGN §2).
        params: `eval` (prompts, seeds, n_people, face sizes, reference split), `model.resolution`, `seed`.

    Returns:
        `EvalSet` with len(n_people) x len(face_sizes) layouts x len(seeds) items.

    Raises:
        EvalSetError: the reference split has fewer identities than the largest group asked for.
    """
    from magicid.data.manifest import read_manifest
    from magicid.data.version import dataset_version

    cfg = params.eval
    root = Path(dataset_dir)
    images, faces = read_manifest(root)
    faces = faces.merge(images[["image_id", "split"]], on="image_id")
    pool = faces[faces["split"] == cfg.reference_split]
    refs = _references(pool, root) if len(pool) else {}
    if len(refs) < max(cfg.n_people):
        raise EvalSetError(
            f"{root}: split {cfg.reference_split!r} has {len(refs)} identities, eval.n_people asks for up to "
            f"{max(cfg.n_people)}; set eval.reference_split to a split with more people or lower eval.n_people"
        )
    train_identities = set(faces.loc[faces["split"] == "train", "identity"].dropna())
    seen = any(ref.identity in train_identities for ref in refs.values())
    labelled = set(pool["identity"].dropna())
    unlabelled = sum(ref.identity not in labelled for ref in refs.values())
    version, _ = dataset_version(root)
    resolution = params.model.resolution
    names = sorted(refs)
    items: list[EvalItem] = []
    sizes = cfg.face_sizes.model_dump()
    for n in cfg.n_people:
        for size_index, (size_name, fraction) in enumerate(sizes.items()):
            # Layout and people depend on (seed, n, slice) only: the eval seeds vary the noise within a layout.
            rng = np.random.default_rng([params.seed, n, size_index, 1729])
            chosen = [names[i] for i in rng.choice(len(names), size=n, replace=False)]
            boxes = _layout(n, fraction, resolution, rng)
            landmarks, eyes = [], []
            for name, box in zip(chosen, boxes, strict=True):
                side, origin = box[2] - box[0], box[:2]
                landmarks.append(refs[name].landmarks * side + origin)
                eyes.append(refs[name].eyes * side + origin)
            layout_id = _stable_id(version, resolution, n, size_name, chosen, boxes.round(2).tolist())
            for seed in cfg.seeds:
                prompt = cfg.prompts[len(items) % cfg.n_prompts]
                item_id = _stable_id(layout_id, prompt, seed)
                items.append(
                    EvalItem(
                        item_id,
                        prompt,
                        int(seed),
                        n,
                        size_name,
                        layout_id,
                        [refs[c].face_id for c in chosen],
                        boxes,
                        landmarks,
                        np.stack(eyes),
                    )  # fmt: skip
                )
    notes = [
        f"references: one face per identity from split {cfg.reference_split!r} of dataset version {version}",
        "seeds, layouts and prompts are the evaluation's own (not drawn from the training images)",
    ]
    if unlabelled:
        notes.append(
            f"{unlabelled} of {len(refs)} reference faces have no identity label: each counts as its own "
            "person, and whether that person also appears in training is unknown"
        )
    if seen:
        notes.append(
            "the reference people also appear in the training split (the sample world has no held-out "
            "people): identity figures measure fidelity to seen people, not generalisation to new ones"
        )
    set_id = _stable_id(version, [item.item_id for item in items])
    by_face = {ref.face_id: ref for ref in refs.values()}
    return EvalSet(set_id, str(root), version, resolution, cfg.reference_split, items, by_face, seen, notes)
