"""Paged attention, plain PyTorch: the CPU path and the reference for GPU kernels.

Each layer's K/V cache is [num_blocks, block_size, kv_heads, head_dim]; a sequence's
context lives in the blocks of its block table. New tokens' K/V are written to their slots
first, then every sequence attends over its whole context with SDPA (GQA-aware).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.inference.model.context import StepContext


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [T, kv_heads, head_dim] stored at flat slots slot_mapping [T]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = k
    v_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = v


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: StepContext,
                    scale: float) -> torch.Tensor:
    """q: [T, heads, head_dim] -> [T, heads, head_dim]; causal within each sequence."""
    out = torch.empty_like(q)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    for i, context_len in enumerate(ctx.context_lens):
        start, end = ctx.cu_seqlens[i], ctx.cu_seqlens[i + 1]
        num_new = end - start
        blocks = ctx.block_tables[i]
        keys = k_cache[blocks].view(-1, num_kv_heads, head_dim)[:context_len]  # [C, kv, D]
        values = v_cache[blocks].view(-1, num_kv_heads, head_dim)[:context_len]
        query = q[start:end].transpose(0, 1)  # [heads, n, D]
        mask = None
        if num_new > 1:
            # Query i sits at position context_len - num_new + i and sees keys up to it.
            query_pos = torch.arange(context_len - num_new, context_len, device=q.device)
            mask = torch.arange(context_len, device=q.device)[None, :] <= query_pos[:, None]  # [n, C]
        attended = F.scaled_dot_product_attention(
            query, keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask, scale=scale,
            enable_gqa=num_kv_heads != q.shape[1])  # [heads, n, D]
        out[start:end] = attended.transpose(0, 1)
    return out
