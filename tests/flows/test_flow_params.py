"""Flows read params once, through one helper (issue 24 item 7): an explicit params file that does not exist is an
error (never the defaults in its place), and `retrain` loads its params once and passes them to every sub-flow."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import flows.common
import flows.retrain
from flows.common import DEFAULT_PARAMS_PATH, flow_params, with_overrides
from magicid.config import load_params
from magicid.errors import ConfigError


def test_an_explicit_params_file_that_does_not_exist_is_refused(tmp_path):
    missing = tmp_path / "my-params.yaml"
    with pytest.raises(ConfigError, match="my-params.yaml: parameter file not found"):
        flow_params(str(missing), [])


def test_none_means_defaults_and_the_default_name_reads_the_working_directorys_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    defaults = load_params(None)
    assert flow_params(None, []) == defaults
    assert flow_params(DEFAULT_PARAMS_PATH, []) == defaults  # no params.yaml here: the defaults, as the CLI
    (tmp_path / "params.yaml").write_text("seed: 7\n")
    assert flow_params(DEFAULT_PARAMS_PATH, []).seed == 7
    assert flow_params(None, ["seed=9"]).seed == 9


def test_loaded_params_are_used_as_they_are_and_never_mixed_with_a_file_or_overrides(tmp_path):
    params = load_params(None, ["seed=11"])
    assert flow_params(None, None, params) is params
    assert flow_params(DEFAULT_PARAMS_PATH, None, params) is params
    with pytest.raises(ConfigError, match="either the params or a params file"):
        flow_params(None, ["seed=3"], params)
    with pytest.raises(ConfigError, match="either the params or a params file"):
        flow_params(str(tmp_path / "other.yaml"), None, params)


def test_with_overrides_validates_like_the_loader():
    params = load_params(None)
    assert with_overrides(params, ["model.backbone=/somewhere/fitted"]).model.backbone == "/somewhere/fitted"
    assert params.model.backbone != "/somewhere/fitted"  # a copy: the caller's params are unchanged
    with pytest.raises(ConfigError):
        with_overrides(params, ["model.no_such_key=1"])


def test_retrain_loads_params_once_and_passes_them_to_every_sub_flow(tmp_path, monkeypatch):
    """The chain's body (`retrain_flow.fn`, without Prefect's engine) with its sub-flows and tasks recorded."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text("seed: 5\n")
    loads = []
    real_load = flows.common.load_params
    monkeypatch.setattr(flows.common, "load_params", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    calls: dict[str, dict] = {}

    def record(name, result):
        def call(*args, **kwargs):
            calls[name] = {"args": args, **kwargs}
            return result

        return call

    monkeypatch.setattr(flows.retrain, "validate", record("validate", {"passed": 1, "total": 1}))
    monkeypatch.setattr(
        flows.retrain, "fit_backbone_flow", record("fit", {"out_dir": str(tmp_path / "fitted")})
    )
    # Training registers too (`train_and_register`, one cached task): its result names the model version.
    trained = {"adapter_dir": "a", "run_id": "r", "model": {"name": "magicid", "version": "2", "run_id": "r"}}
    monkeypatch.setattr(flows.retrain, "train_flow", record("train", trained))
    monkeypatch.setattr(flows.retrain, "evaluate_flow", record("evaluate", {}))
    monkeypatch.setattr(flows.retrain, "_champion_version", lambda params: "2")
    monkeypatch.setattr(flows.retrain, "promote_flow", record("promote", {}))
    monkeypatch.setattr(flows.retrain, "build_idzoom_flow", SimpleNamespace(with_options=lambda **_: None))

    flows.retrain.retrain_flow.fn(
        project_dir=None, params_path=str(params_file), overrides=["seed=6"], data_dir=str(tmp_path), fit=True
    )
    assert len(loads) == 1
    first = calls["fit"]["params"]
    assert first.seed == 6 and calls["fit"]["params_path"] is None
    fitted = str(tmp_path / "fitted")
    for name in ("train", "evaluate", "promote"):
        assert calls[name]["params"].seed == 6 and calls[name]["params"].model.backbone == fitted, name
        assert calls[name]["params_path"] is None and "overrides" not in calls[name], name
    assert calls["train"]["register"] is True  # registered with the train params checked above
