"""The one denoising step of MagicID: ControlNet residuals -> MGMICA identities -> UNet -> classifier-free guidance.

`guided_prediction(unet, sample, timestep, conditions)` is the model evaluation of a denoising step, shared by
`MagicIDPipeline` (text-to-image), DIIR (inversion and regeneration, `magicid.restore`) and training (one
conditional pass with gradients). What the scheduler then does with the prediction is the caller's.

One CFG rule (DESIGN §3), for text and identity alike, as IP-Adapter: with `guidance_scale` g > 1 the batch is
run twice,
- conditional branch: the prompt's text embeddings + the identities' tokens,
- unconditional branch: the unconditional text (negative or empty prompt) + the *null identity*: the ID
  encoder's tokens for a zero embedding and a blank crop (`null_identity`), at the same masks,
and the output is u + g (c - u). Both halves get the same ControlNet condition and residual scale; by default
the ControlNet runs on both halves, each with its own text (`control_branches="both"`); `"conditional"` runs it
once, on the conditional half, and adds the same residuals to both (half the ControlNet's cost; the
unconditional half then sees residuals computed with the prompt's text, so images are close, not equal). The null
identity and the empty prompt are exactly what training's condition dropout feeds the model
(`magicid.training.trainer`, `train.condition_dropout`), so the unconditional branch is one the model has seen.

Identity state is explicit: `IdentityConditions.context` names the MGMICA processors' shared context (the
adapter's, `MagicIDAdapter.mgmica_context`); the identities are set for the UNet call and cleared after it
(caches survive: setting the same tensors again is free, see `MGMICAContext`). If the UNet's cross-attention
layers no longer run those processors the step raises `MGMICAMissingError` instead of ignoring the identities.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

from magicid.errors import ModelInputError
from magicid.models.conditioning import EmbeddedCondition
from magicid.models.mgmica import MGMICAContext, MGMICAMissingError, check_mgmica

__all__ = ["IdentityConditions", "StepConditions", "guided_prediction", "null_identity"]


def null_identity(embeddings: torch.Tensor, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ID encoder's input for "no identity": a zero embedding and a blank (zero, i.e. mid-grey) crop.

    Training's identity dropout replaces a sample's identities with this; CFG's unconditional branch encodes
    it (`MagicIDAdapter.encode_identities(*null_identity(embeddings, crops))`), so both are the same tokens.

    Args:
        embeddings: (..., D) face-recognition embeddings; crops: (..., 3, S, S) in [-1, 1].

    Returns:
        Zeros like each, same shapes, dtypes and devices.
    """
    return torch.zeros_like(embeddings), torch.zeros_like(crops)


@dataclasses.dataclass(frozen=True, eq=False)
class IdentityConditions:
    """The identities of a batch for MGMICA.

    Attributes:
        context: the MGMICA processors' shared state these identities go to (`MagicIDAdapter.mgmica_context`).
        tokens: (B or 1, n, T, C) identity tokens of the conditional branch.
        masks: (B or 1, n, H, W) in [0, 1] (any resolution; MGMICA resizes by area), the same in both branches.
        uncond_tokens: (B or 1, n, T, C) null-identity tokens (`null_identity`) for CFG's unconditional branch;
            required when the step runs CFG.
        scale: MGMICA identity scale during the step (None: the processors' own; 0 = the base model).
    """

    context: MGMICAContext
    tokens: torch.Tensor
    masks: torch.Tensor
    uncond_tokens: torch.Tensor | None = None
    scale: float | None = None

    def select(self, rows: torch.Tensor, batch: int) -> IdentityConditions:
        """The identities of a subset `rows` of a batch of `batch` (batch-1 tensors are shared as they are)."""

        def pick(value: torch.Tensor | None) -> torch.Tensor | None:
            return value[rows] if value is not None and value.shape[0] == batch != 1 else value

        return dataclasses.replace(
            self, tokens=pick(self.tokens), masks=pick(self.masks), uncond_tokens=pick(self.uncond_tokens)
        )


