"""Fitting the offline tiny backbone (`magicid fit-backbone` on an IDZoom version, and phase 1 of `magicid fit-world`
on composite-world scenes; DESIGN §3).

The random tiny backbone (`magicid.models.tiny.build_tiny_backbone`) turns every face into noise, so nothing
measured on it means anything. This module fits it, as SD was trained, in two phases on a set of pictures
(`FitData`: whole images and zoomed face crops):

1. VAE: reconstruction (L1 + MSE) + an edge term (L1 between Sobel gradients: a perceptual stand-in, no
   pretrained feature network ships here) + KL to N(0, I), on random `fit.vae_patch` px patches of augmented
   whole images and zoomed face crops at `fit.vae_resolution` (the VAE is convolutional: patches train it as
   whole pictures do, at a fraction of the cost, as SD's VAE was trained on crops). Then `scaling_factor` =
   1 / std of the latents of the un-augmented data, so scaled latents have unit variance (DDIM inversion
   converges only there, DESIGN §4).
2. UNet: the denoising loss (epsilon, or v with `fit.prediction_type`) on latents of whole images and of zoomed
   face crops. The VAE is frozen by then, so every picture is encoded once per augmentation variant
   (`fit.latent_variants`: variant 0 as is, the others with horizontal flips, scale/translate jitter and colour
   jitter) and the steps draw (picture, variant, latent sample) from that bank: encoding a batch costs more than
   the tiny UNet's step. A sample is of an augmented variant with probability `fit.unet_augment_prob`: a short
   fit has to memorise about ten people to draw faces, and augmented views spread its few steps over pictures it
   is never asked for (measured, README), so by default it draws none, while the VAE, which must reconstruct any
   face, always trains on augmented pictures. Offset noise (`fit.offset_noise`, `training_noise`) keeps every
   generation from taking the data's mean tint. Min-SNR-gamma loss weighting (`fit.min_snr_gamma`, Hang et al.
   2023) keeps the easy low-noise timesteps from dominating a short fit. Text dropout (the empty prompt) gives
   classifier-free guidance an unconditional branch the UNet has seen. The text encoder and tokenizer stay as
   built (frozen, seeded); every caption is encoded once (`FitData.captions`). The saved UNet is the EMA of its
   weights (`fit.ema_decay`).

The result is a diffusers folder (`save_pretrained` of every component + `model_index.json`) that loads
through the real-weights path (`model.backbone=DIR`, `backbone.load_sd_folder`). Beside the components it holds
`fit_key.json` (the cache key of its inputs: dataset version + `fit` params + seed) and `fit_report.json`.

Device and dtype: the models, the pictures, the latent bank and every random draw live on `model.device`
(each step's generator is a `torch.Generator` on that device); `model.dtype` bfloat16/float16 runs the forward
passes under autocast (float16 with a gradient scaler; CUDA only), the weights and optimizer stay float32.
A step makes no host synchronisation: captions are indices into a table of text-encoder states on the device,
losses are summed on the device and read every `fit.log_every` steps. What a step spends outside its
forward/backward/optimizer work (generator, sampling, augmentation, bookkeeping) is timed and reported
(`fit_step_overhead_ms` in `fit_report.json`).

Determinism: the initial weights come from `seed`; every random draw of a step (which samples, augmentation,
latent sample, noise, timesteps) comes from a generator seeded by (seed, phase, step), and the latent bank's
augmentations from one seeded by (seed, "latents", variant), so a resumed fit rebuilds the same bank. Same
seed and device kind, same weights (CPU and CUDA generators draw different numbers). Resume: a checkpoint
(weights, optimizer, LR schedule, EMA, phase, step, MLflow run id) is written every `fit.checkpoint_every` steps
to `<out>.checkpoint/` as safetensors + JSON (`checkpoints.save_tensor_state`: no pickles); `--resume`
continues from it and reaches bit-identical weights. Tracking: an MLflow run like training's (all params,
losses every `fit.log_every` steps, the dataset as input, the folder as artifacts).

Layout (accelerate's examples): the data in `fit_data.py` (`load_fit_data`; `prepare_fit` adds the settings and
key), the loop in `BackboneFitter` (both phases, checkpoints; also phase 1 of `world_fit.py`'s `fit-world`), and
`fit_backbone` a thin driver (tracking, then the folder). The step generators are `generators.step_generator`'s
(`phase_generator`).

What it is not: a model of people in general. It is fitted to about ten people; it shows the mechanisms
working and lets the platform measure them offline, and it does not generalise to new faces.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel

from magicid.config import FitParams, Params
from magicid.errors import ConfigError
from magicid.locks import output_lock
from magicid.models.backbone import Backbone, resolve_device, resolve_dtype
from magicid.models.compilation import compile_denoiser
from magicid.models.tiny import TinyBackboneConfig, build_tiny_backbone
from magicid.training.fit_data import FACE_CROP_CAPTION, FitData, to_signed
from magicid.training.generators import step_generator
from magicid.utils import atomic_write_dir, atomic_write_text

__all__ = ["FACE_CROP_CAPTION", "BackboneFitter", "FitResult", "fit_backbone"]

KEY_FILE = "fit_key.json"
REPORT_FILE = "fit_report.json"
_PHASES = ("vae", "unet", "latents")  # append only: the index seeds the generators


@dataclasses.dataclass
class FitResult:
    """What a fit call did.

    Attributes:
        out_dir: the folder written (or to be written, when the call stopped early).
        run_id: the MLflow run (None without tracking).
        seconds: this call's wall time.
        vae_losses, unet_losses: mean loss of each logging window, keyed by the window's last step.
        scaling_factor: the VAE's fitted `scaling_factor` (nan while the VAE phase is unfinished).
        reused: an existing folder with the same key was kept (`ensure_fitted_backbone`).
        timings: per phase: `steps`, `seconds`, `steps_per_s`, `step_overhead_ms` (median host time of a step
            outside forward/backward/optimizer), `checkpoint_seconds`.
    """

    out_dir: Path
    run_id: str | None
    seconds: float
    vae_losses: dict[int, float]
    unet_losses: dict[int, float]
    scaling_factor: float
    reused: bool = False
    timings: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)


def phase_generator(seed: int, phase: str, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of every random draw of (phase, step), on `device`: the one `step_generator` on the stream
    (phase number, step), a pure function, so resume is exact."""
    return step_generator(seed, _PHASES.index(phase), step, device=device)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


