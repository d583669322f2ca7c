"""The speed options of issue 25: `model.controlnet_cfg` (the MMF ControlNet once a step for both CFG halves) and
`model.channels_last`.

"both" (the default) is today's step: the ControlNet on both halves, each with its own text. "conditional" runs it
on the conditional half only and gives its residuals to both halves: half the ControlNet rows; exactly the same
prediction where the two halves' texts agree (e.g. DIIR's default empty prompt), close otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from magicid.config import load_params
from magicid.errors import ModelInputError
from magicid.models.adapter import MagicIDAdapter
from magicid.models.conditioning import embed_condition
from magicid.models.denoise import StepConditions, guided_prediction

LATENT, PIXELS = 8, 64


def _perturb(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Make the zero-initialised ControlNet outputs act, so its residuals matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


class RowCounter:
    def __init__(self, module: torch.nn.Module) -> None:
        self.rows = 0
        module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        self.rows += int((args[0] if args else kwargs["sample"]).shape[0])


@pytest.fixture()
def setup(fresh_backbone):
    adapter = MagicIDAdapter.create(fresh_backbone, load_params(None)).eval()
    _perturb(adapter.controlnet, 1)
    g = torch.Generator().manual_seed(0)
    dim = fresh_backbone.cross_attention_dim
    sample = torch.randn(2, 4, LATENT, LATENT, generator=g)
    text = torch.randn(2, 77, dim, generator=g)
    uncond = torch.randn(2, 77, dim, generator=g)
    control = embed_condition(adapter.controlnet, torch.rand(2, 6, PIXELS, PIXELS, generator=g))
    return fresh_backbone.unet, adapter, sample, text, uncond, control


@torch.no_grad()
def test_conditional_runs_the_controlnet_on_half_the_rows_and_stays_close(setup):
    unet, adapter, sample, text, uncond, control = setup
    counter = RowCounter(adapter.controlnet)
    base = StepConditions(
        text=text, uncond_text=uncond, guidance_scale=5.0, controlnet=adapter.controlnet, control=control
    )
    both = guided_prediction(unet, sample, 500, base)
    rows_both, counter.rows = counter.rows, 0
    once = StepConditions(
        text=text, uncond_text=uncond, guidance_scale=5.0, controlnet=adapter.controlnet, control=control,
        control_branches="conditional",
    )  # fmt: skip
    shared = guided_prediction(unet, sample, 500, once)
    assert (rows_both, counter.rows) == (4, 2)
    assert torch.isfinite(shared).all()
    # The unconditional half now sees residuals made with the prompt's text: a different, nearby prediction.
    difference = (shared - both).abs().max().item()
    assert 0 < difference < 0.1 * both.abs().max().item(), difference


@torch.no_grad()
def test_conditional_equals_both_when_the_halves_share_their_text(setup):
    unet, adapter, sample, text, _, control = setup
    kwargs = dict(text=text, uncond_text=text.clone(), guidance_scale=3.0, controlnet=adapter.controlnet,
                  control=control)  # fmt: skip
    both = guided_prediction(unet, sample, 500, StepConditions(**kwargs))
    shared = guided_prediction(unet, sample, 500, StepConditions(**kwargs, control_branches="conditional"))
    torch.testing.assert_close(shared, both, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_without_cfg_both_settings_are_the_same_call(setup):
    unet, adapter, sample, text, _, control = setup
    kwargs = dict(text=text, controlnet=adapter.controlnet, control=control)
    both = guided_prediction(unet, sample, 500, StepConditions(**kwargs))
    shared = guided_prediction(unet, sample, 500, StepConditions(**kwargs, control_branches="conditional"))
    assert torch.equal(shared, both)


def test_unknown_setting_is_refused(setup):
    _, adapter, _, text, uncond, control = setup
    with pytest.raises(ModelInputError, match="control_branches='once'"):
        StepConditions(text=text, uncond_text=uncond, guidance_scale=2.0, controlnet=adapter.controlnet,
                       control=control, control_branches="once")  # fmt: skip


def test_pipeline_images_with_each_setting(fresh_backbone):
    """Generation with a face layout: "both" is the default and deterministic; "conditional" gives a close image."""
    from magicid.models.pipeline import MagicIDPipeline

    images = {}
    for setting in ("both", "conditional", "both"):
        params = load_params(None, ["model.resolution=64", f"model.controlnet_cfg={setting}"])
        adapter = MagicIDAdapter.create(fresh_backbone, params).eval()
        _perturb(adapter.controlnet, 1)
        pipe = MagicIDPipeline.from_backbone(fresh_backbone, adapter, params)
        pipe.set_progress_bar_config(disable=True)
        image = pipe(
            "a photo", identities=[np.ones(128, np.float32) / 128**0.5], layout=[(8, 8, 40, 40)], height=64,
            width=64, num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images  # fmt: skip
        images.setdefault(setting, []).append(image)
    assert np.array_equal(images["both"][0], images["both"][1])
    difference = np.abs(images["conditional"][0] - images["both"][0])
    assert 0 < difference.max() < 0.5 and difference.mean() < 0.05, (difference.max(), difference.mean())


def test_channels_last_loads_the_weights_in_that_layout_and_keeps_the_image(tiny_backbone):
    """`model.channels_last`: the UNet's, VAE's and ControlNet's conv weights in channels_last; the same image up to
    float rounding (convolutions sum in another order)."""
    from magicid.generate import generate_image
    from magicid.models.backbone import load_backbone

    images = {}
    for flag in ("false", "true"):
        params = load_params(
            None, ["model.resolution=64", "model.num_inference_steps=3", f"model.channels_last={flag}",
                   "model.untrained_adapter=true"],
        )  # fmt: skip
        backbone = load_backbone(params)
        adapter = MagicIDAdapter.create(backbone, params)
        weights = {
            "unet": backbone.unet.conv_in.weight,
            "vae": backbone.vae.decoder.conv_out.weight,
            "controlnet": adapter.controlnet.conv_in.weight,
        }
        layout = {name: w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                  for name, w in weights.items()}  # fmt: skip
        assert layout == dict.fromkeys(weights, flag == "true"), layout
        images[flag] = np.asarray(
            generate_image(params, "a photo", 0, backbone=load_backbone(params), progress=False,
                           identities=[np.ones(128, np.float32) / 128**0.5], layout=[(8, 8, 40, 40)])
        ).astype(int)  # fmt: skip
    assert np.abs(images["true"] - images["false"]).max() <= 2
