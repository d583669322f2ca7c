"""One writer per output folder: `output_lock(folder, command)` holds an exclusive lock that names its holder.

`build-data`, `train`, `fit-backbone` and `forget` write into one folder each and clean up after themselves
(stale outputs, old checkpoints, a swapped-in model folder); two of them on one folder at once would delete
each other's files. Each holds this lock for the whole run, and a second run stops at once with an
`OutputLocked` error naming the folder and the holder (pid, command, host, start time).

The lock is `fcntl.flock` on a file beside the folder, `<parent>/.<name>.lock` (beside, not inside: a dataset
folder is hashed by DVC as a whole, and `fit-backbone` swaps its folder in whole). The operating system drops
an flock when its holder exits, however it exits, so the file of a killed run is a stale lock that the next run
simply takes over; the pid written in it serves only the message. The file is removed on release.

Re-entrant within one process (a function holding the lock may call another that takes it): the lock
separates processes, not threads.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from magicid.errors import MagicIDError, OutputLocked

# lock file path -> [fd, depth, pid] of the locks this process holds (pid: a forked child holds nothing)
_HELD: dict[Path, list[int]] = {}
_GUARD = threading.Lock()


def lock_path(folder: str | Path) -> Path:
    """The lock file of `folder`: `<parent>/.<name>.lock`, for the folder's real path (symlinks resolved, so
    two spellings of one folder share one lock)."""
    real = Path(folder).resolve()
    return real.parent / f".{real.name or 'root'}.lock"


def read_holder(path: str | Path) -> dict:
    """What a lock file says about its holder (`pid`, `command`, `host`, `started`); {} when unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "a process that is just starting (no pid written yet)"
    started = holder.get("started")
    since = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if started else ""
    return f"pid {holder['pid']} (`{holder.get('command', '?')}` on {holder.get('host', '?')}{since})"


def _open_lock_file(path: Path, folder: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a symlink planted at the lock's name must not make us truncate the file it points to.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise MagicIDError(
            f"{folder}: cannot create its lock file {path} ({error.strerror or error}); the folder's parent "
            "must be writable (choose another output folder, or fix the permissions)"
        ) from error
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MagicIDError(f"{folder}: its lock file {path} is not a regular file; remove it and run again")
    return fd


def _acquire(path: Path, folder: Path, command: str) -> int:
    while True:
        fd = _open_lock_file(path, folder)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise MagicIDError(
                    f"{folder}: cannot lock {path} ({error.strerror}); the file system must support flock "
                    "(choose an output folder on a local disk)"
                ) from error
            holder = read_holder(path)
            for _ in range(10):  # the holder writes its pid right after taking the lock
                if holder.get("pid"):
                    break
                time.sleep(0.05)
                holder = read_holder(path)
            raise OutputLocked(
                f"{folder}: another process is writing this folder: {_describe(holder)}; wait for it to end "
                f"(or stop it), then run again (lock file {path})"
            ) from None
        # The previous holder unlinks the file before closing it: if we opened that old file, the path now names
        # another file (or none), and holding a lock on a deleted file would exclude nobody. Take the one there.
        try:
            on_disk = os.stat(path, follow_symlinks=False)
            mine = os.fstat(fd)
            if (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    holder = {
        "pid": os.getpid(),
        "command": command,
        "host": socket.gethostname(),
        "started": round(time.time(), 3),
        "argv": sys.argv[:8],
    }
    # The file may hold a dead holder's record (a stale lock taken over): replace it.
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    return fd


def _release(path: Path, fd: int) -> None:
    try:
        on_disk = os.stat(path, follow_symlinks=False)
        mine = os.fstat(fd)
        if (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino):
            path.unlink()  # while still locked: a waiter that opened it sees the unlink and starts over
    except OSError:
        pass  # already gone, or a read-only parent now: the next run takes the stale file over
    finally:
        os.close(fd)  # drops the flock


def is_main_process() -> bool:
    """False in the ranks other than 0 of a distributed launch (`accelerate launch`, torchrun: `RANK`)."""
    return os.environ.get("RANK", "0") in ("", "0")


@contextmanager
def output_lock(folder: str | Path, command: str, main_process_only: bool = False) -> Iterator[Path | None]:
    """Hold the exclusive lock of `folder` for the duration of the block.

    Args:
        folder: the output folder (need not exist yet; its parent is created).
        command: what is writing, for the message another run shows (e.g. "magicid build-data").
        main_process_only: under a distributed launch only rank 0 takes the lock (the other ranks are part of
            the same run and write through it); they hold nothing and yield None.

    Yields:
        The lock file's path (None in a rank that holds nothing).

    Raises:
        OutputLocked: another live process holds the lock (the message names the folder and its pid).
        MagicIDError: the lock file cannot be created or locked (read-only parent, file system without flock).
    """
    if main_process_only and not is_main_process():
        yield None
        return
    folder = Path(folder)
    path = lock_path(folder)
    with _GUARD:
        held = _HELD.get(path)
        if held is not None and held[2] == os.getpid():
            held[1] += 1
        else:
            _HELD[path] = [_acquire(path, folder, command), 1, os.getpid()]
    try:
        yield path
    finally:
        with _GUARD:
            held = _HELD[path]
            held[1] -= 1
            if held[1] == 0:
                del _HELD[path]
                _release(path, held[0])
