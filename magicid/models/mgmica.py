"""MGMICA: Masked Group Multi-Identity Cross-Attention (MagicID's multi-identity attention, DESIGN §3).

A diffusers attention processor for the UNet's cross-attention layers (`attn2`). For identities 1..n with ID
tokens T_i (B, n, T, C) and face masks M_i resized to the layer's token grid, a layer computes

    out = to_out(text_attn + scale * Σ_i w_i ⊙ attn(Q, K_id(T_i), V_id(T_i)))

- The text branch *is* diffusers' `AttnProcessor2_0` (called, not copied), so with scale 0, no identities or
  empty masks the layer is bit-identical to the stock one.
- The ID attention is decoupled (IP-Adapter style): own projections `to_k_id` / `to_v_id`, the layer's own
  query and output projection. Two hooks that live only during the stock call take the query `to_q` already
  computed and add the ID term to the input of `to_out[0]` (where IP-Adapter adds it), so neither projection
  runs twice.
- Two paths compute the ID term, with the same result (to float rounding) and the same exact locality:
  - gather -> attend -> scatter (`gather`): only query rows inside some mask are gathered, and each identity
    attends only at its own positions, all identities in one batched SDPA over (batch x identity, positions),
    scatter-added back: the extra cost follows face area, not image area. Rows outside every mask are never
    written.
  - dense masked (`dense`): every identity at every query position of the masked band (the positions from the
    first to the last inside some mask: a slice, no gather, no scatter), all identities' tokens in one score
    matmul, a softmax per identity, the overlap weights folded into the probabilities and one matmul with the
    stacked values (attention and the weighted sum at once). Where w_i = 0 identity i adds exactly 0.
  - `auto` (the default, `model.mgmica_path`) chooses per layer grid when that grid's plan is built (once per
    identities, never inside a UNet call): dense where the largest mask fills at least `model.mgmica_dense_above`
    of the band. Dense does band / (largest mask) times gather's attention arithmetic (gather pads every identity
    to the largest mask), gather adds a gather and a scatter: so dense pays where one mask fills the band, or
    where launches, not arithmetic, set the pace.
    Measured on CPU (`benchmarks/bench_attention.py`, SD 1.5's 64x64 layer, CFG batch 2, 1 thread, 60 paired
    repetitions, medians, dense / gather): 1.01-1.02 at 1 identity with faces 5-40 % of the image, 0.95 at 1
    identity and 80 % (the largest mask 0.91 of the band), 1.00-1.04 at 2, 1.04-1.10 at 4 and 1.15-1.21 at 8
    identities (the 1-identity, 80 % case read 0.98-1.02 in shorter runs: parity); at the 32x32, 16x16 and 8x8
    grids 0.96-1.05; the whole tiny UNet with 4 identities 1.05-1.08x stock dense, 1.02-1.05x gather. So the CPU
    threshold is 0.9: dense only where one face fills the band, where the two are at parity. On a GPU the crossover
    is unmeasured: `bench_attention --device cuda` prints it (`gpu_mgmica_dense_above_measured`).
    Operators a steady-state call adds to the stock processor: gather 6, dense 7 (neither reads back to the host).

The file reads top to bottom: the formula (`dense_reference`, the whole mechanism in a dozen plain lines, which
the tests hold both paths to), the processor (the same formula, gathered or dense), its identity context (which
builds each grid's plan and chooses the path), the grid helpers (mask grids, area resize, the overlap rule), and
installation on a UNet.

Why two hooks rather than one straight `__call__` (as diffusers' `IPAdapterAttnProcessor2_0`): a straight
`__call__` would copy `AttnProcessor2_0`'s body (group norm, spatial norm, residual, rescale, head reshapes) into
this file, and the stock equivalence at scale 0 and every later diffusers fix would then hold only as long as the
copy is kept in step. The hooks let the text branch stay diffusers' own code, called; they are registered and
removed inside each call (`try/finally`), so nothing outlives it. What they cost: a reader must know that
`to_q`'s output is captured and `to_out[0]`'s input is amended, which `__call__` says in its docstring, and
`torch.compile` cannot trace them: `__call__` is `torch.compiler.disable`d, so in a compiled UNet (`model.compile`,
`magicid.models.compilation`) each MGMICA layer runs eager, one graph break, and the rest compiles around it.

No identity K/V cache: the ID keys and values (n x T tokens, T = 4) are recomputed at every call. A cache keyed
on the tokens and the projections' `Tensor._version` (torch-private) was measured on `benchmarks/bench_attention.py`'s
shapes (SD 1.5's 64x64 layer, CFG batch 2, faces 10 % of the image, 1 thread, cached and uncached processors
interleaved in one process, medians): it saved 0.2 / 0.2 / 0.1 / 3.4 % of the layer's time at 1 / 2 / 4 / 8
identities (40 repetitions), and -3.0 / 1.3 / -0.9 / 1.1 % in a second run (60 repetitions): noise, below the
5 % that would pay for reading a private attribute, so it was removed (the projection is 4 tokens a layer).

Masks (`w_i`): given at any size (pixels, latents, anything), (B, n, H, W) in [0, 1], hard or soft. Each layer
finds its grid from its query length: the latent (h, w) halved with ceil-division per UNet level (stride-2 convs
give ceil(h / 2)); the latent size is recorded by a forward pre-hook on the UNet (`install_mgmica`), else taken
from the masks' own size. Masks are resized to the grid by area (`adaptive_avg_pool2d`): a cell's weight is the
mask's mean over the cell, so nothing leaks outside the mask's cells (bicubic would).

Overlap rule: where masks overlap so that Σ_i M_i > 1 at a cell, the weights are renormalised to sum to 1
(w_i = M_i / Σ_j M_j); elsewhere w_i = M_i. So the identity contributions form a convex (or sub-convex) blend:
two hard masks overlapping give each identity 0.5 there, a lone soft mask keeps its feathering. Changing T_i
never changes the output at a cell where M_i = 0 (the weights depend on masks only).

Classifier-free guidance: tokens and masks may have batch B_h (the hidden-states batch), B_h / 2 (repeated to
both CFG halves, i.e. the identity is part of both the conditional and the unconditional branch) or 1
(broadcast). To let guidance amplify identity, pass 2B tokens whose first half is the unconditional identity
(IP-Adapter style: the ID encoder applied to a zero embedding and blank crop); `MagicIDPipeline` does that.

Identity state is explicit: one `MGMICAContext` shared by the processors that `install_mgmica` puts on a UNet
(reachable as `mgmica_context(unet)` or, for an adapter, `MagicIDAdapter.mgmica_context`); nothing is stored
as an attribute of the diffusers UNet. `magicid.models.denoise.guided_prediction` sets the identities of one
UNet call and clears them after it; `set_identities` / `clear_identities` / `identities(...)` set them for a
block of calls. No `cross_attention_kwargs` are passed, so diffusers never warns about unused ones.
`check_mgmica(unet, context)` raises `MGMICAMissingError` when the UNet's cross-attention layers no longer run
these processors (e.g. after `unet.set_attn_processor(AttnProcessor2_0())`), where identities would be silently ignored;
and a UNet call with identities set in which no MGMICA processor ran is an error too (`MGMICAContext.calls`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from magicid.errors import ModelInputError


class MGMICAMissingError(ModelInputError):
    """The UNet's cross-attention layers do not run the MGMICA processors the identities were meant for."""


