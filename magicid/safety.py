"""Checks on untrusted inputs and on output paths, run before any native (OpenCV, PIL decoder, model) call.

Input images, manifests, sidecars and S3 contents are untrusted (README "Security"). These small functions
turn what would be a hang (a FIFO opened for reading), a native abort (OpenCV on a side >= 32767 px) or a
late traceback (an output path that is a folder) into a `MagicIDError` that names the input and what to do.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from magicid.errors import DataError, MagicIDError

# OpenCV stores image sizes in shorts in several code paths (resize, warpAffine, imgproc remap tables) and
# aborts the process natively on a side >= 32767 (SHRT_MAX): such an image is refused before any cv2 call.
MAX_SIDE = 32766


class OutputPathError(MagicIDError):
    """An output path that cannot be written as asked (a folder, an unwritable folder, a wrong extension)."""


def pixel_problem(width: int, height: int, max_pixels: int) -> str | None:
    """Why an image of `width` x `height` may not be decoded, or None when it may.

    One limit for every reader of untrusted images (build-data, generate --ref/--skeleton, restore):
    `data.max_pixels` pixels (decompression-bomb guard) and `MAX_SIDE` px on a side (OpenCV's limit).
    """
    if width > MAX_SIDE or height > MAX_SIDE:
        return f"{width}x{height}: a side over {MAX_SIDE} px (OpenCV cannot process it)"
    if width * height > max_pixels:
        return f"{width}x{height} = {width * height} pixels > data.max_pixels={max_pixels}"
    return None


def file_kind_problem(path: str | Path) -> str | None:
    """Why `path` (followed through symlinks) is not a readable regular file, or None. Never opens it."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        return "file not found" if not path.is_symlink() else "a symlink whose target does not exist"
    except OSError as error:
        return f"cannot be inspected ({error.strerror or error})"
    if stat.S_ISDIR(info.st_mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(info.st_mode):
        # FIFOs, sockets and devices: opening a FIFO for reading blocks until a writer appears.
        return "is not a regular file (a FIFO, socket or device)"
    if not os.access(path, os.R_OK):
        return "is not readable (check its permissions)"
    return None


def check_input_file(path: str | Path, what: str) -> Path:
    """`path` if it is a readable regular file, else `DataError` naming `what` and the path."""
    problem = file_kind_problem(path)
    if problem is not None:
        raise DataError(f"{what} {str(path)!r}: {problem}")
    return Path(path)


def special_file_kind(path: str | Path) -> str | None:
    """What kind of special file `path` is ("a FIFO", "a socket", "a device"; not followed through a symlink),
    or None for anything else.

    Writing in place of one replaces it (as root, `/dev/null` itself); opening a FIFO blocks."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return None


def check_output_file(path: str | Path, what: str, suffixes: tuple[str, ...] | None = (".png",)) -> Path:
    """Check an output file path before any work is done (so a model is never loaded for nothing).

    Args:
        path: where the result will be written (its folder is created if missing).
        what: the option's name for messages (`--out`).
        suffixes: accepted extensions, lower case; None: any.

    Raises:
        OutputPathError: the path is a folder or a special file, has another extension, or its folder cannot be
            created or written.
    """
    path = Path(path)
    if path.is_dir():
        example = path / ("out" + (suffixes[0] if suffixes else ""))
        raise OutputPathError(f"{what} {str(path)!r}: is a folder; give a file name, e.g. {example}")
    kind = special_file_kind(path)
    if kind is not None:
        raise OutputPathError(f"{what} {str(path)!r}: is {kind}, not a regular file; choose a file path")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise OutputPathError(
            f"{what} {str(path)!r}: the extension must be one of {', '.join(suffixes)} (the file is written as PNG)"
        )
    parent = path.parent if str(path.parent) else Path(".")
    existing = parent
    while not existing.exists():  # the nearest existing ancestor decides whether the folder can be made
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise OutputPathError(f"{what} {str(path)!r}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {str(path)!r}: {existing} is not writable; choose another output path")
    if path.exists() and not os.access(path, os.W_OK) and not os.access(parent, os.W_OK):
        raise OutputPathError(f"{what} {str(path)!r}: exists and cannot be replaced; choose another path")
    return path


def check_output_folder(path: str | Path, what: str) -> Path:
    """Check a folder the command will create or write into, before any work is done.

    Raises:
        OutputPathError: the path (or an ancestor) is a file, or the nearest existing folder is not writable.
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        kind = special_file_kind(existing) or "a file"
        where = f"is {kind}" if existing == path else f"is inside {existing}, which is {kind}"
        raise OutputPathError(f"{what} {str(path)!r}: {where}, not a folder; choose a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {str(path)!r}: {existing} is not writable; choose another folder")
    return path
