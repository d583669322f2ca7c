"""A dataset version's id, and every DVC call magicid makes (DESIGN.md §1: DVC calls live here and nowhere else).

- `dataset_version(root)`: DVC's hash of the folder inside a DVC repository (`dvc.api.DVCFileSystem`), else the
  manifests' SHA-256. DVC is imported only inside a DVC repository, and only lazily: on a machine without DVC (a
  GPU server with the model stack only) the version is the manifests' hash and its origin says why.
- `dvc_commit(root)`: record a changed dataset folder (`forget`) with `dvc commit`.
- `run_dvc(project_dir, *args)`: `dvc repro`/`dvc push` of a project's stages (the data flow), the stage
  commands running this interpreter's `magicid`.
- `dvc_data_paths(project_dir)`: the raw folder, dataset folder and validation report dvc.yaml's data stages
  declare.
- `import_dvc()`: DVC's Python API in this process, its console log handlers following the current
  `sys.stdout`/`sys.stderr`.

Why `import_dvc` exists: importing `dvc` runs `dvc.logger.setup()`, which attaches `dvc.logger.LoggerHandler`s
to the loggers `dvc`, `dvc_objects` and `dvc_data`, bound to the `sys.stdout` and `sys.stderr` objects of that
moment (wrapped by `colorama.init()`). When that moment falls inside a redirect that later closes its streams
(typer's `CliRunner.invoke`, pytest's `capsys`, `native_logs.filter_native_stderr`), every later DVC log record
in the process, even a plain `Repo.init` "Initialized DVC repository." line, raises
`dvc.logger.LoggingException` ("I/O operation on closed file"). `import_dvc()` points each of those handlers at
whichever stream is current when a record is written: `sys.stderr` for the WARNING-level handler
(`dvc.logger.setup`'s `console_errors`), `sys.stdout` for the others. DVC's messages are still shown, now on the
streams in force. It is idempotent; `dataset_version` calls it before each in-process use of DVC.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from magicid.data import manifest as mf
from magicid.errors import ConfigError, DataError, ValidationFailed

DVC_LOGGERS = ("dvc", "dvc_objects", "dvc_data")  # the loggers dvc.logger.setup() equips
ORIGIN_DVC = "dvc"
ORIGIN_MANIFESTS = "manifest-sha256"
ORIGIN_NO_DVC = "manifest-sha256 (dvc not installed)"


# ---------------------------------------------------------------------------------------------------------------
# DVC's Python API in this process
# ---------------------------------------------------------------------------------------------------------------
class CurrentStream:
    """A file-like stand-in for `sys.<name>` looked up at each use (`name`: "stdout" or "stderr")."""

    def __init__(self, name: str) -> None:
        if name not in ("stdout", "stderr"):
            raise ValueError(f"CurrentStream: name must be 'stdout' or 'stderr', got {name!r}")
        self.name = name

    def write(self, text: str) -> int:
        return getattr(sys, self.name).write(text)

    def flush(self) -> None:
        getattr(sys, self.name).flush()

    def __getattr__(self, attribute: str) -> Any:  # isatty, encoding, closed, ... of the current stream
        return getattr(getattr(sys, self.name), attribute)

    def __repr__(self) -> str:
        return f"CurrentStream(sys.{self.name})"


def import_dvc() -> None:
    """Import DVC (if not yet) and make its console handlers write to the current `sys.stdout`/`sys.stderr`.

    Raises:
        ImportError: DVC is not installed (or not importable) here.
    """
    import dvc  # noqa: F401  (dvc/__init__.py runs dvc.logger.setup())
    from dvc.logger import LoggerHandler

    for name in DVC_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, LoggerHandler) and not isinstance(handler.stream, CurrentStream):
                # Not `setStream`: it flushes the old stream first, which raises when that one is closed.
                handler.acquire()
                try:
                    handler.stream = CurrentStream("stderr" if handler.level >= logging.WARNING else "stdout")
                finally:
                    handler.release()


# ---------------------------------------------------------------------------------------------------------------
# the version
# ---------------------------------------------------------------------------------------------------------------
def dvc_repo_root(path: str | Path) -> Path | None:
    """The DVC repository holding `path` (the nearest folder upwards with a `.dvc` directory, not crossing a mount
    point, as DVC's `Repo.find_root` looks), found without importing DVC; None outside one."""
    path = Path(path).resolve()
    for folder in [path, *path.parents]:
        if (folder / ".dvc").is_dir():
            return folder
        if os.path.ismount(folder):
            break
    return None


def dataset_version(root: str | Path) -> tuple[str, str]:
    """The version id of an IDZoom directory and where it came from.

    Inside a DVC repository, the hash DVC records for the directory (a stage output in dvc.lock or a
    `<dir>.dvc` file), as DVC's own file system reports it (`dvc.api.DVCFileSystem`); else (no DVC repository,
    the directory not tracked, or DVC not importable: a GPU machine with the model stack only) the SHA-256 of
    `images.parquet` + `faces.parquet` (first 32 hex digits). DVC is imported only inside a DVC repository.

    Returns:
        (version, origin) with origin `dvc`, `manifest-sha256`, or `manifest-sha256 (dvc not installed)` (inside a
        DVC repository without DVC: say so where the version is logged).
    """
    root = Path(root).resolve()
    repo_root = dvc_repo_root(root)
    origin = ORIGIN_MANIFESTS
    if repo_root is not None:
        try:
            import_dvc()
        except ImportError:
            origin = ORIGIN_NO_DVC
        else:
            from dvc.api import DVCFileSystem

            fs = DVCFileSystem(str(repo_root))
            try:
                info = fs.info(root.relative_to(repo_root).as_posix())
            except FileNotFoundError:
                info = {}
            entry = (info.get("dvc_info") or {}).get("entry")
            hash_info = getattr(entry, "hash_info", None)
            if hash_info is not None and hash_info.value:
                return str(hash_info.value).removesuffix(".dir"), ORIGIN_DVC
    digest = hashlib.sha256()
    for name in (mf.IMAGES, mf.FACES):
        digest.update((root / name).read_bytes())
    return digest.hexdigest()[:32], origin


# ---------------------------------------------------------------------------------------------------------------
# the DVC command line
# ---------------------------------------------------------------------------------------------------------------
def dvc_commit(root: str | Path) -> tuple[bool, str]:
    """`dvc commit -f` the dataset folder `root` when DVC tracks it (a dvc.lock output or a `<root>.dvc` file).

    Returns:
        (done, note): whether it was recorded, and a sentence for the user saying what happened or what to do.
    """
    root = Path(root)
    tracked = root.parent / f"{root.name}.dvc"
    repo = next((p for p in [root.parent, *root.parent.parents] if (p / ".dvc").is_dir()), None)
    if repo is None:
        return False, "not in a DVC repository: the new version is not recorded by DVC"
    target = str(tracked if tracked.is_file() else root)
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "commit", "-f", "-q", target],
        cwd=repo, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["?"]
        return False, f"dvc commit failed ({message[0][:200]}); run `dvc commit {target}` yourself"
    return True, f"recorded with `dvc commit {target}`: commit the .dvc/dvc.lock change to git"


