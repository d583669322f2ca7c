"""Shared fixtures: the repo root, offline defaults, a tiny backbone built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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

    return load_params(ROOT / "params.yaml")


@pytest.fixture(scope="session")
def tiny_backbone():
    """The default tiny backbone (seed 0). Session-scoped: tests must not modify its weights or processors."""
    from magicid.models.tiny import build_tiny_backbone

    return build_tiny_backbone()
