"""MagicIDPipeline against diffusers' StableDiffusionPipeline on the same backbone, and the speed levers of issue 25.

MagicID: the MMF ControlNet (a face-box layout) + MGMICA with 2 identities, classifier-free guidance; stock:
`StableDiffusionPipeline` over the same UNet (stock processors), VAE, text encoder and scheduler, same prompt,
steps, guidance and seed. Calls alternate (MagicID, stock, ...), medians after a warm-up run each.

Levers, each timed against the default MagicID call in alternation, with how far its image moves (max and mean
absolute difference of the uint8 images):
- `controlnet_once`: `model.controlnet_cfg=conditional` (the ControlNet once a step for both CFG halves);
- `channels_last`: UNet, VAE and ControlNet in channels_last memory format;
- `compile` (with `--compile unet|all`, `model.compile`): torch.compile of the UNet and ControlNet (`all`: and the
  VAE). The first compiled call is timed on its own (`compile_first_call_s`, compilation included); then compiled
  and eager calls alternate (the compiled graphs kept, switched per call), and the compiled MagicID call is also
  timed against the stock pipeline over the same compiled UNet (`compiled_magicid_vs_compiled_stock`) and the
  eager stock one (`compiled_magicid_vs_stock`).

CPU (default): the tiny backbone at 256 px, 10 steps, float32. `--device cuda`: SD 1.5's shapes with random weights
(`magicid.models.sd15_shapes`) at 512 px, 30 steps, bfloat16 by default, synchronised timing, peak memory; every
name gets a `gpu_` prefix. Target on one GPU (issue 25): `gpu_magicid_vs_stock_sd15_512` <= 1.5.
Prints `name: value` lines only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from magicid.config import load_params
from magicid.models.adapter import MagicIDAdapter
from magicid.models.backbone import resolve_device, resolve_dtype
from magicid.models.compilation import COMPILE_SETTINGS, compile_denoiser
from magicid.models.mgmica import mgmica_context
from magicid.models.pipeline import MagicIDPipeline

PROMPT = "a photo of two people at the beach"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_s(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _perturb(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Random weights on the fresh adapter's zero-initialised ControlNet outputs, so its residuals count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_((torch.randn(p.shape, generator=g) * std).to(p.device, p.dtype))


def compile_figures(
    setting, backbone, adapter, magicid, baseline, out, pairs, device, label
) -> dict[str, float]:
    """The `compile` lever: compile (timed once), then compiled vs eager MagicID calls in alternation, and the
    compiled MagicID call against the stock pipeline compiled and eager. The images of the eager default call are
    in `out["magicid"]`."""
    vae = backbone.vae
    compiled = compile_denoiser(setting, "model.compile", backbone.unet, adapter.controlnet, vae)
    named = {"unet": backbone.unet, "controlnet": adapter.controlnet, "vae.encoder": vae.encoder,
             "vae.decoder": vae.decoder}  # fmt: skip
    modules = [named[name] for name in compiled]
    graphs = [module._compiled_call_impl for module in modules]

    def use_compiled(on: bool) -> None:
        # The compiled callables stay built; switching them off runs the modules eager (no recompilation).
        for module, graph in zip(modules, graphs, strict=True):
            module._compiled_call_impl = graph if on else None

    figures = {"compile_first_call_s_" + label: timed_s(lambda: magicid("compile"), device)}
    baseline()  # the stock pipeline's own compilation (stock processors: another graph), untimed
    ratios, vs_stock, vs_compiled_stock = [], [], []
    for _ in range(pairs):
        use_compiled(False)
        eager_s = timed_s(magicid, device)
        stock_s = timed_s(baseline, device)
        use_compiled(True)
        compiled_s = timed_s(lambda: magicid("compile"), device)
        compiled_stock_s = timed_s(baseline, device)
        ratios.append(compiled_s / eager_s)
        vs_stock.append(compiled_s / stock_s)
        vs_compiled_stock.append(compiled_s / compiled_stock_s)
    use_compiled(False)
    figures[f"compile_vs_default_{label}"] = statistics.median(ratios)
    figures[f"compiled_magicid_vs_stock_{label}"] = statistics.median(vs_stock)
    figures[f"compiled_magicid_vs_compiled_stock_{label}"] = statistics.median(vs_compiled_stock)
    difference = np.abs(out["compile"].astype(np.int16) - out["magicid"].astype(np.int16))
    figures[f"compile_image_max_abs_diff_{label}"] = float(difference.max())
    figures[f"compile_image_mean_abs_diff_{label}"] = float(difference.mean())
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 timed pairs instead of 7")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--compile", default="none", choices=COMPILE_SETTINGS,
                        help="also time torch.compile (model.compile): unet = UNet + ControlNet, all = + VAE")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = resolve_dtype(dtype_name, device)
    gpu = device.type == "cuda"
    prefix, label = ("gpu_", "sd15_512") if gpu else ("", "tiny_256")
    side, steps = (512, 30) if gpu else (256, 10)
    pairs = 3 if args.quick else 7

    params = load_params(
        None, [f"model.resolution={side}", f"model.device={device.type}", f"model.dtype={dtype_name}"]
    )
    if gpu:
        from magicid.models.sd15_shapes import build_sd15_shaped_backbone

        backbone = build_sd15_shaped_backbone(params.seed, device, dtype)
    else:
        from magicid.models.backbone import load_backbone

        backbone = load_backbone(params)
    stock_processors = backbone.unet.attn_processors
    stock = backbone.stable_diffusion_pipeline()
    stock.set_progress_bar_config(disable=True)
    adapter = MagicIDAdapter.create(backbone, params).eval()
    _perturb(adapter.controlnet, 1)
    mgmica_processors = backbone.unet.attn_processors
    context = mgmica_context(backbone.unet)
    pipe = MagicIDPipeline.from_backbone(backbone, adapter, params)
    pipe.set_progress_bar_config(disable=True)
    g = np.random.default_rng(0)
    identities = [
        (v / np.linalg.norm(v)).astype(np.float32) for v in g.standard_normal((2, params.model.id_embed_dim))
    ]
    boxes = [
        (0.12 * side, 0.2 * side, 0.4 * side, 0.5 * side),
        (0.6 * side, 0.2 * side, 0.88 * side, 0.5 * side),
    ]
    common = dict(
        num_inference_steps=steps, guidance_scale=params.model.guidance_scale, height=side, width=side
    )
    out: dict[str, np.ndarray] = {}

    def magicid(name: str = "magicid") -> None:
        backbone.unet.set_attn_processor(dict(mgmica_processors))
        image = pipe(PROMPT, identities=identities, layout=boxes, generator=torch.Generator().manual_seed(0),
                     output_type="np", **common).images[0]  # fmt: skip
        out[name] = (image * 255).round().astype(np.uint8)

    def baseline() -> None:
        context.set(None, None)
        backbone.unet.set_attn_processor(dict(stock_processors))
        stock(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **common)

    lever_modules = (backbone.unet, backbone.vae, adapter.controlnet)

    def switch(name: str, on: bool) -> None:
        """Turn a lever on or off (outside the timed calls: converting the weights' layout is a one-off cost)."""
        if name == "controlnet_once":
            pipe.register_to_config(controlnet_cfg="conditional" if on else "both")
        else:  # channels_last
            for module in lever_modules:
                module.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    figures: dict[str, float] = {}
    with torch.inference_mode():
        magicid()  # warm-up (and the reference image)
        baseline()
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        times: dict[str, list[float]] = {"magicid": [], "stock": []}
        for _ in range(pairs):
            times["magicid"].append(timed_s(magicid, device))
            times["stock"].append(timed_s(baseline, device))
        if gpu:
            figures[f"peak_gib_{label}"] = torch.cuda.max_memory_allocated(device) / 2**30
        figures[f"magicid_s_{label}"] = statistics.median(times["magicid"])
        figures[f"stock_s_{label}"] = statistics.median(times["stock"])
        figures[f"magicid_vs_stock_{label}"] = statistics.median(
            a / b for a, b in zip(times["magicid"], times["stock"], strict=True)
        )
        reference = out["magicid"]
        for name in ("controlnet_once", "channels_last"):
            switch(name, True)
            magicid(name)  # warm-up
            ratios = []
            for _ in range(pairs):
                switch(name, False)
                base_s = timed_s(magicid, device)
                switch(name, True)
                ratios.append(timed_s(lambda n=name: magicid(n), device) / base_s)
            switch(name, False)
            figures[f"{name}_vs_default_{label}"] = statistics.median(ratios)
            difference = np.abs(out[name].astype(np.int16) - reference.astype(np.int16))
            figures[f"{name}_image_max_abs_diff_{label}"] = float(difference.max())
            figures[f"{name}_image_mean_abs_diff_{label}"] = float(difference.mean())
        if args.compile != "none":
            figures.update(
                compile_figures(args.compile, backbone, adapter, magicid, baseline, out, pairs, device, label)
            )
    print(f"{prefix}dtype: {dtype_name}")
    print(f"{prefix}steps: {steps}")
    for key, value in figures.items():
        print(f"{prefix}{key}: {value:.4g}")


if __name__ == "__main__":
    main()
