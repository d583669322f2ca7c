"""MMF conditioning: channel layout per mode, zeroed modalities, ControlNet downsampling = VAE factor."""

from __future__ import annotations

import copy

import pytest
import torch

from magicid.errors import ModelInputError
from magicid.models.backbone import VAE_SCALE_FACTOR
from magicid.models.conditioning import (
    MODE_IDS,
    MODES,
    build_controlnet,
    conditioning_downsampling,
    make_condition,
)
from magicid.models.mgmica import install_mgmica


def _maps(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 24, 40, generator=g), torch.rand(2, 3, 24, 40, generator=g)


def test_modes_and_ids_match_the_training_schedule():
    import typing

    from magicid.config import MMFStage

    assert MODES == typing.get_args(MMFStage.model_fields["mode"].annotation)  # params.yaml accepts these
    assert [MODE_IDS[m] for m in MODES] == [0, 1, 2]


@pytest.mark.parametrize("mode", MODES)
def test_make_condition_keeps_the_modes_channels_and_zeroes_the_rest(mode):
    skeleton, landmark = _maps()
    cond = make_condition(skeleton, landmark, mode)
    assert cond.shape == (2, 6, 24, 40)
    keep_skeleton, keep_landmark = mode in ("skeleton", "fused"), mode in ("landmark", "fused")
    assert torch.equal(cond[:, :3], skeleton if keep_skeleton else torch.zeros_like(skeleton))
    assert torch.equal(cond[:, 3:], landmark if keep_landmark else torch.zeros_like(landmark))


def test_missing_modality_is_zeroed_and_bad_inputs_raise():
    skeleton, landmark = _maps()
    fused = make_condition(None, landmark, "fused")
    assert torch.equal(fused[:, :3], torch.zeros_like(skeleton)) and torch.equal(fused[:, 3:], landmark)
    with pytest.raises(ModelInputError, match="needs a skeleton"):
        make_condition(None, landmark, "skeleton")
    with pytest.raises(ModelInputError, match="unknown mode"):
        make_condition(skeleton, landmark, "depth")
    with pytest.raises(ModelInputError, match=r"\[0, 1\]"):
        make_condition(skeleton * 255, None, "skeleton")
    with pytest.raises(ModelInputError, match="shapes differ"):
        make_condition(skeleton, landmark[..., :20], "fused")


@torch.no_grad()
def test_controlnet_embeds_the_condition_at_the_latent_grid_and_starts_as_a_no_op(tiny_backbone):
    unet = copy.deepcopy(tiny_backbone.unet)
    install_mgmica(unet)  # building from a UNet that already carries MGMICA works too
    controlnet = build_controlnet(unet)
    assert controlnet.config.conditioning_channels == 6
    assert conditioning_downsampling(controlnet) == VAE_SCALE_FACTOR
    skeleton, landmark = _maps()
    image = torch.nn.functional.interpolate(skeleton, size=(64, 96))
    cond = make_condition(image, None, "skeleton")
    embedded = controlnet.controlnet_cond_embedding(cond)
    assert embedded.shape[-2:] == (64 // VAE_SCALE_FACTOR, 96 // VAE_SCALE_FACTOR)
    latents, text = torch.randn(2, 4, 8, 12), torch.randn(2, 77, 64)
    down, mid = controlnet(latents, 500, text, controlnet_cond=cond, return_dict=False)
    assert all(not r.any() for r in down) and not mid.any()  # zero convs: no effect before training
    # The encoder copy shares the UNet's weights (not its MGMICA processors).
    assert torch.equal(controlnet.conv_in.weight, unet.conv_in.weight)
    assert not any(hasattr(p, "to_k_id") for p in controlnet.attn_processors.values())
