"""Run `magicid.forget.forget` on copies of a dataset, in child processes killed at each write.

Usage: python forget_kill_cases.py SOURCE_DATASET CASES_DIR IDENTITY [--set-like overrides...]

A write is a call of `os.replace`, `os.rename` or `os.unlink` in the child (every atomic file write ends in
`os.replace`; every deletion, the journal's and the lock file's included, is an `os.unlink`). First an
uninterrupted child (`CASES_DIR/reference`) lists them; then, for each N, a fresh copy (`after-N`) is erased by
a child that `os._exit`s right after its N-th write, and for each N that is an `os.replace` another copy
(`before-N`) by a child that exits just before it (the temporary file of that atomic write is left behind).
The modules are imported once here and each child is forked from this process, so a case costs the erasure
only. Prints one JSON object: {"writes": [[call, path relative to the dataset], ...], "cases": {name: exit code}}.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path

KILLED = 77  # the exit code of a child killed by the injected write hook


def _erase_in_child(target: Path, params, identity: str, kill_at: int, before: bool, log_path: Path) -> int:
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)
    from magicid.forget import forget

    log: list[list[str]] = []

    def counted(name, real):
        def call(*args, **kwargs):
            path = Path(os.fspath(args[1] if name in ("replace", "rename") else args[0]))
            log.append([name, os.path.relpath(path, target)])
            if len(log) == kill_at and before:
                os._exit(KILLED)
            result = real(*args, **kwargs)
            if len(log) == kill_at:
                os._exit(KILLED)
            return result

        return call

    try:
        for name in ("replace", "rename", "unlink"):
            setattr(os, name, counted(name, getattr(os, name)))
        forget(target, params, identity=identity, dvc=False)
        log_path.write_text(json.dumps(log))
    except BaseException:  # noqa: BLE001 - report any failure of the child through its exit code
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def main() -> None:
    source, cases_dir, identity = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    import magicid.data.builder  # noqa: F401 - loaded once, before the children fork
    import magicid.forget  # noqa: F401
    import magicid.training.trainer  # noqa: F401
    from magicid.config import load_params
    from magicid.data.version import import_dvc

    import_dvc()
    params = load_params(None, sys.argv[4:])
    cases_dir.mkdir(parents=True, exist_ok=True)
    log_path = cases_dir / "writes.json"

    def case(name: str, kill_at: int, before: bool) -> int:
        target = cases_dir / name
        shutil.copytree(source, target)
        return _erase_in_child(target, params, identity, kill_at, before, log_path)

    codes = {"reference": case("reference", 0, False)}
    if codes["reference"] != 0:
        raise SystemExit(f"the uninterrupted erasure failed (exit {codes['reference']})")
    writes = json.loads(log_path.read_text())
    for n, (call, _) in enumerate(writes, start=1):
        codes[f"after-{n}"] = case(f"after-{n}", n, False)
        if call in ("replace", "rename"):
            codes[f"before-{n}"] = case(f"before-{n}", n, True)
    print(json.dumps({"writes": writes, "cases": codes}))


if __name__ == "__main__":
    main()
