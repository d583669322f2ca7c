"""Keep the native INFO/WARNING chatter of MediaPipe and TF Lite off the terminal, and let errors through.

MediaPipe's graphs (absl/glog) and TF Lite write to file descriptor 2 from C++, per process and per graph:
`INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`, `WARNING: All log messages before
absl::InitializeLog() is called are written to STDERR`, `W0000 00:00:... inference_feedback_manager.cc:114]
Feedback manager requires ...`. `GLOG_minloglevel` does not reach them. Worker processes drop their fd 2
entirely (`quiet_native_logs`); the main process cannot, because real errors go there too.

`filter_native_stderr()` points fd 2 at a pipe read by a thread that drops only lines of those known shapes
(absl/glog lines of severity I or W, the `absl::InitializeLog` notice, TF Lite's `INFO:` lines) and forwards
every other line unchanged, so `E...`/`F...` native lines and anything unknown still reach the terminal.
Python's own `sys.stderr` (tracebacks, warnings, tqdm bars) is pointed at a copy of the original stream for
the duration, so it is neither delayed nor filtered. `MAGICID_NATIVE_LOGS=1` turns the filter off.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# absl/glog prefix: severity letter, MMDD, time, thread id, file:line]. Only I(nfo) and W(arning) are dropped.
_NOISE = re.compile(
    rb"^(?:[IW]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w./-]+:\d+\]"
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|INFO: Created TensorFlow Lite \w+ delegate for \w+\.)"
)


def is_native_noise(line: bytes) -> bool:
    """Whether one stderr line (bytes, without its newline) is known native INFO/WARNING chatter."""
    return bool(_NOISE.match(line))


@contextmanager
def filter_native_stderr() -> Iterator[dict[str, int]]:
    """Filter native stderr for the duration of the block (see the module docstring).

    Yields:
        Counters `{"dropped": n, "forwarded": n}` (lines), final once the block has exited.
    """
    counts = {"dropped": 0, "forwarded": 0}
    if os.environ.get("MAGICID_NATIVE_LOGS") == "1":
        yield counts
        return
    try:
        sys.stderr.flush()
        original_fd = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2: nothing to filter
        yield counts
        return
    read_fd, write_fd = os.pipe()

    def pump() -> None:
        pending = b""
        with os.fdopen(read_fd, "rb", buffering=0) as source:
            while chunk := source.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    forward(line + b"\n")
        if pending:
            forward(pending)

    def forward(line: bytes) -> None:
        if is_native_noise(line.rstrip(b"\r\n")):
            counts["dropped"] += 1
            return
        counts["forwarded"] += 1
        os.write(original_fd, line)

    reader = threading.Thread(target=pump, name="native-stderr-filter", daemon=True)
    reader.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    saved_stderr = sys.stderr
    python_stderr = os.fdopen(
        os.dup(original_fd), "w", buffering=1, encoding="utf-8", errors="backslashreplace"
    )
    sys.stderr = python_stderr
    try:
        yield counts
    finally:
        python_stderr.flush()
        sys.stderr = saved_stderr
        os.dup2(original_fd, 2)  # closes the pipe's last write end: the reader drains and stops
        reader.join(timeout=5)
        os.close(original_fd)
        # `python_stderr` stays open: loggers configured inside the block (Prefect's console) may still hold it.


def quiet_native_logs() -> None:
    """Send this process's C-level stderr (MediaPipe/absl/TFLite graph warnings, printed per process and
    graph; GLOG_minloglevel does not reach them) to /dev/null, keeping Python's `sys.stderr` (tracebacks,
    warnings) on the original stream. For worker processes, whose fd 2 carries nothing else (the dataset
    builder's pool); set MAGICID_NATIVE_LOGS=1 to keep the native logs."""
    if os.environ.get("MAGICID_NATIVE_LOGS") == "1":
        return
    try:
        sys.stderr.flush()
        kept = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        sys.stderr = os.fdopen(kept, "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    except (OSError, ValueError, AttributeError):  # pragma: no cover - no usable fd 2: nothing to quiet
        pass
