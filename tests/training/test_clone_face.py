"""Clone Face Tuning samples (masks cover exactly the pasted clones) and the face-weighted diffusion loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from magicid.config import CloneFaceParams
from magicid.errors import ConfigError
from magicid.imaging.layout import check_clone_params, place_clones
from magicid.training.clone_face import face_weight_map, make_clone_face_sample, weighted_diffusion_loss

PARAMS = CloneFaceParams(prob=1.0, k_min=2, k_max=4, scale_min=0.15, scale_max=0.35)


def _crop(seed: int = 0, size: int = 48) -> np.ndarray:
    # Values 1..255: no crop pixel equals the all-zero background, so "changed pixels" are exactly the clones.
    return np.random.default_rng(seed).integers(1, 256, size=(size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("seed", range(12))
def test_clone_masks_cover_exactly_the_pasted_clones(seed):
    size = 128
    background = np.zeros((size, size, 3), dtype=np.uint8)
    crop = _crop(seed)
    layer = np.full((40, 40, 1), 200, dtype=np.uint8)
    sample = make_clone_face_sample(
        crop, size, PARAMS, np.random.default_rng(seed), background=background, layers={"landmark": layer}
    )
    assert PARAMS.k_min <= sample.k <= PARAMS.k_max
    assert sample.masks.shape == (sample.k, size, size)
    pasted = (sample.image != background).any(axis=-1)
    # Pixel-exact: the union of the masks is the set of pixels the clones changed.
    assert np.array_equal(pasted, sample.union.astype(bool))
    # Disjoint clones, each mask a solid square of the drawn scale, exactly where its box says.
    assert sample.masks.sum(axis=0).max() == 1.0
    for mask, (x0, y0, x1, y1) in zip(sample.masks, sample.boxes, strict=True):
        ys, xs = np.nonzero(mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
        assert mask.sum() == (x1 - x0) * (y1 - y0)
        assert x1 - x0 == y1 - y0
        assert round(PARAMS.scale_min * size) <= x1 - x0 <= round(PARAMS.scale_max * size)
        assert pasted[y0:y1, x0:x1].all()
    # Layers (condition maps) are pasted at the same places and nowhere else.
    assert np.array_equal(sample.layers["landmark"][..., 0] > 0, sample.union.astype(bool))


def test_clone_sample_is_deterministic_in_its_generator():
    a = make_clone_face_sample(_crop(), 96, PARAMS, np.random.default_rng(7))
    b = make_clone_face_sample(_crop(), 96, PARAMS, np.random.default_rng(7))
    c = make_clone_face_sample(_crop(), 96, PARAMS, np.random.default_rng(8))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.boxes, b.boxes)
    assert not (np.array_equal(a.boxes, c.boxes) and a.k == c.k)


def test_every_k_in_range_occurs():
    ks = {make_clone_face_sample(_crop(), 64, PARAMS, np.random.default_rng(s)).k for s in range(60)}
    assert ks == {2, 3, 4}


def test_placement_never_overlaps_at_the_largest_scale():
    for seed in range(30):
        boxes = place_clones(100, 4, 0.5, 0.5, np.random.default_rng(seed))
        canvas = np.zeros((100, 100), dtype=int)
        for x0, y0, x1, y1 in boxes:
            canvas[y0:y1, x0:x1] += 1
        assert canvas.max() == 1 and canvas.sum() == 4 * 50 * 50


def test_scale_too_large_for_k_is_a_config_error():
    with pytest.raises(ConfigError, match="scale_max"):
        check_clone_params(CloneFaceParams(k_min=2, k_max=5, scale_min=0.1, scale_max=0.4))


def test_weighted_loss_with_weight_one_is_plain_mse():
    generator = torch.Generator().manual_seed(0)
    prediction, target = (
        torch.randn(3, 4, 8, 8, generator=generator),
        torch.randn(3, 4, 8, 8, generator=generator),
    )
    mask = (torch.rand(3, 64, 64, generator=generator) > 0.5).float()
    weight = face_weight_map(mask, (8, 8), face_loss_weight=1.0)
    assert torch.equal(weight, torch.ones(3, 1, 8, 8))
    torch.testing.assert_close(
        weighted_diffusion_loss(prediction, target, weight), F.mse_loss(prediction, target)
    )
    torch.testing.assert_close(
        weighted_diffusion_loss(prediction, target, None), F.mse_loss(prediction, target)
    )


def test_weight_map_is_the_area_fraction_of_face_per_latent_cell():
    mask = torch.zeros(1, 64, 64)
    mask[0, :16, :8] = 1.0  # latent cells (8 px): cells (0,0),(1,0) full face; nothing else
    mask[0, 40:44, 40:48] = 1.0  # cell (5,5): half face
    weight = face_weight_map(mask, (8, 8), face_loss_weight=3.0)[0, 0]
    expected = torch.ones(8, 8)
    expected[0, 0] = expected[1, 0] = 3.0
    expected[5, 5] = 2.0
    torch.testing.assert_close(weight, expected)
    # Face errors count face_loss_weight times as much as background errors.
    prediction, target = torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    prediction[..., 0, 0] = 1.0
    face_error = weighted_diffusion_loss(prediction, target, weight[None, None])
    prediction.zero_()
    prediction[..., 7, 7] = 1.0
    background_error = weighted_diffusion_loss(prediction, target, weight[None, None])
    torch.testing.assert_close(face_error, 3.0 * background_error)


@pytest.mark.parametrize("seed", range(6))
def test_clone_masks_are_the_clones_face_boxes(seed):
    """With the face's place in the crop given, each clone's mask is its face box, not the pasted square."""
    size, face_box = 128, (0.25, 0.2, 0.75, 0.8)  # the crop's margin around its face box
    background = np.zeros((size, size, 3), dtype=np.uint8)
    sample = make_clone_face_sample(
        _crop(seed), size, PARAMS, np.random.default_rng(seed), background=background, face_box=face_box
    )
    pasted = (sample.image != background).any(axis=-1)
    assert sample.union.astype(bool).sum() < pasted.sum()  # smaller than the pasted crops
    assert not (sample.union.astype(bool) & ~pasted).any()  # and inside them
    for mask, (x0, y0, x1, _y1), face in zip(sample.masks, sample.boxes, sample.face_boxes, strict=True):
        side = x1 - x0
        ys, xs = np.nonzero(mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == tuple(face)
        expected = (x0 + 0.25 * side, y0 + 0.2 * side, x0 + 0.75 * side, y0 + 0.8 * side)
        assert np.abs(np.asarray(face, float) - expected).max() <= 1.0
