"""checksums.sha256 of a model folder: written over every file, checked on load; a missing, changed or truncated
file, a malformed line or a path leaving the folder is an error naming it."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from magicid.models.checksums import (
    CHECKSUMS_FILE,
    ChecksumError,
    read_checksums,
    verify_model_folder,
    write_checksums,
)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "world"
    (root / "unet").mkdir(parents=True)
    (root / "adapter").mkdir()
    (root / "model_index.json").write_text("{}")
    (root / "unet" / "weights.safetensors").write_bytes(bytes(range(256)) * 40)
    (root / "adapter" / "adapter.safetensors").write_bytes(b"adapter weights" * 100)
    write_checksums(root)
    return root


def test_every_file_is_listed_in_sha256sum_format(folder):
    listed = read_checksums(folder)
    assert set(listed) == {"model_index.json", "unet/weights.safetensors", "adapter/adapter.safetensors"}
    assert listed["model_index.json"] == hashlib.sha256(b"{}").hexdigest()
    assert verify_model_folder(folder) == 3
    check = subprocess.run(["sha256sum", "-c", CHECKSUMS_FILE], cwd=folder, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr  # the standard tool reads it too


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-1]), "changed or truncated"),
        (lambda p: p.write_bytes(b"x" + p.read_bytes()[1:]), "changed or truncated"),
        (lambda p: p.unlink(), "missing"),
    ],
    ids=["truncated", "changed", "missing"],
)
def test_a_damaged_file_is_an_error_naming_it(folder, damage, message):
    path = folder / "unet" / "weights.safetensors"
    damage(path)
    with pytest.raises(ChecksumError, match=message) as error:
        verify_model_folder(folder)
    assert str(path) in str(error.value)


def test_a_subfolder_is_checked_against_its_parents_entries(folder, tmp_path):
    assert verify_model_folder(folder / "adapter") == 1  # the adapter inside a checksummed world folder
    (folder / "unet" / "weights.safetensors").write_bytes(b"other")  # not the adapter's: not its business
    assert verify_model_folder(folder / "adapter") == 1
    (folder / "adapter" / "adapter.safetensors").write_bytes(b"other")
    with pytest.raises(ChecksumError, match="adapter.safetensors"):
        verify_model_folder(folder / "adapter")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert verify_model_folder(plain) == 0  # a folder without checksums (a user's own) is not checked


@pytest.mark.parametrize(
    "line", ["nothex  a.bin", f"{'0' * 64}  ../outside.bin", f"{'0' * 64}  /etc/passwd", "x"]
)
def test_a_malformed_or_escaping_line_is_an_error(folder, line):
    (folder / CHECKSUMS_FILE).write_text(line + "\n")
    with pytest.raises(ChecksumError, match="line 1"):
        verify_model_folder(folder)
