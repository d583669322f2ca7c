"""DIIR against an ADetailer-style baseline: restoring 1, 4 and 8 small faces of one image.

Baseline (what ADetailer does): diffusers' `StableDiffusionInpaintPipeline` with the same 4-channel UNet (it
blends latents with the mask then) and `padding_mask_crop` (crop around the face, zoom to the model size,
paste back over the mask), one call per face, with the same crop-resolution rule (`choose_bucket`), steps,
strength and guidance as DIIR. DIIR: fixed-point DDIM inversion + regeneration with identity (MGMICA) and
landmark (ControlNet) conditioning, all faces batched per resolution bucket.

Faces are composited from scikit-image's astronaut (its face crop, resized to 24-44 px) onto a smooth
background; boxes and landmarks are given (the tiny backbone draws no detectable faces). Both methods keep
the background exact, so the background PSNRs (outside every face's crop box) are a sanity check (inf).

Two configs: `tiny` (the default tiny backbone: call overhead matters, batching wins) and `compute` (a 2x
wider UNet and 512 x 512 crops, where time should follow the UNet-evaluation ratio, also printed as
`unet_sample_evals_ratio_8faces_compute`). Each tiny-config ratio is the median over pairs of runs (DIIR,
then the other method; five pairs, `--quick` one): both runs of a pair see the same machine speed, which
drifts by tens of percent on a shared machine; `..._pair_min` / `..._pair_max` give the pairs' range. The
host's speed is gauged before and after the tiny config (`host_unet_ms_batch4_latent24_start` / `_end`, see
`host_speed_ms`): read the ratios with it. `--quick` also runs the compute config smaller (256 x 256 crops)
under its own names (`..._compute_quick`).

Network evaluations: DIIR runs the MMF ControlNet next to the UNet at every noise evaluation (landmark
conditioning), the baseline none; so `diir_unet_calls` and `unet_sample_evals_ratio_*` count the UNet's and
the ControlNet's evaluations together (`diir_controlnet_calls_*` gives the ControlNet's share).

`--device cuda [--dtype bfloat16]`: 8 faces on SD 1.5's shapes (`magicid.models.sd15_shapes`, random weights) in
`--dtype`, where DIIR's native-size floor puts every face at 512 px and the baseline follows the same rule
(`gpu_diir_vs_adetailer_8faces_sd15`, ...), and the inversion round trip at 512 px in float32
(`gpu_inversion_mse_fixed_point_sd15`), in the half dtype throughout (`..._sd15_bfloat16`) and with only the UNet
in it (`..._sd15_bfloat16_unet_fp32_latents`, what DIIR does).

Prints `name: value` lines only. Targets (CPU, tiny): diir_vs_adetailer_8faces <= 1.5,
diir_batched_vs_sequential_8faces <= 0.6, inversion_mse_fixed_point <= 1e-5.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from timing import median_seconds, paired_seconds

from magicid.config import Params, load_params
from magicid.faces import Face
from magicid.models.adapter import MagicIDAdapter
from magicid.models.backbone import Backbone
from magicid.models.tiny import TinyBackboneConfig, build_tiny_backbone
from magicid.restore.diir import DIIR
from magicid.restore.inversion import round_trip_error
from magicid.restore.noise import noise_function
from magicid.restore.plan import choose_bucket, effective_buckets, to_tensor

# The astronaut's face in skimage's 512 x 512 `astronaut()` (x0, y0, x1, y1), found once with the offline
# analyzer; a fixed box keeps the benchmark free of the face backend.
ASTRONAUT_FACE = (168, 48, 288, 180)


class CallCounter:
    """Counts a module's forward calls and the batch rows they evaluate (a forward pre-hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.rows = 0
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.calls += 1
        self.rows += int(sample.shape[0])

    def reset(self) -> None:
        self.calls = self.rows = 0


