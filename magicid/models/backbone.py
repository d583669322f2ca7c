"""The diffusion backbone: a real Stable Diffusion 1.5 folder from local disk, or the offline `tiny` one.

`tiny` is built in code from a seed, so tests and the demo run anywhere without downloads. It is shaped
like SD so that what holds on it holds on real weights:

- VAE with downsampling factor 8 and 4 latent channels; its `scaling_factor` is fitted so that scaled
  latents have unit variance (how SD arrived at 0.18215). DDIM inversion only converges on latents of
  that scale (DESIGN §4).
- DDIM scheduler with SD's settings: scaled_linear betas 0.00085-0.012, `clip_sample=False`,
  `set_alpha_to_one=False`, `steps_offset=1`.
- UNet2DConditionModel with cross-attention at the lower resolutions only (no attention at the highest
  resolution, the costliest place for it; none in the mid block), cross-attention width = text encoder width.
- A CLIP text encoder and a CLIP BPE tokenizer whose vocabulary and merges are learnt here from a fixed
  prompt corpus (`model_max_length=77`, as SD's).

Nothing downloads: real weights load with `local_files_only=True` from a folder that must exist.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from magicid.config import Params
from magicid.errors import BackboneError

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

# The corpus the tiny tokenizer's BPE merges are learnt from: words of portrait prompts.
_TOKENIZER_CORPUS = """
a photo of a person portrait face smiling woman man child people group friends family team
at the beach in a park studio light close up headshot wearing glasses hat shirt dress suit
astronaut space helmet red blue green yellow black white brown hair eyes nose mouth beard
happy sad serious looking camera left right center standing sitting together outdoors indoors
high quality detailed realistic photograph painting oil watercolor cinematic lighting sunset
city street mountain forest snow winter summer autumn spring wedding party office school
two three four five six seven eight persons faces small large background foreground blurry
"""


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


@dataclasses.dataclass
class Backbone:
    """The five parts of an SD-style model. Tensors flow as in diffusers:

    - `tokenizer(prompt)` -> ids (B, 77); `text_encoder(ids)[0]` -> (B, 77, C_text)
    - `vae.encode(image (B, 3, H, W) in [-1, 1])` -> latents (B, 4, H/8, W/8) (times `vae.config.scaling_factor`)
    - `unet(latents, t, encoder_hidden_states)` -> noise prediction (B, 4, H/8, W/8)
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    source: str = "tiny"

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Backbone:
        for module in (self.unet, self.vae, self.text_encoder):
            # Only cast what differs: diffusers warns on every `.to(dtype)` of a loaded model.
            if dtype is not None and module.dtype != dtype:
                module.to(dtype=dtype)
            if device is not None and module.device != torch.device(device):
                module.to(device=device)
        return self

    def stable_diffusion_pipeline(self):
        """diffusers' stock `StableDiffusionPipeline` over these components (no safety checker): the baseline
        MagicID is compared with, and the layout `save_pretrained` writes."""
        from diffusers import StableDiffusionPipeline

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

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a diffusers Stable Diffusion folder (model_index.json + one subfolder a component), atomically:
        a crash leaves the previous folder or none, never a half-written model."""
        from magicid.utils import atomic_write_dir

        def write(folder: Path) -> None:
            self.stable_diffusion_pipeline().save_pretrained(str(folder), safe_serialization=True)
            write_vocab_files(self.tokenizer, folder / "tokenizer")

        return atomic_write_dir(path, write)


def write_vocab_files(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """Write `vocab.json` + `merges.txt` beside `tokenizer.json`, the layout of SD 1.5's tokenizer folder.

    transformers 5 saves only `tokenizer.json`; SD folders (and older loaders) expect the two BPE files.
    """
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (every byte gets a visible character)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    byte_values, chars = printable[:], printable[:]
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, map(chr, chars), strict=True))


def build_clip_vocab(
    corpus: str = _TOKENIZER_CORPUS, n_merges: int = 400
) -> tuple[dict[str, int], list[str]]:
    """Learn a CLIP-style BPE vocabulary (with `</w>` word ends) from `corpus`, deterministically.

    Returns:
        (vocab token -> id, merges as "a b" strings in rank order).
    """
    base = list(_bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base]
    words = collections.Counter(corpus.lower().split())
    splits = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges: list[str] = []
    for _ in range(n_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, parts in splits.items():
            for pair in zip(parts, parts[1:], strict=False):
                pairs[pair] += words[word]
        if not pairs:
            break
        # Most frequent pair; ties broken by the pair itself so the result never depends on dict order.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(f"{best[0]} {best[1]}")
        tokens.append(best[0] + best[1])
        for word, parts in splits.items():
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            splits[word] = tuple(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def build_tiny_tokenizer(n_merges: int = 400) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over the project's own vocabulary, `model_max_length=77`.

    transformers 5's `CLIPTokenizer` ignores `vocab_file=`/`merges_file=` (it silently builds a 3-token
    tokenizer), so the vocabulary is passed as objects.
    """
    vocab, merges = build_clip_vocab(n_merges=n_merges)
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(m.split(" ")) for m in merges],
        model_max_length=77,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}")
    return tokenizer


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


