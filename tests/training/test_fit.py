"""fit-backbone: deterministic by seed, exact resume, the folder loads through the real-weights path, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from magicid.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def fit_data(tmp_path_factory):
    from magicid.training.synthetic import write_synthetic_idzoom

    return write_synthetic_idzoom(tmp_path_factory.mktemp("fitdata") / "v1", n_images=3, crop_size=64, seed=0)


@pytest.fixture
def fit_params(tmp_path):
    from magicid.config import load_params

    def build(*overrides: str):
        base = [
            "fit.resolution=64",
            "fit.vae_resolution=64",
            "fit.vae_steps=2",
            "fit.unet_steps=2",
            "fit.vae_batch=2",
            "fit.unet_batch=2",
            "fit.warmup_steps=1",
            "fit.checkpoint_every=1",
            "fit.log_every=1",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.artifact_root={tmp_path / 'mlartifacts'}",
            "tracking.experiment=magicid-fit-test",
        ]
        return load_params(None, base + list(overrides))

    return build


def _weights(folder):
    return {
        part: load_file(str(folder / part / "diffusion_pytorch_model.safetensors"))
        for part in ("unet", "vae")
    }


def _same(a, b) -> bool:
    return all(torch.equal(a[p][k], b[p][k]) for p in a for k in a[p]) and a["vae"].keys() == b["vae"].keys()


def test_fit_changes_weights_and_is_deterministic_by_seed(fit_data, fit_params, tmp_path):
    from magicid.models.tiny import build_tiny_backbone
    from magicid.training.fit import fit_backbone

    first = fit_backbone(fit_params(), fit_data, tmp_path / "a", progress=False, track=False)
    fit_backbone(fit_params(), fit_data, tmp_path / "b", progress=False, track=False)
    fit_backbone(fit_params("seed=1"), fit_data, tmp_path / "c", progress=False, track=False)
    a, b, c = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(tmp_path / "c")
    assert _same(a, b)
    assert not torch.equal(a["unet"]["conv_in.weight"], c["unet"]["conv_in.weight"])
    random = build_tiny_backbone()  # the fit starts from the seed-0 random backbone and moves away from it
    assert not torch.equal(a["unet"]["conv_in.weight"], random.unet.state_dict()["conv_in.weight"])
    assert not torch.equal(
        a["vae"]["encoder.conv_in.weight"], random.vae.state_dict()["encoder.conv_in.weight"]
    )
    assert len(first.vae_losses) == 2 and len(first.unet_losses) == 2


@pytest.mark.parametrize("ema", ["fit.ema_decay=null", "fit.ema_decay=0.9"])  # the EMA weights resume too
@pytest.mark.parametrize("stop_after", [1, 3])  # inside the VAE phase, inside the UNet phase
def test_resume_reaches_the_uninterrupted_weights(fit_data, fit_params, tmp_path, stop_after, ema):
    from magicid.training.fit import fit_backbone

    params = fit_params(ema)
    fit_backbone(params, fit_data, tmp_path / "whole", progress=False, track=False)
    stopped = fit_backbone(
        params, fit_data, tmp_path / "split", progress=False, track=False, stop_after=stop_after
    )
    assert not (tmp_path / "split" / "model_index.json").exists()  # no folder until the fit ends
    assert len(stopped.vae_losses) + len(stopped.unet_losses) == stop_after
    fit_backbone(params, fit_data, tmp_path / "split", progress=False, track=False, resume=True)
    assert _same(_weights(tmp_path / "whole"), _weights(tmp_path / "split"))
    assert not (tmp_path / "split.checkpoint").exists()  # removed once the folder is written


def test_resume_refuses_a_missing_or_foreign_checkpoint(fit_data, fit_params, tmp_path):
    from magicid.training.fit import fit_backbone

    with pytest.raises(ConfigError, match="no checkpoint"):
        fit_backbone(fit_params(), fit_data, tmp_path / "x", progress=False, track=False, resume=True)
    fit_backbone(fit_params(), fit_data, tmp_path / "x", progress=False, track=False, stop_after=1)
    with pytest.raises(ConfigError, match="other inputs"):
        fit_backbone(
            fit_params("fit.vae_lr=1e-2"), fit_data, tmp_path / "x", progress=False, track=False, resume=True
        )


def _crafted_state(state_dir, marker) -> None:
    """A checkpoint folder whose tensor file is a pickle that would run code (`crafted_pickles`) and whose
    `state.json` names it."""
    from crafted_pickles import save_crafted

    state_dir.mkdir(parents=True, exist_ok=True)
    # Crafted under a .pt name (torch.load reads a .safetensors name as safetensors), then put in place.
    save_crafted(state_dir / "crafted.pt", marker, key="k", phase="vae", step=1).rename(
        state_dir / "tensors-x.safetensors"
    )
    (state_dir / "state.json").write_text(json.dumps({"key": "k", "phase": "vae", "step": 1,
                                                      "tensors": "tensors-x.safetensors"}))  # fmt: skip


def test_a_crafted_checkpoint_is_refused_and_its_code_never_runs(tmp_path):
    """Fit checkpoints are safetensors + JSON: nothing in them is unpickled, so a pickle put in their place is
    refused as a damaged tensor file, and the code it carries never runs."""
    from magicid.training.checkpoints import CheckpointError, load_tensor_state

    marker = tmp_path / "ran"
    _crafted_state(tmp_path / "state", marker)
    with pytest.raises(CheckpointError, match=r"not a complete safetensors file"):
        load_tensor_state(tmp_path / "state")
    assert not marker.exists()


def test_resume_never_runs_code_from_a_crafted_checkpoint(fit_data, tmp_path, repo_root):
    """`fit-backbone --resume` on a crafted checkpoint: one line naming the folder (exit 2); the code never runs."""
    from magicid.cli import app

    marker = tmp_path / "ran"
    state_dir = tmp_path / "out.checkpoint"
    _crafted_state(state_dir, marker)
    result = CliRunner().invoke(
        app,
        ["--params", str(repo_root / "params.yaml"), "fit-backbone", "--data", str(fit_data),
         "--out", str(tmp_path / "out"), "--resume", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(state_dir) in errors[0] and "without --resume" in errors[0], result.output
    assert "Traceback" not in result.output
    assert not marker.exists()


def _damage_checkpoint(state_dir, how: str) -> None:
    meta_path = state_dir / "state.json"
    meta = json.loads(meta_path.read_text())
    tensors = state_dir / meta["tensors"]
    if how == "garbage state":
        meta_path.write_bytes(b"\x00garbage, not JSON\x00" * 10)
    elif how == "torn tensors":
        data = tensors.read_bytes()
        tensors.write_bytes(data[: len(data) // 2])
    elif how == "a list":
        meta_path.write_text("[1, 2, 3]")
    elif how == "no optimizer state":
        del meta["vae_opt"]
        meta_path.write_text(json.dumps(meta))
    elif how == "step is text":
        meta_path.write_text(json.dumps({**meta, "step": "two"}))
    elif how == "foreign weights":
        from safetensors.torch import save_file

        save_file({"vae.bogus.weight": torch.zeros(2)}, str(tensors))


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("garbage state", "is damaged"),
        ("torn tensors", "not a complete safetensors file"),
        ("a list", "is damaged"),
        ("no optimizer state", "is damaged or not a fit-backbone checkpoint (KeyError"),
        ("step is text", "is damaged or not a fit-backbone checkpoint (ValueError"),
        ("foreign weights", "is damaged or not a fit-backbone checkpoint"),
    ],
)
def test_resume_from_a_damaged_checkpoint_is_one_line_naming_it(fit_data, fit_params, tmp_path, how, reason):
    from magicid.training.checkpoints import CheckpointError
    from magicid.training.fit import checkpoint_dir, fit_backbone

    params = fit_params()
    fit_backbone(params, fit_data, tmp_path / "x", progress=False, track=False, stop_after=1)
    state_dir = checkpoint_dir(tmp_path / "x")
    _damage_checkpoint(state_dir, how)
    with pytest.raises(CheckpointError) as info:
        fit_backbone(params, fit_data, tmp_path / "x", progress=False, track=False, resume=True)
    message = str(info.value)
    assert str(state_dir) in message and reason in message and "\n" not in message, message
    assert "without --resume" in message


def test_folder_loads_through_the_real_weights_path_with_unit_variance_latents(
    fit_data, fit_params, tmp_path
):
    from magicid.models.backbone import check_sd_folder, load_backbone
    from magicid.training.fit import REPORT_FILE, fit_backbone
    from magicid.training.fit_data import load_fit_data, to_signed

    params = fit_params()
    fit_backbone(params, fit_data, tmp_path / "fitted", progress=False, track=False)
    check_sd_folder(tmp_path / "fitted")  # the SD 1.5 file list
    index = json.loads((tmp_path / "fitted" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    loaded = load_backbone(
        params.model_copy(
            update={"model": params.model.model_copy(update={"backbone": str(tmp_path / "fitted")})}
        )
    )
    assert loaded.source == str(tmp_path / "fitted")
    report = json.loads((tmp_path / "fitted" / REPORT_FILE).read_text())
    assert loaded.vae.config.scaling_factor == pytest.approx(report["scaling_factor"])
    data = load_fit_data(fit_data, params.fit)
    with torch.no_grad():
        pictures = to_signed(torch.cat([data.whole, data.crops]))
        latents = loaded.vae.encode(pictures).latent_dist.mean * loaded.vae.config.scaling_factor
    assert float(latents.std()) == pytest.approx(1.0, rel=1e-3)
    # The stock diffusers pipeline runs on it (what the SD 1.5 baseline path does).
    image = loaded.stable_diffusion_pipeline()(
        "a photo of a person", num_inference_steps=2, height=64, width=64, output_type="np"
    ).images[0]
    assert image.shape == (64, 64, 3)


def test_fit_is_tracked_in_mlflow(fit_data, fit_params, tmp_path):
    from mlflow import MlflowClient

    from magicid.training.fit import fit_backbone

    params = fit_params()
    result = fit_backbone(params, fit_data, tmp_path / "tracked", progress=False, track=True)
    client = MlflowClient(tracking_uri=params.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["fit.vae_steps"] == "2" and "dataset_version" in run.data.params
    assert run.data.tags["mlflow.source.name"] == "magicid fit-backbone"
    assert [m.step for m in client.get_metric_history(result.run_id, "unet_loss")] == [3, 4]
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "backbone")}
    assert "backbone/model_index.json" in artifacts


def test_ensure_fitted_backbone_reuses_while_inputs_are_unchanged(fit_data, fit_params, tmp_path):
    from magicid.training.fit import KEY_FILE, ensure_fitted_backbone

    first = ensure_fitted_backbone(fit_params(), fit_data, tmp_path / "cached", progress=False, track=False)
    again = ensure_fitted_backbone(fit_params(), fit_data, tmp_path / "cached", progress=False, track=False)
    assert not first.reused and again.reused
    key = json.loads((tmp_path / "cached" / KEY_FILE).read_text())["key"]
    changed = ensure_fitted_backbone(
        fit_params("fit.unet_lr=5e-4"), fit_data, tmp_path / "cached", progress=False, track=False
    )
    assert not changed.reused
    assert json.loads((tmp_path / "cached" / KEY_FILE).read_text())["key"] != key


def test_augment_without_jitter_is_the_identity_and_flip_mirrors(fit_params):
    from magicid.training.fit import augment

    images = torch.rand(3, 3, 64, 64) * 2 - 1
    still = fit_params(
        "fit.flip=false", "fit.scale_jitter=0", "fit.translate_jitter=0", "fit.color_jitter=0"
    ).fit
    out = augment(images, still, 64, torch.Generator().manual_seed(0))
    assert torch.allclose(out, images, atol=1e-5)
    flips = fit_params("fit.scale_jitter=0", "fit.translate_jitter=0", "fit.color_jitter=0").fit
    out = augment(images, flips, 64, torch.Generator().manual_seed(0))
    for i in range(3):
        assert torch.allclose(out[i], images[i], atol=1e-5) or torch.allclose(
            out[i], images[i].flip(-1), atol=1e-5
        )
    jittered = augment(images, fit_params().fit, 64, torch.Generator().manual_seed(0))
    assert jittered.shape == images.shape and jittered.abs().max() <= 1


def test_vae_patches_are_windows_of_their_pictures():
    from magicid.training.fit import random_patches

    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    patches = random_patches(images, 8, torch.Generator().manual_seed(0))
    assert patches.shape == (2, 3, 8, 8)
    for image, patch in zip(images, patches, strict=True):
        windows = image.unfold(1, 8, 1).unfold(2, 8, 1)  # (3, 9, 9, 8, 8): every 8x8 window
        assert any(torch.equal(windows[:, y, x], patch) for y in range(9) for x in range(9))
    assert random_patches(images, 0, torch.Generator()) is images


def test_min_snr_weighting_discounts_only_the_low_noise_timesteps():
    from magicid.models.tiny import build_tiny_backbone
    from magicid.training.fit import unet_loss

    backbone = build_tiny_backbone()
    latents, text = torch.randn(4, 4, 8, 8), torch.randn(4, 77, backbone.cross_attention_dim)

    def loss(gamma):
        return float(unet_loss(backbone, latents, text, torch.Generator().manual_seed(3), gamma))

    plain = loss(None)
    assert loss(1e9) == pytest.approx(plain, rel=1e-6)  # gamma above every SNR: weight 1 everywhere
    assert loss(1.0) < plain  # the timesteps with SNR > 1 count less
    assert loss(1e-6) < loss(1.0)


def test_offset_noise_adds_one_constant_per_sample_and_channel():
    from magicid.training.fit import training_noise

    shape = torch.Size([3, 4, 8, 8])
    plain = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(training_noise(shape, 0.0, torch.Generator().manual_seed(1)), plain)
    offset = training_noise(shape, 0.5, torch.Generator().manual_seed(1)) - plain
    constant = offset[:, :, :1, :1]
    assert torch.allclose(offset, constant.expand(shape), atol=1e-6)  # flat over each (sample, channel) plane
    assert constant.flatten().unique().numel() == 12  # and drawn per sample and channel
    assert 0.1 < float(constant.abs().mean()) < 1.0


def test_latent_bank_draws_augmented_variants_at_augment_prob():
    from magicid.training.fit import LatentBank

    variants, pictures = 4, 3
    # Variant v of every picture has latents equal to v, so a draw's value says which variant it came from.
    mean = (
        torch.arange(variants, dtype=torch.float32)
        .view(variants, 1, 1, 1, 1)
        .expand(variants, pictures, 4, 2, 2)
    )
    bank = LatentBank(mean.clone(), torch.zeros_like(mean), n_whole=2, caption_ids=torch.tensor([1, 2, 3]))

    def drawn(augment_prob: float) -> torch.Tensor:
        latents, _ = bank.sample(2000, 0.5, 1.0, torch.Generator().manual_seed(0), augment_prob)
        return latents[:, 0, 0, 0]

    assert torch.equal(drawn(0.0), torch.zeros(2000))  # only the pictures as they are
    assert set(drawn(1.0).tolist()) == {1.0, 2.0, 3.0}  # only augmented variants, all of them
    assert float((drawn(0.25) > 0).float().mean()) == pytest.approx(0.25, abs=0.03)


def test_augment_prob_without_augmented_variants_is_a_clear_error(fit_params):
    with pytest.raises(ConfigError, match="latent_variants"):
        fit_params("fit.unet_augment_prob=0.2", "fit.latent_variants=1")


def test_ema_saves_the_average_weights_and_leaves_the_vae_alone(fit_data, fit_params, tmp_path):
    from magicid.training.fit import fit_backbone

    fit_backbone(fit_params("fit.ema_decay=null"), fit_data, tmp_path / "last", progress=False, track=False)
    fit_backbone(fit_params("fit.ema_decay=0.9"), fit_data, tmp_path / "ema", progress=False, track=False)
    last, ema = _weights(tmp_path / "last"), _weights(tmp_path / "ema")
    assert all(torch.equal(last["vae"][k], ema["vae"][k]) for k in last["vae"])  # EMA is the UNet's only
    assert not torch.equal(last["unet"]["conv_in.weight"], ema["unet"]["conv_in.weight"])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_unet_loss_targets_what_the_scheduler_says_the_unet_predicts(prediction_type, monkeypatch):
    """A UNet that predicts exactly the noise (epsilon) or the velocity (v) has zero loss; the other target does not."""
    from magicid.models.tiny import build_tiny_backbone
    from magicid.training.fit import unet_loss

    backbone = build_tiny_backbone()
    backbone.scheduler.register_to_config(prediction_type=prediction_type)
    scheduler = backbone.scheduler
    latents, text = torch.randn(4, 4, 8, 8), torch.randn(4, 77, backbone.cross_attention_dim)
    # The draws unet_loss makes from this generator, in its order: noise, then timesteps.
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (4,), generator=generator)
    targets = {"epsilon": noise, "v_prediction": scheduler.get_velocity(latents, noise, timesteps)}

    def loss(predicts: str) -> float:
        class Oracle(torch.nn.Module):
            def forward(self, sample, t, encoder_hidden_states):
                assert torch.equal(t, timesteps)
                return type("Out", (), {"sample": targets[predicts]})

        monkeypatch.setattr(backbone, "unet", Oracle())
        return float(unet_loss(backbone, latents, text, torch.Generator().manual_seed(5), 5.0))

    other = "v_prediction" if prediction_type == "epsilon" else "epsilon"
    assert loss(prediction_type) == 0.0
    assert loss(other) > 0.01


def test_fitted_folder_keeps_the_prediction_type(fit_data, fit_params, tmp_path):
    from magicid.models.backbone import load_sd_folder
    from magicid.training.fit import fit_backbone

    fit_backbone(
        fit_params("fit.prediction_type=v_prediction"), fit_data, tmp_path / "v", progress=False, track=False
    )
    assert load_sd_folder(tmp_path / "v").scheduler.config.prediction_type == "v_prediction"


def test_bad_data_dir_is_a_clear_error(tmp_path, fit_params, repo_root):
    from magicid.cli import app
    from magicid.training.fit_data import load_fit_data

    with pytest.raises(DataError, match="build-data"):
        load_fit_data(tmp_path / "nope", fit_params().fit)
    result = CliRunner().invoke(
        app,
        [
            "--params",
            str(repo_root / "params.yaml"),
            "fit-backbone",
            "--data",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ],
    )
    assert result.exit_code == 2
    assert "no images.parquet" in result.output and str(tmp_path / "nope") in result.output


def test_empty_splits_selection_is_a_clear_error(fit_data, fit_params):
    from magicid.training.fit_data import load_fit_data

    with pytest.raises(DataError, match="fit.splits"):
        load_fit_data(fit_data, fit_params("fit.splits=[test]").fit)


def test_adapter_trains_on_the_fitted_backbone_through_the_cli(fit_data, fit_params, tmp_path, repo_root):
    """`magicid train --set model.backbone=DIR`: the adapter trains on the fitted folder as on SD 1.5."""
    from mlflow import MlflowClient

    from magicid.cli import app
    from magicid.training.fit import fit_backbone

    params = fit_params()
    fit_backbone(params, fit_data, tmp_path / "fitted", progress=False, track=False)
    overrides = [
        f"model.backbone={tmp_path / 'fitted'}",
        "model.adapter_path=null",  # a fresh adapter on the fitted folder, not params.yaml's shipped world
        "train.init_from=null",
        "model.resolution=64",
        "model.id_crop_size=32",
        "train.batch_size=2",
        "train.checkpoint_every=100",
        f"train.out_dir={tmp_path / 'train'}",
        f"tracking.uri={params.tracking.uri}",
        f"tracking.artifact_root={params.tracking.artifact_root}",
        "tracking.experiment=magicid-fit-test",
    ]
    args = ["--params", str(repo_root / "params.yaml")]
    for item in overrides:
        args += ["--set", item]
    result = CliRunner().invoke(
        app, [*args, "train", "--data", str(fit_data), "--steps", "2", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "train" / "adapter").is_dir()
    run_id = next(
        line.split(": ")[1] for line in result.output.splitlines() if line.startswith("mlflow_run_id")
    )
    run = MlflowClient(tracking_uri=params.tracking.uri).get_run(run_id)
    assert run.data.params["backbone_source"] == str(tmp_path / "fitted")


def test_model_dtype_runs_the_fit_under_autocast_and_keeps_float32_weights(fit_data, fit_params, tmp_path):
    """model.dtype=bfloat16: the forward passes run in bfloat16 (autocast, on CPU too), the weights stay float32."""
    from magicid.training.fit import REPORT_FILE, fit_backbone

    fit_backbone(fit_params("model.dtype=bfloat16"), fit_data, tmp_path / "bf16", progress=False, track=False)
    fit_backbone(fit_params(), fit_data, tmp_path / "fp32", progress=False, track=False)
    bf16, fp32 = _weights(tmp_path / "bf16"), _weights(tmp_path / "fp32")
    assert all(t.dtype == torch.float32 for part in bf16.values() for t in part.values())
    assert not _same(bf16, fp32)  # the half-precision arithmetic did run
    assert json.loads((tmp_path / "bf16" / REPORT_FILE).read_text())["dtype"] == "bfloat16"
