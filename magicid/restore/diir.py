"""DIIR: DDIM-Inversion ID Restoration (MagicID's training-free face restoration, DESIGN §4).

Small faces in a generated group photo come out with weak identity. DIIR restores them without touching
anything else:

1. detect faces (or take given boxes); keep those whose box covers less than `diir.max_face_ratio` of the
   image (or all of them);
2. crop each with a margin (square) and zoom it to a resolution bucket: the smallest bucket in
   `diir.buckets` that is >= `diir.zoom` x the crop side (see `choose_bucket`);
3. encode with the VAE and DDIM-invert the latents up to `diir.strength` of the trajectory, conditioned on
   the face's landmark map through the ControlNet. Plain DDIM inversion uses the noise prediction at the
   step's start where the denoising step uses it at the step's end, so it does not round-trip; each
   inverse step is refined by fixed-point iteration (`ddim_invert`), stopping per face once the estimated
   distance to the exact inverse (Banach's a-posteriori bound, from the measured contraction) is below
   `diir.inversion_tol`;
4. denoise from there with the identity's global (face-recognition embedding) + local (face crop)
   features through MGMICA, masked to the face, plus the landmark conditioning;
5. decode, resize back, and blend into the image with a feathered face mask, in uint8, so that every
   pixel outside the mask is the input's, bit for bit.

All selected faces go through the UNet batched: grouped by bucket, one batch per bucket, chunked by
`diir.batch`; the fixed-point refinement evaluates the UNet only on the faces that have not converged.

Identity: Hungarian matching of the detected faces' embeddings to the references' (or an explicit
assignment); without references each face is restored with its own embedding.

Plug-and-play: `DIIR.from_pipe(pipe)` takes the components of any diffusers Stable Diffusion pipeline
(MagicID's included); without an adapter DIIR runs the same inversion/regeneration without identity
features or landmark conditioning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image

from magicid.errors import DataError, MagicIDError

if TYPE_CHECKING:
    from magicid.config import Params

# ---------------------------------------------------------------------------------------------------------
# 1. DDIM inversion with fixed-point refinement
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Conditioning:
    """Everything the noise prediction depends on besides `x_t` and `t`, for a batch of B crops.

    Attributes:
        encoder_hidden_states: text embeddings (B, L, C).
        controlnet: a `ControlNetModel` (MMF, `conditioning_channels=6`) or None.
        control: its condition image (B, 6, H, W) in [0, 1] at pixel resolution (H = 8 x latent height),
            or, with `control_embedded`, the output of `controlnet.controlnet_cond_embedding` on it.
        control_embedded: `control` is already embedded (see `embed_control`).
        control_scale: ControlNet residual scale.
        id_tokens: MGMICA identity tokens (B, n_ids, T, C), or None (identity attention off).
        id_masks: the identities' masks (B, n_ids, H, W) in [0, 1], any resolution.
        id_scale: MGMICA scale (None: the processors' own).
        uncond_hidden_states: unconditional text embeddings (B, L, C) for classifier-free guidance.
        guidance_scale: CFG scale; <= 1 means one conditional pass, no CFG.
    """

    encoder_hidden_states: torch.Tensor
    controlnet: torch.nn.Module | None = None
    control: torch.Tensor | None = None
    control_embedded: bool = False
    control_scale: float = 1.0
    id_tokens: torch.Tensor | None = None
    id_masks: torch.Tensor | None = None
    id_scale: float | None = None
    uncond_hidden_states: torch.Tensor | None = None
    guidance_scale: float = 1.0

    @property
    def batch_size(self) -> int:
        return int(self.encoder_hidden_states.shape[0])

    @property
    def use_cfg(self) -> bool:
        return self.guidance_scale > 1.0 and self.uncond_hidden_states is not None

    def select(self, rows: torch.Tensor) -> Conditioning:
        """The conditioning of a subset of the batch (`rows`: long tensor of indices)."""

        def pick(value: Any) -> Any:
            return value[rows] if isinstance(value, torch.Tensor) else value

        return dataclasses.replace(
            self, **{f.name: pick(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )

    def without_identity(self) -> Conditioning:
        return dataclasses.replace(self, id_tokens=None, id_masks=None)


def _as_conditioning(cond: Conditioning | torch.Tensor) -> Conditioning:
    return cond if isinstance(cond, Conditioning) else Conditioning(encoder_hidden_states=cond)


def _has_mgmica(unet: torch.nn.Module) -> bool:
    """Whether MGMICA is installed on `unet` (cheap: checked on every UNet call)."""
    from magicid.models.mgmica import mgmica_context

    return mgmica_context(unet) is not None


def _apply_identities(unet: torch.nn.Module, cond: Conditioning) -> None:
    """Put `cond`'s identities (or none) on the UNet's MGMICA processors, only when they change.

    Called before every UNet evaluation. Re-setting the same identities would bump MGMICA's version and throw
    away its per-layer caches (identity K/V, mask gather indices) at every denoising step, and walk the
    UNet's processors to set the scale: so a run of calls with the same conditioning sets them once.
    """
    from magicid.models.mgmica import mgmica_context

    context = mgmica_context(unet)
    if cond.id_tokens is None:
        if context is not None and context.tokens is not None:
            from magicid.models.mgmica import clear_identities

            clear_identities(unet)
        return
    applied = getattr(unet, "_diir_applied_identities", None)
    if (
        applied is not None
        and applied[0] == context.version
        and applied[1] is cond.id_tokens
        and applied[2] is cond.id_masks
        and applied[3] == cond.id_scale
    ):
        return
    from magicid.models.mgmica import set_identities

    # With CFG (batch 2B) MGMICA repeats B identities onto both halves: guidance acts on the text only.
    set_identities(unet, cond.id_tokens, cond.id_masks, scale=cond.id_scale)
    unet._diir_applied_identities = (context.version, cond.id_tokens, cond.id_masks, cond.id_scale)


def embed_control(controlnet: torch.nn.Module, control: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Run the ControlNet's conditioning embedding once for a whole denoising/inversion run.

    The embedding (convs at full pixel resolution: the costliest part of a small ControlNet) depends on the
    condition map only, not on x_t or t, so DIIR computes it once per batch instead of at every UNet call.

    Returns:
        (the embedded condition (B, C, h, w), True), or (control, False) where the ControlNet flips channels.
    """
    if getattr(controlnet.config, "controlnet_conditioning_channel_order", "rgb") != "rgb":
        return control, False
    return controlnet.controlnet_cond_embedding(control), True


@contextlib.contextmanager
def _embedding_precomputed(controlnet: torch.nn.Module, active: bool) -> Iterator[None]:
    """While active, the ControlNet takes an already embedded condition (its embedding is an identity)."""
    if not active:
        yield
        return
    original = controlnet.controlnet_cond_embedding
    controlnet.controlnet_cond_embedding = torch.nn.Identity()
    try:
        yield
    finally:
        controlnet.controlnet_cond_embedding = original


def to_epsilon(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_prod: torch.Tensor, prediction_type: str
):
    """The model output of any diffusers prediction type as a noise prediction epsilon."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_prod**0.5 * model_output + (1 - alpha_prod) ** 0.5 * sample
    if prediction_type == "sample":
        return (sample - alpha_prod**0.5 * model_output) / (1 - alpha_prod) ** 0.5
    raise MagicIDError(
        f"scheduler prediction_type={prediction_type!r}: DIIR supports epsilon, v_prediction, sample"
    )


@torch.no_grad()
def predict_noise(
    unet: torch.nn.Module,
    scheduler: Any,
    sample: torch.Tensor,
    timestep: int,
    cond: Conditioning,
) -> torch.Tensor:
    """epsilon(x_t, t) for a batch: ControlNet residuals, MGMICA identities and CFG as `cond` says.

    Args:
        sample: latents x_t (B, 4, h, w).
        timestep: the training timestep t (an int in [0, num_train_timesteps)).
        cond: the batch's conditioning (batch B).

    Returns:
        The noise prediction (B, 4, h, w), converted to epsilon whatever the scheduler's prediction type.
    """
    repeat = 2 if cond.use_cfg else 1
    hidden = cond.encoder_hidden_states
    if repeat == 2:
        hidden = torch.cat([cond.uncond_hidden_states, hidden])
    model_in = torch.cat([sample] * repeat)
    t = torch.tensor(timestep, device=sample.device)
    extra: dict[str, Any] = {}
    if cond.controlnet is not None and cond.control is not None:
        control = torch.cat([cond.control] * repeat).to(sample.dtype)
        with _embedding_precomputed(cond.controlnet, cond.control_embedded):
            down, mid = cond.controlnet(
                model_in, t, encoder_hidden_states=hidden, controlnet_cond=control,
                conditioning_scale=cond.control_scale, return_dict=False,
            )  # fmt: skip
        extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    _apply_identities(unet, cond)
    out = unet(model_in, t, encoder_hidden_states=hidden, return_dict=False, **extra)[0]
    if repeat == 2:
        uncond, text = out.chunk(2)
        out = uncond + cond.guidance_scale * (text - uncond)
    alpha_prod = _alpha_prod(scheduler, timestep).to(sample.device, sample.dtype)
    return to_epsilon(out, sample, alpha_prod, scheduler.config.prediction_type)


def _alpha_prod(scheduler: Any, timestep: int) -> torch.Tensor:
    """alpha-bar at `timestep`; a negative timestep (past the last step) is the scheduler's final alpha.

    The same rule as `DDIMScheduler.step`, so inversion and denoising walk the same levels: with SD's
    `set_alpha_to_one=False` the clean end is `final_alpha_cumprod = alphas_cumprod[0]`, not 1.
    """
    if timestep >= 0:
        return scheduler.alphas_cumprod[timestep]
    return torch.as_tensor(scheduler.final_alpha_cumprod)


def ddim_step(sample: torch.Tensor, eps: torch.Tensor, alpha_from: torch.Tensor, alpha_to: torch.Tensor):
    """One deterministic DDIM move (eta = 0) between noise levels, in either direction.

    x_to = sqrt(a_to) * (x_from - sqrt(1 - a_from) * eps) / sqrt(a_from) + sqrt(1 - a_to) * eps.
    Denoising (a_to > a_from) with eps = eps(x_from, t_from) is exactly `DDIMScheduler.step`; inverting
    (a_to < a_from) is exact when eps = eps(x_to, t_to), which `ddim_invert` solves for by fixed point.
    """
    alpha_from = alpha_from.to(sample.device, sample.dtype)
    alpha_to = alpha_to.to(sample.device, sample.dtype)
    pred_original = (sample - (1 - alpha_from) ** 0.5 * eps) / alpha_from**0.5
    return alpha_to**0.5 * pred_original + (1 - alpha_to) ** 0.5 * eps


def strength_timesteps(scheduler: Any, num_inference_steps: int, strength: float) -> list[int]:
    """The denoising timesteps (descending) that `strength` of a `num_inference_steps` schedule runs.

    As diffusers' img2img: the last `int(num_inference_steps * strength)` of the scheduler's timesteps.
    Sets the scheduler's timesteps (so that `scheduler.step` agrees with this schedule).
    """
    if not 0.0 <= strength <= 1.0:
        raise MagicIDError(f"diir.strength={strength}: must be in [0, 1]")
    scheduler.set_timesteps(num_inference_steps)
    n_run = min(int(num_inference_steps * strength), num_inference_steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    return timesteps[len(timesteps) - n_run :] if n_run else []


def _previous_timestep(scheduler: Any, timestep: int) -> int:
    # DDIMScheduler.step's own rule for the level a denoising step lands on.
    return timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


@dataclasses.dataclass
class InversionResult:
    """What `ddim_invert` returns.

    Attributes:
        latents: the inverted latents x_T (B, 4, h, w) at `timesteps[0]`.
        timesteps: the denoising timesteps (descending) that reconstruct from `latents`.
        iterations: fixed-point refinements spent per inverse step and sample (n_steps, B), in inversion order
            (UNet evaluations beyond the first step's plain one).
        unet_calls: UNet invocations (each on the still-unconverged subset).
        sample_evals: UNet evaluations counted per sample (sum of the invocations' batch sizes).
        final_update: the last relative update per inverse step and sample (n_steps, B).
        error_estimate: the estimated relative distance to the exact inverse that each step stopped at
            (n_steps, B): `L / (1 - L) * final_update`, see `ddim_invert`.
    """

    latents: torch.Tensor
    timesteps: list[int]
    iterations: torch.Tensor
    unet_calls: int
    sample_evals: int
    final_update: torch.Tensor
    error_estimate: torch.Tensor


# The eps-network's gain J (||eps(a) - eps(b)|| / ||a - b||, relative to the latents' scale) assumed before
# any has been observed. Observed on the tiny backbone: ~1.0-1.1. The prior only decides the first iteration
# of the first inverse step; from then on each sample's gain is measured (see `ddim_invert`).
GAIN_PRIOR = 2.0
# Below this relative update, successive updates are float32 noise and say nothing about the gain.
_GAIN_FLOOR = 1e-5


def _relative_update(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """||new - old|| / ||new|| per sample (B,)."""
    diff = (new - old).flatten(1).norm(dim=1)
    return diff / new.flatten(1).norm(dim=1).clamp_min(1e-12)


def inverse_step_noise_coefficient(alpha_from: torch.Tensor, alpha_to: torch.Tensor) -> float:
    """|d x_to / d eps| of `ddim_step` between two noise levels: sqrt(1-a_to) - sqrt(a_to/a_from) sqrt(1-a_from).

    The fixed-point map of an inverse step, x -> ddim_step(x_prev, eps(x, t)), contracts by this times the
    eps-network's gain: tiny for the first step (t = 1: ~0.01), ~0.2-0.3 for steps of 100 timesteps.
    """
    alpha_from, alpha_to = float(alpha_from), float(alpha_to)
    return abs((1 - alpha_to) ** 0.5 - (alpha_to / alpha_from) ** 0.5 * (1 - alpha_from) ** 0.5)


@torch.no_grad()
def ddim_invert(
    unet: torch.nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    cond: Conditioning | torch.Tensor,
    num_inference_steps: int,
    strength: float,
    max_iters: int = 3,
    tol: float = 1e-4,
    noise_fn: Callable[[torch.Tensor, int, Conditioning], torch.Tensor] | None = None,
    warm_start: bool = True,
    progress: Callable[[int], None] | None = None,
) -> InversionResult:
    """DDIM-invert clean latents up to `strength` of the trajectory, refining each step by fixed point.

    For the inverse step t_prev -> t (alpha-bars a_prev > a_t), the exact inverse of the denoising step
    needs eps(x_t, t), which depends on the unknown x_t. Plain inversion (diffusers' `DDIMInverseScheduler`)
    uses eps(x_{t_prev}, t): one iteration of
        x_t^{k+1} = g(x_t^k) = ddim_step(x_{t_prev}, eps(x_t^k, t)),   x_t^0 = x_{t_prev}.
    Later steps start from a free guess instead (`warm_start`: the previous step's last eps, no UNet call).
    Each sample iterates until its estimated distance to the fixed point is below `tol`. g contracts by
    L = c * J (c: `inverse_step_noise_coefficient`, J: the eps-network's gain), so after an update
    d = ||x^{k+1} - x^k|| / ||x^{k+1}|| the distance left is at most L / (1 - L) * d (Banach's a-posteriori
    bound). J is measured per sample from successive updates (d_{k+1} / (c d_k)), starting at `GAIN_PRIOR`.
    Where c is tiny (the first step, 1 timestep from the clean end) the plain step is already within
    `tol`; where it is large the refinement continues. Converged samples leave the batch: later iterations
    evaluate the UNet only on the rest.

    Args:
        unet: a `UNet2DConditionModel` (any SD-style 4-channel UNet).
        scheduler: a `DDIMScheduler` (its alphas, `final_alpha_cumprod` and prediction type are used; its
            timesteps are set to `num_inference_steps`).
        latents: clean latents x_0 (B, 4, h, w), scaled by the VAE's scaling factor.
        cond: a `Conditioning` (or text embeddings (B, L, C)). Inversion should run without CFG.
        num_inference_steps: the length of the full DDIM schedule.
        strength: the fraction of it to invert, in [0, 1].
        max_iters: fixed-point refinements per inverse step beyond the plain step (0 = plain DDIM inversion).
        tol: per-sample tolerance on the estimated relative distance to the exact inverse.
        noise_fn: `(x, t, cond) -> eps` (default: `predict_noise` with `unet` and `scheduler`).
        warm_start: start steps after the first from the previous step's last eps (False: from x_{t_prev}).
        progress: called with the inverse step's index after each inverse step.

    Returns:
        An `InversionResult`; `ddim_reconstruct(..., result.latents, ...)` walks back to `latents`.
    """
    cond = _as_conditioning(cond)
    if cond.batch_size != latents.shape[0]:
        raise MagicIDError(f"conditioning batch {cond.batch_size} != latents batch {latents.shape[0]}")
    if max_iters < 0 or tol < 0:
        raise MagicIDError(f"inversion max_iters={max_iters}, tol={tol}: both must be >= 0")
    noise_fn = noise_fn or (lambda x, t, c: predict_noise(unet, scheduler, x, t, c))
    timesteps = strength_timesteps(scheduler, num_inference_steps, strength)
    batch = latents.shape[0]
    n_steps = len(timesteps)
    iterations = torch.zeros(n_steps, batch, dtype=torch.long)
    final_update = torch.zeros(n_steps, batch)
    error_estimate = torch.zeros(n_steps, batch)
    gain = torch.full((batch,), GAIN_PRIOR)  # per-sample eps gain J, measured as the iterations go
    calls = evals = 0
    x = latents
    last_eps: torch.Tensor | None = None  # the latest eps per sample, evaluated near the step's start
    for step, t in enumerate(reversed(timesteps)):
        alpha_prev = _alpha_prod(scheduler, _previous_timestep(scheduler, t))
        alpha_t = _alpha_prod(scheduler, t)
        coefficient = inverse_step_noise_coefficient(alpha_prev, alpha_t)
        plain_first = last_eps is None or not warm_start or max_iters == 0
        if plain_first:
            # The first iteration from x^0 = x_{t_prev} is the plain DDIM inversion step (its eval is not a
            # refinement); it alone is plain inversion when max_iters = 0.
            x_t = x.clone()
            last_eps = torch.empty_like(x)
        else:
            # A free first guess: the previous step's last eps ~ eps(x_{t_prev}, t_prev).
            x_t = ddim_step(x, last_eps, alpha_prev, alpha_t)
            last_eps = last_eps.clone()
        active = torch.arange(batch, device=latents.device)
        previous_update = torch.full((batch,), math.nan)
        for k in range(max_iters + int(plain_first)):
            sub_cond = cond if len(active) == batch else cond.select(active)
            current = x_t[active]
            eps = noise_fn(current, t, sub_cond)
            last_eps[active] = eps
            refined = ddim_step(x[active], eps, alpha_prev, alpha_t)
            update = _relative_update(refined, current).float().cpu()
            x_t[active] = refined
            calls, evals = calls + 1, evals + len(active)
            rows = active.cpu()
            if k > 0 or not plain_first:
                iterations[step, rows] += 1
            # Each update shrinks the previous one by L = c * J: measure J where the updates are not noise.
            before = previous_update[rows]
            measurable = (before > _GAIN_FLOOR) & (update > _GAIN_FLOOR) & (coefficient > 0)
            gain[rows[measurable]] = update[measurable] / (coefficient * before[measurable])
            previous_update[rows] = update
            contraction = coefficient * gain[rows]
            # Not contracting (L >= 1): no bound, so the sample iterates up to max_iters.
            estimate = torch.where(
                contraction < 1, contraction / (1 - contraction).clamp_min(1e-12) * update, math.inf
            )
            final_update[step, rows] = update
            error_estimate[step, rows] = estimate
            active = active[(estimate >= tol).to(active.device)]
            if len(active) == 0:
                break
        x = x_t
        if progress is not None:
            progress(step)
    return InversionResult(x, timesteps, iterations, calls, evals, final_update, error_estimate)


@torch.no_grad()
def ddim_reconstruct(
    unet: torch.nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    cond: Conditioning | torch.Tensor,
    timesteps: Sequence[int],
    noise_fn: Callable[[torch.Tensor, int, Conditioning], torch.Tensor] | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Denoise inverted latents along `timesteps` (descending) with the same DDIM levels as the inversion.

    Args:
        latents: x_T (B, 4, h, w) at `timesteps[0]` (an `InversionResult.latents`).
        cond: the denoising conditioning (may add identities and CFG to the inversion's).
        timesteps: `InversionResult.timesteps`.

    Returns:
        Clean latents x_0 (B, 4, h, w).
    """
    cond = _as_conditioning(cond)
    if scheduler.num_inference_steps is None:
        raise MagicIDError(
            "ddim_reconstruct: the scheduler has no timesteps set; run ddim_invert with it first"
        )
    noise_fn = noise_fn or (lambda x, t, c: predict_noise(unet, scheduler, x, t, c))
    x = latents
    for i, t in enumerate(timesteps):
        eps = noise_fn(x, t, cond)
        x = ddim_step(
            x, eps, _alpha_prod(scheduler, t), _alpha_prod(scheduler, _previous_timestep(scheduler, t))
        )
        if progress is not None:
            progress(i)
    return x


# ---------------------------------------------------------------------------------------------------------
# 2. Face plan: selection, crop boxes, resolution buckets, blend masks
# ---------------------------------------------------------------------------------------------------------


def choose_bucket(crop_side: float, buckets: Sequence[int], zoom: float) -> int:
    """The crop resolution a face is restored at: the smallest bucket >= `zoom` x its crop side.

    Rule: a face whose square crop (face box plus margin) is `crop_side` px in the image needs about
    `zoom * crop_side` px of model resolution (the zoom that gives a small face enough latent cells for
    identity detail). It gets the smallest bucket that covers that need, so never more resolution than it
    needs (a 24 px face with margin 0.5 needs 2 x 48 = 96 px: bucket 128, not 512). Faces larger than the
    largest bucket get the largest (they are downscaled into it).

    Args:
        crop_side: side (px, in the input image) of the face's square crop box.
        buckets: increasing crop resolutions (multiples of 64).
        zoom: > 0.

    Returns:
        One of `buckets`.
    """
    if not buckets:
        raise MagicIDError("diir.buckets is empty: give increasing multiples of 64, e.g. [64, 128, 256]")
    need = zoom * float(crop_side)
    for bucket in buckets:
        if bucket >= need:
            return int(bucket)
    return int(buckets[-1])


def blend_alpha(
    crop_box: Sequence[int], face_box: Sequence[float], feather: float, image_size: tuple[int, int]
):
    """Feathered blend mask of one face over its crop box, uint8 (side, side) in [0, 255].

    255 inside the face box, falling linearly (smoothstep) to 0 over `feather * side` px outside it, and
    brought to 0 at the crop box's edges that lie inside the image (so the restored crop never leaves a
    seam). 0 means "the input pixel, exactly".
    """
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    side = x1 - x0
    width, height = image_size
    feather_px = max(feather * side, 1.0)
    centres = np.arange(side, dtype=np.float32) + 0.5
    fx0, fy0, fx1, fy1 = (float(face_box[0]) - x0, float(face_box[1]) - y0, float(face_box[2]) - x0,
                          float(face_box[3]) - y0)  # fmt: skip
    dx = np.maximum(np.maximum(fx0 - centres, centres - fx1), 0.0)  # (side,) distance outside the box
    dy = np.maximum(np.maximum(fy0 - centres, centres - fy1), 0.0)
    distance = np.hypot(dy[:, None], dx[None, :])  # (side, side)
    alpha = np.clip(1.0 - distance / feather_px, 0.0, 1.0)

    def edge_ramp(touches_border_low: bool, touches_border_high: bool) -> np.ndarray:
        ramp = np.ones(side, np.float32)
        ramp_px = feather_px / 2
        if not touches_border_low:
            ramp = np.minimum(ramp, (centres - 0.5) / ramp_px)
        if not touches_border_high:
            ramp = np.minimum(ramp, (side - 0.5 - centres) / ramp_px)
        return np.clip(ramp, 0.0, 1.0)

    alpha *= edge_ramp(y0 == 0, y1 == height)[:, None] * edge_ramp(x0 == 0, x1 == width)[None, :]
    alpha = alpha * alpha * (3.0 - 2.0 * alpha)  # smoothstep: no visible kink at either end
    return np.round(alpha * 255.0).astype(np.uint8)


def compose(image: np.ndarray, patch: np.ndarray, alpha: np.ndarray, box: Sequence[int]) -> None:
    """Blend `patch` into `image[box]` in place, in integers: where alpha is 0 the input byte is kept.

    out = (in * (255 - a) + patch * a + 127) // 255, which is `in` exactly for a = 0 and `patch` for a = 255.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    region = image[y0:y1, x0:x1]
    a = alpha.astype(np.uint32)[..., None]
    mixed = (region.astype(np.uint32) * (255 - a) + patch.astype(np.uint32) * a + 127) // 255
    image[y0:y1, x0:x1] = np.where(a > 0, mixed, region).astype(np.uint8)


def hungarian_assign(face_embeddings: np.ndarray, reference_embeddings: np.ndarray) -> list[int | None]:
    """Assign references to faces one-to-one, maximising total cosine similarity (Hungarian algorithm).

    Args:
        face_embeddings: (F, D) face embeddings (L2-normalised).
        reference_embeddings: (R, D) reference embeddings (L2-normalised).

    Returns:
        Per face the reference index, or None for faces left over when F > R.
    """
    from scipy.optimize import linear_sum_assignment

    faces = np.asarray(face_embeddings, dtype=np.float64)
    refs = np.asarray(reference_embeddings, dtype=np.float64)
    if faces.ndim != 2 or refs.ndim != 2 or faces.shape[1] != refs.shape[1]:
        raise MagicIDError(
            f"identity matching: face embeddings {faces.shape} and reference embeddings {refs.shape} must be "
            "(N, D) with the same D (use one face backend for images and references)"
        )
    faces = faces / np.linalg.norm(faces, axis=1, keepdims=True).clip(1e-12)
    refs = refs / np.linalg.norm(refs, axis=1, keepdims=True).clip(1e-12)
    similarity = faces @ refs.T  # (F, R)
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    assigned: list[int | None] = [None] * len(faces)
    for row, col in zip(rows, cols, strict=True):
        assigned[int(row)] = int(col)
    return assigned


@dataclasses.dataclass
class ReferenceIdentity:
    """A reference identity: its face-recognition embedding (global) and a zoomed face crop (local).

    Attributes:
        embedding: (D,) float32, L2-normalised.
        crop: uint8 (S, S, 3) zoomed face crop, or None (the restored face's own crop is used then).
        name: a label for results and logs.
    """

    embedding: np.ndarray
    crop: np.ndarray | None = None
    name: str = ""


@dataclasses.dataclass
class RestoredFace:
    """One face that DIIR restored.

    Attributes:
        bbox: (4,) float32 face box `x0, y0, x1, y1` in input pixels.
        crop_box: `(x0, y0, x1, y1)` the square crop that was restored and blended back.
        bucket: the crop resolution it went through the UNet at.
        identity: index of the reference identity assigned, or None (restored with its own embedding,
            or without identity features when there is no adapter).
        identity_name: the reference's name ("" if none).
        similarity: cosine similarity face-reference of the assignment (None if not matched by embedding).
        alpha: uint8 (side, side) blend mask over `crop_box` (0 = input kept exactly).
        inversion_iterations: fixed-point refinements spent, per inverse step.
    """

    bbox: np.ndarray
    crop_box: tuple[int, int, int, int]
    bucket: int
    identity: int | None
    identity_name: str
    similarity: float | None
    alpha: np.ndarray
    inversion_iterations: list[int]


@dataclasses.dataclass
class RestoreResult:
    """What `DIIR.restore` returns.

    Attributes:
        image: the restored image (PIL RGB, the input's size).
        faces: the restored faces, in input order (left to right when detected).
        mask: uint8 (H, W) union of the faces' blend masks; where it is 0 the output equals the input byte
            for byte.
        note: what happened, in words ("" when every selected face was restored normally).
        stats: counts: `faces_detected`, `faces_restored`, `batches`, `unet_calls`, `unet_sample_evals`,
            `inversion_sample_evals`.
    """

    image: Image.Image
    faces: list[RestoredFace]
    mask: np.ndarray
    note: str = ""
    stats: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Job:
    """One selected face on its way through the pipeline."""

    index: int
    bbox: np.ndarray
    landmarks: np.ndarray | None
    embedding: np.ndarray | None
    crop_box: tuple[int, int, int, int]
    bucket: int
    identity: int | None = None
    similarity: float | None = None


# ---------------------------------------------------------------------------------------------------------
# 3. DIIR
# ---------------------------------------------------------------------------------------------------------

FaceSelection = Literal["small", "all"]


def _as_uint8_image(image: Image.Image | np.ndarray, what: str = "image") -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB")).copy()
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image.copy()
    got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
    raise DataError(f"{what}: expected a PIL image or a uint8 (H, W, 3) RGB array, got {got}")


def _resize(image: np.ndarray, side: int) -> np.ndarray:
    """Square uint8 image -> (side, side): area averaging when shrinking, bicubic when enlarging."""
    import cv2

    if image.shape[0] == side:
        return image
    interpolation = cv2.INTER_AREA if image.shape[0] > side else cv2.INTER_CUBIC
    return cv2.resize(image, (side, side), interpolation=interpolation)


def _to_tensor(images: Sequence[np.ndarray], device, dtype) -> torch.Tensor:
    """uint8 (S, S, 3) images -> (B, 3, S, S) in [-1, 1]."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return (batch.to(device=device, dtype=torch.float32) / 127.5 - 1.0).to(dtype)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) in [-1, 1] -> uint8 (B, S, S, 3)."""
    scaled = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class DIIR:
    """DDIM-Inversion ID Restoration over the components of any diffusers Stable Diffusion pipeline.

    Args:
        unet: `UNet2DConditionModel` (4 input channels). With an adapter it must carry MGMICA
            (`MagicIDAdapter.create/load` installs it).
        vae: `AutoencoderKL`.
        text_encoder, tokenizer: the pipeline's CLIP text encoder and tokenizer.
        scheduler: any diffusers scheduler; DIIR runs a `DDIMScheduler` built from its config (with SD's
            clean-end convention kept), never mutating the given one.
        adapter: a `MagicIDAdapter` (ID encoder, MGMICA projections, ControlNet) or None: then faces are
            inverted and regenerated without identity features or landmark conditioning.
        analyzer: a `FaceAnalyzer` (detection, landmarks, embeddings); default `get_analyzer(params.faces)`,
            built only when needed.
        params: `Params` (reads `diir`, `faces`, `model.id_crop_size`, `model.id_scale`); default: defaults.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        scheduler: Any,
        adapter: torch.nn.Module | None = None,
        analyzer: Any | None = None,
        params: Any | None = None,
    ) -> None:
        from diffusers import DDIMScheduler

        from magicid.config import Params

        self.params = params if params is not None else Params()
        if not isinstance(self.params, Params):
            raise MagicIDError(
                f"DIIR params: expected magicid.config.Params, got {type(self.params).__name__}"
            )
        if getattr(unet.config, "in_channels", 4) != 4:
            raise MagicIDError(
                f"DIIR needs a 4-channel (text-to-image) UNet; got in_channels={unet.config.in_channels} "
                "(an inpainting UNet): pass the base model's UNet"
            )
        if adapter is not None and not _has_mgmica(unet):
            raise MagicIDError(
                "DIIR: the adapter's MGMICA processors are not on this UNet; build the adapter with "
                "MagicIDAdapter.create/load on the same backbone whose unet you pass"
            )
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler = DDIMScheduler.from_config(scheduler.config)
        self.adapter = adapter
        self._analyzer = analyzer
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self._progress_bar_config: dict[str, Any] = {}

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm options for `restore`'s progress bar (as diffusers pipelines: `disable=True` hides it)."""
        self._progress_bar_config = dict(kwargs)

    @classmethod
    def from_pipe(cls, pipe: Any, adapter: torch.nn.Module | None = None, analyzer: Any | None = None,
                  params: Any | None = None) -> DIIR:  # fmt: skip
        """DIIR over a pipeline's components (`StableDiffusionPipeline`, `MagicIDPipeline`, ...).

        Reuses the pipeline's modules (no copy); a pipeline that carries an `adapter` attribute lends it
        unless one is given.
        """
        missing = [
            n
            for n in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
            if getattr(pipe, n, None) is None
        ]
        if missing:
            raise MagicIDError(
                f"DIIR.from_pipe: {type(pipe).__name__} lacks {', '.join(missing)} (an SD pipeline is needed)"
            )
        adapter = adapter if adapter is not None else getattr(pipe, "adapter", None)
        diir = cls(
            pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, adapter, analyzer, params
        )
        # A diffusers pipeline keeps its progress-bar options here; restoring follows them.
        diir.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        return diir

    @property
    def analyzer(self) -> Any:
        if self._analyzer is None:
            from magicid.faces import get_analyzer

            self._analyzer = get_analyzer(self.params.faces)
        return self._analyzer

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    # -- inputs ------------------------------------------------------------------------------------------

    def reference_from_image(self, image: Image.Image | np.ndarray, name: str = "") -> ReferenceIdentity:
        """A reference identity from a photo: its largest face's embedding and zoomed crop.

        Raises:
            DataError: no face found in the photo (the message names it).
        """
        from magicid.data.crops import zoom_crop

        pixels = _as_uint8_image(image, f"reference {name or ''}".strip())
        faces = self.analyzer.analyze(pixels)
        if not faces:
            raise DataError(
                f"reference {name or '(image)'}: no face found; give a photo where the face is visible"
            )
        face = max(faces, key=lambda f: f.width * f.height)
        crop, _ = zoom_crop(pixels, face.bbox, self.params.model.id_crop_size, self.diir_params.crop_margin)
        return ReferenceIdentity(np.asarray(face.embedding, np.float32), crop, name)

    @property
    def diir_params(self):
        return self.params.diir

    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        """(1, L, C) text embeddings, cached per prompt."""
        if prompt not in self._prompt_cache:
            ids = self.tokenizer(
                prompt, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)  # fmt: skip
            with torch.no_grad():
                self._prompt_cache[prompt] = self.text_encoder(ids)[0].to(self.dtype)
        return self._prompt_cache[prompt]

    def _faces(self, image: np.ndarray, boxes: Sequence[Any] | None) -> list[tuple[np.ndarray, Any | None]]:
        """(bbox, Face or None) for every face: detected, or the given boxes / Face objects."""
        if boxes is None:
            return [(np.asarray(f.bbox, np.float32), f) for f in self.analyzer.analyze(image)]
        height, width = image.shape[:2]
        out = []
        for i, box in enumerate(boxes):
            face = box if hasattr(box, "bbox") else None
            bbox = np.asarray(face.bbox if face is not None else box, dtype=np.float32).reshape(-1)
            if (
                bbox.shape != (4,)
                or not np.isfinite(bbox).all()
                or not (0 <= bbox[0] < bbox[2] <= width and 0 <= bbox[1] < bbox[3] <= height)
            ):
                raise DataError(
                    f"boxes[{i}]={bbox.tolist()}: expected x0 < x1, y0 < y1 inside the {width}x{height} image"
                )
            out.append((bbox, face))
        return out

    # -- the mechanism -----------------------------------------------------------------------------------

    @torch.inference_mode()  # lighter than no_grad per op; nothing here needs autograd
    def restore(
        self,
        image: Image.Image | np.ndarray,
        identities: Sequence[ReferenceIdentity | Image.Image | np.ndarray] | None = None,
        prompt: str = "",
        faces: FaceSelection = "small",
        boxes: Sequence[Any] | None = None,
        assignment: Sequence[int | None] | None = None,
    ) -> RestoreResult:
        """Restore the identity of the (small) faces of `image`; everything outside the blend masks is kept.

        Args:
            image: PIL image or uint8 (H, W, 3) RGB array.
            identities: reference identities (`ReferenceIdentity`, or photos: their largest face), or None
                (each face restored with its own embedding).
            prompt: the prompt the image was generated with ("" works).
            faces: "small" (faces whose box covers < `diir.max_face_ratio` of the image) or "all".
            boxes: skip detection: face boxes `(x0, y0, x1, y1)` px, or `Face` objects (landmarks and
                embeddings then used).
            assignment: per selected face the index into `identities` (or None: own embedding); default
                Hungarian matching on embedding similarity.

        Returns:
            A `RestoreResult`.

        Raises:
            DataError: bad image, boxes or reference photos; MagicIDError: inconsistent assignment.
        """
        cfg = self.diir_params
        # 1. check inputs
        if faces not in ("small", "all"):
            raise MagicIDError(f"faces={faces!r}: use 'small' (below diir.max_face_ratio) or 'all'")
        pixels = _as_uint8_image(image)
        height, width = pixels.shape[:2]
        empty_mask = np.zeros((height, width), np.uint8)

        def unchanged(note: str, n_detected: int = 0) -> RestoreResult:
            return RestoreResult(Image.fromarray(pixels), [], empty_mask, note, {"faces_detected": n_detected,
                                 "faces_restored": 0, "batches": 0, "unet_calls": 0, "unet_sample_evals": 0,
                                 "inversion_sample_evals": 0})  # fmt: skip

        n_steps = int(cfg.num_inference_steps * cfg.strength)  # the denoising steps strength runs
        if n_steps == 0:
            return unchanged(
                f"diir.strength={cfg.strength} runs no denoising step of {cfg.num_inference_steps}: input returned unchanged"
            )
        # 2. faces: detect (or take the given boxes), select
        found = self._faces(pixels, boxes)
        if not found:
            return unchanged("no face found: input returned unchanged")
        if faces == "small":
            area = float(height * width)
            chosen = [(i, b, f) for i, (b, f) in enumerate(found)
                      if (b[2] - b[0]) * (b[3] - b[1]) / area < cfg.max_face_ratio]  # fmt: skip
            if not chosen:
                return unchanged(
                    f"{len(found)} face(s) found, none covers less than diir.max_face_ratio={cfg.max_face_ratio} "
                    "of the image: input returned unchanged (use faces='all' to restore them)",
                    len(found),
                )
        else:
            chosen = [(i, b, f) for i, (b, f) in enumerate(found)]
        # 3. plan: crop boxes and buckets
        from magicid.data.crops import expand_box

        jobs = []
        for i, bbox, face in chosen:
            crop_box = expand_box(bbox, cfg.crop_margin, width, height)
            landmarks = (
                None
                if face is None or getattr(face, "landmarks", None) is None
                else np.asarray(face.landmarks)
            )
            embedding = (
                None
                if face is None or getattr(face, "embedding", None) is None
                else np.asarray(face.embedding)
            )
            if landmarks is not None and landmarks.size == 0:
                landmarks = None
            bucket = choose_bucket(crop_box[2] - crop_box[0], cfg.buckets, cfg.zoom)
            jobs.append(_Job(i, bbox, landmarks, embedding, crop_box, bucket))
        notes = []
        # 4. identities
        refs = [r if isinstance(r, ReferenceIdentity) else self.reference_from_image(r, f"identities[{k}]")
                for k, r in enumerate(identities or [])]  # fmt: skip
        self._assign(pixels, jobs, refs, assignment, notes)
        if self.adapter is None:
            notes.append("no adapter: faces regenerated from their inversion without identity features")
        elif any(j.landmarks is None for j in jobs):
            notes.append(
                "some faces have no landmarks (given as bare boxes): their landmark condition is empty"
            )
        # 5. restore batched: group by bucket, chunk by diir.batch
        from tqdm.auto import tqdm

        out = pixels.copy()
        mask = empty_mask.copy()
        stats = {"faces_detected": len(found), "faces_restored": len(jobs), "batches": 0, "unet_calls": 0,
                 "unet_sample_evals": 0, "inversion_sample_evals": 0}  # fmt: skip
        restored: dict[int, RestoredFace] = {}
        chunks = []
        for bucket in sorted({j.bucket for j in jobs}):
            group = [j for j in jobs if j.bucket == bucket]
            chunks += [group[start : start + cfg.batch] for start in range(0, len(group), cfg.batch)]
        # Each chunk runs its inverse steps, then as many denoising steps: a fixed total, whatever the
        # number of fixed-point refinements.
        bar = tqdm(total=2 * n_steps * len(chunks), desc="DIIR", unit="step", **self._progress_bar_config)
        with bar:
            for chunk in chunks:
                bucket = chunk[0].bucket
                bar.set_postfix_str(f"{len(chunk)} face(s) at {bucket} px")
                patches, iterations = self._restore_chunk(pixels, chunk, refs, prompt, stats, bar.update)
                for job, patch, iters in zip(chunk, patches, iterations, strict=True):
                    side = job.crop_box[2] - job.crop_box[0]
                    alpha = blend_alpha(job.crop_box, job.bbox, cfg.feather, (width, height))
                    compose(out, _resize(patch, side), alpha, job.crop_box)
                    x0, y0, x1, y1 = job.crop_box
                    mask[y0:y1, x0:x1] = np.maximum(mask[y0:y1, x0:x1], alpha)
                    name = refs[job.identity].name if job.identity is not None else ""
                    restored[job.index] = RestoredFace(job.bbox, job.crop_box, bucket, job.identity, name,
                                                       job.similarity, alpha, iters)  # fmt: skip
        # Outside every blend mask the output is the input (compose keeps bytes where alpha = 0).
        assert np.array_equal(out[mask == 0], pixels[mask == 0]), (
            "DIIR changed a pixel outside the blend masks"
        )
        faces_out = [restored[j.index] for j in sorted(jobs, key=lambda j: j.index)]
        return RestoreResult(Image.fromarray(out), faces_out, mask, "; ".join(notes), stats)

    def _assign(self, pixels, jobs: list[_Job], refs: list[ReferenceIdentity], assignment, notes: list[str]):
        """Set each job's `identity` (reference index or None) and `similarity`."""
        if assignment is not None:
            if len(assignment) != len(jobs):
                raise MagicIDError(
                    f"assignment has {len(assignment)} entries for {len(jobs)} selected faces; give one per face "
                    "(a reference index or None)"
                )
            for job, ref in zip(jobs, assignment, strict=True):
                if ref is not None and not 0 <= int(ref) < len(refs):
                    raise MagicIDError(
                        f"assignment {ref} for face {job.index}: only {len(refs)} identities given"
                    )
                job.identity = None if ref is None else int(ref)
            return
        if not refs:
            return
        for job in jobs:
            if job.embedding is None:
                job.embedding = self._embed_box(pixels, job)
        missing = [j.index for j in jobs if j.embedding is None]
        if missing:
            raise MagicIDError(
                f"faces {missing} have no embedding (bare boxes and no analyzer could embed them): pass "
                "assignment= to say which identity each face gets"
            )
        ref_embeddings = np.stack([r.embedding for r in refs])
        chosen = hungarian_assign(np.stack([j.embedding for j in jobs]), ref_embeddings)
        for job, ref in zip(jobs, chosen, strict=True):
            job.identity = ref
            if ref is not None:
                a, b = job.embedding, ref_embeddings[ref]
                job.similarity = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
        if len(jobs) > len(refs):
            notes.append(
                f"{len(jobs) - len(refs)} face(s) had no reference left: restored with their own embedding"
            )

    def _embed_box(self, pixels: np.ndarray, job: _Job) -> np.ndarray | None:
        """Embedding of a bare box: the analyzer's face inside the box's crop (None if it finds none)."""
        x0, y0, x1, y1 = job.crop_box
        found = self.analyzer.analyze(np.ascontiguousarray(pixels[y0:y1, x0:x1]))
        if not found:
            return None
        face = max(found, key=lambda f: f.width * f.height)
        return np.asarray(face.embedding, np.float32)

    def _restore_chunk(
        self,
        pixels,
        chunk: list[_Job],
        refs,
        prompt: str,
        stats: dict[str, int],
        step_done: Callable[[], Any],
    ):
        """Crop, encode, invert, denoise with identity, decode one batch of same-bucket faces.

        `step_done` is called after each inverse and each denoising step.

        Returns:
            (patches uint8 (bucket, bucket, 3) per face, fixed-point iterations per inverse step per face).
        """
        from magicid.data.crops import zoom_crop

        cfg = self.diir_params
        bucket = chunk[0].bucket
        crops = [zoom_crop(pixels, job.bbox, bucket, cfg.crop_margin)[0] for job in chunk]
        device, dtype = self.device, self.dtype
        # Encode (posterior mean: deterministic).
        vae_config = self.vae.config
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        images = _to_tensor(crops, device, self.vae.dtype)
        latents = (self.vae.encode(images).latent_dist.mean - shift) * vae_config.scaling_factor
        latents = latents.to(dtype)  # (n, 4, bucket/8, bucket/8)
        n = len(chunk)
        text = self._encode_prompt(prompt).expand(n, -1, -1)
        cond = Conditioning(encoder_hidden_states=text)
        if self.adapter is not None and any(j.landmarks is not None for j in chunk):
            controlnet = self.adapter.controlnet
            cond.controlnet = controlnet
            cond.control, cond.control_embedded = embed_control(
                controlnet, self._landmark_condition(chunk, bucket)
            )
        # Invert with landmark conditioning, no identity, no CFG.
        inversion = ddim_invert(
            self.unet, self.scheduler, latents, cond, cfg.num_inference_steps, cfg.strength,
            max_iters=cfg.inversion_iters, tol=cfg.inversion_tol, progress=lambda _: step_done(),
        )  # fmt: skip
        # Denoise with identity (MGMICA, masked to the face) + landmarks, CFG as configured.
        denoise_cond = dataclasses.replace(cond, guidance_scale=cfg.guidance_scale)
        if cfg.guidance_scale > 1.0:
            denoise_cond.uncond_hidden_states = self._encode_prompt("").expand(n, -1, -1)
        if self.adapter is not None:
            denoise_cond.id_tokens, denoise_cond.id_masks = self._identity_tokens(chunk, crops, refs, bucket)
            denoise_cond.id_scale = self.params.model.id_scale
        try:
            clean = ddim_reconstruct(
                self.unet, self.scheduler, inversion.latents, denoise_cond, inversion.timesteps,
                progress=lambda _: step_done(),
            )  # fmt: skip
        finally:
            if self.adapter is not None:
                from magicid.models.mgmica import clear_identities

                clear_identities(self.unet)
        decoded = self.vae.decode((clean.to(self.vae.dtype) / vae_config.scaling_factor) + shift).sample
        per_call = 2 if denoise_cond.use_cfg else 1
        stats["batches"] += 1
        stats["unet_calls"] += inversion.unet_calls + len(inversion.timesteps)
        stats["unet_sample_evals"] += inversion.sample_evals + per_call * n * len(inversion.timesteps)
        stats["inversion_sample_evals"] += inversion.sample_evals
        iterations = inversion.iterations.T.tolist()  # (n, steps)
        return list(_to_uint8(decoded)), iterations

    def _landmark_condition(self, chunk: list[_Job], bucket: int) -> torch.Tensor:
        """ControlNet condition (n, 6, bucket, bucket): each face's landmark map in crop coordinates."""
        from magicid.data.conditions import render_landmark_map
        from magicid.models.conditioning import make_condition

        maps = []
        for job in chunk:
            if job.landmarks is None:
                maps.append(np.zeros((bucket, bucket, 3), np.uint8))
                continue
            x0, y0, x1, _ = job.crop_box
            scale = bucket / (x1 - x0)
            in_crop = (job.landmarks - np.array([x0, y0], np.float32)) * scale
            maps.append(render_landmark_map(bucket, bucket, [in_crop]))
        landmark = torch.from_numpy(np.stack(maps)).permute(0, 3, 1, 2).float() / 255.0
        return make_condition(None, landmark.to(self.device), "landmark").to(self.dtype)

    def _identity_tokens(self, chunk: list[_Job], crops, refs: list[ReferenceIdentity], bucket: int):
        """ID tokens (n, 1, T, C) from global + local features, and face masks (n, 1, bucket, bucket)."""
        size = self.params.model.id_crop_size  # the ID encoder's crop side
        embeddings, id_crops, masks = [], [], []
        for job, crop in zip(chunk, crops, strict=True):
            ref = refs[job.identity] if job.identity is not None else None
            embedding = ref.embedding if ref is not None else job.embedding
            local = ref.crop if ref is not None and ref.crop is not None else crop
            mask = np.zeros((bucket, bucket), np.float32)
            if embedding is not None:
                # The face box in crop coordinates: MGMICA writes identity only there.
                x0, y0, x1, _ = job.crop_box
                scale = bucket / (x1 - x0)
                fx0, fy0, fx1, fy1 = ((job.bbox - np.array([x0, y0, x0, y0], np.float32)) * scale).tolist()
                mask[
                    max(int(np.floor(fy0)), 0) : int(np.ceil(fy1)),
                    max(int(np.floor(fx0)), 0) : int(np.ceil(fx1)),
                ] = 1.0
            else:  # no embedding at all (bare box, no reference): no identity for this face
                embedding = np.zeros(self.adapter.embed_dim, np.float32)
            if embedding.shape != (self.adapter.embed_dim,):
                raise MagicIDError(
                    f"identity embedding has {embedding.shape[0]} dims, the adapter expects {self.adapter.embed_dim} "
                    "(model.id_embed_dim must match the face backend)"
                )
            embeddings.append(embedding)
            id_crops.append(_resize(local, size))
            masks.append(mask)
        device = self.device
        emb = torch.from_numpy(np.stack(embeddings)).float().to(device).unsqueeze(1)  # (n, 1, D)
        crops_t = _to_tensor(id_crops, device, torch.float32).unsqueeze(1)  # (n, 1, 3, S, S)
        tokens = self.adapter.encode_identities(emb, crops_t).to(self.dtype)
        id_masks = torch.from_numpy(np.stack(masks)).to(device).unsqueeze(1)  # (n, 1, bucket, bucket)
        return tokens, id_masks


# ---------------------------------------------------------------------------------------------------------
# 4. Files in, files out (the `magicid restore` command's science)
# ---------------------------------------------------------------------------------------------------------


def comparison_image(before: Image.Image, after: Image.Image) -> Image.Image:
    """Before (left) and after (right), side by side with a 4 px white gutter."""
    gutter = 4
    canvas = Image.new(
        "RGB", (before.width + gutter + after.width, max(before.height, after.height)), "white"
    )
    canvas.paste(before.convert("RGB"), (0, 0))
    canvas.paste(after.convert("RGB"), (before.width + gutter, 0))
    return canvas


def _load(path: str | Path, max_pixels: int, what: str) -> np.ndarray:
    from magicid.data.ingest import load_image
    from magicid.errors import InputRejected
    from magicid.safety import check_input_file

    path = check_input_file(path, what)
    try:
        return load_image(path, max_pixels).array
    except InputRejected as error:
        raise DataError(f"{what} {str(path)!r}: cannot be used ({error})") from error


def restore_file(
    params: Params,
    image_path: str | Path,
    reference_paths: Sequence[str | Path],
    out: str | Path,
    prompt: str = "",
    faces: FaceSelection = "small",
    progress: bool = True,
) -> tuple[RestoreResult, Path, Path]:
    """Restore the faces of an image file against reference photos; write the result and a comparison.

    Loads the configured backbone and adapter (`model.adapter_path`, or a freshly initialised one when
    null) and the configured face backend. Writes `out` and `<out stem>_compare<suffix>` (before | after).
    `progress` shows the restore's progress bar (inverse and denoising steps of each face batch).

    Returns:
        (the `RestoreResult`, the output path, the comparison path).

    Raises:
        DataError: unreadable image or reference, or a reference photo without a face.
    """
    from magicid.generate import load_adapter
    from magicid.models.backbone import load_backbone
    from magicid.utils import atomic_save_image

    out = Path(out)
    pixels = _load(image_path, params.data.max_pixels, "image")
    references = [_load(p, params.data.max_pixels, f"--ref {i}") for i, p in enumerate(reference_paths)]
    backbone = load_backbone(params)
    adapter = load_adapter(params, backbone)
    diir = DIIR(backbone.unet, backbone.vae, backbone.text_encoder, backbone.tokenizer, backbone.scheduler,
                adapter=adapter, params=params)  # fmt: skip
    diir.set_progress_bar_config(disable=not progress)
    refs = [
        diir.reference_from_image(r, Path(p).name) for r, p in zip(references, reference_paths, strict=True)
    ]
    result = diir.restore(pixels, identities=refs or None, prompt=prompt, faces=faces)
    atomic_save_image(result.image, out)
    compare = out.with_name(f"{out.stem}_compare{out.suffix or '.png'}")
    atomic_save_image(comparison_image(Image.fromarray(pixels), result.image), compare)
    return result, out, compare