def face_sides(n_faces: int, face_px: int | None) -> list[int]:
    """Face sizes (px): by default 28-44 px, mixing buckets 128 and 256 (margin 0.5, zoom 2); else all `face_px`."""
    if face_px is not None:
        return [face_px] * n_faces
    return [[28, 40, 32, 44][i % 4] for i in range(n_faces)]


def composite(n_faces: int, face_px: int | None = None) -> tuple[np.ndarray, list[Face]]:
    """A smooth background with `n_faces` astronaut faces on a grid; their `Face`s (box, landmarks)."""
    from skimage import data

    sides = face_sides(n_faces, face_px)
    cols = min(n_faces, 4)
    rows = math.ceil(n_faces / cols)
    cell = int(max(sides) * 2.2)  # each face's crop (margin 0.5: 2x the face) stays inside its cell
    width, height = max(512, cols * cell), max(512, rows * cell)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    background = np.stack(
        [90 + 60 * np.sin(xx / 97.0), 120 + 50 * np.cos(yy / 71.0), 140 + 0.1 * (xx - yy)], -1
    )
    image = np.clip(background, 0, 255).astype(np.uint8)
    astronaut = data.astronaut()
    x0, y0, x1, y1 = ASTRONAUT_FACE
    face_pixels = astronaut[y0:y1, x0:x1]
    # Landmark-like points of the face (a 22 x 22 grid over the box): drawn into the landmark maps.
    grid = np.stack(np.meshgrid(np.linspace(0.15, 0.85, 22), np.linspace(0.2, 0.9, 22)), -1).reshape(-1, 2)
    faces = []
    for i, side in enumerate(sides):
        row, col = divmod(i, cols)
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        fx0, fy0 = int(cx - side / 2), int(cy - side / 2)
        image[fy0 : fy0 + side, fx0 : fx0 + side] = np.asarray(
            Image.fromarray(face_pixels).resize((side, side))
        )
        bbox = np.array([fx0, fy0, fx0 + side, fy0 + side], np.float32)
        embedding = np.random.default_rng(i).standard_normal(128).astype(np.float32)
        faces.append(
            Face(
                bbox=bbox,
                det_score=1.0,
                kps5=np.zeros((5, 2), np.float32),
                landmarks=(bbox[:2] + grid * side).astype(np.float32),
                embedding=embedding / np.linalg.norm(embedding),
            )
        )
    return image, faces


