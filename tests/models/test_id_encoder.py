"""ID encoder: shapes, dependence on both features, any crop size, gradients."""

from __future__ import annotations

import pytest
import torch

from magicid.errors import BackboneError, ModelInputError
from magicid.models.id_encoder import IDEncoder, TinyImageEncoder, build_image_encoder


def _inputs(batch=3, dim=128, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    embedding = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    crop = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    return embedding, crop


def test_shapes_for_any_crop_size_and_batch_independence():
    torch.manual_seed(0)
    encoder = IDEncoder(embed_dim=128, cross_attention_dim=64, n_tokens=4).eval()
    embedding, crop = _inputs()
    with torch.no_grad():
        tokens = encoder(embedding, crop)
        assert tokens.shape == (3, 4, 64)
        for size in (32, 97, 128):
            assert encoder(*_inputs(size=size)).shape == (3, 4, 64)
        torch.testing.assert_close(encoder(embedding[1:2], crop[1:2]), tokens[1:2], rtol=1e-5, atol=1e-5)


def test_tokens_depend_on_global_and_local_features():
    torch.manual_seed(0)
    encoder = IDEncoder(embed_dim=128, cross_attention_dim=64, n_tokens=4).eval()
    embedding, crop = _inputs(batch=1)
    other_embedding, other_crop = _inputs(batch=1, seed=1)
    with torch.no_grad():
        base = encoder(embedding, crop)
        assert not torch.allclose(base, encoder(other_embedding, crop), atol=1e-4)
        assert not torch.allclose(base, encoder(embedding, other_crop), atol=1e-4)


def test_wrong_shapes_raise_and_gradients_reach_every_part():
    torch.manual_seed(0)
    encoder = IDEncoder(
        embed_dim=128, cross_attention_dim=64, n_tokens=2, image_encoder=TinyImageEncoder(width=32)
    )
    embedding, crop = _inputs(batch=2)
    with pytest.raises(ModelInputError, match=r"\(B, 128\)"):
        encoder(embedding[:, :100], crop)
    with pytest.raises(ModelInputError, match="face_crop"):
        encoder(embedding, crop[:1])
    encoder(embedding, crop).square().mean().backward()
    assert encoder.image_encoder.stem[0].weight.grad.abs().sum() > 0
    assert encoder.global_to_queries[0].weight.grad.abs().sum() > 0


def test_clip_encoder_from_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="CLIP vision folder"):
        build_image_encoder(str(tmp_path / "nope"))
