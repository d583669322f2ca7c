"""DVC's Python API in this process: its console log handlers follow the current `sys.stdout`/`sys.stderr`.

Importing `dvc` runs `dvc.logger.setup()`, which attaches `dvc.logger.LoggerHandler`s to the loggers `dvc`,
`dvc_objects` and `dvc_data`, bound to the `sys.stdout` and `sys.stderr` objects of that moment (wrapped by
`colorama.init()`). When that moment falls inside a redirect that later closes its streams (typer's
`CliRunner.invoke`, pytest's `capsys`, `native_logs.filter_native_stderr`), every later DVC log record in the
process, even a plain `Repo.init` "Initialized DVC repository." line, raises `dvc.logger.LoggingException`
("I/O operation on closed file").

`import_dvc()` imports DVC and points each of those handlers at whichever stream is current when a record is
written: `sys.stderr` for the WARNING-level handler (`dvc.logger.setup`'s `console_errors`), `sys.stdout` for the
others. DVC's messages are still shown, now on the streams in force. It is idempotent; magicid calls it before
each in-process use of DVC (`training.trainer.dataset_version`).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

DVC_LOGGERS = ("dvc", "dvc_objects", "dvc_data")  # the loggers dvc.logger.setup() equips


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
    """Import DVC (if not yet) and make its console handlers write to the current `sys.stdout`/`sys.stderr`."""
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
