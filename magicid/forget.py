"""`magicid forget`: remove a person (`--identity`) or one image (`--image`) from an IDZoom dataset version.

Faces and face embeddings are biometric data. Forgetting removes, from the dataset folder: every image that
shows the person (the image file, all its faces' rows and zoomed crops, its skeleton and landmark maps, the
embeddings, which live in faces.parquet, and its faces' composite-world cut-outs and photo region in world/) —
a group photo is removed whole, since the other faces' crops and maps would still show the person's pixels. Each removed input stays accounted for as a quarantine row with
reason `forgotten` (inputs = images + quarantine still holds), and `forgotten.json` records the image ids and
identities so that `build-data` never takes them back in, even with other settings.

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
from magicid.utils import atomic_write_text

FORGOTTEN = "forgotten.json"
REASON = "forgotten"
FORGOTTEN_DETAIL = "removed by magicid forget (see forgotten.json)"


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


def read_forgotten(out_dir: str | Path) -> tuple[set[str], set[str]]:
    """(image ids, identities) recorded by `forget` in a dataset folder; empty sets when none."""
    path = Path(out_dir) / FORGOTTEN
    if not path.is_file():
        return set(), set()
    try:
        data = json.loads(path.read_text())
        return set(data["image_ids"]), set(data["identities"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(
            f"{path}: unreadable forget record ({error}); restore it from version control"
        ) from error


def _write_forgotten(out_dir: Path, image_ids: set[str], identities: set[str]) -> None:
    body = {"image_ids": sorted(image_ids), "identities": sorted(identities)}
    atomic_write_text(out_dir / FORGOTTEN, json.dumps(body, indent=1) + "\n")


def forget(
    root: str | Path,
    params: Params,
    identity: str | None = None,
    image_id: str | None = None,
    dvc: bool = True,
) -> ForgetReport:
    """Remove one identity's images (or one image) from the dataset at `root`; see the module docstring.

    Args:
        root: the IDZoom dataset folder.
        params: typed parameters (tracking: where the model registry is; data/faces: for stats.json).
        identity: an `identity` label of faces.parquet.
        image_id: an `image_id` of images.parquet.
        dvc: record the new version with `dvc commit` when the folder is DVC-tracked.

    Raises:
        DataError: neither or both of identity/image_id given, or nothing in the dataset matches.
    """
    import pyarrow.parquet as pq

    from magicid.data.builder import (
        _collect_garbage,
        _files_of,
        _read_ledger,
        _stats,
        _write_ledger,
        config_hash,
    )
    from magicid.training.trainer import dataset_version

    if (identity is None) == (image_id is None):
        raise DataError("forget: give exactly one of --identity ID or --image IMAGE_ID")
    root = Path(root).resolve()
    if not (root / mf.IMAGES).is_file():
        raise DataError(f"{root}: no images.parquet (not an IDZoom dataset folder)")
    old_version, _ = dataset_version(root)
    images = pq.read_table(root / mf.IMAGES).to_pylist()
    faces = pq.read_table(root / mf.FACES).to_pylist()
    quarantine = pq.read_table(root / mf.QUARANTINE).to_pylist()
    if identity is not None:
        doomed = {f["image_id"] for f in faces if f["identity"] == identity}
        if not doomed:
            known = sorted({f["identity"] for f in faces if f["identity"]})
            raise DataError(
                f"forget --identity {identity!r}: no face has it (known: {', '.join(known) or 'none'})"
            )
    else:
        doomed = {image_id} if any(i["image_id"] == image_id for i in images) else set()
        if not doomed:
            raise DataError(f"forget --image {image_id!r}: no such image_id in {root / mf.IMAGES}")

    removed_rows = [i for i in images if i["image_id"] in doomed]
    kept_images = [i for i in images if i["image_id"] not in doomed]
    kept_faces = [f for f in faces if f["image_id"] not in doomed]
    detail = FORGOTTEN_DETAIL  # one text, whichever way it was forgotten: a rebuild writes the same rows
    new_quarantine = [q for q in quarantine if q["image_id"] not in doomed] + [
        {"source": i["source"], "image_id": i["image_id"], "reason": REASON, "detail": detail}
        for i in removed_rows
    ]
    # Duplicates of a forgotten image (same bytes) are forgotten too: their rows carry the same image_id.
    new_quarantine += [
        {**q, "reason": REASON, "detail": detail} for q in quarantine if q["image_id"] in doomed
    ]
    new_quarantine.sort(key=lambda row: row["source"])

    ids, identities = read_forgotten(root)
    _write_forgotten(root, ids | doomed, identities | ({identity} if identity else set()))
    # Manifests first (they no longer name the files), then the files (a crash in between leaves only
    # unreferenced builder outputs, which the ledger still lists and the next build deletes).
    mf.write_table(kept_images, mf.IMAGES_SCHEMA, root / mf.IMAGES)
    mf.write_table(kept_faces, mf.FACES_SCHEMA, root / mf.FACES)
    mf.write_table(new_quarantine, mf.QUARANTINE_SCHEMA, root / mf.QUARANTINE)
    stats = _stats(kept_images, kept_faces, new_quarantine, len(kept_images) + len(new_quarantine), params,
                   config_hash(params))  # fmt: skip
    old_stats = json.loads((root / mf.STATS).read_text()) if (root / mf.STATS).is_file() else {}
    stats["config_hash"] = old_stats.get("config_hash", stats["config_hash"])  # same analysis settings
    atomic_write_text(root / mf.STATS, json.dumps(stats, indent=2, sort_keys=True) + "\n")

    from magicid.data.world_ingredients import forget_world, world_files

    world_doomed = forget_world(root, doomed)  # the composite world's rows and cut-out masks of those images
    referenced = set(world_files(root))
    for row in kept_images:
        record = {"status": "image", "image_id": row["image_id"], "image": row,
                  "faces": [f for f in kept_faces if f["image_id"] == row["image_id"]]}  # fmt: skip
        referenced.update(_files_of(record))
    doomed_files = set()
    for row in removed_rows:
        record = {"status": "image", "image_id": row["image_id"], "image": row,
                  "faces": [f for f in faces if f["image_id"] == row["image_id"]]}  # fmt: skip
        doomed_files.update(_files_of(record))
    doomed_files |= world_doomed
    written = _read_ledger(root) | referenced | doomed_files
    before = {name for name in doomed_files if (root / name).exists()}
    _write_ledger(root, written)
    _write_ledger(root, _collect_garbage(root, written, referenced))
    left = sorted(name for name in doomed_files if (root / name).exists())
    if left:
        raise DataError(f"forget: could not delete {', '.join(left[:5])}; delete them by hand")

    report = ForgetReport(
        dataset_dir=str(root),
        old_version=old_version,
        new_version="",
        removed_images=sorted(doomed),
        removed_faces=len(faces) - len(kept_faces),
        removed_files=len(before),
    )
    if dvc:
        report.dvc_committed = _dvc_commit(root, report)
    report.new_version, _ = dataset_version(root)
    report.model_versions = models_trained_on(params, {old_version}, report)
    report.notes.append(
        "the raw inputs were not touched: delete "
        + ", ".join(sorted(i["source"] for i in removed_rows))
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
    uri = params.tracking.uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        if report is not None:
            report.notes.append(f"no model registry at {uri}: no model versions to list")
        return []
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
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
