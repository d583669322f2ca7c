"""`magicid restore IN.png --ref A.png --out OUT.png`: output, comparison image, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from magicid.cli import app

runner = CliRunner()


def test_restore_without_a_trained_adapter_says_how_to_get_one(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    no_adapter = [
        "--set",
        "model.backbone=tiny",
        "--set",
        "model.adapter_path=null",
    ]  # not params.yaml's world
    result = runner.invoke(
        app, [*no_adapter, "restore", str(tmp_path / "in.png"), "--out", str(tmp_path / "o.png")]
    )
    assert (
        result.exit_code == 2 and "magicid train" in result.output and "--untrained-adapter" in result.output
    )
    assert not (tmp_path / "o.png").exists()


def test_missing_input_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["restore", str(tmp_path / "nope.png"), "--out", str(tmp_path / "o.png")])
    assert result.exit_code == 2
    assert "nope.png" in result.output and "not found" in result.output


@pytest.mark.slow
def test_restore_writes_output_and_comparison(tmp_path):
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((256, 256), Image.BICUBIC)
    photo.save(tmp_path / "in.png")
    photo.transpose(Image.FLIP_LEFT_RIGHT).save(tmp_path / "ref.png")  # same person, mirrored
    out = tmp_path / "out.png"
    result = runner.invoke(
        app, ["restore", str(tmp_path / "in.png"), "--ref", str(tmp_path / "ref.png"), "--out", str(out),
              "--faces", "all", "--untrained-adapter"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "identity ref.png" in result.output
    restored = np.asarray(Image.open(out))
    compare = Image.open(tmp_path / "out_compare.png")
    assert restored.shape == (256, 256, 3) and compare.size == (256 * 2 + 4, 256)
    assert not np.array_equal(restored, np.asarray(photo))
