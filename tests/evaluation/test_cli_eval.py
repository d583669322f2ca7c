"""`magicid evaluate` / `magicid promote` argument handling through typer's CliRunner."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from magicid.cli import app


def test_evaluate_rejects_a_model_uri_it_cannot_resolve(tmp_path):
    result = CliRunner().invoke(
        app,
        ["--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "evaluate", "--model", "runs:/abc/model"],
    )
    assert result.exit_code == 2 and "models:/NAME@ALIAS" in result.output


@pytest.mark.slow
def test_promote_without_a_challenger_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    base = [
        "--set",
        f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
        "--set",
        "promotion.model_name=nothing-yet",
    ]
    result = CliRunner().invoke(app, [*base, "promote"])
    assert (
        result.exit_code == 2 and "alias 'challenger'" in result.output and "magicid train" in result.output
    )
    result = CliRunner().invoke(app, [*base, "promote", "--rollback"])
    assert result.exit_code == 2 and "nothing to roll back" in result.output
