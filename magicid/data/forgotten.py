"""The forgotten-images record of a dataset version and the erasure that keeps it (DESIGN.md §1, data/).

Faces and face embeddings are biometric data. Erasing an identity (or one image) removes, from the dataset
folder: every image that shows the person (the image file, all its faces' rows and zoomed crops, its skeleton
and landmark maps, the embeddings, which live in faces.parquet and in any `.journal/` record an interrupted build
left, and its faces' composite-world cut-outs and photo region in world/) — a group photo is removed whole,
since the other faces' crops and maps would still show the person's pixels — and the evaluation's copies of
those faces' reference crops beside the generations. Each removed input stays accounted for as a quarantine row
with reason `forgotten` (inputs = images + quarantine still holds), and `forgotten.json` records the image ids
and identities so that the builder never takes them back in, even with other settings.

An erasure survives a kill at any write: `plan_erasure` says what goes, the caller writes that plan to
`forget_journal.json` (`write_erasure_journal`), `erase` makes each change in a form that can be repeated
(manifests rewritten without those ids, files deleted) and removes the journal last. Whoever finds a journal
finishes it first (`finish_pending_erasure`: `magicid forget` and the builder); until then `read_forgotten`
already counts the planned ids as forgotten. The caller holds the folder's lock (`magicid.locks`).
"""

from __future__ import annotations

import json
from pathlib import Path

from magicid.config import Params
from magicid.data import ledger
from magicid.data import manifest as mf
from magicid.data import world_ingredients as wi
from magicid.data.stats import dataset_stats
from magicid.data.version import dataset_version
from magicid.data.worker import config_hash
from magicid.errors import DataError
from magicid.utils import atomic_write_text

FORGOTTEN = mf.FORGOTTEN
ERASURE_JOURNAL = mf.ERASURE_JOURNAL
REASON = "forgotten"  # the quarantine reason of a forgotten input
FORGOTTEN_DETAIL = "removed by magicid forget (see forgotten.json)"
JOURNAL_VERSION = 1
# Where the evaluation copies reference crops beside each generation folder (`<generations_dir>/<version>/
# references/<face_id>.png`, `evaluation.report.write_generations`): those copies are the person's face too.
REFERENCES_DIR = "references"


