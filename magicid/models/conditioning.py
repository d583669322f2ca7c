"""MMF conditioning: one multi-mode ControlNet fed skeleton and landmark maps (MagicID's MMF, DESIGN §3).

The condition is a 6-channel map at image resolution in [0, 1]: channels 0-2 the body-skeleton map, channels
3-5 the face-landmark map (both RGB renderings on black, `magicid.data.conditions`). A modality that a mode
does not use, or that is missing, is zeroed, so one ControlNet learns skeleton-only, landmark-only and fused
conditioning (the training schedule, `magicid.training.mmf`, picks the mode per step; `MODE_IDS` gives it a
number). The ControlNet is diffusers' `ControlNetModel` built from the UNet (`from_unet`), whose conditioning
embedding downsamples the map by 8 (three stride-2 convs), the VAE factor, so it lands on the latent grid.
"""

from __future__ import annotations

import torch
from diffusers import ControlNetModel
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from magicid.errors import ModelInputError
from magicid.models.backbone import VAE_SCALE_FACTOR

MODES: tuple[str, ...] = ("skeleton", "landmark", "fused")
MODE_IDS: dict[str, int] = {mode: i for i, mode in enumerate(MODES)}
CONDITIONING_CHANNELS = 6  # skeleton RGB + landmark RGB
SKELETON_CHANNELS = slice(0, 3)
LANDMARK_CHANNELS = slice(3, 6)


def conditioning_downsampling(controlnet: ControlNetModel) -> int:
    """The factor by which `controlnet.controlnet_cond_embedding` shrinks its input (product of conv strides)."""
    factor = 1
    for module in controlnet.controlnet_cond_embedding.modules():
        if isinstance(module, nn.Conv2d):
            factor *= module.stride[0]
    return factor


def build_controlnet(unet: nn.Module, conditioning_channels: int = CONDITIONING_CHANNELS) -> ControlNetModel:
    """A ControlNet initialised from `unet` (its encoder weights copied, zero-initialised output convs).

    The UNet may already carry MGMICA processors: they are set aside while copying (the ControlNet gets stock
    `AttnProcessor2_0` everywhere: identity attention lives in the UNet only). The result has the UNet's
    dtype and device, so at initialisation it adds exactly zero residuals.

    Args:
        unet: a diffusers `UNet2DConditionModel`.
        conditioning_channels: channels of the condition map (6: skeleton + landmark).

    Returns:
        `ControlNetModel`, conditioning input (B, 6, H, W) in [0, 1] with H, W = 8 x the latent size.

    Raises:
        ModelInputError: its conditioning embedding does not downsample by the VAE factor (8).
    """
    processors = unet.attn_processors
    custom = any(isinstance(p, nn.Module) for p in processors.values())
    if custom:
        unet.set_attn_processor(AttnProcessor2_0())
    try:
        controlnet = ControlNetModel.from_unet(unet, conditioning_channels=conditioning_channels)
    finally:
        if custom:
            unet.set_attn_processor(processors)
    controlnet.set_attn_processor(AttnProcessor2_0())
    factor = conditioning_downsampling(controlnet)
    if factor != VAE_SCALE_FACTOR:
        raise ModelInputError(
            f"ControlNet conditioning embedding downsamples by {factor}, the VAE by {VAE_SCALE_FACTOR}; "
            "use conditioning_embedding_out_channels with 4 entries (three stride-2 convs)"
        )
    param = next(unet.parameters())
    controlnet.to(param.device)
    if param.dtype != torch.float32:
        controlnet.to(param.dtype)
    return controlnet


def _check_map(name: str, value: torch.Tensor | None) -> None:
    if value is None:
        return
    if value.ndim != 4 or value.shape[1] != 3:
        raise ModelInputError(f"make_condition: {name} must be (B, 3, H, W), got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ModelInputError(
            f"make_condition: {name} must be float in [0, 1], got {value.dtype} (divide by 255)"
        )
    if value.numel() and (value.min() < 0 or value.max() > 1):
        raise ModelInputError(
            f"make_condition: {name} must be in [0, 1], got [{value.min().item():g}, {value.max().item():g}]"
        )


def make_condition(skeleton: torch.Tensor | None, landmark: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Stack skeleton and landmark maps into the ControlNet's 6-channel condition for `mode`.

    Args:
        skeleton: (B, 3, H, W) float in [0, 1] or None (missing: zeros).
        landmark: (B, 3, H, W) float in [0, 1] or None (missing: zeros).
        mode: `skeleton` (landmark channels zeroed), `landmark` (skeleton channels zeroed) or `fused` (both).

    Returns:
        (B, 6, H, W) in [0, 1], dtype/device of the given map(s): channels 0-2 skeleton, 3-5 landmark.

    Raises:
        ModelInputError: unknown mode; the mode's modality (or, for `fused`, both) missing; shapes disagree;
            values outside [0, 1].
    """
    if mode not in MODE_IDS:
        raise ModelInputError(f"make_condition: unknown mode {mode!r}; use one of {', '.join(MODES)}")
    _check_map("skeleton", skeleton)
    _check_map("landmark", landmark)
    if skeleton is None and landmark is None:
        raise ModelInputError("make_condition: give a skeleton map, a landmark map or both")
    if mode == "skeleton" and skeleton is None:
        raise ModelInputError("make_condition: mode 'skeleton' needs a skeleton map (or use mode 'landmark')")
    if mode == "landmark" and landmark is None:
        raise ModelInputError("make_condition: mode 'landmark' needs a landmark map (or use mode 'skeleton')")
    if skeleton is not None and landmark is not None and skeleton.shape != landmark.shape:
        raise ModelInputError(
            f"make_condition: skeleton {tuple(skeleton.shape)} and landmark {tuple(landmark.shape)} shapes differ"
        )
    like = skeleton if skeleton is not None else landmark
    condition = like.new_zeros(like.shape[0], CONDITIONING_CHANNELS, *like.shape[-2:])
    if skeleton is not None and mode in ("skeleton", "fused"):
        condition[:, SKELETON_CHANNELS] = skeleton
    if landmark is not None and mode in ("landmark", "fused"):
        condition[:, LANDMARK_CHANNELS] = landmark
    return condition
