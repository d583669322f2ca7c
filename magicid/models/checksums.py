"""SHA-256 checksums of a model folder (the shipped offline world): written once when the folder is made, checked
every time it loads.

A changed, truncated or missing file is then an error that names it, instead of a model that silently differs
from the one whose figures the README reports. The file is `checksums.sha256` at the folder's root, in
`sha256sum`'s format (`<64 hex>  <relative path>` per line, sorted), so `sha256sum -c checksums.sha256` checks
it too. It covers every file under the folder; files added later and not listed are not checked (nothing
loads them: the loaders read fixed names).

`verify_model_folder` is what the loaders call (`backbone.load_sd_folder`, `MagicIDAdapter.load`): a folder with
its own `checksums.sha256` is checked whole; a folder inside one whose parent lists it (the adapter of the
offline world, `<world>/adapter/`) is checked against the parent's entries for it; a folder with neither (a
user's own SD 1.5 folder, a freshly trained adapter) is not checked.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from magicid.errors import BackboneError
from magicid.utils import atomic_write_text, sha256_file

CHECKSUMS_FILE = "checksums.sha256"


class ChecksumError(BackboneError):
    """A file of a checksummed model folder is missing, changed or truncated (the message names it)."""


def _listed_files(folder: Path) -> list[str]:
    files = []
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise ChecksumError(f"{path}: a symbolic link in a model folder; copy the file in instead")
        if path.is_file() and path.relative_to(folder).as_posix() != CHECKSUMS_FILE:
            files.append(path.relative_to(folder).as_posix())
    return files


def write_checksums(folder: str | Path) -> Path:
    """Write `<folder>/checksums.sha256` over every file under `folder` (atomically); returns its path."""
    folder = Path(folder)
    lines = [f"{sha256_file(folder / name)}  {name}\n" for name in _listed_files(folder)]
    return atomic_write_text(folder / CHECKSUMS_FILE, "".join(lines))


def read_checksums(folder: str | Path) -> dict[str, str] | None:
    """`{relative path: sha256}` from `<folder>/checksums.sha256`, or None when the folder has none.

    Raises:
        ChecksumError: a malformed line, or a path that is absolute or leaves the folder.
    """
    path = Path(folder) / CHECKSUMS_FILE
    if not path.is_file():
        return None
    entries: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        digest, sep, name = line.partition("  ")
        relative = PurePosixPath(name)
        if (
            not sep
            or len(digest) != 64
            or any(c not in "0123456789abcdef" for c in digest)
            or not name
            or relative.is_absolute()
            or ".." in relative.parts
        ):
            raise ChecksumError(
                f"{path}: line {number} is not '<sha256 hex>  <relative path>'; restore the file or refit the folder"
            )
        entries[name] = digest
    return entries


def verify_checksums(folder: str | Path, entries: dict[str, str]) -> int:
    """Check the files `entries` lists (paths relative to `folder`); returns how many were checked.

    Raises:
        ChecksumError: the first listed file that is missing or whose SHA-256 differs (changed or truncated),
            named with its size and what to do.
    """
    folder = Path(folder)
    for name, expected in sorted(entries.items()):
        path = folder / name
        if not path.is_file():
            raise ChecksumError(
                f"{path}: listed in {folder / CHECKSUMS_FILE} but missing; restore it (git checkout / dvc pull) "
                "or rebuild the folder (`make offline-world`)"
            )
        actual = sha256_file(path)
        if actual != expected:
            raise ChecksumError(
                f"{path}: SHA-256 {actual[:16]}... differs from {folder / CHECKSUMS_FILE} ({expected[:16]}...): the "
                f"file was changed or truncated ({path.stat().st_size} bytes); restore it (git checkout) or rebuild "
                "the folder (`make offline-world`)"
            )
    return len(entries)


def verify_model_folder(path: str | Path) -> int:
    """Check a model folder before it loads: against its own `checksums.sha256`, else against its parent's entries
    for it; returns how many files were checked (0: the folder is not checksummed).

    Raises:
        ChecksumError: a missing, changed or truncated file (named).
    """
    path = Path(path)
    own = read_checksums(path)
    if own is not None:
        return verify_checksums(path, own)
    parent = read_checksums(path.parent)
    if parent is None:
        return 0
    prefix = f"{path.name}/"
    mine = {name: digest for name, digest in parent.items() if name.startswith(prefix)}
    return verify_checksums(path.parent, mine) if mine else 0