def augment(images: torch.Tensor, fit: FitParams, out_size: int, generator: torch.Generator) -> torch.Tensor:
    """Random flips, zoom/translate jitter and colour jitter.

    Args:
        images: (B, 3, H, W) in [-1, 1], on the generator's device.
        fit: `fit.flip`, `fit.scale_jitter` (zoom in by up to 1 + this), `fit.translate_jitter` (shift by up to
            this fraction of the side), `fit.color_jitter` (brightness/contrast/saturation amplitude).
        out_size: output side.
        generator: the step's generator (all draws come from it).

    Returns:
        (B, 3, out_size, out_size) in [-1, 1].
    """
    n, device = images.shape[0], generator.device
    ones = torch.ones(n, device=device)
    flip = torch.where(_uniform(n, 0.0, 1.0, generator) < 0.5, -ones, ones) if fit.flip else ones
    zoom = _uniform(n, 1.0, 1.0 + fit.scale_jitter, generator)
    shift = _uniform(2 * n, -fit.translate_jitter, fit.translate_jitter, generator).view(n, 2) * 2
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = flip / zoom
    theta[:, 1, 1] = 1.0 / zoom
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, [n, 3, out_size, out_size], align_corners=False)
    # Bilinear resampling with antialiasing by a pre-blur is skipped on purpose: downsampling by <= 2 here.
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    c = fit.color_jitter
    if c > 0:
        brightness = _uniform(n, -c, c, generator).view(n, 1, 1, 1)
        contrast = _uniform(n, 1 - c, 1 + c, generator).view(n, 1, 1, 1)
        saturation = _uniform(n, 1 - c, 1 + c, generator).view(n, 1, 1, 1)
        grey = out.mean(dim=1, keepdim=True)
        out = grey + (out - grey) * saturation
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * contrast + mean + brightness
    return out.clamp(-1, 1)


