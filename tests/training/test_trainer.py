"""The trainer: the adapter learns (loss falls), resume is exact, MLflow holds params/metrics/input/artifacts,
condition dropout feeds CFG's unconditional inputs, validation loss, checkpoint logging, device under launch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_settings import TINY_BACKBONE
from typer.testing import CliRunner

from magicid.data.version import dataset_version
from magicid.errors import ConfigError
from magicid.training.trainer import train


def _fixed_noise_loss(params, root, adapter_dir=None) -> float:
    """Mean loss over the whole dataset at 12 fixed (noise, timestep) draws, fused conditioning, no gradients."""
    from magicid.models.adapter import MagicIDAdapter
    from magicid.models.tiny import build_tiny_backbone
    from magicid.training.dataset import IDZoomDataset, collate_idzoom
    from magicid.training.generators import step_generator
    from magicid.training.mmf import MMFSchedule
    from magicid.training.train_data import TextEncoderCache
    from magicid.training.trainer import MagicIDTrainingModule, diffusion_loss

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
                module, backbone, batch, condition, texts(batch["caption"]), step_generator(99, s, 0, 0), 2.0
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
        "train.log_checkpoints=true",
    ]
    params = tiny_train_params(*common, out="straight")
    straight = train(params, idzoom_dir, progress=False)
    assert sorted(straight.losses) == [1, 2, 3, 4]

    overrides = [
        arg
        for o in [
            *common,
            *TINY_BACKBONE,  # as tiny_train_params: not params.yaml's shipped world
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
    assert checkpoints == ["checkpoint_4"]  # keep_checkpoints=1: accelerate's total_limit pruned step 2
    state = json.loads((tmp_path / "resumed/checkpoints/checkpoint_4/trainer_state.json").read_text())
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
    logged = {f.path for f in client.list_artifacts(straight.run_id, "checkpoints/checkpoint_2")}
    assert "checkpoints/checkpoint_2/model.safetensors" in logged  # train.log_checkpoints=true
    assert "checkpoints/checkpoint_2/trainer_state.json" in logged


def test_resume_without_a_checkpoint_is_a_config_error(idzoom_dir, tiny_train_params):
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(tiny_train_params(), idzoom_dir, resume=True, track=False)


def test_dataset_version_is_dvcs_hash_else_hashes_manifests(idzoom_copy):
    from dvc.repo import Repo

    version, origin = dataset_version(idzoom_copy)
    assert origin == "manifest-sha256" and len(version) == 32
    (idzoom_copy / "stats.json").write_text("{}")  # not a manifest: same version
    assert dataset_version(idzoom_copy)[0] == version
    (idzoom_copy / "faces.parquet").write_bytes((idzoom_copy / "faces.parquet").read_bytes() + b"\0")
    assert dataset_version(idzoom_copy)[0] != version
    # A DVC repository whose dvc.lock records the directory as a stage output: DVC's hash, read by DVC.
    Repo.init(str(idzoom_copy.parent), no_scm=True).close()
    (idzoom_copy.parent / "dvc.yaml").write_text(
        f"stages:\n  build_idzoom:\n    cmd: magicid build-data\n    outs:\n    - {idzoom_copy.name}\n"
    )
    (idzoom_copy.parent / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  build_idzoom:\n    cmd: magicid build-data\n    outs:\n"
        f"    - path: {idzoom_copy.name}\n      md5: 0123456789abcdef0123456789abcdef.dir\n      nfiles: 9\n"
    )
    assert dataset_version(idzoom_copy) == ("0123456789abcdef0123456789abcdef", "dvc")


def test_condition_dropout_feeds_exactly_cfgs_unconditional_inputs(idzoom_dir, tiny_train_params):
    from magicid.config import ConditionDropoutParams
    from magicid.models.adapter import MagicIDAdapter
    from magicid.models.denoise import null_identity
    from magicid.models.tiny import build_tiny_backbone
    from magicid.training.dataset import IDZoomDataset, collate_idzoom
    from magicid.training.generators import step_generator
    from magicid.training.mmf import MMFSchedule
    from magicid.training.train_data import TextEncoderCache
    from magicid.training.trainer import (
        MagicIDTrainingModule,
        apply_condition_dropout,
        diffusion_loss,
        draw_condition_dropout,
    )

    # The draws: disjoint cases at the configured rates.
    rates = ConditionDropoutParams(text=0.1, identity=0.2, both=0.3)
    drop_text, drop_identity = draw_condition_dropout(40000, rates, torch.Generator().manual_seed(0))
    both = drop_text & drop_identity
    assert abs(float(both.float().mean()) - 0.3) < 0.01
    assert abs(float((drop_text & ~both).float().mean()) - 0.1) < 0.01
    assert abs(float((drop_identity & ~both).float().mean()) - 0.2) < 0.01

    # Dropped rows become the empty prompt's text and the null identity; the others are untouched.
    params = tiny_train_params()
    backbone = build_tiny_backbone()
    adapter = MagicIDAdapter.create(backbone, params).eval()
    dataset = IDZoomDataset(idzoom_dir, params, clone_prob=0.0)
    batch = collate_idzoom([dataset[i] for i in range(len(dataset))])
    texts = TextEncoderCache(backbone)
    text, null_text = texts(batch["caption"]), texts([""])
    rows_text, rows_identity = (
        torch.tensor([True, False, True, False]),
        torch.tensor([False, True, True, False]),
    )
    new_text, embeddings, crops = apply_condition_dropout(
        text, null_text, batch["id_embeddings"], batch["id_crops"], rows_text, rows_identity
    )
    assert torch.equal(new_text[rows_text], null_text.expand(2, -1, -1))
    assert torch.equal(new_text[~rows_text], text[~rows_text])
    assert not embeddings[rows_identity].any() and not crops[rows_identity].any()
    assert torch.equal(embeddings[~rows_identity], batch["id_embeddings"][~rows_identity])
    # ... which the ID encoder turns into the unconditional tokens that the pipeline and DIIR use with CFG.
    with torch.no_grad():
        dropped_tokens = adapter.encode_identities(embeddings[2:3], crops[2:3])
        masks = batch["id_masks"][2:3]
        uncond = adapter.identity_conditions(
            batch["id_embeddings"][2:3], batch["id_crops"][2:3], masks, guidance=True
        ).uncond_tokens
    torch.testing.assert_close(dropped_tokens, uncond.expand_as(dropped_tokens), rtol=0, atol=0)
    assert torch.equal(
        null_identity(batch["id_embeddings"], batch["id_crops"])[0], torch.zeros_like(embeddings)
    )

    # The loss applies it: dropping everything equals the loss of a batch given the null inputs by hand.
    module = MagicIDTrainingModule(adapter, backbone.unet)
    condition = MMFSchedule([("fused", 1)]).condition_at(0, batch["skeleton"], batch["landmark"])
    always = ConditionDropoutParams(text=0.0, identity=0.0, both=1.0)
    nulled = dict(batch, id_embeddings=torch.zeros_like(embeddings), id_crops=torch.zeros_like(crops))
    with torch.no_grad():
        dropped = diffusion_loss(
            module, backbone, batch, condition, text, step_generator(1, 0, 0, 0), 2.0, always, null_text
        )
        by_hand = diffusion_loss(
            module, backbone, nulled, condition, null_text.expand_as(text), step_generator(1, 0, 0, 0), 2.0
        )
        kept = diffusion_loss(module, backbone, batch, condition, text, step_generator(1, 0, 0, 0), 2.0)
    assert float(dropped) == float(by_hand) and float(dropped) != float(kept)


@pytest.mark.slow
def test_validation_loss_is_logged_and_checkpoints_only_when_asked(tmp_path, tiny_train_params):
    from mlflow import MlflowClient

    from magicid.training.synthetic import write_synthetic_idzoom

    root = write_synthetic_idzoom(tmp_path / "withval", n_images=2, crop_size=64, seed=1, n_val=2)
    params = tiny_train_params("train.steps=3", "train.eval_every=2", "train.checkpoint_every=2")
    result = train(params, root, progress=False)
    assert sorted(result.val_losses) == [2, 3]  # every eval_every steps and at the end
    assert all(v > 0 and np.isfinite(v) for v in result.val_losses.values())
    client = MlflowClient(tracking_uri=params.tracking.uri)
    assert _metric_history(client, result.run_id, "val_loss") == result.val_losses
    artifacts = {f.path for f in client.list_artifacts(result.run_id)}
    assert "adapter" in artifacts and "checkpoints" not in artifacts  # train.log_checkpoints=false
    checkpoints = Path(params.train.out_dir) / "checkpoints"
    # On train.checkpoint_every's schedule only: a run that reaches train.steps gets no extra final checkpoint
    # (issue 25: the final save writes each file once; its result is the adapter).
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_2"]


def test_under_accelerate_launch_the_device_is_accelerates(idzoom_dir, tiny_train_params, monkeypatch):
    from magicid.models.tiny import build_tiny_backbone
    from magicid.training.trainer import launched_by_accelerate

    assert not launched_by_accelerate()
    if torch.cuda.is_available():
        pytest.skip("needs a host without CUDA: model.device=cuda must be the ignored setting")
    # Without accelerate launch, model.device=cuda on a CPU-only host is an error ...
    params = tiny_train_params("train.steps=1", "model.device=cuda", "train.eval_every=0")
    with pytest.raises(Exception, match="CUDA"):
        train(params, idzoom_dir, backbone=build_tiny_backbone(), progress=False, track=False)
    # ... under `accelerate launch` (which sets ACCELERATE_* variables) accelerate's device (here the CPU) rules.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert launched_by_accelerate()
    backbone = build_tiny_backbone()
    result = train(params, idzoom_dir, backbone=backbone, progress=False, track=False)
    assert result.step == 1 and backbone.unet.device.type == "cpu"
