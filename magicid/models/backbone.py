"""The diffusion backbone: a local diffusers SD 1.x or SDXL folder, or the offline `tiny` one built in code.

A `Backbone` holds an SD-style model's components. Loaded from a folder (`load_sd_folder`): SD 1.x
(`StableDiffusionPipeline` layout) or SDXL (`StableDiffusionXLPipeline`: a second text encoder with
projection and its tokenizer). Built in code: `magicid.models.tiny` (SD 1.x- and SDXL-shaped).

What runs on which: generation, training and evaluation (MagicIDPipeline, the trainer) need SD 1.x and stop
on an SDXL backbone with a `ConfigError` (`Backbone.require_sd1`); DIIR restoration runs on both.

Nothing downloads: real weights load with `local_files_only=True` from a folder that must exist.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from magicid.config import Params
from magicid.errors import BackboneError, ConfigError
from magicid.models.tokenizer import write_vocab_files

if TYPE_CHECKING:
    from magicid.models.tiny import TinyBackboneConfig

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

# Sources of the backbones built in code (`magicid.models.tiny`): never trained at any native size.
TINY_SOURCES = ("tiny", "tiny-sdxl")

# Files a diffusers SD 1.5 folder must hold; each entry lists acceptable alternatives.
SD15_REQUIRED_FILES = {
    "model_index.json": ["model_index.json"],
    "unet config": ["unet/config.json"],
    "unet weights": [
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
    ],
    "vae config": ["vae/config.json"],
    "vae weights": [
        "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.bin",
    ],
    "text encoder config": ["text_encoder/config.json"],
    "text encoder weights": [
        "text_encoder/model.safetensors",
        "text_encoder/model.fp16.safetensors",
        "text_encoder/pytorch_model.bin",
    ],
    "tokenizer vocabulary": ["tokenizer/vocab.json"],
    "tokenizer merges": ["tokenizer/merges.txt"],
    "scheduler config": ["scheduler/scheduler_config.json"],
}

# What an SDXL folder holds beyond the SD 1.5 files: the second text encoder and its tokenizer.
SDXL_EXTRA_FILES = {
    "text encoder 2 config": ["text_encoder_2/config.json"],
    "text encoder 2 weights": [
        "text_encoder_2/model.safetensors",
        "text_encoder_2/model.fp16.safetensors",
        "text_encoder_2/pytorch_model.bin",
    ],
    "tokenizer 2 vocabulary": ["tokenizer_2/vocab.json"],
    "tokenizer 2 merges": ["tokenizer_2/merges.txt"],
}

FP16_FIX_VAE = "madebyollin/sdxl-vae-fp16-fix"


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


def _missing(path: Path, required: dict[str, list[str]]) -> list[str]:
    return [
        f"{what} ({' or '.join(options)})"
        for what, options in required.items()
        if not any((path / option).is_file() for option in options)
    ]


def check_sd_folder(path: Path) -> bool:
    """Check a diffusers SD 1.x or SDXL folder; SDXL when its model_index.json lists `text_encoder_2`.

    Returns:
        Whether the folder is SDXL.

    Raises:
        BackboneError: no folder, or one missing files (every missing file named).
    """
    if not path.is_dir():
        raise BackboneError(
            f"model.backbone={str(path)!r}: folder not found. Put a diffusers Stable Diffusion 1.5 folder there "
            "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/; SDXL also text_encoder_2/, "
            "tokenizer_2/) or use model.backbone=tiny."
        )
    missing = _missing(path, SD15_REQUIRED_FILES)
    index_path = path / "model_index.json"
    is_sdxl = index_path.is_file() and "text_encoder_2" in json.loads(index_path.read_text())
    if is_sdxl:
        missing += _missing(path, SDXL_EXTRA_FILES)
    if missing:
        kind = "SDXL" if is_sdxl else "SD 1.5"
        raise BackboneError(
            f"model.backbone={str(path)!r} is not a complete diffusers {kind} folder; missing: "
            + "; ".join(missing)
        )
    return is_sdxl


def check_sdxl_vae_dtype(path: Path, torch_dtype: torch.dtype) -> None:
    """Refuse float16 with SDXL's original VAE: its activations overflow float16 (NaN/black images).

    diffusers marks such a VAE with `force_upcast: true` in vae/config.json (the default); the fp16-fix VAE
    (`madebyollin/sdxl-vae-fp16-fix`) is retrained to stay in range and says `force_upcast: false`.

    Raises:
        ConfigError: float16 with a VAE that needs upcasting (the message gives both ways out).
    """
    if torch_dtype != torch.float16:
        return
    vae_config = json.loads((path / "vae/config.json").read_text())
    if vae_config.get("force_upcast", True):
        raise ConfigError(
            f"model.dtype=float16 with {path}: SDXL's VAE overflows in float16 (its vae/config.json has "
            "force_upcast true or unset). Use model.dtype=float32 (or bfloat16), or put the fp16-fix VAE "
            f"({FP16_FIX_VAE}, its config says force_upcast false) at {path / 'vae'}"
        )


def load_sd_folder(path: str | Path, torch_dtype: torch.dtype = torch.float32) -> Backbone:
    """Load a diffusers SD 1.x or SDXL folder from local disk only (`local_files_only=True`).

    A folder holding `checksums.sha256` (the shipped offline world) is checked file by file first
    (`magicid.models.checksums`).

    Raises:
        BackboneError: missing/incomplete folder; ChecksumError (a BackboneError): a file that differs from the
            folder's checksums; ConfigError: float16 with SDXL's original VAE.
    """
    from magicid.models.checksums import verify_model_folder

    path = Path(path).expanduser()
    is_sdxl = check_sd_folder(path)
    verify_model_folder(path)
    if is_sdxl:
        check_sdxl_vae_dtype(path, torch_dtype)
    common = dict(local_files_only=True, torch_dtype=torch_dtype)
    variant = (
        "fp16"
        if not (path / "unet/diffusion_pytorch_model.safetensors").is_file()
        and (path / "unet/diffusion_pytorch_model.fp16.safetensors").is_file()
        else None
    )
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, **common)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, **common)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant, **common)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    text_encoder_2 = tokenizer_2 = None
    if is_sdxl:
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder_2", variant=variant, **common
        )
        tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True)
    backbone = Backbone(unet, vae, text_encoder, tokenizer, scheduler, str(path), text_encoder_2, tokenizer_2)
    for module in backbone.modules:
        module.eval().requires_grad_(False)
    return backbone


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is an error.

    Raises:
        ConfigError: `cuda` (or `cuda:N`) asked for where torch sees no CUDA device.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"model.device={device} (or --device {device}) but torch sees no CUDA device "
            f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA); "
            "use model.device=cpu or auto"
        )
    return torch.device(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise BackboneError("model.dtype=float16 needs CUDA; on CPU use float32 or bfloat16")
    return dtype


def load_backbone(params: Params, tiny: TinyBackboneConfig | None = None) -> Backbone:
    """The backbone named by `params.model.backbone` (`tiny`, or a local SD 1.x or SDXL folder), on the configured
    device/dtype.

    Args:
        params: the typed parameters; reads `seed`, `model.backbone`, `model.device`, `model.dtype`.
        tiny: sizes of the tiny backbone (default: `TinyBackboneConfig(seed=params.seed)`).

    Raises:
        BackboneError: a missing/incomplete folder (naming the missing files), or an impossible device/dtype.
        ConfigError: float16 with SDXL's original VAE (`check_sdxl_vae_dtype`).
    """
    device = resolve_device(params.model.device)
    dtype = resolve_dtype(params.model.dtype, device)
    if params.model.backbone == "tiny":
        from magicid.models.tiny import TinyBackboneConfig, build_tiny_backbone

        backbone = build_tiny_backbone(tiny or TinyBackboneConfig(seed=params.seed))
    else:
        backbone = load_sd_folder(params.model.backbone, torch_dtype=dtype)
    backbone.to(device=device, dtype=dtype)
    if params.model.channels_last:
        for module in (backbone.unet, backbone.vae):
            module.to(memory_format=torch.channels_last)
    return backbone
