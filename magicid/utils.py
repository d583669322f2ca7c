"""Small shared helpers: atomic writes, seeding, content hashes."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from magicid.safety import OutputPathError, special_file_kind

# A disk with less than this free is full for this program (every output it writes is larger): commands refuse
# to start writing there, and a write that failed while its disk had less than this left failed for want of space.
FULL_DISK_BYTES = 1 << 20


def free_bytes(path: str | Path) -> int | None:
    """Bytes this process may still write on the file system holding `path` (its nearest existing ancestor);
    None if that cannot be told. Root may use the blocks reserved for it, others only the available ones."""
    existing = Path(path)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    try:
        info = os.statvfs(existing)
    except OSError:
        return None
    return (info.f_bfree if os.geteuid() == 0 else info.f_bavail) * info.f_frsize


def _refuse_special(path: Path, want: str) -> None:
    """Replacing a FIFO, socket or device by rename would swap out the node itself (as root: `/dev/null`)."""
    kind = special_file_kind(path)
    if kind is not None:
        raise OutputPathError(f"{path}: is {kind}, not {want}; choose another output path")


def _as_write_error(error: Exception, path: Path, tmp_path: Path) -> Exception:
    """The error to raise for a failed write of `path`: an OSError names `path` when the OS did not (a write()
    on a full disk names no file), and a library's own error (torch's "file write failed", safetensors' I/O
    error) becomes ENOSPC when the disk is full at that moment (the partial temporary file still holds it)."""
    if isinstance(error, OSError):
        if error.filename is None:
            error.filename = str(path)
        return error
    free = free_bytes(tmp_path)
    if free is not None and free < FULL_DISK_BYTES:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return error


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it into place.

    A crash mid-write leaves the old file (or none), never a truncated one.

    Raises:
        OutputPathError: `path` is a FIFO, socket or device (renaming onto it would replace the node).
        OSError: the write failed (naming `path`); ENOSPC also for a library's error on a full disk.
    """
    path = Path(path)
    _refuse_special(path, "a regular file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            write(tmp_path)
        except Exception as error:
            better = _as_write_error(error, path, tmp_path)
            if better is error:
                raise
            raise better from error
        # mkstemp creates 0600 files; give the result the permissions a plain open() would (0666 & ~umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_save_image(image: Image.Image, path: str | Path) -> Path:
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt))


def atomic_write_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)` on a fresh folder beside `path`, then swap it in for `path`.

    A crash mid-write leaves the old folder (or none) under `path`, never a half-written one: readers see a
    complete model folder or the previous one (the swap is two renames; between them `path` is absent, and
    the previous folder is still whole under `.<name>.old`).
    """
    path = Path(path)
    _refuse_special(path, "a folder")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path}: is a file, not a folder; choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = path.with_name(f".{path.name}.old")
    try:
        write(tmp)
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path


def set_seed(seed: int) -> None:
    """The one seed setter: Python, NumPy and torch global RNGs (prefer explicit generators where possible)."""
    import torch

    random.seed(seed)
    # NumPy's legacy seed takes 32-bit words: a 64-bit seed is given as two (low, high), so distinct seeds
    # stay distinct; seeds below 2**32 keep their historical single-word state.
    np.random.seed(seed if seed < 2**32 else [seed & 0xFFFFFFFF, seed >> 32])
    torch.manual_seed(seed)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
