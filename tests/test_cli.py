import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app  # the console script's app: the library's commands plus demo, serve-flows

runner = CliRunner()


def _commands():
    import typer.main

    group = typer.main.get_command(app)
    return sorted(group.commands)


def test_top_level_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    for command in ("info", "generate", "demo"):
        assert command in result.output


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_generate_writes_png_of_configured_size_and_is_deterministic(tmp_path, repo_root):
    params = str(repo_root / "params.yaml")
    outs = []
    for name in ("a.png", "b.png"):
        out = tmp_path / name
        result = runner.invoke(
            app,
            [
                "--params",
                params,
                "--set",
                "model.resolution=128",
                "--set",
                "model.num_inference_steps=3",
                "generate",
                "--prompt",
                "a photo of a person",
                "--seed",
                "3",
                "--out",
                str(out),
            ],
        )
        assert result.exit_code == 0, result.output
        outs.append(np.asarray(Image.open(out)))
    assert outs[0].shape == (128, 128, 3)
    assert np.array_equal(outs[0], outs[1])


def test_generate_seed_changes_image(tmp_path, repo_root):
    images = []
    for seed in (0, 1):
        out = tmp_path / f"s{seed}.png"
        result = runner.invoke(
            app,
            [
                "--params",
                str(repo_root / "params.yaml"),
                "--set",
                "model.resolution=64",
                "--set",
                "model.num_inference_steps=2",
                "generate",
                "-p",
                "x",
                "--seed",
                str(seed),
                "--out",
                str(out),
            ],
        )
        assert result.exit_code == 0, result.output
        images.append(np.asarray(Image.open(out)))
    assert not np.array_equal(images[0], images[1])


def test_bad_override_exits_with_named_key(repo_root):
    result = runner.invoke(
        app, ["--params", str(repo_root / "params.yaml"), "--set", "model.nosuch=1", "info"]
    )
    assert result.exit_code == 2
    assert "model.nosuch" in result.output


def test_missing_params_file_is_named(tmp_path):
    result = runner.invoke(app, ["--params", str(tmp_path / "x.yaml"), "info"])
    assert result.exit_code == 2
    assert "x.yaml: parameter file not found" in result.output


def test_info_reports_versions_backends_and_gpu(repo_root):
    result = runner.invoke(app, ["--params", str(repo_root / "params.yaml"), "info"])
    assert result.exit_code == 0, result.output
    assert "version.torch: 2.13.0" in result.output
    assert "gpu:" in result.output
    assert "config.model.backbone: local folder models/offline_world" in result.output


def test_mlflow_tracking_uri_from_the_environment_gives_way_to_an_explicit_set(repo_root, tmp_path):
    """`MLFLOW_TRACKING_URI` names the tracking store as for MLflow's own tools (with a note); `--set tracking.uri`
    still wins. As processes: the variable is read as the process started (mlflow rewrites it in-process)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'from-env.db'}"}
    command = [sys.executable, "-m", "magicid", "--params", str(repo_root / "params.yaml")]
    shown = subprocess.run([*command, "info"], env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "from-env.db" in shown.stdout, shown.stderr
    assert "from MLFLOW_TRACKING_URI" in shown.stderr
    explicit = subprocess.run(
        [*command, "--set", "tracking.uri=sqlite:///explicit.db", "info"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "explicit.db" in explicit.stdout and "from-env.db" not in explicit.stdout, explicit.stdout
