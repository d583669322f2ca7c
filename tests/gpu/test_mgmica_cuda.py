"""MGMICA on CUDA in half precision: locality is exact (changing one identity's tokens changes nothing outside its
mask, on the tiny UNet and on one SD 1.5-shaped layer), scale 0 equals the stock processor, and a steady-state call
makes no host synchronisation; on both of the processor's paths (gather, dense), which agree with the formula
(`dense_reference`) in float32."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from magicid.models.mgmica import MGMICAAttnProcessor, dense_reference, identities
from tests.gpu.conftest import GPU_MARKS

pytestmark = GPU_MARKS
HALF = [torch.bfloat16, torch.float16]
PATHS = ["gather", "dense"]


def _layer(query_dim: int, cross_dim: int, heads: int, dtype: torch.dtype, path: str):
    torch.manual_seed(0)
    attn = Attention(
        query_dim=query_dim, cross_attention_dim=cross_dim, heads=heads, dim_head=query_dim // heads
    )
    proc = MGMICAAttnProcessor(query_dim, cross_dim)
    proc.context.set_path(path)
    torch.nn.init.normal_(proc.to_k_id.weight, std=0.05)
    torch.nn.init.normal_(proc.to_v_id.weight, std=0.05)
    attn.set_processor(proc)
    return attn.eval().to("cuda", dtype), proc


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", ["small", "sd15_64x64"])
@torch.inference_mode()
def test_one_layer_locality_and_scale_zero(dtype, shape, path):
    # sd15_64x64: SD 1.5's first cross-attention layer (width 320, 8 heads, text width 768) at 512 px.
    query_dim, cross_dim, heads, grid = (32, 16, 4, 16) if shape == "small" else (320, 768, 8, 64)
    attn, proc = _layer(query_dim, cross_dim, heads, dtype, path)
    g = torch.Generator("cuda").manual_seed(1)
    hidden = torch.randn(2, grid * grid, query_dim, generator=g, device="cuda", dtype=dtype)
    text = torch.randn(2, 77, cross_dim, generator=g, device="cuda", dtype=dtype)
    tokens = torch.randn(2, 2, 4, cross_dim, generator=g, device="cuda", dtype=dtype)
    masks = torch.zeros(1, 2, grid, grid, device="cuda")
    masks[:, 0, grid // 8 : grid // 2, grid // 8 : grid // 2] = 1.0
    masks[:, 1, grid // 2 :, grid // 3 :] = 0.7
    proc.set_identities(tokens, masks, latent_size=(grid, grid))
    before = attn(hidden, text)
    changed = tokens.clone()
    changed[:, 0] = torch.randn(changed[:, 0].shape, generator=g, device="cuda", dtype=dtype)
    proc.set_identities(changed, masks, latent_size=(grid, grid))
    after = attn(hidden, text)
    outside = (masks[0, 0] == 0).flatten()
    assert torch.equal(after[:, outside], before[:, outside]), "a change leaked outside the identity's mask"
    assert not torch.equal(after[:, ~outside], before[:, ~outside])
    proc.set_identities(tokens, masks, scale=0.0, latent_size=(grid, grid))
    stock = AttnProcessor2_0()(attn, hidden, text)
    assert torch.equal(attn(hidden, text), stock)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", HALF)
@torch.inference_mode()
def test_tiny_unet_locality(tiny_backbone, dtype, path):
    import copy

    from magicid.models.mgmica import install_mgmica

    unet = copy.deepcopy(tiny_backbone.unet).to("cuda", dtype)
    processors = install_mgmica(unet, path=path)
    for proc in processors.values():
        torch.nn.init.normal_(proc.to_k_id.weight, std=0.05)
    g = torch.Generator("cuda").manual_seed(0)
    latents = torch.randn(1, 4, 32, 32, generator=g, device="cuda", dtype=dtype)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g, device="cuda", dtype=dtype)
    tokens = torch.randn(1, 2, 4, unet.config.cross_attention_dim, generator=g, device="cuda", dtype=dtype)
    masks = torch.zeros(1, 2, 256, 256, device="cuda")
    masks[:, 0, 32:96, 32:96] = 1.0
    masks[:, 1, 160:224, 128:224] = 1.0
    outputs = {}

    def record(name):
        def hook(module, args, output):
            outputs[name] = output

        return hook

    layers = [n for n, m in unet.named_modules() if n.endswith("attn2")]
    handles = [unet.get_submodule(n).register_forward_hook(record(n)) for n in layers]
    with identities(unet, tokens, masks):
        unet(latents, 500, text)
    first = dict(outputs)
    changed = tokens.clone()
    changed[:, 1] = torch.randn(changed[:, 1].shape, generator=g, device="cuda", dtype=dtype)
    with identities(unet, changed, masks):
        unet(latents, 500, text)
    for handle in handles:
        handle.remove()
    # The first layers see the same inputs both times, so compare the first cross-attention layer exactly.
    name = layers[0]
    grid_side = int(first[name].shape[1] ** 0.5)
    cell = 256 // grid_side
    outside = masks[0, 1, ::cell, ::cell].flatten() == 0
    assert torch.equal(first[name][:, outside], outputs[name][:, outside])


@pytest.mark.parametrize("path", PATHS)
@torch.inference_mode()
def test_a_steady_state_call_makes_no_host_sync(path):
    attn, proc = _layer(320, 768, 8, torch.bfloat16, path)
    g = torch.Generator("cuda").manual_seed(1)
    hidden = torch.randn(2, 64 * 64, 320, generator=g, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(2, 77, 768, generator=g, device="cuda", dtype=torch.bfloat16)
    tokens = torch.randn(2, 4, 4, 768, generator=g, device="cuda", dtype=torch.bfloat16)
    masks = torch.zeros(1, 4, 64, 64, device="cuda")
    for i in range(4):
        masks[:, i, 4 + 15 * i : 14 + 15 * i, 10:30] = 1.0
    proc.set_identities(tokens, masks, latent_size=(64, 64))
    attn(hidden, text)  # the first call sizes its plan (a sync, once per identities and grid)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        attn(hidden, text)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("path", PATHS)
@torch.inference_mode()
def test_both_paths_match_the_formula_in_float32(path):
    """SD 1.5's first cross-attention layer in float32 on CUDA, soft overlapping masks, CFG halves: the path's
    output agrees with `dense_reference` (a plain loop over identities with SDPA)."""
    attn, proc = _layer(320, 768, 8, torch.float32, path)
    g = torch.Generator("cuda").manual_seed(2)
    hidden = torch.randn(2, 64 * 64, 320, generator=g, device="cuda")
    text = torch.randn(2, 77, 768, generator=g, device="cuda")
    tokens = torch.randn(1, 3, 4, 768, generator=g, device="cuda")
    masks = torch.zeros(1, 3, 512, 512, device="cuda")  # pixel-sized, resized by area to the 64x64 grid
    masks[:, 0, 40:300, 30:260] = 1.0
    masks[:, 1, 200:480, 200:500] = 0.6
    masks[:, 2, 100:180, 380:470] = 1.0
    proc.set_identities(tokens, masks, scale=0.8, latent_size=(64, 64))
    got = attn(hidden, text)
    want = dense_reference(attn, proc, hidden, text, tokens, masks, (64, 64))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
