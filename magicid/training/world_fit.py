"""`magicid fit-world`: the offline world, fitted once (DESIGN §3, issue 23).

The composite world (`magicid.data.world`) draws training scenes in which the sample identities' faces sit 1-4
at a time at random places and sizes, with exact boxes, landmarks, condition maps and identity labels. This
module fits a model on it in two phases, both on the project's own machinery:

1. **Backbone** (`magicid.training.fit.BackboneFitter`, as `fit-backbone`): the tiny VAE, then the tiny UNet,
   on a pool of `fit_world.pool_images` world scenes rendered once, plus one zoomed face crop of each scene
   (close-ups: what DIIR regenerates). Settings: `fit:`, with the step counts and UNet batch of `fit_world:`.
2. **Adapter** (`magicid.training.trainer.train`, as `magicid train`, with the world's `WorldDataset` as its
   dataset): ID encoder, MGMICA projections and MMF ControlNet with Clone Face Tuning and condition dropout, on
   fresh scenes every step (`fit_world.epoch_samples` per epoch, a new draw each epoch). The UNet keeps training
   with the adapter at `fit_world.unet_lr` (null: frozen, as in `magicid train`). Why jointly: a frozen phase-1
   UNet has learnt scenes without any condition, so the only way a box, a landmark map or an identity could
   change its output would be through the ControlNet residuals and the ID projections alone; at the same step
   count the joint run reached a lower held-out loss, face regions included (README: "Fitting the offline
   world", measured).

The result is one folder (`fit_world.out_dir`, `models/offline_world`): a diffusers SD folder (loads as
`model.backbone`), `adapter/` (loads as `model.adapter_path`), `fit_report.json` (steps, losses, timings,
`fit_world_seconds`, `fit_step_overhead_ms`, sizes), `params.yaml` (every parameter it was fitted with),
`fit_key.json` (the hash of its inputs: dataset version + params) and `checksums.sha256` over every file, which
the loaders check (`magicid.models.checksums`). Its weights are at most `fit_world.max_megabytes` (checked
before the fit starts).

Determinism and resume: same seed, dataset version and params (and device kind), same weights. Both phases
checkpoint under `<out_dir>.checkpoint/` (safetensors + JSON for the backbone phase; the trainer's accelerate
checkpoints, loaded with `weights_only=True`, for the adapter phase) with `world_state.json` saying which phase
is done; `--resume` continues and reaches bit-identical weights. Tracking: one MLflow run for the fit (its
params, the backbone's losses, the folder as artifacts) with the adapter phase's training run nested under it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from magicid.config import FitParams, Params
from magicid.errors import ConfigError
from magicid.models.backbone import resolve_device, resolve_dtype
from magicid.training.fit import KEY_FILE, REPORT_FILE, BackboneFitter, checkpoint_dir, read_fit_key
from magicid.training.fit_data import FitData
from magicid.utils import atomic_write_dir, atomic_write_text

PARAMS_FILE = "params.yaml"
ADAPTER_DIR = "adapter"
STATE_FILE = "world_state.json"
# Params sections a fitted world does not depend on (where results go, services, evaluation and the gate).
_KEY_EXCLUDED_SECTIONS = ("tracking", "storage", "review", "orchestration", "eval", "promotion", "diir")
# Fields that change no weight: where things are written, inference-only settings, intervals of checkpoints, logs
# and validation, the device (a seed gives the same weights on the same device kind), settings a world fit
# overrides (`fit` and `train` enter the key as the phases' effective settings) or does not read.
_KEY_EXCLUDED_FIELDS = {
    "model": (
        "backbone",
        "adapter_path",
        "untrained_adapter",
        "num_inference_steps",
        "guidance_scale",
        "device",
        "dtype",
        "controlnet_cfg",
        "channels_last",
        "compile",
    ),
    "train": (
        "out_dir",
        "init_from",
        "log_checkpoints",
        "keep_checkpoints",
        "loader_workers",
        "loader_prefetch",
        "optimizer_impl",  # float rounding only (auto on CPU is today's for-loop), as mixed_precision below
        "cache_latents",  # the same posterior, encoded once (float rounding of the VAE's batch only)
        "checkpoint_every",
        "log_every",
        "eval_every",
        "mixed_precision",
        "compile",
    ),
    "fit": ("out_dir", "splits", "quality", "checkpoint_every", "log_every", "compile"),
    "fit_world": ("out_dir", "checkpoint_every", "log_every", "eval_every", "val_samples", "max_megabytes"),
    "data": ("raw_dir", "out_dir", "workers", "max_pixels"),
}

WorldFactory = Callable[[Path, Params, int, int], Any]
DatasetFactory = Callable[..., Any]


@dataclasses.dataclass
class WorldFitResult:
    """What a `fit_world` call did.

    Attributes:
        out_dir: the world folder (written when `finished`).
        finished: the folder is complete (False: stopped at `stop_after`, resumable).
        reused: an existing folder with the same inputs was kept.
        seconds: this call's wall time; report: `fit_report.json`'s content (empty unless finished).
        run_id: the fit's MLflow run.
    """

    out_dir: Path
    finished: bool
    reused: bool
    seconds: float
    report: dict[str, Any]
    run_id: str | None


def default_world(dataset_dir: Path, params: Params, resolution: int, seed: int):
    """The composite world of an IDZoom version (`magicid.data.world.CompositeWorld`)."""
    from magicid.data.world import CompositeWorld

    return CompositeWorld(dataset_dir, params, resolution=resolution, seed=seed)


def default_dataset(world, length: int, clone_params, seed: int):
    """The world's training samples as `IDZoomDataset` items (`magicid.training.world_dataset.WorldDataset`)."""
    from magicid.training.world_dataset import WorldDataset

    return WorldDataset(world, length, clone_params=clone_params, seed=seed)


