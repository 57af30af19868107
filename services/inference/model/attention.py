"""Paged attention for a packed step: the PyTorch path (CPU, and the reference for the GPU
kernels) and the dispatch to those kernels.

Each layer's K/V cache is [num_blocks, block_size, kv_heads, head_dim]; a sequence's
context lives in the blocks of its block table. New tokens' K/V are written to their slots
first. PyTorch path: decode tokens (one new token per sequence) attend in one batched SDPA
over a padded gather of their contexts; prefill chunks attend one sequence at a time,
causally. GQA is handled by expanding K/V heads: SDPA's enable_gqa takes a path ~50x slower
on CPU. With the Triton kernels (the runner sets ctx.decode's block tables and ctx.prefill),
decodes go through the paged decode kernel, prefills from position 0 through one varlen
(FlashAttention) call, and chunks that continue a cached context (a prefix-cache hit, a later
chunk of a chunked prefill; ctx.continued) through one paged prefill kernel launch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from services.inference.kernels.triton_attention import paged_decode_attention, varlen_prefill_attention
from services.inference.kernels.triton_prefill_attention import (PrefillTiles, build_prefill_tiles,
                                                                 paged_prefill_attention, prefill_tile_tokens)
from services.inference.model.context import StepContext


@dataclass
class DecodeBatch:
    """Metadata for the decode tokens of a step, built once per step by the runner."""

    rows: torch.Tensor | None  # [Sd] int64 token rows (in the packed batch); None: every row, in order
    slots: torch.Tensor | None  # [Sd, C] int64, flat cache slot of each context position (0 = padding)
    mask: torch.Tensor | None  # [Sd, 1, 1, C] bool, True where a context position exists
    seq_indices: frozenset[int]  # which sequences of the step are decodes
    # With Triton kernels instead: the kernel walks the block tables itself.
    block_tables: torch.Tensor | None = None  # [Sd, max_blocks] int32, padded with block 0
    context_lens: torch.Tensor | None = None  # [Sd] int32


def build_decode_batch(ctx: StepContext, padded_tables: torch.Tensor | None = None) -> DecodeBatch | None:
    """Groups the sequences with exactly one new token; None when there are none.
    padded_tables: the step's block tables as one [S, max_blocks] device tensor (the runner
    uploads them so); given, the decode rows of it go to the Triton decode kernel instead of
    a padded slot gather."""
    decode = [i for i in range(ctx.num_seqs) if ctx.cu_seqlens[i + 1] - ctx.cu_seqlens[i] == 1]
    if not decode:
        return None
    device = ctx.slot_mapping.device
    rows = torch.tensor([ctx.cu_seqlens[i] for i in decode], dtype=torch.int64, device=device)
    if padded_tables is not None:
        tables = padded_tables[torch.tensor(decode, device=device)].to(torch.int32)
        lengths = torch.tensor([ctx.context_lens[i] for i in decode], dtype=torch.int32, device=device)
        return DecodeBatch(rows, None, None, frozenset(decode), tables, lengths)
    width = max(ctx.context_lens[i] for i in decode)
    slots = torch.zeros(len(decode), width, dtype=torch.int64)
    mask = torch.zeros(len(decode), width, dtype=torch.bool)
    for row, i in enumerate(decode):
        length, table = ctx.context_lens[i], ctx.block_tables[i].cpu()
        positions = torch.arange(length)
        slots[row, :length] = table[positions // ctx.block_size] * ctx.block_size + positions % ctx.block_size
        mask[row, :length] = True
    return DecodeBatch(rows, slots.to(device), mask[:, None, None, :].to(device), frozenset(decode))


@dataclass
class FreshPrefills:
    """Prefill chunks that start at position 0: their keys are exactly the chunk's own tokens,
    so all of them attend in one varlen (FlashAttention on a GPU) call instead of one SDPA over
    a block-table gather per sequence."""

    rows: torch.Tensor | None  # [Tp] int64 token rows in the packed batch; None: every row, in order
    cu_seqlens: torch.Tensor  # [Sp+1] int32, on the step's device
    max_seqlen: int
    seq_indices: frozenset[int]


def build_fresh_prefills(ctx: StepContext) -> FreshPrefills | None:
    """The sequences whose chunk has several tokens and starts at position 0; None when none."""
    bounds = ctx.cu_seqlens
    fresh = [i for i in range(ctx.num_seqs)
             if bounds[i + 1] - bounds[i] > 1 and ctx.context_lens[i] == bounds[i + 1] - bounds[i]]
    if not fresh:
        return None
    device = ctx.slot_mapping.device
    lengths = [bounds[i + 1] - bounds[i] for i in fresh]
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    rows = None
    if len(fresh) < ctx.num_seqs:
        rows = torch.tensor([r for i in fresh for r in range(bounds[i], bounds[i + 1])], dtype=torch.int64,
                            device=device)
    return FreshPrefills(rows, cu_seqlens, max(lengths), frozenset(fresh))


@dataclass
class ContinuedPrefills:
    """Prefill chunks of several tokens whose sequence already has K/V in the cache (a prefix-
    cache hit, or a later chunk of a chunked prefill), for one paged prefill kernel launch per
    layer instead of a block-table gather and an SDPA per sequence."""

    chunks: list[tuple[int, int, int, int]]  # (sequence, first packed row, new tokens, context after them)
    block_tables: torch.Tensor  # [S, max_blocks] the step's padded tables, on its device
    seq_indices: frozenset[int]
    _tiles: dict[int, PrefillTiles] = field(default_factory=dict)

    def tiles(self, tile_tokens: int) -> PrefillTiles:
        """The kernel's tile map, uploaded at the first layer and reused by the others."""
        if tile_tokens not in self._tiles:
            self._tiles[tile_tokens] = build_prefill_tiles(self.chunks, tile_tokens, self.block_tables.device)
        return self._tiles[tile_tokens]


