"""The Triton programs behind kernels/triton_lora.py (import that module, not this one).

This module imports triton at the top and decorates its kernels on import, which is when
triton decides between compiling and interpreting (TRITON_INTERPRET=1 at decoration time
gives interpreted kernels). triton_lora.py imports it only when a kernel is launched, so
machines without triton can still import the plan builder.

Both programs work on *tiles*: up to BLOCK_M token rows that share one adapter, so the
adapter's A and B pages are read once per tile rather than once per token. Every tile dim
that meets tl.dot is >= 16 because the tensor-core path on the GPU needs 16 in M, N and K;
padding rows and rank columns are masked, so they cost no memory traffic, only idle MMA
lanes, and this work is bound by memory, not by MMA throughput.

Only builtins of triton.language are used (tl.full, not the @jit helper tl.zeros). That
is for the CPU tests under triton 3.6's interpreter: such a kernel runs even when triton
was imported without TRITON_INTERPRET, and it does not trip the interpreter's leak (an
interpreted call of a @jit helper leaves triton.language.core patched for the process).
"""

from __future__ import annotations

import triton
import triton.language as tl


# Triton compiles one variant per integer argument that is 1, a multiple of 16, or neither.
# The tile count and the split count change from step to step, so they are left
# unspecialized: otherwise the first eager step with, say, 16 tiles would stall serving for a
# compile. Shapes and strides stay specialized (fixed per model), and so does k_per_split:
# always a multiple of BLOCK_K, and its divisibility is what lets the K-slice loads vectorize.
STEP_VARYING_ARGS = {"lora_shrink_kernel": ("num_tiles",),
                     "lora_expand_kernel": ("num_tiles", "split_k")}


@triton.jit(do_not_specialize=STEP_VARYING_ARGS["lora_shrink_kernel"])
def lora_shrink_kernel(
    x_ptr, a_ptr, partial_ptr,
    tile_rows_ptr, tile_sizes_ptr, tile_pages_ptr,
    num_tiles, in_features, k_per_split,
    stride_xm, stride_xk, stride_ap, stride_ak,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """partial[split, tile] = x[rows of tile, K slice] @ A[pages of tile, K slice].T  (fp32).

    Grid (num_tiles, split_k). Each split owns one K slice and writes its own partial sum,
    so the splits need neither atomics nor a zeroed buffer; the expand sums them.
    """
    tile = tl.program_id(0)
    split = tl.program_id(1)
    size = tl.load(tile_sizes_ptr + tile)
    if size == 0:  # a padding tile of a fixed-capacity plan
        return

    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = offs_m < size
    rows = tl.load(tile_rows_ptr + tile * BLOCK_M + offs_m, mask=row_mask, other=0).to(tl.int64)
    pages = tl.load(tile_pages_ptr + tile * BLOCK_R + offs_r)
    page_mask = pages >= 0  # ranks below BLOCK_R are padded with -1
    pages = tl.where(page_mask, pages, 0).to(tl.int64)  # int64: pages * stride can pass 2**31

    k_begin = split * k_per_split
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    # The same trip count for every split (k_per_split is a multiple of BLOCK_K); the last
    # slice masks what lies past `in`.
    for k0 in range(0, k_per_split, BLOCK_K):
        k = k_begin + k0 + offs_k
        k_mask = k < in_features
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        a = tl.load(a_ptr + pages[:, None] * stride_ap + k[None, :] * stride_ak,
                    mask=page_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(a), acc, input_precision=DOT_PRECISION)

    out = partial_ptr + ((split * num_tiles + tile) * BLOCK_M + offs_m[:, None]) * BLOCK_R + offs_r[None, :]
    tl.store(out, acc, mask=row_mask[:, None] & page_mask[None, :])


@triton.jit(do_not_specialize=STEP_VARYING_ARGS["lora_expand_kernel"])
def lora_expand_kernel(
    y_ptr, b_ptr, partial_ptr,
    tile_rows_ptr, tile_sizes_ptr, tile_pages_ptr, tile_scales_ptr,
    num_tiles, out_features, split_k,
    stride_ym, stride_yn, stride_bp, stride_bn,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """y[rows of tile, N block] += scale * (Σ_split partial[split, tile]) @ B[pages of tile, N block].

    Grid (num_tiles, cdiv(out_features, BLOCK_N)). Token rows are distinct across tiles
    (the plan builder checks), so the read-add-write of y needs no atomics.
    """
    tile = tl.program_id(0)
    n_block = tl.program_id(1)
    size = tl.load(tile_sizes_ptr + tile)
    if size == 0:
        return

    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_m < size
    rows = tl.load(tile_rows_ptr + tile * BLOCK_M + offs_m, mask=row_mask, other=0).to(tl.int64)
    pages = tl.load(tile_pages_ptr + tile * BLOCK_R + offs_r)
    page_mask = pages >= 0
    pages = tl.where(page_mask, pages, 0).to(tl.int64)
    scale = tl.load(tile_scales_ptr + tile)

    # Masked by rows and rank: a one-token decode tile reads 1 of its 16 partial rows.
    s_mask = row_mask[:, None] & page_mask[None, :]
    s = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    # split_k is a runtime bound, not a constexpr: it changes with the tile count, and a fresh
    # GPU machine would otherwise compile one expand per value while capturing CUDA graphs.
    for split in range(0, split_k):
        s += tl.load(partial_ptr + ((split * num_tiles + tile) * BLOCK_M + offs_m[:, None]) * BLOCK_R
                     + offs_r[None, :], mask=s_mask, other=0.0)

    n_mask = offs_n < out_features
    b = tl.load(b_ptr + pages[:, None] * stride_bp + offs_n[None, :] * stride_bn,
                mask=page_mask[:, None] & n_mask[None, :], other=0.0)
    # s is rounded to B's dtype for the tensor cores (as PEFT's bf16 lora_A output is);
    # the scale is applied to the fp32 product, and y is rounded once, on the store.
    delta = tl.dot(s.to(b.dtype), b, input_precision=DOT_PRECISION) * scale

    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_mask = row_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=y_mask)