def sample_batch(
    data: FitData, batch: int, face_prob: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` pictures: each a face crop with probability `face_prob`, else a whole image (uniform picks).

    Returns:
        (batch, 3, R, R) float in [-1, 1] on the generator's device, and (batch,) long: each picture's index
        (whole images first, then crops; `FitData.captions` numbers them so).
    """
    device = generator.device
    n_whole = data.whole.shape[0]
    is_face = torch.rand(batch, generator=generator, device=device) < face_prob
    whole_pick = torch.randint(0, n_whole, (batch,), generator=generator, device=device)
    crop_pick = torch.randint(0, data.crops.shape[0], (batch,), generator=generator, device=device)
    pictures = torch.where(is_face.view(-1, 1, 1, 1), data.crops[crop_pick], data.whole[whole_pick])
    return to_signed(pictures), torch.where(is_face, n_whole + crop_pick, whole_pick)


def random_patches(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A random `size` x `size` patch of each image (B, C, H, W) (one gather, no host sync); `size` 0 or >= the
    side: the images as they are."""
    side = images.shape[-1]
    if not size or size >= side:
        return images
    n = images.shape[0]
    offsets = torch.randint(0, side - size + 1, (n, 2), generator=generator, device=generator.device)
    span = torch.arange(size, device=images.device)
    rows = (offsets[:, 0:1].to(images.device) + span)[:, :, None]  # (B, size, 1)
    cols = (offsets[:, 1:2].to(images.device) + span)[:, None, :]  # (B, 1, size)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return images.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


@dataclasses.dataclass
class LatentBank:
    """Every fitting picture encoded by the frozen VAE once per augmentation variant (unscaled posterior).

    Attributes:
        mean, std: (V, N, 4, h, w): variant v of picture n; pictures are the whole images, then the face crops.
        n_whole: how many of the N pictures are whole images.
        caption_ids: (N,) long, each picture's index into the fit's caption table (`FitData.captions`).
    """

    mean: torch.Tensor
    std: torch.Tensor
    n_whole: int
    caption_ids: torch.Tensor

    def sample(
        self,
        batch: int,
        face_prob: float,
        scaling_factor: float,
        generator: torch.Generator,
        augment_prob: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch` scaled latents: each of a face crop with probability `face_prob`, else of a whole image (uniform
        picks), sampled from its posterior. Each is of an augmented variant (uniform over 1..V-1) with probability
        `augment_prob`, else of the picture as it is (variant 0).

        Returns:
            (batch, 4, h, w) latents and (batch,) long picture indices, on the generator's device.
        """
        if augment_prob > 0 and self.mean.shape[0] < 2:
            raise ValueError("augment_prob > 0 needs a bank with augmented variants (latent_variants >= 2)")
        device = generator.device
        n_crops = self.mean.shape[1] - self.n_whole
        is_face = torch.rand(batch, generator=generator, device=device) < face_prob
        whole_pick = torch.randint(0, self.n_whole, (batch,), generator=generator, device=device)
        crop_pick = self.n_whole + torch.randint(0, n_crops, (batch,), generator=generator, device=device)
        picture = torch.where(is_face, crop_pick, whole_pick)
        is_augmented = torch.rand(batch, generator=generator, device=device) < augment_prob
        variants = max(1, self.mean.shape[0] - 1)
        augmented = 1 + torch.randint(0, variants, (batch,), generator=generator, device=device)
        variant = torch.where(is_augmented, augmented, torch.zeros_like(augmented))
        mean, std = self.mean[variant, picture], self.std[variant, picture]
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
        return (mean + std * noise) * scaling_factor, picture


@torch.no_grad()
def encode_latent_bank(
    vae, data: FitData, fit: FitParams, seed: int, chunk: int = 8, autocast_dtype: torch.dtype | None = None
) -> LatentBank:
    """The UNet phase's `LatentBank`: variant 0 un-augmented, variants 1.. through `augment` (seeded per variant,
    drawn chunk after chunk); only variant 0 when `fit.unet_augment_prob` is 0 (no step would draw the others).
    Runs on the VAE's device, the pictures converted chunk by chunk (the uint8 pool is never held as floats)."""
    device = next(vae.parameters()).device
    pictures = torch.cat([data.whole, data.crops])
    means, stds = [], []
    for variant in range(fit.latent_variants if fit.unet_augment_prob > 0 else 1):
        generator = phase_generator(seed, "latents", variant, device) if variant else None
        mean_parts, std_parts = [], []
        for part in pictures.split(chunk):
            views = to_signed(part.to(device))
            if generator is not None:
                views = augment(views, fit, fit.resolution, generator)
            with _autocast(device, autocast_dtype):
                posterior = vae.encode(views).latent_dist
            mean_parts.append(posterior.mean.float())
            std_parts.append(posterior.std.float())
        means.append(torch.cat(mean_parts))
        stds.append(torch.cat(std_parts))
    _, caption_ids = data.captions()
    return LatentBank(torch.stack(means), torch.stack(stds), data.whole.shape[0], caption_ids.to(device))


def sobel(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2C, H, W): horizontal and vertical Sobel gradients per channel."""
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=images.dtype) / 4
    kernels = torch.stack([kx, kx.T]).unsqueeze(1).repeat(images.shape[1], 1, 1, 1)  # (2C, 1, 3, 3)
    return F.conv2d(
        F.pad(images, (1, 1, 1, 1), mode="replicate"), kernels.to(images.device), groups=images.shape[1]
    )


def vae_loss(
    vae, images: torch.Tensor, fit: FitParams, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The VAE objective on (B, 3, H, W) images in [-1, 1].

    Returns:
        (scalar loss, parts): `vae_loss`, `vae_l1`, `vae_mse`, `vae_kl` as detached 0-d tensors on the device
        (read on the host only when logged: `psnr_db` turns `vae_mse` into `vae_psnr`).
    """
    posterior = vae.encode(images).latent_dist
    mean, std = posterior.mean.float(), posterior.std.float()
    noise = torch.randn(mean.shape, generator=generator, device=generator.device)
    recon = vae.decode((mean + std * noise).to(posterior.mean.dtype)).sample.float()
    l1 = (recon - images).abs().mean()
    mse = (recon - images).pow(2).mean()
    edge = (sobel(recon) - sobel(images)).abs().mean()
    kl = 0.5 * (mean.pow(2) + posterior.var.float() - 1.0 - posterior.logvar.float()).mean()
    loss = l1 + mse + fit.edge_weight * edge + fit.kl_weight * kl
    parts = {"vae_loss": loss, "vae_l1": l1, "vae_mse": mse, "vae_kl": kl}
    return loss, {name: value.detach() for name, value in parts.items()}


