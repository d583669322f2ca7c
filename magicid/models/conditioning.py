"""MMF conditioning: one multi-mode ControlNet fed skeleton and landmark maps (MagicID's MMF, DESIGN §3).

The condition is a 6-channel map at image resolution in [0, 1]: channels 0-2 the body-skeleton map, channels
3-5 the face-landmark map (both RGB renderings on black, `magicid.imaging.conditions`). A modality that a mode
does not use, or that is missing, is zeroed, so one ControlNet learns skeleton-only, landmark-only and fused
conditioning (the training schedule, `magicid.training.mmf`, picks the mode per step; `MODE_IDS` gives it a
number). The ControlNet is diffusers' `ControlNetModel` built from the UNet (`from_unet`), whose conditioning
embedding downsamples the map by 8 (three stride-2 convs), the VAE factor, so it lands on the latent grid.

Precomputed condition: the embedding (convs at full pixel resolution) depends on the condition map only, not on
x_t or t, so a denoising or inversion run may compute it once (`embed_condition`) and pass the resulting
`EmbeddedCondition` as `controlnet_cond` at every step. `build_controlnet` gives the ControlNet a
`PrecomputableConditioningEmbedding` (diffusers' embedding, same weights and state-dict keys, which also accepts
an `EmbeddedCondition`); nothing is swapped at call time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ControlNetModel
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from torch import nn

from magicid.errors import ModelInputError
from magicid.models.backbone import VAE_SCALE_FACTOR

MODES: tuple[str, ...] = ("skeleton", "landmark", "fused")
MODE_IDS: dict[str, int] = {mode: i for i, mode in enumerate(MODES)}
CONDITIONING_CHANNELS = 6  # skeleton RGB + landmark RGB
SKELETON_CHANNELS = slice(0, 3)
LANDMARK_CHANNELS = slice(3, 6)


@dataclass(frozen=True)
class EmbeddedCondition:
    """A ControlNet condition already through its conditioning embedding (`embed_condition`).

    features: (B, C0, h, w), C0 = the ControlNet's first block width, (h, w) = the latent size.
    """

    features: torch.Tensor

    def select(self, rows: torch.Tensor) -> EmbeddedCondition:
        """The condition of a subset of the batch (`rows`: long tensor of indices)."""
        return EmbeddedCondition(self.features[rows])

    def repeat(self, times: int) -> EmbeddedCondition:
        """The batch repeated `times` (the classifier-free-guidance halves)."""
        return EmbeddedCondition(torch.cat([self.features] * times))


class PrecomputableConditioningEmbedding(ControlNetConditioningEmbedding):
    """diffusers' `ControlNetConditioningEmbedding` that also passes an `EmbeddedCondition` through unchanged."""

    @classmethod
    def like(cls, stock: ControlNetConditioningEmbedding) -> PrecomputableConditioningEmbedding:
        """The same layers and weights as `stock` (same state-dict keys), in its dtype and device."""
        widths = (stock.conv_in.out_channels, *(block.out_channels for block in stock.blocks[1::2]))
        embedding = cls(stock.conv_out.out_channels, stock.conv_in.in_channels, widths)
        embedding.load_state_dict(stock.state_dict())
        param = next(stock.parameters())
        return embedding.to(device=param.device, dtype=param.dtype)

    def forward(self, conditioning: torch.Tensor | EmbeddedCondition) -> torch.Tensor:
        """(B, channels, H, W) condition map -> (B, C0, H/8, W/8); an `EmbeddedCondition` -> its features."""
        if isinstance(conditioning, EmbeddedCondition):
            return conditioning.features
        return super().forward(conditioning)


def embed_condition(controlnet: ControlNetModel, condition: torch.Tensor) -> EmbeddedCondition:
    """Run the ControlNet's conditioning embedding once, for every step of a run.

    Args:
        controlnet: a ControlNet from `build_controlnet` (RGB channel order).
        condition: (B, 6, H, W) in [0, 1] (`make_condition`).

    Returns:
        `EmbeddedCondition` to pass as `controlnet_cond`; the ControlNet's output is the same as with `condition`.

    Raises:
        ModelInputError: a ControlNet whose embedding cannot take a precomputed condition, or one that flips
            channels first (BGR order).
    """
    if not isinstance(controlnet.controlnet_cond_embedding, PrecomputableConditioningEmbedding):
        raise ModelInputError(
            "embed_condition: this ControlNet's conditioning embedding is diffusers' stock one, which cannot take "
            "a precomputed condition; build the ControlNet with magicid.models.conditioning.build_controlnet, or "
            "pass the condition image itself"
        )
    order = getattr(controlnet.config, "controlnet_conditioning_channel_order", "rgb")
    if order != "rgb":
        raise ModelInputError(
            f"embed_condition: the ControlNet flips its condition ({order} order) before embedding it; pass the "
            "condition image itself"
        )
    return EmbeddedCondition(controlnet.controlnet_cond_embedding(condition))


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
        `ControlNetModel`, conditioning input (B, 6, H, W) in [0, 1] with H, W = 8 x the latent size, or an
        `EmbeddedCondition` of it (`embed_condition`).

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
    controlnet.controlnet_cond_embedding = PrecomputableConditioningEmbedding.like(
        controlnet.controlnet_cond_embedding
    )
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
