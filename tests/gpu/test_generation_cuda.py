"""Generation on CUDA in each dtype: finite, and the same seed gives the same pixels; the SD 1.5-shaped backbone
builds there with the published parameter counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from magicid.config import load_params
from tests.gpu.conftest import DTYPES, GPU_MARKS

pytestmark = GPU_MARKS


@pytest.mark.parametrize(("dtype_name", "dtype"), DTYPES)
def test_generation_in_each_dtype_is_finite_and_deterministic(dtype_name, dtype):
    from magicid.models.adapter import MagicIDAdapter
    from magicid.models.backbone import load_backbone
    from magicid.models.pipeline import MagicIDPipeline

    params = load_params(None, ["model.device=cuda", f"model.dtype={dtype_name}", "model.resolution=128",
                                "model.num_inference_steps=6"])  # fmt: skip
    backbone = load_backbone(params)
    assert backbone.device.type == "cuda" and backbone.dtype == dtype
    adapter = MagicIDAdapter.create(backbone, params)
    assert adapter.device.type == "cuda" and adapter.controlnet.dtype == dtype
    pipe = MagicIDPipeline.from_backbone(backbone, adapter, params)
    pipe.set_progress_bar_config(disable=True)
    identity = [np.ones(params.model.id_embed_dim, np.float32) / params.model.id_embed_dim**0.5] * 2
    outputs = []
    for seed in (3, 3, 4):
        images = pipe("a photo of two people", identities=identity, layout=[(10, 20, 50, 60), (70, 20, 110, 60)],
                      height=128, width=128, num_inference_steps=6, guidance_scale=5.0,
                      generator=torch.Generator().manual_seed(seed), output_type="np").images  # fmt: skip
        assert np.isfinite(images).all(), f"{dtype_name}: non-finite pixels"
        outputs.append(images)
    assert np.array_equal(outputs[0], outputs[1]), f"{dtype_name}: the same seed gave different pixels"
    assert not np.array_equal(outputs[0], outputs[2])


def test_generate_command_path_runs_on_cuda(tmp_path):
    from magicid.generate import generate_to_file

    params = load_params(None, ["model.device=cuda", "model.dtype=bfloat16", "model.resolution=128",
                                "model.num_inference_steps=4"])  # fmt: skip
    first = np.asarray(Image.open(generate_to_file(params, "a photo", 5, tmp_path / "a.png")))
    second = np.asarray(Image.open(generate_to_file(params, "a photo", 5, tmp_path / "b.png")))
    assert np.array_equal(first, second)


def test_sd15_shaped_backbone_builds_on_cuda_with_the_published_sizes():
    import time

    from magicid.models.sd15_shapes import SD15_PARAMETER_COUNTS, build_sd15_shaped_backbone

    start = time.perf_counter()
    backbone = build_sd15_shaped_backbone(0, "cuda", torch.bfloat16)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    counts = {
        name: sum(p.numel() for p in getattr(backbone, name).parameters()) for name in SD15_PARAMETER_COUNTS
    }
    assert counts == SD15_PARAMETER_COUNTS
    assert seconds < 30, f"building took {seconds:.1f} s"
    latents = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(2, 77, 768, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        out = backbone.unet(latents, torch.tensor(500, device="cuda"), text).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()
