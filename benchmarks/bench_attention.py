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
<= 0.5. MGMICA runs on its default path (`auto`, models/mgmica.py).
Then MGMICA's two paths (gather -> attend -> scatter, dense masked) on the same layer with faces covering 5, 15,
40 and 80 % of the image at 1, 2, 4 and 8 identities, paired with the stock call (`mgmica_dense_vs_stock_4ids_area40`,
`mgmica_gather_vs_stock_...`, `mgmica_dense_vs_gather_...`, `mgmica_load_...`) and the crossover that sets
`model.mgmica_dense_above` (`mgmica_dense_above_measured`).
Then a whole UNet call, CFG batch 2, with MGMICA at 4 identities against the same UNet with stock processors
(`unet_mgmica_vs_stock_4ids` on the default path, `unet_mgmica_{gather,dense}_vs_stock_4ids` on each): the tiny
UNet at 256 px on CPU, SD 1.5's UNet shape at 512 px on CUDA.

`--device cuda` (default dtype bfloat16): the same figures with a `gpu_` prefix, every call synchronised.
Targets on one GPU (issue 25): `gpu_mgmica_vs_stock_4ids` <= 1.3, `gpu_unet_mgmica_vs_stock_4ids` <= 1.05.
Prints `name: value` lines only.
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
AREAS = (0.05, 0.15, 0.40, 0.80)  # the path sweep: all faces together cover this fraction of the image
PATHS = ("gather", "dense")


def face_masks(n: int, size: int = IMAGE, fraction: float = FACE_FRACTION) -> np.ndarray:
    """n non-overlapping faces covering `fraction` of the image together: (n, size, size).

    The image is cut into a grid of ceil(sqrt(n)) columns and as many rows as needed; face i is a rectangle of the
    cell's aspect centred in cell i (sides multiples of 8 px), so up to 80 % of the image fits at any n.
    """
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cell_h, cell_w = size // rows, size // cols
    shrink = math.sqrt(fraction * size * size / n / (cell_h * cell_w))
    if shrink > 1:
        raise ValueError(f"{n} faces covering {fraction:.0%} of the image do not fit in {rows}x{cols} cells")
    face_h, face_w = (max(8, int(round(side * shrink / 8)) * 8) for side in (cell_h, cell_w))
    masks = np.zeros((n, size, size), np.float32)
    for i in range(n):
        row, col = divmod(i, cols)
        y0, x0 = row * cell_h + (cell_h - face_h) // 2, col * cell_w + (cell_w - face_w) // 2
        masks[i, y0 : y0 + face_h, x0 : x0 + face_w] = 1.0
    return masks