def command_shim() -> str:
    """A folder holding a `magicid` executable that runs this interpreter's `magicid.cli`: dvc.yaml's stage
    commands (`magicid build-data ...`) then run the same code and environment as the caller."""
    folder = Path(tempfile.mkdtemp(prefix="magicid-shim-"))
    shim = folder / "magicid"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m magicid.cli "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(folder)


def run_dvc(project_dir: str | Path, *args: str) -> str:
    """`dvc ARGS` in `project_dir` (stage commands resolve `magicid` to this interpreter); returns its output.

    Raises:
        OSError: DVC could not start. ValidationFailed: `dvc repro` failed in its `validate` stage. DataError: DVC
            failed otherwise (its output's tail is in the message).
    """
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = command_shim() + os.pathsep + env.get("PATH", "")
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project_dir, env=env, capture_output=True, text=True
    )
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        tail = "\n".join(output.splitlines()[-25:])
        error = ValidationFailed if "'validate'" in output and args[0] == "repro" else DataError
        raise error(f"`dvc {' '.join(args)}` in {project_dir} failed (exit {done.returncode}):\n{tail}")
    return output


def dvc_data_paths(project_dir: str | Path) -> dict[str, str]:
    """Raw folder, dataset folder and validation report paths as dvc.yaml's data stages declare them.

    Raises:
        ConfigError: dvc.yaml lacks the stages `build_idzoom` (deps[0] raw folder, outs[0] dataset) and
            `validate` (metrics[0] validation.json).
    """
    import yaml

    project_dir = Path(project_dir)
    spec = yaml.safe_load((project_dir / "dvc.yaml").read_text()) or {}
    stages = spec.get("stages", {})
    try:
        dataset = stages["build_idzoom"]["outs"][0]
        raw = stages["build_idzoom"]["deps"][0]
        metrics = stages["validate"]["metrics"][0]
    except (KeyError, IndexError, TypeError) as exc:
        raise ConfigError(
            f"{project_dir / 'dvc.yaml'}: expected stages build_idzoom (deps[0] = raw folder, outs[0] = dataset)"
            f" and validate (metrics[0] = validation.json): {exc!r}"
        ) from exc
    metrics_path = next(iter(metrics)) if isinstance(metrics, dict) else metrics
    dataset = next(iter(dataset)) if isinstance(dataset, dict) else dataset
    return {
        "raw": str(project_dir / raw),
        "dataset": str(project_dir / dataset),
        "validation": str(project_dir / metrics_path),
    }