def world_fit_key(params: Params, version: str) -> dict[str, Any]:
    """The inputs a world folder depends on and their hash: the dataset version and every parameter that changes
    the weights (all sections but those in `_KEY_EXCLUDED_SECTIONS`, `fit`/`train` as the phases' effective
    settings, less the fields of `_KEY_EXCLUDED_FIELDS`; a section added later counts)."""
    from magicid.models.tiny import TinyBackboneConfig

    dumped = params.model_dump(mode="json")
    for section in _KEY_EXCLUDED_SECTIONS:
        dumped.pop(section, None)
    # The phases run on their effective settings: those are the inputs, not the `fit`/`train` values they override
    # (`train.steps`, the demo's fine-tuning length, changes nothing in a world fit).
    dumped["fit"] = backbone_settings(params).model_dump(mode="json")
    dumped["train"] = adapter_params(params, Path("<state>")).train.model_dump(mode="json")
    for section, fields in _KEY_EXCLUDED_FIELDS.items():
        for field in fields:
            dumped.get(section, {}).pop(field, None)
    inputs = {
        "dataset_version": version,
        "params": dumped,
        "tiny": dataclasses.asdict(TinyBackboneConfig(seed=params.seed)),
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return {"key": digest, "inputs": inputs}


def backbone_settings(params: Params) -> FitParams:
    """Phase 1's settings: `fit:` with `fit_world:`'s step counts, UNet batch, checkpoint and log intervals, at
    `model.resolution` (the world's side)."""
    world = params.fit_world
    return params.fit.model_copy(
        update={
            "resolution": params.model.resolution,
            "vae_steps": world.vae_steps,
            "unet_steps": world.unet_steps,
            "unet_batch": world.unet_batch,
            "checkpoint_every": world.checkpoint_every,
            "log_every": world.log_every,
        }
    )


def adapter_params(params: Params, state_dir: Path) -> Params:
    """Phase 2's params: `train:` with `fit_world:`'s steps, batch, LRs and intervals, training into
    `<state_dir>/adapter` on the phase-1 backbone (`<state_dir>/backbone`), mixed precision from `model.dtype`."""
    world = params.fit_world
    mixed = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[params.model.dtype]
    train = params.train.model_copy(
        update={
            "out_dir": str(state_dir / "adapter"),
            "steps": world.adapter_steps,
            "batch_size": world.adapter_batch,
            "lr": world.adapter_lr,
            "unet_lr": world.unet_lr,
            "checkpoint_every": world.checkpoint_every,
            "keep_checkpoints": 1,
            "eval_every": world.eval_every,
            "log_every": world.log_every,
            "init_from": None,
            "mixed_precision": mixed,
        }
    )
    # Loaded in float32 (the UNet trains from the fitted weights, not from a rounded copy); the trainer casts the
    # frozen parts to the mixed-precision dtype itself.
    model = params.model.model_copy(
        update={
            "backbone": str(state_dir / "backbone"),
            "adapter_path": None,
            "untrained_adapter": False,
            "dtype": "float32",
        }
    )
    return params.model_copy(update={"train": train, "model": model})


def world_fit_data(world, n_scenes: int, resolution: int, version: str, origin: str) -> tuple[FitData, float]:
    """Render scenes 0..n-1 of `world` into a `FitData` pool: each scene, and one of its face crops (face
    `index % n_faces`, resized to `resolution`) as a close-up. Returns (pool, seconds per scene)."""
    from PIL import Image

    started = time.perf_counter()
    whole = torch.empty(n_scenes, 3, resolution, resolution, dtype=torch.uint8)
    crops = torch.empty_like(whole)
    captions, identities = [], []
    for index in range(n_scenes):
        sample = world.sample(index)
        if sample.image.shape != (resolution, resolution, 3):
            raise ConfigError(
                f"world scene {index} is {sample.image.shape}, expected ({resolution}, {resolution}, 3) "
                "(model.resolution): build the world at model.resolution"
            )
        whole[index] = torch.from_numpy(np.array(sample.image, np.uint8)).permute(2, 0, 1)
        face = index % len(sample.identities)
        crop = np.asarray(
            Image.fromarray(sample.crops[face]).resize((resolution, resolution), Image.Resampling.BICUBIC)
        )
        crops[index] = torch.from_numpy(np.array(crop, np.uint8)).permute(2, 0, 1)
        captions.append(sample.caption)
        identities.append(sample.identities[face])
    seconds = (time.perf_counter() - started) / max(1, n_scenes)
    return FitData(whole, captions, crops, identities, version, origin), seconds


def model_megabytes(params: Params) -> dict[str, float]:
    """The saved sizes (MB, float32 safetensors) of the tiny backbone's parts and of the adapter `params` build,
    counted from freshly built models (the fit changes values, not sizes)."""
    from magicid.models.adapter import MagicIDAdapter
    from magicid.models.tiny import TinyBackboneConfig, build_tiny_backbone

    backbone = build_tiny_backbone(TinyBackboneConfig(seed=params.seed))

    def size(state: dict) -> float:
        return sum(t.numel() * t.element_size() for t in state.values()) / 1e6

    sizes = {
        "unet": size(backbone.unet.state_dict()),
        "vae": size(backbone.vae.state_dict()),
        "text_encoder": size(backbone.text_encoder.state_dict()),
    }
    sizes["adapter"] = size(MagicIDAdapter.create(backbone, params)._saved_state())
    sizes["total"] = sum(sizes.values())
    return {k: round(v, 3) for k, v in sizes.items()}


def folder_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def _read_state(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"--resume: {path} is damaged ({error}); fit again with --refit") from error


def _write_state(state_dir: Path, state: dict[str, Any]) -> None:
    atomic_write_text(state_dir / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")


def fit_world(
    params: Params,
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    resume: bool = False,
    refit: bool = False,
    progress: bool = True,
    track: bool = True,
    stop_after: int | None = None,
    world_factory: WorldFactory = default_world,
    dataset_factory: DatasetFactory = default_dataset,
) -> WorldFitResult:
    """Fit the backbone and the adapter on the composite world of `data_dir` and write the world folder.

    Args:
        params: all parameters (`fit_world`, `fit`, `train`, `model`, `seed`, `tracking`).
        data_dir: the IDZoom version whose faces, landmarks and identities the world composes.
        out_dir: the folder to write (default `fit_world.out_dir`); replaced atomically when the fit ends.
        resume: continue the fit checkpointed in `<out_dir>.checkpoint/`.
        refit: fit from scratch, discarding a checkpoint and replacing an existing folder.
        progress: tqdm bars (one per phase); track: log to MLflow.
        stop_after: stop after this many steps in total (backbone VAE + UNet + adapter), checkpointed, without
            writing the folder: a fit split over several calls, as an interruption would split it.
        world_factory, dataset_factory: build the world and its training dataset (default: `magicid.data.world`).

    Returns:
        `WorldFitResult`.

    Raises:
        ConfigError: `model.device=cuda` without CUDA; `--resume` without a matching checkpoint; an existing folder
            or checkpoint of other inputs without `--refit`/`--resume`; weights over `fit_world.max_megabytes`.
        DataError: a bad `data_dir`. OutputLocked: another process is writing `out_dir` (the lock covers
            `<out_dir>.checkpoint/` too).
    """
    from magicid.locks import output_lock

    out_dir = Path(out_dir or params.fit_world.out_dir)
    with output_lock(out_dir, "magicid fit-world"):
        return _fit_world_locked(
            params,
            data_dir,
            out_dir,
            resume,
            refit,
            progress,
            track,
            stop_after,
            world_factory,
            dataset_factory,
        )


def _fit_world_locked(
    params: Params,
    data_dir: str | Path,
    out_dir: Path,
    resume: bool,
    refit: bool,
    progress: bool,
    track: bool,
    stop_after: int | None,
    world_factory: WorldFactory,
    dataset_factory: DatasetFactory,
) -> WorldFitResult:
    from magicid.data.manifest import check_data_dir
    from magicid.data.version import dataset_version

    start = time.perf_counter()
    world_cfg = params.fit_world
    out_dir = Path(out_dir or world_cfg.out_dir)
    state_dir = checkpoint_dir(out_dir)
    device = resolve_device(params.model.device)
    resolve_dtype(params.model.dtype, device)
    if resume and refit:
        raise ConfigError("fit-world: --resume continues a checkpoint and --refit discards it; pass one")
    data_dir = check_data_dir(data_dir)
    version, origin = dataset_version(data_dir)
    key = world_fit_key(params, version)
    sizes = model_megabytes(params)
    if sizes["total"] > world_cfg.max_megabytes:
        raise ConfigError(
            f"fit-world: the weights would be {sizes['total']:.1f} MB ({sizes}), over fit_world.max_megabytes "
            f"{world_cfg.max_megabytes}; shrink the model (model.n_id_tokens, model.id_image_encoder) or raise the limit"
        )

    if refit:
        shutil.rmtree(state_dir, ignore_errors=True)
    state = _read_state(state_dir)
    if resume:
        if state is None:
            raise ConfigError(f"--resume: no checkpoint at {state_dir}; run fit-world without --resume first")
        if state.get("key") != key["key"]:
            raise ConfigError(
                f"--resume: {state_dir} was made from other inputs (dataset version or params changed); "
                "run fit-world --refit to start over"
            )
    elif not refit:
        if read_fit_key(out_dir) == key["key"]:
            report = json.loads((out_dir / REPORT_FILE).read_text())
            return WorldFitResult(out_dir, True, True, time.perf_counter() - start, report, None)
        if state is not None:
            raise ConfigError(
                f"fit-world: an interrupted fit is checkpointed at {state_dir}; continue it with --resume or start "
                "over with --refit"
            )
        if out_dir.exists():
            raise ConfigError(
                f"fit-world: {out_dir} exists and was fitted from other inputs (or is not a world folder); "
                "replace it with --refit or choose another --out"
            )
    if state is None:
        state = {"key": key["key"], "phase": "backbone", "run_id": None, "seconds": 0.0}

    from magicid.training.tracking import RunTracker

    tracker = RunTracker(params, enabled=track)
    if tracker.start(state["run_id"], run_name=f"fit-world-{data_dir.name}", source_name="magicid fit-world"):
        tracker.log_params(
            {
                "data_dir": str(data_dir),
                "dataset_version": version,
                "fit_world_key": key["key"],
                "fit_device": str(device),
                "model_megabytes": sizes["total"],
            }
        )
    state["run_id"] = tracker.run_id
    world = world_factory(data_dir, params, params.model.resolution, params.seed)
    report: dict[str, Any] = dict(state.get("report", {}))
    status = "FAILED"
    try:
        # 1. The backbone on a pool of world scenes.
        fit = backbone_settings(params)
        if state["phase"] == "backbone":
            data, scene_seconds = world_fit_data(
                world, world_cfg.pool_images, fit.resolution, version, origin
            )
            fitter = BackboneFitter(
                params,
                fit,
                data,
                key["key"],
                state_dir / "backbone_state",
                tracker,
                progress,
                "fit-world backbone",
            )
            del data
            if (state_dir / "backbone_state").is_dir() and resume:
                fitter.restore()
            _write_state(state_dir, state)
            if not fitter.run(stop_after):
                status = "KILLED"
                return _stopped(out_dir, state_dir, state, start, tracker)
            fitter.backbone.save_pretrained(state_dir / "backbone")  # atomic: a whole folder or none
            report["world"] = {
                "pool_images": world_cfg.pool_images,
                "scene_ms": round(1000 * scene_seconds, 2),
                "identities": list(world.identities),
            }
            report["backbone"] = fitter.report()
            state.update(phase="adapter", report=report)
            _write_state(state_dir, state)
            shutil.rmtree(state_dir / "backbone_state", ignore_errors=True)
            del fitter
        backbone_steps = fit.vae_steps + fit.unet_steps

        # 2. The adapter (and the UNet, jointly) on fresh world scenes, through the trainer.
        phase2 = adapter_params(params, state_dir)
        steps = world_cfg.adapter_steps
        if stop_after is not None:
            steps = min(steps, stop_after - backbone_steps)
        if steps < 1:
            status = "KILLED"
            return _stopped(out_dir, state_dir, state, start, tracker)
        result = _adapter_phase(phase2, data_dir, world, dataset_factory, steps, state_dir, tracker, progress)
        if result.step < world_cfg.adapter_steps:
            status = "KILLED"
            return _stopped(out_dir, state_dir, state, start, tracker)
        report["adapter"] = {
            "steps": result.step,
            "steps_per_s": round(result.steps_per_s, 3),
            "step_overhead_ms": round(result.step_overhead_ms, 3),
            "final_loss": result.losses.get(result.step),
            "val_losses": {str(k): v for k, v in result.val_losses.items()},
            "unet_trained": result.unet_dir is not None,
            "run_id": result.run_id,
        }

        # 3. The folder: backbone (+ the jointly trained UNet), adapter, report, params, key, checksums.
        seconds = state["seconds"] + time.perf_counter() - start
        report.update(
            {
                "dataset_version": version,
                "dataset_version_origin": origin,
                "seed": params.seed,
                "device": str(device),
                "dtype": params.model.dtype,
                "git_commit": _git_commit(),
                "fit_world_seconds": round(seconds, 1),
                "fit_step_overhead_ms": report["backbone"]["fit_step_overhead_ms"],
                "model_megabytes": sizes,
                "resumed": bool(state["seconds"]),
            }
        )

        def write(tmp: Path) -> None:
            from magicid.models.checksums import write_checksums

            shutil.copytree(state_dir / "backbone", tmp, dirs_exist_ok=True)
            if result.unet_dir is not None:
                shutil.rmtree(tmp / "unet")
                shutil.copytree(result.unet_dir, tmp / "unet")
            shutil.copytree(result.adapter_dir, tmp / ADAPTER_DIR)
            atomic_write_text(
                tmp / PARAMS_FILE, yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)
            )
            atomic_write_text(tmp / KEY_FILE, json.dumps(key, indent=2, sort_keys=True) + "\n")
            report["folder_megabytes"] = round(folder_megabytes(tmp), 3)
            if report["folder_megabytes"] > world_cfg.max_megabytes:
                raise ConfigError(
                    f"fit-world: the folder is {report['folder_megabytes']} MB, over fit_world.max_megabytes "
                    f"{world_cfg.max_megabytes}"
                )
            atomic_write_text(tmp / REPORT_FILE, json.dumps(report, indent=2) + "\n")
            write_checksums(tmp)

        atomic_write_dir(out_dir, write)
        tracker.metrics(
            {"fit_world_seconds": seconds, "fit_step_overhead_ms": report["fit_step_overhead_ms"]},
            backbone_steps + result.step,
        )
        tracker.artifacts(out_dir, "offline_world")
        shutil.rmtree(state_dir, ignore_errors=True)
        status = "FINISHED"
    finally:
        tracker.end(status)
    return WorldFitResult(out_dir, True, False, time.perf_counter() - start, report, tracker.run_id)


def _adapter_phase(
    phase2: Params, data_dir: Path, world, dataset_factory, steps: int, state_dir, tracker, progress
):
    """Phase 2 through `trainer.train`: world samples (Clone Face at `train.clone_face.prob`), held-out world scenes
    (another seed, no Clone Face) for the validation loss, the run nested under the fit's."""
    from magicid.models.backbone import load_backbone
    from magicid.training.checkpoints import list_checkpoints
    from magicid.training.trainer import train

    world_cfg = phase2.fit_world
    dataset = dataset_factory(world, world_cfg.epoch_samples, phase2.train.clone_face, phase2.seed)
    val_dataset = None
    if world_cfg.val_samples and world_cfg.eval_every:
        no_clones = phase2.train.clone_face.model_copy(update={"prob": 0.0})
        val_dataset = dataset_factory(world, world_cfg.val_samples, no_clones, phase2.seed + 1)
    tags = {"mlflow.parentRunId": tracker.run_id} if tracker.run_id else None
    return train(
        phase2,
        data_dir,
        steps=steps,
        resume=bool(list_checkpoints(phase2.train.out_dir)),
        backbone=load_backbone(phase2),
        progress=progress,
        track=tracker.enabled,
        dataset=dataset,
        val_dataset=val_dataset,
        run_tags=tags,
        source_name="magicid fit-world",
    )


def _stopped(out_dir: Path, state_dir: Path, state: dict, start: float, tracker) -> WorldFitResult:
    seconds = time.perf_counter() - start
    state["seconds"] = state.get("seconds", 0.0) + seconds
    _write_state(state_dir, state)
    return WorldFitResult(out_dir, False, False, seconds, {}, tracker.run_id)
