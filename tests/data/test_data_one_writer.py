"""Two `build-data` runs into one `--out` (issue 27, item 3): the second stops at once with a one-line error
naming the folder and the first run's pid; the first finishes and its dataset is whole."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from magicid.data import manifest as mf
from magicid.data.validation import validate_idzoom
from magicid.locks import lock_path, read_holder
from tests.data.conftest import MAX_PIXELS

SETTINGS = [f"data.max_pixels={MAX_PIXELS}", "data.workers=1", "data.crop_size=128"]


@pytest.mark.slow
def test_two_builds_into_one_folder_the_second_stops_and_the_first_is_intact(raw_dir, built, tmp_path):
    reference, _ = built
    out = tmp_path / "idzoom"
    other_input = tmp_path / "other_raw"
    other_input.mkdir()
    shutil.copyfile(raw_dir / "good" / "astronaut.png", other_input / "only.png")
    overrides = [arg for setting in SETTINGS for arg in ("--set", setting)]

    def command(input_dir: Path) -> list[str]:
        return [sys.executable, "-m", "magicid", *overrides, "build-data", "--input", str(input_dir),
                "--out", str(out), "--no-progress"]  # fmt: skip

    first = subprocess.Popen(
        command(raw_dir), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while read_holder(lock_path(out)).get("pid") != first.pid and first.poll() is None:
            assert time.monotonic() < deadline, "the first build never took the lock"
            time.sleep(0.05)
        started = time.perf_counter()
        second = subprocess.run(
            command(other_input), cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        seconds = time.perf_counter() - started
        assert first.poll() is None, "the first build must still be running for this test to mean anything"
    finally:
        stdout, stderr = first.communicate(timeout=600)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
    line = second.stderr.strip()
    assert "\n" not in line and str(out) in line and f"pid {first.pid}" in line and "build-data" in line, line
    assert seconds < 20, seconds
    assert first.returncode == 0, stderr[-3000:]
    assert "n_inputs: 14" in stdout
    # The first run's dataset is whole: it validates, and it is what the same build wrote elsewhere.
    assert validate_idzoom(out, tmp_path / "report").success
    for name in (mf.IMAGES, mf.FACES, mf.QUARANTINE, mf.STATS):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not lock_path(out).exists()
