"""The dataset builder's bookkeeping in a dataset version: the journal of finished inputs and the ledger of the
files it wrote (DESIGN.md §1, data/).

- Journal (`.journal/<20 hex>.json`, one file per finished input, `{"config_hash": ..., "record": ...}`):
  written as results arrive, so an interrupted build resumes; removed once the version is assembled.
- Ledger (`build_files.json`): every file under `images/`, `crops/`, `conditions/` and `world/` the builder has
  written into the dataset version and not deleted since: the only files garbage collection may delete (a
  user's own files there are never touched).
- Leftovers: what a kill in the middle of `utils.atomic_write` leaves of the files the builder and `forget`
  write (the temporary `.<name>.<8 random characters><suffix>` beside the file: tempfile.mkstemp's names).

A record is what the worker (`data/worker.py`) returns for one input: `{"status": "image", "source", "image_id",
"image": {...}, "faces": [...]}` or `{"status": "quarantine", "source", "image_id", "reason", "detail"}`.
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
import warnings
from pathlib import Path

from magicid.data import manifest as mf
from magicid.data import world_ingredients as wi
from magicid.utils import atomic_write_text

LEDGER = mf.LEDGER
JOURNAL_DIR = mf.JOURNAL_DIR
# The names the builder gives its outputs; a ledger entry of any other shape is never deleted.
OUTPUT_NAME = re.compile(
    rf"({mf.IMAGES_DIR}/[0-9a-f]{{16}}\.(png|jpg|webp)"
    rf"|{mf.CROPS_DIR}/[0-9a-f]{{16}}_[0-9]{{2,}}\.png"
    rf"|{mf.CONDITIONS_DIR}/[0-9a-f]{{16}}_(skeleton|landmark)\.png"
    r"|world/masks/[0-9a-f]{16}_[0-9]{2,}\.png"
    r"|world/backgrounds/skimage_[a-z0-9_]+\.png)"
)
JOURNAL_NAME = re.compile(r"[0-9a-f]{20}\.json")
_ROOT_FILES = (mf.IMAGES, mf.FACES, mf.QUARANTINE, mf.STATS, LEDGER, mf.FORGOTTEN, mf.ERASURE_JOURNAL,
               *(Path(name).name for name in (wi.CUTOUTS, wi.BACKGROUNDS)))  # fmt: skip
LEFTOVER_NAME = re.compile(
    rf"\.(?:{'|'.join(re.escape(name) for name in _ROOT_FILES)}"
    r"|skimage_[a-z_]+\.png"
    r"|[0-9a-f]{16}(?:_[0-9]{2,}|_skeleton|_landmark)?\.(?:png|jpg|webp)|[0-9a-f]{20}\.json)"
    r"\.[a-z0-9_]{8}\.(?:parquet|json|png|jpg|webp)"
)


# ---------------------------------------------------------------------------------------------------------------
# records and the journal
# ---------------------------------------------------------------------------------------------------------------
def record_key(source: str, image_id: str) -> str:
    """The journal file name (without `.json`) of the record of `(source, image_id)`."""
    return hashlib.sha256(f"{source}\0{image_id}".encode()).hexdigest()[:20]


def files_of(record: dict) -> list[str]:
    """The files (relative to the dataset root) an image record's outputs occupy; none for a quarantine row."""
    if record["status"] != "image":
        return []
    image_id = record["image_id"]
    files = [record["image"]["path"]] + [f["crop_path"] for f in record["faces"]]
    return files + [f"{mf.CONDITIONS_DIR}/{image_id}_{kind}.png" for kind in ("skeleton", "landmark")]


def image_record(image_row: dict, faces: list[dict]) -> dict:
    """The record of a manifest image row and its faces' rows (as the worker would have returned it)."""
    return {
        "status": "image",
        "source": image_row["source"],
        "image_id": image_row["image_id"],
        "image": image_row,
        "faces": faces,
    }


def write_journal_entry(out_dir: Path, record: dict, cfg_hash: str) -> None:
    """Journal one finished record (atomically), so that an interrupted build reuses it."""
    name = record_key(record["source"], record["image_id"])
    atomic_write_text(
        out_dir / JOURNAL_DIR / f"{name}.json", json.dumps({"config_hash": cfg_hash, "record": record})
    )


def journal_entries(out_dir: Path) -> dict[Path, dict]:
    """The journal's entries (any config hash), by file; entries that do not parse are skipped (redone)."""
    journal = out_dir / JOURNAL_DIR
    entries = {}
    if journal.is_dir() and not journal.is_symlink():
        for path in sorted(journal.iterdir()):
            if not JOURNAL_NAME.fullmatch(path.name) or not path.is_file():
                continue
            try:
                entry = json.loads(path.read_text())
                record = entry["record"]
                files_of(record), record["source"], record["image_id"]  # the fields every use reads
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                continue  # a torn write cannot happen (atomic), but a hand-edited file is simply redone
            entries[path] = entry
    return entries


def remove_journal_entries(out_dir: Path, names: list[str]) -> None:
    """Delete these journal entries (file names; anything not of the journal's name shape is left alone)."""
    journal = out_dir / JOURNAL_DIR
    for name in names:
        path = journal / name
        if JOURNAL_NAME.fullmatch(name) and not journal.is_symlink() and path.is_file():
            path.unlink()


