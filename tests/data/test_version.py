"""`magicid.data.version`: the dataset version without DVC importable, and the DVC helpers' refusals."""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

import pytest

from magicid.data import manifest as mf
from magicid.data.version import (
    ORIGIN_MANIFESTS,
    ORIGIN_NO_DVC,
    dataset_version,
    dvc_commit,
    dvc_data_paths,
    import_dvc,
)
from magicid.errors import ConfigError


def _dataset(folder: Path) -> tuple[Path, str]:
    """A folder holding two manifest files (bytes only: the version hashes them) and their expected hash."""
    folder.mkdir(parents=True)
    (folder / mf.IMAGES).write_bytes(b"images-bytes")
    (folder / mf.FACES).write_bytes(b"faces-bytes")
    return folder, hashlib.sha256(b"images-bytesfaces-bytes").hexdigest()[:32]


class _BrokenDVC(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `dvc` (so `find_spec` sees it installed) but its import fails, as with a missing dependency."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name == "dvc" else None

    def exec_module(self, module):
        raise ImportError("dvc: a dependency of it is missing")


def _unimportable_dvc(monkeypatch, how: str) -> None:
    for name in [name for name in sys.modules if name == "dvc" or name.startswith("dvc.")]:
        monkeypatch.delitem(sys.modules, name)
    if how == "absent":
        monkeypatch.setitem(
            sys.modules, "dvc", None
        )  # `import dvc` raises ImportError, as where it is absent
    else:
        monkeypatch.setattr(sys, "meta_path", [_BrokenDVC(), *sys.meta_path])


@pytest.mark.parametrize("how", ["absent", "broken"])
def test_inside_a_dvc_repository_with_dvc_unimportable_the_version_is_the_manifests_hash(
    tmp_path, monkeypatch, how
):
    (tmp_path / "repo" / ".dvc").mkdir(parents=True)
    root, expected = _dataset(tmp_path / "repo" / "data")
    _unimportable_dvc(monkeypatch, how)
    with pytest.raises(ImportError):
        import_dvc()
    assert dataset_version(root) == (expected, ORIGIN_NO_DVC)


def test_outside_a_dvc_repository_dvc_is_never_imported(tmp_path, monkeypatch):
    root, expected = _dataset(tmp_path / "data")
    _unimportable_dvc(monkeypatch, "absent")
    assert dataset_version(root) == (expected, ORIGIN_MANIFESTS)


def test_dvc_commit_outside_a_dvc_repository_says_so(tmp_path):
    root, _ = _dataset(tmp_path / "data")
    assert dvc_commit(root) == (False, "not in a DVC repository: the new version is not recorded by DVC")


def test_dvc_data_paths_reads_the_data_stages_and_refuses_others(tmp_path):
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  build_idzoom: {deps: [data/raw], outs: [data/idzoom]}\n"
        "  validate: {metrics: [{reports/validation.json: {cache: false}}]}\n"
    )
    assert dvc_data_paths(tmp_path) == {
        "raw": str(tmp_path / "data/raw"),
        "dataset": str(tmp_path / "data/idzoom"),
        "validation": str(tmp_path / "reports/validation.json"),
    }
    (tmp_path / "dvc.yaml").write_text("stages:\n  build_idzoom: {deps: [data/raw]}\n")
    with pytest.raises(ConfigError, match="expected stages build_idzoom"):
        dvc_data_paths(tmp_path)
