"""DVC used in-process keeps logging after the streams it was first imported under are closed (magicid/data/version.py).

Each case runs in a fresh interpreter, since DVC binds its handlers once, at its first import: there it is
imported while `sys.stdout`/`sys.stderr` are redirected to buffers that are then closed (what typer's
`CliRunner.invoke` and pytest's `capsys` do), and a `Repo.init` logs afterwards.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import io, logging, sys
real_out, real_err = sys.stdout, sys.stderr
sys.stdout, sys.stderr = io.StringIO(), io.StringIO()  # a redirect around DVC's first import
{first_import}
redirected = (sys.stdout, sys.stderr)
sys.stdout, sys.stderr = real_out, real_err
for stream in redirected:
    stream.close()
{before_use}
from dvc.repo import Repo
Repo.init(sys.argv[1], no_scm=True).close()  # logs "Initialized DVC repository." (INFO)
logging.getLogger("dvc.repo").warning("dvc-warning-line")
"""


def run_script(tmp_path: Path, first_import: str, before_use: str) -> subprocess.CompletedProcess:
    code = SCRIPT.format(first_import=first_import, before_use=before_use)
    return subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "first_import, before_use",
    [
        ("from magicid.data.version import import_dvc; import_dvc()", ""),  # magicid imported DVC first
        ("import dvc", "from magicid.data.version import import_dvc; import_dvc()"),  # something else did
    ],
    ids=["magicid-first", "dvc-first"],
)
def test_dvc_logs_to_the_current_streams_after_the_import_streams_closed(tmp_path, first_import, before_use):
    result = run_script(tmp_path, first_import, before_use)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Initialized DVC repository." in result.stdout
    assert "dvc-warning-line" in result.stderr and "dvc-warning-line" not in result.stdout


def test_without_import_dvc_the_closed_stream_breaks_dvc(tmp_path):
    """The failure the module exists for (DVC 3.67): handlers kept on the closed buffers raise on the next log."""
    result = run_script(tmp_path, "import dvc", "")
    assert result.returncode != 0
    assert "LoggingException" in result.stderr and "closed file" in result.stderr


def test_import_dvc_is_idempotent_and_keeps_one_handler_set():
    import logging

    from dvc.logger import LoggerHandler

    from magicid.data.version import CurrentStream, import_dvc

    import_dvc()
    handlers = list(logging.getLogger("dvc").handlers)
    import_dvc()
    assert logging.getLogger("dvc").handlers == handlers
    streams = [h.stream for h in handlers if isinstance(h, LoggerHandler)]
    assert streams and all(isinstance(s, CurrentStream) for s in streams)
    assert {s.name for s in streams} == {"stdout", "stderr"}
