"""`build-data` with `--input` and/or `--out` on S3 (`s3://bucket/prefix`), through `magicid.storage`.

The builder works on local folders (it journals, resumes and garbage-collects there), so an S3 side is
mirrored into a staging folder under `storage.cache_dir` (this program's own files): the input is downloaded
(object keys checked, none can land outside the staging folder); the output's existing version is downloaded
first (so unchanged inputs are reused, as locally), built, then uploaded with the data files first and the
manifests and `stats.json` last, and only then are the builder's own stale objects deleted (those in the
version's previous `build_files.json` ledger that the new one no longer lists). A request that fails after
botocore's retries stops the command with a `StorageError` before the manifests are replaced, so the remote
keeps its previous complete version (plus, at worst, new unreferenced files that the next run uploads again).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from magicid.config import Params
from magicid.data import manifest as mf
from magicid.locks import output_lock
from magicid.storage import download_tree, is_s3, open_storage, upload_tree

# Uploaded after every data file, in this order: a reader never sees a manifest before the files it names.
COMMIT_ORDER = (mf.IMAGES, mf.FACES, mf.QUARANTINE, "build_files.json", mf.STATS)


def _staging(params: Params, role: str, uri: str) -> Path:
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return Path(params.storage.cache_dir).resolve() / role / digest


def build_idzoom_at(
    input_location: str | Path, out_location: str | Path, params: Params, progress: bool = True
):
    """`build_idzoom` for local folders or s3:// URIs on either side; returns its `BuildReport` (with
    `out_dir` the location given)."""
    from magicid.data.builder import build_idzoom
    from magicid.data.ledger import LEDGER, OUTPUT_NAME

    if not is_s3(input_location) and not is_s3(out_location):
        return build_idzoom(input_location, out_location, params, progress=progress)
    if str(input_location).rstrip("/") == str(out_location).rstrip("/"):
        from magicid.errors import DataError

        raise DataError(f"{out_location}: the output is the input; choose a separate output location")
    input_dir = Path(input_location)
    if is_s3(input_location):
        input_dir = _staging(params, "input", str(input_location))
        input_dir.mkdir(parents=True, exist_ok=True)
        download_tree(open_storage(input_location, params.storage), input_dir)
    if not is_s3(out_location):
        return build_idzoom(input_dir, out_location, params, progress=progress)

    remote = open_storage(out_location, params.storage)
    out_dir = _staging(params, "output", str(out_location))
    # One build per output on this machine: the staging folder's lock covers download, build and upload.
    with output_lock(out_dir, f"magicid build-data --out {out_location}"):
        out_dir.mkdir(parents=True, exist_ok=True)
        download_tree(remote, out_dir)
        previous = set(json.loads((out_dir / LEDGER).read_text())) if (out_dir / LEDGER).is_file() else set()
        report = build_idzoom(input_dir, out_dir, params, progress=progress)
        upload_tree(out_dir, remote, last=COMMIT_ORDER)
        current = set(json.loads((out_dir / LEDGER).read_text()))
        for key in sorted(previous - current):  # the builder's own outputs only (its ledger), no other object
            if OUTPUT_NAME.fullmatch(key):
                remote.delete(key)
    report.out_dir = str(out_location)
    return report
