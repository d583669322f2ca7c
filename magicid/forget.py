"""`magicid forget`: remove a person (`--identity`) or one image (`--image`) from an IDZoom dataset version.

Faces and face embeddings are biometric data. Forgetting removes, from the dataset folder: every image that
shows the person (the image file, all its faces' rows and zoomed crops, its skeleton and landmark maps, the
embeddings, which live in faces.parquet and in any `.journal/` record an interrupted build left, and its faces'
composite-world cut-outs and photo region in world/) — a group photo
is removed whole, since the other faces' crops and maps would still show the person's pixels. Each removed
input stays accounted for as a quarantine row with reason `forgotten` (inputs = images + quarantine still
holds), and `forgotten.json` records the image ids and identities so that `build-data` never takes them back
in, even with other settings.

An erasure survives a kill at any write: it first writes its plan (the image ids, their inputs, the files to
delete) to `forget_journal.json` in the dataset folder, then makes each change in a form that can be repeated
(manifests rewritten without those ids, files deleted), and removes the journal last. Whoever finds a journal
finishes it first: a rerun of `forget` (which then reports the erasure as done), any other `forget`, and
`build-data`; until then `validate` fails on the journal and on every file no manifest references, and
`read_forgotten` already counts the planned ids as forgotten. The folder is locked for the run
(`magicid.locks`): one writer at a time.

The result is a new dataset version: the manifests change, and when the folder is tracked by DVC (a
`dvc.lock` stage output or a `.dvc` file) `dvc commit` records it. Older versions stay in the DVC cache and
remotes and trained models may have learned from them: `forget` lists the registered model versions whose
training run logged the old dataset version (MLflow lineage), which must be retrained or deleted by hand. It
does not touch the raw input folder (the user's files) or copies elsewhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from magicid.config import Params
from magicid.data import manifest as mf
from magicid.errors import DataError, MagicIDError
from magicid.locks import output_lock
from magicid.utils import atomic_write_text

FORGOTTEN = "forgotten.json"
JOURNAL = "forget_journal.json"
REASON = "forgotten"
FORGOTTEN_DETAIL = "removed by magicid forget (see forgotten.json)"
JOURNAL_VERSION = 1


@dataclass
class ForgetReport:
    """What one `forget` call removed, and what still holds the data (model versions trained on it)."""

    dataset_dir: str
    old_version: str
    new_version: str
    removed_images: list[str] = field(default_factory=list)
    removed_faces: int = 0
    removed_files: int = 0
    dvc_committed: bool = False
    model_versions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _read_forgotten_record(out_dir: Path) -> dict:
    path = out_dir / FORGOTTEN
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
    record = _read_forgotten_record(out_dir)
    ids, identities = set(record["image_ids"]), set(record["identities"])
    pending = read_journal(out_dir)
    if pending is not None:
        ids |= set(pending["image_ids"])
        identities |= {pending["identity"]} if pending["identity"] else set()
    return ids, identities


def read_journal(out_dir: str | Path) -> dict | None:
    """The plan of an erasure that has not finished (`forget_journal.json`), or None.

    Raises:
        DataError: the journal is unreadable (it is written atomically, so only a hand edit does that).
    """
    path = Path(out_dir) / JOURNAL
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


def _request(identity: str | None, image_id: str | None) -> str:
    return f"--identity {identity!r}" if identity is not None else f"--image {image_id!r}"


def forget(
    root: str | Path,
    params: Params,
    identity: str | None = None,
    image_id: str | None = None,
    dvc: bool = True,
) -> ForgetReport:
    """Remove one identity's images (or one image) from the dataset at `root`; see the module docstring.

    An erasure that was interrupted (a kill at any write) is finished first; when it was this same request, the
    report describes it. A request whose erasure is already complete reports nothing removed (and still records
    the version with DVC and lists the models trained on versions that held forgotten data).

    Args:
        root: the IDZoom dataset folder.
        params: typed parameters (tracking: where the model registry is; data/faces: for stats.json).
        identity: an `identity` label of faces.parquet.
        image_id: an `image_id` of images.parquet.
        dvc: record the new version with `dvc commit` when the folder is DVC-tracked.

    Raises:
        DataError: neither or both of identity/image_id given, or nothing in the dataset matches (and it was
            never forgotten).
        OutputLocked: another process is writing the folder.
    """
    if (identity is None) == (image_id is None):
        raise DataError("forget: give exactly one of --identity ID or --image IMAGE_ID")
    root = Path(root).resolve()
    if not (root / mf.IMAGES).is_file():
        raise DataError(f"{root}: no images.parquet (not an IDZoom dataset folder)")
    with output_lock(root, "magicid forget"):
        notes = []
        pending = finish_pending_erasure(root, params)
        if pending is not None:
            notes.append(
                f"finished an erasure that was interrupted ({_request(pending['identity'], pending['image_id'])})"
            )
        if pending is not None and (pending["identity"], pending["image_id"]) == (identity, image_id):
            plan = pending
        else:
            plan = _plan(root, identity, image_id)
            if plan is not None:
                atomic_write_text(root / JOURNAL, json.dumps(plan, indent=1, sort_keys=True) + "\n")
                _erase(root, params, plan)
        report = _report(root, params, plan, dvc)
        report.notes[:0] = notes
        if plan is None:
            done = (
                f"{_request(identity, image_id)} was already forgotten ({FORGOTTEN}): nothing of it is left"
            )
            report.notes.insert(0, done)
        return report


def finish_pending_erasure(root: str | Path, params: Params) -> dict | None:
    """Finish the erasure `forget_journal.json` describes, if any (the caller holds the folder's lock).

    Returns:
        The finished plan, or None when no erasure was pending.
    """
    root = Path(root)
    plan = read_journal(root)
    if plan is not None:
        _erase(root, params, plan)
    return plan


def _plan(root: Path, identity: str | None, image_id: str | None) -> dict | None:
    """What erasing `identity` (or `image_id`) removes, from the manifests as they are now; None when it was
    already forgotten and nothing of it is left.

    Raises:
        DataError: nothing matches and it was never forgotten.
    """
    import pyarrow.parquet as pq

    from magicid.data.builder import _files_of, _journal_entries
    from magicid.data.world_ingredients import world_masks_of
    from magicid.training.trainer import dataset_version

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
    for row in removed_rows:
        record = {"status": "image", "image_id": row["image_id"], "image": row,
                  "faces": [f for f in faces if f["image_id"] == row["image_id"]]}  # fmt: skip
        files.update(_files_of(record))
    # An interrupted build's journal may hold a record of the same image (with its embeddings) and its files.
    builder_journal = []
    for path, entry in _journal_entries(root).items():
        if entry["record"]["image_id"] in doomed:
            builder_journal.append(path.name)
            files.update(_files_of(entry["record"]))
    files.update(world_masks_of(root, doomed))
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


def _erase(root: Path, params: Params, plan: dict) -> None:
    """Carry out `plan`; every step gives the same result when repeated, so a rerun after a kill completes it.
    The journal is removed last."""
    import pyarrow.parquet as pq

    from magicid.data.builder import (
        _JOURNAL_NAME,
        JOURNAL_DIR,
        _collect_garbage,
        _files_of,
        _read_ledger,
        _stats,
        _write_ledger,
        config_hash,
        remove_write_leftovers,
    )
    from magicid.data.world_ingredients import forget_world, world_files

    doomed = set(plan["image_ids"])
    # 1. The record that keeps build-data from taking them back (and the versions that held them).
    record = _read_forgotten_record(root)
    body = {
        "image_ids": sorted(set(record["image_ids"]) | doomed),
        "identities": sorted(set(record["identities"]) | ({plan["identity"]} if plan["identity"] else set())),
        "old_versions": sorted(set(record["old_versions"]) | {plan["old_version"]}),
    }
    atomic_write_text(root / FORGOTTEN, json.dumps(body, indent=1) + "\n")

    # 2. Manifests: without the doomed ids; each removed input (and each duplicate of it) a `forgotten` row.
    images = [i for i in pq.read_table(root / mf.IMAGES).to_pylist() if i["image_id"] not in doomed]
    faces = [f for f in pq.read_table(root / mf.FACES).to_pylist() if f["image_id"] not in doomed]
    detail = FORGOTTEN_DETAIL  # one text, whichever way it was forgotten: a rebuild writes the same rows
    by_source = {q["source"]: q for q in pq.read_table(root / mf.QUARANTINE).to_pylist()}
    for source, row in by_source.items():
        if row["image_id"] in doomed:  # duplicates of a forgotten image (same bytes, same image_id)
            by_source[source] = {**row, "reason": REASON, "detail": detail}
    for row in plan["removed"]:
        by_source[row["source"]] = {"source": row["source"], "image_id": row["image_id"], "reason": REASON,
                                    "detail": detail}  # fmt: skip
    quarantine = sorted(by_source.values(), key=lambda row: row["source"])
    mf.write_table(images, mf.IMAGES_SCHEMA, root / mf.IMAGES)
    mf.write_table(faces, mf.FACES_SCHEMA, root / mf.FACES)
    mf.write_table(quarantine, mf.QUARANTINE_SCHEMA, root / mf.QUARANTINE)
    forget_world(
        root, doomed
    )  # the composite world's rows of those images (their masks are in plan["files"])
    stats = _stats(images, faces, quarantine, len(images) + len(quarantine), params, config_hash(params))
    old_stats = json.loads((root / mf.STATS).read_text()) if (root / mf.STATS).is_file() else {}
    stats["config_hash"] = old_stats.get("config_hash", stats["config_hash"])  # same analysis settings
    atomic_write_text(root / mf.STATS, json.dumps(stats, indent=2, sort_keys=True) + "\n")

    # 3. Files: the ledger lists them first (so a build would delete them too), then they are deleted.
    referenced = set(world_files(root))
    for row in images:
        record = {"status": "image", "image_id": row["image_id"], "image": row,
                  "faces": [f for f in faces if f["image_id"] == row["image_id"]]}  # fmt: skip
        referenced.update(_files_of(record))
    written = _read_ledger(root) | referenced | set(plan["files"])
    _write_ledger(root, written)
    _write_ledger(root, _collect_garbage(root, written, referenced))
    journal_dir = root / JOURNAL_DIR
    for name in plan["builder_journal"]:
        path = journal_dir / name
        if _JOURNAL_NAME.fullmatch(name) and not journal_dir.is_symlink() and path.is_file():
            path.unlink()
    remove_write_leftovers(root)
    # The evaluation copies its reference crops next to the generations (the review app shows them): those
    # copies are this person's face too.
    remove_review_references(params.review.generations_dir, plan.get("face_ids", []))
    left = sorted(name for name in plan["files"] if (root / name).exists() or (root / name).is_symlink())
    if left:
        raise DataError(
            f"forget: could not delete {', '.join(left[:5])}; delete them by hand, then rerun the same forget "
            f"to finish the erasure ({root / JOURNAL} holds it)"
        )
    # 4. Done: the journal goes last.
    (root / JOURNAL).unlink()


def remove_review_references(generations_dir: str | Path, face_ids: list[str]) -> int:
    """Delete the evaluation's copies of these faces' reference crops (`<generations_dir>/*/references/<face_id>.png`,
    `magicid.evaluation.report.write_generations`); returns how many were deleted. Idempotent. A generation
    that showed one then reports its missing reference in the review app, by name."""
    from magicid.evaluation.report import REFERENCES_DIR

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


def _report(root: Path, params: Params, plan: dict | None, dvc: bool) -> ForgetReport:
    from magicid.training.trainer import dataset_version

    if plan is None:
        versions = set(_read_forgotten_record(root)["old_versions"])
        report = ForgetReport(dataset_dir=str(root), old_version="", new_version="")
    else:
        versions = {plan["old_version"]}
        report = ForgetReport(
            dataset_dir=str(root),
            old_version=plan["old_version"],
            new_version="",
            removed_images=list(plan["image_ids"]),
            removed_faces=plan["removed_faces"],
            removed_files=len(plan["files"]),
        )
    if dvc:
        report.dvc_committed = _dvc_commit(root, report)
    report.new_version, _ = dataset_version(root)
    report.old_version = report.old_version or report.new_version
    report.model_versions = models_trained_on(params, versions, report)
    if plan is not None:
        report.notes.append(
            "the raw inputs were not touched: delete "
            + ", ".join(sorted(row["source"] for row in plan["removed"]))
            + " from the input folder yourself; older dataset versions remain in the DVC cache and remotes "
            "until garbage-collected (dvc gc), and models trained on them keep what they learned"
        )
    return report


def _dvc_commit(root: Path, report: ForgetReport) -> bool:
    """`dvc commit -f` the folder when DVC tracks it (a dvc.lock output or a `.dvc` file); True when done."""
    tracked = root.parent / f"{root.name}.dvc"
    repo = next((p for p in [root.parent, *root.parent.parents] if (p / ".dvc").is_dir()), None)
    if repo is None:
        report.notes.append("not in a DVC repository: the new version is not recorded by DVC")
        return False
    target = str(tracked if tracked.is_file() else root)
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "commit", "-f", "-q", target],
        cwd=repo, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["?"]
        report.notes.append(f"dvc commit failed ({message[0][:200]}); run `dvc commit {target}` yourself")
        return False
    report.notes.append(f"recorded with `dvc commit {target}`: commit the .dvc/dvc.lock change to git")
    return True


def models_trained_on(params: Params, versions: set[str], report: ForgetReport | None = None) -> list[str]:
    """Registered model versions (`name/version`) whose training run logged one of `versions` as its
    `dataset_version` param (the trainer logs it; the registry links a version to its run)."""
    from mlflow.exceptions import MlflowException

    from magicid.registry import open_client, tracking_store_exists

    uri = params.tracking.uri
    if not tracking_store_exists(uri):
        if report is not None:
            report.notes.append(f"no model registry at {uri}: no model versions to list")
        return []
    client = open_client(params, create=False)
    found = []
    try:
        for version in client.search_model_versions(max_results=10000):
            run_id = version.run_id or (version.tags or {}).get("training_run_id")
            if not run_id:
                continue
            try:
                run = client.get_run(run_id)
            except MlflowException:
                continue
            if run.data.params.get("dataset_version") in versions:
                found.append(f"{version.name}/{version.version}")
    except MlflowException as error:
        raise MagicIDError(f"{uri}: cannot search the model registry ({error})") from error
    return sorted(found)


def forget_cli_summary(report: ForgetReport) -> list[str]:
    lines = [
        f"removed_images: {len(report.removed_images)}",
        f"removed_faces: {report.removed_faces}",
        f"removed_files: {report.removed_files}",
        f"old_dataset_version: {report.old_version}",
        f"new_dataset_version: {report.new_version}",
        f"model_versions_trained_on_it: {', '.join(report.model_versions) or 'none'}",
    ]
    return lines + [f"note: {note}" for note in report.notes]
