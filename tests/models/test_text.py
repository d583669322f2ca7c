"""The one prompt encoder: the trainer, MagicIDPipeline and DIIR condition on the same states for the same text."""

from __future__ import annotations

import torch
from transformers import CLIPTextModel

from magicid.models.text import encode_prompts
from magicid.restore.conditions import PromptConditions
from magicid.training.train_data import TextEncoderCache

PROMPTS = ["a photo of two friends at the beach", "", "x " * 200]  # the last one is truncated at 77 tokens


def test_trainer_pipeline_and_diir_encode_a_prompt_alike(tiny_backbone):
    from magicid.models.pipeline import MagicIDPipeline

    backbone = tiny_backbone
    reference = torch.stack(
        [
            CLIPTextModel.forward(
                backbone.text_encoder,
                backbone.tokenizer(
                    p, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
                ).input_ids,
            )[0][0]
            for p in PROMPTS
        ]
    )
    shared, pooled = encode_prompts([(backbone.tokenizer, backbone.text_encoder)], PROMPTS)
    assert pooled is None and shared.shape[:2] == (3, 77)
    torch.testing.assert_close(shared, reference, rtol=0, atol=1e-6)

    trainer = TextEncoderCache(backbone)(PROMPTS)
    diir = torch.cat([PromptConditions(backbone.tokenizer, backbone.text_encoder).encode(p, torch.device("cpu"),
                                                                                      torch.float32)[0]
                      for p in PROMPTS])  # fmt: skip
    pipeline = MagicIDPipeline.encode_prompt(_PipelineStandIn(backbone), PROMPTS, negative=None)
    for states in (trainer, diir, pipeline):
        torch.testing.assert_close(states, shared, rtol=0, atol=0)


class _PipelineStandIn:
    """What `MagicIDPipeline.encode_prompt` reads of the pipeline: its tokenizer, text encoder and UNet."""

    def __init__(self, backbone) -> None:
        self.tokenizer, self.text_encoder, self.unet = (
            backbone.tokenizer,
            backbone.text_encoder,
            backbone.unet,
        )
