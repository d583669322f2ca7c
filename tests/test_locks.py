"""One writer per output folder (issue 27, item 3): `magicid.locks.output_lock`, and `build-data`, `train`,
`fit-backbone` and `forget` stopping at once with a one-line error naming the folder and the holder's pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from magicid.errors import MagicIDError, OutputLocked
from magicid.locks import lock_path, output_lock, read_holder

HOLDER = """
import sys
from magicid.locks import output_lock
with output_lock(sys.argv[1], "test holder"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills this process)
"""


def _start_holder(folder: Path) -> subprocess.Popen:
    """A separate process holding the lock of `folder` (until its stdin closes)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def _stop(holder: subprocess.Popen) -> None:
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0


def _dead_pid() -> int:
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(finished.stdout)


def test_a_second_process_is_refused_at_once_naming_the_folder_and_the_holder(tmp_path):
    folder = tmp_path / "out"
    holder = _start_holder(folder)
    try:
        started = time.perf_counter()
        with pytest.raises(OutputLocked) as info, output_lock(folder, "magicid build-data"):
            pass
        assert time.perf_counter() - started < 1.0
        message = str(info.value)
        assert str(folder) in message and f"pid {holder.pid}" in message and "test holder" in message
        assert "\n" not in message
        assert read_holder(lock_path(folder))["pid"] == holder.pid  # the refused run changed nothing
    finally:
        _stop(holder)
    assert not lock_path(folder).exists()  # released: the file goes with it
    with output_lock(folder, "magicid build-data") as path:  # free again
        assert read_holder(path)["pid"] == os.getpid()


def test_the_lock_of_a_killed_holder_is_taken_over(tmp_path):
    folder = tmp_path / "out"
    holder = _start_holder(folder)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert read_holder(lock_path(folder))["pid"] == holder.pid  # its file stays behind...
    with output_lock(folder, "magicid train") as path:  # ...and is not obeyed
        assert read_holder(path)["pid"] == os.getpid() and read_holder(path)["command"] == "magicid train"
    assert not path.exists()


@pytest.mark.parametrize("content", ["pid", "garbage", "empty"])
def test_a_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path, content):
    folder = tmp_path / "out"
    dead = _dead_pid()
    body = {
        "pid": json.dumps({"pid": dead, "command": "magicid forget"}),
        "garbage": "\x00{not json",
        "empty": "",
    }
    lock_path(folder).write_text(body[content])
    with output_lock(folder, "magicid forget") as path:
        assert read_holder(path)["pid"] == os.getpid()


def test_reentrant_in_one_process_and_one_lock_for_two_spellings(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with output_lock(real, "outer") as outer:
        with output_lock(tmp_path / "link", "inner") as inner:  # a nested call in the same process
            assert inner == outer
        assert outer.exists()  # still held by the outer block
        holder = subprocess.run(
            [sys.executable, "-c", HOLDER, str(tmp_path / "link")], capture_output=True, text=True, timeout=60
        )
        assert (
            holder.returncode != 0 and "OutputLocked" in holder.stderr and str(os.getpid()) in holder.stderr
        )
    assert not outer.exists()


def test_a_symlink_at_the_lock_path_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    folder = tmp_path / "out"
    lock_path(folder).symlink_to(victim)
    with pytest.raises(MagicIDError, match="cannot create its lock file"), output_lock(folder, "x"):
        pass
    assert victim.read_text() == "keep me\n"


# ---------------------------------------------------------------------------------------------------------------
# the four commands, as separate processes
# ---------------------------------------------------------------------------------------------------------------
def _cli(args: list[str], cwd: Path, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "magicid", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )
    return result, time.perf_counter() - started


def _listing(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def synthetic_dataset(tmp_path_factory) -> Path:
    from magicid.training.synthetic import write_synthetic_idzoom

    return write_synthetic_idzoom(tmp_path_factory.mktemp("locks") / "idzoom", n_images=4, crop_size=64)


@pytest.mark.parametrize("command", ["build-data", "train", "fit-backbone", "fit-world", "forget"])
def test_each_writer_stops_at_once_when_its_output_is_locked(command, synthetic_dataset, tmp_path):
    import shutil

    dataset = Path(shutil.copytree(synthetic_dataset, tmp_path / "idzoom"))
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.png").write_bytes(b"not read: the lock is taken first")
    folder = {"build-data": tmp_path / "built", "train": tmp_path / "run", "fit-backbone": tmp_path / "fitted",
              "fit-world": tmp_path / "world", "forget": dataset}[command]  # fmt: skip
    folder.mkdir(exist_ok=True)
    (folder / "earlier.txt").write_text("an earlier run's file\n")
    args = {
        "build-data": ["build-data", "--input", str(raw), "--out", str(folder), "--no-progress"],
        "train": ["--set", f"train.out_dir={folder}", "train", "--data", str(dataset), "--no-register"],
        "fit-backbone": ["fit-backbone", "--data", str(dataset), "--out", str(folder), "--no-progress"],
        "fit-world": ["fit-world", "--data", str(dataset), "--out", str(folder), "--no-progress"],
        "forget": ["forget", "--identity", "id0", "--data", str(folder), "--no-dvc"],
    }[command]
    before = _listing(folder)
    holder = _start_holder(folder)
    try:
        result, seconds = _cli(args, cwd=tmp_path)
    finally:
        _stop(holder)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(folder.resolve()) in lines[0] and f"pid {holder.pid}" in lines[0], lines[0]
    assert _listing(folder) == before  # nothing written, nothing cleaned up
    assert seconds < 20, seconds  # the start-up only: the lock comes before any heavy import or work


@pytest.mark.slow
def test_two_trains_into_one_folder_the_second_stops_and_the_first_finishes(synthetic_dataset, tmp_path):
    out = tmp_path / "run"
    overrides = [
        arg
        for setting in [
            "model.resolution=64",
            "model.device=cpu",
            "model.id_crop_size=32",
            "train.batch_size=1",
            "train.steps=40",
            "train.checkpoint_every=20",
            f"train.out_dir={out}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.artifact_root={tmp_path / 'mlartifacts'}",
        ]  # fmt: skip
        for arg in ("--set", setting)
    ]
    args = [*overrides, "train", "--data", str(synthetic_dataset), "--no-register", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "magicid", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while (
            not read_holder(lock_path(out)).get("pid")
            and first.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert read_holder(lock_path(out)).get("pid") == first.pid, (
            first.stderr.read() if first.poll() else ""
        )
        second, seconds = _cli(args, cwd=tmp_path)
        assert first.poll() is None, "the first run must still be running for this test to mean anything"
    finally:
        stdout, stderr = first.communicate(timeout=600)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert (
        str(out) in second.stderr and f"pid {first.pid}" in second.stderr and "magicid train" in second.stderr
    )
    assert len(second.stderr.strip().splitlines()) == 1
    assert first.returncode == 0, stderr[-3000:]
    assert "step: 40" in stdout
    assert (out / "adapter" / "adapter.safetensors").is_file()
    assert not lock_path(out).exists()
