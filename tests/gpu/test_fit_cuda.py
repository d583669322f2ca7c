"""The backbone fit on CUDA: models, pictures and random draws on the device; deterministic by seed (deterministic
kernels on); losses finite."""

from __future__ import annotations

import math

import torch
from safetensors.torch import load_file

from tests.gpu.conftest import GPU_MARKS

pytestmark = GPU_MARKS


def test_fit_on_cuda_is_deterministic_and_finite(tmp_path, deterministic):
    from magicid.config import load_params
    from magicid.training.fit import fit_backbone
    from magicid.training.synthetic import write_synthetic_idzoom

    data = write_synthetic_idzoom(tmp_path / "data", n_images=3, crop_size=64, seed=0)
    params = load_params(None, [
        "model.device=cuda", "fit.resolution=64", "fit.vae_resolution=64", "fit.vae_steps=4", "fit.unet_steps=6",
        "fit.vae_batch=4", "fit.unet_batch=32", "fit.warmup_steps=1", "fit.checkpoint_every=100", "fit.log_every=2",
    ])  # fmt: skip
    first = fit_backbone(params, data, tmp_path / "a", progress=False, track=False)
    fit_backbone(params, data, tmp_path / "b", progress=False, track=False)
    assert all(math.isfinite(v) for v in [*first.vae_losses.values(), *first.unet_losses.values()])
    for part in ("unet", "vae"):
        a = load_file(str(tmp_path / "a" / part / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(tmp_path / "b" / part / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), f"{part}: two fits with one seed differ on CUDA"
    print(f"fit on CUDA: {first.timings}")
