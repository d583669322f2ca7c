"""Great Expectations validation: passes on a real build, fails on a planted broken manifest."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from magicid.data import manifest as mf
from magicid.data.validation import validate_idzoom
from magicid.errors import ValidationFailed


@pytest.mark.slow
def test_valid_build_passes_and_writes_docs(built, tmp_path):
    out, _ = built
    report = validate_idzoom(out, tmp_path / "report")
    assert report.success and report.n_failed == 0 and report.n_expectations > 40
    assert (tmp_path / "report" / "data_docs" / "index.html").is_file()
    assert (tmp_path / "report" / "validation.json").is_file()


@pytest.mark.slow
def test_planted_broken_manifest_fails_with_each_problem_named(built, tmp_path):
    out, _ = built
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    faces = pq.read_table(broken / mf.FACES).to_pylist()
    images = pq.read_table(broken / mf.IMAGES).to_pylist()
    width = next(i["width"] for i in images if i["image_id"] == faces[0]["image_id"])
    faces[0]["bbox"] = [10.0, 10.0, width + 50.0, 60.0]  # outside its image
    faces[1]["embedding"] = list(np.asarray(faces[1]["embedding"]) * 2)  # not unit norm
    faces[2]["kps5"] = [-100.0] * 10  # keypoints outside the box
    faces[3]["face_id"] = faces[4]["face_id"]  # duplicate id
    faces[5]["image_id"] = "0000000000000000"  # dangling reference
    faces[6]["face_area_ratio"] = 0.0
    mf.write_table(faces, mf.FACES_SCHEMA, broken / mf.FACES)
    with pytest.raises(ValidationFailed) as info:
        validate_idzoom(broken, tmp_path / "report")
    message = str(info.value)
    for expected in (
        "bbox_inside_image",
        "embedding_norm",
        "kps_inside_box",
        "face_id",
        "image_id_known",
        "face_area_ratio",
        "n_faces_matches",
        "data docs: ",
    ):
        assert expected in message, expected
    assert str(tmp_path / "report" / "data_docs" / "index.html") in message


@pytest.mark.slow
def test_crop_and_image_symlinked_out_of_the_root_fail_validation(built, tmp_path):
    out, _ = built
    broken = tmp_path / "linked"
    shutil.copytree(out, broken)
    outside = tmp_path / "outside.png"
    faces = pq.read_table(broken / mf.FACES).to_pylist()
    images = pq.read_table(broken / mf.IMAGES).to_pylist()
    crop, image = broken / faces[0]["crop_path"], broken / images[0]["path"]
    shutil.copyfile(crop, outside)
    crop.unlink()
    crop.symlink_to(outside)  # same bytes, but outside the dataset root
    image.unlink()
    image.symlink_to("/etc/hostname")
    with pytest.raises(ValidationFailed) as info:
        validate_idzoom(broken, tmp_path / "report")
    assert "crop_exists" in str(info.value) and "file_exists" in str(info.value)


@pytest.mark.parametrize(
    "manifest, column, value",
    [(mf.FACES, "bbox", "1,2,3,4"), (mf.IMAGES, "width", "wide"), (mf.FACES, "embedding", 0.5)],
)
def test_wrong_column_type_fails_naming_the_column(built, tmp_path, manifest, column, value):
    import pyarrow as pa

    out, _ = built
    broken = tmp_path / "typed"
    shutil.copytree(out, broken)
    table = pq.read_table(broken / manifest)
    index = table.schema.get_field_index(column)
    table = table.set_column(index, column, pa.array([value] * table.num_rows))
    pq.write_table(table, broken / manifest)
    with pytest.raises(ValidationFailed, match=rf"{manifest} column '{column}' has type"):
        validate_idzoom(broken, tmp_path / "report")
