"""The diffusion backbone: a local diffusers SD 1.x or SDXL folder, or the offline `tiny` one built in code.

A `Backbone` holds an SD-style model's components. Loaded from a folder (`load_sd_folder`): SD 1.x
(`StableDiffusionPipeline` layout) or SDXL (`StableDiffusionXLPipeline`: a second text encoder with
projection and its tokenizer). Built in code: `magicid.models.tiny` (SD 1.x- and SDXL-shaped).

What runs on which: generation, training and evaluation (MagicIDPipeline, the trainer) need SD 1.x and stop
on an SDXL backbone with a `ConfigError` (`Backbone.require_sd1`); DIIR restoration runs on both.

Nothing downloads: real weights load with `local_files_only=True` from a folder that must exist.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from magicid.config import Params
from magicid.errors import BackboneError, ConfigError
from magicid.models.components import SD_SCHEDULER_KWARGS as SD_SCHEDULER_KWARGS
from magicid.models.components import VAE_SCALE_FACTOR as VAE_SCALE_FACTOR
from magicid.models.components import Backbone as Backbone
from magicid.models.components import stock_attention as stock_attention

if TYPE_CHECKING:
    from magicid.models.tiny import TinyBackboneConfig

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
