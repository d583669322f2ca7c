"""fit-world: deterministic by seed, resume reaches the uninterrupted weights bit for bit (in either phase), the folder
loads through the real-weights path with its checksums checked, refusals are clear errors, MLflow nests the adapter
run under the fit's. The composite world is `world_standin.py`'s stand-in (same types as `magicid.data.world`)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_settings import TINY_WORLD_FIT

from magicid.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from world_standin import StandinWorld, StandinWorldDataset  # noqa: E402

FACTORIES = {"world_factory": StandinWorld, "dataset_factory": StandinWorldDataset}
WEIGHTS = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "adapter/adapter.safetensors",
)


@pytest.fixture(scope="module")
def world_data(tmp_path_factory) -> Path:
    from magicid.training.synthetic import write_synthetic_idzoom

    return write_synthetic_idzoom(
        tmp_path_factory.mktemp("worlddata") / "v1", n_images=3, crop_size=64, seed=0
    )


def _params(tmp: Path, *overrides: str):
    from magicid.config import load_params

    base = [
        *TINY_WORLD_FIT,
        "fit_world.val_samples=2",
        "fit_world.eval_every=2",
        "fit_world.checkpoint_every=1",
        "fit_world.log_every=1",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        f"tracking.artifact_root={tmp / 'mlartifacts'}",
        "tracking.experiment=magicid-world-test",
    ]
    return load_params(None, base + list(overrides))


@pytest.fixture
def world_params(tmp_path):
    return lambda *overrides: _params(tmp_path, *overrides)


def _fit(params, data, out, **kwargs):
    from magicid.training.world_fit import fit_world

    kwargs.setdefault("track", False)
    return fit_world(params, data, out, progress=False, **FACTORIES, **kwargs)


def _weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(folder / name)) for name in WEIGHTS}


def _same(a, b) -> bool:
    return all(a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k]) for k in a[n]) for n in a)


@pytest.fixture(scope="module")
def fitted_world(world_data, tmp_path_factory) -> tuple[Path, object]:
    """One tiny fit, untracked (read-only: copy before damaging)."""
    tmp = tmp_path_factory.mktemp("fitted")
    params = _params(tmp)
    result = _fit(params, world_data, tmp / "world")
    return result, params


def test_the_folder_holds_backbone_adapter_report_params_and_checksums(fitted_world):
    from magicid.models.checksums import CHECKSUMS_FILE, read_checksums
    from magicid.training.fit import read_fit_key

    result, params = fitted_world
    folder = result.out_dir
    assert result.finished and not result.reused
    listed = read_checksums(folder)
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert set(listed) == on_disk - {CHECKSUMS_FILE}  # every file, each with its SHA-256
    report = json.loads((folder / "fit_report.json").read_text())
    assert report["dataset_version"] and report["fit_world_seconds"] > 0
    assert report["fit_step_overhead_ms"] >= 0 and report["adapter"]["unet_trained"] is True
    assert set(report["backbone"]["timings"]) == {"vae", "unet"}
    assert report["folder_megabytes"] <= params.fit_world.max_megabytes
    assert report["world"]["identities"] == ["synthetic-0", "synthetic-1", "synthetic-2"]
    assert (folder / "params.yaml").read_text().startswith("seed: 0")
    assert read_fit_key(folder) == json.loads((folder / "fit_key.json").read_text())["key"]
    assert not Path(f"{folder}.checkpoint").exists()  # removed once the folder is written


def test_the_folder_loads_as_backbone_and_adapter_and_the_unet_trained_with_the_adapter(fitted_world):
    from magicid.generate import load_adapter
    from magicid.models.backbone import load_backbone

    result, params = fitted_world
    folder = result.out_dir
    model = params.model.model_copy(update={"backbone": str(folder), "adapter_path": str(folder / "adapter")})
    loaded = params.model_copy(update={"model": model})
    backbone = load_backbone(loaded)
    adapter = load_adapter(loaded, backbone)
    assert adapter is not None and backbone.source == str(folder)
    unet = load_file(str(folder / "unet/diffusion_pytorch_model.safetensors"))
    assert not any(".processor." in key for key in unet)  # MGMICA's weights are the adapter's, not the UNet's


@pytest.mark.slow
def test_fit_world_is_tracked_with_the_adapter_run_nested(world_data, world_params, tmp_path):
    from mlflow import MlflowClient

    params = world_params()
    result = _fit(params, world_data, tmp_path / "world", track=True)
    client = MlflowClient(tracking_uri=params.tracking.uri)
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mlflow.source.name"] == "magicid fit-world"
    assert parent.data.params["fit_world.adapter_steps"] == "2"
    assert {m.step for m in client.get_metric_history(result.run_id, "unet_loss")} == {3, 4}
    assert "offline_world" in {a.path for a in client.list_artifacts(result.run_id)}
    child = client.get_run(result.report["adapter"]["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == result.run_id
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "loss")) == [1, 2]


@pytest.mark.slow
def test_fit_world_is_deterministic_by_seed(world_data, world_params, tmp_path):
    _fit(world_params(), world_data, tmp_path / "a")
    _fit(world_params(), world_data, tmp_path / "b")
    _fit(world_params("seed=1"), world_data, tmp_path / "c")
    a, b, c = (_weights(tmp_path / name) for name in "abc")
    assert _same(a, b)
    assert not torch.equal(a[WEIGHTS[0]]["conv_in.weight"], c[WEIGHTS[0]]["conv_in.weight"])
    assert not _same({WEIGHTS[3]: a[WEIGHTS[3]]}, {WEIGHTS[3]: c[WEIGHTS[3]]})  # the adapter too


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [1, 3, 5])  # in the VAE phase, in the UNet phase, in the adapter phase
def test_resume_reaches_the_uninterrupted_weights(world_data, world_params, tmp_path, stop_after):
    params = world_params()
    _fit(params, world_data, tmp_path / "whole")
    stopped = _fit(params, world_data, tmp_path / "split", stop_after=stop_after)
    assert not stopped.finished and not (tmp_path / "split").exists()
    with pytest.raises(ConfigError, match="--resume"):  # an interrupted fit is not silently started over
        _fit(params, world_data, tmp_path / "split")
    resumed = _fit(params, world_data, tmp_path / "split", resume=True)
    assert resumed.finished and resumed.report["resumed"]
    assert _same(_weights(tmp_path / "whole"), _weights(tmp_path / "split"))


def test_a_fitted_folder_is_reused_and_other_inputs_need_refit(fitted_world, world_data, tmp_path):
    result, params = fitted_world
    out = tmp_path / "world"
    shutil.copytree(result.out_dir, out)
    again = _fit(params, world_data, out)
    assert again.reused and again.finished
    other = params.model_copy(update={"seed": 1})
    with pytest.raises(ConfigError, match="--refit"):
        _fit(other, world_data, out)
    with pytest.raises(ConfigError, match="no checkpoint"):
        _fit(params, world_data, tmp_path / "none", resume=True)
    with pytest.raises(ConfigError, match="pass one"):
        _fit(params, world_data, out, resume=True, refit=True)


def test_the_key_follows_what_changes_weights():
    from magicid.config import load_params
    from magicid.training.world_fit import world_fit_key

    def key(*overrides: str) -> str:
        return world_fit_key(load_params(None, list(overrides)), "v1")["key"]

    base = key()
    # Settings a world fit overrides or does not read, outputs, intervals and the device: same key.
    for same in ("train.steps=7", "fit.vae_steps=9", "train.out_dir=x", "fit_world.checkpoint_every=3",
                 "model.device=auto", "eval.seeds=[1]", "promotion.min_detection_rate=0.5"):  # fmt: skip
        assert key(same) == base, same
    # Settings the phases run on: another key.
    for other in ("seed=1", "fit_world.unet_lr=1e-3", "fit_world.adapter_steps=10", "fit.unet_lr=1e-3",
                  "train.face_loss_weight=3", "model.n_id_tokens=2", "data.crop_margin=0.3"):  # fmt: skip
        assert key(other) != base, other
    assert world_fit_key(load_params(None), "v2")["key"] != base  # and the dataset version


def test_weights_over_the_size_limit_stop_before_the_fit(world_params, world_data, tmp_path):
    with pytest.raises(ConfigError, match="max_megabytes"):
        _fit(world_params("fit_world.max_megabytes=5"), world_data, tmp_path / "big")


@pytest.mark.parametrize(
    ("damage", "name"),
    [
        (
            lambda p: p.write_bytes(p.read_bytes()[:-100]),
            "unet/diffusion_pytorch_model.safetensors",
        ),  # truncated
        (lambda p: p.write_text(p.read_text().replace("4", "5", 1)), "vae/config.json"),  # changed
        (lambda p: p.unlink(), "tokenizer/tokenizer_config.json"),  # missing
    ],
    ids=["truncated", "changed", "missing"],
)
def test_a_damaged_backbone_file_is_an_error_naming_it(fitted_world, tmp_path, damage, name):
    from magicid.models.backbone import load_sd_folder
    from magicid.models.checksums import ChecksumError

    folder = Path(shutil.copytree(fitted_world[0].out_dir, tmp_path / "world"))
    load_sd_folder(folder)  # intact: loads
    damage(folder / name)
    with pytest.raises(ChecksumError) as error:
        load_sd_folder(folder)
    assert str(folder / name) in str(error.value)


def test_a_damaged_adapter_file_is_an_error_naming_it_through_the_cli(fitted_world, tmp_path, repo_root):
    from typer.testing import CliRunner

    from magicid.cli import app

    folder = Path(shutil.copytree(fitted_world[0].out_dir, tmp_path / "world"))
    weights = folder / "adapter" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    sets = [f"model.backbone={folder}", f"model.adapter_path={folder / 'adapter'}", "model.resolution=64"]
    args = ["--params", str(repo_root / "params.yaml")] + [a for s in sets for a in ("--set", s)]
    out = tmp_path / "x.png"
    result = CliRunner().invoke(
        app, [*args, "generate", "-p", "a photo of a person", "--boxes", "4,4,30,30", "-o", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert not out.exists()
    assert "adapter.safetensors" in result.output and "changed or truncated" in result.output


def test_cuda_without_cuda_is_a_config_error(world_params, world_data, tmp_path, repo_root):
    from typer.testing import CliRunner

    from magicid.cli import app

    if torch.cuda.is_available():
        pytest.skip("needs a host without CUDA")
    with pytest.raises(ConfigError, match="no CUDA device"):
        _fit(world_params("model.device=cuda"), world_data, tmp_path / "w")
    for command in ("fit-world", "fit-backbone"):
        result = CliRunner().invoke(
            app,
            ["--params", str(repo_root / "params.yaml"), command, "--data", str(world_data), "--out",
             str(tmp_path / command), "--device", "cuda", "--no-progress"],
        )  # fmt: skip
        assert result.exit_code == 2, result.output
        assert result.output.count("\n") == 1 and "no CUDA device" in result.output
    result = CliRunner().invoke(
        app, ["--params", str(repo_root / "params.yaml"), "fit-world", "--device", "tpu", "--no-progress"]
    )
    assert result.exit_code == 2 and "model.device" in result.output
    # --device cpu is accepted: the command goes on to the next check (here: the dataset that is not there).
    result = CliRunner().invoke(
        app,
        ["--params", str(repo_root / "params.yaml"), "fit-world", "--data", str(tmp_path / "nope"), "--device", "cpu",
         "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 2 and "no images.parquet" in result.output
