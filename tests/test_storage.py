# ruff: noqa: F811 - the S3 fixtures are imported from s3_helpers and used as arguments
"""magicid.storage against a real S3 API (moto's server on 127.0.0.1, started here), local folders alike, and a
flaky S3 (a proxy answering HTTP 500) that is retried or fails clearly (issue 11, item 7)."""

from __future__ import annotations

import shutil
import sys

import pytest
from s3_helpers import FlakyProxy, _bucket, s3_env, s3_server  # noqa: F401 - fixtures

from magicid.storage import LocalStorage, S3Storage, StorageError, check_key


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path, s3_server, s3_env):
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    _bucket(s3_server, "iface")
    return S3Storage(f"s3://iface/{tmp_path.name}", endpoint_url=s3_server)


def test_one_interface_for_local_and_s3(storage):
    assert storage.list() == [] and not storage.exists("a/b.bin")
    storage.write("a/b.bin", b"one")
    storage.write("a/b.bin", b"two")  # replaced whole
    storage.write("c.txt", b"three")
    assert storage.read("a/b.bin") == b"two" and storage.exists("c.txt")
    assert storage.list() == ["a/b.bin", "c.txt"] and storage.list("a/") == ["a/b.bin"]
    storage.delete("a/b.bin")
    assert storage.list() == ["c.txt"]
    for bad in ("../x", "/etc/passwd", "a//b", "a/./b", ""):
        with pytest.raises(StorageError, match="not a safe relative key"):
            storage.write(bad, b"x")


def test_check_key_refuses_escapes():
    assert check_key("images/a.png") == "images/a.png"
    with pytest.raises(StorageError):
        check_key("images/../../etc/passwd")


@pytest.mark.slow
def test_injected_500s_are_retried(s3_server, s3_env):
    _bucket(s3_server, "flaky")
    proxy = FlakyProxy(s3_server, lambda method, path, count: method in ("PUT", "GET") and count <= 2)
    try:
        store = S3Storage("s3://flaky/retry", endpoint_url=proxy.url, max_attempts=5)
        store.write("x.bin", b"payload")
        assert store.read("x.bin") == b"payload"
        assert proxy.failed == 4  # two 500s for the PUT and two for the GET, each retried by botocore
    finally:
        proxy.close()


@pytest.mark.slow
def test_persistent_500s_fail_clearly_naming_the_uri(s3_server, s3_env):
    _bucket(s3_server, "flaky")
    proxy = FlakyProxy(s3_server, lambda method, path, count: method == "PUT")
    try:
        store = S3Storage("s3://flaky/down", endpoint_url=proxy.url, max_attempts=3)
        with pytest.raises(
            StorageError, match=r"s3://flaky/down/x.bin: S3 write failed \(InternalError, HTTP 500"
        ):
            store.write("x.bin", b"payload")
        assert proxy.failed >= 3  # each attempt reached the server and got its 500
    finally:
        proxy.close()


@pytest.mark.slow
def test_mlflow_artifacts_on_s3(s3_server, s3_env, tmp_path, monkeypatch):
    """The trainer's tracker with `tracking.artifact_root: s3://...` logs artifacts to S3."""
    from magicid.config import load_params
    from magicid.training.tracking import RunTracker

    _bucket(s3_server, "mlflow")
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)  # the endpoint comes from params.storage
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    params = load_params(
        None,
        [
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.artifact_root=s3://mlflow/artifacts",
            f"storage.s3_endpoint_url={s3_server}",
        ],
    )
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"w" * 100)
    tracker = RunTracker(params, enabled=True)
    tracker.start(None, run_name="s3")
    tracker.artifacts(folder, "checkpoints/step_000001")
    tracker.end("FINISHED")
    keys = S3Storage("s3://mlflow/artifacts", endpoint_url=s3_server).list()
    assert any(k.endswith("checkpoints/step_000001/weights.bin") for k in keys), keys


@pytest.mark.slow
def test_dvc_push_and_pull_through_an_s3_remote(s3_server, s3_env, tmp_path, monkeypatch):
    """The DVC remote can be S3: `dvc push` to moto and `dvc pull` back restore the dataset folder byte for byte
    (the endpoint goes in `.dvc/config.local`, keeping the port out of the committed config)."""
    import subprocess

    _bucket(s3_server, "dvcstore")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    repo = tmp_path / "repo"
    (repo / "data" / "idzoom").mkdir(parents=True)
    (repo / "data" / "idzoom" / "images.parquet").write_bytes(b"manifest bytes")
    (repo / "data" / "idzoom" / "crops").mkdir()
    (repo / "data" / "idzoom" / "crops" / "a.png").write_bytes(b"\x89PNG crop")
    dvc = [sys.executable, "-m", "dvc"]

    def run(*args: str) -> None:
        result = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr

    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    run(*dvc, "remote", "add", "-d", "s3store", "s3://dvcstore/dvc")
    run(*dvc, "remote", "modify", "--local", "s3store", "endpointurl", s3_server)
    run(*dvc, "add", "-q", "data/idzoom")
    run(*dvc, "push", "-q")
    assert S3Storage("s3://dvcstore/dvc", endpoint_url=s3_server).list(), "nothing was pushed"
    assert s3_server.split(":")[-1] not in (repo / ".dvc" / "config").read_text()
    shutil.rmtree(repo / "data" / "idzoom")
    shutil.rmtree(repo / ".dvc" / "cache")
    run(*dvc, "pull", "-q")
    assert (repo / "data" / "idzoom" / "images.parquet").read_bytes() == b"manifest bytes"
    assert (repo / "data" / "idzoom" / "crops" / "a.png").read_bytes() == b"\x89PNG crop"
