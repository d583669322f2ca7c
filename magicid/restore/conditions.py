"""DIIR's conditions for a batch of same-bucket face crops (DESIGN §4, steps 3-4).

- Text (`PromptConditions`, over the one prompt encoder `models.text.encode_prompts`): SD 1.x, the text
  encoder's last hidden state; SDXL, as its pipeline does, both
  encoders' penultimate hidden states concatenated on C plus `added_cond_kwargs` (the second encoder's
  pooled embedding and the six micro-conditioning time ids of the crop).
- Landmarks (`landmark_condition`): the ControlNet's 6-channel condition with the landmark channels set.
- Identity (`identity_conditions`): MGMICA's per-face tokens from global (embedding) + local (crop)
  features, masked to the face box.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from magicid.errors import DataError, MagicIDError
from magicid.imaging.crops import zoom_crop
from magicid.models.text import encode_prompts
from magicid.restore.matching import ReferenceIdentity
from magicid.restore.plan import PlannedFace, face_mask_in_crop, resize_square, to_tensor


def sdxl_time_ids(bucket: int, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's micro-conditioning for n crops at `bucket` px, (n, 6): original size, crop top-left, target size.

    A zoomed face crop is a whole, uncropped image of its own: original = target = (bucket, bucket), top-left 0.
    """
    return torch.tensor([[bucket, bucket, 0, 0, bucket, bucket]], device=device, dtype=dtype).expand(n, -1)


class PromptConditions:
    """Text conditions of SD 1.x or SDXL for batches of crops, each prompt encoded once.

    Args:
        tokenizer, text_encoder: the (first) CLIP tokenizer and text encoder.
        tokenizer_2, text_encoder_2: SDXL's second pair (None for SD 1.x).
    """

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module, tokenizer_2: Any | None = None,
                 text_encoder_2: torch.nn.Module | None = None) -> None:  # fmt: skip
        self.encoders = [(tokenizer, text_encoder)]
        if text_encoder_2 is not None:
            self.encoders.append((tokenizer_2, text_encoder_2))
        self.is_sdxl = text_encoder_2 is not None
        self._cache: dict[
            tuple[str, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor | None]
        ] = {}

    def encode(self, prompt: str, device: torch.device, dtype: torch.dtype):
        """Text embeddings (1, L, C) and, for SDXL, the pooled embedding (1, C_pool) (else None); cached."""
        key = (prompt, device, dtype)
        if key not in self._cache:
            hidden, pooled = encode_prompts(self.encoders, [prompt], self.is_sdxl)
            self._cache[key] = (
                hidden.to(device=device, dtype=dtype),
                None if pooled is None else pooled.to(device=device, dtype=dtype),
            )
        return self._cache[key]

    def __call__(
        self, prompt: str, n: int, bucket: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """(n, L, C) text embeddings and SDXL's `added_cond_kwargs` for n crops at `bucket` px (None: SD 1.x):
        `text_embeds` (n, C_pool), `time_ids` (n, 6)."""
        hidden, pooled = self.encode(prompt, device, dtype)
        if not self.is_sdxl:
            return hidden.expand(n, -1, -1), None
        added = {"text_embeds": pooled.expand(n, -1), "time_ids": sdxl_time_ids(bucket, n, device, dtype)}
        return hidden.expand(n, -1, -1), added


def landmark_condition(landmark: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """ControlNet condition (n, 6, H, W) in [0, 1] from landmark maps uint8 (n, H, W, 3)."""
    from magicid.models.conditioning import make_condition

    maps = torch.from_numpy(landmark).permute(0, 3, 1, 2).float() / 255.0
    return make_condition(None, maps.to(device), "landmark").to(dtype)


def identity_crop(pixels: np.ndarray, bbox: np.ndarray, params: Any) -> np.ndarray:
    """uint8 (S, S, 3) identity crop (`model.id_crop_size`) with the one identity-crop margin
    (`data.crop_margin`: IDZoom's crops that training sees, the pipeline's reference crops)."""
    return zoom_crop(pixels, bbox, params.model.id_crop_size, params.data.crop_margin)[0]


def reference_from_photo(analyzer: Any, pixels: np.ndarray, name: str, params: Any) -> ReferenceIdentity:
    """A reference identity from a uint8 (H, W, 3) photo: its largest face's embedding and identity crop.

    Raises:
        DataError: no face found in the photo (the message names it).
    """
    faces = analyzer.analyze(pixels)
    if not faces:
        raise DataError(
            f"reference {name or '(image)'}: no face found; give a photo where the face is visible"
        )
    face = max(faces, key=lambda f: f.width * f.height)
    return ReferenceIdentity(
        np.asarray(face.embedding, np.float32), identity_crop(pixels, face.bbox, params), name
    )


def identity_conditions(
    adapter: Any,
    params: Any,
    pixels: np.ndarray,
    chunk: list[PlannedFace],
    refs: list[ReferenceIdentity],
    guidance: bool,
    device: torch.device,
    dtype: torch.dtype,
):
    """`IdentityConditions` for one batch: tokens (n, 1, T, C) from global + local features (and the null
    identity's for CFG), face masks (n, 1, bucket, bucket), scale `model.id_scale`.

    A face with a reference takes the reference's embedding and crop; without one, its own embedding and a
    crop of itself; with no embedding at all (a bare box, no reference), no identity (an all-zero mask).

    Args:
        adapter: the `MagicIDAdapter` (its MGMICA is on the UNet).
        params: `Params` (`model.id_crop_size`, `model.id_scale`, `data.crop_margin`).
        pixels: the uint8 (H, W, 3) input image; chunk: the batch's planned faces; refs: the references.
        guidance: also encode the null identity (CFG's unconditional branch).
    """
    embeddings, id_crops, masks = [], [], []
    for job in chunk:
        ref = refs[job.identity] if job.identity is not None else None
        embedding = ref.embedding if ref is not None else job.embedding
        local = (
            ref.crop if ref is not None and ref.crop is not None else identity_crop(pixels, job.bbox, params)
        )
        if embedding is not None:
            mask = face_mask_in_crop(job)  # MGMICA writes identity only inside the face box
        else:
            embedding = np.zeros(adapter.embed_dim, np.float32)
            mask = np.zeros((job.bucket, job.bucket), np.float32)
        if embedding.shape != (adapter.embed_dim,):
            raise MagicIDError(
                f"identity embedding has {embedding.shape[0]} dims, the adapter expects {adapter.embed_dim} "
                "(model.id_embed_dim must match the face backend)"
            )
        embeddings.append(embedding)
        id_crops.append(resize_square(local, params.model.id_crop_size))
        masks.append(mask)
    emb = torch.from_numpy(np.stack(embeddings)).float().to(device).unsqueeze(1)  # (n, 1, D)
    crops_t = to_tensor(id_crops, device, torch.float32).unsqueeze(1)  # (n, 1, 3, S, S)
    id_masks = torch.from_numpy(np.stack(masks)).to(device).unsqueeze(1)  # (n, 1, bucket, bucket)
    identity = adapter.identity_conditions(emb, crops_t, id_masks, guidance, params.model.id_scale)
    return dataclasses.replace(
        identity,
        tokens=identity.tokens.to(dtype),
        uncond_tokens=None if identity.uncond_tokens is None else identity.uncond_tokens.to(dtype),
    )
