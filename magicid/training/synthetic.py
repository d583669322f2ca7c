"""A synthetic IDZoom dataset version (DESIGN §2 layout) for tests and benchmarks of the training code.

Real versions come from `magicid build-data` (face detection on photographs, seconds per image). Training
tests and `benchmarks/bench_train.py` only need the directory contract, so this writes it directly from a seed:
smooth random backgrounds with one to three flat-coloured "faces" (ellipses), per-identity unit embeddings,
skeleton/landmark maps drawn at the faces, zoomed crops (`magicid.imaging.crops.zoom_crop`), and the composite
world's ingredients (`world/`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from magicid.config import load_params
from magicid.data.manifest import FACES_SCHEMA, IMAGES_SCHEMA, QUARANTINE_SCHEMA, write_table
from magicid.data.world_ingredients import write_world
from magicid.imaging.crops import zoom_crop

N_LANDMARKS = 68  # any fixed N works for training; the offline backend writes 478


def write_synthetic_idzoom(
    root: str | Path,
    n_images: int = 4,
    embed_dim: int = 128,
    crop_size: int = 64,
    crop_margin: float = 0.4,
    sizes: tuple[tuple[int, int], ...] = ((160, 128), (128, 128), (96, 144)),
    seed: int = 0,
    n_val: int = 0,
) -> Path:
    """Write a DESIGN §2 dataset version with `n_images` images (1-3 faces each) under `root`.

    Args:
        root: output directory (created).
        n_images: number of images in split `train`.
        embed_dim: embedding size D (match `model.id_embed_dim`).
        crop_size: side of the zoomed crops.
        crop_margin: crop margin (as `data.crop_margin`).
        sizes: image (width, height) sizes, cycled.
        seed: the only source of randomness.
        n_val: further images in split `val` (drawn after the train images: those do not change).

    Returns:
        `root`.
    """
    root = Path(root)
    for sub in ("images", "conditions", "crops"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_identities = 3
    identity_colours = rng.integers(40, 255, size=(n_identities, 3))
    identity_embeddings = rng.normal(size=(n_identities, embed_dim)).astype(np.float32)
    identity_embeddings /= np.linalg.norm(identity_embeddings, axis=1, keepdims=True)
    image_rows, face_rows = [], []
    for index in range(n_images + n_val):
        width, height = sizes[index % len(sizes)]
        coarse = rng.integers(0, 255, size=(3, 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        skeleton = Image.new("RGB", (width, height))
        landmark = Image.new("RGB", (width, height))
        n_faces = 1 + index % 3
        slot = width / n_faces
        faces = []
        for person in range(n_faces):
            side = float(rng.uniform(0.35, 0.7) * min(slot, height / 2))
            x0 = person * slot + float(rng.uniform(0, slot - side))
            y0 = float(rng.uniform(0, height / 2 - side))
            bbox = np.array([x0, y0, x0 + side, y0 + side], dtype=np.float32)
            identity = int((index + person) % n_identities)
            draw.ellipse(bbox.tolist(), fill=tuple(int(c) for c in identity_colours[identity]))
            cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
            ImageDraw.Draw(skeleton).line(
                [(cx, bbox[3]), (cx, min(height - 1, bbox[3] + 2 * side))], fill=(255, 0, 0), width=2
            )
            angles = np.linspace(0, 2 * np.pi, N_LANDMARKS, endpoint=False)
            points = np.stack([cx + 0.4 * side * np.cos(angles), cy + 0.45 * side * np.sin(angles)], axis=1)
            ImageDraw.Draw(landmark).point([tuple(p) for p in points], fill=(255, 255, 255))
            faces.append((person, bbox, identity, points.astype(np.float32)))
        pixels = np.asarray(image)
        image_id = hashlib.sha256(pixels.tobytes()).hexdigest()[:16]
        rel = f"images/{image_id}.png"
        image.save(root / rel)
        skeleton.save(root / f"conditions/{image_id}_skeleton.png")
        landmark.save(root / f"conditions/{image_id}_landmark.png")
        image_rows.append(
            dict(
                image_id=image_id,
                path=rel,
                width=width,
                height=height,
                n_faces=n_faces,
                source=f"synthetic/{index}.png",
                split="train" if index < n_images else "val",
            )
        )
        for person, bbox, identity, points in faces:
            face_id = f"{image_id}_{person:02d}"
            crop, _ = zoom_crop(pixels, bbox, crop_size, crop_margin)
            Image.fromarray(crop).save(root / f"crops/{face_id}.png")
            cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
            s = bbox[2] - bbox[0]
            kps5 = np.array(
                [
                    [cx - s / 5, cy - s / 8],
                    [cx + s / 5, cy - s / 8],
                    [cx, cy],
                    [cx - s / 6, cy + s / 5],
                    [cx + s / 6, cy + s / 5],
                ],
                dtype=np.float32,
            )
            face_rows.append(
                dict(
                    face_id=face_id,
                    image_id=image_id,
                    person_idx=person,
                    bbox=bbox.tolist(),
                    det_score=1.0,
                    kps5=kps5.ravel().tolist(),
                    landmarks=points.ravel().tolist(),
                    embedding=identity_embeddings[identity].tolist(),
                    face_area_ratio=float(s * s / (width * height)),
                    crop_path=f"crops/{face_id}.png",
                    identity=f"synthetic-{identity}",
                    skeleton=None,
                )
            )
    write_table(image_rows, IMAGES_SCHEMA, root / "images.parquet")
    write_table(face_rows, FACES_SCHEMA, root / "faces.parquet")
    write_table([], QUARANTINE_SCHEMA, root / "quarantine.parquet")
    # The composite world's ingredients, part of every version (`data/world_ingredients.py`): the faces'
    # cut-outs and one small package background (68-point landmarks: draw scenes with data.world.flip_prob=0).
    world_params = load_params(None, [f"data.crop_margin={crop_margin}", "data.world.backgrounds=[moon]"])
    write_world(root, image_rows, face_rows, world_params)
    stats = {"n_images": len(image_rows), "n_faces": len(face_rows), "n_quarantined": 0}
    (root / "stats.json").write_text(json.dumps(stats, indent=2))
    return root
