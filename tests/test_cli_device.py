"""`--device` on every command that runs a model (issue 25): generate, restore, train, evaluate, fit-backbone,
fit-world. An unknown device is refused by the params check; `cuda` on a host without CUDA stops at once with one
line naming the device (exit code 2); `cpu` is accepted and the command goes on."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from magicid.cli import app

COMMANDS = {
    "generate": ["generate", "--prompt", "a photo", "--out", "{tmp}/g.png"],
    "restore": ["restore", "{tmp}/missing.png", "--out", "{tmp}/r.png", "--no-progress"],
    "train": ["train", "--data", "{tmp}/nodata", "--no-progress", "--no-register"],
    "evaluate": ["evaluate", "--model", "models:/nobody/1", "--no-progress"],
    "fit-backbone": ["fit-backbone", "--data", "{tmp}/nodata", "--out", "{tmp}/fb", "--no-progress"],
    "fit-world": ["fit-world", "--data", "{tmp}/nodata", "--out", "{tmp}/fw", "--no-progress"],
}


def _invoke(tmp_path, command: str, device: str):
    args = [a.format(tmp=tmp_path) for a in COMMANDS[command]]
    overrides = ["--set", f"train.out_dir={tmp_path / 'train'}", "--set", f"eval.out_dir={tmp_path / 'eval'}",
                 "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]  # fmt: skip
    return CliRunner().invoke(app, [*overrides, *args, "--device", device])


@pytest.mark.parametrize(
    "command",
    # evaluate's cpu case creates an MLflow store (~20 s): slow.
    [pytest.param(c, marks=pytest.mark.slow) if c == "evaluate" else c for c in sorted(COMMANDS)],
)
def test_device_option(tmp_path, command):
    result = _invoke(tmp_path, command, "tpu")
    assert result.exit_code == 2 and "model.device" in result.output, result.output
    if not torch.cuda.is_available():
        result = _invoke(tmp_path, command, "cuda")
        assert result.exit_code == 2, result.output
        assert result.output.count("\n") == 1 and "no CUDA device" in result.output, result.output
    # cpu passes the device check: the command stops later, at its missing input, never at the device.
    result = _invoke(tmp_path, command, "cpu")
    assert "CUDA" not in result.output and "model.device" not in result.output, result.output
