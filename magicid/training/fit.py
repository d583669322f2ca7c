"""Fitting the offline tiny backbone to an IDZoom dataset version (`magicid fit-backbone`, DESIGN §3).

The random tiny backbone (`magicid.models.tiny.build_tiny_backbone`) turns every face into noise, so nothing
measured on it means anything. This module fits it, as SD was trained, in two phases on the dataset's photos:

1. VAE: reconstruction (L1 + MSE) + an edge term (L1 between Sobel gradients: a perceptual stand-in, no
   pretrained feature network ships here) + KL to N(0, I), on random `fit.vae_patch` px patches of augmented
   whole images and zoomed face crops at `fit.vae_resolution` (the VAE is convolutional: patches train it as
   whole pictures do, at a fraction of the cost, as SD's VAE was trained on crops). Then `scaling_factor` =
   1 / std of the latents of the un-augmented data, so scaled latents have unit variance (DDIM inversion
   converges only there, DESIGN §4).
2. UNet: the denoising loss (epsilon, or v with `fit.prediction_type`) on latents of whole images (letterboxed,
   the adapter trainer's layout) and of zoomed face crops. The VAE is frozen by then, so every picture is encoded
   once per augmentation variant (`fit.latent_variants`: variant 0 as is, the others with horizontal flips,
   scale/translate jitter and colour jitter) and the steps draw (picture, variant, latent sample) from that bank:
   encoding a batch costs more than the tiny UNet's step. A sample is of an augmented variant with probability
   `fit.unet_augment_prob`: a short fit has to memorise about ten people to draw faces, and augmented views spread
   its few steps over pictures it is never asked for (measured, README), so by default it draws none, while the VAE, which must reconstruct any face, always trains on augmented pictures. Offset noise
   (`fit.offset_noise`, `training_noise`) keeps every generation from taking the data's mean tint. Min-SNR-gamma
   loss weighting (`fit.min_snr_gamma`, Hang et al. 2023) keeps the easy low-noise timesteps from dominating a
   short fit. Text dropout (the empty prompt) gives classifier-free guidance an unconditional branch the UNet has
   seen. The text encoder and tokenizer stay as built (frozen, seeded). The saved UNet is the EMA of its weights
   (`fit.ema_decay`).

The result is a diffusers folder (`save_pretrained` of every component + `model_index.json`) that loads
through the real-weights path (`model.backbone=DIR`, `backbone.load_sd_folder`). Beside the components it holds
`fit_key.json` (the cache key of its inputs: dataset version + `fit` params + seed) and `fit_report.json`.

Determinism: the initial weights come from `seed`; every random draw of a step (which samples, augmentation,
latent sample, noise, timesteps) comes from a generator seeded by (seed, phase, step), and the latent bank's
augmentations from one seeded by (seed, "latents", variant), so a resumed fit rebuilds the same bank. Resume: a checkpoint
(weights, optimizer, LR schedule, phase, step, MLflow run id) is written atomically every
`fit.checkpoint_every` steps to `<out>.checkpoint/`; `--resume` continues from it and reaches bit-identical
weights. Tracking: an MLflow run like training's (all params, per-step losses, the dataset as input, the
folder as artifacts).

What it is not: a model of people in general. It is fitted to about ten people; it shows the mechanisms
working and lets the platform measure them offline, and it does not generalise to new faces.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel

from magicid.config import FitParams, Params
from magicid.errors import ConfigError
from magicid.models.backbone import Backbone
from magicid.models.tiny import TinyBackboneConfig, build_tiny_backbone
from magicid.utils import atomic_write, atomic_write_dir, atomic_write_text

if TYPE_CHECKING:
    from magicid.training.fit_data import FitData

KEY_FILE = "fit_key.json"
REPORT_FILE = "fit_report.json"
CHECKPOINT_FILE = "checkpoint.pt"
# Captions of the fitting samples. Whole images use the adapter trainer's (`dataset.caption_for`); a zoomed face
# crop is a close-up. Every word is in the tiny tokenizer's corpus.
FACE_CROP_CAPTION = "a close up photo of a face"
_PHASES = ("vae", "unet", "latents")  # append only: the index seeds the generators


@dataclasses.dataclass
class FitResult:
    out_dir: Path
    run_id: str | None
    seconds: float
    vae_losses: dict[int, float]
    unet_losses: dict[int, float]
    scaling_factor: float
    reused: bool = False


def step_generator(seed: int, phase: str, step: int) -> torch.Generator:
    """The CPU generator of every random draw of (phase, step): a pure function, so resume is exact."""
    state = np.random.SeedSequence([seed, _PHASES.index(phase), step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def augment(images: torch.Tensor, fit: FitParams, out_size: int, generator: torch.Generator) -> torch.Tensor:
    """Random flips, zoom/translate jitter and colour jitter.

    Args:
        images: (B, 3, H, W) in [-1, 1].
        fit: `fit.flip`, `fit.scale_jitter` (zoom in by up to 1 + this), `fit.translate_jitter` (shift by up to
            this fraction of the side), `fit.color_jitter` (brightness/contrast/saturation amplitude).
        out_size: output side.
        generator: the step's CPU generator (all draws come from it).

    Returns:
        (B, 3, out_size, out_size) in [-1, 1].
    """
    n = images.shape[0]
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if fit.flip else torch.ones(n)
    zoom = _uniform(n, 1.0, 1.0 + fit.scale_jitter, generator)
    shift = _uniform(2 * n, -fit.translate_jitter, fit.translate_jitter, generator).view(n, 2) * 2
    theta = torch.zeros(n, 2, 3)
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
) -> tuple[torch.Tensor, list[str]]:
    """`batch` pictures: each a face crop with probability `face_prob`, else a whole image (uniform picks).

    Returns:
        (batch, 3, R, R) in [-1, 1], and the captions.
    """
    is_face = torch.rand(batch, generator=generator) < face_prob
    whole_pick = torch.randint(0, data.whole.shape[0], (batch,), generator=generator)
    crop_pick = torch.randint(0, data.crops.shape[0], (batch,), generator=generator)
    pictures = torch.where(is_face.view(-1, 1, 1, 1), data.crops[crop_pick], data.whole[whole_pick])
    captions = [
        FACE_CROP_CAPTION if face else data.whole_captions[int(w)]
        for face, w in zip(is_face.tolist(), whole_pick, strict=True)
    ]
    return pictures, captions


def random_patches(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A random `size` x `size` patch of each image (B, C, H, W); `size` 0 or >= the side: the images as they are."""
    side = images.shape[-1]
    if not size or size >= side:
        return images
    offsets = torch.randint(0, side - size + 1, (images.shape[0], 2), generator=generator).tolist()
    return torch.stack(
        [image[:, y : y + size, x : x + size] for image, (y, x) in zip(images, offsets, strict=True)]
    )


