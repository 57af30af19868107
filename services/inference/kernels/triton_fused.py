"""Fused element-wise Triton kernels around the GEMMs: residual add + RMSNorm, SiLU-and-mul,
and rotary embedding + KV-cache write.

Why: the first H200 run (bench/gpu_notes.md, v2) put a graphed Llama-3-8B decode step at
7.7 ms at batch 1 and 12 ms at batch 64 against 3.5 and 4.7 ms of bytes; the model's PyTorch
element-wise code launches ~28 small kernels per layer (RMSNorm alone is 8: cast, pow, mean,
add, rsqrt, mul, cast, mul), about 900 a step, each a few microseconds even inside a CUDA
graph. These three kernels do the same work in 4 launches per layer.

Each follows the model's PyTorch code (its reference twin), rounding to the activation dtype
where that code materialises a tensor: the residual sum is bit for bit PyTorch's, the norm and
SiLU-and-mul within one bf16 unit (the sum of squares runs in another order). The rotation is
written with PyTorch's roundings too, but compiled for the GPU Triton folds the per-product
roundings into fused multiply-adds (seen on the H200): one rounding instead of three, closer
to the exact rotation, within a few units of the products' size of PyTorch's result.
Twins: layers.RMSNorm (with the residual add before it), F.silu(gate) * up, layers.apply_rotary
followed by attention.write_kv.

Kernels are jitted on first use (triton_attention._jitted), so the CPU tests run them under
TRITON_INTERPRET=1; without triton this module imports and the model keeps its PyTorch code.
"""

from __future__ import annotations

import torch

from services.inference.kernels.backend import triton_available
from services.inference.kernels.triton_attention import _jitted

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

__all__ = ["add_rms_norm", "rms_norm", "rotary_write_kv", "silu_mul", "triton_available"]

# Token counts change every step: left unspecialized so a new batch size never recompiles.
STEP_VARYING_ARGS = {"_add_rms_norm_kernel": (), "_silu_mul_kernel": (), "_rotary_kv_kernel": ()}
SILU_BLOCK = 1024


def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, width, eps,
                         stride_x, stride_r, stride_o, stride_ro,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # x + residual, rounded to the activation dtype as the PyTorch add is
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
             .to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    mean_square = tl.sum(x32 * x32, axis=0) / width
    normed = (x32 * (1.0 / tl.sqrt(mean_square + eps))).to(x.dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (weight.to(tl.float32) * normed.to(tl.float32)).to(x.dtype),
             mask=mask)


