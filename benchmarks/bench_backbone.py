"""Tiny backbone speed: one UNet call at 256x256 (32x32 latents), batch 1 and a CFG batch of 2.

Prints `name: value` lines. Target: `tiny_unet_call_ms_256` <= 30 on this machine's 2 CPU cores.
`--device cuda`: the same figures with a `gpu_` prefix (synchronised), plus SD 1.5's UNet shape (random weights,
`magicid.models.sd15_shapes`) at 512 px in `--dtype` (default bfloat16): `gpu_sd15_build_s`,
`gpu_sd15_unet_call_ms_512_cfg_batch2`.
"""

from __future__ import annotations

import argparse
import time

import torch
from timing import median_seconds

from magicid.models.tiny import build_tiny_backbone


def median_ms(fn, repeats: int, warmup: int = 3, device: torch.device | None = None) -> float:
    if device is None or device.type != "cuda":
        return median_seconds(fn, repeats, warmup) * 1000

    def synchronised():
        fn()
        torch.cuda.synchronize(device)

    torch.cuda.synchronize(device)
    return median_seconds(synchronised, repeats, warmup) * 1000


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (under a minute)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--dtype", default="bfloat16", help="the SD 1.5-shaped UNet's dtype on CUDA")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 10 if args.quick else 50
    from magicid.models.backbone import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    prefix = "gpu_" if device.type == "cuda" else ""

    start = time.perf_counter()
    backbone = build_tiny_backbone().to(device=device)
    build_s = time.perf_counter() - start
    unet = backbone.unet
    width = backbone.cross_attention_dim
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    text = torch.randn(2, 77, width, generator=torch.Generator().manual_seed(1)).to(device)
    t = torch.tensor(500, device=device)

    print(f"{prefix}tiny_backbone_build_s: {build_s:.3f}")
    print(f"{prefix}tiny_unet_params_m: {sum(p.numel() for p in unet.parameters()) / 1e6:.3f}")
    one = median_ms(lambda: unet(latents[:1], t, text[:1]), repeats, device=device)
    print(f"{prefix}tiny_unet_call_ms_256: {one:.2f}")
    cfg = median_ms(lambda: unet(latents, t, text), repeats, device=device)
    print(f"{prefix}tiny_unet_call_ms_256_cfg_batch2: {cfg:.2f}")
    print(f"{prefix}tiny_vae_scaling_factor: {backbone.vae.config.scaling_factor:.4f}")
    if device.type != "cuda":
        return
    from magicid.models.sd15_shapes import build_sd15_shaped_backbone

    dtype = resolve_dtype(args.dtype, device)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    sd15 = build_sd15_shaped_backbone(0, device, dtype)
    torch.cuda.synchronize(device)
    print(f"gpu_sd15_build_s: {time.perf_counter() - start:.3f}")
    print(f"gpu_sd15_unet_params_m: {sum(p.numel() for p in sd15.unet.parameters()) / 1e6:.1f}")
    latents = torch.randn(2, 4, 64, 64, device=device, dtype=dtype)
    text = torch.randn(2, 77, 768, device=device, dtype=dtype)
    call = median_ms(lambda: sd15.unet(latents, t, text), repeats, device=device)
    print(f"gpu_sd15_unet_call_ms_512_cfg_batch2: {call:.2f}")


if __name__ == "__main__":
    main()
