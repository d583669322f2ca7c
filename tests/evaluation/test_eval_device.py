"""A registered model runs where its loader says (issue 25): `magicid evaluate` loads it on its own `model.device` and
`model.dtype` (pyfunc `model_config`), not on those it was registered with."""

from __future__ import annotations

import torch

from magicid import registry


def test_model_config_sets_device_and_dtype_of_a_registered_model(registered_tiny_model):
    import mlflow.pyfunc

    params, version = registered_tiny_model("eval-device")
    mlflow.set_tracking_uri(params.tracking.uri)
    mlflow.set_registry_uri(params.tracking.uri)
    uri = f"models:/{version.name}/{version.version}"
    as_registered = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    assert as_registered.params.model.dtype == "float32" and as_registered.pipe.unet.dtype == torch.float32
    loaded = mlflow.pyfunc.load_model(uri, model_config={"device": "cpu", "dtype": "bfloat16"})
    wrapper = loaded.unwrap_python_model()
    assert wrapper.params.model.dtype == "bfloat16"
    assert wrapper.pipe.unet.dtype == torch.bfloat16 and wrapper.pipe.controlnet.dtype == torch.bfloat16
    assert registry.MagicIDPyfuncModel.__doc__ and "model_config" in registry.MagicIDPyfuncModel.__doc__


def test_evaluate_passes_its_own_device_and_dtype(monkeypatch, eval_params, registered_tiny_model):
    """`evaluate_model` loads the model with the evaluator's `model.device` / `model.dtype` as its model_config."""
    import mlflow.pyfunc

    from magicid.evaluation.run import evaluate_model

    seen = {}

    class Stop(Exception):
        pass

    def load_model(uri, model_config=None, **kwargs):
        seen.update(model_config or {})
        raise Stop  # the rest of the evaluation is tested elsewhere

    _, version = registered_tiny_model("eval-device-2")
    monkeypatch.setattr(mlflow.pyfunc, "load_model", load_model)
    params = eval_params("model.dtype=bfloat16")
    try:
        evaluate_model(params, f"models:/{version.name}/{version.version}", log=False)
    except Stop:
        pass
    assert seen == {"device": "cpu", "dtype": "bfloat16"}


def test_a_version_registered_without_placement_keys_is_a_clear_error(
    monkeypatch, eval_params, registered_tiny_model
):
    """MLflow drops model_config keys a model was not logged with: evaluate says so instead of running elsewhere."""
    import mlflow.pyfunc
    import pytest

    from magicid.errors import ConfigError
    from magicid.evaluation.run import evaluate_model

    _, version = registered_tiny_model("eval-device-3")
    real = mlflow.pyfunc.load_model
    monkeypatch.setattr(mlflow.pyfunc, "load_model", lambda uri, model_config=None: real(uri))
    with pytest.raises(
        ConfigError, match="loads on model.device=cpu model.dtype=float32, not the asked cpu/bfloat16"
    ):
        evaluate_model(
            eval_params("model.dtype=bfloat16"), f"models:/{version.name}/{version.version}", log=False
        )
