"""The noise function DIIR inverts and denoises with: MagicID's one denoising step, read as epsilon.

The model evaluation is `magicid.models.denoise.guided_prediction` (ControlNet residuals -> MGMICA identities
-> UNet -> CFG, one CFG rule for the pipeline, DIIR and training) over `StepConditions`; here it is converted
to epsilon whatever the scheduler's prediction type (`predict_noise`) and bound, with a UNet, scheduler and
the batch's conditions, into the `NoiseFn` that `magicid.restore.inversion` iterates on (`noise_function`).
The conditions themselves (text for SD 1.x and SDXL, landmarks, identity) come from `magicid.restore.conditions`.
"""

from __future__ import annotations

from typing import Any

import torch

from magicid.errors import MagicIDError
from magicid.models.denoise import StepConditions, guided_prediction
from magicid.restore.inversion import NoiseFn, alpha_prod


def has_mgmica(unet: torch.nn.Module) -> bool:
    """Whether MGMICA is installed on `unet`."""
    from magicid.models.mgmica import mgmica_context

    return mgmica_context(unet) is not None


def to_epsilon(model_output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, prediction_type: str):
    """The model output of any diffusers prediction type as a noise prediction epsilon (alpha: alpha-bar_t)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha**0.5 * model_output + (1 - alpha) ** 0.5 * sample
    if prediction_type == "sample":
        return (sample - alpha**0.5 * model_output) / (1 - alpha) ** 0.5
    raise MagicIDError(
        f"scheduler prediction_type={prediction_type!r}: DIIR supports epsilon, v_prediction, sample"
    )


@torch.no_grad()
def predict_noise(
    unet: torch.nn.Module, scheduler: Any, sample: torch.Tensor, timestep: int, conditions: StepConditions
) -> torch.Tensor:
    """epsilon(x_t, t) for a batch: MagicID's denoising step (`guided_prediction`) as `conditions` say.

    Args:
        sample: latents x_t (B, 4, h, w), in the UNet's dtype or in float32 (DIIR's inversion runs its own
            arithmetic in float32: the UNet then sees the sample cast to its dtype).
        timestep: the training timestep t (an int in [0, num_train_timesteps)).
        conditions: the batch's `StepConditions` (batch B).

    Returns:
        The noise prediction (B, 4, h, w) in `sample`'s dtype, converted to epsilon whatever the scheduler's
        prediction type.
    """
    model_dtype = getattr(unet, "dtype", sample.dtype)
    timestep_tensor = torch.tensor(timestep, device=sample.device)
    out = guided_prediction(unet, sample.to(model_dtype), timestep_tensor, conditions).to(sample.dtype)
    alpha = alpha_prod(scheduler, timestep).to(sample.device, sample.dtype)
    return to_epsilon(out, sample, alpha, scheduler.config.prediction_type)


def noise_function(
    unet: torch.nn.Module, scheduler: Any, conditions: StepConditions | torch.Tensor
) -> NoiseFn:
    """`(x, t, rows) -> eps` over `unet` with the rows `rows` of `conditions` (the inversion's `NoiseFn`).

    Args:
        conditions: the whole batch's `StepConditions` (batch B), or text embeddings (B, L, C) alone.
    """
    if isinstance(conditions, torch.Tensor):
        conditions = StepConditions(text=conditions)
    whole = conditions

    def noise_fn(sample: torch.Tensor, timestep: int, rows: torch.Tensor) -> torch.Tensor:
        if len(rows) != sample.shape[0]:
            raise MagicIDError(f"noise function: {len(rows)} rows for a batch of {sample.shape[0]} latents")
        sub = whole if len(rows) == whole.batch_size else whole.select(rows)
        return predict_noise(unet, scheduler, sample, timestep, sub)

    return noise_fn