def build_continued_prefills(ctx: StepContext, padded_tables: torch.Tensor) -> ContinuedPrefills | None:
    """The sequences whose chunk has several tokens and starts after cached context (the rest
    of build_decode_batch's and build_fresh_prefills'); None when none. Host lists only."""
    bounds = ctx.cu_seqlens
    chunks = [(i, bounds[i], bounds[i + 1] - bounds[i], ctx.context_lens[i]) for i in range(ctx.num_seqs)
              if bounds[i + 1] - bounds[i] > 1 and ctx.context_lens[i] > bounds[i + 1] - bounds[i]]
    if not chunks:
        return None
    return ContinuedPrefills(chunks, padded_tables, frozenset(i for i, *_ in chunks))


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [T, kv_heads, head_dim] stored at flat slots slot_mapping [T]. index_copy_ rather
    than an indexed assignment: a plain scatter that never consults the host, so it can sit in
    a CUDA graph (rows of a padded graphed batch all share one scratch slot; any may win it)."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def _expand_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., kv_heads, C, D] -> [..., heads, C, D] (each KV head serves heads/kv_heads queries)."""
    kv_heads = x.shape[-3]
    if kv_heads == num_heads:
        return x
    group = num_heads // kv_heads
    return x.unsqueeze(-3).expand(*x.shape[:-2], group, *x.shape[-2:]).flatten(-4, -3)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: StepContext,
                    scale: float, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, heads, head_dim] -> [T, heads, head_dim]; causal within each sequence.
    k, v: the step's new keys/values [T, kv_heads, head_dim], read by ctx.prefill (fresh prefills)."""
    out = torch.empty_like(q)
    num_heads = q.shape[1]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    flat_k, flat_v = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    decode = ctx.decode
    if decode is not None and decode.rows is None:  # decode-only step (CUDA graphs): no gathers
        return paged_decode_attention(q, k_cache, v_cache, decode.block_tables, decode.context_lens, scale, out)
    if decode is not None and decode.block_tables is not None:
        out[decode.rows] = paged_decode_attention(q[decode.rows], k_cache, v_cache, decode.block_tables,
                                                  decode.context_lens, scale)
    elif decode is not None:
        # Padding reads slot 0: another sequence's K/V, or a finished one's left in the cache.
        # The mask gives it weight 0, but 0 x Inf (or NaN) is NaN: an adapter whose values
        # overflow (finite weights can) poisoned every shorter row of the step, other
        # tenants' included, for as long as its values sat there. Zeroed, padding is inert.
        padding = ~decode.mask[:, 0, 0, :, None, None]  # [Sd, C, 1, 1]
        gathered_k = flat_k[decode.slots].masked_fill(padding, 0)  # [Sd, C, kv_heads, D]
        gathered_v = flat_v[decode.slots].masked_fill(padding, 0)
        keys = _expand_heads(gathered_k.transpose(1, 2), num_heads)  # [Sd, heads, C, D]
        values = _expand_heads(gathered_v.transpose(1, 2), num_heads)
        query = q[decode.rows][:, :, None, :]  # [Sd, heads, 1, D]
        attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=decode.mask, scale=scale)
        out[decode.rows] = attended[:, :, 0, :]
    skip = decode.seq_indices if decode is not None else frozenset()
    prefill = ctx.prefill
    if prefill is not None and k is not None and v is not None:
        rows = prefill.rows
        fresh_q, fresh_k, fresh_v = (q, k, v) if rows is None else (q[rows], k[rows], v[rows])
        attended = varlen_prefill_attention(fresh_q, fresh_k, fresh_v, prefill.cu_seqlens, prefill.max_seqlen, scale)
        if rows is None:
            return attended
        out[rows] = attended
        skip = skip | prefill.seq_indices
    continued = ctx.continued
    if continued is not None:  # their new K/V are in the cache already (write_kv runs first)
        tiles = continued.tiles(prefill_tile_tokens(num_heads, num_kv_heads, head_dim))
        paged_prefill_attention(q, k_cache, v_cache, continued.block_tables, tiles, scale, out)
        skip = skip | continued.seq_indices
    for i, context_len in enumerate(ctx.context_lens):
        if i in skip:
            continue
        start, end = ctx.cu_seqlens[i], ctx.cu_seqlens[i + 1]
        num_new = end - start
        blocks = ctx.block_tables[i]
        keys = k_cache[blocks].view(-1, num_kv_heads, head_dim)[:context_len].transpose(0, 1)  # [kv, C, D]
        values = v_cache[blocks].view(-1, num_kv_heads, head_dim)[:context_len].transpose(0, 1)
        query = q[start:end].transpose(0, 1)  # [heads, n, D]
        mask = None
        if num_new > 1:
            # Query i sits at position context_len - num_new + i and sees keys up to it.
            query_pos = torch.arange(context_len - num_new, context_len, device=q.device)
            mask = torch.arange(context_len, device=q.device)[None, :] <= query_pos[:, None]  # [n, C]
        attended = F.scaled_dot_product_attention(query, _expand_heads(keys, num_heads),
                                                  _expand_heads(values, num_heads), attn_mask=mask, scale=scale)
        out[start:end] = attended.transpose(0, 1)
    return out
