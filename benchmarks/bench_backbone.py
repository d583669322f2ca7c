"""Tiny backbone speed: one UNet call at 256x256 (32x32 latents), batch 1 and a CFG batch of 2.

Prints `name: value` lines. Target: `tiny_unet_call_ms_256` <= 30 on this machine's 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time

import torch
from timing import median_seconds

from magicid.models.tiny import build_tiny_backbone


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    return median_seconds(fn, repeats, warmup) * 1000


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (under a minute)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 10 if args.quick else 50

    start = time.perf_counter()
    backbone = build_tiny_backbone()
    build_s = time.perf_counter() - start
    unet = backbone.unet
    width = backbone.cross_attention_dim
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, width, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(500)

    print(f"tiny_backbone_build_s: {build_s:.3f}")
    print(f"tiny_unet_params_m: {sum(p.numel() for p in unet.parameters()) / 1e6:.3f}")
    print(f"tiny_unet_call_ms_256: {median_ms(lambda: unet(latents[:1], t, text[:1]), repeats):.2f}")
    print(f"tiny_unet_call_ms_256_cfg_batch2: {median_ms(lambda: unet(latents, t, text), repeats):.2f}")
    print(f"tiny_vae_scaling_factor: {backbone.vae.config.scaling_factor:.4f}")


if __name__ == "__main__":
    main()
