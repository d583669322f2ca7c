"""Invariants of MGMICA (masked multi-identity cross-attention): locality, stock equivalence, overlaps, CFG, grids.

The processor's invariants hold on both of its paths (gather -> attend -> scatter, and dense masked): the tests
that run the processor take the `path` fixture and run once per path."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from magicid.errors import ModelInputError
from magicid.models.mgmica import (
    MGMICAAttnProcessor,
    _Dense,
    _Pairs,
    clear_identities,
    dense_reference,
    grid_for_length,
    identities,
    install_mgmica,
    layer_grids,
    mgmica_processors,
    overlap_weights,
    resize_masks,
    set_identities,
)

QUERY_DIM, CROSS_DIM, HEADS = 32, 16, 4


@pytest.fixture(params=["gather", "dense"])
def path(request) -> str:
    """The processor's path (`MGMICAContext.set_path`): every invariant must hold on both."""
    return request.param


def _layer(seed: int = 0, path: str = "gather") -> tuple[Attention, MGMICAAttnProcessor]:
    torch.manual_seed(seed)
    attn = Attention(
        query_dim=QUERY_DIM, cross_attention_dim=CROSS_DIM, heads=HEADS, dim_head=QUERY_DIM // HEADS
    )
    proc = MGMICAAttnProcessor(QUERY_DIM, CROSS_DIM)
    proc.context.set_path(path)
    torch.nn.init.normal_(proc.to_k_id.weight)
    torch.nn.init.normal_(proc.to_v_id.weight)
    attn.set_processor(proc)
    return attn.eval(), proc


def _inputs(batch: int, h: int, w: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, h * w, QUERY_DIM, generator=g)
    text = torch.randn(batch, 7, CROSS_DIM, generator=g)
    return hidden, text


def _box_masks(batch: int, h: int, w: int, boxes) -> torch.Tensor:
    masks = torch.zeros(batch, len(boxes), h, w)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        masks[:, i, y0:y1, x0:x1] = 1.0
    return masks


@torch.no_grad()
def test_matches_dense_formula_with_soft_and_overlapping_masks(path):
    attn, proc = _layer(path=path)
    h, w = 6, 9
    hidden, text = _inputs(2, h, w)
    tokens = torch.randn(2, 3, 4, CROSS_DIM)
    masks = _box_masks(2, h, w, [(0, 3, 0, 4), (2, 5, 3, 8), (4, 6, 6, 9)])
    masks[1, 0] *= 0.3  # soft weight in the second sample
    proc.set_identities(tokens, masks, scale=0.7, latent_size=(h, w))
    got = attn(hidden, encoder_hidden_states=text)
    want = dense_reference(attn, proc, hidden, text, tokens, masks, (h, w))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_changing_one_identity_changes_nothing_outside_its_mask(path):
    attn, proc = _layer(path=path)
    h, w = 8, 8
    hidden, text = _inputs(1, h, w)
    masks = _box_masks(1, h, w, [(1, 4, 1, 4), (3, 7, 3, 7)])  # overlapping at (3, 3)
    masks[0, 1] = masks[0, 1] * torch.linspace(0.2, 1.0, w)  # feathered second mask
    tokens = torch.randn(1, 2, 4, CROSS_DIM)
    changed = tokens.clone()
    changed[:, 1] = torch.randn(1, 4, CROSS_DIM) * 5
    proc.set_identities(tokens, masks, latent_size=(h, w))
    before = attn(hidden, encoder_hidden_states=text)
    proc.set_identities(changed, masks, latent_size=(h, w))
    after = attn(hidden, encoder_hidden_states=text)
    outside = (masks[0, 1] == 0).flatten()
    assert torch.equal(before[0, outside], after[0, outside])
    assert (before[0, ~outside] - after[0, ~outside]).abs().amax(-1).min() > 0  # every inside position moves