# ---------------------------------------------------------------------------------------------------------------
# the record
# ---------------------------------------------------------------------------------------------------------------
def read_forgotten_record(out_dir: str | Path) -> dict:
    """`forgotten.json`: `{"image_ids": [...], "identities": [...], "old_versions": [...]}` (empty lists when
    there is none).

    Raises:
        DataError: the record is unreadable.
    """
    path = Path(out_dir) / FORGOTTEN
    if not path.is_file():
        return {"image_ids": [], "identities": [], "old_versions": []}
    try:
        data = json.loads(path.read_text())
        return {
            "image_ids": list(data["image_ids"]),
            "identities": list(data["identities"]),
            "old_versions": list(data.get("old_versions", [])),
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataError(
            f"{path}: unreadable forget record ({error}); restore it from version control"
        ) from error


def read_forgotten(out_dir: str | Path) -> tuple[set[str], set[str]]:
    """(image ids, identities) forgotten in a dataset folder: those `forgotten.json` records, plus those of an
    erasure still pending in `forget_journal.json` (planned, so never to be taken back); empty sets when none."""
    out_dir = Path(out_dir)
    record = read_forgotten_record(out_dir)
    ids, identities = set(record["image_ids"]), set(record["identities"])
    pending = read_erasure_journal(out_dir)
    if pending is not None:
        ids |= set(pending["image_ids"])
        identities |= {pending["identity"]} if pending["identity"] else set()
    return ids, identities


def forgotten_row(source: str, image_id: str) -> dict:
    """The quarantine record of a forgotten input (one text, whichever way it was forgotten: a rebuild writes
    the same rows as the erasure)."""
    return {"status": "quarantine", "source": source, "image_id": image_id, "reason": REASON,
            "detail": FORGOTTEN_DETAIL}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# the erasure journal
# ---------------------------------------------------------------------------------------------------------------
def read_erasure_journal(out_dir: str | Path) -> dict | None:
    """The plan of an erasure that has not finished (`forget_journal.json`), or None.

    Raises:
        DataError: the journal is unreadable (it is written atomically, so only a hand edit does that).
    """
    path = Path(out_dir) / ERASURE_JOURNAL
    if not path.exists() and not path.is_symlink():
        return None
    try:
        if path.is_symlink() or not path.is_file():
            raise TypeError("not a regular file")
        plan = json.loads(path.read_text())
        if plan.get("version") != JOURNAL_VERSION:
            raise ValueError(f"unknown journal version {plan.get('version')!r}")
        for key, kind in (("image_ids", list), ("removed", list), ("files", list), ("builder_journal", list),
                          ("removed_faces", int), ("old_version", str)):  # fmt: skip
            if not isinstance(plan.get(key), kind):
                raise TypeError(f"{key!r} is not a {kind.__name__}")
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as error:
        raise DataError(
            f"{path}: unreadable erasure journal ({error}); an erasure was interrupted and cannot be finished "
            "from it: restore the dataset folder from version control, or rerun the same `magicid forget` "
            "after removing the journal"
        ) from error
    return plan


def write_erasure_journal(root: str | Path, plan: dict) -> None:
    """Write the plan before anything is changed (`erase` removes it last)."""
    atomic_write_text(Path(root) / ERASURE_JOURNAL, json.dumps(plan, indent=1, sort_keys=True) + "\n")


def finish_pending_erasure(root: str | Path, params: Params) -> dict | None:
    """Finish the erasure `forget_journal.json` describes, if any (the caller holds the folder's lock).

    Returns:
        The finished plan, or None when no erasure was pending.
    """
    root = Path(root)
    plan = read_erasure_journal(root)
    if plan is not None:
        erase(root, params, plan)
    return plan


# ---------------------------------------------------------------------------------------------------------------
# plan and erase
# ---------------------------------------------------------------------------------------------------------------
def _records_of(images: list[dict], faces: list[dict]) -> list[dict]:
    by_image: dict[str, list[dict]] = {}
    for face in faces:
        by_image.setdefault(face["image_id"], []).append(face)
    return [ledger.image_record(row, by_image.get(row["image_id"], [])) for row in images]


def plan_erasure(root: Path, identity: str | None, image_id: str | None) -> dict | None:
    """What erasing `identity` (or `image_id`) removes, from the manifests as they are now; None when it was
    already forgotten and nothing of it is left.

    Raises:
        DataError: nothing matches and it was never forgotten.
    """
    import pyarrow.parquet as pq

    images = pq.read_table(root / mf.IMAGES).to_pylist()
    faces = pq.read_table(root / mf.FACES).to_pylist()
    if identity is not None:
        doomed = {f["image_id"] for f in faces if f["identity"] == identity}
    else:
        doomed = {image_id} if any(i["image_id"] == image_id for i in images) else set()
    if not doomed:
        ids, identities = read_forgotten(root)
        if identity in identities or image_id in ids:
            return None
        if identity is not None:
            known = sorted({f["identity"] for f in faces if f["identity"]})
            raise DataError(
                f"forget --identity {identity!r}: no face has it (known: {', '.join(known) or 'none'})"
            )
        raise DataError(f"forget --image {image_id!r}: no such image_id in {root / mf.IMAGES}")

    removed_rows = [i for i in images if i["image_id"] in doomed]
    files = set()
    for record in _records_of(removed_rows, faces):
        files.update(ledger.files_of(record))
    # An interrupted build's journal may hold a record of the same image (with its embeddings) and its files.
    builder_journal = []
    for path, entry in ledger.journal_entries(root).items():
        if entry["record"]["image_id"] in doomed:
            builder_journal.append(path.name)
            files.update(ledger.files_of(entry["record"]))
    files.update(wi.world_masks_of(root, doomed))
    old_version, _ = dataset_version(root)
    return {
        "version": JOURNAL_VERSION,
        "identity": identity,
        "image_id": image_id,
        "old_version": old_version,
        "image_ids": sorted(doomed),
        "removed": [{"source": i["source"], "image_id": i["image_id"]} for i in removed_rows],
        "removed_faces": sum(1 for f in faces if f["image_id"] in doomed),
        "face_ids": sorted(f["face_id"] for f in faces if f["image_id"] in doomed),
        "files": sorted(name for name in files if (root / name).exists() or (root / name).is_symlink()),
        "builder_journal": sorted(builder_journal),
    }


def erase(root: Path, params: Params, plan: dict) -> None:
    """Carry out `plan`; every step gives the same result when repeated, so a rerun after a kill completes it.
    The journal is removed last.

    Raises:
        DataError: a planned file could not be deleted (the journal stays, naming the erasure to finish).
    """
    import pyarrow.parquet as pq

    doomed = set(plan["image_ids"])
    # 1. The record that keeps the builder from taking them back (and the versions that held them).
    record = read_forgotten_record(root)
    body = {
        "image_ids": sorted(set(record["image_ids"]) | doomed),
        "identities": sorted(set(record["identities"]) | ({plan["identity"]} if plan["identity"] else set())),
        "old_versions": sorted(set(record["old_versions"]) | {plan["old_version"]}),
    }
    atomic_write_text(root / FORGOTTEN, json.dumps(body, indent=1) + "\n")

    # 2. Manifests: without the doomed ids; each removed input (and each duplicate of it) a `forgotten` row.
    images = [i for i in pq.read_table(root / mf.IMAGES).to_pylist() if i["image_id"] not in doomed]
    faces = [f for f in pq.read_table(root / mf.FACES).to_pylist() if f["image_id"] not in doomed]
    by_source = {q["source"]: q for q in pq.read_table(root / mf.QUARANTINE).to_pylist()}
    for source, row in by_source.items():
        if row["image_id"] in doomed:  # duplicates of a forgotten image (same bytes, same image_id)
            by_source[source] = {**row, "reason": REASON, "detail": FORGOTTEN_DETAIL}
    for row in plan["removed"]:
        quarantined = forgotten_row(row["source"], row["image_id"])
        by_source[row["source"]] = {
            key: quarantined[key] for key in ("source", "image_id", "reason", "detail")
        }
    quarantine = sorted(by_source.values(), key=lambda row: row["source"])
    mf.write_table(images, mf.IMAGES_SCHEMA, root / mf.IMAGES)
    mf.write_table(faces, mf.FACES_SCHEMA, root / mf.FACES)
    mf.write_table(quarantine, mf.QUARANTINE_SCHEMA, root / mf.QUARANTINE)
    # The composite world's rows of those images (their masks are in plan["files"]).
    wi.forget_world(root, doomed)
    stats = dataset_stats(
        images, faces, quarantine, len(images) + len(quarantine), params, config_hash(params)
    )
    old_stats = json.loads((root / mf.STATS).read_text()) if (root / mf.STATS).is_file() else {}
    stats["config_hash"] = old_stats.get("config_hash", stats["config_hash"])  # same analysis settings
    atomic_write_text(root / mf.STATS, json.dumps(stats, indent=2, sort_keys=True) + "\n")

    # 3. Files: the ledger lists them first (so a build would delete them too), then they are deleted.
    referenced = set(wi.world_files(root))
    for kept in _records_of(images, faces):
        referenced.update(ledger.files_of(kept))
    written = ledger.read_ledger(root) | referenced | set(plan["files"])
    ledger.record_and_collect(root, written, referenced)
    ledger.remove_journal_entries(root, plan["builder_journal"])
    ledger.remove_write_leftovers(root)
    remove_review_references(params.review.generations_dir, plan.get("face_ids", []))
    left = sorted(name for name in plan["files"] if (root / name).exists() or (root / name).is_symlink())
    if left:
        raise DataError(
            f"forget: could not delete {', '.join(left[:5])}; delete them by hand, then rerun the same forget "
            f"to finish the erasure ({root / ERASURE_JOURNAL} holds it)"
        )
    # 4. Done: the journal goes last.
    (root / ERASURE_JOURNAL).unlink()


def remove_review_references(generations_dir: str | Path, face_ids: list[str]) -> int:
    """Delete the evaluation's copies of these faces' reference crops (`<generations_dir>/*/references/<face_id>.png`,
    `magicid.evaluation.report.write_generations`); returns how many were deleted. Idempotent. A generation
    that showed one then reports its missing reference in the review app, by name."""
    root = Path(generations_dir)
    if str(generations_dir).startswith("s3://") or not root.is_dir() or not face_ids:
        return 0
    removed = 0
    for folder in sorted(p for p in root.glob(f"*/{REFERENCES_DIR}") if p.is_dir() and not p.is_symlink()):
        for face_id in face_ids:
            copy = folder / f"{face_id}.png"
            if copy.is_file() and not copy.is_symlink():
                copy.unlink()
                removed += 1
    return removed
