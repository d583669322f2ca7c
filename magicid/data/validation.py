"""IDZoom validation: a Great Expectations 1.x suite per manifest, run together as one checkpoint.

Checks (DESIGN.md §2): required columns present and typed; ids unique; faces -> images integrity; boxes
well formed and inside their image; keypoints inside their box; embeddings finite and unit-norm with one
dimension; landmarks finite; face_area_ratio in (0, 1]; files referenced by the manifests exist and lie
inside the dataset root; n_faces agrees with faces.parquet; quarantine reasons known and disjoint from images;
every file under the dataset is referenced (manifests, stats, the builder's ledger, `forgotten.json`, and the
images, crops and condition maps the manifests name): a leftover of an interrupted build or erasure (the journal
of `forget` included) fails.
The composite world's ingredients (`world/`, `data/world_ingredients.py`): each cut-out a known labelled face
whose crop and mask exist at its size and whose geometry agrees with faces.parquet; backgrounds exist, with
their regions inside them, and at least one when there are cut-outs.

Row-wise geometry cannot be expressed on list columns in GE's pandas engine (`UnexpectedRowsExpectation` has
no pandas provider), so derived columns (`bbox_inside_image`, `kps_inside_box`, `embedding_norm`, ...) are
computed first and the expectations run on them. The context is ephemeral (nothing written into the dataset,
which is a DVC output); data docs go to `<report_dir>/data_docs/`, a JSON summary to
`<report_dir>/validation.json`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from magicid.data import manifest as mf
from magicid.data import world_ingredients as wi
from magicid.errors import DataError, ValidationFailed
from magicid.utils import atomic_write_text

STRING_TYPES = ["str", "string", "object", "StringDtype"]
INT_TYPES = ["int32", "int64", "Int32", "Int64"]
FLOAT_TYPES = ["float32", "float64"]
PIXEL_TOLERANCE = 0.5  # px: boxes and keypoints may touch the border within rounding
NORM_TOLERANCE = 1e-3
GEOMETRY_TOLERANCE = (
    0.05  # px: a cut-out's geometry is faces.parquet's mapped into its crop (float32 storage)
)


@dataclass
class ValidationReport:
    """Outcome of `validate_idzoom`."""

    success: bool
    n_expectations: int
    n_failed: int
    failures: list[str] = field(default_factory=list)
    docs_path: str = ""
    summary_path: str = ""

    def summary(self) -> str:
        head = f"{'PASSED' if self.success else 'FAILED'}: {self.n_expectations - self.n_failed}/{self.n_expectations} expectations met"
        lines = [head, *[f"  - {failure}" for failure in self.failures]]
        lines.append(f"data docs: {self.docs_path}")
        return "\n".join(lines)


def _safe_path(value) -> bool:
    if not isinstance(value, str) or not value:
        return False
    pure = PurePosixPath(value)
    return not pure.is_absolute() and ".." not in pure.parts and "\\" not in value


def _file_inside(root: Path, relative: str) -> bool:
    """True when `root/relative` is a regular file whose real path (symlinks resolved) lies inside `root`:
    a crop that is a symlink to `/etc/passwd` or to another dataset does not count as present."""
    path = root / relative
    try:
        real, real_root = path.resolve(strict=True), root.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        return False
    return real_root in real.parents and real.is_file()


def dataset_files(root: Path) -> list[str]:
    """Every entry under `root` that is not a folder (files, symlinks, special files; a symlinked folder
    counts as one entry and is not entered), relative posix paths, sorted."""
    found = []
    for folder, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(folder)
        linked = [name for name in dirnames if (base / name).is_symlink()]
        for name in [*filenames, *linked]:
            found.append((base / name).relative_to(root).as_posix())
    return sorted(found)


def referenced_files(images: pd.DataFrame, faces: pd.DataFrame) -> set[str]:
    """The files a dataset version consists of: its manifests, stats and bookkeeping (`build_files.json`,
    `forgotten.json`), and what the manifests name (images, crops, and each image's two condition maps)."""
    names = {mf.IMAGES, mf.FACES, mf.QUARANTINE, mf.STATS, mf.LEDGER, mf.FORGOTTEN}
    if "path" in images:
        names.update(p for p in images["path"] if isinstance(p, str))
    if "image_id" in images:
        names.update(
            f"{mf.CONDITIONS_DIR}/{image_id}_{kind}.png"
            for image_id in images["image_id"]
            if isinstance(image_id, str)
            for kind in ("skeleton", "landmark")
        )
    if "crop_path" in faces:
        names.update(p for p in faces["crop_path"] if isinstance(p, str))
    return names


def _type_family(arrow_type) -> str:
    import pyarrow as pa

    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "string"
    if pa.types.is_integer(arrow_type):
        return "integer"
    if pa.types.is_floating(arrow_type):
        return "float"
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        value = _type_family(arrow_type.value_type)
        return f"list<{value}>" if value != "integer" else "list<float>"  # integer lists read as floats
    if pa.types.is_null(arrow_type):
        return "null"  # an all-null column (e.g. no identities known) carries no type
    return str(arrow_type)


def check_column_types(root: Path) -> None:
    """Each manifest column the contract defines has the contract's type family (string, integer, float,
    list<float>), read from the Parquet schema before any value is interpreted.

    Raises:
        ValidationFailed: naming the file, the column, its type and the expected one.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    problems = []
    for name, schema in (
        (mf.IMAGES, mf.IMAGES_SCHEMA),
        (mf.FACES, mf.FACES_SCHEMA),
        (mf.QUARANTINE, mf.QUARANTINE_SCHEMA),
        (wi.CUTOUTS, wi.CUTOUTS_SCHEMA),
        (wi.BACKGROUNDS, wi.BACKGROUNDS_SCHEMA),
    ):
        path = root / name
        if not path.is_file():
            continue  # reported as missing by the reader
        try:
            found = pq.read_schema(path)
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"{path}: not a readable Parquet file: {error}") from error
        for column in schema:
            if column.name not in found.names:
                continue  # a missing column is the suite's "required columns" expectation
            got, want = _type_family(found.field(column.name).type), _type_family(column.type)
            if got not in (want, "null"):
                problems.append(
                    f"{name} column {column.name!r} has type {found.field(column.name).type} ({got}), expected {want}"
                )
    if problems:
        raise ValidationFailed(
            f"{root}: IDZoom validation FAILED: "
            + "; ".join(problems)
            + " (rebuild with `magicid build-data`)"
        )


def _array(value, length: int | None = None) -> np.ndarray | None:
    if value is None:
        return None
    array = np.asarray(value, dtype=np.float64).reshape(-1)
    return array if length is None or array.size == length else None


def derive_frames(root: Path) -> dict[str, pd.DataFrame]:
    """The three manifests and the world's two tables, plus the derived check columns the suite expects on.

    Raises:
        DataError: a manifest is missing or unreadable.
    """
    check_column_types(root)
    images = mf.read_table(root / mf.IMAGES)
    faces = mf.read_table(root / mf.FACES)
    quarantine = mf.read_table(root / mf.QUARANTINE)

    images = images.copy()
    if {"path", "image_id", "width", "height", "n_faces"} <= set(images.columns):
        images["path_is_safe"] = images["path"].map(_safe_path)
        images["file_exists"] = [
            bool(safe) and _file_inside(root, p)
            for p, safe in zip(images["path"], images["path_is_safe"], strict=True)
        ]
        counts = faces["image_id"].value_counts() if "image_id" in faces else pd.Series(dtype="int64")
        images["n_faces_matches"] = [
            int(counts.get(i, 0)) == int(n)
            for i, n in zip(images["image_id"], images["n_faces"], strict=True)
        ]

    faces = faces.copy()
    needed = {"image_id", "bbox", "kps5", "embedding", "landmarks", "crop_path"}
    if needed <= set(faces.columns) and {"image_id", "width", "height"} <= set(images.columns):
        sizes = images.drop_duplicates("image_id").set_index("image_id")[["width", "height"]]
        faces["image_id_known"] = faces["image_id"].isin(sizes.index)
        inside, well_formed, kps_inside, norms, emb_finite, emb_dim, lm_finite = [], [], [], [], [], [], []
        for row in faces.itertuples(index=False):
            box = _array(row.bbox, 4)
            kps = _array(row.kps5, 10)
            emb = _array(row.embedding)
            lms = _array(row.landmarks)
            formed = box is not None and bool(np.isfinite(box).all()) and box[0] < box[2] and box[1] < box[3]
            well_formed.append(formed)
            if formed and row.image_id in sizes.index:
                w, h = sizes.loc[row.image_id]
                tol = PIXEL_TOLERANCE
                inside.append(
                    bool(box[0] >= -tol and box[1] >= -tol and box[2] <= w + tol and box[3] <= h + tol)
                )
            else:
                inside.append(False)
            if formed and kps is not None and np.isfinite(kps).all():
                xy = kps.reshape(5, 2)
                tol = PIXEL_TOLERANCE
                kps_inside.append(
                    bool(
                        (
                            (xy[:, 0] >= box[0] - tol)
                            & (xy[:, 0] <= box[2] + tol)
                            & (xy[:, 1] >= box[1] - tol)
                            & (xy[:, 1] <= box[3] + tol)
                        ).all()
                    )
                )
            else:
                kps_inside.append(False)
            finite = emb is not None and emb.size > 0 and bool(np.isfinite(emb).all())
            emb_finite.append(finite)
            norms.append(float(np.linalg.norm(emb)) if finite else float("nan"))
            emb_dim.append(int(emb.size) if emb is not None else 0)
            lm_finite.append(
                lms is not None and lms.size > 0 and lms.size % 2 == 0 and bool(np.isfinite(lms).all())
            )
        faces["bbox_well_formed"] = well_formed
        faces["bbox_inside_image"] = inside
        faces["kps_inside_box"] = kps_inside
        faces["embedding_finite"] = emb_finite
        faces["embedding_norm"] = pd.Series(norms, index=faces.index, dtype="float64")
        faces["embedding_dim"] = pd.Series(emb_dim, index=faces.index, dtype="int64")
        faces["landmarks_finite"] = lm_finite
        faces["crop_path_is_safe"] = faces["crop_path"].map(_safe_path)
        faces["crop_exists"] = [
            bool(safe) and _file_inside(root, p)
            for p, safe in zip(faces["crop_path"], faces["crop_path_is_safe"], strict=True)
        ]

    quarantine = quarantine.copy()
    if "source" in quarantine and "source" in images:
        quarantine["source_in_images"] = quarantine["source"].isin(images["source"]).astype(bool)
    listed = dataset_files(root)
    referenced = referenced_files(images, faces) | wi.world_files(root) | {wi.CUTOUTS, wi.BACKGROUNDS}
    files = pd.DataFrame(
        {"path": listed, "unreferenced_path": [None if name in referenced else name for name in listed]},
        dtype=object,
    )
    cutouts, backgrounds = _world_frames(root, images, faces)
    frames = {"images": images, "faces": faces, "quarantine": quarantine, "files": files,
              "world_cutouts": cutouts, "world_backgrounds": backgrounds}  # fmt: skip
    for frame in frames.values():
        # pandas 3 reads Parquet strings as dtype `str`, which GE's type expectations do not recognise;
        # as object columns GE checks each value's Python type (`str`) instead.
        for column in frame.columns:
            if pd.api.types.is_string_dtype(frame[column].dtype) and frame[column].dtype != object:
                frame[column] = frame[column].astype(object)
    return frames


def _image_size(root: Path, relative) -> tuple[int, int] | None:
    """(width, height) of a dataset file read from its header, or None when it is unsafe, missing or unreadable."""
    from PIL import Image

    if not _safe_path(relative) or not _file_inside(root, relative):
        return None
    try:
        with Image.open(root / relative) as image:
            return image.size
    except (OSError, ValueError):
        return None


def _world_frames(root: Path, images: pd.DataFrame, faces: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The composite world's tables (`world_ingredients.py`) with derived check columns: every cut-out is a
    known, identity-labelled face whose crop and mask exist, have its `crop_size` and agree with faces.parquet
    (its face box and landmarks, mapped into the crop, are the manifest's); every background file exists and
    its region lies inside it.

    Raises:
        DataError: a world table is missing (a build from before the world: rebuild) or unreadable.
    """
    cutouts = mf.read_table(root / wi.CUTOUTS).copy()
    backgrounds = mf.read_table(root / wi.BACKGROUNDS).copy()
    cutout_columns = set(wi.CUTOUTS_SCHEMA.names) - {"split", "image_id"}
    if cutout_columns <= set(cutouts.columns) and {"face_id", "bbox", "landmarks"} <= set(faces.columns):
        known = faces.drop_duplicates("face_id").set_index("face_id")
        face_known, identity_matches, crop_ok, mask_ok, inside, kps_inside, finite, agrees = (
            [] for _ in range(8)
        )
        for row in cutouts.itertuples(index=False):
            face = known.loc[row.face_id] if row.face_id in known.index else None
            face_known.append(face is not None)
            identity_matches.append(
                face is not None and row.identity is not None and face["identity"] == row.identity
            )
            crop_size = _image_size(root, row.crop_path)
            mask_size = _image_size(root, row.mask_path)
            crop_ok.append(crop_size == (row.crop_size, row.crop_size))
            mask_ok.append(mask_size == (row.crop_size, row.crop_size))
            box, crop_box = _array(row.face_box, 4), _array(row.crop_box, 4)
            kps, lms = _array(row.kps5, 10), _array(row.landmarks)
            tol = PIXEL_TOLERANCE
            formed = box is not None and bool(np.isfinite(box).all()) and box[0] < box[2] and box[1] < box[3]
            inside.append(formed and bool((box >= -tol).all() and (box <= row.crop_size + tol).all()))
            if formed and kps is not None and np.isfinite(kps).all():
                xy = kps.reshape(5, 2)
                kps_inside.append(bool(((xy >= box[:2] - tol) & (xy <= box[2:] + tol)).all()))
            else:
                kps_inside.append(False)
            finite.append(
                lms is not None and lms.size > 0 and lms.size % 2 == 0 and bool(np.isfinite(lms).all())
            )
            match = False
            if face is not None and formed and crop_box is not None and finite[-1]:
                bbox, landmarks = _array(face["bbox"], 4), _array(face["landmarks"])
                side = crop_box[2] - crop_box[0]
                if bbox is not None and landmarks is not None and landmarks.size == lms.size and side > 0:
                    scale = row.crop_size / side
                    origin = np.tile(crop_box[:2], 2)
                    mapped_box = (bbox - origin) * scale
                    mapped = (landmarks.reshape(-1, 2) - crop_box[:2]) * scale
                    match = bool(
                        np.abs(mapped_box - box).max() <= GEOMETRY_TOLERANCE
                        and np.abs(mapped - lms.reshape(-1, 2)).max() <= GEOMETRY_TOLERANCE
                    )
            agrees.append(match)
        cutouts["face_id_known"] = face_known
        cutouts["identity_matches_faces"] = identity_matches
        cutouts["crop_matches_size"] = crop_ok
        cutouts["mask_matches_size"] = mask_ok
        cutouts["face_box_inside_crop"] = inside
        cutouts["kps_inside_face_box"] = kps_inside
        cutouts["landmarks_finite"] = finite
        cutouts["geometry_matches_faces"] = agrees
        cutouts["world_has_backgrounds"] = [len(backgrounds) > 0] * len(cutouts)
    if {"path", "width", "height", "region", "kind"} <= set(backgrounds.columns):
        file_ok, region_ok, photo_known = [], [], []
        photo_paths = set(images["path"]) if "path" in images else set()
        for row in backgrounds.itertuples(index=False):
            file_ok.append(_image_size(root, row.path) == (row.width, row.height))
            region = _array(row.region, 4)
            region_ok.append(
                region is not None
                and bool(np.isfinite(region).all())
                and 0 <= region[0] < region[2] <= row.width
                and 0 <= region[1] < region[3] <= row.height
            )
            photo_known.append(row.kind != "photo_region" or row.path in photo_paths)
        backgrounds["file_matches_size"] = file_ok
        backgrounds["region_inside_image"] = region_ok
        backgrounds["photo_known"] = photo_known
    return cutouts, backgrounds


def _suites():
    """The expectations per manifest (a function so importing this module does not import GE)."""
    import great_expectations.expectations as gxe

    from magicid.data.ingest import REASONS

    true = {"value_set": [True]}
    images = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        *[
            gxe.ExpectColumnToExist(column=c)
            for c in ("image_id", "path", "width", "height", "n_faces", "source", "split")
        ],
        gxe.ExpectColumnValuesToBeInTypeList(column="image_id", type_list=STRING_TYPES),
        gxe.ExpectColumnValuesToBeInTypeList(column="path", type_list=STRING_TYPES),
        gxe.ExpectColumnValuesToBeInTypeList(column="source", type_list=STRING_TYPES),
        gxe.ExpectColumnValuesToBeInTypeList(column="width", type_list=INT_TYPES),
        gxe.ExpectColumnValuesToBeInTypeList(column="height", type_list=INT_TYPES),
        gxe.ExpectColumnValuesToBeInTypeList(column="n_faces", type_list=INT_TYPES),
        gxe.ExpectColumnValuesToNotBeNull(column="image_id"),
        gxe.ExpectColumnValuesToBeUnique(column="image_id"),
        gxe.ExpectColumnValuesToNotBeNull(column="source"),
        gxe.ExpectColumnValuesToBeUnique(column="source"),
        gxe.ExpectColumnValuesToBeBetween(column="width", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="height", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="n_faces", min_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "val", "test"]),
        gxe.ExpectColumnValuesToBeInSet(column="path_is_safe", **true),
        gxe.ExpectColumnValuesToBeInSet(column="file_exists", **true),
        gxe.ExpectColumnValuesToBeInSet(column="n_faces_matches", **true),
    ]
    faces = [
        *[
            gxe.ExpectColumnToExist(column=c)
            for c in (
                "face_id",
                "image_id",
                "person_idx",
                "bbox",
                "det_score",
                "kps5",
                "landmarks",
                "embedding",
                "face_area_ratio",
                "crop_path",
                "identity",
            )
        ],
        gxe.ExpectColumnValuesToBeInTypeList(column="face_id", type_list=STRING_TYPES),
        gxe.ExpectColumnValuesToBeInTypeList(column="image_id", type_list=STRING_TYPES),
        gxe.ExpectColumnValuesToBeInTypeList(column="person_idx", type_list=INT_TYPES),
        gxe.ExpectColumnValuesToBeInTypeList(column="det_score", type_list=FLOAT_TYPES),
        gxe.ExpectColumnValuesToBeInTypeList(column="face_area_ratio", type_list=FLOAT_TYPES),
        gxe.ExpectColumnValuesToNotBeNull(column="face_id"),
        gxe.ExpectColumnValuesToBeUnique(column="face_id"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["image_id", "person_idx"]),
        gxe.ExpectColumnValuesToBeInSet(column="image_id_known", **true),
        gxe.ExpectColumnValuesToBeBetween(column="person_idx", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="det_score", min_value=0, max_value=1),
        gxe.ExpectColumnValuesToBeBetween(
            column="face_area_ratio", min_value=0, max_value=1, strict_min=True
        ),
        gxe.ExpectColumnValuesToBeInSet(column="bbox_well_formed", **true),
        gxe.ExpectColumnValuesToBeInSet(column="bbox_inside_image", **true),
        gxe.ExpectColumnValuesToBeInSet(column="kps_inside_box", **true),
        gxe.ExpectColumnValuesToBeInSet(column="embedding_finite", **true),
        gxe.ExpectColumnValuesToBeBetween(
            column="embedding_norm", min_value=1 - NORM_TOLERANCE, max_value=1 + NORM_TOLERANCE
        ),
        gxe.ExpectColumnUniqueValueCountToBeBetween(column="embedding_dim", min_value=0, max_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="landmarks_finite", **true),
        gxe.ExpectColumnValuesToBeInSet(column="crop_path_is_safe", **true),
        gxe.ExpectColumnValuesToBeInSet(column="crop_exists", **true),
    ]
    quarantine = [
        *[gxe.ExpectColumnToExist(column=c) for c in ("source", "image_id", "reason", "detail")],
        gxe.ExpectColumnValuesToNotBeNull(column="source"),
        gxe.ExpectColumnValuesToBeUnique(column="source"),
        gxe.ExpectColumnValuesToBeInSet(column="reason", value_set=[*REASONS, "analysis_error"]),
        gxe.ExpectColumnValuesToBeInSet(column="source_in_images", value_set=[False]),
    ]
    world_cutouts = [
        *[
            gxe.ExpectColumnToExist(column=c)
            for c in (
                "face_id",
                "identity",
                "crop_path",
                "mask_path",
                "crop_size",
                "crop_box",
                "face_box",
                "kps5",
                "landmarks",
            )  # fmt: skip
        ],
        gxe.ExpectColumnValuesToNotBeNull(column="face_id"),
        gxe.ExpectColumnValuesToBeUnique(column="face_id"),
        gxe.ExpectColumnValuesToNotBeNull(column="identity"),
        *[
            gxe.ExpectColumnValuesToBeInSet(column=c, **true)
            for c in (
                "face_id_known",
                "identity_matches_faces",
                "crop_matches_size",
                "mask_matches_size",
                "face_box_inside_crop",
                "kps_inside_face_box",
                "landmarks_finite",
                "geometry_matches_faces",
                "world_has_backgrounds",
            )  # fmt: skip
        ],
    ]
    world_backgrounds = [
        *[
            gxe.ExpectColumnToExist(column=c)
            for c in ("background_id", "kind", "path", "source", "width", "height", "region")
        ],
        gxe.ExpectColumnValuesToNotBeNull(column="background_id"),
        gxe.ExpectColumnValuesToBeUnique(column="background_id"),
        gxe.ExpectColumnValuesToBeInSet(column="kind", value_set=["package", "photo_region"]),
        gxe.ExpectColumnValuesToBeInSet(column="file_matches_size", **true),
        gxe.ExpectColumnValuesToBeInSet(column="region_inside_image", **true),
        gxe.ExpectColumnValuesToBeInSet(column="photo_known", **true),
    ]
    # Every file under the dataset is one the manifests account for: no leftover of a person `forget` removed,
    # of an interrupted build or erasure, or of anyone else.
    files = [gxe.ExpectColumnValuesToBeNull(column="unreferenced_path")]
    return {"images": images, "faces": faces, "quarantine": quarantine, "files": files,
            "world_cutouts": world_cutouts, "world_backgrounds": world_backgrounds}  # fmt: skip


