"""Build an IDZoom dataset version from a folder of raw images (DESIGN.md §2): the driver.

`build_idzoom(input_dir, out_dir, params)`:
1. List every file under `input_dir` (sorted; the identity sidecar `identities.json` at its root is metadata,
   not an input: `data/identities.py`) and hash it: `image_id` is the first 16 hex digits of the file's sha256.
2. Reuse what a previous run finished: rows of the existing manifests and of the journal (`.journal/`, one JSON
   per finished input, written as results arrive, so an interrupted build resumes: `data/ledger.py`). A row is
   reused when its `(source, image_id)` matches, its files exist and the analysis settings (config hash) are
   unchanged.
3. Process the rest in `data.workers` processes (`data/worker.py`: each pinned to one thread, models loaded once
   per process): decode and normalise (`ingest.load_image`), analyse faces, pose per person, write the image,
   zoomed crops and condition maps. Any input that cannot be used becomes a quarantine row with a reason.
4. Assemble: identity labels from the sidecar, splits, manifests, stats.json (`data/stats.py`), the composite
   world's ingredients (`world/`, `data/world_ingredients.write_world`: cut-outs of the identity-labelled faces,
   backgrounds); delete the stale files this builder wrote itself (listed in the ledger `build_files.json` or
   the journal) that no row refers to now.
   Invariant (checked): every input is in exactly one of images.parquet and quarantine.parquet.
Re-running on the same inputs processes nothing and writes byte-identical files. Images `magicid forget` erased
(`data/forgotten.py`) are never taken back, and an erasure it left unfinished is finished first.

Nothing of the user's is ever deleted: the input and output folders may not overlap in either direction, and
garbage collection touches only files the builder recorded as written by itself, with builder-shaped names,
as regular files inside the output's own folders (never through a symlink).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from magicid.config import Params
from magicid.data import ledger, worker
from magicid.data import manifest as mf
from magicid.data.forgotten import finish_pending_erasure, forgotten_row, read_forgotten
from magicid.data.identities import IDENTITY_SIDECAR, load_identity_labels, match_identities
from magicid.data.inputs import InputEntry, hash_regular_file, list_input_entries
from magicid.data.ledger import JOURNAL_DIR, LEDGER
from magicid.data.stats import dataset_stats
from magicid.data.worker import Task, config_hash
from magicid.errors import DataError, InputRejected
from magicid.locks import output_lock
from magicid.utils import atomic_write_text


@dataclass
class BuildReport:
    """What one `build_idzoom` call did."""

    out_dir: str
    n_inputs: int
    n_images: int
    n_faces: int
    n_quarantined: int
    n_processed: int  # inputs analysed in this run
    n_reused: int  # inputs taken from a previous run (duplicates are decided afresh, counted in neither)
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def list_inputs(input_dir: Path) -> list[InputEntry]:
    """Every entry under `input_dir` except the identity sidecar, sorted by source (`data/inputs.py`): regular
    files to read, and refusals (FIFO, broken or escaping symlink, unreadable, bad name) that become quarantine
    rows without being opened."""
    return list_input_entries(input_dir, skip=frozenset({IDENTITY_SIDECAR}))


def file_image_id(path: Path) -> str:
    return hash_regular_file(path)[:16]


def build_idzoom(
    input_dir: str | Path, out_dir: str | Path, params: Params, progress: bool = True
) -> BuildReport:
    """Build (or resume, or update) an IDZoom dataset version, holding the output folder's lock
    (`magicid.locks`) for the whole run; an erasure `magicid forget` left unfinished there is finished first.

    Args:
        input_dir: folder of raw images (any depth), optionally with an `identities.json` sidecar.
        out_dir: the dataset directory (created; earlier results there are reused).
        params: `data.*` (crop, workers, max_pixels, split) and `faces.*` (backend) settings.
        progress: show a progress bar.

    Returns:
        `BuildReport` with counts.

    Raises:
        DataError: the input folder is missing or empty, the input and output overlap, or the sidecar is
            malformed.
        OutputLocked: another process is writing `out_dir`.
    """
    with output_lock(out_dir, "magicid build-data"):
        return _build_idzoom_locked(input_dir, out_dir, params, progress)


def _build_idzoom_locked(
    input_dir: str | Path, out_dir: str | Path, params: Params, progress: bool
) -> BuildReport:
    started = time.perf_counter()
    input_dir, out_dir = Path(input_dir).resolve(), Path(out_dir).resolve()
    if not input_dir.is_dir():
        raise DataError(
            f"{input_dir}: input folder not found (create it, e.g. `magicid sample-data --out {input_dir}`)"
        )
    check_folders(input_dir, out_dir)
    labels = load_identity_labels(input_dir)
    inputs = list_inputs(input_dir)
    if not inputs:
        raise DataError(f"{input_dir}: no input files (put images there, or run `magicid sample-data`)")
    cfg_hash = config_hash(params)
    out_dir.mkdir(parents=True, exist_ok=True)
    finish_pending_erasure(out_dir, params)  # a killed `forget`: finish its plan before anything is reused
    previous = ledger.previous_records(out_dir, cfg_hash)
    forgotten_ids, forgotten_identities = read_forgotten(out_dir)  # `magicid forget` never undone by a build

    # 1. ids, duplicates, what is already done
    records: dict[str, dict] = {}
    first_by_id: dict[str, str] = {}
    tasks: list[Task] = []
    n_reused = 0
    for entry in inputs:
        source = entry.source
        try:
            if entry.path is None:
                raise InputRejected(entry.reason or "not_a_file", entry.detail)
            image_id = file_image_id(entry.path)
        except InputRejected as rejected:  # refused while listing, or while hashing: never opened further
            records[source] = {"status": "quarantine", "source": source, "image_id": None,
                               "reason": rejected.reason, "detail": rejected.detail}  # fmt: skip
            continue
        path = entry.path
        if image_id in forgotten_ids:
            records[source] = forgotten_row(source, image_id)
            continue
        if image_id in first_by_id:
            records[source] = {
                "status": "quarantine",
                "source": source,
                "image_id": image_id,
                "reason": "duplicate",
                "detail": f"same bytes as {first_by_id[image_id]}",
            }
            continue
        first_by_id[image_id] = source
        old = previous.get((source, image_id))
        if old is not None and all((out_dir / name).is_file() for name in ledger.files_of(old)):
            records[source] = old
            n_reused += 1
        else:
            tasks.append(Task(str(path), source, image_id, str(out_dir)))

    # 2. process the rest; journal each record as it arrives so an interrupted build resumes
    for record in worker.run_tasks(tasks, params, progress):
        records[record["source"]] = record
        ledger.write_journal_entry(out_dir, record, cfg_hash)

    # 3. assemble
    image_records = [r for r in records.values() if r["status"] == "image"]
    for record in image_records:
        identities = match_identities(record["faces"], labels.get(record["source"], []))
        for face, identity in zip(record["faces"], identities, strict=True):
            face["identity"] = identity
        if forgotten_identities & set(identities):
            records[record["source"]] = forgotten_row(record["source"], record["image_id"])
    image_records = [r for r in records.values() if r["status"] == "image"]
    splits = assign_splits_for(image_records, params)
    images = sorted(
        (dict(r["image"], split=splits[r["image_id"]]) for r in image_records),
        key=lambda row: row["image_id"],
    )
    faces = sorted((f for r in image_records for f in r["faces"]), key=lambda row: row["face_id"])
    quarantine = sorted(
        (
            {k: r[k] for k in ("source", "image_id", "reason", "detail")}
            for r in records.values()
            if r["status"] == "quarantine"
        ),
        key=lambda row: row["source"],
    )
    taken, rejected = {r["source"] for r in images}, {r["source"] for r in quarantine}
    all_sources = {entry.source for entry in inputs}
    if taken & rejected or (taken | rejected) != all_sources or len(images) + len(quarantine) != len(inputs):
        raise AssertionError("internal: inputs must be exactly images + quarantine")  # pragma: no cover

    mf.write_table(images, mf.IMAGES_SCHEMA, out_dir / mf.IMAGES)
    mf.write_table(faces, mf.FACES_SCHEMA, out_dir / mf.FACES)
    mf.write_table(quarantine, mf.QUARANTINE_SCHEMA, out_dir / mf.QUARANTINE)
    stats = dataset_stats(images, faces, quarantine, len(inputs), params, cfg_hash)
    atomic_write_text(out_dir / mf.STATS, json.dumps(stats, indent=2, sort_keys=True) + "\n")
    from magicid.data.world_ingredients import write_world

    world_files = write_world(out_dir, images, faces, params)  # the composite world's ingredients (world/)
    referenced = {name for r in image_records for name in ledger.files_of(r)} | world_files
    written = ledger.read_ledger(out_dir) | referenced
    for entry in ledger.journal_entries(out_dir).values():  # interrupted runs, any settings
        written.update(ledger.files_of(entry["record"]))
    ledger.record_and_collect(out_dir, written, referenced)
    ledger.clear_journal(out_dir)
    ledger.remove_write_leftovers(out_dir)

    return BuildReport(
        out_dir=str(out_dir),
        n_inputs=len(inputs),
        n_images=len(images),
        n_faces=len(faces),
        n_quarantined=len(quarantine),
        n_processed=len(tasks),
        n_reused=n_reused,
        quarantine_reasons=stats["quarantine_reasons"],
        seconds=round(time.perf_counter() - started, 3),
    )


def assign_splits_for(image_records: list[dict], params: Params) -> dict[str, str]:
    from magicid.data.splits import assign_splits

    pairs = [(r["image_id"], [f["identity"] for f in r["faces"] if f["identity"]]) for r in image_records]
    return assign_splits(pairs, params.data.split, params.seed)


def check_folders(input_dir: Path, out_dir: Path) -> None:
    """Refuse an input and output that overlap (either inside the other, or the same), and output folders
    that are symlinks: the builder writes and cleans `images/`, `crops/` and `conditions/` under the output,
    so an overlap would put its files among the user's photos (and, before, deleted them).

    Args:
        input_dir, out_dir: resolved (symlink-free) absolute paths.

    Raises:
        DataError: naming both folders and what to do.
    """
    if out_dir == input_dir:
        raise DataError(f"{out_dir}: the output folder is the input folder; choose a separate output folder")
    if input_dir in out_dir.parents:
        raise DataError(
            f"{out_dir}: the output must not be inside the input folder {input_dir}; "
            "choose an output folder outside it"
        )
    if out_dir in input_dir.parents:
        raise DataError(
            f"{input_dir}: the input folder must not be inside the output folder {out_dir} (the builder writes "
            "its own images/, crops/ and conditions/ there); choose an output folder that does not contain "
            "the input, e.g. a sibling of it"
        )
    for name in (mf.IMAGES_DIR, mf.CROPS_DIR, mf.CONDITIONS_DIR, "world", JOURNAL_DIR, LEDGER):
        if (out_dir / name).is_symlink():
            raise DataError(
                f"{out_dir / name}: is a symlink; the builder writes only into folders of its own "
                "(remove the link or choose another output folder)"
            )


# ---------------------------------------------------------------------------------------------------------------
# fan-out by an outside task runner (Prefect's process pool, Dask): shards are analysed anywhere, journalled in
# the dataset, and `build_idzoom` then assembles the version, reusing every journalled record
# ---------------------------------------------------------------------------------------------------------------
def pending_inputs(input_dir: str | Path, out_dir: str | Path, params: Params) -> list[str]:
    """Sources under `input_dir` that `build_idzoom` would analyse now (not done by an earlier run), sorted.

    Left out, because `build_idzoom` decides them without analysis: inputs refused while listing or hashing
    (FIFOs, escaping links, ...: quarantined), forgotten images, and duplicates (same bytes as an earlier source).
    """
    input_dir, out_dir = Path(input_dir).resolve(), Path(out_dir).resolve()
    check_folders(input_dir, out_dir)
    previous = ledger.previous_records(out_dir, config_hash(params)) if out_dir.is_dir() else {}
    forgotten_ids, _ = read_forgotten(out_dir) if out_dir.is_dir() else (set(), set())
    pending, seen = [], set()
    for entry in list_inputs(input_dir):
        if entry.path is None:
            continue
        try:
            image_id = file_image_id(entry.path)
        except InputRejected:
            continue
        if image_id in seen or image_id in forgotten_ids:
            continue
        seen.add(image_id)
        old = previous.get((entry.source, image_id))
        if old is None or not all((out_dir / name).is_file() for name in ledger.files_of(old)):
            pending.append(entry.source)
    return pending


def analyse_inputs(input_dir: str | Path, out_dir: str | Path, params: Params, sources: list[str]) -> int:
    """Analyse `sources` (paths relative to `input_dir`) in this process and journal their records in `out_dir`,
    so that a later `build_idzoom(input_dir, out_dir, params)` reuses them instead of analysing them again.

    Returns:
        The number of records journalled.
    """
    input_dir, out_dir = Path(input_dir).resolve(), Path(out_dir).resolve()
    check_folders(input_dir, out_dir)
    cfg_hash = config_hash(params)
    readable = {entry.source: entry.path for entry in list_inputs(input_dir) if entry.path is not None}
    worker.init_worker(params.model_dump_json(), pin=False, quiet=False)
    for source in sources:
        path = readable.get(source)
        if path is None:
            raise DataError(
                f"{input_dir / source}: input listed for analysis is not a readable file inside the input folder "
                "(list the inputs with pending_inputs)"
            )
        record = worker.process_input(Task(str(path), source, file_image_id(path), str(out_dir)))
        ledger.write_journal_entry(out_dir, record, cfg_hash)
    return len(sources)
