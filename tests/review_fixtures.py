"""A small generation set for the review tests: PIL-drawn images, reference faces and a manifest.

`build_generation_set(root)` writes, per model version, one generation per case (prompt, seed,
identities) with its pre-DIIR image and face boxes, the shared reference faces, a `manifest.jsonl`, and a
reviewers file with two reviewers (passwords in `PASSWORDS`).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from magicid.reviews import add_reviewer, write_generation_manifest

PASSWORDS = {"alice": "alice-secret-1", "bob": "bob-secret-22"}
IDENTITY_COLOURS = {"ada": (200, 150, 120), "ben": (120, 90, 70), "cy": (230, 190, 160)}
# (prompt, seed, identities): every version generates each case, so each case is one blind pair.
CASES = [
    ("a photo of ada smiling", 0, ["ada"]),
    ("ada and ben at the beach", 1, ["ada", "ben"]),
    ("a group photo of ada, ben and cy", 2, ["ada", "ben", "cy"]),
]
SIZE = 160


def _face_image(colour, size=64) -> Image.Image:
    image = Image.new("RGB", (size, size), (40, 40, 60))
    draw = ImageDraw.Draw(image)
    u = size / 64  # features drawn on a 64-pixel grid, scaled
    draw.ellipse([8 * u, 4 * u, size - 8 * u, size - 4 * u], fill=colour)
    draw.ellipse([20 * u, 22 * u, 26 * u, 28 * u], fill=(20, 20, 20))
    draw.ellipse([size - 26 * u, 22 * u, size - 20 * u, 28 * u], fill=(20, 20, 20))
    draw.arc(
        [20 * u, 30 * u, size - 20 * u, size - 14 * u],
        20,
        160,
        fill=(120, 30, 30),
        width=max(1, round(3 * u)),
    )
    return image


def build_generation_set(root: Path, versions=("1", "2"), reviewers=("alice", "bob")) -> dict:
    """Write the set under `root`; returns {"generations_dir", "reviewers_file", "records"}."""
    generations = root / "generations"
    refs = generations / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    for name, colour in IDENTITY_COLOURS.items():
        _face_image(colour).save(refs / f"{name}.png")
    records = []
    for v_index, version in enumerate(versions):
        folder = generations / f"v{version}"
        folder.mkdir(parents=True, exist_ok=True)
        for case_index, (prompt, seed, people) in enumerate(CASES):
            background = (60 + 40 * v_index, 90 + 20 * case_index, 140)
            image = Image.new("RGB", (SIZE, SIZE), background)
            boxes = []
            side = SIZE // (len(people) + 1)
            for k, person in enumerate(people):
                x0 = 8 + k * (side + 8)
                y0 = 40
                face = _face_image(IDENTITY_COLOURS[person], size=side)
                image.paste(face, (x0, y0))
                boxes.append([x0, y0, x0 + side, y0 + side])
            stem = f"case{case_index}"
            image.save(folder / f"{stem}.png")
            image.filter(ImageFilter.GaussianBlur(3)).save(folder / f"{stem}_raw.png")
            records.append(
                {
                    "generation_id": f"v{version}-{stem}",
                    "model_version": version,
                    "prompt": prompt,
                    "seed": seed,
                    # Same strings for every version: the case id is derived from them.
                    "reference_paths": [f"refs/{person}.png" for person in people],
                    "boxes": boxes,
                    "image_path": f"v{version}/{stem}.png",
                    "pre_diir_path": f"v{version}/{stem}_raw.png",
                }
            )
    write_generation_manifest(generations, records)
    reviewers_file = root / "reviewers.yaml"
    for name in reviewers:
        add_reviewer(reviewers_file, name, PASSWORDS[name])
    return {"generations_dir": generations, "reviewers_file": reviewers_file, "records": records}