@dataclasses.dataclass
class LatentBank:
    """Every fitting picture encoded by the frozen VAE once per augmentation variant (unscaled posterior).

    Attributes:
        mean, std: (V, N, 4, h, w): variant v of picture n; pictures are the whole images, then the face crops.
        n_whole: how many of the N pictures are whole images.
        captions: N captions (whole images: `caption_for(n_faces)`, crops: `FACE_CROP_CAPTION`).
    """

    mean: torch.Tensor
    std: torch.Tensor
    n_whole: int
    captions: list[str]

    def sample(
        self,
        batch: int,
        face_prob: float,
        scaling_factor: float,
        generator: torch.Generator,
        augment_prob: float = 0.0,
    ) -> tuple[torch.Tensor, list[str]]:
        """`batch` scaled latents: each of a face crop with probability `face_prob`, else of a whole image (uniform
        picks), sampled from its posterior; and their captions. Each is of an augmented variant (uniform over
        1..V-1) with probability `augment_prob`, else of the picture as it is (variant 0)."""
        n_crops = self.mean.shape[1] - self.n_whole
        is_face = torch.rand(batch, generator=generator) < face_prob
        whole_pick = torch.randint(0, self.n_whole, (batch,), generator=generator)
        crop_pick = self.n_whole + torch.randint(0, n_crops, (batch,), generator=generator)
        picture = torch.where(is_face, crop_pick, whole_pick)
        is_augmented = torch.rand(batch, generator=generator) < augment_prob
        if is_augmented.any() and self.mean.shape[0] < 2:
            raise ValueError("augment_prob > 0 needs a bank with augmented variants (latent_variants >= 2)")
        augmented = 1 + torch.randint(0, max(1, self.mean.shape[0] - 1), (batch,), generator=generator)
        variant = torch.where(is_augmented, augmented, torch.zeros_like(augmented))
        mean, std = self.mean[variant, picture], self.std[variant, picture]
        latents = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling_factor
        return latents, [self.captions[int(i)] for i in picture]