@torch.no_grad()
def test_scale_zero_no_identities_and_empty_masks_equal_stock_processor(path):
    attn, proc = _layer(path=path)
    hidden, text = _inputs(2, 5, 7)
    stock = AttnProcessor2_0()(attn, hidden, text)
    assert torch.equal(attn(hidden, encoder_hidden_states=text), stock)  # no identities
    tokens = torch.randn(2, 2, 4, CROSS_DIM)
    masks = _box_masks(2, 5, 7, [(0, 3, 0, 3), (2, 5, 2, 6)])
    proc.set_identities(tokens, masks, scale=0.0, latent_size=(5, 7))
    assert torch.equal(attn(hidden, encoder_hidden_states=text), stock)  # scale 0
    proc.set_identities(tokens, torch.zeros_like(masks), scale=1.0, latent_size=(5, 7))
    assert torch.equal(attn(hidden, encoder_hidden_states=text), stock)  # empty masks
    proc.set_identities(tokens, masks, scale=1.0, latent_size=(5, 7))
    assert not torch.equal(attn(hidden, encoder_hidden_states=text), stock)


@torch.no_grad()
def test_unet_with_mgmica_equals_stock_unet_without_identities_or_at_scale_zero(tiny_backbone, path):
    unet = copy.deepcopy(tiny_backbone.unet)
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 64, generator=g)
    stock = unet(latents, 500, text).sample
    install_mgmica(unet, path=path)
    assert torch.equal(unet(latents, 500, text).sample, stock)
    tokens, masks = (
        torch.randn(2, 2, 4, 64, generator=g),
        _box_masks(2, 256, 256, [(10, 90, 10, 90), (100, 200, 50, 150)]),
    )
    with identities(unet, tokens, masks, scale=0.0):
        assert torch.equal(unet(latents, 500, text).sample, stock)
    with identities(unet, tokens, masks):
        assert not torch.equal(unet(latents, 500, text).sample, stock)
    assert torch.equal(unet(latents, 500, text).sample, stock)  # cleared on exit
    assert all(p.scale == 1.0 for p in mgmica_processors(unet).values())