__all__ = [
    "DENSE_ABOVE",
    "MGMICA_PATHS",
    "MGMICAAttnProcessor",
    "dense_reference",
    "MGMICAContext",
    "MGMICAMissingError",
    "attach_mgmica",
    "check_mgmica",
    "clear_identities",
    "identities",
    "install_mgmica",
    "layer_grids",
    "mgmica_context",
    "mgmica_processors",
    "resize_masks",
    "overlap_weights",
    "set_identities",
]


# ---------------------------------------------------------------------------------------------------------
# 1. The formula
# ---------------------------------------------------------------------------------------------------------


def dense_reference(
    attn: Attention,
    processor: MGMICAAttnProcessor,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    id_tokens: torch.Tensor,
    id_masks: torch.Tensor,
    grid: tuple[int, int],
    scale: float | None = None,
) -> torch.Tensor:
    """MGMICA computed densely: out = to_out(text_attn + scale * Σ_i w_i ⊙ attn(Q, K_id(T_i), V_id(T_i))).

    Every query position attends to every identity and the weights w_i (the masks resized to the layer grid by
    area, then the overlap rule) zero what lies outside M_i: a loop over identities, O(n * N) where the
    processor's gather path is O(mask area) and its dense path O(n * band). The reference both paths are tested
    against.

    Args:
        attn: the diffusers `Attention` layer (its `to_q`, `to_out`, `norm_q` / `norm_k` where set).
        processor: the `MGMICAAttnProcessor` whose `to_k_id` / `to_v_id` project the ID tokens.
        hidden_states: (B, N, C) with N = h * w of `grid`.
        encoder_hidden_states: (B, L, C_text) text states.
        id_tokens: (b, n, T, C_id) with b = B, B / 2 (CFG halves) or 1.
        id_masks: (b, n, H, W) in [0, 1] at any size.
        grid: the layer's token grid (h, w).
        scale: identity scale (default: the processor's `effective_scale`).

    Returns:
        (B, N, C_out), what the layer with `processor` and these identities returns.
    """
    text_out = AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states)
    batch = hidden_states.shape[0]
    inner = attn.to_q.out_features
    heads, head_dim = attn.heads, inner // attn.heads
    scale = processor.effective_scale if scale is None else scale
    tokens = _expand_batch(id_tokens, batch, "id_tokens")
    weights = overlap_weights(resize_masks(_expand_batch(id_masks, batch, "id_masks"), grid)).flatten(
        2
    )  # (B, n, N)

    def split_heads(x: torch.Tensor) -> torch.Tensor:  # (B, L, inner) -> (B, heads, L, d)
        return x.view(batch, -1, heads, head_dim).transpose(1, 2)

    query = split_heads(attn.to_q(hidden_states))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    identity_sum = torch.zeros(
        batch, hidden_states.shape[1], inner, dtype=query.dtype, device=query.device
    )  # (B, N, inner)
    for i in range(tokens.shape[1]):  # a loop is fine in a reference
        key = split_heads(processor.to_k_id(tokens[:, i]))
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        value = split_heads(processor.to_v_id(tokens[:, i]))
        attended = F.scaled_dot_product_attention(query, key, value).transpose(1, 2).reshape(batch, -1, inner)
        identity_sum = identity_sum + weights[:, i].unsqueeze(-1) * attended
    # to_out[0] is affine: to_out(a + s * b) = to_out(a) + s * W b; to_out[1] is dropout (identity in eval).
    return text_out + scale * F.linear(identity_sum, attn.to_out[0].weight) / attn.rescale_output_factor


