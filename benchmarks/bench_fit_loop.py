"""The backbone fit's loop (`magicid fit-backbone`, phase 1 of `magicid fit-world`): steps per second and what a step
spends outside forward/backward/optimizer, on CPU or `--device cuda`.

The fit runs `BackboneFitter` (the real loop: per-step generator on the device, sampling, augmentation, the
latent bank, logging every `fit.log_every` steps) on a synthetic IDZoom version at 256 px, VAE at batch 8 and
the UNet at batch 4 and 32 (issue 25: the tiny fit ran at 13 steps/s at batch 4 and at batch 32 alike on a GPU, so
the loop, not the arithmetic, set its pace). Beside each UNet figure, the same forward/backward/optimizer step on
one fixed batch with nothing else around it (`bare`): the loop's cost is their ratio. The first steps are
warm-up and not timed (mean step times over the rest; medians for the overhead).

Prints `name: value` lines (with a `gpu_` prefix on CUDA): `fit_vae_steps_per_s`, `fit_unet_steps_per_s_b4`,
`fit_unet_steps_per_s_b32`, `fit_unet_bare_steps_per_s_b32`, `fit_loop_vs_bare_b32` (loop step time / bare step
time), `fit_step_overhead_ms` (median host time of a UNet step outside forward/backward/optimizer, batch 32).

`--compile unet [unet_cudagraphs]` (`fit.compile`) runs the batch-32 loop once more per setting with the UNet
compiled: `fit_compile_first_step_s` (the first UNet step, compilation included), `fit_unet_compiled_steps_per_s_b32`,
`fit_compiled_vs_eager_b32` (compiled / eager step time; the loops run one after the other, not interleaved) and
`fit_compiled_loss_max_abs_diff` (largest difference of the logged UNet losses: float reordering only); with
`unet_cudagraphs` (CUDA only) the same names with `cudagraphs` for `compile` / `compiled`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from magicid.config import load_params
from magicid.training.fit import BackboneFitter, _autocast, phase_generator, unet_loss
from magicid.training.fit_data import load_fit_data
from magicid.training.synthetic import write_synthetic_idzoom
from magicid.training.tracking import RunTracker


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fit_loop(
    data_dir: Path,
    workdir: Path,
    device: str,
    dtype: str,
    unet_batch: int,
    steps: int,
    warmup: int,
    compile_setting: str = "none",
):
    """Run the fitter for `steps` VAE and `steps` UNet steps; returns (fitter, VAE and UNet mean step seconds)."""
    params = load_params(
        None, [f"model.device={device}", f"model.dtype={dtype}", "fit.checkpoint_every=1000000"]
    )
    fit = params.fit.model_copy(
        update={"vae_steps": steps, "unet_steps": steps, "unet_batch": unet_batch, "compile": compile_setting}
    )
    data = load_fit_data(data_dir, fit)
    tracker = RunTracker(params, enabled=False)
    fitter = BackboneFitter(
        params, fit, data, "bench", workdir / f"state{unet_batch}{compile_setting}", tracker, progress=False
    )
    fitter.run()
    _sync(fitter.device)
    # Means of the host's step times: on CUDA a step's host time is its launch time, except at the steps that read
    # the losses (every fit.log_every), which wait for the queue; summed over steps, they are the wall time.
    vae = statistics.fmean(fitter.timer.step_s["vae"][warmup:])
    unet = statistics.fmean(fitter.timer.step_s["unet"][warmup:])
    return fitter, vae, unet


def bare_unet_step_s(fitter: BackboneFitter, batch: int, steps: int, warmup: int) -> float:
    """Median seconds of forward/backward/optimizer (+ EMA) on one fixed batch (synchronised on CUDA)."""
    device, backbone, fit = fitter.device, fitter.backbone, fitter.fit
    generator = phase_generator(0, "unet", 0, device)
    latents = torch.randn(batch, 4, fit.resolution // 8, fit.resolution // 8, device=device)
    text = fitter.text_states[torch.zeros(batch, dtype=torch.long, device=device)]
    backbone.unet.train().requires_grad_(True)
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        with _autocast(device, fitter.autocast_dtype):
            loss = unet_loss(backbone, latents, text, generator, fit.min_snr_gamma, fit.offset_noise)
        fitter._optimizer_step(loss, backbone.unet, fitter.unet_opt, fitter.unet_sched)
        if fitter.ema is not None:  # the EMA update is part of the fit's step, as in the loop
            fitter.ema.step(backbone.unet.parameters())
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps (under a minute on 2 CPU cores)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (model.dtype)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--compile", nargs="*", default=[], choices=("unet", "unet_cudagraphs"),
                        help="also run the batch-32 loop with the UNet compiled, once per fit.compile setting")  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, warmup = (8, 3) if args.quick else (40, 10)
    prefix = "gpu_" if args.device.startswith("cuda") else ""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data_dir = write_synthetic_idzoom(workdir / "idzoom", n_images=8, crop_size=128, sizes=((320, 256),))
        _, vae_s, unet4_s = fit_loop(data_dir, workdir, args.device, args.dtype, 4, steps, warmup)
        fitter, _, unet32_s = fit_loop(data_dir, workdir, args.device, args.dtype, 32, steps, warmup)
        overhead_ms = 1000 * statistics.median(fitter.timer.overhead_s["unet"][warmup:])
        bare_s = bare_unet_step_s(fitter, 32, steps, warmup)
        compiled = {}
        for setting in args.compile:
            compiled_fitter, _, compiled_s = fit_loop(
                data_dir, workdir, args.device, args.dtype, 32, steps, warmup, setting
            )
            losses, compiled_losses = fitter.losses["unet"], compiled_fitter.losses["unet"]
            loss_diff = max(abs(losses[step] - compiled_losses[step]) for step in losses)
            compiled[setting] = (compiled_fitter.timer.step_s["unet"][0], compiled_s, loss_diff)
    print(f"{prefix}fit_vae_steps_per_s: {1 / vae_s:.2f}")
    print(f"{prefix}fit_unet_steps_per_s_b4: {1 / unet4_s:.2f}")
    print(f"{prefix}fit_unet_steps_per_s_b32: {1 / unet32_s:.2f}")
    print(f"{prefix}fit_unet_bare_steps_per_s_b32: {1 / bare_s:.2f}")
    print(f"{prefix}fit_loop_vs_bare_b32: {unet32_s / bare_s:.3f}")
    print(f"{prefix}fit_step_overhead_ms: {overhead_ms:.2f}")
    for setting, (first_s, compiled_s, loss_diff) in compiled.items():
        what, done = ("compile", "compiled") if setting == "unet" else ("cudagraphs", "cudagraphs")
        print(f"{prefix}fit_{what}_first_step_s: {first_s:.1f}")
        print(f"{prefix}fit_unet_{done}_steps_per_s_b32: {1 / compiled_s:.2f}")
        print(f"{prefix}fit_{done}_vs_eager_b32: {compiled_s / unet32_s:.3f}")
        print(f"{prefix}fit_{done}_loss_max_abs_diff: {loss_diff:.2e}")


if __name__ == "__main__":
    main()
