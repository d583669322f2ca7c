"""`retrain` on a Prefect process work pool, run by a `prefect worker` in a separate process, all on loopback.

The test starts `prefect server start` (private PREFECT_HOME, free port), deploys `retrain` to a process work pool
with `python -m flows.retrain --deploy-to-pool` (which creates the pool), starts `prefect worker start --pool` as
its own process, triggers the deployment, waits for the flow run's final state, checks what the run did (an MLflow
model version that the gate made champion) and stops worker and server with SIGINT, as a user's Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_settings import TINY_TRAIN_RUN

ROOT = Path(__file__).resolve().parents[2]
POOL = "magicid-test-pool"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _stop(process: subprocess.Popen, name: str) -> int:
    """SIGINT (Ctrl-C), then the exit code; a process that ignores it is killed and the test fails."""
    if process.poll() is not None:
        return process.returncode
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"{name} did not stop on SIGINT within 60 s") from None


@pytest.mark.slow
def test_a_worker_in_another_process_runs_the_retrain_deployment_from_a_process_pool(
    tmp_path, two_photo_idzoom
):
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.serve import wait_healthy

    data = two_photo_idzoom
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_URL=api_url,
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        OMP_NUM_THREADS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    prefect = str(Path(sys.executable).with_name("prefect"))
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("server", "worker")}
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=logs["server"],
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    worker = None
    try:
        wait_healthy(api_url, process=server)
        tracking = tmp_path / "mlflow.db"
        overrides = [
            *TINY_TRAIN_RUN,
            f"train.out_dir={tmp_path / 'train'}",
            f"tracking.uri=sqlite:///{tracking}",
            f"tracking.artifact_root={tmp_path / 'mlartifacts'}",
            "tracking.experiment=worker-test",
            "orchestration.deployment_name=pool-test",
            # One layout, one seed, references from the train split: the smallest evaluation the gate reads.
            "eval.reference_split=train",
            "eval.n_people=[1]",
            "eval.seeds=[1000]",
            "eval.n_prompts=1",
            f"eval.out_dir={tmp_path / 'eval'}",
        ]
        deploy = subprocess.run(
            [sys.executable, "-m", "flows.retrain", "--deploy-to-pool", POOL, "--data", str(data), "--no-fit"]
            + ["--report-dir", str(tmp_path / "reports")]  # cwd has no params.yaml: the embedded defaults
            + [arg for o in overrides for arg in ("--set", o)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert deploy.returncode == 0, deploy.stderr[-4000:]
        assert f"deployed retrain/pool-test to work pool {POOL}" in deploy.stdout, deploy.stdout

        worker = subprocess.Popen(
            [prefect, "worker", "start", "--pool", POOL, "--limit", "1"],
            env=env,
            cwd=tmp_path,
            stdout=logs["worker"],
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        with temporary_settings({PREFECT_API_URL: api_url}):
            flow_run = run_deployment("retrain/pool-test", timeout=0)  # trigger only: the worker runs it
            deadline = time.monotonic() + 600
            with get_client(sync_client=True) as client:
                while True:
                    flow_run = client.read_flow_run(flow_run.id)
                    if flow_run.state is not None and flow_run.state.is_final():
                        break
                    assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-4000:]
                    assert time.monotonic() < deadline, f"flow run still {flow_run.state} after 600 s"
                    time.sleep(1)
                pool = client.read_work_pool(POOL)
        worker_log = (tmp_path / "worker.log").read_text()
        assert flow_run.state.is_completed(), f"{flow_run.state}\n{worker_log[-6000:]}"
        assert pool.type == "process" and flow_run.work_pool_name == POOL
        assert str(flow_run.id) in worker_log  # this worker, not some other runner, ran it

        import mlflow

        client = mlflow.MlflowClient(f"sqlite:///{tracking}")
        champion = client.get_model_version_by_alias("magicid", "champion")
        assert str(champion.version) == "1"  # trained, registered, evaluated and promoted by the worker's run
        assert (
            tmp_path / "reports"
        ).is_dir()  # the run wrote where its parameters said, not into the checkout

        assert _stop(worker, "prefect worker") == 0, worker_log[-4000:]
        assert _stop(server, "prefect server") == 0, (tmp_path / "server.log").read_text()[-4000:]
        assert not _answers(port)
    finally:  # a failed assertion must not leave a server or worker behind
        for process in (worker, server):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(30)
        for log in logs.values():
            log.close()
