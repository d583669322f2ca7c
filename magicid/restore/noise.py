"""The noise function DIIR inverts and denoises with: ControlNet residuals -> MGMICA identities -> UNet -> CFG.

`Conditioning` holds everything eps(x_t, t) depends on besides x_t and t for a batch of face crops (text,
SDXL's added conditions, the landmark condition, identity tokens and masks, guidance); `predict_noise`
evaluates it; `noise_function` binds a UNet, scheduler and conditioning into the `NoiseFn` that
`magicid.restore.inversion` iterates on.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from magicid.errors import MagicIDError
from magicid.restore.inversion import NoiseFn, alpha_prod


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
        added_cond_kwargs: SDXL's added conditions (`text_embeds` (B, 1280) pooled text, `time_ids` (B, 6)
            size and crop), or None (SD 1.x).
        uncond_added_cond_kwargs: their unconditional counterpart for CFG (SDXL).
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
    added_cond_kwargs: dict[str, torch.Tensor] | None = None
    uncond_added_cond_kwargs: dict[str, torch.Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.encoder_hidden_states.shape[0])

    @property
    def use_cfg(self) -> bool:
        return self.guidance_scale > 1.0 and self.uncond_hidden_states is not None

    def select(self, rows: torch.Tensor) -> Conditioning:
        """The conditioning of a subset of the batch (`rows`: long tensor of indices)."""

        def pick(value: Any) -> Any:
            if isinstance(value, dict):
                return {key: pick(item) for key, item in value.items()}
            return value[rows] if isinstance(value, torch.Tensor) else value

        return dataclasses.replace(
            self, **{f.name: pick(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )

    def without_identity(self) -> Conditioning:
        return dataclasses.replace(self, id_tokens=None, id_masks=None)


def _as_conditioning(cond: Conditioning | torch.Tensor) -> Conditioning:
    return cond if isinstance(cond, Conditioning) else Conditioning(encoder_hidden_states=cond)


def has_mgmica(unet: torch.nn.Module) -> bool:
    """Whether MGMICA is installed on `unet` (cheap: checked on every UNet call)."""
    from magicid.models.mgmica import mgmica_context

    return mgmica_context(unet) is not None


@dataclasses.dataclass
class AppliedIdentities:
    """Which identities a noise function last put on the MGMICA processors (its own record, not the UNet's)."""

    version: int | None = None
    tokens: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    scale: float | None = None


def _apply_identities(unet: torch.nn.Module, cond: Conditioning, applied: AppliedIdentities | None) -> None:
    """Put `cond`'s identities (or none) on the UNet's MGMICA processors, only when they change.

    Called before every UNet evaluation. Re-setting the same identities would bump MGMICA's version and throw
    away its per-layer caches (identity K/V, mask gather indices) at every denoising step, and walk the
    UNet's processors to set the scale: so a run of calls with the same conditioning (the same `applied`
    record, kept by `noise_function`) sets them once. `applied=None`: always set.
    """
    from magicid.models.mgmica import mgmica_context

    context = mgmica_context(unet)
    if cond.id_tokens is None:
        if context is not None and context.tokens is not None:
            from magicid.models.mgmica import clear_identities

            clear_identities(unet)
        return
    if context is None:
        raise MagicIDError(
            "DIIR: identity tokens given but the UNet carries no MGMICA processors (replaced, e.g. by "
            "set_default_attn_processor?): rebuild the adapter with MagicIDAdapter.create/load on this UNet"
        )
    if (
        applied is not None
        and applied.version == context.version
        and applied.tokens is cond.id_tokens
        and applied.masks is cond.id_masks
        and applied.scale == cond.id_scale
    ):
        return
    from magicid.models.mgmica import set_identities

    # With CFG (batch 2B) MGMICA repeats B identities onto both halves: guidance acts on the text only.
    set_identities(unet, cond.id_tokens, cond.id_masks, scale=cond.id_scale)
    if applied is not None:
        applied.version = context.version
        applied.tokens, applied.masks, applied.scale = cond.id_tokens, cond.id_masks, cond.id_scale


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
    applied: AppliedIdentities | None = None,
) -> torch.Tensor:
    """epsilon(x_t, t) for a batch: ControlNet residuals, MGMICA identities and CFG as `cond` says.

    Args:
        sample: latents x_t (B, 4, h, w).
        timestep: the training timestep t (an int in [0, num_train_timesteps)).
        cond: the batch's conditioning (batch B).
        applied: the caller's record of the identities on the processors (see `_apply_identities`).

    Returns:
        The noise prediction (B, 4, h, w), converted to epsilon whatever the scheduler's prediction type.
    """
    repeat = 2 if cond.use_cfg else 1
    hidden = cond.encoder_hidden_states
    if repeat == 2:
        hidden = torch.cat([cond.uncond_hidden_states, hidden])
    model_in = torch.cat([sample] * repeat)
    t = torch.tensor(timestep, device=sample.device)
    added = cond.added_cond_kwargs
    if added is not None and repeat == 2:
        uncond_added = cond.uncond_added_cond_kwargs or added
        added = {key: torch.cat([uncond_added[key], value]) for key, value in added.items()}
    extra: dict[str, Any] = {} if added is None else {"added_cond_kwargs": added}
    if cond.controlnet is not None and cond.control is not None:
        control = torch.cat([cond.control] * repeat).to(sample.dtype)
        with _embedding_precomputed(cond.controlnet, cond.control_embedded):
            down, mid = cond.controlnet(
                model_in, t, encoder_hidden_states=hidden, controlnet_cond=control,
                conditioning_scale=cond.control_scale, return_dict=False, **extra,
            )  # fmt: skip
        extra.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    _apply_identities(unet, cond, applied)
    out = unet(model_in, t, encoder_hidden_states=hidden, return_dict=False, **extra)[0]
    if repeat == 2:
        uncond, text = out.chunk(2)
        out = uncond + cond.guidance_scale * (text - uncond)
    alpha = alpha_prod(scheduler, timestep).to(sample.device, sample.dtype)
    return to_epsilon(out, sample, alpha, scheduler.config.prediction_type)


