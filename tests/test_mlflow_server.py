"""An `mlflow server` backed by PostgreSQL, its artifacts in S3 (moto's server), all on loopback, used by the CLI.

- `magicid train` (which registers its adapter), `evaluate` and `promote` run against it with
  `MLFLOW_TRACKING_URI=http://127.0.0.1:PORT` in their environment and `tracking.artifact_root=s3://...`: the runs, versions and aliases land in
  the PostgreSQL database, the artifacts in the bucket.
- Two `magicid promote` processes started at once over the same challenger end with one consistent champion (and
  `previous`, and no half-done move), on a SQLite tracking database and on the server alike.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from s3_helpers import S3_ENV, _bucket, s3_server  # noqa: F401 - s3_server is a fixture
from tiny_settings import TINY_TRAIN_RUN

pytestmark = pytest.mark.slow

BUCKET = "magicid-mlflow"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(postgres_cluster, s3_server, tmp_path_factory):  # noqa: F811 - the fixture
    """`mlflow server` on loopback: backend store a fresh PostgreSQL database, default artifact root in S3.

    Yields (tracking URL, backend database URL, environment for S3 clients)."""
    backend = postgres_cluster.create_database("mlflow")
    _bucket_env = {**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_server}
    os.environ.update({k: v for k, v in S3_ENV.items() if k not in os.environ})
    _bucket(s3_server, BUCKET)
    port = _free_port()
    env = {**os.environ, **_bucket_env, "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = (tmp_path_factory.mktemp("mlflow-server") / "server.log").open("w")
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    server = subprocess.Popen(
        [mlflow_cli, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        + ["--backend-store-uri", backend, "--default-artifact-root", f"s3://{BUCKET}/default"]
        + ["--no-serve-artifacts"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        assert server.poll() is None, Path(log.name).read_text()[-4000:]
        assert time.monotonic() < deadline, "mlflow server did not answer within 180 s"
        time.sleep(0.5)
    yield url, backend, _bucket_env
    server.terminate()
    server.wait(30)
    log.close()


def _cli(overrides: list[str], *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """`magicid --set ... ARGS` in `cwd` (a folder without params.yaml: the embedded defaults plus `overrides`)."""
    command = [sys.executable, "-m", "magicid", *[a for o in overrides for a in ("--set", o)], *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **extra, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def test_train_register_evaluate_promote_against_a_postgresql_server_with_s3_artifacts(
    mlflow_server, two_photo_idzoom, tmp_path
):
    import boto3
    import sqlalchemy as sa
    from mlflow import MlflowClient

    url, backend, s3 = mlflow_server
    env = _env({**s3, "MLFLOW_TRACKING_URI": url})  # the server is named as MLflow's own tools take it
    overrides = [
        f"tracking.artifact_root=s3://{BUCKET}/magicid",
        "tracking.experiment=server-test",
        "promotion.model_name=server-test",
        *TINY_TRAIN_RUN,
        f"train.out_dir={tmp_path / 'train'}",
        "eval.reference_split=train",
        "eval.n_people=[1]",
        "eval.seeds=[1000]",
        "eval.n_prompts=1",
        f"eval.out_dir={tmp_path / 'eval'}",
    ]
    train = _cli(overrides, "train", "--data", str(two_photo_idzoom), "--no-progress", env=env, cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-4000:]
    assert "model_version: models:/server-test/1 (alias challenger)" in train.stdout, train.stdout
    evaluate = _cli(overrides, "evaluate", "--data", str(two_photo_idzoom), env=env, cwd=tmp_path)
    assert evaluate.returncode == 0, evaluate.stderr[-4000:]
    promote = _cli(overrides, "promote", env=env, cwd=tmp_path)
    assert promote.returncode == 0, promote.stderr[-4000:] + promote.stdout

    client = MlflowClient(tracking_uri=url, registry_uri=url)
    assert str(client.get_model_version_by_alias("server-test", "champion").version) == "1"
    run_id = client.get_model_version("server-test", "1").run_id
    assert client.get_run(run_id).info.artifact_uri.startswith(f"s3://{BUCKET}/magicid/")
    keys = [
        item["Key"]
        for page in boto3.client("s3", endpoint_url=s3["MLFLOW_S3_ENDPOINT_URL"])
        .get_paginator("list_objects_v2")
        .paginate(Bucket=BUCKET, Prefix="magicid/")
        for item in page.get("Contents", [])
    ]
    assert any(key.endswith("adapter/adapter.safetensors") for key in keys), keys[:20]
    # The server's store is the PostgreSQL database: the registry rows are there.
    engine = sa.create_engine(backend)
    with engine.connect() as connection:
        aliases = connection.execute(
            sa.text("select alias, version from registered_model_aliases where name = 'server-test'")
        ).all()
    engine.dispose()
    assert ("champion", 1) in [(a, int(v)) for a, v in aliases]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql-server"])
def test_two_concurrent_promotes_end_with_one_consistent_champion(backend, request, tmp_path):
    from registry_kill_driver import setup_model

    from magicid import promotion, registry
    from magicid.config import load_params

    extra: dict[str, str] = {}
    if backend == "sqlite":
        uri, artifacts = f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts")
    else:
        uri, _, extra = request.getfixturevalue("mlflow_server")
        artifacts = f"s3://{BUCKET}/concurrent-{tmp_path.name}"
    name = f"race-{backend}"
    overrides = [
        f"tracking.uri={uri}",
        f"tracking.artifact_root={artifacts}",
        "tracking.experiment=race-test",
        f"promotion.model_name={name}",
        "promotion.bootstrap.n_resamples=200",
        "promotion.compare=[id_similarity]",
    ]
    saved = {key: os.environ.get(key) for key in extra}
    os.environ.update(extra)
    try:
        params = load_params(None, overrides)
        setup_model(params, "promote")  # version 1 champion, version 2 (better) challenger
        env = _env(extra)
        command = [sys.executable, "-m", "magicid", *[a for o in overrides for a in ("--set", o)], "promote"]
        racers = [
            subprocess.Popen(
                command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(2)
        ]
        outputs = [racer.communicate(timeout=300) for racer in racers]
        codes = [racer.returncode for racer in racers]
        # One of them may lose the race on the server (seen once in four runs there: exit 2); a loser must stop
        # with the CLI's one-line error, never a traceback, and the registry must be left consistent either way.
        assert 0 in codes and set(codes) <= {0, 2}, outputs
        for code, (_stdout, stderr) in zip(codes, outputs, strict=True):
            if code == 2:
                print(f"\nthe losing promote ({backend}): {stderr.strip().splitlines()[-1]}")
                assert "Traceback" not in stderr, stderr[-3000:]
        client = registry.open_client(params)
        assert registry.aliases(params) == {"challenger": "2", "champion": "2", "previous": "1"}
        assert promotion.pending_move(client, name) is None
        actions = sorted(line for out, _ in outputs for line in out.splitlines() if "action" in line)
        assert any("promoted" in line for line in actions), actions
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