def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, width, stride_g, stride_u, stride_o,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0)
    up = tl.load(up_ptr + row * stride_u + cols, mask=mask, other=0.0)
    g32 = gate.to(tl.float32)
    silu = (g32 / (1.0 + tl.exp(-g32))).to(gate.dtype)  # F.silu rounds to the dtype, then the mul does
    tl.store(out_ptr + row * stride_o + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def _rotary_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slots_ptr, k_cache_ptr, v_cache_ptr,
                      q_heads, kv_heads, stride_q, stride_k, stride_v, stride_cos,
                      Q_HEADS_P: tl.constexpr, KV_HEADS_P: tl.constexpr, HALF: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, HALF)
    cos1 = tl.load(cos_ptr + row * stride_cos + offs_d).to(tl.float32)
    cos2 = tl.load(cos_ptr + row * stride_cos + HALF + offs_d).to(tl.float32)
    sin1 = tl.load(sin_ptr + row * stride_cos + offs_d).to(tl.float32)
    sin2 = tl.load(sin_ptr + row * stride_cos + HALF + offs_d).to(tl.float32)

    # q: rotated in place. Written out for q and k rather than shared through a helper: an
    # interpreted call of a @jit helper leaves triton.language patched (triton_lora_kernels.py).
    offs_q = tl.arange(0, Q_HEADS_P)
    q_mask = offs_q[:, None] < q_heads
    q_ptrs = q_ptr + row * stride_q + offs_q[:, None] * (2 * HALF) + offs_d[None, :]
    x1 = tl.load(q_ptrs, mask=q_mask, other=0.0)
    x2 = tl.load(q_ptrs + HALF, mask=q_mask, other=0.0)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    q1 = (f1 * cos1[None, :]).to(x1.dtype).to(tl.float32) + (-f2 * sin1[None, :]).to(x1.dtype).to(tl.float32)
    q2 = (f2 * cos2[None, :]).to(x1.dtype).to(tl.float32) + (f1 * sin2[None, :]).to(x1.dtype).to(tl.float32)
    tl.store(q_ptrs, q1.to(x1.dtype), mask=q_mask)
    tl.store(q_ptrs + HALF, q2.to(x1.dtype), mask=q_mask)

    # k: rotated in place and into the cache; v: into the cache.
    offs_k = tl.arange(0, KV_HEADS_P)
    k_mask = offs_k[:, None] < kv_heads
    k_ptrs = k_ptr + row * stride_k + offs_k[:, None] * (2 * HALF) + offs_d[None, :]
    y1 = tl.load(k_ptrs, mask=k_mask, other=0.0)
    y2 = tl.load(k_ptrs + HALF, mask=k_mask, other=0.0)
    g1, g2 = y1.to(tl.float32), y2.to(tl.float32)
    k1 = ((g1 * cos1[None, :]).to(y1.dtype).to(tl.float32) + (-g2 * sin1[None, :]).to(y1.dtype).to(tl.float32)) \
        .to(y1.dtype)
    k2 = ((g2 * cos2[None, :]).to(y1.dtype).to(tl.float32) + (g1 * sin2[None, :]).to(y1.dtype).to(tl.float32)) \
        .to(y1.dtype)
    tl.store(k_ptrs, k1, mask=k_mask)
    tl.store(k_ptrs + HALF, k2, mask=k_mask)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    cache = slot * kv_heads * (2 * HALF) + offs_k[:, None] * (2 * HALF) + offs_d[None, :]
    tl.store(k_cache_ptr + cache, k1, mask=k_mask)
    tl.store(k_cache_ptr + cache + HALF, k2, mask=k_mask)
    v_ptrs = v_ptr + row * stride_v + offs_k[:, None] * (2 * HALF) + offs_d[None, :]
    tl.store(v_cache_ptr + cache, tl.load(v_ptrs, mask=k_mask, other=0.0), mask=k_mask)
    tl.store(v_cache_ptr + cache + HALF, tl.load(v_ptrs + HALF, mask=k_mask, other=0.0), mask=k_mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A 2-D view [rows, width] whose last dim is contiguous (the kernels index rows by stride)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: s = x + residual (x when residual is None), in x's dtype;
    returns (RMSNorm(s) with `weight` as layers.RMSNorm computes it, s).

    x, residual: [..., width], weight: [width], all one dtype. New tensors; inputs untouched.
    """
    shape, rows = x.shape, _rows(x)
    if weight.dtype != x.dtype or (residual is not None and residual.dtype != x.dtype):
        raise ValueError(f"x {x.dtype}, residual {None if residual is None else residual.dtype} and weight "
                         f"{weight.dtype} must share one dtype")
    out = torch.empty_like(rows)
    summed = torch.empty_like(rows) if residual is not None else rows
    residual_rows = _rows(residual) if residual is not None else rows
    if rows.shape[0]:
        _jitted(_add_rms_norm_kernel, STEP_VARYING_ARGS)[(rows.shape[0],)](
            rows, residual_rows, weight, out, summed, rows.shape[1], eps,
            rows.stride(0), residual_rows.stride(0), out.stride(0), summed.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(rows.shape[1]),
            num_warps=8 if rows.shape[1] >= 2048 else 4)
    return out.view(shape), summed.view(shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Semantics: layers.RMSNorm(x) with `weight` (add_rms_norm without a residual)."""
    return add_rms_norm(x, None, weight, eps)[0]


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Semantics: F.silu(gate) * up, rounded as PyTorch rounds it. gate, up: [T, width], one dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must agree")
    gate_rows, up_rows = _rows(gate), _rows(up)
    out = torch.empty_like(gate_rows)
    num_rows, width = gate_rows.shape
    if num_rows:
        _jitted(_silu_mul_kernel, STEP_VARYING_ARGS)[(num_rows, triton.cdiv(width, SILU_BLOCK))](
            gate_rows, up_rows, out, width, gate_rows.stride(0), up_rows.stride(0), out.stride(0),
            BLOCK=SILU_BLOCK, num_warps=4)
    return out.view(gate.shape)


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Semantics: q[:] = apply_rotary(q, cos, sin); k[:] = apply_rotary(k, cos, sin);
    then write_kv(k_cache, v_cache, k, v, slot_mapping).

    q: [T, heads, D], k, v: [T, kv_heads, D], each with contiguous heads and dims (rows may be
    strided); cos, sin: [T, D] in q's dtype; caches [blocks, block_size, kv_heads, D]; D even, a
    power of two. Rows that share a slot (a graph's padding) leave any one of them there.
    """
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1 or t.stride(1) != dim:
            raise ValueError(f"{name} {tuple(t.shape)} strides {t.stride()}: heads and dims must be contiguous")
    if dim % 2 or dim & (dim - 1) or cos.shape != (tokens, dim) or cos.stride() != sin.stride():
        raise ValueError(f"head_dim {dim} (even, a power of two), cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if not tokens:
        return
    _jitted(_rotary_kv_kernel, STEP_VARYING_ARGS)[(tokens,)](
        q, k, v, cos, sin, slot_mapping, k_cache, v_cache, heads, kv_heads,
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0),
        Q_HEADS_P=triton.next_power_of_2(heads), KV_HEADS_P=triton.next_power_of_2(kv_heads), HALF=dim // 2,
        num_warps=4)
