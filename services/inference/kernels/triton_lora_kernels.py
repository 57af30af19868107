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

Latency, not bytes, bounds a decode program: it moves a few KB behind a chain of dependent
loads. So the expand loads its tile's size, rows and pages together, then issues its B, y and
partial-sum loads before waiting on any: two round trips before the math, where its loads in
turn took four to six (the shrink's K loop is long enough that its one extra does not matter).

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

# Slices: one launch can serve up to three projections that read the same x (q|k|v, gate|up),
# each with its own pages, plan and columns of y; slice i's arguments end in i. A call with
# fewer slices repeats slice 0's pointers and gives the others no out-blocks. The slice's
# pointers are picked with scalar branches (selects, not loads), once per program.
MAX_SLICES = 3


@triton.jit(do_not_specialize=STEP_VARYING_ARGS["lora_shrink_kernel"])
def lora_shrink_kernel(
    x_ptr, partial_ptr,
    a0_ptr, a1_ptr, a2_ptr,
    tile_rows0_ptr, tile_rows1_ptr, tile_rows2_ptr,
    tile_sizes0_ptr, tile_sizes1_ptr, tile_sizes2_ptr,
    tile_pages0_ptr, tile_pages1_ptr, tile_pages2_ptr,
    num_tiles, in_features, k_per_split,
    stride_xm, stride_xk, stride_ap, stride_ak,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """partial[slice, split, tile] = x[rows of tile, K slice] @ A_slice[pages of tile, K slice].T  (fp32).

    Grid (num_tiles, split_k, slices). Each split owns one K slice and writes its own partial
    sum, so the splits need neither atomics nor a zeroed buffer; the expand sums them.
    """
    tile = tl.program_id(0)
    split = tl.program_id(1)
    part = tl.program_id(2)
    a_ptr = a0_ptr
    tile_rows_ptr = tile_rows0_ptr
    tile_sizes_ptr = tile_sizes0_ptr
    tile_pages_ptr = tile_pages0_ptr
    if part == 1:
        a_ptr = a1_ptr
        tile_rows_ptr = tile_rows1_ptr
        tile_sizes_ptr = tile_sizes1_ptr
        tile_pages_ptr = tile_pages1_ptr
    if part == 2:
        a_ptr = a2_ptr
        tile_rows_ptr = tile_rows2_ptr
        tile_sizes_ptr = tile_sizes2_ptr
        tile_pages_ptr = tile_pages2_ptr
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

    first = (part * tl.num_programs(1) + split) * num_tiles + tile
    out = partial_ptr + (first * BLOCK_M + offs_m[:, None]) * BLOCK_R + offs_r[None, :]
    tl.store(out, acc, mask=row_mask[:, None] & page_mask[None, :])


@triton.jit(do_not_specialize=STEP_VARYING_ARGS["lora_expand_kernel"])
def lora_expand_kernel(
    y_ptr, partial_ptr,
    b0_ptr, b1_ptr, b2_ptr,
    tile_rows0_ptr, tile_rows1_ptr, tile_rows2_ptr,
    tile_sizes0_ptr, tile_sizes1_ptr, tile_sizes2_ptr,
    tile_pages0_ptr, tile_pages1_ptr, tile_pages2_ptr,
    tile_scales0_ptr, tile_scales1_ptr, tile_scales2_ptr,
    num_tiles, split_k,
    out0, out1, out2,  # out features of each slice (0: no such slice)
    column1, column2,  # where slices 1 and 2 start among y's columns (slice 0 at 0)
    stride_ym, stride_yn, stride_bp0, stride_bp1, stride_bp2, stride_bn,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS_PER_LOAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """y[rows of tile, slice's N block] += scale * (Σ_split partial[slice, split, tile]) @ B_slice[pages, N block].

    Grid (num_tiles, Σ_slice cdiv(out_slice, BLOCK_N)): a program's out-block says its slice.
    Token rows are distinct across a slice's tiles (the plan builder checks), so the
    read-add-write of y needs no atomics. The split-K partial sums are loaded SPLITS_PER_LOAD
    at a time, unrolled, so they are in flight together (see the module docstring).
    """
    tile = tl.program_id(0)
    n_block = tl.program_id(1)
    blocks0 = tl.cdiv(out0, BLOCK_N)
    blocks01 = blocks0 + tl.cdiv(out1, BLOCK_N)
    # Scalars by arithmetic and tl.where (a branch may not re-type an argument Triton
    # specialized to a constant); pointers by branches (always pointers, never constants).
    part = (n_block >= blocks0).to(tl.int32) + (n_block >= blocks01).to(tl.int32)
    is1, is2 = part == 1, part == 2
    column = tl.where(is2, column2, tl.where(is1, column1, 0))
    out_features = tl.where(is2, out2, tl.where(is1, out1, out0))
    stride_bp = tl.where(is2, stride_bp2, tl.where(is1, stride_bp1, stride_bp0))
    n_block = n_block - tl.where(is2, blocks01, tl.where(is1, blocks0, 0))
    b_ptr = b0_ptr
    tile_rows_ptr = tile_rows0_ptr
    tile_sizes_ptr = tile_sizes0_ptr
    tile_pages_ptr = tile_pages0_ptr
    tile_scales_ptr = tile_scales0_ptr
    if part == 1:
        b_ptr = b1_ptr
        tile_rows_ptr = tile_rows1_ptr
        tile_sizes_ptr = tile_sizes1_ptr
        tile_pages_ptr = tile_pages1_ptr
        tile_scales_ptr = tile_scales1_ptr
    if part == 2:
        b_ptr = b2_ptr
        tile_rows_ptr = tile_rows2_ptr
        tile_sizes_ptr = tile_sizes2_ptr
        tile_pages_ptr = tile_pages2_ptr
        tile_scales_ptr = tile_scales2_ptr
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    size = tl.load(tile_sizes_ptr + tile)
    rows = tl.load(tile_rows_ptr + tile * BLOCK_M + offs_m)
    pages = tl.load(tile_pages_ptr + tile * BLOCK_R + offs_r)
    scale = tl.load(tile_scales_ptr + tile)
    # No early return for a padding tile (size 0): every load and store below is masked off for
    # it, and a branch here would let the compiler sink the rows and pages loads past it, into
    # a round trip of their own.
    row_mask = offs_m < size
    rows = tl.where(row_mask, rows, 0).to(tl.int64)
    page_mask = pages >= 0
    pages = tl.where(page_mask, pages, 0).to(tl.int64)

    # Masked by rows and rank: a one-token decode tile reads 1 of its 16 partial rows.
    s_mask = row_mask[:, None] & page_mask[None, :]
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_features
    # B and y first: they wait on nothing the partial sums do, so all three are in flight at once.
    b = tl.load(b_ptr + pages[:, None] * stride_bp + offs_n[None, :] * stride_bn,
                mask=page_mask[:, None] & n_mask[None, :], other=0.0)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + (column + offs_n[None, :]) * stride_yn
    y_mask = row_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0)
    s = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    # split_k is a runtime bound, not a constexpr: it changes with the tile count, and a fresh
    # GPU machine would otherwise compile one expand per value while capturing CUDA graphs.
    for split0 in range(0, split_k, SPLITS_PER_LOAD):
        # Unrolled: the loads do not wait for each other, so they are all in flight at once.
        for i in tl.static_range(SPLITS_PER_LOAD):
            first = (part * split_k + split0 + i) * num_tiles + tile
            s += tl.load(partial_ptr + (first * BLOCK_M + offs_m[:, None]) * BLOCK_R + offs_r[None, :],
                         mask=s_mask & (split0 + i < split_k), other=0.0)
    # s is rounded to B's dtype for the tensor cores (as PEFT's bf16 lora_A output is); the
    # scale is applied to the fp32 product, and y is rounded once, on the store.
    delta = tl.dot(s.to(b.dtype), b, input_precision=DOT_PRECISION) * scale
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=y_mask)
