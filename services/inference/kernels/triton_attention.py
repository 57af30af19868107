"""GPU attention: a Triton paged-KV decode kernel (GQA, optional split-K) and a FlashAttention
varlen prefill wrapper.

The plain-PyTorch twin (CPU path and oracle) is model/attention.py:paged_attention. Cache
layout, as there: per layer k_cache/v_cache [num_blocks, block_size, kv_heads, head_dim]; a
sequence's token at position p lives at block block_tables[s, p // block_size], row
p % block_size.

Decode design (one new token per sequence, memory bound): one program per (sequence, KV
head) computes *all* query heads of that KV group, so every K/V row is read from HBM once per
group instead of once per query head. Context is walked in tiles of TILE_N token rows that
may span several KV blocks (rows are gathered through the block table token by token, so
any block_size works), with an online softmax in fp32. When there are too few (sequence, KV
head) programs to fill the GPU, the context is split into partitions ("flash-decoding"):
each partition writes a normalised partial output plus its log-sum-exp, and a second kernel
merges them. The partition count comes from shapes only (the block table width bounds the
context), so a call never syncs with the host and can be captured in a CUDA graph; each
sequence's partitions are sized in the kernel from its own context length, so a short
context is split as finely as a long one (sized from the table width instead, a 600-token
context in a graph sized for 8192 tokens fell into 3 of 32 partitions and walked its tiles
one after another).

Without triton the module still imports and triton_available() is False. Kernels are
jitted on first use, once per TRITON_INTERPRET setting, so tests can run them on CPU tensors
under the interpreter whatever was imported before.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F

from services.inference.kernels.backend import triton_available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch paths in model/attention.py serve
    triton = None
    tl = None

__all__ = ["choose_num_partitions", "paged_decode_attention", "prefill_attention_sdpa", "triton_available",
           "varlen_prefill_attention"]

LOG2E = 1.4426950408889634  # softmax runs in base 2 (exp2 is the native instruction)

# Split-K policy (host side, shapes only). On an H200 (132 SMs) ~256 resident programs keep
# every SM busy; below that a decode step is latency bound and splitting the context helps.
# A partition is at least two 64-token tiles (by default), so its loads still pipeline; its
# extra cost is one fp32 partial row per query head (2 KiB per KV group at head_dim 128) and
# a merge over <= 32 of them. The H200 measured batch 1 at 13 µs a layer with 256-token
# partitions for 0.5 µs of KV bytes (bench/gpu_notes.md, v3): latency of tiles walked in turn.
TARGET_PROGRAMS = 256
MIN_PARTITION_TOKENS = 128
MAX_PARTITIONS = 32


def _interpreting() -> bool:
    return bool(triton is not None and triton.knobs.runtime.interpret)


_jit_cache: dict[tuple[str, bool], object] = {}

# Integer arguments that change with the batch (the block-table width of an eager step, the
# partition count): unspecialized, or Triton would compile a variant each time one of them is
# first 1, a multiple of 16, or neither (triton_lora_kernels.py says the same). The partition
# size is always whole 64-token tiles, so it stays specialized.
STEP_VARYING_ARGS = {"_paged_decode_kernel": ("stride_table", "num_partitions"),
                     "_merge_partitions_kernel": ("num_partitions",)}


def _jitted(kernel, step_varying: dict[str, tuple[str, ...]] | None = None):
    """triton.jit(kernel), decided at first use: jit picks compiled vs interpreted when it
    wraps a function, so wrapping at import would freeze whatever TRITON_INTERPRET was then.
    step_varying: the kernel's module's STEP_VARYING_ARGS (default: this module's)."""
    key = (kernel.__name__, _interpreting())
    if key not in _jit_cache:
        varying = (step_varying or STEP_VARYING_ARGS)[kernel.__name__]
        _jit_cache[key] = triton.jit(kernel, do_not_specialize=varying)
    return _jit_cache[key]


# --------------------------------------------------------------------------------------------
# Decode kernels (plain functions here; see _jitted)


def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, partial_out_ptr, partial_lse_ptr,
    scale_log2,  # softmax scale * log2(e)
    stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_table,
    stride_os, stride_oh, stride_od,
    min_partition_tokens,  # whole tiles: a partition is at least this long
    num_partitions,  # runtime, so batch-shape changes do not recompile
    BLOCK_SIZE: tl.constexpr,  # tokens per KV-cache block
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_P: tl.constexpr,  # GROUP padded to a power of two >= 16 (tl.dot tile rows)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two
    TILE_N: tl.constexpr,  # context tokens per loop step
    SPLIT: tl.constexpr,  # False: write `out` directly; True: write partials to merge
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (tf32 would cost ~1e-3)
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    # This sequence's share of its own context, in whole tiles (unsplit: all of it).
    partition_tokens = tl.maximum(tl.cdiv(tl.cdiv(context_len, num_partitions), TILE_N) * TILE_N,
                                  min_partition_tokens)
    start = part * partition_tokens
    end = tl.minimum(context_len, start + partition_tokens)

    group = tl.arange(0, GROUP_P)
    heads = kv_head * GROUP + group
    head_ok = group < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0)  # [GROUP_P, BLOCK_D]

    m = tl.full([GROUP_P], float("-inf"), tl.float32)  # running max (base-2 logits)
    l = tl.zeros([GROUP_P], tl.float32)  # running sum of exp2(logit - m)
    acc = tl.zeros([GROUP_P, BLOCK_D], tl.float32)  # running sum of weights * V
    rows = tl.arange(0, TILE_N)
    table = block_tables_ptr + seq * stride_table
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh
    for tile_start in range(start, end, TILE_N):
        pos = tile_start + rows
        valid = pos < end
        # Masked on `valid`: block-table padding past the context is never read, nor are
        # stale rows at the end of the last block.
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row_offset = block * stride_kb + (pos % BLOCK_SIZE) * stride_kt  # int64: big caches
        kv_mask = valid[:, None] & dim_ok[None, :]
        k = tl.load(k_head + row_offset[:, None] + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [GROUP_P, TILE_N]
        logits = tl.where(valid[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        rescale = tl.exp2(m - m_new)  # 0 on the first tile (m = -inf)
        weights = tl.exp2(logits - m_new[:, None])
        l = l * rescale + tl.sum(weights, axis=1)
        v_offset = block * stride_vb + (pos % BLOCK_SIZE) * stride_vt
        v = tl.load(v_head + v_offset[:, None] + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    # An empty range (context_len 0: a padded CUDA-graph row, or a partition past the end)
    # yields zeros instead of 0/0.
    result = acc / tl.where(l > 0, l, 1.0)[:, None]
    store_mask = head_ok[:, None] & dim_ok[None, :]
    if not SPLIT:
        tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + dims[None, :] * stride_od,
                 result.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        num_heads = GROUP * tl.num_programs(1)
        partial_row = (seq * num_heads + heads) * num_partitions + part  # [S, heads, P] layout
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
        tl.store(partial_lse_ptr + partial_row, lse, mask=head_ok)
        tl.store(partial_out_ptr + partial_row[:, None] * HEAD_DIM + dims[None, :], result, mask=store_mask)


def _merge_partitions_kernel(
    partial_out_ptr, partial_lse_ptr, out_ptr,
    stride_os, stride_oh, stride_od,
    num_partitions,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PARTITIONS_P: tl.constexpr,  # num_partitions padded to a power of two
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    first_row = (seq * tl.num_programs(1) + head) * num_partitions
    parts = tl.arange(0, PARTITIONS_P)
    part_ok = parts < num_partitions
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    lse = tl.load(partial_lse_ptr + first_row + parts, mask=part_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)  # all partitions empty: weights 0, not NaN
    weights = tl.exp2(lse - top)  # empty partitions (lse = -inf) weigh 0
    partial = tl.load(partial_out_ptr + (first_row + parts)[:, None] * HEAD_DIM + dims[None, :],
                      mask=part_ok[:, None] & dim_ok[None, :], other=0.0)
    total = tl.sum(weights, axis=0)
    result = tl.sum(partial * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + dims * stride_od,
             result.to(out_ptr.dtype.element_ty), mask=dim_ok)


# --------------------------------------------------------------------------------------------
# Decode: host side


def choose_num_partitions(num_seqs: int, num_kv_heads: int, max_context: int) -> int:
    """Split-K partitions for a decode batch, from shapes only (no device values read).

    max_context is an upper bound on any context (block-table width * block_size). Split
    only when (sequence, KV head) programs cannot fill the GPU, and never into partitions
    shorter than MIN_PARTITION_TOKENS.
    """
    programs = max(num_seqs * num_kv_heads, 1)
    if programs >= TARGET_PROGRAMS:
        return 1
    wanted = math.ceil(TARGET_PROGRAMS / programs)
    return max(1, min(wanted, max_context // MIN_PARTITION_TOKENS, MAX_PARTITIONS))


def _tile_tokens(head_dim: int) -> int:
    # K and V tiles are TILE_N x head_dim each; 64 rows of 128 bf16 dims is 16 KiB per tile,
    # which leaves room for two pipeline stages in shared memory and enough loads in flight
    # per SM. Wider heads get shorter tiles to keep that footprint.
    return 64 if head_dim <= 128 else 32


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None, *, num_partitions: int | None = None,
                           tile_tokens: int | None = None, num_stages: int = 2) -> torch.Tensor:
    """Semantics: out[s, h] = softmax(q[s, h] · K[s, g(h)]ᵀ * scale) · V[s, g(h)],  g(h) = h // (heads / kv_heads),

    where K[s, g] = [k_cache[block_tables[s, p // B], p % B, g] for p in 0..context_lens[s]),
    likewise V, B = block_size. One query token per sequence (decode), whose K/V are already
    in the cache; no causal mask is needed since it is the last position.

    q: [S, heads, head_dim] (any strides), k_cache/v_cache: [num_blocks, B, kv_heads, head_dim],
    block_tables: [S, max_blocks] int32 (entries past a context are padding and never read),
    context_lens: [S] int32, including the new token, at most max_blocks * B (that bound
    sizes the partitions); a row with context_len 0 (CUDA-graph padding) gets zeros.
    The cache has q's dtype.
    fp32/bf16/fp16 inputs, fp32 accumulation; out: [S, heads, head_dim] in q's dtype
    (allocated when None, else written and returned). num_partitions: split-K partitions of
    the context (None: choose_num_partitions). Tuning knobs (bench.kernels sweeps them):
    tile_tokens, context tokens a loop step reads (a power of two >= 16; None: 64, or 32 for
    heads over 128 wide), num_stages, the loop's pipeline depth. Never syncs with the host.
    GPU tensors, or CPU tensors under TRITON_INTERPRET=1 (tests).
    """
    if triton is None:
        raise RuntimeError("paged_decode_attention needs triton; use model.attention.paged_attention")
    if not q.is_cuda and not _interpreting():
        raise ValueError("paged_decode_attention runs CUDA tensors (CPU tensors only under "
                         "TRITON_INTERPRET=1); the CPU path is model.attention.paged_attention")
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if v_cache.shape != k_cache.shape or cache_head_dim != head_dim:
        raise ValueError(f"cache shapes {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not fit q {tuple(q.shape)}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q is {q.dtype} but the cache is {k_cache.dtype}/{v_cache.dtype}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or context_lens.shape != (num_seqs,):
        raise ValueError("block_tables must be [S, max_blocks] and context_lens [S]")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape:
        raise ValueError(f"out is {tuple(out.shape)}, expected {tuple(q.shape)}")
    if num_seqs == 0:
        return out

    group = num_heads // num_kv_heads
    max_context = block_tables.shape[1] * block_size
    explicit = num_partitions is not None
    if num_partitions is None:
        num_partitions = choose_num_partitions(num_seqs, num_kv_heads, max_context)
    tile = _tile_tokens(head_dim) if tile_tokens is None else tile_tokens
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"tile_tokens must be a power of two >= 16, got {tile}")
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    # Partitions are whole tiles so a tile never straddles two of them; an explicit count is
    # honoured down to one tile each (tests split short contexts on purpose).
    min_partition_tokens = tile if explicit else max(tile, MIN_PARTITION_TOKENS // tile * tile)
    num_partitions = max(1, min(num_partitions, math.ceil(max_context / tile)))
    block_d = triton.next_power_of_2(head_dim)
    if num_partitions > 1:
        partial_out = torch.empty(num_seqs, num_heads, num_partitions, head_dim, dtype=torch.float32,
                                  device=q.device)
        partial_lse = torch.empty(num_seqs, num_heads, num_partitions, dtype=torch.float32, device=q.device)
    else:
        partial_out = partial_lse = out  # unused by the kernel when unsplit

    _jitted(_paged_decode_kernel)[(num_seqs, num_kv_heads, num_partitions)](
        q, k_cache, v_cache, block_tables, context_lens,
        out, partial_out, partial_lse,
        scale * LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0), *out.stride(),
        min_partition_tokens, num_partitions,
        BLOCK_SIZE=block_size, GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, TILE_N=tile, SPLIT=num_partitions > 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=num_stages,
    )
    if num_partitions > 1:
        _jitted(_merge_partitions_kernel)[(num_seqs, num_heads)](
            partial_out, partial_lse, out, *out.stride(), num_partitions,
            HEAD_DIM=head_dim, BLOCK_D=block_d,
            PARTITIONS_P=triton.next_power_of_2(num_partitions),
            num_warps=4,
        )
    return out


# --------------------------------------------------------------------------------------------
# Prefill


def _expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[T, kv_heads, D] -> [T, heads, D]; query head h reads KV head h // (heads / kv_heads)."""
    return x.repeat_interleave(num_heads // x.shape[1], dim=1) if x.shape[1] != num_heads else x


def prefill_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Semantics: as varlen_prefill_attention (causal, per sequence, GQA), computed with SDPA
    one sequence at a time: its CPU path and reference. Reads cu_seqlens on the host.

    K/V heads are expanded rather than using SDPA's enable_gqa, which is ~50x slower on CPU.
    """
    out = torch.empty_like(q)
    k, v = _expand_kv_heads(k, q.shape[1]), _expand_kv_heads(v, q.shape[1])
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            out[start:end] = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
                is_causal=True, scale=scale).transpose(0, 1)
    return out


@functools.lru_cache(maxsize=4)
def _parameter_names(function) -> frozenset[str]:
    return frozenset(inspect.signature(function).parameters)


def _flash_varlen_call(varlen_attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       cu_seqlens: torch.Tensor, max_seqlen: int, scale: float) -> torch.Tensor:
    """Calls varlen_attn causally whichever signature the installed torch has: causal is
    window_size=(-1, 0) where that keyword exists (torch 2.13 here) and is_causal=True in the
    first release; GQA is enable_gqa=True where that flag exists (2.13 refuses fewer KV heads
    without it) and expanded K/V heads where it does not, rather than relying on an older
    backend to accept fewer KV heads. The GPU machine's torch 2.11 takes one of these paths."""
    # q, k, v may be row-strided views of one fused q|k|v GEMM output; FlashAttention's varlen
    # entry wants packed rows, and a prefill's copy is small next to its attention.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    params = _parameter_names(varlen_attn)
    kwargs: dict = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if "scale" in params:
        kwargs["scale"] = scale
    else:  # the default is 1/sqrt(head_dim): fold the difference into q
        q = q * (scale * math.sqrt(q.shape[-1]))
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = _expand_kv_heads(k, q.shape[1]), _expand_kv_heads(v, q.shape[1])
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)


def varlen_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                             max_seqlen: int, scale: float) -> torch.Tensor:
    """Semantics: out[a:b] = softmax(mask(q[a:b] · k[a:b, g(h)]ᵀ * scale)) · v[a:b, g(h)]  per sequence,

    where [a, b) = [cu_seqlens[i], cu_seqlens[i+1]), mask keeps key j <= query i (causal,
    positions counted from the sequence's start), g(h) = h // (heads / kv_heads).

    q: [T, heads, D], k/v: [T, kv_heads, D] packed (no padding), cu_seqlens: [S+1] int32,
    max_seqlen: longest sequence (host int, so no sync). Returns [T, heads, D].
    Only for prefill chunks that start at position 0 (K/V are exactly the chunk's own
    tokens): chunks after cached context go through triton_prefill_attention (one paged
    launch for all of them) or model.attention.paged_attention's per-sequence loop.
    CUDA fp16/bf16: torch.nn.attention.varlen.varlen_attn (FlashAttention). Otherwise
    (CPU, fp32 — FlashAttention has no fp32, and varlen_attn raises on CPU): causal SDPA per
    sequence (prefill_attention_sdpa), which syncs to read cu_seqlens.
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention.varlen import varlen_attn
        return _flash_varlen_call(varlen_attn, q, k, v, cu_seqlens, max_seqlen, scale)
    return prefill_attention_sdpa(q, k, v, cu_seqlens, scale)