def clear_journal(out_dir: Path) -> None:
    """Remove the journal's own entries (by name), then the folder if nothing else is in it."""
    journal = out_dir / JOURNAL_DIR
    if not journal.is_dir() or journal.is_symlink():
        return
    for path in journal.iterdir():
        if JOURNAL_NAME.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            path.unlink()
    try:
        journal.rmdir()
    except OSError:
        pass  # something not the builder's is in there: leave it


def previous_records(out_dir: Path, cfg_hash: str) -> dict[tuple[str, str], dict]:
    """Finished records of earlier runs with the same config hash (the manifests, then the journal), keyed by
    `(source, image_id)`."""
    records: dict[tuple[str, str], dict] = {}
    stats_path = out_dir / mf.STATS
    if stats_path.is_file() and all(
        (out_dir / name).is_file() for name in (mf.IMAGES, mf.FACES, mf.QUARANTINE)
    ):
        try:
            stats = json.loads(stats_path.read_text())
        except json.JSONDecodeError:
            stats = {}
        if stats.get("config_hash") == cfg_hash:
            import pyarrow.parquet as pq

            images = pq.read_table(out_dir / mf.IMAGES).to_pylist()
            faces = pq.read_table(out_dir / mf.FACES).to_pylist()
            quarantine = pq.read_table(out_dir / mf.QUARANTINE).to_pylist()
            faces_by_image: dict[str, list[dict]] = {}
            for row in faces:
                faces_by_image.setdefault(row["image_id"], []).append(row)
            for row in images:
                records[(row["source"], row["image_id"])] = image_record(
                    row, sorted(faces_by_image.get(row["image_id"], []), key=lambda f: f["person_idx"])
                )
            for row in quarantine:
                if row["reason"] != "duplicate":  # duplicates are decided afresh from the input list
                    records[(row["source"], row["image_id"])] = {"status": "quarantine", **row}
    for entry in journal_entries(out_dir).values():
        if entry.get("config_hash") == cfg_hash:
            record = entry["record"]
            records[(record["source"], record["image_id"])] = record
    return records


# ---------------------------------------------------------------------------------------------------------------
# the ledger and garbage collection
# ---------------------------------------------------------------------------------------------------------------
def read_ledger(out_dir: Path) -> set[str]:
    """Files the builder recorded as written by itself; an unreadable ledger lists nothing (so nothing is
    deleted: the safe direction), and a warning says why."""
    path = out_dir / LEDGER
    if not path.exists():
        return set()
    try:
        entries = json.loads(path.read_text())
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise TypeError("not a list of file names")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as error:
        warnings.warn(
            f"{path}: unreadable build ledger ({error}); no stale outputs are deleted in this run",
            stacklevel=2,
        )
        return set()
    return set(entries)


def write_ledger(out_dir: Path, written: set[str]) -> None:
    atomic_write_text(out_dir / LEDGER, json.dumps(sorted(written), indent=0) + "\n")


def collect_garbage(out_dir: Path, written: set[str], referenced: set[str]) -> set[str]:
    """Delete the files the builder wrote (`written`) that no manifest row refers to any more.

    A file is deleted only if its name has the shape the builder gives its outputs and it is a regular file
    (not a link) inside the output's own `images/`, `crops/`, `conditions/` or `world/` folders (no folder on
    the way a link): a forged or stale ledger entry can never reach a file outside them.

    Returns:
        The ledger's new content: `referenced`, plus any listed file that could not be deleted.
    """
    remaining = set(referenced)
    for name in sorted(written - referenced):
        if not OUTPUT_NAME.fullmatch(name):
            continue  # not a name the builder gives: never the builder's to delete
        path = out_dir / name
        folders = [out_dir / Path(*name.split("/")[:depth]) for depth in range(1, name.count("/") + 1)]
        if any(folder.is_symlink() or not folder.is_dir() for folder in folders):
            continue
        try:
            if not stat.S_ISREG(path.lstat().st_mode):
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as error:
            warnings.warn(
                f"{path}: could not delete a stale output ({error}); kept in the ledger", stacklevel=2
            )
            remaining.add(name)
    return remaining


def record_and_collect(out_dir: Path, written: set[str], referenced: set[str]) -> None:
    """Add `written` to the ledger first (a crash during the deletions leaves every file listed), then delete
    what no row refers to (`collect_garbage`) and keep the ledger to what is left."""
    write_ledger(out_dir, written)
    write_ledger(out_dir, collect_garbage(out_dir, written, referenced))


def remove_write_leftovers(out_dir: Path) -> list[str]:
    """Delete the temporary files that a kill during an atomic write of the builder or of `forget` left in
    the dataset folder, its `images/`, `crops/`, `conditions/`, `.journal/` and the composite world's folders
    (names of that exact shape, regular files, no symlinked folder followed).

    Returns:
        The names deleted (relative to `out_dir`).
    """
    removed = []
    subfolders = (mf.IMAGES_DIR, mf.CROPS_DIR, mf.CONDITIONS_DIR, JOURNAL_DIR, wi.WORLD_DIR, wi.MASKS_DIR,
                  wi.BACKGROUNDS_DIR)  # fmt: skip
    for folder in [out_dir, *(out_dir / name for name in subfolders)]:
        if folder.is_symlink() or not folder.is_dir():
            continue
        for path in folder.iterdir():
            if LEFTOVER_NAME.fullmatch(path.name) and stat.S_ISREG(path.lstat().st_mode):
                path.unlink(missing_ok=True)
                removed.append(path.relative_to(out_dir).as_posix())
    return sorted(removed)
