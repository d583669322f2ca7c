"""The one denoising step (`magicid.models.denoise`): its CFG rule, the precomputed ControlNet condition, explicit
identity state, and a clear error when MGMICA's processors were replaced."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from magicid.config import load_params
from magicid.errors import ModelInputError
from magicid.models.adapter import MagicIDAdapter
from magicid.models.conditioning import EmbeddedCondition, embed_condition
from magicid.models.denoise import IdentityConditions, StepConditions, guided_prediction, null_identity
from magicid.models.mgmica import MGMICAMissingError, check_mgmica

LATENT, PIXELS = 8, 64


def _perturb(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Make a fresh (zero-initialised) part of the adapter act, so every branch matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture()
def setup(fresh_backbone):
    params = load_params(None)
    adapter = MagicIDAdapter.create(fresh_backbone, params).eval()
    _perturb(adapter.controlnet, 1)
    _perturb(adapter.id_encoder, 2)
    g = torch.Generator().manual_seed(0)
    batch, dim = 2, fresh_backbone.cross_attention_dim
    embeddings = torch.nn.functional.normalize(torch.randn(batch, 2, 128, generator=g), dim=-1)
    crops = torch.rand(batch, 2, 3, 32, 32, generator=g) * 2 - 1
    masks = torch.zeros(batch, 2, PIXELS, PIXELS)
    masks[:, 0, 8:32, 8:32] = 1.0
    masks[:, 1, 24:56, 30:60] = 1.0
    inputs = {
        "sample": torch.randn(batch, 4, LATENT, LATENT, generator=g),
        "text": torch.randn(batch, 77, dim, generator=g),
        "uncond": torch.randn(batch, 77, dim, generator=g),
        "control": torch.rand(batch, 6, PIXELS, PIXELS, generator=g),
    }
    return fresh_backbone.unet, adapter, embeddings, crops, masks, inputs


def _reference(unet, adapter, x, text, control, tokens, masks):
    """One branch computed by hand: ControlNet residuals, then the UNet with MGMICA identities."""
    from magicid.models.mgmica import identities

    down, mid = adapter.controlnet(
        x, 500, encoder_hidden_states=text, controlnet_cond=control, return_dict=False
    )
    with identities(unet, tokens, masks):
        return unet(
            x, 500, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample


@torch.no_grad()
def test_cfg_rule_is_uncond_text_plus_null_identity_then_guided(setup):
    unet, adapter, embeddings, crops, masks, inp = setup
    identity = adapter.identity_conditions(embeddings, crops, masks, guidance=True)
    conditions = StepConditions(
        text=inp["text"],
        uncond_text=inp["uncond"],
        guidance_scale=4.0,
        controlnet=adapter.controlnet,
        control=inp["control"],
        identity=identity,
    )
    got = guided_prediction(unet, inp["sample"], 500, conditions)

    tokens = adapter.encode_identities(embeddings, crops)
    null = adapter.encode_identities(*null_identity(embeddings, crops))  # what training's dropout feeds
    cond = _reference(unet, adapter, inp["sample"], inp["text"], inp["control"], tokens, masks)
    uncond = _reference(unet, adapter, inp["sample"], inp["uncond"], inp["control"], null, masks)
    torch.testing.assert_close(got, uncond + 4.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
    # The null identity is a real branch: with the conditional identity in both halves the result differs.
    same_identity = StepConditions(
        text=inp["text"],
        uncond_text=inp["uncond"],
        guidance_scale=4.0,
        controlnet=adapter.controlnet,
        control=inp["control"],
        identity=IdentityConditions(identity.context, identity.tokens, masks, identity.tokens),
    )
    assert not torch.allclose(guided_prediction(unet, inp["sample"], 500, same_identity), got, atol=1e-5)

    # No CFG: the conditional branch alone; identities are cleared after every step.
    single = StepConditions(
        text=inp["text"], controlnet=adapter.controlnet, control=inp["control"], identity=identity
    )
    torch.testing.assert_close(
        guided_prediction(unet, inp["sample"], 500, single), cond, rtol=1e-5, atol=1e-6
    )
    assert adapter.mgmica_context.tokens is None


@torch.no_grad()
def test_precomputed_condition_gives_the_same_output_without_touching_the_controlnet(setup):
    unet, adapter, _, _, _, inp = setup
    controlnet = adapter.controlnet
    modules_before = dict(controlnet.named_modules())
    embedded = embed_condition(controlnet, inp["control"])
    assert isinstance(embedded, EmbeddedCondition) and embedded.features.shape[-2:] == (LATENT, LATENT)
    raw = StepConditions(text=inp["text"], uncond_text=inp["uncond"], guidance_scale=3.0,
                         controlnet=controlnet, control=inp["control"])  # fmt: skip
    pre = StepConditions(text=inp["text"], uncond_text=inp["uncond"], guidance_scale=3.0,
                         controlnet=controlnet, control=embedded)  # fmt: skip
    want = guided_prediction(unet, inp["sample"], 500, raw)
    assert torch.equal(guided_prediction(unet, inp["sample"], 500, pre), want)
    rows = torch.tensor([1])
    torch.testing.assert_close(
        guided_prediction(unet, inp["sample"][rows], 500, pre.select(rows)), want[rows], rtol=1e-4, atol=1e-5
    )
    assert dict(controlnet.named_modules()) == modules_before  # nothing swapped


@torch.no_grad()
def test_replaced_mgmica_processors_raise_and_attach_puts_them_back(setup):
    unet, adapter, embeddings, crops, masks, inp = setup
    conditions = StepConditions(
        text=inp["text"], identity=adapter.identity_conditions(embeddings, crops, masks, False)
    )
    before = guided_prediction(unet, inp["sample"], 500, conditions)
    unet.set_attn_processor(AttnProcessor2_0())  # e.g. a speed-up that puts stock processors everywhere
    with pytest.raises(MGMICAMissingError, match="AttnProcessor2_0"):
        check_mgmica(unet, adapter.mgmica_context)
    with pytest.raises(MGMICAMissingError, match="replaced"):
        guided_prediction(unet, inp["sample"], 500, conditions)
    adapter.attach(unet)
    assert torch.equal(guided_prediction(unet, inp["sample"], 500, conditions), before)


def test_cfg_without_the_unconditional_inputs_is_an_error(setup):
    _, adapter, embeddings, crops, masks, inp = setup
    with pytest.raises(ModelInputError, match="uncond_text"):
        StepConditions(text=inp["text"], guidance_scale=2.0)
    with pytest.raises(ModelInputError, match="null"):
        StepConditions(
            text=inp["text"],
            uncond_text=inp["uncond"],
            guidance_scale=2.0,
            identity=adapter.identity_conditions(embeddings, crops, masks, guidance=False),
        )


def test_pipeline_refuses_identities_when_mgmica_was_replaced(fresh_backbone):
    from magicid.models.pipeline import MagicIDPipeline

    params = load_params(None)
    adapter = MagicIDAdapter.create(fresh_backbone, params)
    pipe = MagicIDPipeline.from_backbone(fresh_backbone, adapter, params)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    embedding = np.ones(128, np.float32) / np.sqrt(128)
    with pytest.raises(MGMICAMissingError, match="adapter.attach"):
        pipe("a person", identities=[embedding], height=PIXELS, width=PIXELS, num_inference_steps=1)
