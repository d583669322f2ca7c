"""Training speed and memory: optimizer steps (images) per second and peak memory, with each throughput lever of
issue 25 (`train.cache_latents`, `train.optimizer_impl`, `train.loader_workers`) against the default.

CPU (always): the offline tiny backbone at `model.resolution` 256, batch 2, on a synthetic IDZoom version
(`magicid.training.synthetic`: 8 images, Clone Face at params' probability), MLflow off, no checkpoints but the last,
no validation loss; the first steps are warm-up and not timed. Each setting runs once a round beside the default, in
alternation, for several rounds; the ratios are medians of the rounds' paired ratios (the host is shared: read those,
not the seconds). Figures: `train_steps_per_s`, `train_images_per_s` (default), `train_images_per_s_<lever>` and
`train_speedup_<lever>` (images/s over the default's, same round) for `cache_latents`, `fused` and `foreach`
(`train.optimizer_impl`), `workers2` (`train.loader_workers=2`) and `all` (the three together, fused),
`train_latent_cache_hit_fraction` (training samples served from the cache after warm-up), `train_peak_rss_mb`.

`--device cuda`: the same loop on SD 1.5's shapes (`magicid.models.sd15_shapes`: random weights, nothing
downloaded; or a real SD 1.5 folder with `--backbone PATH` / `MAGICID_SD15_PATH`) at 512 px in `--dtype` mixed
precision (default bf16). First the batch sweep (4, 8, 16) with every lever on (cached latents, fused AdamW, 4 loader
workers): `gpu_train_steps_per_s_sd15_b<N>`, `gpu_train_images_per_s_sd15_b<N>`, `gpu_train_peak_gib_sd15_b<N>` (peak
CUDA memory allocated) and `gpu_train_images_per_s_sd15` (the best batch; target on one GPU, issue 25: >= 25), then,
at the best batch (`--quick`: batch 4), each lever off in turn: `gpu_train_images_per_s_sd15_no_<lever>` and
`gpu_train_speedup_sd15_<lever>` (all-on over lever-off, same batch) for `cache_latents`, `fused` (vs foreach, torch's
CUDA default) and `workers` (vs 0), and `gpu_train_images_per_s_sd15_default` with `gpu_train_speedup_sd15_all`
(params' defaults: no cache, 0 workers; fused is the CUDA default). Lines are flushed as they come, so a stage cut by
its time limit keeps what it printed; `--quick` starts no lever run after 55 s (it says which it skipped), for
gpu_check.sh's 75 s stage.

Prints `name: value` lines only.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from magicid.config import load_params
from magicid.training.synthetic import write_synthetic_idzoom
from magicid.training.trainer import train

# CPU: each lever as overrides of the default run.
CPU_LEVERS = {
    "cache_latents": ["train.cache_latents=true"],
    "fused": ["train.optimizer_impl=fused"],
    "foreach": ["train.optimizer_impl=foreach"],
    "workers2": ["train.loader_workers=2"],
    "all": ["train.cache_latents=true", "train.optimizer_impl=fused", "train.loader_workers=2"],
}
# CUDA: every lever on, and each one's "off" setting (the rest on).
GPU_ALL_ON = ["train.cache_latents=true", "train.optimizer_impl=fused", "train.loader_workers=4"]
QUICK_BUDGET_S = 55  # --quick: no lever run starts after this (the sweep's figures come first)
GPU_LEVER_OFF = {
    "cache_latents": "train.cache_latents=false",
    "fused": "train.optimizer_impl=foreach",
    "workers": "train.loader_workers=0",
}


def emit(name: str, value: str) -> None:
    print(f"{name}: {value}", flush=True)  # flushed: a stage cut by its time limit keeps the lines printed


def timed_steps_per_s(result, warmup: int) -> float:
    """Steps per second over the steps after `warmup` (each step's end time comes from the trainer)."""
    times = [result.step_times[s] for s in sorted(result.step_times)]
    if len(times) <= warmup + 1:
        raise ValueError(f"need more than {warmup + 1} steps to time, got {len(times)}")
    return (len(times) - 1 - warmup) / (times[-1] - times[warmup])


def run(
    workdir: Path,
    root: Path,
    overrides: list[str],
    steps: int,
    warmup: int,
    batch_size: int = 2,
    backbone=None,
):
    """One training run on the IDZoom version at `root`; returns `TrainResult` and its timed steps per second."""
    params = load_params(
        None,
        [
            f"train.out_dir={workdir}",
            f"train.steps={steps}",
            f"train.checkpoint_every={steps * 10}",
            "train.eval_every=0",  # optimizer steps only (the synthetic set has no val split)
            f"train.batch_size={batch_size}",
            *overrides,
        ],
    )
    result = train(params, root, progress=False, track=False, backbone=backbone)
    return result, timed_steps_per_s(result, warmup)


def synthetic_set(workdir: Path, n_images: int, image_side: int) -> Path:
    return write_synthetic_idzoom(
        workdir / "idzoom",
        n_images=n_images,
        crop_size=128,
        sizes=((image_side, image_side), (image_side * 5 // 4, image_side)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds (under a minute)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=None, help="CPU: paired rounds (default 3, --quick 1)")
    parser.add_argument(
        "--backbone", default=os.environ.get("MAGICID_SD15_PATH"), help="SD 1.5 diffusers folder (CUDA runs)"
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--dtype", default="bfloat16", help="CUDA runs: bfloat16 | float16 | float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        cuda(args, steps=7 if args.quick else 20, warmup=3)
        return
    cpu(args, steps=12 if args.quick else 30, warmup=4 if args.quick else 6)


def cpu(args, steps: int, warmup: int) -> None:
    """The tiny backbone at 256 px, batch 2: the default and each lever, paired in alternating rounds."""
    rounds = args.rounds or (1 if args.quick else 3)
    base = ["model.resolution=256", "model.device=cpu", "model.id_crop_size=64"]
    rates: dict[str, list[float]] = {"default": [], **{name: [] for name in CPU_LEVERS}}
    ratios: dict[str, list[float]] = {name: [] for name in CPU_LEVERS}
    hits = []
    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic_set(Path(tmp), 8, 256)
        for index in range(rounds):
            # Alternate which runs first within the round, so drift of the shared host falls on both sides.
            order = ["default", *CPU_LEVERS] if index % 2 == 0 else [*reversed(CPU_LEVERS), "default"]
            round_rates = {}
            for name in order:
                result, rate = run(
                    Path(tmp) / f"run-{name}-{index}", root, base + CPU_LEVERS.get(name, []), steps, warmup
                )
                round_rates[name] = rate
                if name == "cache_latents":  # over the whole run, warm-up (the first epoch's fills) included
                    hits.append(
                        result.latent_cache_hits / max(1, result.vae_encoded + result.latent_cache_hits)
                    )
            for name, rate in round_rates.items():
                rates[name].append(rate)
            for name in CPU_LEVERS:
                ratios[name].append(round_rates[name] / round_rates["default"])
    emit("train_resolution", "256")
    emit("train_rounds", str(rounds))
    default = statistics.median(rates["default"])
    emit("train_steps_per_s", f"{default:.3f}")
    emit("train_images_per_s", f"{2 * default:.3f}")
    for name in CPU_LEVERS:
        emit(f"train_images_per_s_{name}", f"{2 * statistics.median(rates[name]):.3f}")
        emit(f"train_speedup_{name}", f"{statistics.median(ratios[name]):.3f}")
    emit("train_latent_cache_hit_fraction", f"{statistics.median(hits):.2f}")
    emit("train_peak_rss_mb", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}")


def cuda(args, steps: int, warmup: int) -> None:
    """SD 1.5 shapes (or a real SD 1.5 folder) at 512 px on CUDA: the batch sweep with every lever on, then each
    lever off at the best batch."""
    from magicid.models.backbone import resolve_device, resolve_dtype
    from magicid.models.sd15_shapes import build_sd15_shaped_backbone

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "no"}[dtype]
    real = bool(args.backbone) and Path(args.backbone).is_dir()
    emit("gpu_train_backbone", "sd15 folder " + args.backbone if real else "sd15-shaped random weights")
    emit("gpu_train_mixed_precision", mixed)
    started = time.perf_counter()

    def one(tmp: Path, root: Path, batch: int, settings: list[str], name: str) -> tuple[float, float]:
        """(images/s, peak GiB) of one run on a fresh backbone."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        backbone = None if real else build_sd15_shaped_backbone(0, device, torch.float32)
        overrides = [
            "model.device=cuda",
            "model.resolution=512",
            f"train.mixed_precision='{mixed}'",
            "model.id_crop_size=128",
            *settings,
        ]
        if real:
            overrides.append(f"model.backbone={args.backbone}")
        _, rate = run(tmp / f"run-{name}-b{batch}", root, overrides, steps, warmup, batch, backbone)
        del backbone
        return rate * batch, torch.cuda.max_memory_allocated(device) / 2**30

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # 2 steps an epoch at batch 16 (4 at 8, 8 at 4): from the second epoch on, most non-clone samples are cached.
        root = synthetic_set(tmp, 32, 512)
        sweep: dict[int, float] = {}
        for batch in (4, 8, 16):
            images, peak = one(tmp, root, batch, GPU_ALL_ON, "all")
            sweep[batch] = images
            emit(f"gpu_train_steps_per_s_sd15_b{batch}", f"{images / batch:.3f}")
            emit(f"gpu_train_images_per_s_sd15_b{batch}", f"{images:.2f}")
            emit(f"gpu_train_peak_gib_sd15_b{batch}", f"{peak:.2f}")
        best_batch = max(sweep, key=sweep.get)
        emit("gpu_train_images_per_s_sd15", f"{sweep[best_batch]:.2f}")
        emit("gpu_train_best_batch_sd15", str(best_batch))
        # Each lever off in turn (the rest on), against the sweep's run at the same batch: the best batch, or batch
        # 4 with --quick, whose runs also stop once QUICK_BUDGET_S has passed (gpu_check.sh's stage is 75 s).
        batch = 4 if args.quick else best_batch
        emit("gpu_train_lever_batch_sd15", str(batch))
        ablations = {
            lever: [s for s in GPU_ALL_ON if s.split("=")[0] != off.split("=")[0]] + [off]
            for lever, off in GPU_LEVER_OFF.items()
        }
        ablations["all"] = ["train.loader_workers=0"]  # params' defaults (fused AdamW is the CUDA default)
        for lever, settings in ablations.items():
            if args.quick and time.perf_counter() - started > QUICK_BUDGET_S:
                emit("gpu_train_skipped", f"{lever} (--quick stops after {QUICK_BUDGET_S} s; run without it)")
                continue
            images, peak = one(tmp, root, batch, settings, f"no-{lever}")
            name = "default" if lever == "all" else f"no_{lever}"
            emit(f"gpu_train_images_per_s_sd15_{name}", f"{images:.2f}")
            emit(f"gpu_train_speedup_sd15_{lever}", f"{sweep[batch] / images:.3f}")
            if lever == "all":
                emit(f"gpu_train_peak_gib_sd15_default_b{batch}", f"{peak:.2f}")
    emit("gpu_train_bench_seconds", f"{time.perf_counter() - started:.0f}")


if __name__ == "__main__":
    main()
