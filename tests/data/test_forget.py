"""`magicid forget` (issue 11, item 8): a person's rows, crops, condition maps and embeddings leave the dataset
as a new version, a rebuild does not bring them back, and the model versions trained on it are listed."""

from __future__ import annotations

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
from magicid.errors import DataError
from magicid.forget import forget


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def dataset(built, tmp_path) -> Path:
    out, _ = built
    return Path(shutil.copytree(out, tmp_path / "repo" / "idzoom"))


def _tables(root: Path):
    return (pq.read_table(root / name).to_pylist() for name in (mf.IMAGES, mf.FACES, mf.QUARANTINE))


@pytest.mark.slow
def test_forget_identity_removes_everything_of_theirs_and_nothing_else(
    dataset, data_params, raw_dir, tmp_path
):
    images, faces, quarantine = _tables(dataset)
    doomed = {f["image_id"] for f in faces if f["identity"] == "tom_hanks"}
    assert doomed
    their_files = {n for n in _files(dataset) if any(n.split("/")[-1].startswith(i) for i in doomed)}
    assert any(n.startswith("crops/") for n in their_files) and any(
        n.startswith("conditions/") for n in their_files
    )
    before = _files(dataset)

    report = forget(dataset, data_params, identity="tom_hanks", dvc=False)

    images2, faces2, quarantine2 = _tables(dataset)
    assert not {i["image_id"] for i in images2} & doomed and not {f["image_id"] for f in faces2} & doomed
    assert all(f["identity"] != "tom_hanks" for f in faces2)
    assert len(faces2) == len(faces) - report.removed_faces and report.removed_faces >= 1
    after = _files(dataset)
    assert not their_files & after.keys() and report.removed_files == len(their_files)
    untouched = {n for n in before if n.split("/")[0] in ("images", "crops", "conditions")} - their_files
    assert all(after[n] == before[n] for n in untouched)
    forgotten = [q for q in quarantine2 if q["reason"] == "forgotten"]
    assert {q["source"] for q in forgotten} == {i["source"] for i in images if i["image_id"] in doomed}
    assert len(images2) + len(quarantine2) == len(images) + len(quarantine)  # inputs = images + quarantine
    assert report.new_version != report.old_version
    assert any("raw inputs were not touched" in note for note in report.notes)

    # A rebuild from the same raw folder does not bring them back (and changes nothing forget wrote).
    forgotten_state = _files(dataset)
    build_idzoom(raw_dir, dataset, data_params, progress=False)
    rebuilt = _files(dataset)
    assert not {i["image_id"] for i in pq.read_table(dataset / mf.IMAGES).to_pylist()} & doomed
    for name in (mf.IMAGES, mf.FACES, mf.QUARANTINE):
        assert rebuilt[name] == forgotten_state[name], name
    # ...even with other analysis settings (no previous records are reused then).
    other = data_params.model_copy(update={"data": data_params.data.model_copy(update={"crop_size": 96})})
    build_idzoom(raw_dir, tmp_path / "fresh", other, progress=False)  # control: found without forgotten.json
    assert "tom_hanks" in {f["identity"] for f in pq.read_table(tmp_path / "fresh" / mf.FACES).to_pylist()}
    build_idzoom(raw_dir, dataset, other, progress=False)
    assert not {f["identity"] for f in pq.read_table(dataset / mf.FACES).to_pylist()} & {"tom_hanks"}


@pytest.mark.slow
def test_forget_lists_the_model_versions_trained_on_the_old_version(dataset, data_params, tmp_path):
    from mlflow import MlflowClient

    from magicid.data.version import dataset_version

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = data_params.model_copy(update={"tracking": data_params.tracking.model_copy(update={"uri": uri})})
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    client.create_registered_model("magicid")
    old, _ = dataset_version(dataset)
    for version_param in (old, "some-other-version"):
        run = client.create_run(experiment)
        client.log_param(run.info.run_id, "dataset_version", version_param)
        client.create_model_version("magicid", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    report = forget(
        dataset, params, image_id=pq.read_table(dataset / mf.IMAGES).to_pylist()[0]["image_id"], dvc=False
    )
    assert report.model_versions == ["magicid/1"]


@pytest.mark.slow
def test_forget_records_a_new_dvc_version(dataset, data_params, monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    repo = dataset.parent
    for args in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                 [sys.executable, "-m", "dvc", "add", "-q", "idzoom"]):  # fmt: skip
        assert subprocess.run(args, cwd=repo, capture_output=True, timeout=300).returncode == 0
    before = (repo / "idzoom.dvc").read_text()
    report = forget(dataset, data_params, identity="tom_hanks")
    assert report.dvc_committed and (repo / "idzoom.dvc").read_text() != before
    assert report.new_version in (repo / "idzoom.dvc").read_text()


@pytest.mark.parametrize(
    "args, reason",
    [
        (["forget"], "exactly one of"),
        (["forget", "--identity", "a", "--image", "b"], "exactly one of"),
        (["forget", "--identity", "nobody"], "no face has it"),
        (["forget", "--image", "0000000000000000"], "no such image_id"),
    ],
)
def test_forget_bad_arguments_are_one_line_errors(built, args, reason):
    out, _ = built
    result = CliRunner().invoke(app, [*args, "--data", str(out), "--no-dvc"])
    assert result.exit_code == 2 and reason in result.output and "Traceback" not in result.output


def test_forget_needs_a_dataset(tmp_path, data_params):
    with pytest.raises(DataError, match="not an IDZoom dataset"):
        forget(tmp_path, data_params, identity="x")


def test_forget_deletes_the_evaluations_copies_of_their_reference_crops(dataset, data_params, tmp_path):
    """The review app shows reference crops copied next to the generations (evaluation/report.py): forgetting a
    person deletes their copies in every version's folder and leaves everyone else's."""
    _, faces, _ = _tables(dataset)
    theirs = [f["face_id"] for f in faces if f["identity"] == "tom_hanks"]
    others = [f["face_id"] for f in faces if f["identity"] != "tom_hanks"]
    assert theirs and others
    generations = tmp_path / "generations"
    for version in ("v1", "v2"):
        references = generations / version / "references"
        references.mkdir(parents=True)
        for face_id in (theirs[0], others[0]):
            (references / f"{face_id}.png").write_bytes(b"png")
    params = data_params.model_copy(
        update={"review": data_params.review.model_copy(update={"generations_dir": str(generations)})}
    )

    forget(dataset, params, identity="tom_hanks", dvc=False)

    left = sorted(p.relative_to(generations).as_posix() for p in generations.rglob("*.png"))
    assert left == [f"{v}/references/{others[0]}.png" for v in ("v1", "v2")]
