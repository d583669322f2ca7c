"""Training fixtures: a small IDZoom dataset version written once per session, and params for tiny runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def idzoom_dir(tmp_path_factory) -> Path:
    """A DESIGN §2 dataset version: 4 synthetic images (1-3 faces each, 3 identities), 64-px crops.

    Read-only for tests: copy it (`idzoom_copy`) before editing.
    """
    from magicid.training.synthetic import write_synthetic_idzoom

    return write_synthetic_idzoom(tmp_path_factory.mktemp("idzoom") / "v1", n_images=4, crop_size=64, seed=0)


@pytest.fixture
def idzoom_copy(idzoom_dir, tmp_path) -> Path:
    """A private, editable copy of `idzoom_dir`."""
    return Path(shutil.copytree(idzoom_dir, tmp_path / "idzoom"))


@pytest.fixture
def tiny_train_params(tmp_path):
    """Build params for a tiny CPU training run writing under `tmp_path` (extra `key=value` overrides allowed)."""
    from magicid.config import load_params

    def build(*overrides: str, out: str = "run"):
        base = [
            "model.resolution=64",
            "model.device=cpu",
            "train.batch_size=2",
            "model.id_crop_size=32",
            f"train.out_dir={tmp_path / out}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.artifact_root={tmp_path / 'mlartifacts'}",
            "tracking.experiment=magicid-test",
        ]
        return load_params(None, base + list(overrides))

    return build


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Training tests run torch on one thread: on a shared 2-core machine, two threads that contend with other
    processes are several times slower than one (spin-waiting workers). Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
