"""`forget` survives a kill at any write (issue 27, item 2): a rerun (or `build-data`) finishes the erasure, and
until then `validate` fails; `validate` fails on any file under the dataset that no manifest references."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from magicid.cli import app
from magicid.data import manifest as mf
from magicid.data.builder import build_idzoom
from magicid.data.forgotten import ERASURE_JOURNAL as JOURNAL
from magicid.data.forgotten import read_forgotten
from magicid.data.validation import derive_frames, validate_idzoom
from magicid.errors import ValidationFailed
from magicid.forget import forget
from tests.data.conftest import MAX_PIXELS
from tests.data.forget_kill_cases import KILLED

PERSON = "tom_hanks"
OVERRIDES = [f"data.max_pixels={MAX_PIXELS}", "data.workers=1", "data.crop_size=128"]


def _tree(root: Path) -> dict[str, bytes]:
    """Every entry under `root` (hidden ones included) with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _unreferenced(root: Path) -> list[str]:
    """What the validation suite's `files` expectation flags (without running Great Expectations)."""
    files = derive_frames(root)["files"]
    return sorted(files["unreferenced_path"].dropna())


@pytest.fixture(scope="module")
def kill_cases(built, tmp_path_factory):
    """(cases folder, {"writes": [...], "cases": {name: exit code}}) of `forget_kill_cases.py` on the build."""
    out, _ = built
    cases = tmp_path_factory.mktemp("forget-kill") / "cases"
    script = Path(__file__).with_name("forget_kill_cases.py")
    result = subprocess.run(
        [sys.executable, str(script), str(out), str(cases), PERSON, *OVERRIDES],
        capture_output=True, text=True, timeout=900, cwd=cases.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    # A copy killed before faces.parquet, kept as it is for the build test (the rerun test finishes every case).
    faces_at = [path for _, path in summary["writes"]].index(mf.FACES) + 1
    shutil.copytree(cases / f"before-{faces_at}", cases.parent / "interrupted")
    return cases, summary


@pytest.mark.slow
def test_forget_killed_at_each_write_is_finished_by_a_rerun(built, kill_cases, data_params):
    source, _ = built
    cases, summary = kill_cases
    writes, codes = summary["writes"], summary["cases"]
    images = pq.read_table(source / mf.IMAGES).to_pylist()
    quarantine = pq.read_table(source / mf.QUARANTINE).to_pylist()
    faces = pq.read_table(source / mf.FACES).to_pylist()
    doomed = {f["image_id"] for f in faces if f["identity"] == PERSON}
    their_files = {n for n in _tree(source) if any(n.split("/")[-1].startswith(i) for i in doomed)}
    assert doomed and len(their_files) >= 4
    # Every write an erasure makes: the journal first, the manifests, the files, the journal last.
    names = [path for _, path in writes]
    assert names[0] == JOURNAL and names[-2:] == [JOURNAL, "../.reference.lock"]
    for name in (mf.IMAGES, mf.FACES, mf.QUARANTINE, mf.STATS, *their_files):
        assert name in names, name
    assert len(codes) == 1 + len(writes) + sum(call == "replace" for call, _ in writes)

    # The uninterrupted erasure: everything of theirs gone, inputs = images + quarantine, validation passes.
    reference = cases / "reference"
    expected = _tree(reference)
    assert not their_files & expected.keys()
    images2 = pq.read_table(reference / mf.IMAGES).to_pylist()
    quarantine2 = pq.read_table(reference / mf.QUARANTINE).to_pylist()
    faces2 = pq.read_table(reference / mf.FACES).to_pylist()
    assert not {i["image_id"] for i in images2} & doomed and not {f["image_id"] for f in faces2} & doomed
    sources = {r["source"] for r in images} | {r["source"] for r in quarantine}
    assert {r["source"] for r in images2} | {r["source"] for r in quarantine2} == sources
    assert len(images2) + len(quarantine2) == len(sources)
    assert validate_idzoom(reference, cases / "report-reference").success

    journal_removed_at = len(writes) - 1  # the write that completes the erasure (then the lock file goes)
    images_at = names.index(mf.IMAGES) + 1
    for name, code in sorted(codes.items()):
        if name == "reference":
            continue
        assert code == KILLED, (name, code)
        case = cases / name
        mode, n = name.split("-")
        completed = int(n) - (mode == "before")  # writes that took effect before the kill
        done = completed >= journal_removed_at
        if completed >= 1:  # the plan is on disk: a build would not take them back
            assert doomed <= read_forgotten(case)[0], name
        if (
            not done
        ):  # validate fails until the erasure is finished (the journal, or a half-written one's file)
            unreferenced = _unreferenced(case)
            assert unreferenced and (completed == 0 or JOURNAL in unreferenced), name
        if name == f"after-{images_at}":  # killed after images.parquet: the inputs were in neither manifest
            assert len(pq.read_table(case / mf.IMAGES)) + len(pq.read_table(case / mf.QUARANTINE)) < len(
                sources
            )

        report = forget(case, data_params, identity=PERSON, dvc=False)  # the rerun (takes over a stale lock)

        if done:
            assert report.removed_images == [] and "already forgotten" in report.notes[0], name
        else:
            assert report.removed_images == sorted(doomed) and report.removed_files == len(their_files), name
        assert _tree(case) == expected, name  # byte for byte what the uninterrupted erasure left
        assert not (cases / f".{name}.lock").exists(), name
        assert _unreferenced(case) == [], name
    # Killed after the first manifest write, and before the second, through the whole suite too.
    for name in (f"after-{images_at}", f"before-{images_at + 1}"):
        assert validate_idzoom(cases / name, cases / f"report-{name}").success


@pytest.mark.slow
def test_a_build_finishes_an_interrupted_erasure(kill_cases, raw_dir, data_params, tmp_path):
    cases, _ = kill_cases
    case = Path(
        shutil.copytree(cases.parent / "interrupted", tmp_path / "interrupted")
    )  # before faces.parquet
    assert (case / JOURNAL).is_file()
    build_idzoom(raw_dir, case, data_params, progress=False)
    assert not (case / JOURNAL).exists()
    assert PERSON not in {f["identity"] for f in pq.read_table(case / mf.FACES).to_pylist()}
    reference = _tree(cases / "reference")
    rebuilt = _tree(case)
    for name in (mf.IMAGES, mf.FACES, mf.QUARANTINE):
        assert rebuilt[name] == reference[name], name
    assert rebuilt.keys() == reference.keys()


@pytest.mark.slow
def test_validate_fails_naming_a_file_no_manifest_references(built, tmp_path):
    out, _ = built
    dataset = Path(shutil.copytree(out, tmp_path / "idzoom"))
    (dataset / "crops" / "stray_face.png").write_bytes((dataset / mf.FACES).read_bytes()[:64])
    (dataset / "notes.txt").write_text("mine\n")
    with pytest.raises(ValidationFailed) as info:
        validate_idzoom(dataset, tmp_path / "report")
    message = str(info.value)
    assert "crops/stray_face.png" in message and "notes.txt" in message and "2 file(s)" in message
    result = CliRunner().invoke(app, ["validate", str(dataset), "--report-dir", str(tmp_path / "report")])
    assert result.exit_code == 2 and "crops/stray_face.png" in result.output
    # Control: without them it passes.
    (dataset / "crops" / "stray_face.png").unlink()
    (dataset / "notes.txt").unlink()
    assert validate_idzoom(dataset, tmp_path / "report").success
