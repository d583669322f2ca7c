"""A random-weight backbone in Stable Diffusion 1.5's published shapes, built in code (nothing downloaded).

For speed and memory figures on a GPU (`benchmarks/*.py --device cuda`, `tests/gpu/`): what a step costs
depends on the shapes, not on the weights. The configs are those published with SD 1.5
(`runwayml/stable-diffusion-v1-5`: `unet/config.json`, `vae/config.json`, `text_encoder/config.json`),
written out here:

- UNet2DConditionModel: 859.5 M parameters (320/640/1280/1280, two layers a block, cross-attention width 768,
  attention at the three highest resolutions and in the mid block, 8 heads);
- AutoencoderKL: 83.7 M (128/256/512/512, two layers a block, 4 latent channels, factor 8);
- CLIPTextModel: 123.1 M (width 768, 12 layers, 12 heads, vocabulary 49408, 77 positions, quick-gelu).

The tokenizer is the offline tiny one (its ids are a subset of the 49408-entry embedding table; a prompt's
token count, 77, is SD's). The VAE's `scaling_factor` is fitted as the tiny VAE's is (scaled latents of unit
variance, as SD derived its 0.18215), so DDIM inversion converges on it as on real weights. Images made with
these weights are noise: use them for timing, memory and numerics (finite, deterministic, exact masking), never
for quality.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from magicid.models.components import SD_SCHEDULER_KWARGS, Backbone
from magicid.models.tiny import fit_vae_scaling_factor
from magicid.models.tokenizer import build_tiny_tokenizer

__all__ = [
    "SD15_PARAMETER_COUNTS",
    "build_sd15_shaped_backbone",
    "sd15_text_encoder",
    "sd15_unet",
    "sd15_vae",
]

# Parameter counts of the published SD 1.5 models (a test checks the builders against them).
SD15_PARAMETER_COUNTS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def sd15_unet() -> UNet2DConditionModel:
    """SD 1.5's UNet (`unet/config.json`), randomly initialised."""
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def sd15_vae() -> AutoencoderKL:
    """SD 1.5's VAE (`vae/config.json`), randomly initialised; `scaling_factor` fitted by the caller."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )


def sd15_text_encoder(bos_token_id: int, eos_token_id: int, pad_token_id: int) -> CLIPTextModel:
    """SD 1.5's text encoder (CLIP ViT-L/14's, `text_encoder/config.json`), randomly initialised."""
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return CLIPTextModel(config)


def build_sd15_shaped_backbone(
    seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Backbone:
    """A `Backbone` with SD 1.5's UNet, VAE and text encoder shapes and random weights from `seed`.

    The modules are created directly on `device` (on a GPU this takes well under a second; on CPU tens of
    seconds and ~4.3 GB in float32), then cast to `dtype`. The VAE's scaling factor is fitted in float32.

    Returns:
        A frozen (eval, no grad) SD 1.x backbone, `source="sd15-shaped-random"`.
    """
    tokenizer = build_tiny_tokenizer()
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with device:
            unet = sd15_unet()
            vae = sd15_vae()
            text_encoder = sd15_text_encoder(
                tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
            )
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=fit_vae_scaling_factor(vae, seed=seed))
    backbone = Backbone(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**SD_SCHEDULER_KWARGS),
        source="sd15-shaped-random",
    )
    return backbone.to(dtype=dtype)
