"""The trainer: the adapter learns (loss falls), resume is exact, MLflow holds params/metrics/input/artifacts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from magicid.errors import ConfigError
from magicid.training.trainer import dataset_version, train


def _fixed_noise_loss(params, root, adapter_dir=None) -> float:
    """Mean loss over the whole dataset at 12 fixed (noise, timestep) draws, fused conditioning, no gradients."""
    from magicid.models.adapter import MagicIDAdapter
    from magicid.models.backbone import build_tiny_backbone
    from magicid.training.dataset import IDZoomDataset, collate_idzoom
    from magicid.training.mmf import MMFSchedule
    from magicid.training.trainer import (
        MagicIDTrainingModule,
        TextEncoderCache,
        diffusion_loss,
        step_generator,
    )

    backbone = build_tiny_backbone()
    adapter = (
        MagicIDAdapter.create(backbone, params)
        if adapter_dir is None
        else MagicIDAdapter.load(adapter_dir, backbone, params)
    )
    dataset = IDZoomDataset(root, params, clone_prob=0.0)
    batch = collate_idzoom([dataset[i] for i in range(len(dataset))])
    module, texts = MagicIDTrainingModule(adapter.eval(), backbone.unet), TextEncoderCache(backbone)
    condition = MMFSchedule([("fused", 1)]).condition_at(0, batch["skeleton"], batch["landmark"])
    with torch.no_grad():
        losses = [
            diffusion_loss(
                module, backbone, batch, condition, texts(batch["caption"]), step_generator(99, s, 0), 2.0
            )
            for s in range(12)
        ]
    return float(torch.stack(losses).mean())


@pytest.mark.slow
def test_loss_falls_when_overfitting_a_few_samples(tmp_path, tiny_train_params):
    from magicid.training.synthetic import write_synthetic_idzoom

    root = write_synthetic_idzoom(tmp_path / "two", n_images=2, crop_size=64, seed=1)
    params = tiny_train_params(
        "train.steps=50", "train.lr=3e-3", "train.checkpoint_every=1000", "train.clone_face.prob=0"
    )
    before = _fixed_noise_loss(params, root)
    result = train(params, root, progress=False, track=False)
    after = _fixed_noise_loss(params, root, result.adapter_dir)
    assert after < 0.9 * before, (
        f"fixed-noise loss {before:.4f} -> {after:.4f}: the adapter did not fit 2 samples"
    )
    losses = list(result.losses.values())
    assert len(losses) == 50 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) < sum(losses[:10])


def _metric_history(client, run_id, key) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.slow
def test_resume_continues_exactly_and_the_run_is_tracked(tmp_path, idzoom_dir, tiny_train_params):
    from mlflow import MlflowClient

    from magicid.cli import app
    from magicid.models.conditioning import MODE_IDS
    from magicid.training.mmf import MMFSchedule

    # batch 1 x 3 micro-batches a step over 4 images: step 2 ends mid-epoch (epoch 1, batch 2), so resuming
    # must restore the data position as well as weights, optimizer, scheduler and accumulation counter.
    common = [
        "train.steps=4",
        "train.batch_size=1",
        "train.grad_accum=3",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=1",
        "train.lr=1e-3",
        "train.lr_scheduler=cosine",
        "train.lr_warmup_steps=1",
        "train.clone_face.prob=0.5",
    ]
    params = tiny_train_params(*common, out="straight")
    straight = train(params, idzoom_dir, progress=False)
    assert sorted(straight.losses) == [1, 2, 3, 4]

    overrides = [
        arg
        for o in [
            *common,
            "model.resolution=64",
            "model.id_crop_size=32",
            f"train.out_dir={tmp_path / 'resumed'}",
            f"tracking.uri={params.tracking.uri}",
            f"tracking.artifact_root={params.tracking.artifact_root}",
            f"tracking.experiment={params.tracking.experiment}",
        ]
        for arg in ("--set", o)
    ]
    runner = CliRunner()
    first = runner.invoke(
        app, [*overrides, "train", "--data", str(idzoom_dir), "--steps", "2", "--no-progress"]
    )
    assert first.exit_code == 0, first.output
    second = runner.invoke(
        app, [*overrides, "train", "--data", str(idzoom_dir), "--steps", "4", "--resume", "--no-progress"]
    )
    assert second.exit_code == 0, second.output
    run_ids = {
        line.split(": ")[1]
        for r in (first, second)
        for line in r.output.splitlines()
        if "mlflow_run_id" in line
    }
    assert len(run_ids) == 1, "a resumed run continues the same MLflow run"
    resumed_run = run_ids.pop()

    client = MlflowClient(tracking_uri=params.tracking.uri)
    resumed_loss = _metric_history(client, resumed_run, "loss")
    assert sorted(resumed_loss) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):  # tolerance 0: bit-identical losses
        assert resumed_loss[step] == straight.losses[step], f"step {step}"
    straight_weights = load_file(straight.adapter_dir / "adapter.safetensors")
    resumed_weights = load_file(tmp_path / "resumed" / "adapter" / "adapter.safetensors")
    assert straight_weights.keys() == resumed_weights.keys()
    assert all(torch.equal(straight_weights[k], resumed_weights[k]) for k in straight_weights)
    checkpoints = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert checkpoints == ["step_000004"]  # keep_checkpoints=1 pruned step 2
    state = json.loads((tmp_path / "resumed/checkpoints/step_000004/trainer_state.json").read_text())
    assert state["step"] == 4 and state["run_id"] == resumed_run

    # MLflow: params, per-step metrics, the dataset version as input, checkpoints and the adapter as artifacts.
    run = client.get_run(straight.run_id)
    assert run.info.status == "FINISHED"
    assert (
        run.data.params["train.lr"] == "0.001"
        and run.data.params["dataset_version"] == straight.dataset_version
    )
    schedule = MMFSchedule.from_params(params)
    assert _metric_history(client, straight.run_id, "loss") == straight.losses
    assert _metric_history(client, straight.run_id, "mmf_mode_id") == {
        s: float(MODE_IDS[schedule.mode_at(s - 1)]) for s in (1, 2, 3, 4)
    }
    assert straight.modes == {s: schedule.mode_at(s - 1) for s in (1, 2, 3, 4)}
    for mode in set(straight.modes.values()):
        per_mode = _metric_history(client, straight.run_id, f"loss_{mode}")
        assert per_mode == {s: straight.losses[s] for s, m in straight.modes.items() if m == mode}
    lrs = _metric_history(client, straight.run_id, "lr")
    assert lrs[1] == pytest.approx(1e-3) and lrs[4] < lrs[2]  # warm-up then cosine decay
    inputs = run.inputs.dataset_inputs
    assert [i.dataset.digest for i in inputs] == [straight.dataset_version]
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
    artifacts = {f.path for f in client.list_artifacts(straight.run_id)}
    assert {"adapter", "checkpoints"} <= artifacts
    assert {f.path for f in client.list_artifacts(straight.run_id, "adapter")} >= {
        "adapter/adapter.safetensors",
        "adapter/adapter_config.json",
    }
    logged = {f.path for f in client.list_artifacts(straight.run_id, "checkpoints/step_000002")}
    assert "checkpoints/step_000002/model.safetensors" in logged
    assert "checkpoints/step_000002/trainer_state.json" in logged


def test_resume_without_a_checkpoint_is_a_config_error(idzoom_dir, tiny_train_params):
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(tiny_train_params(), idzoom_dir, resume=True, track=False)


def test_dataset_version_prefers_dvc_lock_then_hashes_manifests(idzoom_copy):
    version, origin = dataset_version(idzoom_copy)
    assert origin == "manifest-sha256" and len(version) == 32
    (idzoom_copy / "stats.json").write_text("{}")  # not a manifest: same version
    assert dataset_version(idzoom_copy)[0] == version
    (idzoom_copy / "faces.parquet").write_bytes((idzoom_copy / "faces.parquet").read_bytes() + b"\0")
    assert dataset_version(idzoom_copy)[0] != version
    lock = idzoom_copy.parent / "dvc.lock"
    lock.write_text(
        "schema: '2.0'\nstages:\n  build_idzoom:\n    cmd: magicid build-data\n    outs:\n"
        f"    - path: {idzoom_copy.name}\n      md5: 0123456789abcdef0123456789abcdef.dir\n      nfiles: 9\n"
    )
    assert dataset_version(idzoom_copy) == ("0123456789abcdef0123456789abcdef", "dvc.lock")