@torch.no_grad()
def encode_latent_bank(vae, data: FitData, fit: FitParams, seed: int, chunk: int = 8) -> LatentBank:
    """The UNet phase's `LatentBank`: variant 0 un-augmented, variants 1.. through `augment` (seeded per variant);
    only variant 0 when `fit.unet_augment_prob` is 0 (no step would draw the others)."""
    pictures = torch.cat([data.whole, data.crops])
    means, stds = [], []
    for variant in range(fit.latent_variants if fit.unet_augment_prob > 0 else 1):
        views = pictures
        if variant:
            views = augment(pictures, fit, fit.resolution, step_generator(seed, "latents", variant))
        posteriors = [vae.encode(part).latent_dist for part in views.split(chunk)]
        means.append(torch.cat([p.mean for p in posteriors]))
        stds.append(torch.cat([p.std for p in posteriors]))
    captions = list(data.whole_captions) + [FACE_CROP_CAPTION] * data.crops.shape[0]
    return LatentBank(torch.stack(means), torch.stack(stds), data.whole.shape[0], captions)


def sobel(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2C, H, W): horizontal and vertical Sobel gradients per channel."""
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=images.dtype) / 4
    kernels = torch.stack([kx, kx.T]).unsqueeze(1).repeat(images.shape[1], 1, 1, 1)  # (2C, 1, 3, 3)
    return F.conv2d(
        F.pad(images, (1, 1, 1, 1), mode="replicate"), kernels.to(images.device), groups=images.shape[1]
    )


def vae_loss(
    vae, images: torch.Tensor, fit: FitParams, generator: torch.Generator
) -> tuple[torch.Tensor, dict]:
    """The VAE objective on (B, 3, H, W) images in [-1, 1]; returns (scalar loss, float parts for logging)."""
    posterior = vae.encode(images).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator)
    latents = posterior.mean + posterior.std * noise
    recon = vae.decode(latents).sample
    l1 = (recon - images).abs().mean()
    mse = (recon - images).pow(2).mean()
    edge = (sobel(recon) - sobel(images)).abs().mean()
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
    loss = l1 + mse + fit.edge_weight * edge + fit.kl_weight * kl
    parts = {
        name: float(value.detach()) for name, value in (("vae_loss", loss), ("vae_l1", l1), ("vae_kl", kl))
    }
    parts["vae_psnr"] = 10 * math.log10(4.0 / max(float(mse.detach()), 1e-12))  # peak-to-peak 2 in [-1, 1]
    return loss, parts


def fit_scaling_factor(bank: LatentBank) -> float:
    """1 / std of the latent means of every whole image and face crop as they are (the bank's variant 0)."""
    return float(1.0 / bank.mean[0].float().std())


def training_noise(shape: torch.Size, offset: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, I) noise of `shape` (B, C, h, w) plus `offset` x a per-(sample, channel) constant ("offset noise",
    Guttenberg 2023; diffusers' `--noise_offset`).

    Why: at the last timestep SD's schedule keeps 6.8 % of the signal, so a plain fit learns to read each
    picture's mean colour from the noise, and sampling, which starts from pure noise, gives every generation
    the data's average tint. The constant term makes the mean colour something the UNet must generate.
    On the fitted tiny backbone it removed the tint; detected faces in 16 "a photo of a person" generations went
    from 6 to 8, within the run-to-run spread of about 3 (README).
    """
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise


def unet_loss(
    backbone: Backbone,
    latents: torch.Tensor,
    text: torch.Tensor,
    generator: torch.Generator,
    min_snr_gamma: float | None = None,
    offset_noise: float = 0.0,
) -> torch.Tensor:
    """The denoising loss of one batch of scaled latents (B, 4, h, w) with text (B, 77, C).

    The target follows the scheduler's `prediction_type`: the noise (epsilon) or the velocity
    (v_prediction, as SD 2.x). `min_snr_gamma`: Min-SNR-gamma weighting (Hang et al. 2023), min(SNR, gamma) / SNR
    for epsilon and min(SNR, gamma) / (SNR + 1) for v; None: unweighted. `offset_noise`: see `training_noise`.
    """
    scheduler = backbone.scheduler
    noise = training_noise(latents.shape, offset_noise, generator)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
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
        "fit": fit.model_dump(mode="json"),
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


def _checkpoint_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".checkpoint")


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _optimizer_step(loss: torch.Tensor, module: torch.nn.Module, optimizer, scheduler, max_grad_norm: float):
    """One update of either phase: backward, clip the module's gradients, step the optimizer and LR schedule."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), max_grad_norm, foreach=True)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


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
        params: `seed`, `fit`, `tracking`.
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
        DataError: a bad `data_dir`. ConfigError: `--resume` without a matching checkpoint.
    """
    from tqdm.auto import tqdm

    from magicid.training.tracking import RunTracker
    from magicid.training.trainer import TextEncoderCache

    start = time.perf_counter()
    out_dir = Path(out_dir)
    fit = fit_settings(params, quality)
    from magicid.training.fit_data import load_fit_data

    data = load_fit_data(data_dir, fit)
    key = fit_key(params, fit, data.version)
    ckpt_path = _checkpoint_dir(out_dir) / CHECKPOINT_FILE
    state: dict[str, Any] | None = None
    if resume:
        if not ckpt_path.is_file():
            raise ConfigError(
                f"--resume: no checkpoint at {ckpt_path}; run fit-backbone without --resume first"
            )
        try:
            state = torch.load(ckpt_path, weights_only=False)
            saved_key = state["key"]
        except Exception as error:  # noqa: BLE001 - damage shows as pickle, zip, EOF, type or key errors alike
            raise ConfigError(
                f"--resume: {ckpt_path} is damaged or not a fit-backbone checkpoint ({type(error).__name__}: "
                f"{str(error)[:120]}); delete {ckpt_path.parent} and run fit-backbone without --resume"
            ) from error
        if saved_key != key["key"]:
            raise ConfigError(
                f"--resume: {ckpt_path} was made from other inputs (dataset version or fit params changed); "
                "delete it or run without --resume"
            )

    backbone = build_tiny_backbone(TinyBackboneConfig(seed=params.seed))
    backbone.scheduler.register_to_config(prediction_type=fit.prediction_type)
    vae, unet = backbone.vae, backbone.unet
    total = fit.vae_steps + fit.unet_steps
    phase, step = "vae", 0
    # fused: one kernel over all parameters; the default on CPU is a Python loop over them, a tenth of a tiny step.
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=fit.vae_lr, weight_decay=0.0, fused=True)
    unet_opt = torch.optim.AdamW(unet.parameters(), lr=fit.unet_lr, weight_decay=fit.weight_decay, fused=True)
    vae_sched = torch.optim.lr_scheduler.LambdaLR(vae_opt, _lr_lambda(fit.vae_steps, fit.warmup_steps))
    unet_sched = torch.optim.lr_scheduler.LambdaLR(unet_opt, _lr_lambda(fit.unet_steps, fit.warmup_steps))
    # The UNet folder holds the exponential moving average of its weights (when `fit.ema_decay` is set): a short,
    # high-LR fit ends on noisy weights, and sampling from their average gives cleaner pictures (as SD's EMA
    # weights do). diffusers' EMAModel with warm-up: decay = min(ema_decay, 1 - (1 + step) ** -2/3).
    ema = (
        EMAModel(unet.parameters(), decay=fit.ema_decay, use_ema_warmup=True, foreach=True)
        if fit.ema_decay
        else None
    )
    vae_losses: dict[int, float] = {}
    unet_losses: dict[int, float] = {}
    run_id = None
    if state is not None:
        vae.load_state_dict(state["vae"])
        unet.load_state_dict(state["unet"])
        vae_opt.load_state_dict(state["vae_opt"])
        unet_opt.load_state_dict(state["unet_opt"])
        vae_sched.load_state_dict(state["vae_sched"])
        unet_sched.load_state_dict(state["unet_sched"])
        if ema is not None:
            ema.load_state_dict(state["unet_ema"])
        phase, step, run_id = state["phase"], int(state["step"]), state.get("run_id")
        if state.get("scaling_factor") is not None:
            vae.register_to_config(scaling_factor=float(state["scaling_factor"]))

    tracker = RunTracker(params, enabled=track)
    if tracker.start(
        run_id, run_name=f"fit-backbone-{Path(data_dir).name}", source_name="magicid fit-backbone"
    ):
        tracker.log_params(
            {
                "data_dir": str(data_dir),
                "dataset_version": data.version,
                "fit_key": key["key"],
                "fit_quality": quality,
                "n_whole_images": data.whole.shape[0],
                "n_face_crops": data.crops.shape[0],
                "n_identities": len({i for i in data.crop_identities if i}),
                "fit_vae_steps_effective": fit.vae_steps,
                "fit_unet_steps_effective": fit.unet_steps,
            }
        )
    done = step + (fit.vae_steps if phase == "unet" else 0)
    bar = tqdm(total=total, initial=done, desc="fit-backbone", disable=not progress)
    texts = TextEncoderCache(backbone)
    bank: LatentBank | None = None
    status = "FAILED"

    def checkpoint() -> None:
        _save_checkpoint(
            ckpt_path,
            {
                "key": key["key"],
                "phase": phase,
                "step": step,
                "run_id": tracker.run_id,
                "scaling_factor": float(vae.config.scaling_factor) if phase == "unet" else None,
                "vae": vae.state_dict(),
                "unet": unet.state_dict(),
                "vae_opt": vae_opt.state_dict(),
                "unet_opt": unet_opt.state_dict(),
                "vae_sched": vae_sched.state_dict(),
                "unet_sched": unet_sched.state_dict(),
                "unet_ema": ema.state_dict() if ema is not None else None,
            },
        )
        tracker.flush()

    try:
        # 1. The VAE.
        if phase == "vae":
            vae.train().requires_grad_(True)
            while step < fit.vae_steps:
                generator = step_generator(params.seed, "vae", step)
                pictures, _ = sample_batch(data, fit.vae_batch, fit.face_prob, generator)
                pictures = augment(pictures, fit, fit.vae_resolution, generator)
                pictures = random_patches(pictures, fit.vae_patch, generator)
                loss, parts = vae_loss(vae, pictures, fit, generator)
                _optimizer_step(loss, vae, vae_opt, vae_sched, fit.max_grad_norm)
                step += 1
                done += 1
                vae_losses[step] = parts["vae_loss"]
                tracker.metrics({**parts, "vae_lr": vae_sched.get_last_lr()[0]}, step)
                bar.update(1)
                bar.set_postfix(phase="vae", loss=f"{parts['vae_loss']:.4f}", psnr=f"{parts['vae_psnr']:.1f}")
                if step % fit.checkpoint_every == 0 or step == fit.vae_steps or done == stop_after:
                    checkpoint()
                if done == stop_after:
                    break
            if done == stop_after:
                status = "KILLED"
                return FitResult(
                    out_dir, tracker.run_id, time.perf_counter() - start, vae_losses, {}, float("nan")
                )
            vae.eval().requires_grad_(False)
            bank = encode_latent_bank(vae, data, fit, params.seed)
            vae.register_to_config(scaling_factor=fit_scaling_factor(bank))
            tracker.metrics({"vae_scaling_factor": float(vae.config.scaling_factor)}, step)
            phase, step = "unet", 0
            checkpoint()
        vae.eval().requires_grad_(False)
        if bank is None:  # resumed in the UNet phase: the same bank again (seeded, from the same VAE weights)
            bank = encode_latent_bank(vae, data, fit, params.seed)

        # 2. The UNet, on the bank's latents of the fitted VAE.
        unet.train().requires_grad_(True)
        scaling_factor = float(vae.config.scaling_factor)
        while step < fit.unet_steps:
            generator = step_generator(params.seed, "unet", step)
            latents, captions = bank.sample(
                fit.unet_batch, fit.face_prob, scaling_factor, generator, fit.unet_augment_prob
            )
            dropped = torch.rand(len(captions), generator=generator) < fit.text_dropout
            captions = [
                "" if drop else caption for drop, caption in zip(dropped.tolist(), captions, strict=True)
            ]
            loss = unet_loss(
                backbone, latents, texts(captions), generator, fit.min_snr_gamma, fit.offset_noise
            )
            _optimizer_step(loss, unet, unet_opt, unet_sched, fit.max_grad_norm)
            if ema is not None:
                ema.step(unet.parameters())
            step += 1
            done += 1
            value = float(loss.detach())
            unet_losses[step] = value
            tracker.metrics(
                {"unet_loss": value, "unet_lr": unet_sched.get_last_lr()[0]}, fit.vae_steps + step
            )
            bar.update(1)
            bar.set_postfix(phase="unet", loss=f"{value:.4f}")
            if step % fit.checkpoint_every == 0 or done == stop_after:
                checkpoint()
            if done == stop_after and step < fit.unet_steps:
                status = "KILLED"
                return FitResult(
                    out_dir,
                    tracker.run_id,
                    time.perf_counter() - start,
                    vae_losses,
                    unet_losses,
                    float(vae.config.scaling_factor),
                )
        unet.eval().requires_grad_(False)
        if ema is not None:
            ema.copy_to(unet.parameters())

        # 3. The folder, swapped in whole.
        seconds = time.perf_counter() - start
        report = {
            "dataset_version": data.version,
            "seconds_this_call": round(seconds, 2),
            "resumed": resume,
            "vae_steps": fit.vae_steps,
            "unet_steps": fit.unet_steps,
            "scaling_factor": float(vae.config.scaling_factor),
            "final_vae_loss": vae_losses.get(fit.vae_steps),
            "final_unet_loss": unet_losses.get(fit.unet_steps),
            "identities": sorted({i for i in data.crop_identities if i}),
        }

        def write(tmp: Path) -> None:
            backbone.save_pretrained(tmp)
            atomic_write_text(tmp / KEY_FILE, json.dumps(key, indent=2, sort_keys=True) + "\n")
            atomic_write_text(tmp / REPORT_FILE, json.dumps(report, indent=2) + "\n")

        atomic_write_dir(out_dir, write)
        tracker.metrics({"fit_seconds": seconds}, total)
        tracker.artifacts(out_dir, "backbone")
        shutil.rmtree(_checkpoint_dir(out_dir), ignore_errors=True)
        status = "FINISHED"
    finally:
        bar.close()
        tracker.end(status)
    return FitResult(
        out_dir,
        tracker.run_id,
        time.perf_counter() - start,
        vae_losses,
        unet_losses,
        float(vae.config.scaling_factor),
    )


def ensure_fitted_backbone(
    params: Params, data_dir: str | Path, out_dir: str | Path, progress: bool = True, track: bool = True
) -> FitResult:
    """The fitted folder at `out_dir`: reused while its inputs (dataset version + fit params + seed) are unchanged
    (its `fit_key.json` matches), else fitted afresh (the demo's default backbone)."""
    from magicid.training.trainer import dataset_version

    version, _ = dataset_version(data_dir)
    key = fit_key(params, fit_settings(params, quality=False), version)["key"]
    if read_fit_key(out_dir) == key:
        report = json.loads((Path(out_dir) / REPORT_FILE).read_text())
        return FitResult(Path(out_dir), None, 0.0, {}, {}, float(report["scaling_factor"]), reused=True)
    return fit_backbone(params, data_dir, out_dir, progress=progress, track=track)
