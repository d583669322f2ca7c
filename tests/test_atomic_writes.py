"""Atomic writes, tested by killing the writer (issue 11, item 6): after a SIGKILL at any moment the target
holds a complete old or new version, never a torn one (build-data kill/resume: tests/data/test_data_kill_resume.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

WRITER = r"""
import sys, pathlib
from magicid.utils import atomic_write_bytes, atomic_write_dir
from magicid.data import manifest as mf
kind, target = sys.argv[1], pathlib.Path(sys.argv[2])
blobs = [bytes([65]) * (8 << 20), bytes([66]) * (8 << 20)]  # two 8 MiB versions: writes take a while
rows = [{"source": f"s{i}", "image_id": None, "reason": "corrupt", "detail": "x" * 200} for i in range(20000)]
print("ready", flush=True)
i = 0
while True:
    blob = blobs[i % 2]
    if kind == "bytes":
        atomic_write_bytes(target, blob)
    elif kind == "parquet":
        mf.write_table(rows[: 10000 + (i % 2) * 10000], mf.QUARANTINE_SCHEMA, target)
    else:
        def write(folder, blob=blob):
            (folder / "a.bin").write_bytes(blob)
            (folder / "b.bin").write_bytes(blob)
        atomic_write_dir(target, write)
    i += 1
"""


def _check(kind: str, target: Path) -> None:
    if kind == "bytes":
        data = target.read_bytes()
        assert len(data) == 8 << 20 and data in (b"A" * len(data), b"B" * len(data))
    elif kind == "parquet":
        import pyarrow.parquet as pq

        assert pq.read_table(target).num_rows in (10000, 20000)
    else:
        a, b = (target / "a.bin").read_bytes(), (target / "b.bin").read_bytes()
        assert a == b and len(a) == 8 << 20


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bytes", "parquet", "dir"])
def test_killed_writer_leaves_a_complete_version(tmp_path, kind):
    target = tmp_path / {"bytes": "blob.bin", "parquet": "q.parquet", "dir": "model"}[kind]
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    kills = 0
    for delay in (0.35, 0.5, 0.65, 0.8, 0.95):
        process = subprocess.Popen(
            [sys.executable, str(script), kind, str(target)], stdout=subprocess.PIPE, env=env, text=True
        )
        assert process.stdout.readline().strip() == "ready"
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        if target.exists():
            _check(kind, target)
    assert kills == 5 and target.exists()


def test_atomic_write_refuses_special_files_and_keeps_them(tmp_path):
    """Renaming onto a FIFO (or, as root, onto /dev/null) would replace the node itself: refused, node kept."""
    from magicid.safety import OutputPathError
    from magicid.utils import atomic_write_bytes, atomic_write_dir

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OutputPathError, match="is a FIFO"):
        atomic_write_bytes(fifo, b"x")
    with pytest.raises(OutputPathError, match="is a FIFO"):
        atomic_write_dir(fifo, lambda folder: None)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        atomic_write_dir(tmp_path / "file", lambda folder: None)
    assert fifo.is_fifo() and (tmp_path / "file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "file"]  # no temporary left behind


def test_failed_write_names_the_file_and_a_full_disk_is_enospc(tmp_path, monkeypatch):
    import errno

    import magicid.utils as utils

    def no_space(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it: no file name

    with pytest.raises(OSError) as info:
        utils.atomic_write(tmp_path / "a.bin", no_space)
    assert info.value.filename == str(tmp_path / "a.bin")

    def library_error(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] file write failed")  # torch.save's wording

    with pytest.raises(RuntimeError, match="file write failed"):  # plenty of space: the error is its own
        utils.atomic_write(tmp_path / "b.bin", library_error)
    monkeypatch.setattr(utils, "free_bytes", lambda path: 4096)  # the disk is full at that moment
    with pytest.raises(OSError) as info:
        utils.atomic_write(tmp_path / "c.bin", library_error)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "c.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
