"""The one prompt encoder: text -> CLIP hidden states, as the trainer, `MagicIDPipeline` and DIIR all need them.

One CFG rule (`models/denoise.py`) holds only if training, generation and restoration condition on the same
states for the same text, so they tokenise alike here: padded to `tokenizer.model_max_length` (77 for SD),
truncated, one tokenizer call per encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from magicid.errors import MagicIDError


@torch.no_grad()
def encode_prompts(
    encoders: Sequence[tuple[Any, torch.nn.Module]], prompts: list[str], sdxl: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text states (B, L, C) of `prompts` and SDXL's pooled text embedding (B, C_pool) (None for SD 1.x).

    SD 1.x: the encoder's last hidden state. SDXL, as its pipeline does: both encoders' penultimate hidden
    states concatenated on C, and the pooled output of the second (a `CLIPTextModelWithProjection`).

    Args:
        encoders: `(tokenizer, text_encoder)` pairs: one for SD 1.x, two for SDXL.
        prompts: B texts.
        sdxl: SDXL's conditioning (penultimate states, pooled embedding).

    Returns:
        (hidden (B, L, C), pooled (B, C_pool) or None), on the text encoder's device and dtype.

    Raises:
        MagicIDError: `sdxl` without an encoder that has a projection (no pooled output).
    """
    hidden, pooled = [], None
    for tokenizer, encoder in encoders:
        ids = tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(encoder.device)
        if not sdxl:
            hidden.append(encoder(ids)[0])
            continue
        output = encoder(ids, output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
        if output[0].ndim == 2:  # text_embeds (B, C_pool) of the encoder with projection
            pooled = output[0]
    if sdxl and pooled is None:
        raise MagicIDError("SDXL: text_encoder_2 must be a CLIPTextModelWithProjection (pooled output)")
    return torch.cat(hidden, dim=-1), pooled
