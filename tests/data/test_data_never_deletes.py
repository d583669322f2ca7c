"""build_idzoom never deletes anything of the user's: overlap refused both ways, garbage collection only
deletes the builder's own recorded outputs (issue 11, item 1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from magicid.cli import app
from magicid.data import manifest as mf
from magicid.data.builder import build_idzoom
from magicid.data.ledger import LEDGER
from magicid.errors import DataError


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture
def project(tmp_path, raw_dir) -> Path:
    """A user's project folder whose raw photos live in `proj/images/` (the layout that lost photos)."""
    photos = tmp_path / "proj" / "images"
    photos.mkdir(parents=True)
    for source in ("good/astronaut.png", "bad/notes.txt"):
        shutil.copyfile(raw_dir / source, photos / Path(source).name)
    (photos / "holiday.jpg").write_bytes(b"the user's own photo bytes")
    return tmp_path / "proj"


@pytest.mark.parametrize(
    "input_rel, out_rel",
    [
        ("images", "."),  # input inside output: `--input proj/images --out proj`
        (".", "images/out"),  # output inside input
        ("images", "images"),  # the same folder
    ],
)
def test_overlapping_input_and_output_are_refused_and_nothing_changes(
    project, data_params, input_rel, out_rel
):
    before = _snapshot(project)
    with pytest.raises(DataError, match="input|output"):
        build_idzoom(project / input_rel, project / out_rel, data_params, progress=False)
    assert _snapshot(project) == before


def test_overlap_through_a_symlink_is_refused(project, tmp_path, data_params):
    link = tmp_path / "link_to_proj"
    link.symlink_to(project, target_is_directory=True)
    before = _snapshot(project)
    with pytest.raises(DataError, match="inside the output"):
        build_idzoom(project / "images", link, data_params, progress=False)
    assert _snapshot(project) == before


def test_cli_refuses_input_inside_output_with_one_line_reason(project):
    before = _snapshot(project)
    result = CliRunner().invoke(
        app,
        [
            "--set",
            "data.workers=1",
            "build-data",
            "--input",
            str(project / "images"),
            "--out",
            str(project),
            "--no-progress",
        ],
    )
    assert result.exit_code != 0
    assert "must not be inside the output folder" in result.output
    assert "Traceback" not in result.output
    assert _snapshot(project) == before


def test_garbage_collection_keeps_files_the_builder_did_not_write(project, tmp_path, data_params):
    """An output folder that already holds files in images/, crops/ and conditions/ (as `--out .` in a
    project with an images/ folder): none of them is deleted, even with builder-shaped names."""
    out = project  # input elsewhere, output = the user's project folder
    inputs = tmp_path / "raw_elsewhere"
    inputs.mkdir()
    shutil.copyfile(project / "images" / "astronaut.png", inputs / "astronaut.png")
    user_files = {
        "images/holiday.jpg",
        "images/0123456789abcdef.png",  # looks like one of the builder's names, but it never wrote it
        "crops/0123456789abcdef_00.png",
        "conditions/0123456789abcdef_landmark.png",
        "notes.txt",
    }
    for name in user_files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"user data " + name.encode())
    before = {name: (out / name).read_bytes() for name in user_files | {"images/astronaut.png"}}
    report = build_idzoom(inputs, out, data_params, progress=False)
    assert report.n_images == 1
    assert {name: (out / name).read_bytes() for name in before} == before
    ledger = set(json.loads((out / LEDGER).read_text()))
    assert not ledger & user_files and all((out / name).is_file() for name in ledger)


def test_stale_outputs_of_the_builder_are_deleted_and_forged_ledger_entries_are_not(
    raw_dir, tmp_path, data_params
):
    inputs = tmp_path / "raw"
    inputs.mkdir()
    for source in ("good/astronaut.png", "good/tom_hanks.png"):
        shutil.copyfile(raw_dir / source, inputs / Path(source).name)
    out = tmp_path / "idzoom"
    build_idzoom(inputs, out, data_params, progress=False)
    images, faces = mf.read_manifest(out, arrays=False)
    hanks = images[images["source"] == "tom_hanks.png"].iloc[0]
    hanks_files = [hanks["path"], *faces[faces["image_id"] == hanks["image_id"]]["crop_path"]]
    hanks_files += [
        f"{mf.CONDITIONS_DIR}/{hanks['image_id']}_{kind}.png" for kind in ("skeleton", "landmark")
    ]
    assert all((out / name).is_file() for name in hanks_files)

    # A forged ledger: entries that escape the output, or name a user's file, must never be deleted.
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not the builder's")
    user_file = out / "images" / "mine.png"
    user_file.write_bytes(b"the user's")
    ledger = json.loads((out / LEDGER).read_text())
    ledger += ["../outside.png", "images/../../outside.png", "images/mine.png", str(outside)]
    (out / LEDGER).write_text(json.dumps(ledger))

    (inputs / "tom_hanks.png").unlink()
    report = build_idzoom(inputs, out, data_params, progress=False)
    assert (report.n_images, report.n_reused) == (1, 1)
    assert not any((out / name).exists() for name in hanks_files)  # the builder's own stale outputs
    assert outside.read_bytes() == b"not the builder's" and user_file.read_bytes() == b"the user's"
    ledger = set(json.loads((out / LEDGER).read_text()))
    assert ledger and not ledger & set(hanks_files) and all((out / name).is_file() for name in ledger)


def test_symlinked_output_subfolder_is_refused(raw_dir, tmp_path, data_params):
    inputs = tmp_path / "raw"
    inputs.mkdir()
    shutil.copyfile(raw_dir / "good/astronaut.png", inputs / "astronaut.png")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "keep.jpg").write_bytes(b"keep")
    out = tmp_path / "idzoom"
    out.mkdir()
    (out / "images").symlink_to(photos, target_is_directory=True)
    with pytest.raises(DataError, match="symlink"):
        build_idzoom(inputs, out, data_params, progress=False)
    assert [p.name for p in photos.iterdir()] == ["keep.jpg"]
