"""`magicid forget`: remove a person (`--identity`) or one image (`--image`) from an IDZoom dataset version.

Faces and face embeddings are biometric data. Forgetting removes, from the dataset folder: every image that
shows the person (the image file, all its faces' rows and zoomed crops, its skeleton and landmark maps, the
embeddings, which live in faces.parquet and in any `.journal/` record an interrupted build left, and its faces'
composite-world cut-outs and photo region in world/) — a group photo
is removed whole, since the other faces' crops and maps would still show the person's pixels. Each removed
input stays accounted for as a quarantine row with reason `forgotten` (inputs = images + quarantine still
holds), and `forgotten.json` records the image ids and identities so that `build-data` never takes them back
in, even with other settings.

The erasure itself (plan, journal, record, the changes) is `magicid.data.forgotten`; this module is the workload:
lock, finish, plan, erase, report. An erasure survives a kill at any write: it first writes its plan (the image ids, their inputs, the files to
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

from dataclasses import asdict, dataclass, field
from pathlib import Path

from magicid.config import Params
from magicid.data import manifest as mf
from magicid.data.forgotten import (
    FORGOTTEN,
    erase,
    finish_pending_erasure,
    plan_erasure,
    read_forgotten_record,
    write_erasure_journal,
)
from magicid.data.version import dataset_version, dvc_commit
from magicid.errors import DataError, MagicIDError
from magicid.locks import output_lock


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
            plan = plan_erasure(root, identity, image_id)
            if plan is not None:
                write_erasure_journal(root, plan)
                erase(root, params, plan)
        report = _report(root, params, plan, dvc)
        report.notes[:0] = notes
        if plan is None:
            done = (
                f"{_request(identity, image_id)} was already forgotten ({FORGOTTEN}): nothing of it is left"
            )
            report.notes.insert(0, done)
        return report


def _report(root: Path, params: Params, plan: dict | None, dvc: bool) -> ForgetReport:
    if plan is None:
        versions = set(read_forgotten_record(root)["old_versions"])
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
        report.dvc_committed, note = dvc_commit(root)
        report.notes.append(note)
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
