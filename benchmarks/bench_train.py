"""Training speed and memory: optimizer steps per second and peak RSS at the tiny config on CPU; SD 1.5 on CUDA.

Tiny (always): the offline tiny backbone at `model.resolution` 256, batch 2, on a synthetic IDZoom version
(`magicid.training.synthetic`), MLflow off, no checkpoints but the last, no validation loss, condition dropout
as configured; the first steps are warm-up and not timed.
`--device cuda`: the same loop on SD 1.5's shapes (`magicid.models.sd15_shapes`: random weights, nothing
downloaded; or a real SD 1.5 folder with `--backbone PATH` / `MAGICID_SD15_PATH`) at 512 px in `--dtype` mixed
precision (default bf16), at batch 4 and 16, `train.loader_workers` 4; every figure with a `gpu_` prefix:
`gpu_train_steps_per_s_sd15_b<N>`, `gpu_train_images_per_s_sd15_b<N>`, `gpu_train_peak_gib_sd15_b<N>` (peak CUDA
memory allocated) and `gpu_train_images_per_s_sd15` (the best batch). Target on one GPU (issue 25):
`gpu_train_images_per_s_sd15` >= 25.

Prints `name: value` lines only.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
from pathlib import Path

import torch

from magicid.config import load_params
from magicid.training.synthetic import write_synthetic_idzoom
from magicid.training.trainer import train


def timed_steps_per_s(result, warmup: int) -> float:
    """Steps per second over the steps after `warmup` (each step's end time comes from the trainer)."""
    times = [result.step_times[s] for s in sorted(result.step_times)]
    if len(times) <= warmup + 1:
        raise ValueError(f"need more than {warmup + 1} steps to time, got {len(times)}")
    return (len(times) - 1 - warmup) / (times[-1] - times[warmup])


def run(
    workdir: Path,
    overrides: list[str],
    steps: int,
    warmup: int,
    image_side: int,
    backbone=None,
    n_images: int = 8,
):
    root = write_synthetic_idzoom(
        workdir / "idzoom",
        n_images=n_images,
        crop_size=128,
        sizes=((image_side, image_side), (image_side * 5 // 4, image_side)),
    )
    params = load_params(
        None,
        [
            f"train.out_dir={workdir / 'run'}",
            f"train.steps={steps}",
            f"train.checkpoint_every={steps * 10}",
            "train.eval_every=0",  # optimizer steps only (the synthetic set has no val split)
            "train.batch_size=2",
            *overrides,
        ],
    )
    result = train(params, root, progress=False, track=False, backbone=backbone)
    return timed_steps_per_s(result, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps (under a minute)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--backbone", default=os.environ.get("MAGICID_SD15_PATH"), help="SD 1.5 diffusers folder (CUDA runs)"
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--dtype", default="bfloat16", help="CUDA runs: bfloat16 | float16 | float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps, warmup = (5, 1) if args.quick else (30, 5)
    if args.device.startswith("cuda"):
        cuda(args, steps=8 if args.quick else 20, warmup=3)
        return

    with tempfile.TemporaryDirectory() as tmp:
        rate = run(
            Path(tmp),
            ["model.resolution=256", "model.device=cpu", "model.id_crop_size=64"],
            steps,
            warmup,
            256,
        )
    print("train_resolution: 256")
    print(f"train_steps_per_s: {rate:.3f}")
    print(f"train_images_per_s: {2 * rate:.3f}")
    print(f"train_peak_rss_mb: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}")


def cuda(args, steps: int, warmup: int) -> None:
    """SD 1.5 shapes (or a real SD 1.5 folder) at 512 px on CUDA, batch 4 and 16."""
    from magicid.models.backbone import resolve_device, resolve_dtype
    from magicid.models.sd15_shapes import build_sd15_shaped_backbone

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "no"}[dtype]
    real = bool(args.backbone) and Path(args.backbone).is_dir()
    print(f"gpu_train_backbone: {'sd15 folder ' + args.backbone if real else 'sd15-shaped random weights'}")
    print(f"gpu_train_mixed_precision: {mixed}")
    best = 0.0
    for batch in (4, 16):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        backbone = None if real else build_sd15_shaped_backbone(0, device, torch.float32)
        overrides = [
            "model.device=cuda",
            "model.resolution=512",
            f"train.mixed_precision='{mixed}'",
            "model.id_crop_size=128",
            f"train.batch_size={batch}",
            "train.loader_workers=4",
        ]
        if real:
            overrides.append(f"model.backbone={args.backbone}")
        with tempfile.TemporaryDirectory() as tmp:
            rate = run(Path(tmp), overrides, steps, warmup, 512, backbone=backbone, n_images=2 * batch)
        best = max(best, rate * batch)
        print(f"gpu_train_steps_per_s_sd15_b{batch}: {rate:.3f}")
        print(f"gpu_train_images_per_s_sd15_b{batch}: {rate * batch:.2f}")
        print(f"gpu_train_peak_gib_sd15_b{batch}: {torch.cuda.max_memory_allocated(device) / 2**30:.2f}")
        del backbone
    print(f"gpu_train_images_per_s_sd15: {best:.2f}")


if __name__ == "__main__":
    main()
