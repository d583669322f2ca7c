"""build-data killed with SIGKILL mid-run resumes to byte-identical outputs (issue 11, item 6)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import MAX_PIXELS


@pytest.mark.slow
def test_build_data_killed_mid_run_resumes_byte_identical(raw_dir, built, tmp_path):
    """SIGKILL a real `magicid build-data` process after its first journal entry, rerun: same bytes as a build
    that was never interrupted (the session's `built`, same settings)."""
    reference, _ = built
    out = tmp_path / "killed"
    command = [
        sys.executable, "-m", "magicid.cli",
        "--set", f"data.max_pixels={MAX_PIXELS}", "--set", "data.workers=1", "--set", "data.crop_size=128",
        "build-data", "--input", str(raw_dir), "--out", str(out), "--no-progress",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        journal = out / ".journal"
        if journal.is_dir() and len(list(journal.glob("*.json"))) >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the build finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "stats.json").exists()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]

    def files(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
        }

    got, want = files(out), files(reference)
    assert got.keys() == want.keys()
    differing = [name for name in want if got[name] != want[name]]
    assert differing == [] or differing == ["stats.json"] and _same_stats(out, reference), differing


def _same_stats(a: Path, b: Path) -> bool:
    import json

    return json.loads((a / "stats.json").read_text()) == json.loads((b / "stats.json").read_text())