def timed(fn, device: torch.device) -> float:
    """Wall ms of one call; on CUDA synchronised before and after (the kernels' time, not their launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000


def path_figures(
    attn: Attention,
    hidden: torch.Tensor,
    text: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    reps: int,
    warmup: int,
) -> dict[str, float]:
    """MGMICA's two paths against the stock processor on the same layer, faces covering `AREAS` of the image at
    `ID_COUNTS` identities: per (identities, area) the paired-ratio medians `mgmica_{path}_vs_stock_{n}ids_area{pct}`
    and `mgmica_dense_vs_gather_...`, the load `auto` decides on (`mgmica_load_...`: the largest mask's share of
    the masked band at this 64x64 grid), and `mgmica_dense_above_measured`: the smallest load from which on the
    dense path was faster in every configuration (what `model.mgmica_dense_above` should be on this machine; nan
    when the dense path lost at the highest load)."""
    stock = AttnProcessor2_0()
    g = torch.Generator(device).manual_seed(1)
    configs = []
    for area in AREAS:
        for n in ID_COUNTS:
            tokens = torch.randn(BATCH, n, ID_TOKENS, TEXT_WIDTH, generator=g, device=device, dtype=dtype)
            masks = torch.from_numpy(face_masks(n, fraction=area))[None].to(device)
            processors = {}
            for path in PATHS:
                torch.manual_seed(0)  # the same ID projections for both paths
                proc = MGMICAAttnProcessor(WIDTH, TEXT_WIDTH).eval().to(device=device, dtype=dtype)
                proc.context.set_path(path)
                proc.set_identities(tokens, masks, latent_size=(LATENT, LATENT))
                processors[path] = proc
            load = processors["gather"].context.pairs((LATENT, LATENT), BATCH, device).load
            configs.append((f"{n}ids_area{round(area * 100)}", load, processors))

    def call(proc):
        return lambda: proc(attn, hidden, text)

    def run_stock():
        return stock(attn, hidden, text)

    for _ in range(warmup):
        for _, _, processors in configs:
            run_stock()
            for proc in processors.values():
                proc(attn, hidden, text)
    ratios: dict[str, list[float]] = {}
    for _ in range(reps):  # interleaved and paired: stock, gather, dense for one configuration, then the next
        for name, _, processors in configs:
            ms = {"stock": timed(run_stock, device)}
            for path, proc in processors.items():
                ms[path] = timed(call(proc), device)
            for path in PATHS:
                ratios.setdefault(f"mgmica_{path}_vs_stock_{name}", []).append(ms[path] / ms["stock"])
            ratios.setdefault(f"mgmica_dense_vs_gather_{name}", []).append(ms["dense"] / ms["gather"])
    figures = {key: statistics.median(values) for key, values in ratios.items()}
    for name, load, _ in configs:
        figures[f"mgmica_load_{name}"] = load
    figures["mgmica_dense_above_measured"] = dense_above_measured(
        [(load, figures[f"mgmica_dense_vs_gather_{name}"]) for name, load, _ in configs]
    )
    return figures


def dense_above_measured(load_and_ratio: list[tuple[float, float]]) -> float:
    """The smallest load from which on the dense path was faster (dense / gather < 1) in every configuration with
    that load or more; nan when it was not faster at the highest load.

    Args:
        load_and_ratio: (load, dense / gather time) of each measured configuration.
    """
    crossover = math.nan
    for load, _ in sorted(load_and_ratio, reverse=True):  # walk down while dense wins at and above this load
        if any(ratio >= 1 for other, ratio in load_and_ratio if other >= load):
            break
        crossover = load
    return crossover


def unet_figures(device: torch.device, dtype: torch.dtype, reps: int, warmup: int) -> dict[str, float]:
    """A whole UNet call (CFG batch 2) with MGMICA at 4 identities vs the same UNet with stock processors.

    CPU: the tiny backbone's UNet at 256 px (32 x 32 latents); CUDA: SD 1.5's UNet shape (random weights) at
    512 px (64 x 64 latents). Interleaved calls; times are medians in ms, ratios medians of per-repetition pairs.
    MGMICA runs on `model.mgmica_path` (auto: `unet_mgmica_vs_stock_4ids`) and on each path forced
    (`unet_mgmica_gather_vs_stock_4ids`, `unet_mgmica_dense_vs_stock_4ids`).
    """
    from magicid.config import load_params
    from magicid.models.adapter import MagicIDAdapter
    from magicid.models.mgmica import install_mgmica, mgmica_context

    if device.type == "cuda":
        from magicid.models.sd15_shapes import build_sd15_shaped_backbone

        backbone, latent = build_sd15_shaped_backbone(0, device, dtype), 64
    else:
        from magicid.models.tiny import build_tiny_backbone

        backbone, latent = build_tiny_backbone(), 32
    unet = backbone.unet
    stock_processors = unet.attn_processors
    params = load_params(None, [])
    adapter = MagicIDAdapter.create(backbone, params)  # installs MGMICA on the UNet, model.mgmica_path (auto)
    installed = {"auto": (unet.attn_processors, mgmica_context(unet))}
    for path in PATHS:  # the same initial ID projections (copies of to_k / to_v), one context a path
        install_mgmica(unet, scale=params.model.id_scale, path=path)
        installed[path] = (unet.attn_processors, mgmica_context(unet))
    g = torch.Generator(device).manual_seed(0)
    width = backbone.cross_attention_dim
    latents = torch.randn(BATCH, 4, latent, latent, generator=g, device=device, dtype=dtype)
    text = torch.randn(BATCH, TEXT_TOKENS, width, generator=g, device=device, dtype=dtype)
    tokens = torch.randn(BATCH, 4, params.model.n_id_tokens, width, generator=g, device=device, dtype=dtype)
    masks = torch.from_numpy(face_masks(4, size=latent * 8))[None].to(device)
    t = torch.tensor(500, device=device)

    def stock() -> None:
        unet.set_attn_processor(dict(stock_processors))
        unet(latents, t, text)

    def mgmica(path: str):
        processors, context = installed[path]

        def run() -> None:
            unet.set_attn_processor(dict(processors))
            context.set(tokens, masks, (latent, latent))  # the same tensors: the per-grid plans are kept
            unet(latents, t, text)
            context.set(None, None)

        return run

    runs = {"stock": stock, **{path: mgmica(path) for path in installed}}
    times: dict[str, list[float]] = {name: [] for name in runs}
    ratios: dict[str, list[float]] = {path: [] for path in installed}
    for i in range(warmup + reps):  # interleaved; each path's ratio paired with the stock call just before it
        ms = {name: timed(fn, device) for name, fn in runs.items()}
        if i >= warmup:
            for name in runs:
                times[name].append(ms[name])
            for path in installed:
                ratios[path].append(ms[path] / ms["stock"])
    adapter.attach(unet)
    del adapter
    figures = {
        "unet_stock_ms": statistics.median(times["stock"]),
        "unet_mgmica_4ids_ms": statistics.median(times["auto"]),
        "unet_mgmica_vs_stock_4ids": statistics.median(ratios["auto"]),
    }
    for path in PATHS:
        figures[f"unet_mgmica_{path}_vs_stock_4ids"] = statistics.median(ratios[path])
    return figures


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="30 repetitions (the path sweep 10), 2 warm-ups")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (fixed for the run)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 60; --quick 30; >= 30)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (figures get a gpu_ prefix on CUDA)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, "
                        "bfloat16 on CUDA)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reps = max(30, args.reps or (30 if args.quick else 60))
    warmup = 2 if args.quick else 5
    from magicid.models.backbone import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = resolve_dtype(dtype_name, device)
    prefix = "gpu_" if device.type == "cuda" else ""

    torch.manual_seed(0)
    attn = (
        Attention(
            query_dim=WIDTH,
            cross_attention_dim=TEXT_WIDTH,
            heads=HEADS,
            dim_head=WIDTH // HEADS,
            out_bias=True,
        )
        .eval()
        .to(device=device, dtype=dtype)
    )
    g = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(BATCH, LATENT * LATENT, WIDTH, generator=g, device=device, dtype=dtype)
    text = torch.randn(BATCH, TEXT_TOKENS, TEXT_WIDTH, generator=g, device=device, dtype=dtype)
    stock = AttnProcessor2_0()
    mask_processor = IPAdapterMaskProcessor()

    calls: dict[str, object] = {"stock": lambda: stock(attn, hidden, text)}
    for n in ID_COUNTS:
        tokens = torch.randn(BATCH, n, ID_TOKENS, TEXT_WIDTH, generator=g, device=device, dtype=dtype)
        masks = face_masks(n)
        mgmica = MGMICAAttnProcessor(WIDTH, TEXT_WIDTH).eval().to(device=device, dtype=dtype)
        mask_tensor = torch.from_numpy(masks)[None].to(device)
        mgmica.set_identities(tokens, mask_tensor, latent_size=(LATENT, LATENT))
        calls[f"mgmica_{n}ids"] = lambda p=mgmica: p(attn, hidden, text)

        ip = IPAdapterAttnProcessor2_0(WIDTH, TEXT_WIDTH, num_tokens=(ID_TOKENS,), scale=1.0).eval()
        ip = ip.to(device=device, dtype=dtype)
        pil_masks = [PIL.Image.fromarray((m * 255).astype(np.uint8)) for m in masks]
        ip_masks = mask_processor.preprocess(pil_masks, height=IMAGE, width=IMAGE)  # (n, 1, H, W)
        ip_masks = [ip_masks.reshape(1, n, IMAGE, IMAGE).to(device)]
        calls[f"ipadapter_masked_{n}ids"] = lambda p=ip, t=tokens, m=ip_masks: p(
            attn, hidden, encoder_hidden_states=(text, [t]), ip_adapter_masks=m
        )

    order = ["stock"] + [f"{kind}_{n}ids" for n in ID_COUNTS for kind in ("mgmica", "ipadapter_masked")]
    for _ in range(warmup):
        for name in order:
            calls[name]()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in order}
    for _ in range(reps):  # interleaved: stock, mgmica, ipadapter, ..., stock, mgmica, ...
        for n in ID_COUNTS:
            for name in ("stock", f"mgmica_{n}ids", f"ipadapter_masked_{n}ids"):
                times[name].append(timed(calls[name], device))

    median = {name: statistics.median(values) for name, values in times.items()}
    figures: dict[str, float] = {"stock_ms": median["stock"]}
    for n in ID_COUNTS:
        mg, ip = median[f"mgmica_{n}ids"], median[f"ipadapter_masked_{n}ids"]
        figures[f"mgmica_{n}ids_ms"] = mg
        figures[f"ipadapter_masked_{n}ids_ms"] = ip
        figures[f"mgmica_vs_stock_{n}ids"] = mg / median["stock"]
        figures[f"mgmica_vs_ipadapter_masked_{n}ids"] = mg / ip
        figures[f"ipadapter_masked_vs_stock_{n}ids"] = ip / median["stock"]
    print(f"{prefix}device: {device}")
    print(f"{prefix}dtype: {dtype_name}")
    print(f"{prefix}threads: {args.threads}")
    print(f"{prefix}repetitions: {reps}")
    print(f"{prefix}face_fraction: {FACE_FRACTION}")

    def report(
        figures: dict[str, float],
    ) -> None:  # each part as it ends: a time limit keeps what was measured
        for key, value in figures.items():
            print(f"{prefix}{key}: {value:.3f}", flush=True)

    report(figures)
    # The sweep is 48 configurations: --quick takes 10 pairs of each (a minute on one CPU thread).
    report(path_figures(attn, hidden, text, device, dtype, 10 if args.quick else reps, warmup))
    report(unet_figures(device, dtype, max(10, reps // 3), warmup))


if __name__ == "__main__":
    main()
