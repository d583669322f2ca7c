"""Inputs = kept + quarantined, always, with no hang (issue 11, item 2): FIFOs, broken and escaping symlinks,
symlinked folders, unreadable files and folders, non-UTF-8 names, over-wide images, malformed sidecar boxes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from magicid.data import manifest as mf
from magicid.data.builder import build_idzoom
from magicid.data.ingest import REASONS, load_image
from magicid.data.inputs import list_input_entries
from magicid.errors import DataError, InputRejected
from magicid.safety import MAX_SIDE


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` (no pixel data): what a size check must catch unread."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.fixture
def no_hang():
    """Turn a hang (a FIFO opened for reading) into a test failure instead of a stuck suite."""

    def alarm(signum, frame):
        raise TimeoutError("hung: something opened a FIFO or blocked on an input")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def hostile(tmp_path, raw_dir) -> tuple[Path, dict[str, str]]:
    """An input folder of hostile entries, and the expected outcome per source."""
    root = tmp_path / "in"
    (root / "real").mkdir(parents=True)
    shutil.copyfile(raw_dir / "bad/notes.txt", root / "real/notes.txt")
    os.mkfifo(root / "fifo.png")
    (root / "dangling.png").symlink_to(root / "missing.png")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(outside / "secret.png")  # opened, it would block forever
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "escape_dir").symlink_to(outside, target_is_directory=True)
    (root / "linked_real").symlink_to(root / "real", target_is_directory=True)
    (root / "zlink.txt").symlink_to(root / "real/notes.txt")  # inside the root: read, same bytes
    os.close(os.open(os.fsencode(root) + b"/caf\xe9.png", os.O_CREAT | os.O_WRONLY))
    (root / "wide.png").write_bytes(png_header_only(MAX_SIDE + 1, 16))
    expected = {
        "real/notes.txt": "not_an_image",
        "fifo.png": "not_a_file",
        "dangling.png": "broken_link",
        "escape.png": "link_outside_input",
        "escape_dir": "link_outside_input",
        "linked_real": "linked_folder",
        "zlink.txt": "duplicate",
        "caf\\xe9.png": "bad_name",
        "wide.png": "too_large",
    }
    return root, expected


def test_every_hostile_entry_is_a_quarantine_row_with_its_reason(hostile, data_params, tmp_path, no_hang):
    root, expected = hostile
    report = build_idzoom(root, tmp_path / "out", data_params, progress=False)
    quarantine = pq.read_table(tmp_path / "out" / mf.QUARANTINE).to_pylist()
    images = pq.read_table(tmp_path / "out" / mf.IMAGES).to_pylist()
    got = {row["source"]: row["reason"] for row in quarantine}
    assert got == expected
    assert not images and report.n_inputs == len(expected) == report.n_quarantined
    assert set(got.values()) <= set(REASONS)
    assert all(row["detail"] for row in quarantine)


def test_unreadable_file_and_folder_are_quarantined(tmp_path, monkeypatch, no_hang):
    root = tmp_path / "in"
    (root / "locked").mkdir(parents=True)
    (root / "locked/a.png").write_bytes(b"x")
    (root / "secret.png").write_bytes(b"x")
    (root / "ok.png").write_bytes(b"x")
    if os.geteuid() == 0:  # root reads everything: simulate what permissions do for anyone else
        import magicid.data.inputs as inputs

        real_scandir, real_access = os.scandir, os.access

        def scandir(path):
            if str(path).endswith("locked"):
                raise PermissionError(13, "Permission denied")
            return real_scandir(path)

        monkeypatch.setattr(inputs.os, "scandir", scandir)
        monkeypatch.setattr(
            inputs.os,
            "access",
            lambda p, mode: False if str(p).endswith("secret.png") else real_access(p, mode),
        )
    else:
        (root / "secret.png").chmod(0)
        (root / "locked").chmod(0)
    try:
        entries = {e.source: (e.reason, e.path is not None) for e in list_input_entries(root)}
    finally:
        (root / "locked").chmod(0o755)
    assert entries == {
        "locked": ("unreadable", False),
        "secret.png": ("unreadable", False),
        "ok.png": (None, True),
    }


def test_size_limit_is_read_from_the_header_before_decoding(tmp_path):
    path = tmp_path / "tall.png"
    path.write_bytes(png_header_only(16, 40_000))  # 640k pixels: under max_pixels, over OpenCV's side limit
    with pytest.raises(InputRejected) as caught:
        load_image(path, max_pixels=10**9)
    assert caught.value.reason == "too_large" and str(MAX_SIDE) in str(caught.value)


@pytest.mark.parametrize(
    "bbox", [["a", 0, 10, 10], [0, 0, True, 10], [0, 0, float("nan"), 10], [5, 0, 1, 10]]
)
def test_malformed_sidecar_box_is_a_clear_error(tmp_path, data_params, bbox, raw_dir):
    root = tmp_path / "in"
    root.mkdir()
    shutil.copyfile(raw_dir / "bad/notes.txt", root / "notes.txt")
    (root / "identities.json").write_text(json.dumps({"notes.txt": [{"identity": "x", "bbox": bbox}]}))
    with pytest.raises(DataError, match="identities.json.*malformed"):
        build_idzoom(root, tmp_path / "out", data_params, progress=False)


def test_sidecar_that_is_a_fifo_is_an_error_not_a_hang(tmp_path, data_params, raw_dir, no_hang):
    root = tmp_path / "in"
    root.mkdir()
    shutil.copyfile(raw_dir / "bad/notes.txt", root / "notes.txt")
    os.mkfifo(root / "identities.json")
    with pytest.raises(DataError, match="sidecar is not a regular file"):
        build_idzoom(root, tmp_path / "out", data_params, progress=False)