def psnr_db(mse: float) -> float:
    """PSNR (dB) of a mean squared error of [-1, 1] pictures (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def fit_scaling_factor(bank: LatentBank) -> float:
    """1 / std of the latent means of every whole image and face crop as they are (the bank's variant 0)."""
    return float(1.0 / bank.mean[0].float().std())


def training_noise(shape: torch.Size, offset: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, I) noise of `shape` (B, C, h, w) on the generator's device, plus `offset` x a per-(sample, channel)
    constant ("offset noise", Guttenberg 2023; diffusers' `--noise_offset`).

    Why: at the last timestep SD's schedule keeps 6.8 % of the signal, so a plain fit learns to read each
    picture's mean colour from the noise, and sampling, which starts from pure noise, gives every generation
    the data's average tint. The constant term makes the mean colour something the UNet must generate.
    On the fitted tiny backbone it removed the tint; detected faces in 16 "a photo of a person" generations went
    from 6 to 8, within the run-to-run spread of about 3 (README).
    """
    device = generator.device
    noise = torch.randn(shape, generator=generator, device=device)
    if offset:
        noise = noise + offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator, device=device)
    return noise


def unet_loss(
    backbone: Backbone,
    latents: torch.Tensor,
    text: torch.Tensor,
    generator: torch.Generator,
    min_snr_gamma: float | None = None,
    offset_noise: float = 0.0,
) -> torch.Tensor:
    """The denoising loss of one batch of scaled latents (B, 4, h, w) with text (B, 77, C), all on the generator's
    device.

    The target follows the scheduler's `prediction_type`: the noise (epsilon) or the velocity
    (v_prediction, as SD 2.x). `min_snr_gamma`: Min-SNR-gamma weighting (Hang et al. 2023), min(SNR, gamma) / SNR
    for epsilon and min(SNR, gamma) / (SNR + 1) for v; None: unweighted. `offset_noise`: see `training_noise`.
    """
    scheduler = backbone.scheduler
    noise = training_noise(latents.shape, offset_noise, generator)
    timesteps = torch.randint(
        0,
        scheduler.config.num_train_timesteps,
        (latents.shape[0],),
        generator=generator,
        device=generator.device,
    )
    noisy = scheduler.add_noise(latents, noise, timesteps)
    velocity = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, timesteps) if velocity else noise
    prediction = backbone.unet(noisy, timesteps, encoder_hidden_states=text).sample
    per_sample = (prediction.float() - target).pow(2).mean(dim=(1, 2, 3))
    if min_snr_gamma is None:
        return per_sample.mean()
    alpha_bar = scheduler.alphas_cumprod.to(latents.device)[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    return (per_sample * snr.clamp(max=min_snr_gamma) / (snr + 1 if velocity else snr)).mean()


def _lr_lambda(total: int, warmup: int):
    """Linear warm-up, then cosine decay to 10 % of the peak (a short fit needs the late small steps)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device` (a no-op context for float32 / None)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and dtype != torch.float32)


def fit_settings(params: Params, quality: bool) -> FitParams:
    """`params.fit` with the `fit.quality` step counts applied when `quality` (the longer setting)."""
    fit = params.fit.model_copy(deep=True)
    if quality:
        fit.vae_steps, fit.unet_steps = fit.quality.vae_steps, fit.quality.unet_steps
    return fit


def fit_key(params: Params, fit: FitParams, version: str) -> dict[str, Any]:
    """The inputs a fitted folder depends on, and their hash: reuse a folder only while `key` is unchanged."""
    inputs = {
        "dataset_version": version,
        "seed": params.seed,
        "fit": fit.model_dump(mode="json", exclude={"compile"}),  # a speed setting: the same weights
        "tiny": dataclasses.asdict(TinyBackboneConfig(seed=params.seed)),
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return {"key": digest, "inputs": inputs}


def read_fit_key(out_dir: str | Path) -> str | None:
    """The key of a fitted folder, or None when there is no complete one."""
    path = Path(out_dir) / KEY_FILE
    if not path.is_file() or not (Path(out_dir) / "model_index.json").is_file():
        return None
    try:
        return str(json.loads(path.read_text())["key"])
    except (ValueError, KeyError):
        return None


def checkpoint_dir(out_dir: str | Path) -> Path:
    """`<out_dir>.checkpoint`: where a fit of `out_dir` keeps its resumable state."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".checkpoint")


class StepTimer:
    """Host time of each step and of its part outside forward/backward/optimizer (generator, sampling,
    augmentation, bookkeeping), per phase; checkpoint writes are counted apart."""

    def __init__(self) -> None:
        self.step_s: dict[str, list[float]] = {}
        self.overhead_s: dict[str, list[float]] = {}
        self.checkpoint_s: dict[str, float] = {}

    def add(self, phase: str, step_s: float, overhead_s: float) -> None:
        self.step_s.setdefault(phase, []).append(step_s)
        self.overhead_s.setdefault(phase, []).append(overhead_s)

    def add_checkpoint(self, phase: str, seconds: float) -> None:
        self.checkpoint_s[phase] = self.checkpoint_s.get(phase, 0.0) + seconds

    def summary(self) -> dict[str, dict[str, float]]:
        """Per phase: steps, seconds, steps_per_s, step_overhead_ms (median), checkpoint_seconds."""
        out = {}
        for phase, steps in self.step_s.items():
            total = sum(steps)
            out[phase] = {
                "steps": len(steps),
                "seconds": round(total, 3),
                "steps_per_s": round(len(steps) / total, 3) if total > 0 else float("nan"),
                "step_ms": round(1000 * statistics.median(steps), 3),
                "step_overhead_ms": round(1000 * statistics.median(self.overhead_s[phase]), 3),
                "checkpoint_seconds": round(self.checkpoint_s.get(phase, 0.0), 3),
            }
        return out


class BackboneFitter:
    """The two phases of a backbone fit (VAE, then UNet) on one `FitData`, resumable at any step.

    Used by `fit_backbone` (an IDZoom version) and by `magicid.training.world_fit` (phase 1, on world scenes).

    Args:
        params: `seed`, `model.device`, `model.dtype` (the rest of the settings come in `fit`).
        fit: the fit's settings (`fit_settings`, or fit-world's copy with its own step counts).
        data: the pictures (moved to the device; released once the latent bank is built).
        key: the hash of the fit's inputs; a checkpoint of other inputs is refused.
        state_dir: where checkpoints go (`checkpoint_dir(out_dir)`).
        tracker: an MLflow `RunTracker` (started by the caller before `run`).
        progress: show a tqdm bar; desc: its label.
    """

    def __init__(
        self,
        params: Params,
        fit: FitParams,
        data: FitData,
        key: str,
        state_dir: Path,
        tracker,
        progress: bool = True,
        desc: str = "fit-backbone",
    ) -> None:
        self.params, self.fit, self.key, self.state_dir, self.tracker = (
            params,
            fit,
            key,
            Path(state_dir),
            tracker,
        )
        self.progress, self.desc = progress, desc
        self.device = resolve_device(params.model.device)
        self.dtype = resolve_dtype(params.model.dtype, self.device)
        self.autocast_dtype = None if self.dtype == torch.float32 else self.dtype
        self.data: FitData | None = data.to(self.device)
        backbone = build_tiny_backbone(TinyBackboneConfig(seed=params.seed))
        backbone.scheduler.register_to_config(prediction_type=fit.prediction_type)
        self.backbone = backbone.to(device=self.device)  # float32 weights: autocast runs the half precision
        vae, unet = backbone.vae, backbone.unet
        # fit.compile: the loop's own host work is well under a millisecond a step (bench_fit_loop's overhead
        # figure); on a GPU the tiny UNet's forward/backward is bound by launching its many small kernels, which
        # compilation fuses (README "On a GPU"). In place: the saved weights and checkpoints are as without.
        compile_denoiser(fit.compile, "fit.compile", unet)
        self._cuda_graphs = fit.compile == "unet_cudagraphs"
        # fused: one kernel over all parameters; the default on CPU is a Python loop over them, a tenth of a step.
        self.vae_opt = torch.optim.AdamW(vae.parameters(), lr=fit.vae_lr, weight_decay=0.0, fused=True)
        self.unet_opt = torch.optim.AdamW(
            unet.parameters(), lr=fit.unet_lr, weight_decay=fit.weight_decay, fused=True
        )
        self.vae_sched = torch.optim.lr_scheduler.LambdaLR(
            self.vae_opt, _lr_lambda(fit.vae_steps, fit.warmup_steps)
        )
        self.unet_sched = torch.optim.lr_scheduler.LambdaLR(
            self.unet_opt, _lr_lambda(fit.unet_steps, fit.warmup_steps)
        )
        # The UNet folder holds the exponential moving average of its weights (when `fit.ema_decay` is set): a
        # short, high-LR fit ends on noisy weights, and sampling from their average gives cleaner pictures (as SD's
        # EMA weights do). diffusers' EMAModel with warm-up: decay = min(ema_decay, 1 - (1 + step) ** -2/3).
        self.ema = (
            EMAModel(unet.parameters(), decay=fit.ema_decay, use_ema_warmup=True, foreach=True)
            if fit.ema_decay
            else None
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.phase, self.step = "vae", 0
        self.scaling_factor: float | None = None
        self.losses: dict[str, dict[int, float]] = {"vae": {}, "unet": {}}
        self.timer = StepTimer()
        self.caption_table, _ = data.captions()
        from magicid.training.train_data import TextEncoderCache

        # (K, 77, C) on the device: the trainer's encoder, so fit and training tokenise captions alike.
        self.text_states = TextEncoderCache(self.backbone)(self.caption_table)
        self._bank: LatentBank | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._window = 0
        self._bar = None

    @property
    def done(self) -> int:
        """Steps done over both phases."""
        return self.step + (self.fit.vae_steps if self.phase == "unet" else 0)

    @property
    def total(self) -> int:
        return self.fit.vae_steps + self.fit.unet_steps

    # -- checkpoints ---------------------------------------------------------------------------------------

    def restore(self) -> str | None:
        """Load the checkpoint in `state_dir`; returns its MLflow run id.

        Raises:
            ConfigError: no checkpoint, or one made from other inputs. CheckpointError: a damaged one.
        """
        from magicid.training.checkpoints import load_tensor_state

        loaded = load_tensor_state(self.state_dir)
        if loaded is None:
            raise ConfigError(
                f"--resume: no checkpoint at {self.state_dir}; run {self.desc} without --resume first"
            )
        tensors, meta = loaded
        if not isinstance(meta, dict):
            from magicid.training.checkpoints import CheckpointError

            raise CheckpointError(
                f"--resume: {self.state_dir} is damaged or not a {self.desc} checkpoint (its state is a "
                f"{type(meta).__name__}); delete it and run without --resume"
            )
        if meta.get("key") != self.key:
            raise ConfigError(
                f"--resume: {self.state_dir} was made from other inputs (dataset version or fit params changed); "
                "delete it or run without --resume"
            )

        try:
            return self._load_state(tensors, meta)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:
            from magicid.training.checkpoints import CheckpointError, first_line

            raise CheckpointError(
                f"--resume: {self.state_dir} is damaged or not a {self.desc} checkpoint "
                f"({type(error).__name__}: {first_line(error)[:160]}); delete it and run without --resume"
            ) from None

    def _load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str | None:
        """Put a checkpoint's tensors and metadata into the models, optimizers and schedules; its run id."""
        from magicid.training.checkpoints import load_optimizer_state

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

        self.backbone.vae.load_state_dict(part("vae."))
        self.backbone.unet.load_state_dict(part("unet."))
        load_optimizer_state(self.vae_opt, tensors, meta["vae_opt"], "vae_opt")
        load_optimizer_state(self.unet_opt, tensors, meta["unet_opt"], "unet_opt")
        self.vae_sched.load_state_dict(meta["vae_sched"])
        self.unet_sched.load_state_dict(meta["unet_sched"])
        if self.ema is not None:
            shadow = part("ema.")
            self.ema.load_state_dict(
                {**meta["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]}
            )
            self.ema.to(self.device)
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.phase, self.step = meta["phase"], int(meta["step"])
        self.scaling_factor = meta.get("scaling_factor")
        if self.scaling_factor is not None:
            self.backbone.vae.register_to_config(scaling_factor=float(self.scaling_factor))
        return meta.get("run_id")

    def checkpoint(self) -> None:
        """Write the whole state (`save_tensor_state`: safetensors + JSON) and flush the tracker."""
        from magicid.training.checkpoints import optimizer_state, save_tensor_state

        started = time.perf_counter()
        tensors = {f"vae.{k}": v for k, v in self.backbone.vae.state_dict().items()}
        tensors.update({f"unet.{k}": v for k, v in self.backbone.unet.state_dict().items()})
        vae_opt_tensors, vae_opt_meta = optimizer_state(self.vae_opt, "vae_opt")
        unet_opt_tensors, unet_opt_meta = optimizer_state(self.unet_opt, "unet_opt")
        tensors.update(vae_opt_tensors)
        tensors.update(unet_opt_tensors)
        meta: dict[str, Any] = {
            "key": self.key,
            "phase": self.phase,
            "step": self.step,
            "run_id": self.tracker.run_id,
            "scaling_factor": self.scaling_factor,
            "vae_opt": vae_opt_meta,
            "unet_opt": unet_opt_meta,
            "vae_sched": self.vae_sched.state_dict(),
            "unet_sched": self.unet_sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
        }
        if self.ema is not None:
            ema_state = self.ema.state_dict()
            tensors.update({f"ema.{i}": p for i, p in enumerate(ema_state.pop("shadow_params"))})
            meta["ema"] = ema_state
        save_tensor_state(self.state_dir, f"{self.phase}-{self.step:08d}", tensors, meta)
        self.tracker.flush()
        self.timer.add_checkpoint(self.phase, time.perf_counter() - started)

    # -- steps ---------------------------------------------------------------------------------------------

    def _optimizer_step(self, loss: torch.Tensor, module: torch.nn.Module, optimizer, scheduler) -> None:
        """Backward, clip the module's gradients, step the optimizer (through the float16 scaler when on) and LR."""
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(module.parameters(), self.fit.max_grad_norm, foreach=True)
        self.scaler.step(optimizer)
        self.scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def _accumulate(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            self._sums[name] = self._sums[name] + value if name in self._sums else value.clone()
        self._window += 1

    def _log(self, metric_step: int, extra: dict[str, float]) -> float:
        """Read the window's mean losses (the one host sync), log them, reset the window; returns the mean loss."""
        names = list(self._sums)
        means = (torch.stack([self._sums[n].float() for n in names]) / self._window).tolist()
        values = dict(zip(names, means, strict=True))
        self._sums, self._window = {}, 0
        loss = values[f"{self.phase}_loss"]
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"{self.desc}: {self.phase} loss is {loss} at step {self.step}; lower fit.{self.phase}_lr"
            )
        if "vae_mse" in values:
            values["vae_psnr"] = psnr_db(values["vae_mse"])
        self.losses[self.phase][self.step] = loss
        self.tracker.metrics({**values, **extra}, metric_step)
        if self._bar is not None:
            self._bar.set_postfix(phase=self.phase, loss=f"{loss:.4f}")
        return loss

    def _vae_phase(self, stop_after: int | None) -> bool:
        fit, vae, device = self.fit, self.backbone.vae, self.device
        vae.train().requires_grad_(True)
        while self.step < fit.vae_steps:
            t0 = time.perf_counter()
            generator = phase_generator(self.params.seed, "vae", self.step, device)
            pictures, _ = sample_batch(self.data, fit.vae_batch, fit.face_prob, generator)
            pictures = augment(pictures, fit, fit.vae_resolution, generator)
            pictures = random_patches(pictures, fit.vae_patch, generator)
            t1 = time.perf_counter()
            with _autocast(device, self.autocast_dtype):
                loss, parts = vae_loss(vae, pictures, fit, generator)
            self._optimizer_step(loss, vae, self.vae_opt, self.vae_sched)
            t2 = time.perf_counter()
            self.step += 1
            self._accumulate(parts)
            stop = self.done == stop_after
            if self.step % fit.log_every == 0 or self.step == fit.vae_steps or stop:
                self._log(self.step, {"vae_lr": self.vae_sched.get_last_lr()[0]})
            self._bar.update(1)
            t3 = time.perf_counter()
            self.timer.add("vae", t3 - t0, (t1 - t0) + (t3 - t2))
            # The end of the phase is checkpointed with the phase switch below (one write, not two).
            if (self.step % fit.checkpoint_every == 0 and self.step < fit.vae_steps) or stop:
                self.checkpoint()
            if stop:
                return False
        vae.eval().requires_grad_(False)
        self._bank = encode_latent_bank(
            vae, self.data, fit, self.params.seed, autocast_dtype=self.autocast_dtype
        )
        self.data = None  # the pixels are not needed any more (the pool of a world fit is hundreds of MB)
        self.scaling_factor = fit_scaling_factor(self._bank)
        vae.register_to_config(scaling_factor=self.scaling_factor)
        self.tracker.metrics({"vae_scaling_factor": self.scaling_factor}, self.step)
        self.phase, self.step = "unet", 0
        self.checkpoint()
        return True

    def _unet_phase(self, stop_after: int | None) -> bool:
        fit, device, unet = self.fit, self.device, self.backbone.unet
        self.backbone.vae.eval().requires_grad_(False)
        if (
            self._bank is None
        ):  # resumed in the UNet phase: the same bank again (seeded, from the same VAE weights)
            self._bank = encode_latent_bank(
                self.backbone.vae, self.data, fit, self.params.seed, autocast_dtype=self.autocast_dtype
            )
            self.data = None
        bank, scaling_factor = self._bank, float(self.backbone.vae.config.scaling_factor)
        unet.train().requires_grad_(True)
        while self.step < fit.unet_steps:
            t0 = time.perf_counter()
            if self._cuda_graphs:  # a new step: the previous step's graph outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            generator = phase_generator(self.params.seed, "unet", self.step, device)
            latents, picture = bank.sample(
                fit.unet_batch, fit.face_prob, scaling_factor, generator, fit.unet_augment_prob
            )
            dropped = torch.rand(picture.shape[0], generator=generator, device=device) < fit.text_dropout
            text = self.text_states[torch.where(dropped, 0, bank.caption_ids[picture])]  # caption 0: ""
            t1 = time.perf_counter()
            with _autocast(device, self.autocast_dtype):
                loss = unet_loss(self.backbone, latents, text, generator, fit.min_snr_gamma, fit.offset_noise)
            self._optimizer_step(loss, unet, self.unet_opt, self.unet_sched)
            if self.ema is not None:
                self.ema.step(unet.parameters())
            t2 = time.perf_counter()
            self.step += 1
            self._accumulate({"unet_loss": loss.detach()})
            stop = self.done == stop_after
            if self.step % fit.log_every == 0 or self.step == fit.unet_steps or stop:
                self._log(fit.vae_steps + self.step, {"unet_lr": self.unet_sched.get_last_lr()[0]})
            self._bar.update(1)
            t3 = time.perf_counter()
            self.timer.add("unet", t3 - t0, (t1 - t0) + (t3 - t2))
            if self.step % fit.checkpoint_every == 0 or stop:
                self.checkpoint()
            if stop and self.step < fit.unet_steps:
                return False
        unet.eval().requires_grad_(False)
        if self.ema is not None:
            self.ema.copy_to(unet.parameters())
        return True

    def run(self, stop_after: int | None = None) -> bool:
        """Run the remaining steps of both phases; False when stopped at `stop_after` total steps (checkpointed),
        True when the backbone is fitted (the UNet then holds its EMA weights)."""
        from tqdm.auto import tqdm

        self._bar = tqdm(total=self.total, initial=self.done, desc=self.desc, disable=not self.progress)
        try:
            if self.phase == "vae" and not self._vae_phase(stop_after):
                return False
            return self._unet_phase(stop_after)
        finally:
            self._bar.close()
            self._bar = None

    def report(self) -> dict[str, Any]:
        """Timings and final losses of the fit, for `fit_report.json`."""
        timings = self.timer.summary()
        overheads = [s for phase in self.timer.overhead_s.values() for s in phase]
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "vae_steps": self.fit.vae_steps,
            "unet_steps": self.fit.unet_steps,
            "scaling_factor": float(self.backbone.vae.config.scaling_factor),
            "final_vae_loss": self.losses["vae"].get(self.fit.vae_steps),
            "final_unet_loss": self.losses["unet"].get(self.fit.unet_steps),
            "timings": timings,
            "fit_step_overhead_ms": round(1000 * statistics.median(overheads), 3) if overheads else None,
        }


def fit_backbone(
    params: Params,
    data_dir: str | Path,
    out_dir: str | Path,
    quality: bool = False,
    resume: bool = False,
    progress: bool = True,
    track: bool = True,
    stop_after: int | None = None,
) -> FitResult:
    """Fit the tiny backbone on an IDZoom version and write it as a diffusers SD folder at `out_dir`.

    Args:
        params: `seed`, `fit`, `tracking`, `model.device`, `model.dtype`.
        data_dir: the IDZoom dataset version.
        out_dir: the folder to write (replaced atomically when the fit ends).
        quality: use `fit.quality`'s longer step counts.
        resume: continue from `<out_dir>.checkpoint/` (error if none, or if it was made from other inputs).
        progress: tqdm bar over all steps of both phases.
        track: log to MLflow.
        stop_after: stop (with a checkpoint) after this many steps in total, without writing the folder: a fit
            split over several calls, as an interruption would split it.

    Returns:
        `FitResult` (`seconds` is this call's wall time).

    Raises:
        DataError: a bad `data_dir`. ConfigError: `--resume` without a matching checkpoint; `model.device=cuda`
        without CUDA. CheckpointError: a damaged checkpoint. OutputLocked: another process is writing
        `out_dir` (the lock covers `<out_dir>.checkpoint/` too).
    """
    with output_lock(out_dir, "magicid fit-backbone"):
        return _fit_backbone_locked(params, data_dir, out_dir, quality, resume, progress, track, stop_after)


@dataclasses.dataclass
class FitInputs:
    """What a `fit-backbone` run fits on (`prepare_fit`).

    Attributes:
        fit: the fit's settings (`fit_settings`).
        data: the pictures (None once handed to the `BackboneFitter`, which releases them after its latent bank).
        key: `fit_key`'s dict (`key`: the hash; `inputs`: what it hashes).
        version: the dataset version; identities: the identities of the face crops, sorted.
        counts: whole images, face crops and identities (logged as params).
    """

    fit: FitParams
    data: FitData | None
    key: dict[str, Any]
    version: str
    identities: list[str]
    counts: dict[str, int]


def prepare_fit(params: Params, data_dir: str | Path, quality: bool) -> FitInputs:
    """The settings, pictures (`fit_data.load_fit_data`) and key of a fit of `data_dir`; a bad `model.device` or
    `model.dtype` fails before the data loads."""
    from magicid.training.fit_data import load_fit_data

    fit = fit_settings(params, quality)
    resolve_dtype(params.model.dtype, resolve_device(params.model.device))
    data = load_fit_data(data_dir, fit)
    identities = sorted({i for i in data.crop_identities if i})
    counts = {
        "n_whole_images": data.whole.shape[0],
        "n_face_crops": data.crops.shape[0],
        "n_identities": len(identities),
    }
    return FitInputs(fit, data, fit_key(params, fit, data.version), data.version, identities, counts)


def _fit_backbone_locked(
    params: Params,
    data_dir: str | Path,
    out_dir: str | Path,
    quality: bool,
    resume: bool,
    progress: bool,
    track: bool,
    stop_after: int | None,
) -> FitResult:
    """The driver: inputs (`prepare_fit`), the fitter (`BackboneFitter`: the loop) and tracking, then the folder."""
    from magicid.training.tracking import RunTracker

    start = time.perf_counter()
    out_dir = Path(out_dir)
    inputs = prepare_fit(params, data_dir, quality)
    fit, key = inputs.fit, inputs.key["key"]
    tracker = RunTracker(params, enabled=track)
    fitter = BackboneFitter(
        params, fit, inputs.data, key, checkpoint_dir(out_dir), tracker, progress=progress
    )
    inputs.data = None  # the fitter holds the pictures until its latent bank is built
    run_id = fitter.restore() if resume else None
    if tracker.start(
        run_id, run_name=f"fit-backbone-{Path(data_dir).name}", source_name="magicid fit-backbone"
    ):
        tracker.log_params(
            {
                "data_dir": str(data_dir),
                "dataset_version": inputs.version,
                "fit_key": key,
                "fit_quality": quality,
                **inputs.counts,
                "fit_vae_steps_effective": fit.vae_steps,
                "fit_unet_steps_effective": fit.unet_steps,
                "fit_device": str(fitter.device),
            }
        )
    status = "FAILED"
    try:
        if not fitter.run(stop_after):
            status = "KILLED"
            return _result(out_dir, tracker, start, fitter)
        _write_fitted(out_dir, fitter, inputs, tracker, time.perf_counter() - start, resume)
        status = "FINISHED"
    finally:
        tracker.end(status)
    return _result(out_dir, tracker, start, fitter)


def _write_fitted(
    out_dir: Path, fitter: BackboneFitter, inputs: FitInputs, tracker, seconds: float, resumed: bool
) -> None:
    """Write the fitted folder atomically (components, `fit_key.json`, `fit_report.json`), log it, and delete the
    checkpoint it no longer needs."""
    report = {
        "dataset_version": inputs.version,
        "seconds_this_call": round(seconds, 2),
        "resumed": resumed,
        **fitter.report(),
        "identities": inputs.identities,
    }

    def write(tmp: Path) -> None:
        fitter.backbone.save_pretrained(tmp)
        atomic_write_text(tmp / KEY_FILE, json.dumps(inputs.key, indent=2, sort_keys=True) + "\n")
        atomic_write_text(tmp / REPORT_FILE, json.dumps(report, indent=2) + "\n")

    atomic_write_dir(out_dir, write)
    tracker.metrics({"fit_seconds": seconds}, fitter.total)
    tracker.artifacts(out_dir, "backbone")
    shutil.rmtree(checkpoint_dir(out_dir), ignore_errors=True)


def _result(out_dir: Path, tracker, start: float, fitter: BackboneFitter) -> FitResult:
    scaling = fitter.scaling_factor
    return FitResult(
        out_dir,
        tracker.run_id,
        time.perf_counter() - start,
        dict(fitter.losses["vae"]),
        dict(fitter.losses["unet"]),
        float("nan") if scaling is None else float(scaling),
        timings=fitter.timer.summary(),
    )


def ensure_fitted_backbone(
    params: Params, data_dir: str | Path, out_dir: str | Path, progress: bool = True, track: bool = True
) -> FitResult:
    """The fitted folder at `out_dir`: reused while its inputs (dataset version + fit params + seed) are unchanged
    (its `fit_key.json` matches), else fitted afresh (the demo's default backbone)."""
    from magicid.data.version import dataset_version

    version, _ = dataset_version(data_dir)
    key = fit_key(params, fit_settings(params, quality=False), version)["key"]
    if read_fit_key(out_dir) == key:
        report = json.loads((Path(out_dir) / REPORT_FILE).read_text())
        return FitResult(Path(out_dir), None, 0.0, {}, {}, float(report["scaling_factor"]), reused=True)
    return fit_backbone(params, data_dir, out_dir, progress=progress, track=track)
