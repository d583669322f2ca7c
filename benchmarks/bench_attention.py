"""MGMICA attention cost at SD 1.5 shapes, against diffusers' stock and masked IP-Adapter processors.

One cross-attention layer at SD 1.5's highest attention resolution: 64x64 latent tokens of width 320, 8 heads,
77 text tokens of width 768, 4 ID tokens per identity, classifier-free-guidance batch 2; all faces together cover
10% of the 512x512 image. At 1, 2, 4 and 8 identities it times
- stock: `AttnProcessor2_0` (text only),
- mgmica: `MGMICAAttnProcessor` (text + masked identities, gather -> attend -> scatter),
- ipadapter_masked: `IPAdapterAttnProcessor2_0` with one adapter, one image per identity and `ip_adapter_masks`
  prepared by `IPAdapterMaskProcessor`.
Calls are interleaved (stock, mgmica, ipadapter, stock, ...), repeated >= 30 times after a warm-up; figures are
medians in ms at a fixed thread count. Targets: `mgmica_vs_stock_4ids` <= 1.15, `mgmica_vs_ipadapter_masked_4ids`
<= 0.5. Prints `name: value` lines only.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0

from magicid.models.mgmica import MGMICAAttnProcessor

IMAGE, LATENT, WIDTH, HEADS, TEXT_WIDTH, TEXT_TOKENS, ID_TOKENS, BATCH = 512, 64, 320, 8, 768, 77, 4, 2
FACE_FRACTION = 0.10
ID_COUNTS = (1, 2, 4, 8)


def face_masks(n: int, size: int = IMAGE, fraction: float = FACE_FRACTION) -> np.ndarray:
    """n non-overlapping square faces (side a multiple of 8 px) covering `fraction` of the image: (n, size, size)."""
    side = int(round(math.sqrt(fraction * size * size / n) / 8)) * 8
    cols = math.ceil(math.sqrt(n))
    gap = (size - cols * side) // (cols + 1)
    masks = np.zeros((n, size, size), np.float32)
    for i in range(n):
        row, col = divmod(i, cols)
        y0, x0 = gap + row * (side + gap), gap + col * (side + gap)
        masks[i, y0 : y0 + side, x0 : x0 + side] = 1.0
    return masks


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="30 repetitions, 2 warm-ups (under a minute)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (fixed for the run)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 60; --quick 30; >= 30)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reps = max(30, args.reps or (30 if args.quick else 60))
    warmup = 2 if args.quick else 5

    torch.manual_seed(0)
    attn = Attention(
        query_dim=WIDTH, cross_attention_dim=TEXT_WIDTH, heads=HEADS, dim_head=WIDTH // HEADS, out_bias=True
    ).eval()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(BATCH, LATENT * LATENT, WIDTH, generator=g)
    text = torch.randn(BATCH, TEXT_TOKENS, TEXT_WIDTH, generator=g)
    stock = AttnProcessor2_0()
    mask_processor = IPAdapterMaskProcessor()

    calls: dict[str, object] = {"stock": lambda: stock(attn, hidden, text)}
    for n in ID_COUNTS:
        tokens = torch.randn(BATCH, n, ID_TOKENS, TEXT_WIDTH, generator=g)
        masks = face_masks(n)
        mgmica = MGMICAAttnProcessor(WIDTH, TEXT_WIDTH).eval()
        mgmica.set_identities(tokens, torch.from_numpy(masks)[None], latent_size=(LATENT, LATENT))
        calls[f"mgmica_{n}ids"] = lambda p=mgmica: p(attn, hidden, text)

        ip = IPAdapterAttnProcessor2_0(WIDTH, TEXT_WIDTH, num_tokens=(ID_TOKENS,), scale=1.0).eval()
        pil_masks = [PIL.Image.fromarray((m * 255).astype(np.uint8)) for m in masks]
        ip_masks = mask_processor.preprocess(pil_masks, height=IMAGE, width=IMAGE)  # (n, 1, H, W)
        ip_masks = [ip_masks.reshape(1, n, IMAGE, IMAGE)]
        calls[f"ipadapter_masked_{n}ids"] = lambda p=ip, t=tokens, m=ip_masks: p(
            attn, hidden, encoder_hidden_states=(text, [t]), ip_adapter_masks=m
        )

    order = ["stock"] + [f"{kind}_{n}ids" for n in ID_COUNTS for kind in ("mgmica", "ipadapter_masked")]
    for _ in range(warmup):
        for name in order:
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in order}
    for _ in range(reps):  # interleaved: stock, mgmica, ipadapter, ..., stock, mgmica, ...
        for n in ID_COUNTS:
            for name in ("stock", f"mgmica_{n}ids", f"ipadapter_masked_{n}ids"):
                times[name].append(timed(calls[name]))

    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"threads: {args.threads}")
    print(f"repetitions: {reps}")
    print(f"face_fraction: {FACE_FRACTION}")
    print(f"stock_ms: {median['stock']:.3f}")
    for n in ID_COUNTS:
        mg, ip = median[f"mgmica_{n}ids"], median[f"ipadapter_masked_{n}ids"]
        print(f"mgmica_{n}ids_ms: {mg:.3f}")
        print(f"ipadapter_masked_{n}ids_ms: {ip:.3f}")
        print(f"mgmica_vs_stock_{n}ids: {mg / median['stock']:.3f}")
        print(f"mgmica_vs_ipadapter_masked_{n}ids: {mg / ip:.3f}")
        print(f"ipadapter_masked_vs_stock_{n}ids: {ip / median['stock']:.3f}")


if __name__ == "__main__":
    main()
