"""`magicid serve-flows`: serve the scheduled `retrain` deployment, with a local Prefect server if none is set.

Schedules need a real Prefect server (an ephemeral API runs no scheduler). When no Prefect API is configured
(`PREFECT_API_URL` in the environment or the active profile), `prefect server start` is started on loopback
(`orchestration.server_host:server_port`; `--set orchestration.server_port=P` moves it) and waited for; a
configured API that does not answer within a few seconds stops the command with what to do. Then a child
process serves the deployment (`prefect.serve`: it blocks and starts a run at each cron tick); "serving" is
printed once the server holds the deployment, unpaused. Ctrl-C (or SIGTERM) stops the serving child first (it
pauses the deployment through the API while shutting down), then the server; the exit code is then 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from magicid.config import Params
from magicid.errors import ConfigError, MagicIDError

# A configured server is either up or not: a few seconds cover a restart, not a missing server.
CONFIGURED_API_TIMEOUT_S = 5.0


def configured_api_url() -> tuple[str, str] | None:
    """The configured Prefect API URL and where it comes from (environment or profile), or None."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"], "the environment variable PREFECT_API_URL"
    from prefect.context import get_settings_context
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return None
    return url, f"PREFECT_API_URL of the Prefect profile '{get_settings_context().profile.name}'"


def _get_json(url: str) -> tuple[int, object]:
    """(HTTP status, decoded JSON body or None) of a GET; OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            body = reply.read()
            return reply.status, json.loads(body) if body else None
    except urllib.error.HTTPError as error:  # an answer, just not 2xx
        return error.code, None


def wait_healthy(api_url: str, timeout_s: float = 120.0, process: subprocess.Popen | None = None) -> None:
    """Poll `<api>/health` until it answers 200.

    Raises:
        ConfigError: the URL is not http(s), the server process exited, or nothing answered within `timeout_s`
            (the message names the URL and the last failure).
    """
    if not api_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"Prefect API URL {api_url!r} is not an http(s) URL (expected http://HOST:PORT/api)"
        )
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ConfigError(
                f"`prefect server start` exited with code {process.returncode} before answering at {api_url}"
                " (its output above says why)"
            )
        try:
            status, _ = _get_json(f"{api_url.rstrip('/')}/health")
            if status == 200:
                return
            last = f"HTTP {status} from /health"
        except OSError as error:
            last = str(getattr(error, "reason", error))
        time.sleep(0.5)
    raise ConfigError(f"Prefect API at {api_url} did not answer within {timeout_s:.0f} s ({last})")


def wait_deployment(
    api_url: str, flow_name: str, deployment: str, process: subprocess.Popen, timeout_s: float = 180.0
) -> None:
    """Poll the API until it holds deployment `flow_name/deployment`, unpaused (a previous serve-flows left it
    paused on exit, so its mere presence does not mean this one registered it).

    Raises:
        ConfigError: the serving process exited first, or the deployment did not appear within `timeout_s`.
    """
    url = f"{api_url.rstrip('/')}/deployments/name/{flow_name}/{deployment}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigError(
                f"the serving process exited with code {process.returncode} before registering "
                f"{flow_name}/{deployment} at {api_url} (its output above says why)"
            )
        try:
            status, body = _get_json(url)
            if status == 200 and isinstance(body, dict) and not body.get("paused", True):
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise ConfigError(f"{flow_name}/{deployment} was not registered at {api_url} within {timeout_s:.0f} s")


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        return probe.connect_ex((host, port)) == 0


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
    params: Params,
    project_dir: str | Path = ".",
    params_path: str | None = "params.yaml",
    overrides: list[str] | None = None,
) -> int:
    """Start a loopback Prefect server if none is configured, serve `retrain` on its schedule until Ctrl-C.

    Args:
        params: the resolved params (server address, deployment name, cron).
        project_dir: the checkout the scheduled runs work in (dvc.yaml, params.yaml).
        params_path, overrides: what `params` was built from; the serving process and every scheduled run
            load the same (a relative `params_path` is taken from the current directory).

    Returns:
        The serving child's exit code (0 after Ctrl-C or SIGTERM).

    Raises:
        ConfigError: the configured API does not answer, the local server's port is taken, or the server or the
            serving process stopped before serving (each message says what to do).
    """
    cfg = params.orchestration
    env = dict(os.environ)
    server = None
    configured = configured_api_url()
    local_hint = (
        f"unset it so serve-flows starts a local server on {cfg.server_host}:{cfg.server_port}"
        " (`prefect config unset PREFECT_API_URL` for a profile setting)"
    )
    if configured is not None:
        api_url, source = configured
        try:
            wait_healthy(api_url, timeout_s=CONFIGURED_API_TIMEOUT_S)
        except ConfigError as error:
            where = urllib.parse.urlsplit(api_url)
            start = (
                f"prefect server start --host {where.hostname} --port {where.port}"
                if where.port
                else "prefect server start"
            )
            raise ConfigError(
                f"{error}; the URL comes from {source}: start that server (`{start}`), point "
                f"PREFECT_API_URL at a running one, or {local_hint}"
            ) from None
    else:
        api_url = f"http://{cfg.server_host}:{cfg.server_port}/api"
        if _port_taken(cfg.server_host, cfg.server_port):
            raise ConfigError(
                f"{cfg.server_host}:{cfg.server_port} is already in use, so no local Prefect server can start "
                f"there: if it is a Prefect server, use it with PREFECT_API_URL={api_url}; otherwise pick a free "
                "port, e.g. `magicid --set orchestration.server_port=4210 serve-flows`"
            )
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

    def on_sigterm(signum, frame):  # stop in the same order as Ctrl-C (serving child, then server)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        wait_healthy(api_url, process=server)
        print(f"Prefect API: {api_url} (UI: {api_url.removesuffix('/api')})", flush=True)
        child_params = ["--params", str(Path(params_path).resolve())] if params_path else []
        child = subprocess.Popen(
            [sys.executable, "-m", "flows.serve", "--project", str(project_dir), *child_params]
            + [arg for override in overrides or [] for arg in ("--set", override)],
            env=env,
            cwd=str(Path(project_dir).resolve()),
            start_new_session=True,  # Ctrl-C reaches this process only; it stops the child in order
        )
        wait_deployment(api_url, "retrain", cfg.deployment_name, child)
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


def _serve_child(project_dir: str, params_path: str | None, overrides: list[str]) -> None:
    """In the child (PREFECT_API_URL set): register and serve the deployment (blocks)."""
    from prefect import serve

    from flows.retrain import retrain_deployment
    from magicid.config import load_params

    params = load_params(Path(params_path) if params_path else None, overrides)
    serve(retrain_deployment(params, project_dir, params_path, overrides))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="serve the retrain deployment (child of magicid serve-flows)"
    )
    parser.add_argument("--project", default=".")
    parser.add_argument("--params", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    try:
        _serve_child(args.project, args.params, args.overrides)
    except KeyboardInterrupt:
        pass
    except MagicIDError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