def noise_function(unet: torch.nn.Module, scheduler: Any, cond: Conditioning | torch.Tensor) -> NoiseFn:
    """`(x, t, rows) -> eps` over `unet` with the rows `rows` of `cond` (the inversion's `NoiseFn`).

    Args:
        cond: the whole batch's conditioning (batch B), or text embeddings (B, L, C).
    """
    cond = _as_conditioning(cond)
    applied = AppliedIdentities()

    def noise_fn(sample: torch.Tensor, timestep: int, rows: torch.Tensor) -> torch.Tensor:
        if len(rows) != sample.shape[0]:
            raise MagicIDError(f"noise function: {len(rows)} rows for a batch of {sample.shape[0]} latents")
        sub = cond if len(rows) == cond.batch_size else cond.select(rows)
        return predict_noise(unet, scheduler, sample, timestep, sub, applied)

    return noise_fn


def encode_prompt(
    encoders: Sequence[tuple[Any, torch.nn.Module]], prompt: str, sdxl: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text embeddings (1, L, C) and SDXL's pooled text embedding (1, C_pool) (None for SD 1.x).

    SD 1.x: the encoder's last hidden state. SDXL, as its pipeline does: both encoders' penultimate hidden
    states concatenated on C, the pooled output of the second (a `CLIPTextModelWithProjection`).

    Args:
        encoders: `(tokenizer, text_encoder)` pairs: one for SD 1.x, two for SDXL.
    """
    hidden, pooled = [], None
    with torch.no_grad():
        for tokenizer, encoder in encoders:
            ids = tokenizer(
                prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)  # fmt: skip
            if not sdxl:
                hidden.append(encoder(ids)[0])
                continue
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            if output[0].ndim == 2:  # text_embeds (1, C_pool) of the encoder with projection
                pooled = output[0]
    if sdxl and pooled is None:
        raise MagicIDError(
            "DIIR (SDXL): text_encoder_2 must be a CLIPTextModelWithProjection (pooled output)"
        )
    return torch.cat(hidden, dim=-1), pooled
