"""DIIR with a half-precision model (issue 25): the inversion keeps its own arithmetic in float32 (the UNet runs in
its dtype on a cast sample), which round-trips several times closer than inverting in bfloat16; the background
stays exact."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from magicid.config import load_params
from magicid.imaging.crops import zoom_crop
from magicid.restore.inversion import round_trip_error
from magicid.restore.noise import noise_function
from magicid.restore.plan import to_tensor

BOXES = [(40, 40, 68, 68), (150, 30, 190, 70), (100, 160, 124, 184)]


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((256, 256), Image.BICUBIC))


@torch.no_grad()
def test_float32_inversion_arithmetic_with_a_bfloat16_unet(tiny_backbone, astronaut):
    backbone = copy.deepcopy(tiny_backbone).to(dtype=torch.bfloat16)
    cfg = load_params(None).diir
    crops = [zoom_crop(astronaut, box, 64, cfg.crop_margin)[0] for box in BOXES]
    latents = backbone.vae.encode(to_tensor(crops, "cpu", torch.bfloat16)).latent_dist.mean
    latents = latents * backbone.vae.config.scaling_factor
    ids = backbone.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    text = backbone.text_encoder(ids)[0].expand(len(crops), -1, -1)
    errors, evals = {}, {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        noise_fn = noise_function(backbone.unet, backbone.scheduler, text)
        errors[name], inverted = round_trip_error(noise_fn, backbone.scheduler, latents.to(dtype), 10, 0.5,
                                                  cfg.inversion_iters, cfg.inversion_tol)  # fmt: skip
        assert inverted.latents.dtype == dtype
        evals[name] = inverted.sample_evals
    print(f"bf16 UNet, inversion in bf16: {errors['bf16']:.3g} ({evals['bf16']} evals); in fp32: {errors['fp32']:.3g} "
          f"({evals['fp32']} evals)")  # fmt: skip
    assert errors["fp32"] < errors["bf16"] / 3 and errors["fp32"] <= 5e-5
    assert evals["fp32"] <= evals["bf16"]


def test_restore_with_a_bfloat16_model_keeps_the_background(tiny_backbone, astronaut):
    from magicid.restore.diir import DIIR

    backbone = copy.deepcopy(tiny_backbone).to(dtype=torch.bfloat16)
    diir = DIIR.from_backbone(backbone, params=load_params(None, ["diir.num_inference_steps=4"]))
    diir.set_progress_bar_config(disable=True)
    result = diir.restore(astronaut, boxes=BOXES, faces="all")
    out = np.asarray(result.image)
    assert np.array_equal(out[result.mask == 0], astronaut[result.mask == 0])
    assert not np.array_equal(out, astronaut)