def background_psnr(before: np.ndarray, after: np.ndarray, faces: list[Face], params: Params) -> float:
    """PSNR outside every face's crop box (where neither method may change anything); inf when exact."""
    from magicid.imaging.crops import expand_box

    keep = np.ones(before.shape[:2], bool)
    for face in faces:
        x0, y0, x1, y1 = expand_box(face.bbox, params.diir.crop_margin, before.shape[1], before.shape[0])
        keep[y0:y1, x0:x1] = False
    mse = float(((before[keep].astype(np.float64) - after[keep].astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def adetailer_restore(
    pipe, image: np.ndarray, faces: list[Face], params: Params, min_bucket: int = 0
) -> np.ndarray:
    """ADetailer-style: one inpainting call per face, crop + zoom via `padding_mask_crop`, pasted back.

    The crop resolution follows DIIR's rule exactly: `choose_bucket` over `effective_buckets(diir.buckets,
    min_bucket)`, `min_bucket` being DIIR's floor (the backbone's native size: 512 on SD 1.5, 0 on the tiny one),
    so on a real-shaped backbone both methods run at the same resolution.
    """
    from magicid.imaging.crops import expand_box

    cfg = params.diir
    buckets = effective_buckets(cfg.buckets, min_bucket)
    current = Image.fromarray(image)
    height, width = image.shape[:2]
    for face in faces:
        x0, y0, x1, y1 = (int(round(v)) for v in face.bbox)
        mask = np.zeros((height, width), np.uint8)
        mask[y0:y1, x0:x1] = 255
        crop_box = expand_box(face.bbox, cfg.crop_margin, width, height)
        bucket = choose_bucket(crop_box[2] - crop_box[0], buckets, cfg.zoom)
        padding = max(1, int(round(cfg.crop_margin * max(x1 - x0, y1 - y0))))
        current = pipe(
            prompt="",
            image=current,
            mask_image=Image.fromarray(mask),
            height=bucket,
            width=bucket,
            padding_mask_crop=padding,
            strength=cfg.strength,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            generator=torch.Generator(pipe.device).manual_seed(0),
        ).images[0]
    return np.asarray(current)


@torch.inference_mode()
def host_speed_ms(backbone: Backbone, repeats: int = 20) -> float:
    """Median ms of one tiny-UNet call at batch 4 on 24 x 24 latents (four 192 px crops): a gauge of the host.

    About 34 ms on an idle 2-core machine of the kind the targets were set on and 48-68 ms when the host is
    busy. The DIIR ratios tend to rise with it: contention takes the second core from DIIR's batched calls
    more than from the baseline's batch-1 calls. A noisy host also widens the pairs' range.
    """
    latents = torch.randn(4, 4, 24, 24, generator=torch.Generator().manual_seed(0))
    text = torch.zeros(4, 77, backbone.unet.config.cross_attention_dim)
    timestep = torch.tensor(101)
    return 1000 * median_seconds(
        lambda: backbone.unet(latents, timestep, encoder_hidden_states=text), repeats, warmup=2
    )


def inpaint_pipe(backbone: Backbone):
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline(
        vae=backbone.vae,
        text_encoder=backbone.text_encoder,
        tokenizer=backbone.tokenizer,
        unet=backbone.unet,
        scheduler=DDIMScheduler.from_config(backbone.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def inversion_figures(
    backbone: Backbone, params: Params, crop: int = 128, latent_dtype: torch.dtype | None = None
) -> dict[str, float]:
    """Relative round-trip MSE (MSE / latent variance), plain vs fixed point, on the faces' `crop` px crops, on the
    backbone's device and in its dtype (the error itself is computed in float32).

    `latent_dtype`: the dtype of the inversion's own arithmetic (the latents and the DDIM updates); None = the
    backbone's. float32 with a half-precision backbone runs only the UNet in half precision (each noise
    prediction is cast back), the question of whether DIIR should invert in float32 when the model runs in half.
    """
    from magicid.imaging.crops import zoom_crop

    image, faces = composite(4)
    crops = [zoom_crop(image, f.bbox, crop, params.diir.crop_margin)[0] for f in faces]
    vae = backbone.vae
    pixels = to_tensor(crops, backbone.device, backbone.dtype)
    latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    latents = latents.to(latent_dtype or backbone.dtype)
    ids = backbone.tokenizer(
        [""] * len(crops), padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids.to(backbone.device)
    text = backbone.text_encoder(ids)[0]
    cfg = params.diir
    out = {}
    for name, iters in (("plain", 0), ("fixed_point", cfg.inversion_iters)):
        model_fn = noise_function(backbone.unet, backbone.scheduler, text)
        noise_fn = model_fn
        if latents.dtype != backbone.dtype:

            def noise_fn(sample, timestep, rows, model_fn=model_fn):
                return model_fn(sample.to(backbone.dtype), timestep, rows).to(sample.dtype)

        out[f"inversion_mse_{name}"], inverted = round_trip_error(
            noise_fn, backbone.scheduler, latents, 10, 0.5, iters, cfg.inversion_tol
        )
        out[f"inversion_unet_sample_evals_{name}"] = inverted.sample_evals / len(crops)
    return out


def run_config(
    name: str,
    config: TinyBackboneConfig | Callable[[], Backbone],
    counts: list[int],
    params: Params,
    repeats: int,
    face_px: int | None,
) -> dict:
    """`config`: the tiny backbone's sizes, or a function building the backbone (the SD 1.5-shaped one on CUDA)."""
    compute = name.startswith("compute") or name.startswith("sd15")
    backbone = build_tiny_backbone(config) if isinstance(config, TinyBackboneConfig) else config()
    adapter = MagicIDAdapter.create(backbone, params)  # installs MGMICA on backbone.unet
    results: dict[str, float] = {}
    if not compute:
        results["host_unet_ms_batch4_latent24_start"] = host_speed_ms(backbone)
    counter = CallCounter(backbone.unet)
    control_counter = CallCounter(adapter.controlnet)
    diir = DIIR.from_backbone(backbone, adapter=adapter, params=params)
    sequential = DIIR.from_backbone(backbone, adapter=adapter, params=params.model_copy(
        update={"diir": params.diir.model_copy(update={"batch": 1})}))  # fmt: skip
    for restorer in (diir, sequential):
        restorer.set_progress_bar_config(disable=True)
    pipe = inpaint_pipe(backbone)
    suffix = f"_{name}" if compute else ""
    for n in counts:
        image, faces = composite(n, face_px)
        label = f"{n}face" if n == 1 else f"{n}faces"
        diir_out: dict[str, np.ndarray] = {}

        def run_diir(d=diir, image=image, faces=faces, out=diir_out):
            out["image"] = np.asarray(d.restore(image, boxes=faces, faces="all").image)

        def run_adetailer(image=image, faces=faces, out=diir_out):
            out["adetailer"] = adetailer_restore(pipe, image, faces, params, diir.min_bucket)

        # The counted runs double as warm-up.
        counter.reset()
        control_counter.reset()
        run_diir()
        # UNet + ControlNet evaluations (the baseline runs no ControlNet).
        diir_calls = counter.calls + control_counter.calls
        diir_rows = counter.rows + control_counter.rows
        results[f"diir_controlnet_calls_{label}{suffix}"] = control_counter.calls
        counter.reset()
        run_adetailer()
        ad_calls, ad_rows = counter.calls, counter.rows
        timing = paired_seconds(run_diir, run_adetailer, repeats)
        results[f"diir_s_{label}{suffix}"] = timing.seconds_a
        results[f"adetailer_s_{label}{suffix}"] = timing.seconds_b
        results[f"diir_vs_adetailer_{label}{suffix}"] = timing.ratio
        if repeats > 1:
            results[f"diir_vs_adetailer_{label}{suffix}_pair_min"] = timing.ratio_min
            results[f"diir_vs_adetailer_{label}{suffix}_pair_max"] = timing.ratio_max
        results[f"diir_unet_calls_{label}{suffix}"] = diir_calls
        results[f"adetailer_unet_calls_{label}{suffix}"] = ad_calls
        results[f"diir_unet_sample_evals_{label}{suffix}"] = diir_rows
        results[f"adetailer_unet_sample_evals_{label}{suffix}"] = ad_rows
        results[f"unet_sample_evals_ratio_{label}{suffix}"] = diir_rows / ad_rows
        results[f"diir_bg_psnr_{label}{suffix}"] = background_psnr(image, diir_out["image"], faces, params)
        results[f"adetailer_bg_psnr_{label}{suffix}"] = background_psnr(
            image, diir_out["adetailer"], faces, params
        )
        if n == max(counts):
            timing = paired_seconds(
                run_diir,
                lambda image=image, faces=faces: sequential.restore(image, boxes=faces, faces="all"),
                repeats,
            )
            results[f"diir_sequential_s_{label}{suffix}"] = timing.seconds_b
            results[f"diir_batched_vs_sequential_{label}{suffix}"] = timing.ratio
    if not compute:
        results.update(inversion_figures(backbone, params))
        results["host_unet_ms_batch4_latent24_end"] = host_speed_ms(backbone)
    return results


def gpu_figures(params: Params, device: str, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """On CUDA: 8 faces restored on the SD 1.5-shaped backbone (random weights, `dtype`) at its native-size floor
    (both methods at 512 px crops), and the inversion round trip at 512 px in float32, in `dtype` and with only
    the UNet in `dtype` (float32 latents)."""
    from magicid.models.sd15_shapes import build_sd15_shaped_backbone

    figures = run_config(
        "sd15", lambda: build_sd15_shaped_backbone(0, device, dtype), [8], params, repeats, None
    )
    torch.cuda.reset_peak_memory_stats()
    backbone = build_sd15_shaped_backbone(0, device, torch.float32)
    inv = inversion_figures(backbone, params, crop=512)
    figures["inversion_mse_plain_sd15"] = inv["inversion_mse_plain"]
    figures["inversion_mse_fixed_point_sd15"] = inv["inversion_mse_fixed_point"]
    if dtype != torch.float32:
        label = str(dtype).removeprefix("torch.")
        backbone.to(dtype=dtype)
        half = inversion_figures(backbone, params, crop=512)
        mixed = inversion_figures(backbone, params, crop=512, latent_dtype=torch.float32)
        figures[f"inversion_mse_fixed_point_sd15_{label}"] = half["inversion_mse_fixed_point"]
        figures[f"inversion_mse_fixed_point_sd15_{label}_unet_fp32_latents"] = mixed[
            "inversion_mse_fixed_point"
        ]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="a small version (one pair per ratio, 256 px compute crops)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--device", default="cpu", help="cpu | cuda (cuda: the SD 1.5-shaped backbone, gpu_ names)"
    )
    parser.add_argument("--dtype", default="bfloat16", help="on CUDA: float32 | bfloat16 | float16")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="params override, e.g. diir.inversion_tol=4e-3 (repeatable)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(None, args.set)
    repeats = 1 if args.quick else 5
    if args.device.startswith("cuda"):
        from magicid.models.backbone import resolve_device, resolve_dtype

        device = resolve_device(args.device)
        figures = gpu_figures(params, str(device), resolve_dtype(args.dtype, device), 1 if args.quick else 3)
        print(f"gpu_dtype: {args.dtype}")
        for key in sorted(figures):
            value = figures[key]
            print(f"gpu_{key}: {value:.4g}" if isinstance(value, float) else f"gpu_{key}: {value}")
        return
    tiny = run_config("tiny", TinyBackboneConfig(), [1, 4, 8], params, repeats, None)
    # Compute-bound: a 2x wider UNet and 128 px faces -> 512 x 512 crops (bucket 512). --quick: 2x wider,
    # 64 px faces -> 256 x 256 crops, printed under its own names (`..._compute_quick`).
    compute_params = params.model_copy(
        update={"diir": params.diir.model_copy(update={"buckets": [64, 128, 256, 512]})}
    )
    # Full: 2x wider at 512 x 512 crops (4x wider took well over 5 minutes on 2 shared CPU cores).
    wide = TinyBackboneConfig(block_out_channels=(64, 128, 128))
    compute_name = "compute_quick" if args.quick else "compute"
    compute = run_config(compute_name, wide, [8], compute_params, 1, 64 if args.quick else 128)
    figures = {**tiny, **compute}
    figures["diir_bg_psnr"] = min(v for k, v in figures.items() if k.startswith("diir_bg_psnr_"))
    figures["adetailer_bg_psnr"] = min(v for k, v in figures.items() if k.startswith("adetailer_bg_psnr_"))
    figures["diir_unet_calls"] = figures["diir_unet_calls_8faces"]
    figures["adetailer_unet_calls"] = figures["adetailer_unet_calls_8faces"]
    order = [
        "diir_vs_adetailer_1face", "diir_vs_adetailer_4faces", "diir_vs_adetailer_8faces",
        "diir_batched_vs_sequential_8faces", "diir_bg_psnr", "adetailer_bg_psnr",
        "inversion_mse_plain", "inversion_mse_fixed_point", "diir_unet_calls", "adetailer_unet_calls",
        f"diir_vs_adetailer_8faces_{compute_name}", f"unet_sample_evals_ratio_8faces_{compute_name}",
    ]  # fmt: skip
    for key in order + sorted(k for k in figures if k not in order):
        value = figures[key]
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
