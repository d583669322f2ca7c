"""Shared fixtures: the repo root, offline defaults, a tiny backbone built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_settings import TINY_BACKBONE

ROOT = Path(__file__).resolve().parents[1]

# Tests never reach a hub: any attempted download fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def default_params():
    from magicid.config import load_params

    # The mechanisms are tested on the random tiny backbone with fresh adapters; the shipped world that
    # params.yaml names (model.backbone, adapter_path, train.init_from: champion) has its own tests.
    return load_params(ROOT / "params.yaml", TINY_BACKBONE)


@pytest.fixture(scope="session")
def tiny_backbone():
    """The default tiny backbone (seed 0). Session-scoped: tests must not modify its weights or processors."""
    from magicid.models.tiny import build_tiny_backbone

    return build_tiny_backbone()


@pytest.fixture(scope="session")
def sample_world_dir(tmp_path_factory) -> Path:
    """The sample set (ten identities, `magicid sample-data` at scales 1.0 and 0.3) built into an IDZoom version
    with 128-px crops, once per session: the composite world's ingredients (`world/`) included. ~10 s.

    Read-only for tests: copy it before editing.
    """
    from magicid.config import load_params
    from magicid.data.builder import build_idzoom
    from magicid.data.sample import build_sample_set

    root = tmp_path_factory.mktemp("sample-world")
    params = load_params(None, ["data.sample_scales=[1.0, 0.3]", "data.workers=1", "data.crop_size=128"])
    raw = build_sample_set(root / "raw", params)
    return Path(build_idzoom(raw, root / "idzoom", params, progress=False).out_dir)


@pytest.fixture(scope="session")
def postgres_cluster():
    """A throw-away PostgreSQL cluster on loopback for the session (tests/pg_cluster.py), started on first use.

    Skips only where Debian's server binaries are absent; `make test` (and so CI) installs them (`make postgres`).
    """
    from pg_cluster import PostgresCluster, server_bin_dir

    if server_bin_dir() is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb) are absent: `make postgres` installs Debian's postgresql"
        )
    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def review_db_url(request, tmp_path) -> str:
    """A fresh, empty database for a review store: a SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'reviews.db'}"
    return request.getfixturevalue("postgres_cluster").create_database("reviews")


@pytest.fixture(scope="session")
def two_photo_idzoom(tmp_path_factory) -> Path:
    """An IDZoom version of two package photos (astronaut, Tom Hanks) at the default crop size, once per session:
    evaluation needs references with a face its detector finds (the synthetic versions have none). Read-only."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    from magicid.config import load_params
    from magicid.data.builder import build_idzoom
    from magicid.data.sample import package_photo

    root = tmp_path_factory.mktemp("two-photos")
    raw = root / "raw"
    raw.mkdir()
    Image.fromarray(np.ascontiguousarray(skdata.astronaut())).save(raw / "astronaut.png")
    Image.open(package_photo("Tom_Hanks_54745.png")).save(raw / "tom_hanks.png")
    params = load_params(None, ["data.workers=1"])
    return Path(build_idzoom(raw, root / "idzoom", params, progress=False).out_dir)


@pytest.fixture(autouse=True)
def _no_inherited_mlflow_tracking_uri(monkeypatch):
    """`mlflow.set_tracking_uri` writes MLFLOW_TRACKING_URI into this process's environment for its subprocesses,
    and the CLI takes that variable as the tracking store: without this, one test's store would reach the CLI
    subprocesses of the next."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
