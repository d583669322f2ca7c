"""The parts of an SD-style model (`Backbone`) and SD 1.x's constants, below both ways of getting one: loading a
folder (`magicid.models.backbone`) and building one in code (`magicid.models.tiny`, `magicid.models.sd15_shapes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from magicid.errors import BackboneError, ConfigError
from magicid.models.tokenizer import write_vocab_files

VAE_SCALE_FACTOR = 8

# SD 1.x scheduler settings (the `scheduler_config.json` of runwayml/stable-diffusion-v1-5, as DDIM).
SD_SCHEDULER_KWARGS = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


@dataclasses.dataclass
class Backbone:
    """The parts of an SD 1.x or SDXL model. Tensors flow as in diffusers:

    - `tokenizer(prompt)` -> ids (B, 77); `text_encoder(ids)[0]` -> (B, 77, C_text)
    - `vae.encode(image (B, 3, H, W) in [-1, 1])` -> latents (B, 4, H/8, W/8) (times `vae.config.scaling_factor`)
    - `unet(latents, t, encoder_hidden_states)` -> noise prediction (B, 4, H/8, W/8)
    - SDXL only: `text_encoder_2` (a `CLIPTextModelWithProjection`) and `tokenizer_2`; the UNet's
      cross-attention takes both encoders' penultimate hidden states concatenated on C, and
      `added_cond_kwargs={"text_embeds": (B, C_pool), "time_ids": (B, 6)}`.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    source: str = "tiny"
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None

    def __post_init__(self) -> None:
        if (self.text_encoder_2 is None) != (self.tokenizer_2 is None):
            raise BackboneError(
                f"backbone {self.source!r}: text_encoder_2 and tokenizer_2 come together (SDXL)"
            )
        unet_sdxl = getattr(self.unet.config, "addition_embed_type", None) == "text_time"
        if unet_sdxl != self.is_sdxl:
            raise BackboneError(
                f"backbone {self.source!r}: the UNet {'has' if unet_sdxl else 'lacks'} SDXL's text_time added "
                f"embedding but text_encoder_2 is {'missing' if unet_sdxl else 'present'}"
            )

    @property
    def is_sdxl(self) -> bool:
        """Whether this is an SDXL model (two text encoders, `added_cond_kwargs`)."""
        return self.text_encoder_2 is not None

    def require_sd1(self, what: str) -> None:
        """Stop `what` on an SDXL backbone: it runs on SD 1.x only.

        Raises:
            ConfigError: this is an SDXL backbone (the message says what SDXL supports and what to set).
        """
        if self.is_sdxl:
            raise ConfigError(
                f"{what} needs an SD 1.x backbone; model.backbone={self.source!r} is SDXL, which MagicID supports "
                "for DIIR restoration only (`magicid restore`, or DIIR.from_backbone / DIIR.from_pipe in Python). "
                f"For {what} set model.backbone=tiny or a local SD 1.5 folder"
            )

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The neural components (UNet, VAE, text encoder(s))."""
        return [self.unet, self.vae, self.text_encoder] + ([self.text_encoder_2] if self.is_sdxl else [])

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Backbone:
        for module in self.modules:
            # Only cast what differs: diffusers warns on every `.to(dtype)` of a loaded model.
            if dtype is not None and module.dtype != dtype:
                module.to(dtype=dtype)
            if device is not None and module.device != torch.device(device):
                module.to(device=device)
        return self

    def stable_diffusion_pipeline(self):
        """diffusers' stock `StableDiffusionPipeline` over these components (no safety checker): the baseline
        MagicID is compared with, and the layout `save_pretrained` writes for SD 1.x."""
        from diffusers import StableDiffusionPipeline

        self.require_sd1("StableDiffusionPipeline")
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def stable_diffusion_xl_pipeline(self):
        """diffusers' stock `StableDiffusionXLPipeline` over these components (no watermarker): what
        `DIIR.from_pipe` takes, and the layout `save_pretrained` writes for SDXL."""
        from diffusers import StableDiffusionXLPipeline

        if not self.is_sdxl:
            raise ConfigError(f"backbone {self.source!r} is SD 1.x: use stable_diffusion_pipeline()")
        return StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=self.unet,
            scheduler=self.scheduler,
            add_watermarker=False,
        )

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a diffusers folder (model_index.json + one subfolder a component; SD 1.x or SDXL layout),
        atomically: a crash leaves the previous folder or none, never a half-written model."""
        from magicid.utils import atomic_write_dir

        def write(folder: Path) -> None:
            pipe = self.stable_diffusion_xl_pipeline() if self.is_sdxl else self.stable_diffusion_pipeline()
            # An attached adapter's ID projections (MGMICA processors) are the adapter's weights, not the UNet's.
            with stock_attention(self.unet):
                pipe.save_pretrained(str(folder), safe_serialization=True)
            write_vocab_files(self.tokenizer, folder / "tokenizer")
            if self.is_sdxl:
                write_vocab_files(self.tokenizer_2, folder / "tokenizer_2")

        return atomic_write_dir(path, write)


@contextlib.contextmanager
def stock_attention(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`unet` with stock attention processors for the duration, its own put back afterwards.

    Processors that are modules (MGMICA's, holding an adapter's ID projections) are submodules of the UNet, so its
    `state_dict` and `save_pretrained` would carry the adapter's weights; inside this block they do not.
    """
    processors = unet.attn_processors
    if not any(isinstance(p, torch.nn.Module) for p in processors.values()):
        yield unet
        return
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    try:
        yield unet
    finally:
        unet.set_attn_processor(processors)