# ---------------------------------------------------------------------------------------------------------
# 2. The processor
# ---------------------------------------------------------------------------------------------------------


class MGMICAAttnProcessor(nn.Module):
    """Masked multi-identity cross-attention processor (the diffusers processor contract).

    Args:
        hidden_size: the attention's inner width (`attn.to_k.out_features`; SD 1.5: 320/640/1280).
        cross_attention_dim: width of the ID tokens (the UNet's cross-attention width; SD 1.5: 768).
        scale: weight of the identity branch; 0 gives exactly the stock `AttnProcessor2_0` output.

    Owns only `to_k_id` and `to_v_id` (C -> hidden_size, no bias). Identity state: `set_identities(...)`.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.scale = float(scale)
        self.to_k_id = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_id = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.text_processor = AttnProcessor2_0()
        self.context = MGMICAContext()
        self.last_grid: tuple[int, int] | None = None  # grid of the latest call with identities (for checks)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, cross_attention_dim={self.cross_attention_dim}, scale={self.scale}"

    def set_identities(
        self,
        id_tokens: torch.Tensor | None,
        id_masks: torch.Tensor | None,
        scale: float | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> None:
        """Set this processor's identities (see module `set_identities` for shapes)."""
        self.context.set(id_tokens, id_masks, latent_size)
        if scale is not None:
            self.scale = float(scale)

    def clear_identities(self) -> None:
        self.context.set(None, None)

    # Eager inside a compiled UNet (`magicid.models.compilation`): dynamo cannot trace the per-call hooks and the
    # data-dependent gather; the layer is one graph break and the rest of the UNet compiles around it.
    @torch.compiler.disable
    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (B, N, C) or (B, C, H, W); encoder_hidden_states (B, 77, C_text) -> like hidden_states.

        Runs `AttnProcessor2_0` unchanged. With identities, two hooks live for the duration of that call only:
        one keeps the query `attn.to_q` computes anyway (no second `to_q`), one adds the masked ID attention to
        the input of `attn.to_out[0]` (as IP-Adapter adds before `to_out`: no second output projection), at the
        gathered rows (gather path) or over the masked band (dense path). Rows outside every mask are never
        written (gather) or get exactly +0 (dense).
        """
        if self.context.tokens is None:
            return self.text_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        self.context.calls += 1
        scale = self.effective_scale
        if scale == 0:
            return self.text_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if self.context.tokens.shape[-1] != self.cross_attention_dim:
            raise ModelInputError(
                f"MGMICA: id_tokens have width {self.context.tokens.shape[-1]}, this layer expects "
                f"{self.cross_attention_dim} (the UNet's cross_attention_dim)"
            )
        captured: dict[str, torch.Tensor] = {}

        def keep_query(module, args, output):
            captured["query"] = output  # (B, N, inner)

        def add_identities(module, args):
            (attended,) = args  # (B, N, inner): text attention output, before the output projection
            summed = self._add_identity_attention(attn, captured.pop("query"), attended, scale)
            return None if summed is None else (summed,)

        query_hook = attn.to_q.register_forward_hook(keep_query)
        out_hook = attn.to_out[0].register_forward_pre_hook(add_identities)
        try:
            return self.text_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        finally:
            query_hook.remove()
            out_hook.remove()

    @property
    def effective_scale(self) -> float:
        """The identity scale in force: the context's while identities set with a scale, else `scale`."""
        return self.scale if self.context.scale is None else self.context.scale

    def _add_identity_attention(
        self, attn: Attention, query: torch.Tensor, attended: torch.Tensor, scale: float
    ) -> torch.Tensor | None:
        """`attended` (B, N, inner) plus the masked ID attention from the layer's query (B, N, inner), on the path
        the context chose for this grid (`MGMICAContext.pairs`); None when every mask is empty at this grid.

        In place into `attended` (the text attention's fresh output) when no autograd is recording; a new tensor
        otherwise.
        """
        batch, length, _ = query.shape
        grid = self.context.grid(length)
        self.last_grid = grid
        plan = self.context.pairs(grid, batch, query.device)
        if plan is None:
            return None
        if isinstance(plan, _Dense):
            return self._dense(attn, plan, query, attended, scale)
        positions, delta = self._gathered(attn, plan, query, scale)
        flat = attended.reshape(-1, attended.shape[-1])  # a view or a copy: the hook returns what it wrote
        if torch.is_grad_enabled() and (flat.requires_grad or delta.requires_grad):
            flat = flat.index_put((positions,), delta.to(flat.dtype), accumulate=True)
        else:
            # In place into the text attention's fresh output (no autograd here); index_put_(accumulate)
            # rather than index_add_: on CPU the latter is ~10x slower into a large tensor.
            flat.index_put_((positions,), delta.to(flat.dtype), accumulate=True)
        return flat.view(attended.shape)

    def _gathered(
        self, attn: Attention, pairs: _Pairs, query: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather -> attend: the masked ID attention at the query rows inside the masks.

        Gathers, for every (sample, identity), the query rows inside that identity's mask (padded to the
        longest mask L with weight-0 slots), attends them to the identity's K/V in one SDPA over
        (B * n, heads, L, d), and weights them by the overlap-ruled mask values times `scale`.

        Returns:
            (flat query rows (B * n * L,) into B * N, their ID terms (B * n * L, inner)) to scatter-add.
        """
        batch, length, inner = query.shape
        heads = attn.heads
        head_dim = inner // heads
        groups, slots = pairs.positions.shape  # B * n, L

        # Gather: the query rows inside each identity's mask.  (B * n, heads, L, d)
        q = query.reshape(batch * length, inner)[pairs.flat_positions]
        if attn.norm_q is not None:
            q = attn.norm_q(q.view(-1, heads, head_dim))
        q = q.view(groups, slots, heads, head_dim).transpose(1, 2)
        key, value = self._identity_kv(attn, batch, query.dtype, query.device)

        # Attend: every identity at its own positions, one SDPA; weight by mask value x scale.
        attended = F.scaled_dot_product_attention(q, key, value, dropout_p=0.0, is_causal=False)
        attended = attended.transpose(1, 2).reshape(groups * slots, inner)
        return pairs.flat_positions, attended * pairs.scaled_weight(attended.dtype, scale)

    def _dense(
        self, attn: Attention, plan: _Dense, query: torch.Tensor, attended: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Dense masked: every identity at every query row of the band `plan.rows` (the query positions from the
        first to the last inside some mask, a slice: no gather, no scatter), in one batched attention over
        (B x heads).

        Each identity's softmax runs over its own T tokens, so all identities' keys fit in one score matrix
        (rows x T * n): one matmul, a softmax over each T-slice, the overlap weights x scale folded into the
        probabilities, and one matmul with the stacked values does the n attentions and the weighted sum at once
        (the query is read once, not once per identity as an SDPA over (B * n) would). A row outside mask i has
        weight exactly 0 for identity i, so identity i adds exactly 0 there: the locality is the gather path's.
        """
        batch, length, inner = query.shape
        heads, n_ids = attn.heads, self.context.tokens.shape[1]
        head_dim = inner // heads
        start, stop = plan.rows
        rows = stop - start

        # The band's query rows, heads split: (B * heads, rows, d) (the reshape copies them once).
        q = query[:, start:stop].view(batch, rows, heads, head_dim)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        q = q.transpose(1, 2).reshape(batch * heads, rows, head_dim)
        # Identity keys and values with the tokens ordered (T, n), identities innermost: the softmax over each
        # identity's T tokens then runs over dim -2 with n contiguous lanes, which on CPU is 3-5x faster than
        # over a last dim of T = 4 (measured at SD 1.5's 64x64 layer: 3.3 vs 14 ms at 4 identities).
        tokens = self.context.tokens.to(device=query.device, dtype=query.dtype)
        key = _expand_batch(self.to_k_id(tokens), batch, "id_tokens")  # (B, n, T, inner)
        value = _expand_batch(self.to_v_id(tokens), batch, "id_tokens")
        key = key.view(batch, n_ids, -1, heads, head_dim)  # (B, n, T, heads, d)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        key = key.permute(0, 3, 4, 2, 1).reshape(batch * heads, head_dim, -1)  # (B * heads, d, T * n)
        value = value.view(batch, n_ids, -1, heads, head_dim).permute(0, 3, 2, 1, 4)  # (B, heads, T, n, d)
        value = value.reshape(batch * heads, -1, head_dim)  # (B * heads, T * n, d)

        # Scores of all identities' tokens at once, SDPA's default softmax scale.  (B * heads, rows, T * n)
        scores = torch.baddbmm(plan.no_bias(query.dtype), q, key, beta=0.0, alpha=head_dim**-0.5)
        probs = scores.view(batch, heads, rows, -1, n_ids).softmax(dim=-2)  # each identity's own softmax
        probs = probs * plan.scaled_weight(query.dtype, scale)  # (B, 1, rows, 1, n): w_i x scale
        delta = torch.bmm(probs.view(batch * heads, rows, -1), value)  # (B * heads, rows, d): Σ_i w_i attn_i
        delta = delta.view(batch, heads, rows, head_dim).transpose(1, 2)  # (B, rows, heads, d), a view

        attended = attended.contiguous()  # (B, N, inner); a no-op for AttnProcessor2_0's fresh output
        if torch.is_grad_enabled() and (attended.requires_grad or delta.requires_grad):
            band = attended[:, start:stop] + delta.reshape(batch, rows, inner)
            return band if rows == length else attended.slice_scatter(band, dim=1, start=start, end=stop)
        # In place, the head merge fused into the add: one kernel writes the band.
        attended.view(batch, length, heads, head_dim)[:, start:stop].add_(delta.to(attended.dtype))
        return attended

    def _identity_kv(self, attn: Attention, batch: int, dtype: torch.dtype, device: torch.device):
        """Identity keys and values (B * n, heads, T, d), projected at every call (module docstring: no cache)."""
        tokens = self.context.tokens
        heads, n_ids = attn.heads, tokens.shape[1]
        tokens = tokens.to(device=device, dtype=dtype)
        key = _expand_batch(self.to_k_id(tokens), batch, "id_tokens")  # (B, n, T, inner)
        value = _expand_batch(self.to_v_id(tokens), batch, "id_tokens")
        key = key.reshape(batch * n_ids, -1, heads, self.hidden_size // heads).transpose(1, 2)
        value = value.reshape(batch * n_ids, -1, heads, self.hidden_size // heads).transpose(1, 2)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        return key, value


# ---------------------------------------------------------------------------------------------------------
# 3. Identity context
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Pairs:
    """Gather/scatter indices of one (grid, batch): which query positions attend to which identity."""

    positions: torch.Tensor  # (B * n, L) long: flat query row (into B * N) of each (sample, identity) slot
    pair_weight: torch.Tensor  # (B * n, L) float32: overlap-ruled mask weight; 0 on padding slots
    n_rows: int  # distinct query rows inside some mask (the gathered area)
    load: float  # the largest mask's cells per row of the dense band (`_Dense.load`)
    flat_positions: torch.Tensor | None = None  # positions.flatten(), made once
    scaled: dict = field(default_factory=dict)  # (dtype, scale) -> (B * n * L, 1) weight x scale, made once

    def scaled_weight(self, dtype: torch.dtype, scale: float) -> torch.Tensor:
        """`pair_weight` times `scale` as a (B * n * L, 1) column in `dtype`, cached: a denoising step's calls
        launch no kernel for it (the same cast-then-multiply as computing it every call, so the same values)."""
        key = (dtype, scale)
        if key not in self.scaled:
            self.scaled[key] = self.pair_weight.to(dtype).view(-1, 1) * scale
        return self.scaled[key]


@dataclass
class _Dense:
    """The dense masked plan of one (grid, batch): every identity at every query row of a band of rows."""

    rows: tuple[int, int]  # [start, stop): query positions from the first to the last inside some mask
    weight: torch.Tensor  # (B, 1, rows, 1, n) float32: overlap-ruled mask weights on the band
    load: float  # the largest mask's cells per row of the band: what `auto` compares with `dense_above`
    scaled: dict = field(default_factory=dict)  # (dtype, scale) -> weight x scale in dtype, made once
    empty: dict = field(default_factory=dict)  # dtype -> (1, 1, 1): baddbmm's unread input (beta=0)

    def scaled_weight(self, dtype: torch.dtype, scale: float) -> torch.Tensor:
        """`weight` times `scale` in `dtype`, cached as `_Pairs.scaled_weight`."""
        key = (dtype, scale)
        if key not in self.scaled:
            self.scaled[key] = self.weight.to(dtype) * scale
        return self.scaled[key]

    def no_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """A (1, 1, 1) tensor for `torch.baddbmm(..., beta=0)`, which never reads it (made once a dtype)."""
        if dtype not in self.empty:
            self.empty[dtype] = torch.zeros(1, 1, 1, dtype=dtype, device=self.weight.device)
        return self.empty[dtype]


MGMICA_PATHS = ("auto", "gather", "dense")
# `auto`: the dense path where the largest mask fills at least this fraction of the masked band (at a layer's grid).
# The CPU crossover of benchmarks/bench_attention.py (module docstring); the GPU crossover is unmeasured.
# `model.mgmica_dense_above` in params.yaml.
DENSE_ABOVE = 0.9


@dataclass
class MGMICAContext:
    """Identity state shared by the MGMICA processors of one UNet (or owned by a lone processor).

    tokens: (B, n, T, C) identity tokens; masks: (B, n, H, W) in [0, 1]; latent_size: the UNet input's (h, w),
    given to `set` or recorded by the UNet forward pre-hook that `install_mgmica` registers (`hook`).
    scale: identity scale for every processor while set (None: each processor's own `scale`).
    calls: processor calls that saw identities since they were set (a check that MGMICA ran at all).

    Setting the same token and mask tensors again (the same objects: treat them as immutable once set) keeps the
    per-layer plans (gather/scatter indices or dense bands, and the path chosen), so a denoising loop may set and
    clear its identities around every UNet call at no cost.
    """

    tokens: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    latent_size: tuple[int, int] | None = None
    fixed_latent_size: bool = False
    scale: float | None = None
    calls: int = 0
    path: str = "auto"  # gather | dense | auto (per grid, from the mask extents: `set_path`)
    dense_above: float = DENSE_ABOVE  # auto's threshold (`set_path`)
    hook: object | None = field(default=None, repr=False)  # the UNet pre-hook handle (`install_mgmica`)
    _cache: dict = field(default_factory=dict, repr=False)
    _cached_for: tuple | None = field(default=None, repr=False)  # (tokens, masks, latent_size) of `_cache`

    def set(
        self,
        tokens: torch.Tensor | None,
        masks: torch.Tensor | None,
        latent_size=None,
        scale: float | None = None,
    ) -> None:
        """Set identities (shapes as `set_identities`) or clear them (`None, None`)."""
        if (tokens is None) != (masks is None):
            raise ModelInputError(
                "MGMICA: give both id_tokens and id_masks, or neither (None clears identities)"
            )
        latent = None if latent_size is None else (int(latent_size[0]), int(latent_size[1]))
        self.scale = None if scale is None else float(scale)
        self.calls = 0
        if tokens is None:
            # Cleared, but the caches stay with the tensors they were built for (see `_cached_for`).
            self.tokens = self.masks = None
            self.fixed_latent_size = False
            return
        cached = self._cached_for
        if cached is not None and cached[0] is tokens and cached[1] is masks and cached[2] == latent:
            self.tokens, self.masks = tokens, cached[3]
            self.fixed_latent_size = latent is not None
            if latent is not None:
                self.latent_size = latent
            return
        original_masks = masks
        if tokens.ndim != 4:
            raise ModelInputError(
                f"MGMICA: id_tokens must be (B, n_ids, T, C), got shape {tuple(tokens.shape)}"
            )
        if masks.ndim != 4:
            raise ModelInputError(
                f"MGMICA: id_masks must be (B, n_ids, H, W), got shape {tuple(masks.shape)}"
            )
        if masks.shape[1] != tokens.shape[1]:
            raise ModelInputError(
                f"MGMICA: {tokens.shape[1]} identities in id_tokens but {masks.shape[1]} masks in id_masks; "
                "give one mask per identity"
            )
        if masks.is_floating_point():
            bad = ~torch.isfinite(masks) | (masks < 0) | (masks > 1)
            if bool(bad.any()):
                raise ModelInputError(
                    f"MGMICA: id_masks must be finite and in [0, 1]; got min {masks.min().item():g}, max "
                    f"{masks.max().item():g} (scale uint8 masks by 1/255)"
                )
        elif masks.dtype == torch.bool:
            masks = masks.float()
        else:
            raise ModelInputError(f"MGMICA: id_masks must be float in [0, 1] or bool, got {masks.dtype}")
        self.tokens, self.masks = tokens, masks
        self.fixed_latent_size = latent is not None
        if latent is not None:
            self.latent_size = latent
        self._cache.clear()
        self._cached_for = (tokens, original_masks, latent, masks)

    def set_path(self, path: str, dense_above: float | None = None) -> None:
        """Choose how the processors compute the ID attention: `gather` (gather -> attend -> scatter over the
        rows inside the masks), `dense` (every identity at every row of the masked band) or `auto` (per layer
        grid: dense where the largest mask fills at least `dense_above` of the band, else gather).

        Raises:
            ModelInputError: an unknown path or a threshold <= 0.
        """
        if path not in MGMICA_PATHS:
            raise ModelInputError(f"MGMICA: path {path!r} is not one of {', '.join(MGMICA_PATHS)}")
        if dense_above is not None and not dense_above > 0:
            raise ModelInputError(f"MGMICA: dense_above must be > 0, got {dense_above}")
        self.path = path
        if dense_above is not None:
            self.dense_above = float(dense_above)
        self._cache.clear()  # the plans depend on the path

    def holds(self, tokens: torch.Tensor, masks: torch.Tensor) -> bool:
        """Whether the caches were built for these very tensors (setting them again is then free)."""
        cached = self._cached_for
        return cached is not None and cached[0] is tokens and cached[1] is masks

    def record_latent_size(self, size: tuple[int, int]) -> None:
        if not self.fixed_latent_size and size != self.latent_size:
            self.latent_size = size

    def grid(self, length: int) -> tuple[int, int]:
        base = self.latent_size or tuple(self.masks.shape[-2:])
        return grid_for_length(length, base)

    def pairs(self, grid: tuple[int, int], batch: int, device: torch.device) -> _Pairs | _Dense | None:
        """The plan of one layer grid and hidden-states batch: gather/scatter indices (`_Pairs`) or the dense
        band (`_Dense`), cached until identities or path change; None when every mask is empty at this grid."""
        key = (grid, batch, device)
        if key not in self._cache:
            self._cache[key] = self._build_pairs(grid, batch, device)
        return self._cache[key]

    def _build_pairs(self, grid: tuple[int, int], batch: int, device: torch.device) -> _Pairs | _Dense | None:
        """Build one grid's plan. Reads sizes back to the host (mask extents), once per identities and grid:
        the path is chosen here, so a steady-state call makes no host synchronisation."""
        masks = _expand_batch(self.masks, batch, "id_masks").to(device)
        weights = overlap_weights(resize_masks(masks, grid)).flatten(2)  # (B, n, N) float32
        n_ids, n_tokens = weights.shape[1:]
        active = weights > 0  # (B, n, N)
        counts = active.sum(-1)  # (B, n)
        masked_rows = active.any(dim=1).any(dim=0).nonzero()  # query rows inside some mask, any sample
        if masked_rows.numel() == 0:
            return None
        start, stop = int(masked_rows[0]), int(masked_rows[-1]) + 1
        longest = int(counts.max())
        # Work of each path a sample: gather attends n * L slots (each identity padded to the largest mask L)
        # and moves them through a gather and a scatter; dense attends all n identities at each of the band's
        # rows (no gather, no scatter). So dense pays where L fills most of the band: load = L / band <= 1.
        load = longest / (stop - start)
        if self.path == "dense" or (self.path == "auto" and load >= self.dense_above):
            band = weights[:, :, start:stop].transpose(1, 2)  # (B, rows, n)
            return _Dense((start, stop), band.reshape(batch, 1, stop - start, 1, n_ids).contiguous(), load)
        # Each (b, i) row's active positions first (stable: in raster order), truncated to the longest row.
        order = torch.sort(active.to(torch.uint8), dim=-1, descending=True, stable=True).indices[
            ..., :longest
        ]
        valid = torch.arange(longest, device=device) < counts.unsqueeze(-1)  # (B, n, L)
        base = (torch.arange(batch, device=device) * n_tokens).view(batch, 1, 1)
        # Padding slots point at the row's first position with weight 0: they add exactly +0 there.
        positions = base + torch.where(valid, order, order[..., :1])
        pair_weight = torch.where(valid, weights.gather(-1, order), 0.0)
        n_rows = int(active.any(dim=1).sum())
        positions = positions.flatten(0, 1)
        return _Pairs(positions, pair_weight.flatten(0, 1), n_rows, load, positions.flatten())


# ---------------------------------------------------------------------------------------------------------
# 4. Grid helpers: token grids, area resize, the overlap rule
# ---------------------------------------------------------------------------------------------------------


def layer_grids(height: int, width: int) -> list[tuple[int, int]]:
    """The token grids of a UNet on an (height, width) latent: each level ceil-divides by 2, down to 1x1.

    Example: (9, 13) -> [(9, 13), (5, 7), (3, 4), (2, 2), (1, 1)].
    """
    grids = [(int(height), int(width))]
    while grids[-1] != (1, 1):
        h, w = grids[-1]
        grids.append((math.ceil(h / 2), math.ceil(w / 2)))
    return grids


def grid_for_length(length: int, base: tuple[int, int]) -> tuple[int, int]:
    """The grid of `layer_grids(*base)` holding `length` tokens.

    Raises:
        ModelInputError: no level of that chain has `length` tokens.
    """
    for h, w in layer_grids(*base):
        if h * w == length:
            return h, w
    raise ModelInputError(
        f"MGMICA: a layer has {length} query tokens, which is no level of the grid chain from {base[0]}x{base[1]} "
        f"({', '.join(f'{h}x{w}' for h, w in layer_grids(*base))}); call the UNet through its forward (which records "
        "the latent size) or pass latent_size= to set_identities"
    )


def resize_masks(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize masks (B, n, H, W) in [0, 1] to `grid` (h, w) by area: each cell gets the mask's mean over it.

    Works for shrinking and enlarging and for any (odd) sizes; a cell whose window holds no mask pixel stays 0.

    Returns:
        (B, n, h, w) float32.
    """
    masks = masks.float()
    if tuple(masks.shape[-2:]) == tuple(grid):
        return masks
    return F.adaptive_avg_pool2d(masks, grid)


def overlap_weights(masks: torch.Tensor) -> torch.Tensor:
    """Apply the overlap rule to masks (B, n, ...): where Σ_i M_i > 1, w_i = M_i / Σ_j M_j, else w_i = M_i."""
    total = masks.sum(dim=1, keepdim=True)
    return masks / total.clamp(min=1.0)


def _expand_batch(tensor: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """Broadcast a (b, ...) tensor to `batch`: b == batch as is, b == batch / 2 repeated (CFG halves), b == 1."""
    b = tensor.shape[0]
    if b == batch:
        return tensor
    if b == 1 or b * 2 == batch:
        return tensor.repeat(batch // b, *([1] * (tensor.ndim - 1)))
    raise ModelInputError(
        f"MGMICA: {what} have batch {b} but the hidden states have batch {batch}; give batch {batch}, "
        f"{batch // 2 if batch % 2 == 0 else batch} (classifier-free guidance halves) or 1"
    )


# ---------------------------------------------------------------------------------------------------------
# 5. Installation on a UNet
# ---------------------------------------------------------------------------------------------------------


def mgmica_processors(unet: nn.Module) -> dict[str, MGMICAAttnProcessor]:
    """The MGMICA processors of a UNet, keyed by their `attn_processors` name."""
    return {name: p for name, p in unet.attn_processors.items() if isinstance(p, MGMICAAttnProcessor)}


def _module_key(processor_name: str) -> str:
    """`down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor` -> `down_blocks-1-...-attn2`."""
    return processor_name.removesuffix(".processor").replace(".", "-")


def _cross_attention_processor_names(unet: nn.Module) -> list[str]:
    """The `attn_processors` names of the UNet's cross-attention (`attn2`) layers: where MGMICA goes."""
    names = []
    for name in unet.attn_processors:
        if (
            name.endswith("attn2.processor")
            and unet.get_submodule(name.removesuffix(".processor")).is_cross_attention
        ):
            names.append(name)
    return names


def install_mgmica(
    unet: nn.Module, scale: float = 1.0, path: str = "auto", dense_above: float = DENSE_ABOVE
) -> nn.ModuleDict:
    """Put new `MGMICAAttnProcessor`s on every cross-attention layer (`attn2`), stock `AttnProcessor2_0` elsewhere.

    The new `to_k_id` / `to_v_id` start as copies of the layer's text `to_k` / `to_v` (IP-Adapter's
    initialisation), in the UNet's dtype and device. All processors share one `MGMICAContext`; a forward
    pre-hook on the UNet records the latent (h, w) so every layer finds its mask grid. Installing again
    replaces the previous processors (and hook). To put existing (trained) processors back, use `attach_mgmica`.

    Args:
        unet: a diffusers `UNet2DConditionModel` (or any model with `attn_processors` / `set_attn_processor`).
        scale: identity-branch scale of every layer.
        path: `gather`, `dense` or `auto` (per layer grid from the mask extents; `MGMICAContext.set_path`).
        dense_above: `auto`'s threshold (`model.mgmica_dense_above`).

    Returns:
        The processors (the trainable ID projections) as an `nn.ModuleDict` keyed by layer name with `.` -> `-`.
    """
    names = _cross_attention_processor_names(unet)
    if not names:
        raise ModelInputError(
            "install_mgmica: the UNet has no cross-attention (attn2) layer to install MGMICA on"
        )
    context = MGMICAContext()
    context.set_path(path, dense_above)
    param = next(unet.parameters())
    installed: dict[str, MGMICAAttnProcessor] = {}
    for name in names:
        layer = unet.get_submodule(name.removesuffix(".processor"))
        proc = MGMICAAttnProcessor(layer.to_k.out_features, layer.to_k.in_features, scale=scale)
        with torch.no_grad():
            proc.to_k_id.weight.copy_(layer.to_k.weight)
            proc.to_v_id.weight.copy_(layer.to_v.weight)
        proc.to(device=param.device, dtype=param.dtype)
        proc.context = context
        installed[_module_key(name)] = proc
    processors = nn.ModuleDict(installed)
    attach_mgmica(unet, processors)
    return processors


def attach_mgmica(unet: nn.Module, processors: nn.ModuleDict) -> MGMICAContext:
    """Put existing MGMICA processors (`install_mgmica`'s, e.g. a trained adapter's) back on `unet`.

    Every cross-attention layer gets its processor from `processors` (keyed as `install_mgmica` returns them),
    every other layer the stock `AttnProcessor2_0`; the UNet pre-hook recording the latent size is (re)registered
    and a previous MGMICA hook removed. Use it after `unet.set_attn_processor(...)` replaced them (`check_mgmica` says so).

    Returns:
        The processors' shared `MGMICAContext`.

    Raises:
        MGMICAMissingError: the processors do not cover this UNet's cross-attention layers or share no context.
    """
    names = _cross_attention_processor_names(unet)
    keys = {_module_key(name): name for name in names}
    if set(keys) != set(processors.keys()):
        raise MGMICAMissingError(
            f"attach_mgmica: the processors are for layers {sorted(processors.keys())[:3]}..., the UNet's "
            f"cross-attention layers are {sorted(keys)[:3]}... ({len(processors)} vs {len(keys)}); attach them "
            "to the UNet they were built for"
        )
    contexts = {id(proc.context) for proc in processors.values()}
    if len(contexts) != 1:
        raise MGMICAMissingError(
            "attach_mgmica: the processors do not share one MGMICAContext (use install_mgmica)"
        )
    context = next(iter(processors.values())).context
    for previous in {id(p.context): p.context for p in mgmica_processors(unet).values()}.values():
        if previous.hook is not None:
            previous.hook.remove()
            previous.hook = None
    if context.hook is not None:
        context.hook.remove()
    table: dict[str, object] = {name: AttnProcessor2_0() for name in unet.attn_processors}
    for key, name in keys.items():
        table[name] = processors[key]
    unet.set_attn_processor(table)

    def record_latent_size(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if sample is not None:
            context.record_latent_size(tuple(sample.shape[-2:]))

    context.hook = unet.register_forward_pre_hook(record_latent_size, with_kwargs=True)
    return context


def mgmica_context(unet: nn.Module) -> MGMICAContext | None:
    """The identity context of the MGMICA processors on `unet` (None when no cross-attention layer runs one).

    Walks `unet.attn_processors` (a module traversal): call it once per run, not on every UNet call.
    """
    for proc in unet.attn_processors.values():
        if isinstance(proc, MGMICAAttnProcessor):
            return proc.context
    return None


def check_mgmica(unet: nn.Module, context: MGMICAContext | None = None) -> MGMICAContext:
    """Check that every cross-attention layer of `unet` runs an MGMICA processor (of `context`, if given).

    What MagicIDPipeline and DIIR call before using identities: after `unet.set_attn_processor(...)` put other
    processors on the cross-attention layers the identity branch is gone and identities would be ignored without a word.

    Returns:
        The processors' shared `MGMICAContext`.

    Raises:
        MGMICAMissingError: names how many layers run something else and how to put MGMICA back.
    """
    processors = unet.attn_processors
    names = _cross_attention_processor_names(unet)
    wrong = {
        name: type(processors[name]).__name__
        for name in names
        if not isinstance(processors[name], MGMICAAttnProcessor)
        or (context is not None and processors[name].context is not context)
    }
    if wrong or not names:
        found = sorted(set(wrong.values())) or ["no cross-attention layer"]
        raise MGMICAMissingError(
            f"{len(wrong)} of {len(names)} cross-attention layers of the UNet do not run this adapter's MGMICA "
            f"processor (found: {', '.join(found)}); the processors were replaced (e.g. by "
            "unet.set_attn_processor(AttnProcessor2_0())) and identities would be ignored. Put them "
            "back with adapter.attach(unet) (magicid.models.mgmica.attach_mgmica), or load the adapter again "
            "(MagicIDAdapter.load) on this backbone"
        )
    return processors[names[0]].context


def _context_of(unet: nn.Module) -> MGMICAContext:
    context = mgmica_context(unet)
    if context is None:
        raise MGMICAMissingError("MGMICA is not installed on this UNet: call install_mgmica(unet) first")
    return context


def set_identities(
    unet: nn.Module,
    id_tokens: torch.Tensor | None,
    id_masks: torch.Tensor | None,
    scale: float | None = None,
    latent_size: tuple[int, int] | None = None,
) -> None:
    """Set the identities every MGMICA layer of `unet` attends to (until changed or cleared).

    Args:
        id_tokens: (B, n_ids, T, C) identity tokens (C = cross_attention_dim), or None to clear.
        id_masks: (B, n_ids, H, W) float in [0, 1] (or bool) at any size (pixels, latents, other); each layer
            resizes them to its grid by area. Batch B may be the UNet batch, half of it (CFG) or 1.
        scale: if given, the identity scale of every layer while these identities are set (0 = base model,
            exactly); None keeps each processor's own `scale`.
        latent_size: the UNet input's (h, w); normally recorded by the UNet's forward pre-hook.

    Raises:
        ModelInputError: bad ranks, counts or mask values (the message gives the shapes).
    """
    _context_of(unet).set(id_tokens, id_masks, latent_size, scale=scale)


def clear_identities(unet: nn.Module) -> None:
    """Remove identities: every MGMICA layer then equals the stock processor exactly."""
    _context_of(unet).set(None, None)


@contextlib.contextmanager
def identities(
    unet: nn.Module, id_tokens: torch.Tensor | None, id_masks: torch.Tensor | None, scale: float | None = None
) -> Iterator[None]:
    """`with identities(unet, tokens, masks): unet(...)` — set for the block, cleared after (scale with them)."""
    set_identities(unet, id_tokens, id_masks, scale)
    try:
        yield
    finally:
        clear_identities(unet)
