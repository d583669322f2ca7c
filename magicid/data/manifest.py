"""IDZoom manifests (DESIGN.md §2): Parquet schemas, writing, and `read_manifest`.

Array columns are stored flat as `list<float32>` (Parquet has no fixed-shape tensors that pandas reads back
cleanly); `read_manifest` returns them reshaped: bbox (4,), kps5 (5, 2), landmarks (N, 2), embedding (D,),
skeleton (33, 3) `x, y, visibility` or None.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from magicid.errors import DataError
from magicid.utils import atomic_write

IMAGES = "images.parquet"
FACES = "faces.parquet"
QUARANTINE = "quarantine.parquet"
STATS = "stats.json"
IMAGES_DIR = "images"
CROPS_DIR = "crops"
CONDITIONS_DIR = "conditions"
# The builder's bookkeeping (data/ledger.py) and the forgotten-images record (data/forgotten.py): named here, with
# the other files of a dataset version, so every module that must recognise them reads one definition.
LEDGER = "build_files.json"
JOURNAL_DIR = ".journal"
FORGOTTEN = "forgotten.json"
ERASURE_JOURNAL = "forget_journal.json"

_FLOATS = pa.list_(pa.float32())
IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),  # first 16 hex digits of the file's sha256
        ("path", pa.string()),  # normalised image, relative to the dataset root
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("n_faces", pa.int32()),
        ("source", pa.string()),  # the input's path relative to the input root
        ("split", pa.string()),  # train | val | test
    ]
)
FACES_SCHEMA = pa.schema(
    [
        ("face_id", pa.string()),  # <image_id>_<person_idx:02d>
        ("image_id", pa.string()),
        ("person_idx", pa.int32()),  # left-to-right order in the image
        ("bbox", _FLOATS),  # 4: x0, y0, x1, y1 (px)
        ("det_score", pa.float32()),
        ("kps5", _FLOATS),  # 10: 5 x (x, y) px
        ("landmarks", _FLOATS),  # N * 2 px
        ("embedding", _FLOATS),  # D, L2-normalised
        ("face_area_ratio", pa.float32()),  # face box area / image area
        ("crop_path", pa.string()),  # zoomed crop, relative to the dataset root
        ("identity", pa.string()),  # known label or null
        ("skeleton", _FLOATS),  # 99: 33 x (x, y, visibility), or null when pose found no body
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("image_id", pa.string()),
        ("reason", pa.string()),  # one of magicid.data.ingest.REASONS or analysis_error
        ("detail", pa.string()),
    ]
)
_SHAPES = {"bbox": (4,), "kps5": (5, 2), "landmarks": (-1, 2), "embedding": (-1,), "skeleton": (33, 3)}


def write_table(rows: list[dict], schema: pa.Schema, path: Path) -> Path:
    """Write rows (dicts keyed by the schema's names) as one Parquet file, atomically."""
    table = pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def check_relative(path: str, root: Path, column: str) -> Path:
    """`root / path` for a manifest path; absolute paths and `..` are refused (DataError)."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or "\\" in path or not path:
        raise DataError(f"{root}: {column} {path!r} must be relative and inside the dataset root")
    return root / pure


def read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: not found (build the dataset with `magicid build-data`)")
    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file: {error}") from error


def _reshape(column: pd.Series, shape: tuple[int, ...]) -> pd.Series:
    return column.map(lambda v: None if v is None else np.asarray(v, dtype=np.float32).reshape(shape))


def read_manifest(root: str | Path, arrays: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read an IDZoom dataset's manifests.

    Args:
        root: the dataset directory.
        arrays: reshape array columns into numpy arrays (see the module docstring); False keeps flat lists.

    Returns:
        `(images_df, faces_df)`.

    Raises:
        DataError: a manifest is missing or unreadable, or a path points outside the root.
    """
    root = Path(root)
    images = read_table(root / IMAGES)
    faces = read_table(root / FACES)
    for column, frame in (("path", images), ("crop_path", faces)):
        if column in frame:
            for value in frame[column]:
                check_relative(str(value), root, column)
    if arrays:
        for column, shape in _SHAPES.items():
            if column in faces:
                faces[column] = _reshape(faces[column], shape)
    return images, faces


def read_quarantine(root: str | Path) -> pd.DataFrame:
    return read_table(Path(root) / QUARANTINE)


def check_data_dir(data_dir: str | Path) -> Path:
    """The dataset version directory `data_dir` once its manifests read, or `DataError` saying how to make one."""
    path = Path(data_dir)
    if not (path / IMAGES).is_file():
        raise DataError(
            f"--data {path}: no images.parquet there; build a dataset version with `magicid build-data`"
        )
    read_manifest(path, arrays=False)  # unreadable manifests fail here, before any model loads
    return path