@dataclasses.dataclass(frozen=True, eq=False)
class StepConditions:
    """Everything a denoising step depends on besides x_t and t, for a batch of B samples.

    Immutable (`dataclasses.replace` makes a changed copy): the batched tensors a step feeds the UNet are built
    once per object and reused at every step of a run.

    Attributes:
        text: (B, L, C) prompt embeddings (conditional branch).
        uncond_text: (B, L, C) unconditional text embeddings (negative or empty prompt); required when
            `guidance_scale` > 1.
        guidance_scale: CFG scale g; <= 1 runs one conditional pass.
        controlnet: the MMF `ControlNetModel`, or None (no ControlNet residuals).
        control: its condition (B, 6, H, W) in [0, 1] at pixel resolution, or an `EmbeddedCondition`
            (`magicid.models.conditioning.embed_condition`, computed once per run); None with no ControlNet.
        control_scale: ControlNet residual scale.
        identity: `IdentityConditions`, or None (MGMICA untouched: no identities).
        added_cond_kwargs: SDXL's added conditions for the conditional branch (`text_embeds` (B, 1280),
            `time_ids` (B, 6)), or None (SD 1.x).
        uncond_added_cond_kwargs: their unconditional counterpart for CFG (default: the conditional ones).
        control_branches: with CFG, "both" (the ControlNet on both halves, each with its text) or "conditional"
            (once, on the conditional half; its residuals serve both halves).
    """

    text: torch.Tensor
    uncond_text: torch.Tensor | None = None
    guidance_scale: float = 1.0
    controlnet: torch.nn.Module | None = None
    control: torch.Tensor | EmbeddedCondition | None = None
    control_scale: float = 1.0
    identity: IdentityConditions | None = None
    added_cond_kwargs: dict[str, torch.Tensor] | None = None
    uncond_added_cond_kwargs: dict[str, torch.Tensor] | None = None
    control_branches: str = "both"

    def __post_init__(self) -> None:
        if self.control_branches not in ("both", "conditional"):
            raise ModelInputError(
                f"control_branches={self.control_branches!r}: use 'both' or 'conditional' (model.controlnet_cfg)"
            )
        if self.use_cfg and self.uncond_text is None:
            raise ModelInputError(
                f"guidance_scale={self.guidance_scale} runs classifier-free guidance: give uncond_text (the "
                "negative or empty prompt's embeddings), or guidance_scale <= 1"
            )
        if self.use_cfg and self.identity is not None and self.identity.uncond_tokens is None:
            raise ModelInputError(
                f"guidance_scale={self.guidance_scale} with identities needs identity.uncond_tokens: the null "
                "identity's tokens, adapter.encode_identities(*null_identity(embeddings, crops))"
            )
        if (self.controlnet is None) != (self.control is None):
            raise ModelInputError("give controlnet and control together (or neither)")

    @property
    def batch_size(self) -> int:
        return int(self.text.shape[0])

    @property
    def use_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def select(self, rows: torch.Tensor) -> StepConditions:
        """The conditions of a subset of the batch (`rows`: long tensor of indices), e.g. unconverged samples."""
        batch = self.batch_size

        def pick(value: Any) -> Any:
            if isinstance(value, dict):
                return {key: pick(item) for key, item in value.items()}
            if isinstance(value, EmbeddedCondition):
                return value.select(rows)
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
                return value[rows]
            return value

        return dataclasses.replace(
            self,
            text=pick(self.text),
            uncond_text=pick(self.uncond_text),
            control=pick(self.control),
            identity=None if self.identity is None else self.identity.select(rows, batch),
            added_cond_kwargs=pick(self.added_cond_kwargs),
            uncond_added_cond_kwargs=pick(self.uncond_added_cond_kwargs),
        )

    def without_identity(self) -> StepConditions:
        return dataclasses.replace(self, identity=None)

    @functools.cached_property
    def _unet_batch(self) -> dict[str, Any]:
        """The UNet-side inputs (batch B, or 2B = [unconditional; conditional] with CFG), built once."""
        batch = self.batch_size
        if not self.use_cfg:
            return {
                "text": self.text,
                "control": self.control,
                "added": self.added_cond_kwargs,
                "tokens": None if self.identity is None else self.identity.tokens,
            }
        control = self.control
        if isinstance(control, EmbeddedCondition):
            control = control.repeat(2)
        elif control is not None:
            control = torch.cat([control] * 2)
        added = None
        if self.added_cond_kwargs is not None:
            uncond = self.uncond_added_cond_kwargs or self.added_cond_kwargs
            added = {key: torch.cat([uncond[key], value]) for key, value in self.added_cond_kwargs.items()}
        tokens = None
        if self.identity is not None:
            # Both halves expanded to B: MGMICA then reads batch 2B as [unconditional; conditional] exactly.
            cond_tokens = self.identity.tokens.expand(batch, -1, -1, -1)
            uncond_tokens = self.identity.uncond_tokens.to(cond_tokens.dtype).expand(batch, -1, -1, -1)
            tokens = torch.cat([uncond_tokens, cond_tokens])
        return {
            "text": torch.cat([self.uncond_text, self.text]),
            "control": control,
            "added": added,
            "tokens": tokens,
        }


