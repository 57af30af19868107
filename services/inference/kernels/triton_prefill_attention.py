"""GPU attention for prefill chunks that continue a cached context: one Triton launch for all
of a step's chunks whose sequence already has K/V in the paged cache (a prefix-cache hit, or
a later chunk of a chunked prefill).

A fresh prefill (from position 0) attends to its own tokens only, and goes through varlen
FlashAttention (triton_attention.varlen_prefill_attention). A continued chunk also sees the
cached context, which only the block table locates, so this kernel reads keys and values
through the block table, as the decode kernel does. The plain-PyTorch twin (CPU path and
reference) is the per-sequence loop at the end of model/attention.py:paged_attention.

Design. The new tokens of all chunks are cut into query tiles of TILE_TOKENS tokens that
never straddle two sequences; a tile map built on the host from lengths the scheduler
already has (build_prefill_tiles: no device value is read) gives each tile its sequence's
block-table row, its first row in the packed batch, its token count and the context
position of its first token. One program per (tile, KV head) computes all query heads of
that KV group for the tile's tokens: its M = TILE_TOKENS x GROUP_P rows are (token, head)
pairs, so each K/V row is read once per group, not once per query head. Keys are walked in
tiles of TILE_N positions, gathered token by token through the block table (any block_size),
from 0 up to the tile's last query position, with a causal mask and an online softmax in
fp32 (base 2). Tiles are launched longest context first, so the long ones do not finish
last. The causal mask is applied on every key tile, not only the diagonal ones: one
compare and select per logit, cheap next to the two dots and the exp2 (splitting the loop
is a follow-up if a device run says it matters).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from services.inference.kernels import triton_attention
from services.inference.kernels.triton_attention import LOG2E

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path in model/attention.py serves
    triton = None
    tl = None

__all__ = ["PrefillTiles", "build_prefill_tiles", "paged_prefill_attention", "prefill_tile_tokens"]

# The block-table width changes with the batch: unspecialized, or Triton would compile a
# variant each time it is first 1, a multiple of 16, or neither. The tile count is the grid.
STEP_VARYING_ARGS = {"_paged_prefill_kernel": ("stride_table",)}

TILE_FIELDS = 4  # per tile: block-table row, first packed row, tokens, position of the first


def _jitted(kernel):
    return triton_attention._jitted(kernel, STEP_VARYING_ARGS)


def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, tiles_ptr, out_ptr,
    scale_log2,  # softmax scale * log2(e)
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_table,
    stride_ot, stride_oh, stride_od,
    BLOCK_SIZE: tl.constexpr,  # tokens per KV-cache block
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_P: tl.constexpr,  # GROUP padded to a power of two
    TILE_TOKENS: tl.constexpr,  # query tokens per tile (a power of two)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two >= 16
    TILE_N: tl.constexpr,  # key positions per loop step
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (tf32 would cost ~1e-3)
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    info = tiles_ptr + tile * 4
    seq = tl.load(info)  # the sequence's row in block_tables
    first_row = tl.load(info + 1)  # packed-batch row of the tile's first query
    num_tokens = tl.load(info + 2)  # queries in this tile, 1..TILE_TOKENS
    first_pos = tl.load(info + 3)  # context position of the first query
    kv_end = first_pos + num_tokens  # keys [0, kv_end): all any query of the tile may see

    rows = tl.arange(0, TILE_TOKENS * GROUP_P)  # (token, head in group) pairs
    token = rows // GROUP_P
    member = rows % GROUP_P
    row_ok = (token < num_tokens) & (member < GROUP)
    head = kv_head * GROUP + member
    # A padding row's position lies past kv_end - 1: it sees every real key, so its softmax
    # stays finite; it is never stored.
    query_pos = first_pos + token
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_row = (first_row + token).to(tl.int64)
    q = tl.load(q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [M, BLOCK_D]

    m = tl.full([TILE_TOKENS * GROUP_P], float("-inf"), tl.float32)  # running max (base-2 logits)
    l = tl.full([TILE_TOKENS * GROUP_P], 0.0, tl.float32)  # running sum of exp2(logit - m)
    acc = tl.full([TILE_TOKENS * GROUP_P, BLOCK_D], 0.0, tl.float32)  # running sum of weights * V
    cols = tl.arange(0, TILE_N)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh
    for tile_start in range(0, kv_end, TILE_N):
        pos = tile_start + cols
        key_ok = pos < kv_end
        # Masked on key_ok: block-table padding past the context is never read (it may name
        # any block, whose rows may hold Inf or NaN), nor are rows past the context in its
        # last block. Masked loads give 0, and masked logits -inf: weight exactly 0.
        block = tl.load(table + pos // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k_offset = block * stride_kb + (pos % BLOCK_SIZE) * stride_kt  # int64: big caches
        k = tl.load(k_head + k_offset[:, None] + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [M, TILE_N]
        visible = key_ok[None, :] & (pos[None, :] <= query_pos[:, None])  # causal
        logits = tl.where(visible, logits, float("-inf"))
        # Key 0 is visible to every row, so m is finite from the first tile on.
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        rescale = tl.exp2(m - m_new)  # 0 on the first tile (m = -inf)
        weights = tl.exp2(logits - m_new[:, None])
        l = l * rescale + tl.sum(weights, axis=1)
        v_offset = block * stride_vb + (pos % BLOCK_SIZE) * stride_vt
        v = tl.load(v_head + v_offset[:, None] + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    result = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + q_row[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :] * stride_od,
             result.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


# --------------------------------------------------------------------------------------------
# Host side


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _tile_shape(head_dim: int) -> tuple[int, int]:
    """(query rows M, key positions TILE_N) per program. The fp32 accumulator is M x head_dim:
    128 x 128 over 8 warps is 64 registers a thread, with the bf16 Q tile and the M x TILE_N
    logits beside it; K and V tiles of 64 x 128 bf16 are 16 KiB each, two pipeline stages of
    both fit in shared memory. Wider heads get half of each."""
    return (128, 64) if head_dim <= 128 else (64, 32)


def _num_warps(rows: int, block_d: int) -> int:
    return 8 if rows * block_d >= 128 * 128 else 4  # the accumulator's registers, spread


def prefill_tile_tokens(num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """Query tokens per tile of the kernel for these heads: its rows are (token, query head of
    the group) pairs, so a wider group means fewer tokens. Shapes only: the runner's tile map
    (built once per step) and the launch agree on it."""
    rows, _ = _tile_shape(head_dim)
    return max(1, rows // _next_power_of_2(num_heads // max(1, num_kv_heads)))


@dataclasses.dataclass(frozen=True)
class PrefillTiles:
    """The query tiles of one step's continued prefills, on the step's device."""

    map: torch.Tensor  # [num_tiles, 4] int32: block-table row, first packed row, tokens, first position
    tile_tokens: int  # tokens per tile (the last tile of a chunk may hold fewer)


def build_prefill_tiles(chunks: Iterable[tuple[int, int, int, int]], tile_tokens: int,
                        device: torch.device | str) -> PrefillTiles:
    """chunks: (block-table row, first packed row, new tokens, context length after them) per
    sequence, host ints. One upload; longest context first."""
    if tile_tokens < 1 or tile_tokens & (tile_tokens - 1):
        raise ValueError(f"tile_tokens must be a power of two, got {tile_tokens}")
    tiles = []
    for table_row, first_row, num_new, context_len in chunks:
        if not 0 < num_new <= context_len:
            raise ValueError(f"a chunk of {num_new} new tokens in a context of {context_len}")
        start_pos = context_len - num_new
        for offset in range(0, num_new, tile_tokens):
            tiles.append((table_row, first_row + offset, min(tile_tokens, num_new - offset), start_pos + offset))
    tiles.sort(key=lambda t: t[2] + t[3], reverse=True)  # the tile's last key: its work
    return PrefillTiles(torch.tensor(tiles, dtype=torch.int32).view(-1, TILE_FIELDS).to(device), tile_tokens)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, tiles: PrefillTiles, scale: float,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Semantics: for each chunk (b, r, n, c) of build_prefill_tiles and each of its queries j < n,
    out[r + j, h] = softmax(q[r + j, h] · K[b, g(h)][:p+1]ᵀ * scale) · V[b, g(h)][:p+1],

    p = c - n + j (the query's position), g(h) = h // (heads / kv_heads), where
    K[b, g] = [k_cache[block_tables[b, t // B], t % B, g] for t in 0..c), likewise V,
    B = block_size. The chunk's own K/V must already be in the cache (write_kv runs first).
    Rows of `out` that no tile covers are left as they were.

    q: [T, heads, head_dim] (any strides), k_cache/v_cache: [num_blocks, B, kv_heads,
    head_dim] in q's dtype, block_tables: [S, max_blocks] int32/int64 (entries past a
    context are padding and never read, nor are the cache rows past it), tiles: from
    build_prefill_tiles with tile_tokens = prefill_tile_tokens(...) for these heads (any
    power of two works; tests use small ones). fp32/bf16/fp16, fp32 accumulation; out:
    [T, heads, head_dim] in q's dtype (zeros when None), written and returned. Never syncs
    with the host. GPU tensors, or CPU tensors under TRITON_INTERPRET=1 (tests).
    """
    if triton is None:
        raise RuntimeError("paged_prefill_attention needs triton; use model.attention.paged_attention")
    if not q.is_cuda and not triton_attention._interpreting():
        raise ValueError("paged_prefill_attention runs CUDA tensors (CPU tensors only under "
                         "TRITON_INTERPRET=1); the CPU path is model.attention.paged_attention")
    num_heads, head_dim = q.shape[1], q.shape[2]
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if v_cache.shape != k_cache.shape or cache_head_dim != head_dim:
        raise ValueError(f"cache shapes {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not fit q {tuple(q.shape)}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q is {q.dtype} but the cache is {k_cache.dtype}/{v_cache.dtype}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if block_tables.dim() != 2 or tiles.map.dim() != 2 or tiles.map.shape[1] != TILE_FIELDS:
        raise ValueError("block_tables must be [S, max_blocks] and tiles.map [num_tiles, 4]")
    if out is None:
        out = torch.zeros_like(q)
    elif out.shape != q.shape:
        raise ValueError(f"out is {tuple(out.shape)}, expected {tuple(q.shape)}")
    num_tiles = tiles.map.shape[0]
    if num_tiles == 0:
        return out
    group = num_heads // num_kv_heads
    group_p = _next_power_of_2(group)
    rows = tiles.tile_tokens * group_p
    if rows < 16:
        raise ValueError(f"{tiles.tile_tokens} tokens x {group_p} heads is under the 16 rows tl.dot needs on a GPU")
    block_d = max(16, _next_power_of_2(head_dim))
    _jitted(_paged_prefill_kernel)[(num_tiles, num_kv_heads)](
        q, k_cache, v_cache, block_tables, tiles.map, out,
        scale * LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0), *out.stride(),
        BLOCK_SIZE=block_size, GROUP=group, GROUP_P=group_p, TILE_TOKENS=tiles.tile_tokens,
        HEAD_DIM=head_dim, BLOCK_D=block_d, TILE_N=_tile_shape(head_dim)[1],
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=_num_warps(rows, block_d), num_stages=2,
    )
    return out