def build_tiny_backbone(config: TinyBackboneConfig | None = None) -> Backbone:
    """Build the offline backbone from `config.seed`; the same seed gives bit-identical weights."""
    config = config or TinyBackboneConfig()
    tokenizer = build_tiny_tokenizer(config.bpe_merges)
    n_blocks = len(config.block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            layers_per_block=config.layers_per_block,
            block_out_channels=config.block_out_channels,
            # No attention at the highest resolution: the costliest place for it (SD has it; tiny skips it).
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_blocks - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n_blocks - 1) + ("UpBlock2D",),
            cross_attention_dim=config.cross_attention_dim,
            attention_head_dim=config.attention_head_dim,
            norm_num_groups=16,
            # A mid block without attention keeps one call under 30 ms on 2 CPU cores; identity attention
            # still runs at both lower resolutions (16x16 and 8x8 latent grids at 256 px).
            mid_block_type="UNetMidBlock2D" if config.light_mid_block else "UNetMidBlock2DCrossAttn",
        )
        vae = AutoencoderKL(
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
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=config.cross_attention_dim,
                intermediate_size=config.cross_attention_dim * 4,
                num_hidden_layers=config.text_layers,
                num_attention_heads=max(1, config.cross_attention_dim // 32),
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=fit_vae_scaling_factor(vae, seed=config.seed))
    scheduler = DDIMScheduler(**SD_SCHEDULER_KWARGS)
    return Backbone(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def check_sd_folder(path: Path) -> None:
    """Raise `BackboneError` naming every missing file of a diffusers SD 1.5 folder."""
    if not path.is_dir():
        raise BackboneError(
            f"model.backbone={str(path)!r}: folder not found. Put a diffusers Stable Diffusion 1.5 folder there "
            "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) or use model.backbone=tiny."
        )
    missing = [
        f"{what} ({' or '.join(options)})"
        for what, options in SD15_REQUIRED_FILES.items()
        if not any((path / option).is_file() for option in options)
    ]
    if missing:
        raise BackboneError(
            f"model.backbone={str(path)!r} is not a complete diffusers SD 1.5 folder; missing: "
            + "; ".join(missing)
        )
    index = json.loads((path / "model_index.json").read_text())
    if "text_encoder_2" in index:
        raise BackboneError(
            f"{path}: an SDXL folder (text_encoder_2); only SD 1.x folders are supported so far"
        )


def load_sd_folder(path: str | Path, torch_dtype: torch.dtype = torch.float32) -> Backbone:
    """Load a diffusers SD 1.5 folder from local disk only (`local_files_only=True`)."""
    path = Path(path).expanduser()
    check_sd_folder(path)
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
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return Backbone(unet, vae, text_encoder, tokenizer, scheduler, source=str(path))


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackboneError("model.device=cuda but no CUDA device is visible; use model.device=cpu or auto")
    return torch.device(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise BackboneError("model.dtype=float16 needs CUDA; on CPU use float32 or bfloat16")
    return dtype


def load_backbone(params: Params, tiny: TinyBackboneConfig | None = None) -> Backbone:
    """The backbone named by `params.model.backbone` (`tiny` or a local folder), on the configured device/dtype.

    Args:
        params: the typed parameters; reads `seed`, `model.backbone`, `model.device`, `model.dtype`.
        tiny: sizes of the tiny backbone (default: `TinyBackboneConfig(seed=params.seed)`).

    Raises:
        BackboneError: a missing/incomplete folder (naming the missing files), or an impossible device/dtype.
    """
    device = resolve_device(params.model.device)
    dtype = resolve_dtype(params.model.dtype, device)
    if params.model.backbone == "tiny":
        backbone = build_tiny_backbone(tiny or TinyBackboneConfig(seed=params.seed))
    else:
        backbone = load_sd_folder(params.model.backbone, torch_dtype=dtype)
    return backbone.to(device=device, dtype=dtype)
