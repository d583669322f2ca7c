"""The orchestration's mechanisms: schedule, retries on transient I/O, caching, validation as a gate, the chain.

Prefect runs in-process against the session's ephemeral API (tests/flows/conftest.py: private PREFECT_HOME,
heartbeats off).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_settings import TINY_TRAIN_RUN

ROOT = Path(__file__).resolve().parents[2]


def _tiny(tmp_path: Path, *extra: str) -> list[str]:
    """Overrides for a tiny CPU run writing under `tmp_path`."""
    return [
        *TINY_TRAIN_RUN,
        f"train.out_dir={tmp_path / 'train'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.artifact_root={tmp_path / 'mlartifacts'}",
        "tracking.experiment=orchestration-test",
        *extra,
    ]


@pytest.fixture()
def synthetic_idzoom(tmp_path) -> Path:
    from magicid.training.synthetic import write_synthetic_idzoom

    return write_synthetic_idzoom(tmp_path / "idzoom", n_images=4, crop_size=64, seed=0)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_retrain_deployment_has_the_params_cron_schedule(tmp_path):
    from prefect import get_client

    from flows.retrain import retrain_deployment
    from magicid.config import load_params

    params = load_params(
        None, ["orchestration.retrain_cron=15 2 * * 1", "orchestration.deployment_name=weekly"]
    )
    deployment = retrain_deployment(params, tmp_path, None)
    assert deployment.schedules[0].schedule.cron == "15 2 * * 1"
    assert deployment.parameters["project_dir"] == str(tmp_path.resolve())
    deployment.apply()
    with get_client(sync_client=True) as client:
        stored = client.read_deployment_by_name("retrain/weekly")
    assert [s.schedule.cron for s in stored.schedules] == ["15 2 * * 1"]


def test_a_task_failing_once_on_io_is_retried_and_succeeds(monkeypatch, synthetic_idzoom, tmp_path):
    import magicid.data.validation as validation
    from flows.build_idzoom import validate

    calls = {"n": 0}
    real = validation.validate_idzoom

    def flaky(root, report_dir):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("disk busy (injected)")
        return real(root, report_dir)

    monkeypatch.setattr(validation, "validate_idzoom", flaky)
    from prefect import flow

    @flow
    def once() -> dict:
        return validate.with_options(retry_delay_seconds=0)(str(synthetic_idzoom), str(tmp_path / "reports"))

    result = once()
    assert calls["n"] == 2
    assert result["passed"] == result["total"] > 0


def test_bad_input_is_not_retried(monkeypatch, tmp_path):
    import magicid.data.validation as validation
    from flows.build_idzoom import validate
    from magicid.errors import DataError

    calls = {"n": 0}

    def bad(root, report_dir):
        calls["n"] += 1
        raise DataError(f"{root}: not a dataset (injected)")

    monkeypatch.setattr(validation, "validate_idzoom", bad)
    from prefect import flow

    @flow
    def once() -> dict:
        return validate.with_options(retry_delay_seconds=0)(str(tmp_path), str(tmp_path / "reports"))

    with pytest.raises(DataError):
        once()
    assert calls["n"] == 1


def _register_champion(tracking_uri: str, name: str) -> str:
    """A stand-in champion: a trivial pyfunc model registered as version 1 with alias `champion`."""
    import mlflow
    import mlflow.pyfunc

    class Constant(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="m", python_model=Constant(), pip_requirements=["mlflow"])
    version = mlflow.register_model(info.model_uri, name)
    mlflow.MlflowClient(tracking_uri).set_registered_model_alias(name, "champion", version.version)
    return str(version.version)


@pytest.mark.slow
def test_a_validation_failure_stops_retrain_before_training(monkeypatch, synthetic_idzoom, tmp_path):
    import mlflow
    import pyarrow.parquet as pq

    import magicid.training.trainer as trainer
    from flows.retrain import retrain_flow
    from magicid.errors import ValidationFailed

    # Corrupt the version: one embedding no longer unit-norm (an expectation of the suite).
    table = pq.read_table(synthetic_idzoom / "faces.parquet").to_pylist()
    table[0]["embedding"] = [2.0 * v for v in table[0]["embedding"]]
    import pyarrow as pa

    pq.write_table(
        pa.Table.from_pylist(table, schema=pq.read_schema(synthetic_idzoom / "faces.parquet")),
        synthetic_idzoom / "faces.parquet",
    )

    overrides = _tiny(tmp_path, "promotion.model_name=gate-test")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # the stand-in champion's artifacts go to ./mlruns
    champion = _register_champion(tracking_uri, "gate-test")

    def must_not_train(*args, **kwargs):
        raise AssertionError("training ran after a failed validation")

    monkeypatch.setattr(trainer, "train", must_not_train)
    with pytest.raises(ValidationFailed):
        retrain_flow(
            project_dir=None,
            params_path=None,
            overrides=overrides,
            data_dir=str(synthetic_idzoom),
            fit=False,
            report_dir=str(tmp_path / "reports"),
        )
    client = mlflow.MlflowClient(tracking_uri)
    assert str(client.get_model_version_by_alias("gate-test", "champion").version) == champion
    assert [str(v.version) for v in client.search_model_versions("name='gate-test'")] == [champion]
    assert json.loads((tmp_path / "reports" / "validation.json").read_text())["n_failed"] >= 1


@pytest.mark.slow
def test_train_flow_second_run_is_a_cache_hit(monkeypatch, synthetic_idzoom, tmp_path):
    import magicid.training.trainer as trainer
    from flows.train import train_flow

    calls = {"n": 0}
    real = trainer.train

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train", counted)
    overrides = _tiny(tmp_path)
    first = train_flow(str(synthetic_idzoom), params_path=None, overrides=overrides)
    second = train_flow(str(synthetic_idzoom), params_path=None, overrides=overrides)
    assert calls["n"] == 1 and second == first
    # Changed params: trained again.
    third = train_flow(str(synthetic_idzoom), params_path=None, overrides=overrides + ["train.lr=2e-4"])
    assert calls["n"] == 2 and third["run_id"] != first["run_id"]
    # The adapter folder deleted: trained again, although data and params are unchanged.
    shutil.rmtree(first["adapter_dir"])
    train_flow(str(synthetic_idzoom), params_path=None, overrides=overrides)
    assert calls["n"] == 3 and Path(first["adapter_dir"]).is_dir()


def _dvc_project(tmp_path: Path) -> Path:
    """A DVC project like the checkout (dvc.yaml's build and validate stages, its code, params with tiny data
    settings, a local remote) over a raw folder of two package photos and one broken file."""
    from skimage import data as skdata

    from magicid.data.sample import package_photo

    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(ROOT / "magicid", project / "magicid", ignore=shutil.ignore_patterns("__pycache__"))
    import yaml

    # The checkout's stages minus sample_data (`dvc repro build_idzoom` would regenerate the raw folder upstream).
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    del spec["stages"]["sample_data"]
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    params = (ROOT / "params.yaml").read_text()
    params = params.replace("workers: 2 ", "workers: 1 ").replace(
        "dvc_stages: [sample_data, build_idzoom, validate]", "dvc_stages: [build_idzoom, validate]"
    )
    (project / "params.yaml").write_text(params)
    raw = project / "data" / "raw"
    raw.mkdir(parents=True)
    Image.fromarray(np.ascontiguousarray(skdata.astronaut())).save(raw / "astronaut.png")
    shutil.copy(package_photo("Tom_Hanks_54745.png"), raw / "tom_hanks.png")
    (raw / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=project, check=True)
    subprocess.run([*dvc, "remote", "add", "-d", "local", str(tmp_path / "remote")], cwd=project, check=True)
    return project


@pytest.mark.slow
def test_retrain_chain_with_dvc_then_a_rerun_is_cache_hits(monkeypatch, tmp_path):
    import mlflow
    import yaml

    import magicid.training.trainer as trainer
    from flows.retrain import retrain_flow

    project = _dvc_project(tmp_path)
    calls = {"n": 0}
    real = trainer.train

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train", counted)
    monkeypatch.chdir(project)
    # Two unlabelled photos: references come from the train split, one person a layout, one seed.
    evaluation = ("eval.reference_split=train", "eval.n_people=[1]", "eval.seeds=[1000]", "eval.n_prompts=1")
    kwargs = dict(
        project_dir=str(project),
        params_path=str(project / "params.yaml"),
        overrides=_tiny(tmp_path, *evaluation),
        fit=False,
    )
    first = retrain_flow(**kwargs)

    # Data: built (both images analysed by the fan-out, the broken file quarantined), validated, in dvc.lock,
    # pushed to the remote; the training run's MLflow input is that DVC hash.
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    md5 = lock["stages"]["build_idzoom"]["outs"][0]["md5"].removesuffix(".dir")
    assert first["data"]["n_images"] == 2 and first["data"]["n_quarantined"] == 1
    assert first["data"]["n_analysed"] == 3
    assert first["data"]["data_version"] == {"version": md5, "origin": "dvc"}
    assert first["data"]["validation"]["passed"] == first["data"]["validation"]["total"] > 0
    assert any((tmp_path / "remote").rglob("*")), "dvc push wrote nothing to the remote"
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(first["train"]["run_id"])
    assert run.data.tags["dataset_version"] == md5 == first["train"]["dataset_version"]
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [md5]
    assert first["promotion"]["version"] == first["model"]["version"]

    # Nothing changed: nothing analysed, training a cache hit (same run), same model version.
    second = retrain_flow(**kwargs)
    assert calls["n"] == 1
    assert second["data"]["n_analysed"] == 0
    assert second["train"] == first["train"]
    assert second["model"] == first["model"]
