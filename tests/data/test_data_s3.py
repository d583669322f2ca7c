# ruff: noqa: F811 - the S3 fixtures are imported from s3_helpers and used as arguments
"""build-data from and to S3 (moto's server on loopback), byte-identical to a local build; a flaky S3 that
keeps failing stops the command clearly and leaves the previous version whole (issue 11, item 7)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from s3_helpers import FlakyProxy, _bucket, s3_env, s3_server  # noqa: F401 - fixtures
from typer.testing import CliRunner

from magicid.cli import app
from magicid.data import manifest as mf
from magicid.data.builder import build_idzoom
from magicid.storage import LocalStorage, S3Storage

from .conftest import MAX_PIXELS

SETTINGS = [f"data.max_pixels={MAX_PIXELS}", "data.workers=1", "data.crop_size=128"]


def _cli(endpoint: str, cache: Path, *args: str):
    sets = [
        *SETTINGS,
        f"storage.s3_endpoint_url={endpoint}",
        "storage.s3_max_attempts=2",
        f"storage.cache_dir={cache}",
    ]
    return CliRunner().invoke(
        app, [a for s in sets for a in ("--set", s)] + ["build-data", *args, "--no-progress"]
    )


def _objects(store) -> dict[str, bytes]:
    return {key: store.read(key) for key in store.list()}


@pytest.mark.slow
def test_build_data_from_and_to_s3_equals_a_local_build(raw_dir, data_params, tmp_path, s3_server, s3_env):
    local_in = tmp_path / "in"
    for source in ("good/astronaut.png", "bad/notes.txt"):
        (local_in / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(raw_dir / source, local_in / source)
    build_idzoom(local_in, tmp_path / "local_out", data_params, progress=False)
    _bucket(s3_server, "raw")
    _bucket(s3_server, "datasets")
    raw = S3Storage("s3://raw/photos", endpoint_url=s3_server)
    for key in LocalStorage(local_in).list():
        raw.write(key, (local_in / key).read_bytes())

    result = _cli(
        s3_server, tmp_path / "cache", "--input", "s3://raw/photos", "--out", "s3://datasets/idzoom/v1"
    )
    assert result.exit_code == 0, result.output
    remote = S3Storage("s3://datasets/idzoom/v1", endpoint_url=s3_server)
    assert _objects(remote) == _objects(LocalStorage(tmp_path / "local_out"))

    # A flaky S3 that keeps failing: the command stops with a one-line error; the previous version is whole.
    before = _objects(remote)
    raw.write("good/second.png", (raw_dir / "good/tom_hanks.png").read_bytes())
    proxy = FlakyProxy(s3_server, lambda method, path, count: method == "PUT")
    try:
        result = _cli(
            proxy.url, tmp_path / "cache", "--input", "s3://raw/photos", "--out", "s3://datasets/idzoom/v1"
        )
    finally:
        proxy.close()
    assert result.exit_code == 2 and "S3 write failed" in result.output and "Traceback" not in result.output
    assert _objects(remote) == before
    for name in (mf.IMAGES, mf.FACES, mf.QUARANTINE, mf.STATS):
        assert remote.read(name) == before[name]
