"""Training speed and memory: optimizer steps per second and peak RSS at the tiny config on CPU; SD 1.5 on CUDA.

Tiny (always): the offline tiny backbone at `model.resolution` 256, batch 2, on a synthetic IDZoom version
(`magicid.training.synthetic`), MLflow off, no checkpoints but the last, no validation loss, condition dropout
as configured; the first steps are warm-up and not timed.
SD 1.5 (when a CUDA device and a diffusers SD 1.5 folder are present: `--backbone PATH` or `MAGICID_SD15_PATH`):
the same loop at 512 px, fp16 mixed precision, batch 2.

Prints `name: value` lines: `train_steps_per_s`, `train_peak_rss_mb`, and `train_sd15_steps_per_s`,
`train_sd15_peak_vram_mb` (or `train_sd15: skipped (...)`).
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


def run(workdir: Path, overrides: list[str], steps: int, warmup: int, image_side: int):
    root = write_synthetic_idzoom(
        workdir / "idzoom",
        n_images=8,
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
    result = train(params, root, progress=False, track=False)
    return timed_steps_per_s(result, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps (under a minute)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--backbone", default=os.environ.get("MAGICID_SD15_PATH"), help="SD 1.5 diffusers folder"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps, warmup = (5, 1) if args.quick else (30, 5)

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
    print(f"train_peak_rss_mb: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}")

    if not torch.cuda.is_available():
        print("train_sd15: skipped (no CUDA device)")
        return
    if not args.backbone or not Path(args.backbone).is_dir():
        print("train_sd15: skipped (no SD 1.5 folder: pass --backbone PATH or set MAGICID_SD15_PATH)")
        return
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        rate = run(
            Path(tmp),
            [
                f"model.backbone={args.backbone}",
                "model.device=cuda",
                "model.resolution=512",
                "train.mixed_precision=fp16",
                "model.id_crop_size=224",
            ],
            steps,
            warmup,
            512,
        )
    print(f"train_sd15_steps_per_s: {rate:.3f}")
    print(f"train_sd15_peak_vram_mb: {torch.cuda.max_memory_allocated() / 2**20:.1f}")


if __name__ == "__main__":
    main()