@torch.no_grad()
def test_overlap_rule_blends_identities_and_weights_sum_to_at_most_one(path):
    attn, proc = _layer(path=path)
    h, w = 6, 6
    hidden, text = _inputs(1, h, w)
    tokens = torch.randn(1, 2, 4, CROSS_DIM)
    masks = _box_masks(1, h, w, [(0, 4, 0, 4), (2, 6, 2, 6)])  # overlap: rows 2-3, cols 2-3
    stock = AttnProcessor2_0()(attn, hidden, text)
    deltas = []
    for i in range(2):
        proc.set_identities(tokens[:, i : i + 1], masks[:, i : i + 1], latent_size=(h, w))
        deltas.append(attn(hidden, encoder_hidden_states=text) - stock)
    proc.set_identities(tokens, masks, latent_size=(h, w))
    both = attn(hidden, encoder_hidden_states=text) - stock
    grid = torch.zeros(h, w, dtype=torch.bool)
    grid[2:4, 2:4] = True
    overlap, only_first = grid.flatten(), (masks[0, 0].bool() & ~masks[0, 1].bool()).flatten()
    torch.testing.assert_close(
        both[0, overlap], 0.5 * (deltas[0] + deltas[1])[0, overlap], rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(both[0, only_first], deltas[0][0, only_first], rtol=1e-5, atol=1e-6)

    soft = torch.rand(3, 4, 5, 5)
    weights = overlap_weights(soft)
    assert bool((weights.sum(1) <= 1 + 1e-6).all())
    lone = torch.zeros(1, 2, 5, 5)
    lone[0, 0] = soft[0, 0]
    assert torch.equal(overlap_weights(lone), lone)  # a lone soft mask keeps its feathering


@torch.no_grad()
def test_cfg_batches_broadcast_tokens_and_masks(path):
    attn, proc = _layer(path=path)
    h, w = 4, 6
    hidden, text = _inputs(4, h, w)  # CFG: 2 uncond + 2 cond
    tokens = torch.randn(2, 2, 4, CROSS_DIM)
    masks = _box_masks(2, h, w, [(0, 2, 0, 3), (1, 4, 2, 6)])
    proc.set_identities(tokens, masks, latent_size=(h, w))
    half = attn(hidden, encoder_hidden_states=text)
    proc.set_identities(tokens.repeat(2, 1, 1, 1), masks.repeat(2, 1, 1, 1), latent_size=(h, w))
    full = attn(hidden, encoder_hidden_states=text)
    assert torch.equal(half, full)

    # Different unconditional tokens (IP-Adapter style) change only the unconditional half.
    uncond = torch.zeros_like(tokens)
    proc.set_identities(torch.cat([uncond, tokens]), masks, latent_size=(h, w))
    mixed = attn(hidden, encoder_hidden_states=text)
    torch.testing.assert_close(mixed[2:], full[2:], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(mixed[:2], full[:2])

    proc.set_identities(tokens[:1].repeat(3, 1, 1, 1), masks[:1], latent_size=(h, w))
    with pytest.raises(ModelInputError, match="batch 3"):
        attn(hidden, encoder_hidden_states=text)


def test_bad_masks_and_tokens_are_rejected_with_shapes():
    _, proc = _layer()
    tokens = torch.randn(1, 2, 4, CROSS_DIM)
    with pytest.raises(ModelInputError, match="2 identities"):
        proc.set_identities(tokens, torch.zeros(1, 3, 8, 8))
    with pytest.raises(ModelInputError, match=r"\[0, 1\]"):
        proc.set_identities(tokens, torch.full((1, 2, 8, 8), 255.0))
    with pytest.raises(ModelInputError, match="both"):
        proc.set_identities(tokens, None)
    with pytest.raises(ModelInputError, match="no level"):
        grid_for_length(50, (8, 8))


def test_layer_grids_follow_stride_two_ceil_division():
    assert layer_grids(9, 13) == [(9, 13), (5, 7), (3, 4), (2, 2), (1, 1)]
    assert grid_for_length(35, (9, 13)) == (5, 7)
    # The ceil-division chain is what a stride-2, padding-1 conv produces.
    conv = torch.nn.Conv2d(1, 1, 3, stride=2, padding=1)
    x = torch.zeros(1, 1, 9, 13)
    for grid in layer_grids(9, 13)[1:4]:
        x = conv(x)
        assert tuple(x.shape[-2:]) == grid


@pytest.mark.parametrize("mask_size", [(256, 256), (255, 257), (37, 53), (8, 8)])
def test_area_resize_never_leaks_outside_the_mask(mask_size):
    H, W = mask_size
    masks = torch.zeros(1, 1, H, W)
    masks[..., H // 3 : H // 2 + 1, W // 4 : W // 2 + 1] = 1.0
    for grid in [(32, 32), (16, 16), (9, 13), (5, 7), (3, 4), (1, 1)]:
        resized = resize_masks(masks, grid)
        assert resized.shape == (1, 1, *grid)
        # A cell is nonzero only if its area window (adaptive pooling bounds) holds a mask pixel.
        for i in range(grid[0]):
            y0, y1 = (i * H) // grid[0], -(-((i + 1) * H) // grid[0])
            for j in range(grid[1]):
                x0, x1 = (j * W) // grid[1], -(-((j + 1) * W) // grid[1])
                assert (resized[0, 0, i, j] > 0) == bool(masks[0, 0, y0:y1, x0:x1].any())
        assert float(resized.max()) <= 1.0


def _capture_attn2_inputs(unet, latents, text):
    captured = {}
    hooks = []
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            hooks.append(
                module.register_forward_hook(
                    lambda m, args, kwargs, out, name=name: captured.__setitem__(
                        name, (args[0], kwargs["encoder_hidden_states"])
                    ),
                    with_kwargs=True,
                )
            )
    unet(latents, 500, text)
    for hook in hooks:
        hook.remove()
    return captured


@pytest.mark.parametrize(
    "latent_size, mask_size",
    [((32, 32), (256, 256)), ((9, 13), (71, 103)), ((9, 13), (9, 13)), ((7, 5), (56, 40))],
)
@torch.no_grad()
def test_masks_of_any_size_map_to_every_unet_layer_and_stay_local(
    tiny_backbone, latent_size, mask_size, path
):
    unet = copy.deepcopy(tiny_backbone.unet)
    install_mgmica(unet, path=path)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, *latent_size, generator=g)
    text = torch.randn(1, 77, 64, generator=g)
    H, W = mask_size
    masks = torch.zeros(1, 2, H, W)
    masks[0, 0, : H // 2, : W // 3] = 1.0
    masks[0, 1, H // 2 :, W // 2 :] = 1.0
    tokens = torch.randn(1, 2, 4, 64, generator=g)
    set_identities(unet, tokens, masks)
    inputs = _capture_attn2_inputs(unet, latents, text)  # also records the latent size
    expected_grids = set(layer_grids(*latent_size)[1:3])  # tiny UNet: attention at the two lower levels
    seen = set()
    modules = dict(unet.named_modules())
    changed = tokens.clone()
    changed[:, 1] += 3.0
    for name, (hidden, encoder) in inputs.items():
        attn, proc = modules[name], modules[name].processor
        set_identities(unet, tokens, masks)
        before = attn(hidden, encoder_hidden_states=encoder)
        grid = proc.last_grid
        seen.add(grid)
        set_identities(unet, changed, masks)
        after = attn(hidden, encoder_hidden_states=encoder)
        outside = (resize_masks(masks, grid)[0, 1] == 0).flatten()
        assert torch.equal(before[0, outside], after[0, outside]), name
        assert not torch.equal(before[0, ~outside], after[0, ~outside]), name
    assert seen == expected_grids
    clear_identities(unet)


def test_id_projections_are_trainable_and_text_weights_untouched(tiny_backbone, path):
    unet = copy.deepcopy(tiny_backbone.unet)
    projections = install_mgmica(unet, path=path)
    assert len(projections) == 6 and all(k.endswith("attn2") for k in projections)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 1, 4, 64, generator=g, requires_grad=True)
    masks = torch.zeros(1, 1, 256, 256)
    masks[..., 64:160, 64:160] = 1
    with identities(unet, tokens, masks):
        out = unet(torch.randn(1, 4, 32, 32, generator=g), 500, torch.randn(1, 77, 64, generator=g)).sample
    out.square().mean().backward()
    for proc in projections.values():
        assert proc.to_k_id.weight.grad is not None and proc.to_k_id.weight.grad.abs().sum() > 0
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0


@torch.no_grad()
def test_image_shaped_hidden_states_give_the_same_result_as_token_shaped_ones(path):
    attn, proc = _layer(path=path)
    h, w = 5, 6
    hidden, text = _inputs(2, h, w)
    proc.set_identities(
        torch.randn(2, 2, 4, CROSS_DIM), _box_masks(2, h, w, [(0, 3, 0, 3), (2, 5, 3, 6)]), latent_size=(h, w)
    )
    tokens_out = attn(hidden, encoder_hidden_states=text)
    image = hidden.transpose(1, 2).reshape(2, QUERY_DIM, h, w)  # (B, C, H, W)
    image_out = attn(image, encoder_hidden_states=text)
    assert image_out.shape == image.shape
    torch.testing.assert_close(image_out.flatten(2).transpose(1, 2), tokens_out, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_identity_keys_follow_weight_and_token_updates(path):
    attn, proc = _layer(path=path)
    hidden, text = _inputs(1, 4, 4)
    tokens, masks = torch.randn(1, 1, 4, CROSS_DIM), _box_masks(1, 4, 4, [(0, 2, 0, 2)])
    proc.set_identities(tokens, masks, latent_size=(4, 4))
    first = attn(hidden, encoder_hidden_states=text)
    assert torch.equal(attn(hidden, encoder_hidden_states=text), first)  # same identities: same result
    proc.to_k_id.weight.mul_(2.0)  # e.g. an optimizer step or load_state_dict
    after_update = attn(hidden, encoder_hidden_states=text)
    assert not torch.equal(after_update, first)
    proc.set_identities(tokens.clone(), masks, latent_size=(4, 4))
    assert torch.equal(attn(hidden, encoder_hidden_states=text), after_update)


@torch.no_grad()
def test_fast_path_matches_dense_reference_with_cfg_halves_and_a_context_scale(path):
    """Tokens and masks for half the batch (repeated to both CFG halves), the scale set on the context: the
    gathered processor and the module's dense formula agree."""
    attn, proc = _layer(seed=3, path=path)
    h, w = 7, 5
    hidden, text = _inputs(4, h, w, seed=4)
    tokens = torch.randn(2, 2, 4, CROSS_DIM, generator=torch.Generator().manual_seed(5))
    masks = torch.zeros(2, 2, 28, 20)  # pixel-sized masks, resized by area to the 7x5 grid
    masks[:, 0, 2:15, 1:9] = 1.0
    masks[:, 1, 10:26, 6:19] = 0.6
    proc.context.set(tokens, masks, latent_size=(h, w), scale=0.4)
    got = attn(hidden, encoder_hidden_states=text)
    want = dense_reference(attn, proc, hidden, text, tokens, masks, (h, w))
    assert proc.effective_scale == 0.4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # And the identity branch is really there: scale 0 in the reference differs from the layer.
    assert not torch.allclose(
        dense_reference(attn, proc, hidden, text, tokens, masks, (h, w), scale=0.0), got
    )


def test_auto_path_follows_the_load_and_the_threshold():
    """`auto` picks the dense path where the largest mask fills at least `dense_above` of the masked band (the
    query positions from the first to the last inside some mask), per layer grid, when the plan is built."""
    _, proc = _layer(path="auto")
    context = proc.context
    context.set_path("auto", dense_above=0.4)
    cpu = torch.device("cpu")
    tokens = torch.randn(1, 2, 4, CROSS_DIM)
    small = _box_masks(1, 16, 16, [(2, 4, 2, 4), (10, 12, 9, 11)])  # 2 x 2 cells each
    context.set(tokens, small, latent_size=(16, 16))
    plan = context.pairs((16, 16), 1, cpu)
    band = (11 * 16 + 10 + 1) - (2 * 16 + 2)  # from the first masked position (2, 2) to one past (11, 10)
    assert isinstance(plan, _Pairs) and plan.load == pytest.approx(4 / band)
    halves = _box_masks(1, 16, 16, [(0, 8, 0, 16), (8, 16, 0, 16)])  # the whole image, 128 cells each
    context.set(tokens, halves, latent_size=(16, 16))
    plan = context.pairs((16, 16), 1, cpu)
    assert isinstance(plan, _Dense) and plan.load == pytest.approx(0.5) and plan.rows == (0, 256)
    assert isinstance(context.pairs((8, 8), 1, cpu), _Dense)  # every grid decides on its own resized masks
    context.set_path("auto", dense_above=0.6)  # the same masks, a higher threshold: gather again
    assert isinstance(context.pairs((16, 16), 1, cpu), _Pairs)
    context.set_path("dense")
    context.set(tokens, small, latent_size=(16, 16))
    assert context.pairs((16, 16), 1, cpu).rows == (34, 187)
    context.set_path("gather")
    context.set(tokens, halves, latent_size=(16, 16))
    assert isinstance(context.pairs((16, 16), 1, cpu), _Pairs)
    with pytest.raises(ModelInputError, match="sparse"):
        context.set_path("sparse")
    with pytest.raises(ModelInputError, match="dense_above"):
        context.set_path("auto", dense_above=0.0)


def test_both_paths_give_the_same_values_and_gradients():
    """Training runs the dense path through autograd (a band inside the image: `slice_scatter`); its gradients
    match the gather path's."""
    h, w = 8, 8
    hidden, text = _inputs(2, h, w)
    tokens = torch.randn(2, 2, 4, CROSS_DIM)
    masks = _box_masks(2, h, w, [(2, 4, 1, 5), (3, 6, 4, 8)])  # overlapping, the band rows 2..5
    masks[1, 1] *= 0.5
    results = {}
    for path in ("gather", "dense"):
        attn, proc = _layer(seed=2, path=path)
        hid, tok = hidden.clone().requires_grad_(), tokens.clone().requires_grad_()
        proc.set_identities(tok, masks, latent_size=(h, w))
        out = attn(hid, encoder_hidden_states=text)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results[path] = (out.detach(), hid.grad, tok.grad, proc.to_k_id.weight.grad, proc.to_v_id.weight.grad)
    assert isinstance(proc.context.pairs((h, w), 2, torch.device("cpu")), _Dense)  # the last one ran dense
    for gathered, dense in zip(results["gather"], results["dense"], strict=True):
        torch.testing.assert_close(dense, gathered, rtol=1e-5, atol=1e-5)
