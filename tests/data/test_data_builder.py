"""build_idzoom: quarantine invariant, normalisation, identities/splits, determinism, resume, workers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from magicid.data import manifest as mf
from magicid.data.builder import build_idzoom, list_inputs
from magicid.data.ledger import JOURNAL_DIR
from tests.data.conftest import EXPECTED


def test_every_input_is_in_exactly_one_manifest(raw_dir, built):
    out, report = built
    images, faces = mf.read_manifest(out)
    quarantine = mf.read_quarantine(out)
    sources = {entry.source for entry in list_inputs(raw_dir)}
    assert sources == set(EXPECTED)  # the sidecar is metadata, not an input
    taken, rejected = set(images["source"]), set(quarantine["source"])
    assert not taken & rejected
    assert taken | rejected == sources
    assert len(images) + len(quarantine) == len(sources) == report.n_inputs
    reasons = dict(zip(quarantine["source"], quarantine["reason"], strict=True))
    for source, expected in EXPECTED.items():
        assert (source in taken) if expected == "image" else reasons[source] == expected, source
    assert report.quarantine_reasons == json.loads((out / mf.STATS).read_text())["quarantine_reasons"]


def test_images_faces_and_files_are_consistent(built):
    out, _ = built
    images, faces = mf.read_manifest(out)
    assert images["image_id"].is_unique and faces["face_id"].is_unique
    assert set(faces["image_id"]) == set(images["image_id"])
    for row in images.itertuples():
        with Image.open(out / row.path) as image:
            assert image.size == (row.width, row.height)
        for kind in ("skeleton", "landmark"):
            with Image.open(out / mf.CONDITIONS_DIR / f"{row.image_id}_{kind}.png") as cond:
                assert cond.size == (row.width, row.height) and cond.mode == "RGB"
        assert (faces["image_id"] == row.image_id).sum() == row.n_faces
    for face in faces.itertuples():
        with Image.open(out / face.crop_path) as crop:
            assert crop.size == (128, 128)
        assert 0 < face.face_area_ratio <= 1
        assert face.landmarks.shape == (478, 2) and face.kps5.shape == (5, 2)
        assert abs(np.linalg.norm(face.embedding) - 1) < 1e-5
    rotated = images.set_index("source").loc["odd/rotated.jpg"]
    assert (rotated.width, rotated.height) == (400, 512)  # EXIF orientation applied


def test_identities_and_splits(built):
    out, _ = built
    images, faces = mf.read_manifest(out)
    merged = faces.merge(images[["image_id", "source", "split"]], on="image_id")
    by_source = merged.set_index("source")
    assert by_source.loc["good/astronaut.png", "identity"] == "eileen_collins"
    assert by_source.loc["good/tom_hanks.png", "identity"] == "tom_hanks"
    assert by_source.loc["odd/gray.png", "identity"] == "eileen_collins"  # labelled by box
    assert merged.loc[merged["source"] == "odd/rgba.png", "identity"].isna().all()
    labelled = merged.dropna(subset=["identity"])
    assert (labelled.groupby("identity")["split"].nunique() == 1).all()  # no identity in two splits
    assert set(images["split"]) <= {"train", "val", "test"}


def test_rebuild_reuses_everything_and_is_byte_identical(raw_dir, built, data_params):
    out, _ = built
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    report = build_idzoom(raw_dir, out, data_params, progress=False)
    assert report.n_processed == 0 and report.n_reused == report.n_inputs - 1  # all but the duplicate
    after = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert before == after


@pytest.mark.slow
def test_interrupted_build_resumes_to_the_same_result(raw_dir, built, data_params, tmp_path, monkeypatch):
    from magicid.data import worker

    reference, _ = built
    subset = tmp_path / "raw"
    for source in ("good/astronaut.png", "good/tom_hanks.png", "bad/zero.png", "bad/blank.png"):
        (subset / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(raw_dir / source, subset / source)
    out = tmp_path / "idzoom"
    real = worker.process_input
    calls = []

    def crash_on_third(task):
        calls.append(task.source)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(task)

    monkeypatch.setattr(worker, "process_input", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        build_idzoom(subset, out, data_params, progress=False)
    assert len(list((out / JOURNAL_DIR).glob("*.json"))) == 2
    monkeypatch.setattr(worker, "process_input", real)
    report = build_idzoom(subset, out, data_params, progress=False)
    assert (report.n_reused, report.n_processed) == (2, 2)
    assert not (out / JOURNAL_DIR).exists()
    images, faces = mf.read_manifest(out, arrays=False)
    ref_images, ref_faces = mf.read_manifest(reference, arrays=False)
    astro = ref_images[ref_images["source"] == "good/astronaut.png"]["image_id"].item()
    mine = faces[faces["image_id"] == astro].reset_index(drop=True)
    theirs = ref_faces[ref_faces["image_id"] == astro].reset_index(drop=True)
    assert mine["face_id"].tolist() == theirs["face_id"].tolist()
    for column in ("bbox", "kps5", "embedding", "landmarks"):
        assert mine[column].map(list).tolist() == theirs[column].map(list).tolist(), column


@pytest.mark.slow
def test_two_worker_build_equals_one_worker_build(raw_dir, built, data_params, tmp_path):
    subset = tmp_path / "raw"
    for source in ("good/astronaut.png", "good/tom_hanks.png", "bad/notes.txt"):
        (subset / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(raw_dir / source, subset / source)
    one = build_idzoom(subset, tmp_path / "one", data_params, progress=False)
    params2 = data_params.model_copy(update={"data": data_params.data.model_copy(update={"workers": 2})})
    two = build_idzoom(subset, tmp_path / "two", params2, progress=False)
    assert (one.n_images, one.n_quarantined) == (two.n_images, two.n_quarantined) == (2, 1)
    for name in (mf.IMAGES, mf.FACES, mf.QUARANTINE, mf.STATS):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_output_inside_input_is_refused(raw_dir, data_params):
    from magicid.errors import DataError

    with pytest.raises(DataError, match="inside the input"):
        build_idzoom(raw_dir, raw_dir / "out", data_params, progress=False)


def test_malformed_sidecar_is_a_clear_error(tmp_path, data_params):
    from magicid.errors import DataError

    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "identities.json").write_text('{"a.png": "bob"}')
    (tmp_path / "raw" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="identities.json"):
        build_idzoom(tmp_path / "raw", tmp_path / "out", data_params, progress=False)


def test_read_manifest_refuses_paths_outside_the_root(built, tmp_path):
    import pyarrow.parquet as pq

    from magicid.errors import DataError

    out, _ = built
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    table = pq.read_table(broken / mf.IMAGES).to_pylist()
    table[0]["path"] = "../escape.png"
    mf.write_table(table, mf.IMAGES_SCHEMA, broken / mf.IMAGES)
    with pytest.raises(DataError, match="inside the dataset root"):
        mf.read_manifest(broken)