def guided_prediction(
    unet: torch.nn.Module,
    sample: torch.Tensor,
    timestep: int | float | torch.Tensor,
    conditions: StepConditions,
) -> torch.Tensor:
    """The UNet's output for one denoising step: ControlNet residuals -> MGMICA identities -> UNet -> CFG.

    Runs under the caller's grad mode (training needs gradients; pipeline and DIIR call it under no_grad /
    inference_mode).

    Args:
        unet: a diffusers `UNet2DConditionModel`; with identities it must run the MGMICA processors of
            `conditions.identity.context`.
        sample: x_t (B, 4, h, w), already `scheduler.scale_model_input`-ed where the scheduler needs it.
        timestep: the training timestep t: an int/float, a 0-d tensor or one per sample (B,).
        conditions: `StepConditions` of batch B.

    Returns:
        (B, 4, h, w) in the scheduler's prediction type (epsilon, v or sample), guided as
        u + g (c - u) when `conditions.use_cfg`, else the conditional output.

    Raises:
        ModelInputError: batch sizes disagree. MGMICAMissingError: identities given but the UNet does not run
            their MGMICA processors (replaced, e.g. by `unet.set_attn_processor(...)`).
    """
    if sample.shape[0] != conditions.batch_size:
        raise ModelInputError(
            f"sample batch {sample.shape[0]} != conditions batch {conditions.batch_size} (text embeddings)"
        )
    inputs = conditions._unet_batch
    repeat = 2 if conditions.use_cfg else 1
    model_in = torch.cat([sample] * repeat) if repeat == 2 else sample
    t = timestep
    if isinstance(t, torch.Tensor) and t.ndim == 1 and repeat == 2:
        t = torch.cat([t] * 2)
    extra: dict[str, Any] = {}
    if inputs["added"] is not None:
        extra["added_cond_kwargs"] = inputs["added"]
    if conditions.controlnet is not None and repeat == 2 and conditions.control_branches == "conditional":
        # Once, on the conditional half (batch B); the same residuals for both halves.
        once = (
            {}
            if conditions.added_cond_kwargs is None
            else {"added_cond_kwargs": conditions.added_cond_kwargs}
        )
        down, mid = conditions.controlnet(
            sample,
            timestep,
            encoder_hidden_states=conditions.text,
            controlnet_cond=conditions.control,
            conditioning_scale=conditions.control_scale,
            return_dict=False,
            **once,
        )
        extra["down_block_additional_residuals"] = [torch.cat([d, d]) for d in down]
        extra["mid_block_additional_residual"] = torch.cat([mid, mid])
    elif conditions.controlnet is not None:
        down, mid = conditions.controlnet(
            model_in,
            t,
            encoder_hidden_states=inputs["text"],
            controlnet_cond=inputs["control"],
            conditioning_scale=conditions.control_scale,
            return_dict=False,
            **extra,
        )
        extra["down_block_additional_residuals"] = down
        extra["mid_block_additional_residual"] = mid

    identity = conditions.identity
    if identity is None:
        out = unet(model_in, t, encoder_hidden_states=inputs["text"], return_dict=False, **extra)[0]
    else:
        context = identity.context
        if not context.holds(inputs["tokens"], identity.masks):
            check_mgmica(unet, context)  # a module walk: once per new identities, not every step
        context.set(inputs["tokens"], identity.masks, tuple(sample.shape[-2:]), scale=identity.scale)
        try:
            out = unet(model_in, t, encoder_hidden_states=inputs["text"], return_dict=False, **extra)[0]
            if context.calls == 0:
                raise MGMICAMissingError(
                    "identities were set but no MGMICA processor ran in this UNet call: the UNet's "
                    "cross-attention processors were replaced (e.g. by unet.set_attn_processor(...)); put them "
                    "back with adapter.attach(unet)"
                )
        finally:
            context.set(None, None)
    if repeat == 2:
        uncond, cond = out.chunk(2)
        out = uncond + conditions.guidance_scale * (cond - uncond)
    return out
