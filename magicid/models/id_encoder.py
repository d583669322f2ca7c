"""ID encoder: face-recognition embedding (global) + zoomed-crop patch tokens (local) -> ID tokens (DESIGN §3).

MagicID describes an identity by two features: the global one, a face-recognition embedding (dlib 128-D
offline, ArcFace 512-D with insightface), which carries who the person is; and local ones, patch tokens of the
IDZoom face crop from an image encoder, which carry appearance detail. A perceiver-style resampler (learned
queries cross-attending to both, as IP-Adapter-Plus / FaceID-Plus) maps them to `n_tokens` tokens at the
UNet's cross-attention width, which MGMICA's `to_k_id` / `to_v_id` read.

Image encoders: `TinyImageEncoder` (a small conv + transformer encoder built in code: offline, any crop size) or
`CLIPImageEncoder` (a CLIP vision model loaded from a local folder with `local_files_only=True`, frozen).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from magicid.errors import BackboneError, ModelInputError


class TinyImageEncoder(nn.Module):
    """Crop (B, 3, S, S) in [-1, 1] -> patch tokens (B, grid * grid, width). Any S >= 8 works.

    Three stride-2 convs, then adaptive average pooling to a fixed `grid`, learned position embeddings and
    `depth` pre-norm transformer layers.
    """

    def __init__(self, width: int = 128, grid: int = 8, depth: int = 1, heads: int = 4) -> None:
        super().__init__()
        self.width = width
        self.grid = grid
        self.stem = nn.Sequential(
            nn.Conv2d(3, width // 4, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width // 4, width // 2, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1),
        )
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.position = nn.Parameter(torch.randn(1, grid * grid, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width,
            heads,
            dim_feedforward=width * 4,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, crop: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.stem(crop))  # (B, width, grid, grid)
        tokens = features.flatten(2).transpose(1, 2) + self.position  # (B, grid^2, width)
        return self.norm(self.blocks(tokens))


class CLIPImageEncoder(nn.Module):
    """A CLIP vision model from a local folder: crop (B, 3, S, S) in [-1, 1] -> patch tokens (B, P, hidden).

    The crop is resized (bilinear, antialiased) to the model's `image_size` and normalised with CLIP's mean/std;
    the class token is dropped. Frozen (`requires_grad_(False)`), as IP-Adapter keeps its image encoder.
    """

    MEAN = (0.48145466, 0.4578275, 0.40821073)
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        from transformers import CLIPVisionModel

        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise BackboneError(
                f"model.id_image_encoder={str(path)!r}: no CLIP vision folder there (config.json + weights, "
                "e.g. an IP-Adapter image_encoder/ folder); use model.id_image_encoder=tiny to build one in code"
            )
        self.model = CLIPVisionModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        self.width = int(self.model.config.hidden_size)
        self.image_size = int(self.model.config.image_size)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, crop: torch.Tensor) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        pixels = F.interpolate(crop.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        pixels = ((pixels + 1) / 2 - self.mean) / self.std
        hidden = self.model(pixel_values=pixels.to(self.model.dtype)).last_hidden_state
        return hidden[:, 1:]


def build_image_encoder(spec: str = "tiny", width: int = 128) -> nn.Module:
    """`tiny` -> `TinyImageEncoder(width)`; otherwise a local CLIP vision folder -> `CLIPImageEncoder(spec)`."""
    if spec == "tiny":
        return TinyImageEncoder(width=width)
    return CLIPImageEncoder(spec)


class _PerceiverLayer(nn.Module):
    """Learned queries attend to [context; queries] (Flamingo / IP-Adapter-Plus resampler layer) + an MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_context = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_kv = nn.Linear(width, 2 * width, bias=False)
        self.to_out = nn.Linear(width, width, bias=False)
        self.mlp = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, c = latents.shape
        normed = self.norm_latents(latents)
        kv_input = torch.cat([self.norm_context(context), normed], dim=1)  # (B, M + n, C)
        q = self.to_q(normed).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.to_kv(kv_input).chunk(2, dim=-1)
        k = k.reshape(b, -1, self.heads, c // self.heads).transpose(1, 2)
        v = v.reshape(b, -1, self.heads, c // self.heads).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        latents = latents + self.to_out(attended)
        return latents + self.mlp(latents)


class IDEncoder(nn.Module):
    """Global + local face features -> `n_tokens` ID tokens at the UNet's cross-attention width.

    Args:
        embed_dim: face-recognition embedding size D (dlib 128, ArcFace 512).
        cross_attention_dim: output width C (the UNet's cross-attention width; SD 1.5: 768).
        n_tokens: T, ID tokens per identity.
        width: resampler width (default: C).
        depth: resampler layers.
        heads: resampler attention heads (must divide `width`).
        image_encoder: an encoder crop (B, 3, S, S) -> (B, P, W_img) with a `.width` attribute
            (default: `TinyImageEncoder()`).

    `forward(embedding (B, D) float, face_crop (B, 3, S, S) in [-1, 1]) -> (B, T, C)`.
    """

    def __init__(
        self,
        embed_dim: int,
        cross_attention_dim: int,
        n_tokens: int = 4,
        width: int | None = None,
        depth: int = 2,
        heads: int = 4,
        image_encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        width = width or cross_attention_dim
        if width % heads:
            raise ModelInputError(f"IDEncoder: width {width} is not divisible by heads {heads}")
        self.embed_dim = embed_dim
        self.cross_attention_dim = cross_attention_dim
        self.n_tokens = n_tokens
        self.width = width
        self.image_encoder = image_encoder if image_encoder is not None else TinyImageEncoder()
        self.latents = nn.Parameter(torch.randn(1, n_tokens, width) * width**-0.5)
        # Global feature: shifts every query (who the person is) and is one context token.
        self.global_to_queries = nn.Sequential(
            nn.Linear(embed_dim, width), nn.GELU(), nn.Linear(width, n_tokens * width)
        )
        self.global_to_context = nn.Linear(embed_dim, width)
        self.local_to_context = nn.Linear(self.image_encoder.width, width)
        self.layers = nn.ModuleList(_PerceiverLayer(width, heads) for _ in range(depth))
        self.proj_out = nn.Linear(width, cross_attention_dim)
        self.norm_out = nn.LayerNorm(cross_attention_dim)

    def forward(self, embedding: torch.Tensor, face_crop: torch.Tensor) -> torch.Tensor:
        """embedding (B, D) float (L2-normalised); face_crop (B, 3, S, S) in [-1, 1] -> ID tokens (B, T, C)."""
        if embedding.ndim != 2 or embedding.shape[1] != self.embed_dim:
            raise ModelInputError(
                f"IDEncoder: embedding must be (B, {self.embed_dim}), got {tuple(embedding.shape)} "
                "(model.id_embed_dim must match the face backend's embedding size)"
            )
        if face_crop.ndim != 4 or face_crop.shape[1] != 3 or face_crop.shape[0] != embedding.shape[0]:
            raise ModelInputError(
                f"IDEncoder: face_crop must be ({embedding.shape[0]}, 3, S, S), got {tuple(face_crop.shape)}"
            )
        dtype = self.latents.dtype
        embedding = embedding.to(dtype)
        batch = embedding.shape[0]
        local = self.local_to_context(self.image_encoder(face_crop.to(dtype)).to(dtype))  # (B, P, W)
        context = torch.cat([self.global_to_context(embedding).unsqueeze(1), local], dim=1)  # (B, 1 + P, W)
        latents = self.latents + self.global_to_queries(embedding).view(batch, self.n_tokens, self.width)
        for layer in self.layers:
            latents = layer(latents, context)
        return self.norm_out(self.proj_out(latents))  # (B, T, C)