def _describe(result) -> str:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id",)}
    details = result.result or {}
    unexpected = details.get("partial_unexpected_list") or details.get("observed_value")
    tail = f" (unexpected/observed: {unexpected!r})" if unexpected not in (None, []) else ""
    if result.exception_info and result.exception_info.get("raised_exception"):
        tail = f" (error: {result.exception_info.get('exception_message')})"
    return f"{config.type} {kwargs}{tail}"


def _unreferenced_hint(root: Path, result) -> str:
    """What to do about files no manifest references (the suite's `files` expectation failed)."""
    details = result.result or {}
    count = details.get("unexpected_count", "some")
    if (root / mf.ERASURE_JOURNAL).exists():
        return (
            f"files: an erasure was interrupted ({mf.ERASURE_JOURNAL}): rerun the same `magicid forget` (or `build-data`) "
            f"to finish it; {count} file(s) no manifest references"
        )
    examples = ", ".join(str(name) for name in (details.get("partial_unexpected_list") or [])[:5])
    return (
        f"files: {count} file(s) under the dataset that no manifest references (e.g. {examples}): an "
        "interrupted `build-data` leaves some (rerun it to finish); move any other file out of the dataset folder"
    )


def validate_idzoom(
    root: str | Path, report_dir: str | Path = "reports/validation", raise_on_failure: bool = True
) -> ValidationReport:
    """Run the IDZoom suite as a Great Expectations checkpoint.

    Args:
        root: the dataset directory.
        report_dir: where data docs (`data_docs/index.html`) and `validation.json` are written.
        raise_on_failure: raise `ValidationFailed` (summary + data-docs path) when an expectation fails.

    Returns:
        `ValidationReport`.

    Raises:
        DataError: the dataset or a manifest is missing/unreadable.
        ValidationFailed: an expectation failed and `raise_on_failure`.
    """
    import great_expectations as gx

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found (build it with `magicid build-data`)")
    report_dir = Path(report_dir).resolve()
    docs_dir = report_dir / "data_docs"
    frames = derive_frames(root)

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.add_data_docs_site(
        site_name="idzoom",
        site_config={
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        },
    )
    source = context.data_sources.add_pandas("idzoom")
    definitions, batches = [], {}
    for name, expectations in _suites().items():
        asset = source.add_dataframe_asset(name=name)
        batch_definition = asset.add_batch_definition_whole_dataframe(f"{name}_all")
        suite = context.suites.add(gx.ExpectationSuite(name=f"idzoom_{name}"))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definitions.append(
            context.validation_definitions.add(
                gx.ValidationDefinition(name=f"idzoom_{name}", data=batch_definition, suite=suite)
            )
        )
        batches[name] = frames[name]
    failures, total = [], 0
    # A pandas dataframe asset takes its dataframe at run time and a checkpoint passes one set of batch
    # parameters to all its definitions, so each manifest runs as its own checkpoint; results are kept in
    # the context's store and rendered into one data-docs site afterwards.
    for definition in definitions:
        name = definition.name.removeprefix("idzoom_")
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=definition.name,
                validation_definitions=[definition],
                result_format="SUMMARY",
            )
        )
        run = checkpoint.run(batch_parameters={"dataframe": batches[name]})
        for validation in run.run_results.values():
            for result in validation.results:
                total += 1
                if not result.success:
                    failures.append(f"{name}: {_describe(result)}")
                    if name == "files":
                        failures.append(_unreferenced_hint(root, result))
    context.build_data_docs(site_names=["idzoom"])  # once for all results (each build costs ~2 s)
    report = ValidationReport(
        success=not failures,
        n_expectations=total,
        n_failed=len(failures),
        failures=failures,
        docs_path=str(docs_dir / "index.html"),
        summary_path=str(report_dir / "validation.json"),
    )
    atomic_write_text(
        report_dir / "validation.json",
        json.dumps({"dataset": str(root), **asdict(report)}, indent=2, sort_keys=True) + "\n",
    )
    if raise_on_failure and not report.success:
        raise ValidationFailed(f"{root}: IDZoom validation {report.summary()}")
    return report
