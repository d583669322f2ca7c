"""Text-to-image generation with the configured backbone (the `magicid generate` command's science)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from magicid.config import Params
from magicid.models.backbone import Backbone, load_backbone
from magicid.utils import atomic_save_image


def generate_image(
    params: Params,
    prompt: str,
    seed: int,
    backbone: Backbone | None = None,
    progress: bool = True,
) -> Image.Image:
    """Generate one `model.resolution`-square image; the same prompt, seed and params give identical pixels.

    Args:
        params: typed parameters (model section: backbone, resolution, steps, guidance).
        prompt: the text prompt.
        seed: seeds an explicit `torch.Generator` (no global RNG state is touched).
        backbone: a loaded backbone to reuse; loaded from `params` when None.

    Returns:
        An RGB PIL image of size (resolution, resolution).
    """
    from diffusers import StableDiffusionPipeline

    backbone = backbone or load_backbone(params)
    pipe = StableDiffusionPipeline(
        vae=backbone.vae,
        text_encoder=backbone.text_encoder,
        tokenizer=backbone.tokenizer,
        unet=backbone.unet,
        scheduler=backbone.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=not progress)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    result = pipe(
        prompt,
        height=params.model.resolution,
        width=params.model.resolution,
        num_inference_steps=params.model.num_inference_steps,
        guidance_scale=params.model.guidance_scale,
        generator=generator,
    )
    return result.images[0]


def generate_to_file(params: Params, prompt: str, seed: int, out: str | Path) -> Path:
    image = generate_image(params, prompt, seed)
    return atomic_save_image(image, out)
