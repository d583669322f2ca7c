"""The SD 1.5-shaped random backbone (`magicid.models.sd15_shapes`) has SD 1.5's published parameter counts (built on
the meta device here: shapes without memory; tests/gpu builds it for real on CUDA)."""

from __future__ import annotations

import torch

from magicid.models.sd15_shapes import SD15_PARAMETER_COUNTS, sd15_text_encoder, sd15_unet, sd15_vae


def test_builders_match_the_published_parameter_counts():
    with torch.device("meta"):
        modules = {"unet": sd15_unet(), "vae": sd15_vae(), "text_encoder": sd15_text_encoder(0, 1, 1)}
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}
    assert (
        counts
        == SD15_PARAMETER_COUNTS
        == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    )
    unet = modules["unet"].config
    assert (unet.block_out_channels, unet.cross_attention_dim, unet.sample_size) == (
        (320, 640, 1280, 1280),
        768,
        64,
    )
    assert len(modules["unet"].attn_processors) == 32  # 16 transformer blocks x (self + cross attention)
