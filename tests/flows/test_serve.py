"""`magicid serve-flows` as a user runs it: a subprocess that starts its own loopback Prefect server, serves the
`retrain` deployment and stops cleanly on Ctrl-C (SIGINT); a configured API that does not answer, or a taken
port, stops it at once with what to do.

Each run gets its own PREFECT_HOME (the server's database) and a free port, never a user's 4200 or their
PREFECT_API_URL.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _env(prefect_home: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's shell without Prefect settings, its PREFECT_HOME private to the test."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONPATH=str(ROOT),
        **extra,
    )
    return env


def _serve_flows(tmp_path: Path, env: dict[str, str], *options: str) -> subprocess.Popen:
    """`magicid --params <copy of params.yaml> OPTIONS serve-flows --project tmp_path`, output to files."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    command = [sys.executable, "-m", "flows.cli", "--params", str(tmp_path / "params.yaml"), *options]
    command += ["serve-flows", "--project", str(tmp_path)]
    return subprocess.Popen(
        command,
        env=env,
        cwd=tmp_path,
        stdout=(tmp_path / "stdout.txt").open("w"),
        stderr=(tmp_path / "stderr.txt").open("w"),
    )


def _output(tmp_path: Path) -> tuple[str, str]:
    return (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()


@pytest.mark.slow
def test_serve_flows_registers_the_cron_deployment_and_stops_cleanly_on_sigint(tmp_path):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from magicid.config import load_params

    cron = load_params(ROOT / "params.yaml").orchestration.retrain_cron
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    overrides = [f"orchestration.server_port={port}", "orchestration.deployment_name=serve-test"]
    process = _serve_flows(tmp_path, _env(tmp_path / "prefect-home"), *(f"--set={o}" for o in overrides))
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while "serving retrain/serve-test" not in _output(tmp_path)[0]:
            assert process.poll() is None, (
                f"serve-flows exited with {process.returncode}: {_output(tmp_path)}"
            )
            assert time.monotonic() < deadline, f"serve-flows did not report serving: {_output(tmp_path)}"
            time.sleep(0.5)
        children = psutil.Process(process.pid).children(recursive=True)
        commands = [" ".join(child.cmdline()) for child in children]
        assert any("server start" in c and f"--port {port}" in c for c in commands), commands
        assert any("-m flows.serve" in c for c in commands), commands

        # "serving" means the server holds the deployment with the params' schedule, unpaused, and the
        # overrides given to serve-flows reach it (its name is one) and its scheduled runs (parameters).
        with temporary_settings({PREFECT_API_URL: api_url}):
            with get_client(sync_client=True) as client:
                deployment = client.read_deployment_by_name("retrain/serve-test")
        assert [schedule.schedule.cron for schedule in deployment.schedules] == [cron]
        assert all(schedule.active for schedule in deployment.schedules)
        assert not deployment.paused
        assert deployment.parameters["project_dir"] == str(tmp_path.resolve())
        assert deployment.parameters["params_path"] == str((tmp_path / "params.yaml").resolve())
        assert deployment.parameters["overrides"] == overrides

        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0, _output(tmp_path)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], [" ".join(child.cmdline()) for child in alive]
        assert not _answers(port), f"something still listens on {port} after serve-flows exited"
        stdout, stderr = _output(tmp_path)
        assert "Traceback" not in stderr + stdout, stderr
    finally:  # a failed assertion must not leave a server behind
        if process.poll() is None:
            process.kill()
        for child in children:
            if child.is_running():
                child.kill()


def test_serve_flows_with_an_unreachable_api_stops_at_once_naming_the_url(tmp_path):
    port = _free_port()  # nothing listens on it
    api_url = f"http://127.0.0.1:{port}/api"
    started = time.monotonic()
    process = _serve_flows(tmp_path, _env(tmp_path / "prefect-home", PREFECT_API_URL=api_url))
    returncode = process.wait(120)
    elapsed = time.monotonic() - started
    stdout, stderr = _output(tmp_path)
    assert returncode == 2, (stdout, stderr)
    assert api_url in stderr and "environment variable PREFECT_API_URL" in stderr, stderr
    assert "prefect server start" in stderr and "unset it" in stderr, stderr  # what to do
    assert "Traceback" not in stderr, stderr
    assert "starting a local Prefect server" not in stdout  # the configured URL is never replaced silently
    # Import time plus a 5 s probe; waiting out the 120 s start-up timeout of a local server would fail this.
    assert elapsed < 60, f"took {elapsed:.0f} s"


def test_serve_flows_refuses_a_taken_port_instead_of_joining_whatever_listens(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        process = _serve_flows(
            tmp_path, _env(tmp_path / "prefect-home"), f"--set=orchestration.server_port={port}"
        )
        returncode = process.wait(120)
    stdout, stderr = _output(tmp_path)
    assert returncode == 2, (stdout, stderr)
    assert f"127.0.0.1:{port} is already in use" in stderr and "orchestration.server_port" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert "starting a local Prefect server" not in stdout
