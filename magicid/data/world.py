"""The composite training world: scenes of the dataset's known identities whose boxes, landmarks, condition maps
and identity labels are exact because the scene was composed, not detected (issue 23, item 1).

A scene (`CompositeWorld.sample(index)`) places 1 to 4 (`data.world.faces_min..faces_max`) distinct known
identities at random positions and sizes (face box side `face_scale_min..max` of the image side, drawn
log-uniformly, larger faces placed first; a face's cut-out never covers an earlier face's box) on a background,
each face mirrored at `flip_prob`, with its own brightness/contrast/saturation (`color_jitter`) and a directional
light gradient (`light_jitter`). Backgrounds are photos without people from scikit-image's data set
(`data.world.backgrounds`) and the dataset photos' largest regions clear of every person (`photo_regions`):
cropped (`background_zoom`), flipped and tinted (`background_tint`). What a scene carries:

- the exact face boxes (the source face's detection box, moved with its pixels; the detector's box spans brows
  to chin, so a mesh's forehead points may lie up to ~15 % of the side above it, as in the source photo), its
  478 landmarks and 5 keypoints moved with the face and relabelled when mirrored (`MESH_MIRROR`, `KPS5_MIRROR`),
  the identity labels;
- the reference of each face, as the pipeline is given one: the embedding and zoomed crop of a DIFFERENT face of
  the same person (another photo in the dataset) where one exists, else of the same face;
- the landmark map and the skeleton map, drawn by the project's renderers (`imaging/conditions.py`). A pasted face
  has no body, so its skeleton is the face figure of a pose (points 0-10 from its landmarks: `head_skeleton`),
  which is how a real pose map draws a head and how `boxes_from_skeleton_map` finds faces; no body is invented;
- box masks (`imaging.boxes.box_mask`, as the trainer builds them) and the trainer's caption (`caption_for`).

One compositor: faces are pasted with `imaging.composite.paste` (the sample set's group photos and Clone Face
Tuning use it too) through each face's soft elliptical cut-out (`imaging.composite.face_alpha`), so scenes hold
no square seams to learn. Clone Face samples from the world (`CompositeWorld.clone_sample`) use Clone Face
Tuning's placement rule (`imaging.layout.place_clones`) and the same pasting.

Ingredients are data, so they are part of the IDZoom version (DVC versions them, `validation.py` checks them,
`forget` removes a person's): `build-data` writes them (`data/world_ingredients.py`): `world/cutouts.parquet`
(each identity-labelled face: its crop in `crops/`, its cut-out mask, its geometry in crop pixels),
`world/backgrounds.parquet` and `world/masks/`, `world/backgrounds/`. The real photos stay in the set.

Drawn on the fly, not stored: the world is unbounded (any index >= 0 is a new scene, so a fit never sees a scene
twice), a scene is a pure function of `(seed, index)`, and composing is cheap: measured at 256 px with the default
256-px crops, one thread, 240-350 scenes and ~270 `WorldDataset` items (tensors included) per CPU-second on this
host (110-230 a wall-clock second while it ran other jobs), so a `DataLoader` with a worker or two keeps up with
a tiny-UNet step, and a stored bank would only cost disk and a DVC version per change of a jitter setting.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from magicid.config import CloneFaceParams, Params
from magicid.data import manifest as mf
from magicid.data.world_ingredients import BACKGROUNDS, CUTOUTS
from magicid.errors import DataError
from magicid.imaging.boxes import box_mask
from magicid.imaging.layout import caption_for, check_clone_params, place_clones


@dataclasses.dataclass
class WorldSample:
    """One composed scene (R = resolution, n faces left to right, D = embedding size, C = `model.id_crop_size`).

    Attributes:
        image: uint8 (R, R, 3).
        boxes: float32 (n, 4) exact face boxes x0, y0, x1, y1 (px), inside the image.
        identities: the identity label of each face.
        identity_index: int64 (n,) index into `CompositeWorld.identities`.
        embeddings: float32 (n, D) unit-norm reference embedding per face (another photo of the person where one
            exists, else the pasted face's own).
        crops: uint8 (n, C, C, 3) the reference's zoomed face crop.
        landmarks: float32 (n, N, 2) landmarks moved with each face (N = 478 for the offline backend).
        kps5: float32 (n, 5, 2).
        skeleton_map, landmark_map: uint8 (R, R, 3) condition maps.
        masks: float32 (n, R, R) face-box masks in {0, 1} (`imaging.boxes.box_mask`).
        caption: the trainer's caption for n faces.
        paste_boxes: int64 (n, 4) the squares the face crops were pasted into (may reach past the image).
        face_ids, reference_ids: the pasted face and the reference face per face (faces.parquet ids).
        background_id: the background used.
    """

    image: np.ndarray
    boxes: np.ndarray
    identities: list[str]
    identity_index: np.ndarray
    embeddings: np.ndarray
    crops: np.ndarray
    landmarks: np.ndarray
    kps5: np.ndarray
    skeleton_map: np.ndarray
    landmark_map: np.ndarray
    masks: np.ndarray
    caption: str
    paste_boxes: np.ndarray
    face_ids: list[str]
    reference_ids: list[str]
    background_id: str


@dataclasses.dataclass(frozen=True)
class _Cutout:
    face_id: str
    image_id: str
    identity: str
    crop: np.ndarray  # uint8 (S, S, 3)
    alpha: np.ndarray  # uint8 (S, S)
    extent: tuple[int, int, int, int]  # the alpha's non-zero box (crop px)
    face_box: np.ndarray  # (4,) crop px
    kps5: np.ndarray  # (5, 2) crop px
    landmarks: np.ndarray  # (N, 2) crop px
    # (crop, alpha) halved again and again down to 32 px: a paste resizes from the smallest level not smaller than
    # its box (area resampling of a 256-px crop into a 30-px box reads 70x the pixels it writes)
    levels: tuple[tuple[np.ndarray, np.ndarray], ...] = ()

    def level_for(self, side: int) -> tuple[np.ndarray, np.ndarray]:
        """(crop, alpha) of the smallest level whose side is >= `side` (the full crop when none is)."""
        chosen = (self.crop, self.alpha)
        for crop, alpha in self.levels:
            if crop.shape[0] < side:
                break
            chosen = (crop, alpha)
        return chosen


def _halvings(
    crop: np.ndarray, alpha: np.ndarray, smallest: int = 32
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    import cv2

    levels = []
    while crop.shape[0] // 2 >= smallest:
        half = crop.shape[0] // 2
        crop = cv2.resize(crop, (half, half), interpolation=cv2.INTER_AREA)
        alpha = cv2.resize(alpha, (half, half), interpolation=cv2.INTER_AREA)
        levels.append((crop, alpha))
    return tuple(levels)


@dataclasses.dataclass(frozen=True)
class _Reference:
    face_id: str
    image_id: str
    embedding: np.ndarray  # (D,) float32 unit norm
    crop: np.ndarray  # uint8 (C, C, 3)


@dataclasses.dataclass(frozen=True)
class _Background:
    background_id: str
    pixels: np.ndarray  # uint8 (h, w, 3): the usable region, shorter side at most 2 R


def _read_image(root: Path, relative: str, what: str, mode: str = "RGB") -> np.ndarray:
    """A dataset file named by a world table (relative, inside `root`) as a uint8 array in `mode`, else DataError."""
    path = mf.check_relative(str(relative), root, what)
    if not path.is_file():
        raise DataError(
            f"{path}: {what} is missing; restore it (dvc pull) or rebuild with `magicid build-data`"
        )
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode))
    except (OSError, ValueError) as error:
        raise DataError(
            f"{path}: {what} is unreadable ({error}); rebuild with `magicid build-data`"
        ) from error


class CompositeWorld:
    """Deterministic composite scenes of an IDZoom version's known identities (see the module docstring).

    Args:
        dataset_dir: the IDZoom dataset version (with `world/` written by `build-data`).
        params: `data.world` (scene settings), `model.id_crop_size`, `model.id_embed_dim`.
        resolution: scene side R (px).
        seed: scenes are a function of (seed, index) only.
        splits: use the cut-outs and references of images in these splits (None: all).

    Attributes:
        identities: sorted identity labels.

    Raises:
        DataError: no world tables (an older build), no cut-out or no background, a missing or unreadable
            ingredient file, an embedding of the wrong size, or flips asked for landmarks without a mirror order.
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        params: Params,
        resolution: int,
        seed: int,
        splits: list[str] | None = None,
    ) -> None:
        from magicid.imaging.composite import alpha_extent

        self.root = Path(dataset_dir)
        self.params = params
        self.settings = params.data.world
        self.resolution = int(resolution)
        self.seed = int(seed)
        if self.resolution < 16:
            raise ValueError(f"resolution must be >= 16 px, got {resolution}")
        for name in (CUTOUTS, BACKGROUNDS, mf.FACES):
            if not (self.root / name).is_file():
                raise DataError(
                    f"{self.root / name}: not found; {self.root} has no composite-world ingredients (rebuild it "
                    "with `magicid build-data`, which writes world/)"
                )
        cutouts = mf.read_table(self.root / CUTOUTS)
        backgrounds = mf.read_table(self.root / BACKGROUNDS)
        _, faces = mf.read_manifest(self.root)
        if splits is not None:
            cutouts = cutouts[cutouts["split"].isin(splits)]
            backgrounds = backgrounds[backgrounds["split"].isna() | backgrounds["split"].isin(splits)]
        if cutouts.empty:
            raise DataError(
                f"{self.root / CUTOUTS}: no identity-labelled face{'' if splits is None else f' in splits {splits}'}"
                "; the world needs known people (label faces in the input's identities.json, e.g. "
                "`magicid sample-data`)"
            )
        if backgrounds.empty:
            raise DataError(
                f"{self.root / BACKGROUNDS}: no background; set data.world.backgrounds or photo_regions and rebuild"
            )
        self.identities: list[str] = sorted(set(cutouts["identity"].astype(str)))
        self._cutouts: dict[str, list[_Cutout]] = {name: [] for name in self.identities}
        counts = set()
        for row in cutouts.sort_values("face_id").itertuples(index=False):
            where = f"{self.root / CUTOUTS}: face_id={row.face_id}"
            crop = _read_image(self.root, row.crop_path, f"{where}: crop")
            alpha = _read_image(self.root, row.mask_path, f"{where}: cut-out mask", "L")
            if crop.shape[:2] != alpha.shape or crop.shape[0] != int(row.crop_size):
                raise DataError(
                    f"{where}: crop {crop.shape[1]}x{crop.shape[0]}, mask {alpha.shape[1]}x{alpha.shape[0]} and "
                    f"crop_size {row.crop_size} differ; rebuild with `magicid build-data`"
                )
            landmarks = np.asarray(row.landmarks, np.float32).reshape(-1, 2)
            counts.add(len(landmarks))
            self._cutouts[str(row.identity)].append(
                _Cutout(
                    str(row.face_id),
                    str(row.image_id),
                    str(row.identity),
                    crop,
                    alpha,
                    alpha_extent(alpha),
                    np.asarray(row.face_box, np.float32),
                    np.asarray(row.kps5, np.float32).reshape(5, 2),
                    landmarks,
                    _halvings(crop, alpha),
                )
            )
        if len(counts) != 1:
            raise DataError(f"{self.root / CUTOUTS}: landmark counts differ between faces ({sorted(counts)})")
        self.n_landmarks = counts.pop()
        if self.settings.flip_prob > 0 and self.n_landmarks != 478:
            raise DataError(
                f"data.world.flip_prob={self.settings.flip_prob}: mirroring relabels landmarks by the 478-point "
                f"mesh's mirror order, and this dataset's faces have {self.n_landmarks}; set data.world.flip_prob=0"
            )
        self._references = self._load_references(faces, set(cutouts["image_id"].astype(str)))
        self._backgrounds = [self._load_background(row) for row in backgrounds.itertuples(index=False)]

    def _load_references(self, faces, images_in_use: set[str]) -> dict[str, list[_Reference]]:
        size, dim = self.params.model.id_crop_size, self.params.model.id_embed_dim
        references: dict[str, list[_Reference]] = {name: [] for name in self.identities}
        for row in faces.sort_values("face_id").itertuples(index=False):
            identity = row.identity
            if identity not in references or str(row.image_id) not in images_in_use:
                continue
            embedding = np.asarray(row.embedding, np.float32).reshape(-1)
            if embedding.shape != (dim,) or not np.isfinite(embedding).all():
                raise DataError(
                    f"{self.root / mf.FACES}: face_id={row.face_id}: embedding of shape {embedding.shape}, expected "
                    f"({dim},) (model.id_embed_dim); use the face backend the dataset was built with"
                )
            crop = _read_image(self.root, row.crop_path, f"face_id={row.face_id}: crop")
            if crop.shape[:2] != (size, size):
                crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR))
            embedding = embedding / np.linalg.norm(embedding)
            references[identity].append(_Reference(str(row.face_id), str(row.image_id), embedding, crop))
        return references

    def _load_background(self, row) -> _Background:
        import cv2

        pixels = _read_image(
            self.root, row.path, f"{self.root / BACKGROUNDS}: background {row.background_id}"
        )
        x0, y0, x1, y1 = (int(round(v)) for v in row.region)
        if not (0 <= x0 < x1 <= pixels.shape[1] and 0 <= y0 < y1 <= pixels.shape[0]):
            raise DataError(
                f"{self.root / BACKGROUNDS}: background {row.background_id}: region {list(row.region)} is not inside "
                f"its {pixels.shape[1]}x{pixels.shape[0]} image; rebuild with `magicid build-data`"
            )
        region = pixels[y0:y1, x0:x1]
        shorter, limit = min(region.shape[:2]), 2 * self.resolution
        if shorter > limit:  # crops are drawn at >= background_zoom of the shorter side, then resized to R
            scale = limit / shorter
            size = (max(1, round(region.shape[1] * scale)), max(1, round(region.shape[0] * scale)))
            region = cv2.resize(region, size, interpolation=cv2.INTER_AREA)
        return _Background(str(row.background_id), np.ascontiguousarray(region))

    def __len__(self) -> int:
        """The world is unbounded; `len` is the number of distinct (cut-out, background) pairs, for information."""
        return sum(len(c) for c in self._cutouts.values()) * len(self._backgrounds)

    # -- pieces of a scene ------------------------------------------------------------------------------------
    def _background(self, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        import cv2

        background = self._backgrounds[int(rng.integers(len(self._backgrounds)))]
        height, width = background.pixels.shape[:2]
        shorter = min(height, width)
        side = max(1, int(round(rng.uniform(self.settings.background_zoom, 1.0) * shorter)))
        x0 = int(rng.integers(0, width - side + 1))
        y0 = int(rng.integers(0, height - side + 1))
        crop = background.pixels[y0 : y0 + side, x0 : x0 + side]
        size = self.resolution
        crop = cv2.resize(
            crop, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
        )
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        tint = 1.0 + rng.uniform(-self.settings.background_tint, self.settings.background_tint, size=3)
        table = np.clip(np.rint(np.arange(256)[:, None] * tint[None, :]), 0, 255).astype(np.uint8)  # (256, 3)
        image = cv2.LUT(np.ascontiguousarray(crop), table[None])  # the per-channel gain as a lookup
        return image, background.background_id

    def _jitter_for(self, rng: np.random.Generator):
        """A colour transform drawn from `rng`: brightness, contrast, saturation (`color_jitter`) and a light
        gradient across the face in a random direction (`light_jitter`); uint8 (h, w, 3) -> same."""
        amount, light = self.settings.color_jitter, self.settings.light_jitter
        brightness, contrast, saturation = (float(v) for v in 1.0 + rng.uniform(-amount, amount, size=3))
        angle, strength = float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0, light))

        def jitter(patch: np.ndarray) -> np.ndarray:
            import cv2

            # Saturation (about each pixel's grey), contrast (about the patch's mean grey) and brightness are
            # one affine colour map: p -> contrast * (saturation * p + (1 - saturation) * grey(p)) + offset.
            luma = np.array([0.299, 0.587, 0.114], np.float32)
            mean = float(np.dot(cv2.mean(patch)[:3], luma))
            matrix = contrast * (saturation * np.eye(3, dtype=np.float32) + (1 - saturation) * luma[None, :])
            affine = np.concatenate([matrix, np.full((3, 1), (1 - contrast) * mean, np.float32)], axis=1)
            pixels = cv2.transform(patch.astype(np.float32), affine)
            height, width = patch.shape[:2]
            across = (np.arange(width, dtype=np.float32) + 0.5) / width - 0.5
            down = (np.arange(height, dtype=np.float32) + 0.5) / height - 0.5
            light = brightness * (
                1.0 + strength * (math.cos(angle) * across[None, :] + math.sin(angle) * down[:, None])
            )
            pixels *= light[..., None]
            return np.clip(pixels + 0.5, 0, 255).astype(np.uint8)  # + 0.5, then truncation: rounding

        return jitter

    def _reference(self, cutout: _Cutout, rng: np.random.Generator) -> _Reference:
        """A face of the same person from another photo where there is one, else the pasted face itself."""
        candidates = self._references[cutout.identity]
        others = [ref for ref in candidates if ref.image_id != cutout.image_id]
        if others:
            return others[int(rng.integers(len(others)))]
        own = [ref for ref in candidates if ref.face_id == cutout.face_id]
        if not own:  # pragma: no cover - write_world takes cut-outs from faces.parquet
            raise DataError(
                f"{self.root / mf.FACES}: face_id={cutout.face_id} of the world has no faces.parquet row"
            )
        return own[0]

    def _compose(
        self, items: list[tuple[_Cutout, Any]], background: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, list[dict]]:
        """Paste each (cut-out, placement) in order on `background` (a copy); returns the image and per face its
        box, landmarks and keypoints in image pixels (relabelled where mirrored)."""
        from magicid.imaging.composite import Placement, paste
        from magicid.imaging.mesh_template import KPS5_MIRROR, MESH_MIRROR

        image = np.array(background, copy=True)
        faces = []
        for cutout, placement in items:
            # Pixels from the level nearest the box's size; the same box, so the same mapping of crop points.
            crop, alpha = cutout.level_for(placement.box[2] - placement.box[0])
            level = Placement(placement.box, (crop.shape[1], crop.shape[0]), placement.mirror)
            paste(image, crop, level, alpha, adjust=self._jitter_for(rng))
            landmarks, kps5 = placement.points(cutout.landmarks), placement.points(cutout.kps5)
            if placement.mirror:
                landmarks, kps5 = landmarks[list(MESH_MIRROR)], kps5[list(KPS5_MIRROR)]
            faces.append({"cutout": cutout, "placement": placement, "box": placement.boxes(cutout.face_box)[0],
                          "landmarks": landmarks, "kps5": kps5})  # fmt: skip
        return image, faces

    def _place(self, cutouts: list[_Cutout], rng: np.random.Generator) -> list:
        """Placements for the cut-outs (largest face first): each face box inside the image, no cut-out covering
        an earlier face box. When a face does not fit in 64 tries, all are shrunk by 15 % (never below
        `face_scale_min`) and placed again."""
        from magicid.imaging.composite import Placement, boxes_overlap

        size, settings = self.resolution, self.settings
        low, high = math.log(settings.face_scale_min), math.log(settings.face_scale_max)
        sides = np.exp(rng.uniform(low, high, size=len(cutouts))) * size
        low_px, high_px = settings.face_scale_min * size, settings.face_scale_max * size
        order = np.argsort(-sides, kind="stable")
        mirrors = rng.random(len(cutouts)) < settings.flip_prob
        for _ in range(40):
            placed: list[tuple[int, Placement]] = []
            earlier: list[np.ndarray] = []  # the face boxes placed so far
            for i in order:
                cutout = cutouts[i]
                crop_side = cutout.crop.shape[0]
                face_side = float(np.max(cutout.face_box[2:] - cutout.face_box[:2]))
                # The pasted crop's side in whole pixels, nudged so the face stays within the scale range.
                pasted = max(1, round(crop_side * sides[i] / face_side))
                while pasted > 1 and face_side * pasted / crop_side > high_px:
                    pasted -= 1
                while face_side * pasted / crop_side < low_px:
                    pasted += 1
                at_origin = Placement((0, 0, pasted, pasted), (crop_side, crop_side), bool(mirrors[i]))
                # Face box and cut-out extent with the crop's corner at (0, 0); a placement shifts both.
                face = at_origin.boxes(cutout.face_box)[0].astype(np.float64)
                extent = at_origin.boxes(np.asarray(cutout.extent, np.float32))[0].astype(np.float64)
                lows = np.ceil(-face[:2]).astype(int)  # the face box's left/top >= 0
                highs = np.floor(size - face[2:]).astype(int)  # its right/bottom <= size
                if (highs < lows).any():
                    break
                for _ in range(64):
                    left, top = (
                        int(rng.integers(lows[0], highs[0] + 1)),
                        int(rng.integers(lows[1], highs[1] + 1)),
                    )
                    shift = np.array([left, top, left, top], np.float64)
                    if not any(
                        boxes_overlap(extent + shift, b) or boxes_overlap(face + shift, b) for b in earlier
                    ):
                        side = at_origin.box[2]
                        box = (left, top, left + side, top + side)
                        placed.append((i, Placement(box, (crop_side, crop_side), bool(mirrors[i]))))
                        earlier.append(face + shift)
                        break
                else:
                    break
            if len(placed) == len(cutouts):
                return [(cutouts[i], placement) for i, placement in placed]
            sides = np.maximum(sides * 0.85, settings.face_scale_min * size)
        raise DataError(
            f"composite world: cannot place {len(cutouts)} faces of side >= {settings.face_scale_min} x {size} px "
            f"without overlap on {size}x{size}; lower data.world.face_scale_min or faces_max"
        )

    def _sample(
        self, faces: list[dict], references: list[_Reference], image: np.ndarray, background_id: str
    ) -> WorldSample:
        """Faces sorted left to right, condition maps, masks and caption: the scene as a `WorldSample`."""
        from magicid.imaging.conditions import head_skeleton, render_landmark_map, render_skeleton_map

        size = self.resolution
        order = sorted(range(len(faces)), key=lambda i: float(faces[i]["box"][0] + faces[i]["box"][2]))
        faces = [faces[i] for i in order]
        references = [references[i] for i in order]
        boxes = np.stack([f["box"] for f in faces]).astype(np.float32)
        landmarks = np.stack([f["landmarks"] for f in faces]).astype(np.float32)
        kps5 = np.stack([f["kps5"] for f in faces]).astype(np.float32)
        identities = [f["cutout"].identity for f in faces]
        return WorldSample(
            image=image,
            boxes=boxes,
            identities=identities,
            identity_index=np.array([self.identities.index(name) for name in identities], np.int64),
            embeddings=np.stack([ref.embedding for ref in references]).astype(np.float32),
            crops=np.stack([ref.crop for ref in references]),
            landmarks=landmarks,
            kps5=kps5,
            skeleton_map=render_skeleton_map(
                size, size, [head_skeleton(lm, k) for lm, k in zip(landmarks, kps5, strict=True)]
            ),
            landmark_map=render_landmark_map(size, size, list(landmarks)),
            masks=np.stack([box_mask(box, size) for box in boxes]),
            caption=caption_for(len(faces)),
            paste_boxes=np.array([f["placement"].box for f in faces], np.int64),
            face_ids=[f["cutout"].face_id for f in faces],
            reference_ids=[ref.face_id for ref in references],
            background_id=background_id,
        )

    # -- public -----------------------------------------------------------------------------------------------
    def sample(self, index: int) -> WorldSample:
        """Scene `index` (any int >= 0): a pure function of (seed, index), the same bytes on every call."""
        if int(index) < 0:
            raise ValueError(f"world index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, int(index), 0])
        settings = self.settings
        n_max = min(settings.faces_max, len(self.identities))
        n = int(rng.integers(min(settings.faces_min, n_max), n_max + 1))
        chosen = rng.choice(len(self.identities), size=n, replace=False)
        cutouts = []
        for k in chosen:
            options = self._cutouts[self.identities[int(k)]]
            cutouts.append(options[int(rng.integers(len(options)))])
        background, background_id = self._background(rng)
        items = self._place(cutouts, rng)
        references = [self._reference(cutout, rng) for cutout, _ in items]
        image, faces = self._compose(items, background, rng)
        return self._sample(faces, references, image, background_id)

    def clone_sample(self, index: int, clone: CloneFaceParams) -> WorldSample:
        """A Clone Face Tuning scene: one identity's face crop pasted k times (`train.clone_face`: k range, crop
        side range), at `imaging.layout.place_clones`' non-overlapping squares, through its cut-out; a pure function
        of (seed, index, clone settings)."""
        from magicid.imaging.composite import Placement

        if int(index) < 0:
            raise ValueError(f"world index must be >= 0, got {index}")
        check_clone_params(clone)
        rng = np.random.default_rng([self.seed, int(index), 1])
        identity = self.identities[int(rng.integers(len(self.identities)))]
        options = self._cutouts[identity]
        cutout = options[int(rng.integers(len(options)))]
        reference = self._reference(cutout, rng)
        background, background_id = self._background(rng)
        k = int(rng.integers(clone.k_min, clone.k_max + 1))
        squares = place_clones(self.resolution, k, clone.scale_min, clone.scale_max, rng)
        side = cutout.crop.shape[0]
        mirrors = rng.random(k) < self.settings.flip_prob
        items = [(cutout, Placement(tuple(int(v) for v in square), (side, side), bool(mirror)))
                 for square, mirror in zip(squares, mirrors, strict=True)]  # fmt: skip
        image, faces = self._compose(items, background, rng)
        return self._sample(faces, [reference] * k, image, background_id)
