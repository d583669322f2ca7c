"""List a raw input folder without trusting it: every entry is either a regular file to read or a refusal.

Walking with `os.scandir` and `lstat` (never `open`) decides what each entry is before anything reads it:
a FIFO would block the first `open`, a symlink may point anywhere on the machine, a folder may be unreadable,
a name may not be UTF-8. Refused entries become quarantine rows (`InputEntry.reason`, one of
`magicid.data.ingest.REASONS`), so inputs = images + quarantine still holds and nothing hangs or vanishes.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from magicid.errors import InputRejected


@dataclass(frozen=True)
class InputEntry:
    """One entry under the input folder.

    `source` is its path relative to the input root (posix; a non-UTF-8 name is shown with backslash
    escapes). `path` is the regular file to read (a symlink's resolved target inside the root), or None when
    the entry is refused with `reason` and `detail`.
    """

    source: str
    path: Path | None
    reason: str | None = None
    detail: str = ""


def _display(relative: str) -> tuple[str, bool]:
    """(a printable UTF-8 form of an os-level relative name, whether the name was valid UTF-8)."""
    try:
        relative.encode("utf-8")
        return relative, True
    except UnicodeEncodeError:  # scandir maps undecodable bytes to lone surrogates (surrogateescape)
        return os.fsencode(relative).decode("utf-8", "backslashreplace"), False


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def list_input_entries(input_dir: str | Path, skip: frozenset[str] = frozenset()) -> list[InputEntry]:
    """Every entry under `input_dir` (any depth), sorted by source; folders are walked, not listed.

    Args:
        input_dir: the input root (resolved by the caller or here).
        skip: sources (relative, posix) that are metadata, not inputs (the identity sidecar).

    Returns:
        `InputEntry`s: readable regular files (and symlinks to regular files inside the root) with `path`;
        everything else with a `reason`: `bad_name`, `broken_link`, `link_outside_input`, `linked_folder`,
        `not_a_file` (FIFO, socket, device), `unreadable` (file or folder without read permission).
    """
    root = os.path.realpath(input_dir)
    entries: list[InputEntry] = []

    def refuse(relative: str, reason: str, detail: str) -> None:
        entries.append(InputEntry(_display(relative)[0], None, reason, detail))

    def walk(folder: str, prefix: str) -> None:
        try:
            with os.scandir(folder) as listing:
                children = sorted(listing, key=lambda e: e.name)
        except OSError as error:
            refuse(
                prefix.rstrip("/") or ".", "unreadable", f"a folder that cannot be listed ({error.strerror})"
            )
            return
        for child in children:
            relative = prefix + child.name
            if relative in skip:
                continue
            source, valid_name = _display(relative)
            try:
                info = child.stat(follow_symlinks=False)
            except OSError as error:
                refuse(relative, "unreadable", f"cannot be inspected ({error.strerror})")
                continue
            if stat.S_ISDIR(info.st_mode):
                walk(child.path, relative + "/")
                continue
            if not valid_name:
                refuse(relative, "bad_name", "the file name is not valid UTF-8; rename the file")
                continue
            target = child.path
            if stat.S_ISLNK(info.st_mode):
                target = os.path.realpath(child.path)  # resolves names only (lstat/readlink); opens nothing
                if not _inside(target, root):
                    refuse(
                        relative,
                        "link_outside_input",
                        "a symlink resolving outside the input folder (not opened)",
                    )
                    continue
                try:
                    info = os.stat(target)
                except FileNotFoundError:
                    refuse(
                        relative,
                        "broken_link",
                        f"a symlink to {os.readlink(child.path)!r}, which does not exist",
                    )
                    continue
                except OSError as error:
                    refuse(relative, "unreadable", f"its target cannot be inspected ({error.strerror})")
                    continue
                if stat.S_ISDIR(info.st_mode):
                    refuse(
                        relative, "linked_folder", "a symlink to a folder (not followed; copy the files in)"
                    )
                    continue
            if not stat.S_ISREG(info.st_mode):
                refuse(relative, "not_a_file", "a FIFO, socket or device, not a regular file (not opened)")
                continue
            if not os.access(target, os.R_OK):
                refuse(relative, "unreadable", "no read permission (check the file's permissions)")
                continue
            entries.append(InputEntry(source, Path(target)))

    walk(root, "")
    return sorted(entries, key=lambda e: e.source)


def hash_regular_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a regular file, refusing anything else at open time (no FIFO can block here).

    Raises:
        InputRejected: `not_a_file` (changed into a FIFO/link since listing) or `unreadable`.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        raise InputRejected("unreadable", f"cannot be opened ({error.strerror})") from error
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputRejected("not_a_file", "not a regular file (not read)")
        digest = hashlib.sha256()
        try:
            while block := handle.read(chunk):
                digest.update(block)
        except OSError as error:
            raise InputRejected("unreadable", f"read failed ({error.strerror})") from error
    return digest.hexdigest()
