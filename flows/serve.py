"""`magicid serve-flows`: serve the scheduled `retrain` deployment, with a local Prefect server if none is set.

Schedules need a real Prefect server (an ephemeral API runs no scheduler). When `PREFECT_API_URL` is not set,
`prefect server start` is started on loopback (`orchestration.server_host:server_port`) and waited for; then
a child process serves the deployment (`flow.serve`-style, it blocks and starts a run at each cron tick).
Ctrl-C (or SIGTERM) stops the serving child first (it calls the API while shutting down), then the server.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from magicid.config import Params
from magicid.errors import ConfigError


def configured_api_url() -> str | None:
    """The Prefect API URL from the environment or the active Prefect profile, or None."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def wait_healthy(api_url: str, timeout_s: float = 120.0, process: subprocess.Popen | None = None) -> None:
    """Poll `<api>/health` until it answers 200.

    Raises:
        ConfigError: the server process exited or did not answer within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ConfigError(
                f"`prefect server start` exited with code {process.returncode} before answering"
            )
        try:
            with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise ConfigError(f"Prefect server at {api_url} did not answer within {timeout_s:.0f} s")


def _stop(process: subprocess.Popen | None, name: str, timeout_s: float = 30.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        print(f"{name} did not stop on SIGINT in {timeout_s:.0f} s: terminating", file=sys.stderr)
        process.terminate()
        process.wait(10)


def serve_flows(
    params: Params, project_dir: str | Path = ".", params_path: str | None = "params.yaml"
) -> int:
    """Start a loopback Prefect server if none is configured, serve `retrain` on its schedule until Ctrl-C.

    Returns:
        The serving child's exit code (0 after Ctrl-C).
    """
    cfg = params.orchestration
    env = dict(os.environ)
    server = None
    api_url = configured_api_url()
    if api_url is None:
        api_url = f"http://{cfg.server_host}:{cfg.server_port}/api"
        prefect_cli = Path(sys.executable).with_name("prefect")
        command = [
            str(prefect_cli),
            "server",
            "start",
            "--host",
            cfg.server_host,
            "--port",
            str(cfg.server_port),
        ]
        print(f"starting a local Prefect server: {' '.join(command)}", flush=True)
        server = subprocess.Popen(command, env=env, start_new_session=True)
    env["PREFECT_API_URL"] = api_url
    child = None
    stopping = {"signal": False}

    def on_signal(signum, frame):  # Ctrl-C or SIGTERM: stop in order (serving child, then server)
        stopping["signal"] = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        wait_healthy(api_url, process=server)
        print(f"Prefect API: {api_url} (UI: {api_url.removesuffix('/api')})", flush=True)
        child = subprocess.Popen(
            [sys.executable, "-m", "flows.serve", "--project", str(project_dir)]
            + (["--params", str(params_path)] if params_path else []),
            env=env,
            cwd=str(Path(project_dir).resolve()),
            start_new_session=True,
        )
        print(
            f"serving retrain/{cfg.deployment_name} on cron '{cfg.retrain_cron}' (Ctrl-C stops)", flush=True
        )
        return child.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(child, "the serving process")
        _stop(server, "the Prefect server")
        signal.signal(signal.SIGTERM, previous)


def _serve_child(project_dir: str, params_path: str | None) -> None:
    """In the child (PREFECT_API_URL set): register and serve the deployment (blocks)."""
    from prefect import serve

    from flows.retrain import retrain_deployment
    from magicid.config import load_params

    path = Path(params_path) if params_path and Path(params_path).exists() else None
    params = load_params(path)
    serve(retrain_deployment(params, project_dir, params_path if path else None))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="serve the retrain deployment (child of magicid serve-flows)"
    )
    parser.add_argument("--project", default=".")
    parser.add_argument("--params", default=None)
    args = parser.parse_args()
    try:
        _serve_child(args.project, args.params)
    except KeyboardInterrupt:
        pass
