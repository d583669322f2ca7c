"""The offline tiny backbones, built in code from a seed: SD 1.x-shaped (`build_tiny_backbone`) and
SDXL-shaped (`build_tiny_sdxl_backbone`).

Tests and the demo run anywhere without downloads. The models are shaped like the real ones so that what
holds on them holds on real weights:

- VAE with downsampling factor 8 and 4 latent channels; its `scaling_factor` is fitted so that scaled
  latents have unit variance (how SD arrived at 0.18215). DDIM inversion only converges on latents of
  that scale (DESIGN §4).
- DDIM scheduler with SD's settings: scaled_linear betas 0.00085-0.012, `clip_sample=False`,
  `set_alpha_to_one=False`, `steps_offset=1` (SDXL uses the same betas).
- UNet2DConditionModel with cross-attention at the lower resolutions only (no attention at the highest
  resolution, the costliest place for it; none in the mid block by default).
- SD 1.x: one CLIP text encoder, cross-attention width = its width. SDXL: two text encoders, a
  `CLIPTextModel` and a `CLIPTextModelWithProjection`, cross-attention width = their widths concatenated,
  and the UNet's `text_time` added embedding (pooled text embedding + six micro-conditioning ids).
- A CLIP BPE tokenizer learnt from a fixed prompt corpus (`magicid.models.tokenizer`); SDXL uses it twice.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from magicid.models.components import SD_SCHEDULER_KWARGS, Backbone
from magicid.models.tokenizer import build_tiny_tokenizer

# SDXL's added time ids: original size (2), crop top-left (2), target size (2).
SDXL_TIME_IDS = 6


@dataclasses.dataclass(frozen=True)
class TinyBackboneConfig:
    """Sizes of the offline tiny backbone (defaults: one UNet call well under 30 ms at 256x256 on 2 CPU cores).

    `block_out_channels` widens the UNet for compute-bound benchmarks; everything else keeps SD's shape.
    """

    seed: int = 0
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    cross_attention_dim: int = 64
    attention_head_dim: int = 8
    vae_channels: tuple[int, int, int, int] = (16, 32, 32, 32)
    text_layers: int = 2
    light_mid_block: bool = True
    bpe_merges: int = 400


@dataclasses.dataclass(frozen=True)
class TinySDXLConfig:
    """Sizes of the offline SDXL-shaped backbone (SDXL base: text widths 768 + 1280, pooled 1280, time 256).

    The two text widths differ, as SDXL's do, so that a swapped concatenation order cannot go unnoticed.
    """

    seed: int = 0
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    text_widths: tuple[int, int] = (24, 40)
    pooled_dim: int = 32  # text_encoder_2's projection_dim: the pooled text embedding's width
    addition_time_embed_dim: int = 8
    attention_head_dim: int = 8
    vae_channels: tuple[int, int, int, int] = (16, 32, 32, 32)
    text_layers: int = 2
    light_mid_block: bool = True
    bpe_merges: int = 400

    @property
    def cross_attention_dim(self) -> int:
        """The UNet's cross-attention width: both encoders' hidden states concatenated on C."""
        return sum(self.text_widths)

    @property
    def projection_class_embeddings_input_dim(self) -> int:
        """The `text_time` added embedding's input: pooled text embedding + 6 time ids x their embedding width."""
        return self.pooled_dim + SDXL_TIME_IDS * self.addition_time_embed_dim


def _calibration_images(size: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random images in [-1, 1], (8, 3, size, size): natural-image-like low frequencies plus detail."""
    coarse = torch.rand(8, 3, size // 32, size // 32, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    detail = 0.1 * torch.randn(8, 3, size, size, generator=generator)
    return (smooth * 2 - 1 + detail).clamp(-1, 1)


@torch.no_grad()
def fit_vae_scaling_factor(vae: AutoencoderKL, size: int = 128, seed: int = 0) -> float:
    """1 / std of the VAE's latent means on calibration images, so that scaled latents have unit variance."""
    generator = torch.Generator().manual_seed(seed)
    images = _calibration_images(size, generator).to(vae.device, vae.dtype)
    latents = vae.encode(images).latent_dist.mean
    return float(1.0 / latents.float().std())


def _unet(config: TinyBackboneConfig | TinySDXLConfig, **extra) -> UNet2DConditionModel:
    """The tiny UNet: `extra` adds SDXL's `text_time` embedding arguments."""
    n_blocks = len(config.block_out_channels)
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=config.layers_per_block,
        block_out_channels=config.block_out_channels,
        # No attention at the highest resolution: the costliest place for it (SD has it; tiny and SDXL skip it).
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_blocks - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n_blocks - 1) + ("UpBlock2D",),
        cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=16,
        # A mid block without attention keeps one call under 30 ms on 2 CPU cores; identity attention
        # still runs at both lower resolutions (16x16 and 8x8 latent grids at 256 px).
        mid_block_type="UNetMidBlock2D" if config.light_mid_block else "UNetMidBlock2DCrossAttn",
        **extra,
    )


def _vae(config: TinyBackboneConfig | TinySDXLConfig) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamplings: factor 8, as SD's VAE
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,
        mid_block_add_attention=False,
    )


def _text_config(width: int, layers: int, tokenizer: CLIPTokenizer, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=width * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 32),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _finish(modules: list[torch.nn.Module], vae: AutoencoderKL, seed: int) -> DDIMScheduler:
    """Freeze the modules, fit the VAE's scaling factor; the scheduler with SD's settings."""
    for module in modules:
        module.eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=fit_vae_scaling_factor(vae, seed=seed))
    return DDIMScheduler(**SD_SCHEDULER_KWARGS)


def build_tiny_backbone(config: TinyBackboneConfig | None = None) -> Backbone:
    """Build the offline SD 1.x-shaped backbone from `config.seed`; the same seed gives bit-identical weights."""
    config = config or TinyBackboneConfig()
    tokenizer = build_tiny_tokenizer(config.bpe_merges)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        unet = _unet(config)
        vae = _vae(config)
        text_encoder = CLIPTextModel(_text_config(config.cross_attention_dim, config.text_layers, tokenizer))
    scheduler = _finish([unet, vae, text_encoder], vae, config.seed)
    return Backbone(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def build_tiny_sdxl_backbone(config: TinySDXLConfig | None = None) -> Backbone:
    """Build the offline SDXL-shaped backbone from `config.seed`; the same seed gives bit-identical weights.

    Tensors as in SDXL: hidden states (B, 77, C1 + C2) from both encoders' penultimate layers, pooled text
    embedding (B, `pooled_dim`) from `text_encoder_2`, time ids (B, 6); the UNet takes the last two as
    `added_cond_kwargs={"text_embeds", "time_ids"}`.
    """
    config = config or TinySDXLConfig()
    tokenizer = build_tiny_tokenizer(config.bpe_merges)
    tokenizer_2 = build_tiny_tokenizer(config.bpe_merges)
    first, second = config.text_widths
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        unet = _unet(
            config,
            addition_embed_type="text_time",
            addition_time_embed_dim=config.addition_time_embed_dim,
            projection_class_embeddings_input_dim=config.projection_class_embeddings_input_dim,
        )
        vae = _vae(config)
        text_encoder = CLIPTextModel(_text_config(first, config.text_layers, tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_config(second, config.text_layers, tokenizer_2, projection_dim=config.pooled_dim)
        )
    scheduler = _finish([unet, vae, text_encoder, text_encoder_2], vae, config.seed)
    return Backbone(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        source="tiny-sdxl",
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
