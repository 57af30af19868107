"""The fused element-wise Triton kernels (kernels/triton_fused.py) against their PyTorch twins,
the model's own code: residual add + RMSNorm, SiLU-and-mul, rotary + KV-cache write. On CPU
under TRITON_INTERPRET=1 (tests/conftest.py), compiled on a GPU (the `triton_device` fixture);
then the whole model with the fused ops against itself without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.common.tiny_model import build_model_folder
from services.inference.kernels.triton_fused import add_rms_norm, rms_norm, rotary_write_kv, silu_mul
from services.inference.model.layers import RMSNorm, apply_rotary
from services.inference.model.loader import load_model
from tests.inference.test_model import allocate_cache, run_step


def close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32: to rounding; 16-bit: within one unit in the last place (the norm's sum of squares
    runs in another order than PyTorch's mean, which can tip a rounding)."""
    if expected.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    else:
        ulp = torch.finfo(expected.dtype).eps * expected.float().abs().clamp_min(1e-2)
        assert ((got.float() - expected.float()).abs() <= ulp).all()


def reference_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = RMSNorm(x.shape[-1], eps).to(x.device, x.dtype)
    norm.weight.data.copy_(weight)
    return norm(x)


DTYPES = [torch.float32, torch.bfloat16]


def skip_bf16_interpreted(device: str, dtype: torch.dtype) -> None:
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("triton 3.6's interpreter rounds float32 -> bfloat16 toward zero (the GPU rounds to "
                    "nearest even, as PyTorch does): bf16 rounding is checked compiled, on the GPU")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [64, 96, 1000])  # a power of two, and widths the block masks
def test_add_rms_norm_is_the_residual_add_then_the_model_norm(triton_device, dtype, width):
    skip_bf16_interpreted(triton_device, dtype)
    generator = torch.Generator().manual_seed(width)
    x, residual = (torch.randn(7, width, generator=generator).to(triton_device, dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(width, generator=generator)).to(triton_device, dtype)
    before = x.clone(), residual.clone()
    normed, summed = add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(summed, x + residual)  # the add rounds exactly as PyTorch's does
    close(normed, reference_norm(x + residual, weight, 1e-5))
    assert torch.equal(x, before[0]) and torch.equal(residual, before[1])  # inputs untouched
    close(rms_norm(x, weight, 1e-6), reference_norm(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_is_silu_of_the_gate_times_up(triton_device, dtype):
    skip_bf16_interpreted(triton_device, dtype)
    generator = torch.Generator().manual_seed(3)
    both = (4 * torch.randn(5, 2 * 1100, generator=generator)).to(triton_device, dtype)
    gate, up = both[:, :1100], both[:, 1100:]  # strided rows, as a fused gate|up GEMM would give
    close(silu_mul(gate, up), F.silu(gate) * up)
    assert silu_mul(gate[:0], up[:0]).shape == (0, 1100)


def rotary_case(device, dtype, tokens=6, heads=4, kv_heads=2, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    fused = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=generator).to(device, dtype)
    q = fused[:, :heads * dim].view(tokens, heads, dim)  # strided rows: views of one q|k|v output
    k = fused[:, heads * dim:(heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    v = fused[:, (heads + kv_heads) * dim:].view(tokens, kv_heads, dim)
    angles = torch.randn(tokens, dim // 2, generator=generator) * 3
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
    caches = [torch.randn(5, 4, kv_heads, dim, generator=generator).to(device, dtype) for _ in range(2)]
    slots = torch.randperm(20, generator=generator)[:tokens].to(device)
    return q, k, v, cos, sin, caches, slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (3, 3), (8, 1)])
def test_rotary_write_kv_is_apply_rotary_then_the_cache_write(triton_device, dtype, heads, kv_heads):
    skip_bf16_interpreted(triton_device, dtype)
    q, k, v, cos, sin, (k_cache, v_cache), slots = rotary_case(triton_device, dtype, heads=heads, kv_heads=kv_heads)
    expected_q, expected_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    untouched = torch.ones(k_cache.shape[0] * k_cache.shape[1], dtype=torch.bool)
    untouched[slots.cpu()] = False
    caches_before = k_cache.clone(), v_cache.clone()
    rotary_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
    # Compiled, the GPU rounds each rotated value once (Triton folds the kernel's per-product
    # roundings into fused multiply-adds) where PyTorch rounds the two products and their sum:
    # where the products cancel, PyTorch's own error is a few units of the products' size.
    scale = (torch.finfo(dtype).eps if dtype != torch.float32 else 1e-6) * 4
    for got, expected in ((q, expected_q), (k, expected_k)):
        torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=scale)
    for cache, before, written in ((k_cache, caches_before[0], k), (v_cache, caches_before[1], v)):
        flat, flat_before = cache.view(-1, *cache.shape[2:]), before.view(-1, *before.shape[2:])
        assert torch.equal(flat[slots], written)  # the cache holds exactly the rotated k, and v
        assert torch.equal(flat[untouched.to(flat.device)], flat_before[untouched.to(flat.device)])


def test_rotary_refuses_layouts_it_cannot_index(triton_device):
    q, k, v, cos, sin, (k_cache, v_cache), slots = rotary_case(triton_device, torch.float32)
    with pytest.raises(ValueError, match="heads and dims must be contiguous"):
        rotary_write_kv(q.transpose(0, 1).transpose(0, 1)[:, :, ::2], k, v, cos[:, ::2], sin[:, ::2], k_cache,
                        v_cache, slots)
    with pytest.raises(ValueError, match="one dtype"):
        add_rms_norm(q, None, torch.ones(16, dtype=torch.bfloat16, device=triton_device), 1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_the_model_with_fused_ops_computes_what_it_computes_without(triton_device, arch, tmp_path):
    """Chunked prefill and decode through the fused kernels: the same logits as the PyTorch
    element-wise code (float32), Qwen3's per-head q/k norms included."""
    if triton_device != "cpu":
        pytest.skip("the model-level comparison runs on CPU under the interpreter; the oracle covers the GPU")
    model, args = load_model(build_model_folder(tmp_path / arch, arch=arch))
    ids = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    tables = [torch.arange(0, 4), torch.arange(4, 8)]
    steps = [[(0, 0, 5), (1, 0, 9)], [(0, 5, 8)], [(0, 8, 9), (1, 9, 9)]]
    results = []
    for fused in (False, True):
        allocate_cache(model, args)
        model.use_fused_ops(fused)
        results.append([run_step(model, ids, tables, [c for c in step if c[2] > c[1]]) for step in steps])
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
