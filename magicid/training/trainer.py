"""Training MagicID's adapter on IDZoom (DESIGN §3), in the layout of accelerate's examples.

What trains: the ID encoder, MGMICA's ID key/value projections and the MMF ControlNet (`MagicIDAdapter`).
What is frozen: the backbone's UNet, VAE and text encoder. One optimizer step:

1. the batch's images are encoded to latents (VAE, frozen) and noised at random timesteps;
2. the ControlNet gets the skeleton/landmark maps of the step's MMF mode (`mmf.MMFSchedule`);
3. each sample's identities (embedding + zoomed crop -> ID tokens) go to MGMICA with their face masks
   (a Clone Face sample is one identity with the union of its clone masks, `clone_face.py`);
4. condition dropout (IP-Adapter practice, `train.condition_dropout`): per sample, with small probabilities, the
   caption becomes "" (text), the identities become the null identity (`magicid.models.denoise.null_identity`:
   zero embedding, blank crop; masks kept), or both: exactly the unconditional branch that CFG uses at inference;
5. the prediction is the one denoising step of inference (`magicid.models.denoise.guided_prediction`, conditional
   branch); the loss is the face-region weighted diffusion loss (`clone_face.weighted_diffusion_loss`),
   accumulated over `train.grad_accum` micro-batches, then AdamW steps.

Layout (accelerate's examples): the data in `train_data.py` (`build_train_data`: samples, loaders, dataset
version; `TextEncoderCache`), the loop in `run_steps` (the optimizer steps on the prepared objects, `TrainRun`),
and `train` a thin driver wiring accelerator, models, data, optimizer, resume and tracking, then the final adapter.
Checkpoint checks and listing live in `checkpoints.py`; the seeded generators in `generators.py`.

Exact resume: every random draw of step s for a sample (latent sample, noise, timestep, dropout) comes from a
generator seeded by (seed, s, the sample's position in the step's data order) (`sample_generators`); the data order
and Clone Face samples are functions of (seed, epoch, index);
a checkpoint (`accelerator.save_state` into `train.out_dir/checkpoints/checkpoint_<step>`: adapter safetensors,
optimizer, LR scheduler, grad scaler, RNG states, plus `trainer_state.json` with the step and MLflow run id) is
written at step boundaries; accelerate's `ProjectConfiguration(total_limit=train.keep_checkpoints)` prunes old
ones. Resuming loads the newest complete one and skips the data consumed so far (`skip_first_batches`), so
step s+1 sees exactly what an uninterrupted run saw.

Device: under `accelerate launch` the device (and process count) is accelerate's; otherwise `model.device`.

Throughput (issue 25), each a `train:` key that leaves the results as they are up to float rounding: AdamW's
implementation (`train.optimizer_impl`, `build_optimizer`: fused on CUDA by default); the frozen VAE's posterior of
each deterministic sample encoded once (`train.cache_latents`, `train_data.LatentCache`; the latent is still drawn
per step from it with the same draws); loader workers that persist and prefetch (`train.loader_workers`,
`train.loader_prefetch`), pinned batches copied without blocking on CUDA. Caption states are cached always
(`TextEncoderCache`).

Several processes (`accelerate launch --num_processes N`, DDP): accelerate's prepared loader shards the data order by
batch (process p takes batches p, p+N, ... of `EpochShuffleSampler`'s order), the MMF mode is a function of the step,
and Clone Face samples and every random draw follow the sample, not the process: N processes at `train.batch_size` B
see the samples, draws and (gradients averaged by DDP) updates of one process at batch N*B, up to float summation
order (tests/training/test_multiprocess.py). On a host without CUDA (or with ACCELERATE_USE_CPU=true) the processes
run on CPU, joined by gloo.

Tracking (main process only): MLflow run with all params, per-step metrics (`loss`, `loss_<mode>`, `lr`,
`mmf_mode_id`), `val_loss` on the val split every `train.eval_every` steps (fixed noise, fused conditions, no
dropout), the dataset version as an input (the DVC hash DVC itself reports for the directory, else a hash of
the manifests), the final adapter as an artifact, and checkpoints too when `train.log_checkpoints`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from magicid.config import ConditionDropoutParams, Params
from magicid.errors import ConfigError
from magicid.locks import output_lock
from magicid.models.adapter import MagicIDAdapter
from magicid.models.backbone import Backbone, load_backbone, resolve_device
from magicid.models.compilation import compile_denoiser
from magicid.models.conditioning import MODE_IDS
from magicid.models.denoise import IdentityConditions, StepConditions, guided_prediction, null_identity
from magicid.training.checkpoints import (
    CHECKPOINT_PREFIX,
    STATE_FILE,
    check_resume_checkpoint,
    load_checkpoint_state,
)
from magicid.training.clone_face import face_weight_map, weighted_diffusion_loss
from magicid.training.generators import step_generator
from magicid.training.mmf import MMFSchedule
from magicid.training.tracking import RunTracker
from magicid.training.train_data import LatentCache, TextEncoderCache, TrainData, build_train_data
from magicid.utils import atomic_write_dir, atomic_write_text, set_seed

VALIDATION_STREAM = (
    2**31
)  # the "step" of validation draws (`generators.step_generator`): never a training step
_METRICS_FLUSH_EVERY = 50  # steps between MLflow metric flushes (also flushed at checkpoints and the end)


@dataclasses.dataclass
class TrainResult:
    """What a `train` call did.

    Attributes:
        run_id: the MLflow run id (None when tracking was off).
        out_dir: `train.out_dir`.
        adapter_dir: the final adapter (`MagicIDAdapter.save`).
        step: the optimizer step reached.
        losses: loss per optimizer step taken in this call (1-based step -> mean loss over its micro-batches).
        modes: MMF mode per step taken in this call.
        dataset_version: the dataset version logged as the run's input.
        steps_per_s: optimizer steps per second of this call (excluding set-up).
        step_times: `time.perf_counter()` when each step of this call finished (benchmarks skip warm-up steps).
        val_losses: validation loss per evaluated step (empty when `train.eval_every` is 0 or no val split).
        unet_dir: the trained UNet (diffusers folder) when `train.unet_lr` trained it, else None.
        step_overhead_ms: median host time of a step outside forward/backward/optimizer (waiting for the batch,
            the step's generator and conditions, reading the loss, logging), checkpoints and validation excluded.
        vae_encoded: training samples the VAE encoded in this call (every sample without `train.cache_latents`).
        latent_cache_hits: training samples whose posterior came from the latent cache in this call.
        optimizer_impl: the AdamW implementation that ran (`build_optimizer`).
    """

    run_id: str | None
    out_dir: Path
    adapter_dir: Path
    step: int
    losses: dict[int, float]
    modes: dict[int, str]
    dataset_version: str
    steps_per_s: float
    step_times: dict[int, float] = dataclasses.field(default_factory=dict)
    val_losses: dict[int, float] = dataclasses.field(default_factory=dict)
    unet_dir: Path | None = None
    step_overhead_ms: float = float("nan")
    vae_encoded: int = 0
    latent_cache_hits: int = 0
    optimizer_impl: str = ""


class MagicIDTrainingModule(nn.Module):
    """The trainable adapter around the UNet; `forward` predicts the noise (or velocity).

    Only the trainable weights are registered: the adapter and, when the UNet trains too (`train.unet_lr`), its own
    weights as `unet_weights` (a `ParameterList` of the same tensors, without the MGMICA processors, which are the
    adapter's): so the state dict (what checkpoints hold) and what DDP wraps are the trainable weights, each once.
    The UNet (which runs the MGMICA processors, i.e. the adapter's ID projections) is held as a plain attribute.
    """

    def __init__(
        self, adapter: nn.Module, unet: nn.Module, unet_weights: list[nn.Parameter] | None = None
    ) -> None:
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "unet", unet)  # not a submodule: its trainable weights are `unet_weights`
        if unet_weights:
            self.unet_weights = nn.ParameterList(unet_weights)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        condition: torch.Tensor,
        id_embeddings: torch.Tensor,
        id_crops: torch.Tensor,
        id_masks: torch.Tensor,
    ) -> torch.Tensor:
        """Predict the diffusion target.

        Args:
            noisy_latents: (B, 4, h, w); timesteps: (B,) long; text: (B, 77, C).
            condition: (B, 6, H, W) in [0, 1] (`make_condition`).
            id_embeddings: (B, n, D); id_crops: (B, n, 3, S, S) in [-1, 1];
            id_masks: (B, n, H, W) in [0, 1], zero for padded identities.

        Returns:
            (B, 4, h, w) the UNet's prediction with ControlNet residuals and MGMICA identities: the one
            denoising step of inference (`magicid.models.denoise.guided_prediction`), conditional branch only.
        """
        tokens = self.adapter.encode_identities(id_embeddings, id_crops)  # (B, n, T, C)
        conditions = StepConditions(
            text=text,
            controlnet=self.adapter.controlnet,
            control=condition,
            identity=IdentityConditions(self.adapter.mgmica_context, tokens, id_masks),
        )
        return guided_prediction(self.unet, noisy_latents, timesteps, conditions)


def sample_generators(
    seed: int, step: int, first_position: int, count: int, device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per sample of a micro-batch: the draws of the sample at `position` (its place in the optimizer
    step's data order, 0-based) of `step`, a pure function of (seed, step, position), on `device`.

    Keyed by the sample's position rather than by process and micro-batch, so that N processes at batch B draw for
    each sample exactly what one process at batch N*B draws (process p's micro-batch m of a step holds positions
    `(m * N + p) * B ...`: accelerate deals the loader's batches to the processes in turn).
    """
    return [
        step_generator(seed, step, position, 1, device=device)
        for position in range(first_position, first_position + count)
    ]


Generators = torch.Generator | list[torch.Generator]


def _draw(generator: Generators, batch_size: int, draw) -> torch.Tensor:
    """`draw(rows, generator)` for a batch: from one generator, or row by row from one generator per sample."""
    if isinstance(generator, torch.Generator):
        return draw(batch_size, generator)
    if len(generator) != batch_size:
        raise ValueError(f"{len(generator)} generators for a batch of {batch_size} samples")
    return torch.cat([draw(1, g) for g in generator])


def draw_condition_dropout(
    batch_size: int, dropout: ConditionDropoutParams, generator: Generators
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples train without their text and which without their identities (disjoint cases).

    One uniform draw u per sample: u < p_text drops the text, the next p_identity the identities, the next
    p_both both (IP-Adapter's scheme). `generator`: one for the batch, or one per sample (`sample_generators`).

    Returns:
        (drop_text, drop_identity): (B,) bool each.
    """
    u = _draw(generator, batch_size, lambda n, g: torch.rand(n, generator=g, device=g.device))
    text_only = u < dropout.text
    identity_only = (u >= dropout.text) & (u < dropout.text + dropout.identity)
    both = (u >= dropout.text + dropout.identity) & (u < dropout.text + dropout.identity + dropout.both)
    return text_only | both, identity_only | both


def apply_condition_dropout(
    text: torch.Tensor,
    null_text: torch.Tensor,
    embeddings: torch.Tensor,
    crops: torch.Tensor,
    drop_text: torch.Tensor,
    drop_identity: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace dropped samples' text by the empty prompt's and identities by the null identity.

    Args:
        text: (B, 77, C); null_text: (1, 77, C) the empty prompt's embeddings (CFG's unconditional text).
        embeddings: (B, n, D); crops: (B, n, 3, S, S) in [-1, 1].
        drop_text, drop_identity: (B,) bool (`draw_condition_dropout`).

    Returns:
        (text, embeddings, crops) with the dropped rows replaced; face masks stay (MGMICA attends the null
        identity at the faces, as in CFG's unconditional branch).
    """
    drop_text = drop_text.to(text.device)
    drop_identity = drop_identity.to(embeddings.device)
    text = torch.where(drop_text.view(-1, 1, 1), null_text.to(text).expand_as(text), text)
    null_embeddings, null_crops = null_identity(embeddings, crops)
    embeddings = torch.where(drop_identity.view(-1, 1, 1), null_embeddings, embeddings)
    crops = torch.where(drop_identity.view(-1, 1, 1, 1, 1).to(crops.device), null_crops, crops)
    return text, embeddings, crops


def diffusion_loss(
    module: nn.Module,
    backbone: Backbone,
    batch: dict[str, Any],
    condition: torch.Tensor,
    text: torch.Tensor,
    generator: Generators,
    face_loss_weight: float,
    dropout: ConditionDropoutParams | None = None,
    null_text: torch.Tensor | None = None,
    latent_cache: LatentCache | None = None,
) -> torch.Tensor:
    """The face-region weighted diffusion loss of one batch (scalar, float32).

    Args:
        module: `MagicIDTrainingModule` (possibly wrapped by accelerate).
        backbone: for the VAE and noise scheduler (frozen).
        batch: a `collate_idzoom` batch on the training device.
        condition: (B, 6, H, W) ControlNet input for the step's MMF mode.
        text: (B, 77, C) text-encoder states.
        generator: the generator of the latent sample, noise and timesteps (drawn on its device), or one generator
            per sample (`sample_generators`: each sample's draws come from its own, in the same order).
        face_loss_weight: `train.face_loss_weight`.
        dropout: `train.condition_dropout` (None: no dropout, e.g. the validation loss); needs `null_text`
            (1, 77, C), the empty prompt's embeddings. Drawn from `generator` after the noise and timesteps.
        latent_cache: the posteriors of keyed samples encoded once (`train.cache_latents`; None: the VAE encodes the
            batch). The latent sample is drawn from the posterior with the same draws either way.
    """
    vae, scheduler = backbone.vae, backbone.scheduler
    device = backbone.unet.device
    with torch.no_grad():
        pixels = batch["pixel_values"].to(device=device, dtype=vae.dtype)
        if latent_cache is None:
            posterior = vae.encode(pixels).latent_dist
            mean, std = posterior.mean, posterior.std
        else:
            mean, std = latent_cache.moments(pixels, batch["latent_key"])
        batch_size, sample_shape = mean.shape[0], tuple(mean.shape[1:])

        def randn(n: int, g: torch.Generator) -> torch.Tensor:
            return torch.randn((n, *sample_shape), generator=g, device=g.device)

        eps = _draw(generator, batch_size, randn).to(device=device, dtype=mean.dtype)
        latents = (mean + std * eps) * vae.config.scaling_factor
    latents = latents.float()
    noise = _draw(generator, batch_size, randn).to(device)
    timesteps = _draw(
        generator,
        batch_size,
        lambda n, g: torch.randint(
            0, scheduler.config.num_train_timesteps, (n,), generator=g, device=g.device
        ),
    )
    timesteps = timesteps.to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ConfigError(f"scheduler prediction_type {scheduler.config.prediction_type!r} is not supported")
    embeddings, crops = batch["id_embeddings"], batch["id_crops"]
    if dropout is not None:
        if null_text is None:
            raise ConfigError(
                "diffusion_loss: condition dropout needs null_text (the empty prompt's embeddings)"
            )
        drop_text, drop_identity = draw_condition_dropout(latents.shape[0], dropout, generator)
        text, embeddings, crops = apply_condition_dropout(
            text, null_text, embeddings, crops, drop_text, drop_identity
        )
    unet_dtype = backbone.unet.dtype
    prediction = module(
        noisy.to(unet_dtype), timesteps, text.to(unet_dtype), condition, embeddings, crops, batch["id_masks"]
    )
    weight = face_weight_map(batch["face_mask"], tuple(latents.shape[-2:]), face_loss_weight)
    return weighted_diffusion_loss(prediction, target, weight)


OPTIMIZER_IMPLS = ("fused", "foreach", "for_loop")


def resolve_optimizer_impl(choice: str, device: torch.device, mixed_precision: str = "no") -> str:
    """The AdamW implementation `train.optimizer_impl` names on `device` in `mixed_precision`: `auto` is fused on CUDA
    (one kernel for all weights) and torch's own CPU default, the for-loop, on a CPU (a run on a CPU keeps the bits it
    had before the option existed). With fp16's gradient scaler `auto` takes foreach (torch's CUDA default): a fused
    AdamW skips an overflowing step inside its kernel, where accelerate cannot see it, so the LR scheduler would
    advance on the steps the scaler skips (fp16's first steps often overflow); `fused` asked by name runs anyway.

    Raises:
        ConfigError: an unknown choice.
    """
    if choice == "auto":
        if device.type != "cuda":
            return "for_loop"
        return "foreach" if mixed_precision == "fp16" else "fused"
    if choice not in OPTIMIZER_IMPLS:
        raise ConfigError(f"train.optimizer_impl={choice!r}: use auto, {', '.join(OPTIMIZER_IMPLS)}")
    return choice


def build_optimizer(
    groups: list[dict[str, Any]], params: Params, device: torch.device, mixed_precision: str = "no"
) -> tuple[torch.optim.AdamW, str]:
    """AdamW over `groups` (`train.lr`, `train.weight_decay`) in `train.optimizer_impl`'s implementation; returns it
    and the implementation's name. The three implement the same update and differ in float rounding only
    (tests/training/test_train_throughput.py holds them to each other); accelerate's gradient scaler (fp16) handles a
    fused one (`_step_supports_amp_scaling`; `resolve_optimizer_impl` says what accelerate then misses)."""
    impl = resolve_optimizer_impl(params.train.optimizer_impl, device, mixed_precision)
    flags = {
        "fused": {"fused": True},
        "foreach": {"foreach": True},
        "for_loop": {"foreach": False, "fused": False},
    }[impl]
    cfg = params.train
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **flags), impl


def _lr_scheduler(params: Params, optimizer: torch.optim.Optimizer, total_steps: int, processes: int):
    from diffusers.optimization import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[
        params.train.lr_scheduler
    ]
    # accelerate steps a prepared scheduler once per process per optimizer step (diffusers' examples do the same).
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=params.train.lr_warmup_steps * processes,
        num_training_steps=total_steps * processes,
    )


def resolve_mixed_precision(params: Params, device: torch.device) -> str:
    """The mixed precision a training run uses: `train.mixed_precision`, or `model.dtype`'s when that is "no"
    (bfloat16 -> bf16, float16 -> fp16). Either way the trainable weights stay float32 and the frozen backbone runs
    in the half dtype under autocast.

    Raises:
        ConfigError: the two settings name different precisions; fp16 on a CPU (no float16 autocast there).
    """
    implied = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[params.model.dtype]
    chosen = params.train.mixed_precision
    if "no" not in (chosen, implied) and chosen != implied:
        raise ConfigError(
            f"train.mixed_precision={chosen} but model.dtype={params.model.dtype} (= {implied}): set one of them, "
            "or both to the same precision"
        )
    mixed = chosen if chosen != "no" else implied
    if mixed == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"fp16 mixed precision (train.mixed_precision / model.dtype=float16) needs CUDA; the run is on "
            f"{device}: use bf16 (model.dtype=bfloat16) or float32 there"
        )
    return mixed


def train(
    params: Params,
    data_dir: str | Path,
    steps: int | None = None,
    resume: bool = False,
    backbone: Backbone | None = None,
    progress: bool = True,
    track: bool = True,
    dataset: Dataset | None = None,
    val_dataset: Dataset | None = None,
    run_tags: dict[str, str] | None = None,
    source_name: str = "magicid train",
) -> TrainResult:
    """Train the MagicID adapter on an IDZoom dataset version (or on the samples of `dataset`).

    Args:
        params: typed parameters (`train`, `model`, `tracking`, `seed`, `data.crop_size`).
        data_dir: the IDZoom dataset version directory (DESIGN §2): the training samples unless `dataset` is
            given, and always the logged dataset version.
        steps: optimizer steps to reach (default `train.steps`); with `resume`, the total including those done.
            The LR schedule spans `max(train.steps, steps)`, so a run stopped early resumes on the same schedule.
        resume: continue from the newest checkpoint under `train.out_dir/checkpoints` (error if none).
        backbone: a freshly loaded backbone to train on (default `load_backbone(params)`); MGMICA is installed on
            its UNet, so do not share it with another model. With `train.unet_lr` its UNet is trained in place.
        progress: show a tqdm progress bar.
        track: log to MLflow (`tracking.uri`, `tracking.experiment`).
        dataset: the training samples instead of the IDZoom version's train split: any map-style dataset whose
            items are `IDZoomDataset.__getitem__`'s dicts and that has `set_epoch` (fit-world: the composite
            world's `WorldDataset`). Its order is `EpochShuffleSampler`'s, as for IDZoom.
        val_dataset: with `dataset`, the validation samples (None: no validation loss).
        run_tags: extra tags of a new MLflow run (fit-world: `mlflow.parentRunId`, so the run nests under it).
        source_name: the `mlflow.source.name` tag of a new run.

    Where the adapter starts (`train.init_from`): null, freshly initialised; `champion`, the weights of the
    registry's current champion (`magicid.registry.champion_adapter`); a folder, the adapter saved there. Its sizes
    must be `model`'s (an error says which differ). A resumed run takes its weights from the checkpoint instead.

    The backbone's UNet trains jointly with the adapter when `train.unet_lr` is set (its own LR, kept in float32;
    the final UNet is written to `train.out_dir/unet` as a diffusers folder without the adapter's MGMICA
    weights); by default it stays frozen.

    Returns:
        `TrainResult`.

    Raises:
        DataError: a bad dataset row; ConfigError: impossible settings (e.g. `--resume` without a checkpoint, an
        `init_from` adapter of other sizes); RegistryError: `init_from: champion` without a champion.
        OutputLocked: another process is writing `train.out_dir` (the lock is held for the whole run, by the main
            process only under `accelerate launch`: the other ranks are part of this run).
    """
    with output_lock(params.train.out_dir, "magicid train", main_process_only=True):
        return _train_locked(
            params, data_dir, steps, resume, backbone, progress, track, dataset, val_dataset, run_tags, source_name
        )  # fmt: skip


def _train_locked(
    params: Params,
    data_dir: str | Path,
    steps: int | None,
    resume: bool,
    backbone: Backbone | None,
    progress: bool,
    track: bool,
    dataset: Dataset | None,
    val_dataset: Dataset | None,
    run_tags: dict[str, str] | None,
    source_name: str,
) -> TrainResult:
    """The driver: settings, accelerator, models, data (`train_data.build_train_data`), optimizer, resume, tracking,
    then the loop (`run_steps`) and the final adapter. The order of the set-up is the order of its random draws."""
    cfg = params.train
    total_steps = int(steps or cfg.steps)
    if total_steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {total_steps}")
    if val_dataset is not None and dataset is None:
        raise ConfigError(
            "train(): val_dataset goes with dataset (the IDZoom version's val split is used otherwise)"
        )
    out_dir = Path(cfg.out_dir)
    data_dir = Path(data_dir)
    # The newest checkpoint, checked (a damaged one is an error naming it, never skipped for an older one).
    checkpoints = [c for c in [check_resume_checkpoint(out_dir)] if c is not None] if resume else []
    if resume and not checkpoints:
        raise ConfigError(
            f"--resume: no checkpoint under {out_dir / 'checkpoints'}; train without --resume first"
        )

    # 1. Accelerator, then the seed; 2. models; 3. data.
    accelerator, mixed_precision = _make_accelerator(params, out_dir)
    set_seed(params.seed)
    backbone, module, unet_weights, init_label = _build_models(
        params, backbone, accelerator.device, mixed_precision, init=not checkpoints
    )
    adapter_weights = [p for p in module.adapter.parameters() if p.requires_grad]
    trainable = adapter_weights + unet_weights
    data = build_train_data(
        params,
        data_dir,
        dataset,
        val_dataset,
        log=accelerator.print,
        pin_memory=accelerator.device.type == "cuda",
    )

    groups = [{"params": adapter_weights, "lr": cfg.lr}]
    if unet_weights:
        groups.append({"params": unet_weights, "lr": cfg.unet_lr})
    optimizer, optimizer_impl = build_optimizer(groups, params, accelerator.device, mixed_precision)
    # The LR schedule spans the configured run (`train.steps`), not this call's `--steps`: stopping early and
    # resuming later must follow the same schedule as one uninterrupted run.
    horizon = max(cfg.steps, total_steps)
    lr_scheduler = _lr_scheduler(params, optimizer, horizon, accelerator.num_processes)
    module, optimizer, data.loader, lr_scheduler = accelerator.prepare(
        module, optimizer, data.loader, lr_scheduler
    )
    run = TrainRun(
        params, accelerator, backbone, module, trainable, optimizer, lr_scheduler, out_dir, horizon, data
    )

    # 4. Resume: weights, optimizer, scheduler, scaler, RNG, accumulation counter; then the data position.
    step, run_id = 0, None
    if checkpoints:
        step, run_id = _resume(run, checkpoints[-1], total_steps)

    tracker = RunTracker(params, enabled=track and accelerator.is_main_process)
    new_run = tracker.start(run_id, run_name=f"train-{data_dir.name}", source_name=source_name, tags=run_tags)
    if new_run:
        tracker.log_params(
            {
                "data_dir": str(data_dir),
                "dataset_version": data.version,
                "n_train_samples": len(data.dataset),
                "n_trainable_params": sum(p.numel() for p in trainable),
                "backbone_source": backbone.source,
                "effective_mixed_precision": mixed_precision,
                "num_processes": accelerator.num_processes,
                "init_from_resolved": init_label or "none",
                "train_samples": type(data.dataset).__name__,
                "optimizer_impl_resolved": optimizer_impl,
            }
        )
        tracker.log_dataset(data.images_df, data_dir, data.version, data.origin)
        if cfg.eval_every > 0 and data.val_loader is None:
            reason = (
                "no validation samples given" if data.custom_dataset else f"{data_dir.name} has no val split"
            )
            tracker.tag("val_loss", f"none: {reason}")

    status = "FAILED"
    try:
        # 5. The loop, then the final adapter (what inference and the registry load).
        done = run_steps(run, tracker, step, total_steps, progress)
        adapter_dir, unet_dir = _save_final(run, tracker, done.step, done.checkpointed_at, bool(unet_weights))
        accelerator.wait_for_everyone()
        status = "FINISHED"
    finally:
        tracker.end(status)
        accelerator.end_training()
    return TrainResult(
        run_id=tracker.run_id,
        out_dir=out_dir,
        adapter_dir=adapter_dir,
        step=done.step,
        losses=done.losses,
        modes=done.modes,
        dataset_version=data.version,
        steps_per_s=(done.step - step) / done.seconds if done.seconds > 0 else float("nan"),
        step_times=done.step_times,
        val_losses=done.val_losses,
        unet_dir=unet_dir,
        step_overhead_ms=1000 * statistics.median(done.overheads) if done.overheads else float("nan"),
        vae_encoded=done.vae_encoded,
        latent_cache_hits=done.latent_cache_hits,
        optimizer_impl=optimizer_impl,
    )


def _make_accelerator(params: Params, out_dir: Path):
    """The run's `Accelerator` and mixed precision: under `accelerate launch` its device and processes, else
    `model.device`; mixed precision from `train.mixed_precision` or `model.dtype` (`resolve_mixed_precision`);
    checkpoints by accelerate's automatic naming (`checkpoints/checkpoint_<step>`), pruned to
    `train.keep_checkpoints`."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration

    cfg = params.train
    launched = launched_by_accelerate()
    if launched:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        # The first PartialState fixes the distributed type: on CPU it must be told so (cpu=True), or each rank of a
        # multi-process launch would see no accelerator, fall back to "no distribution" and train alone as rank 0.
        on_cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
        device = PartialState(cpu=on_cpu).device
    else:
        device = resolve_device(params.model.device)
    mixed_precision = resolve_mixed_precision(params, device)
    if not launched:
        # accelerate keeps one process-wide state and refuses another precision in the same process (a second
        # train() call in Python, fit-world's phases, tests); a plain run owns the process, so start it afresh.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=mixed_precision,
        # CUDA: the loader pins its batches (`build_train_data`), so their copies to the device need not block.
        dataloader_config=DataLoaderConfiguration(non_blocking=device.type == "cuda"),
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.grad_accum, sync_with_dataloader=False
        ),
        project_config=ProjectConfiguration(
            project_dir=str(out_dir), automatic_checkpoint_naming=True, total_limit=cfg.keep_checkpoints
        ),
    )
    if launched and params.model.device not in ("auto", accelerator.device.type):
        accelerator.print(
            f"accelerate launch: training on {accelerator.device} ({accelerator.num_processes} process(es)); "
            f"model.device={params.model.device} applies to runs without accelerate launch"
        )
    return accelerator, mixed_precision


def _build_models(
    params: Params, backbone: Backbone | None, device: torch.device, mixed_precision: str, init: bool
) -> tuple[Backbone, MagicIDTrainingModule, list[nn.Parameter], str | None]:
    """The frozen backbone in the compute dtype and the trainable adapter in float32 (and the UNet's own weights,
    when `train.unet_lr` trains it), wrapped in `MagicIDTrainingModule`; `init`: load `train.init_from` (a resumed
    run takes its weights from the checkpoint). Returns (backbone, module, UNet weights, what init loaded)."""
    cfg = params.train
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    backbone = backbone or load_backbone(params)
    backbone.require_sd1("training (magicid train)")
    backbone.to(device=device, dtype=weight_dtype)
    for frozen in (backbone.unet, backbone.vae, backbone.text_encoder):
        frozen.requires_grad_(False).eval()
    adapter = MagicIDAdapter.create(backbone, params)
    init_label = None
    if cfg.init_from is not None and init:
        init_label = _init_adapter_weights(adapter, params, backbone)
    adapter.to(device=device, dtype=torch.float32).train()
    unet_weights: list[nn.Parameter] = []
    if cfg.unet_lr is not None:
        if backbone.unet.dtype != torch.float32:  # (diffusers warns on every .to(dtype), even a no-op one)
            backbone.unet.to(dtype=torch.float32)
        backbone.unet.train()
        # The UNet's own weights; the MGMICA processors on it are the adapter's (trained with the adapter's LR).
        unet_weights = [p for n, p in backbone.unet.named_parameters() if ".processor." not in n]
        for weight in unet_weights:
            weight.requires_grad_(True)
    module = MagicIDTrainingModule(adapter, backbone.unet, unet_weights or None)
    # In place (state-dict keys unchanged: checkpoints and the saved adapter are as without); MGMICA stays eager.
    compile_denoiser(cfg.compile, "train.compile", backbone.unet, adapter.controlnet)
    return backbone, module, unet_weights, init_label


@dataclasses.dataclass
class TrainRun:
    """The prepared objects the loop runs (the driver builds them; `accelerator.prepare` has wrapped module,
    optimizer, `data.loader` and scheduler)."""

    params: Params
    accelerator: Any
    backbone: Backbone
    module: nn.Module
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    out_dir: Path
    horizon: int  # the LR schedule's length (`max(train.steps, steps)`)
    data: TrainData


def _resume(run: TrainRun, checkpoint: Path, total_steps: int) -> tuple[int, str | None]:
    """Load `checkpoint` into the prepared objects; its (step, MLflow run id). Warns when the LR horizon or the
    dataset version changed since."""
    accelerator = run.accelerator
    load_checkpoint_state(accelerator, checkpoint)
    state = json.loads((checkpoint / STATE_FILE).read_text())
    step, run_id = int(state["step"]), state.get("run_id")
    if state.get("lr_horizon") not in (None, run.horizon):
        accelerator.print(
            f"warning: the LR schedule now spans {run.horizon} steps, the checkpoint's spanned {state['lr_horizon']}; "
            "set train.steps to the run's total length to resume on the same schedule"
        )
    if state.get("dataset_version") not in (None, run.data.version):
        accelerator.print(
            f"warning: resuming on dataset version {run.data.version}, the checkpoint was trained on "
            f"{state['dataset_version']}"
        )
    if step >= total_steps:
        raise ConfigError(
            f"--resume: checkpoint {checkpoint.name} is at step {step} >= --steps {total_steps}"
        )
    return step, run_id


@dataclasses.dataclass
class LoopResult:
    """What `run_steps` did: the step reached, per-step records of this call, where it last checkpointed, and its
    seconds (set-up excluded)."""

    step: int
    losses: dict[int, float]
    modes: dict[int, str]
    step_times: dict[int, float]
    val_losses: dict[int, float]
    overheads: list[float]
    checkpointed_at: int | None
    seconds: float
    vae_encoded: int = 0
    latent_cache_hits: int = 0


def run_steps(run: TrainRun, tracker: RunTracker, step: int, total_steps: int, progress: bool) -> LoopResult:
    """The optimizer steps from `step` (0, or a resumed checkpoint's) to `total_steps`: the data position follows
    from the step (checkpoints sit on step boundaries), each micro-batch's draws from `sample_generators`; metrics,
    validation loss and checkpoints on their schedules."""
    from tqdm.auto import tqdm

    params, accelerator, module, data = run.params, run.accelerator, run.module, run.data
    cfg = params.train
    schedule = MMFSchedule.from_params(params)
    texts = TextEncoderCache(run.backbone)
    null_text = texts([""])  # (1, 77, C): what text dropout and CFG's unconditional branch both use
    # The frozen VAE's posteriors of deterministic samples, encoded once (`train.cache_latents`); its counts are the
    # training steps' only (validation fills and reads it too).
    latents = LatentCache(run.backbone.vae) if cfg.cache_latents else None
    loader = data.loader
    done = LoopResult(step, {}, {}, {}, {}, [], None, float("nan"))
    per_epoch = len(loader)
    micro = step * cfg.grad_accum  # micro-batches consumed so far (checkpoints sit on step boundaries)
    epoch, skip = divmod(micro, per_epoch)
    bar = tqdm(
        total=total_steps, initial=step, desc="train", disable=not (progress and accelerator.is_main_process)
    )
    running, micro_in_step = torch.zeros((), device=accelerator.device), 0
    start_time = time.perf_counter()
    try:
        while step < total_steps:
            loader.set_epoch(epoch)  # the sampler's order; the epoch travels to the samples with each index
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
            skip = 0
            last, overhead = time.perf_counter(), 0.0
            for batch in batches:
                mode = schedule.mode_at(step)
                first_position = (
                    micro_in_step * accelerator.num_processes + accelerator.process_index
                ) * cfg.batch_size
                generator = sample_generators(
                    params.seed, step, first_position, len(batch["caption"]), accelerator.device
                )
                condition = schedule.condition_at(step, batch["skeleton"], batch["landmark"])
                compute_start = time.perf_counter()
                counts_before = (latents.encoded, latents.hits) if latents is not None else None
                with accelerator.accumulate(module):
                    loss = diffusion_loss(
                        module,
                        run.backbone,
                        batch,
                        condition,
                        texts(batch["caption"]),
                        generator,
                        cfg.face_loss_weight,
                        dropout=cfg.condition_dropout,
                        null_text=null_text,
                        latent_cache=latents,
                    )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(run.trainable, cfg.max_grad_norm)
                    run.optimizer.step()
                    run.lr_scheduler.step()
                    run.optimizer.zero_grad(set_to_none=True)
                compute_end = time.perf_counter()
                if counts_before is None:
                    done.vae_encoded += len(batch["caption"])
                else:
                    done.vae_encoded += latents.encoded - counts_before[0]
                    done.latent_cache_hits += latents.hits - counts_before[1]
                running += loss.detach() / cfg.grad_accum
                micro_in_step += 1
                overhead += compute_start - last
                if not accelerator.sync_gradients:
                    last = time.perf_counter()
                    overhead += last - compute_end
                    continue
                step += 1
                done.step = step
                step_loss = accelerator.reduce(running, reduction="mean").item()
                if not math.isfinite(step_loss):
                    raise FloatingPointError(
                        f"loss is {step_loss} at step {step}; lower train.lr or check the data"
                    )
                running, micro_in_step = torch.zeros((), device=accelerator.device), 0
                done.losses[step], done.modes[step], done.step_times[step] = (
                    step_loss,
                    mode,
                    time.perf_counter(),
                )
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", mode=mode)
                if step % cfg.log_every == 0 or step == total_steps:
                    tracker.metrics(
                        {
                            "loss": step_loss,
                            f"loss_{mode}": step_loss,
                            "lr": run.lr_scheduler.get_last_lr()[0],
                            "mmf_mode_id": MODE_IDS[mode],
                        },
                        step,
                    )
                done.overheads.append(overhead + time.perf_counter() - compute_end)
                if data.val_loader is not None and (step % cfg.eval_every == 0 or step == total_steps):
                    done.val_losses[step] = validation_loss(
                        module,
                        run.backbone,
                        data.val_loader,
                        texts,
                        params.seed,
                        cfg.face_loss_weight,
                        accelerator.device,
                        latent_cache=latents,
                    )
                    tracker.metrics({"val_loss": done.val_losses[step]}, step)
                if step % _METRICS_FLUSH_EVERY == 0:
                    tracker.flush()
                # A checkpoint on `train.checkpoint_every`'s schedule, and at the end of a call that stops before
                # the configured run's end (`--steps` < train.steps: it is meant to be resumed); a finished run
                # gets no extra one (its adapter is the result).
                if step % cfg.checkpoint_every == 0 or (step == total_steps and total_steps < run.horizon):
                    extra = {"dataset_version": data.version, "lr_horizon": run.horizon}
                    _save_checkpoint(accelerator, module, run.out_dir, step, tracker, extra, params)
                    done.checkpointed_at = step
                last, overhead = time.perf_counter(), 0.0
                if step >= total_steps:
                    break
            epoch += 1
        done.seconds = time.perf_counter() - start_time
    finally:
        bar.close()
    return done


def _save_final(
    run: TrainRun, tracker: RunTracker, step: int, checkpointed_at: int | None, train_unet: bool
) -> tuple[Path, Path | None]:
    """Write the final adapter (and the UNet when it trained), each file once: hard links to the final checkpoint's
    adapter when the last step was checkpointed, else saved here. Returns (adapter_dir, unet_dir or None)."""
    accelerator, out_dir = run.accelerator, run.out_dir
    adapter_dir = out_dir / "adapter"
    unet_dir = out_dir / "unet" if train_unet else None
    if accelerator.is_main_process:
        final_checkpoint = (
            out_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}" / "adapter"
            if checkpointed_at == step
            else None
        )
        if final_checkpoint is not None and final_checkpoint.is_dir():
            atomic_write_dir(adapter_dir, lambda tmp: _link_files(final_checkpoint, tmp))
        else:
            atomic_write_dir(adapter_dir, lambda tmp: accelerator.unwrap_model(run.module).adapter.save(tmp))
        tracker.artifacts(adapter_dir, "adapter")
        if unet_dir is not None:
            atomic_write_dir(unet_dir, lambda tmp: save_unet(run.backbone.unet, tmp))
    return adapter_dir, unet_dir


def save_unet(unet: nn.Module, folder: Path) -> None:
    """Write `unet` as a diffusers model folder (`save_pretrained`, safetensors) without the MGMICA processors'
    weights an attached adapter put on it (those are the adapter's)."""
    from magicid.models.backbone import stock_attention

    with stock_attention(unet):
        unet.save_pretrained(str(folder), safe_serialization=True)


def _link_files(source: Path, target: Path) -> None:
    """Hard-link every file of `source` into `target` (one copy on disk); a copy where the file system cannot link."""
    for path in source.iterdir():
        if path.is_file():
            try:
                os.link(path, target / path.name)
            except OSError:  # another device, or no hard links there: the same bytes, written once more
                shutil.copy2(path, target / path.name)


def _init_adapter_weights(adapter: MagicIDAdapter, params: Params, backbone: Backbone) -> str:
    """Load `train.init_from`'s adapter weights into the freshly created `adapter`; returns what was loaded
    (`models:/NAME/VERSION` for the champion, else the folder).

    Raises:
        ConfigError: a folder that is not an adapter. RegistryError: no champion. BackboneError: another UNet,
            other sizes than `model`'s, or damaged files.
    """
    import tempfile

    init_from = str(params.train.init_from)
    if init_from == "champion":
        from magicid.registry import champion_adapter

        with tempfile.TemporaryDirectory() as tmp:
            folder, label = champion_adapter(params, tmp)
            adapter.load_weights(folder, backbone)
        return label
    folder = Path(init_from).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"train.init_from={init_from!r}: not 'champion' and no such folder; give an adapter folder "
            "(train.out_dir/adapter) or null"
        )
    adapter.load_weights(folder, backbone)
    return str(folder)


def _save_checkpoint(
    accelerator, module: nn.Module, out_dir: Path, step: int, tracker: RunTracker, extra: dict, params: Params
) -> None:
    """`accelerator.save_state` into `checkpoints/checkpoint_<step>` (accelerate prunes to `total_limit`), then the
    adapter and `trainer_state.json` (written last: only a folder holding it counts as a complete checkpoint)."""
    target = out_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process and target.exists():  # a leftover of an interrupted save at this step
        shutil.rmtree(target)
    accelerator.project_configuration.iteration = step  # the folder number is the step
    accelerator.save_state(safe_serialization=True)
    if accelerator.is_main_process:
        accelerator.unwrap_model(module).adapter.save(target / "adapter")
        state = {"step": step, "run_id": tracker.run_id, "seed": params.seed, **extra}
        atomic_write_text(target / STATE_FILE, json.dumps(state, indent=2))
        tracker.flush()
        if params.train.log_checkpoints:
            tracker.artifacts(target, f"checkpoints/{target.name}")
    accelerator.wait_for_everyone()


@torch.no_grad()
def validation_loss(
    module: nn.Module,
    backbone: Backbone,
    loader: DataLoader,
    texts: TextEncoderCache,
    seed: int,
    face_loss_weight: float,
    device: torch.device,
    latent_cache: LatentCache | None = None,
) -> float:
    """Mean diffusion loss over the val split: fused conditions, no dropout, fixed noise per batch (comparable
    across steps). Every process computes it over the whole split (it is small); the main process logs it.
    `latent_cache`: the run's (`train.cache_latents`): the val samples are clean, so each is encoded once."""
    from accelerate.utils import send_to_device

    from magicid.models.conditioning import make_condition

    losses, weights = [], []
    for index, batch in enumerate(loader):
        batch = send_to_device(batch, device, non_blocking=device.type == "cuda")  # pinned on CUDA
        condition = make_condition(batch["skeleton"], batch["landmark"], "fused")
        generator = step_generator(seed, VALIDATION_STREAM, index, 0, device=device)
        loss = diffusion_loss(
            module,
            backbone,
            batch,
            condition,
            texts(batch["caption"]),
            generator,
            face_loss_weight,
            latent_cache=latent_cache,
        )
        losses.append(float(loss))
        weights.append(len(batch["caption"]))
    return float(np.average(losses, weights=weights))


def launched_by_accelerate() -> bool:
    """Whether this process was started by `accelerate launch` (which sets ACCELERATE_* variables, e.g.
    ACCELERATE_MIXED_PRECISION) or by a distributed launcher accelerate follows (torchrun: WORLD_SIZE > 1)."""
    return "ACCELERATE_MIXED_PRECISION" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
