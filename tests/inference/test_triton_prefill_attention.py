"""The Triton paged prefill kernel (chunks that continue a cached context) against a float64
computation written straight from the block tables, and inside the model's paged_attention
against its per-sequence PyTorch path: on CPU under TRITON_INTERPRET=1 (tests/conftest.py),
compiled on a GPU when there is one (the `triton_device` fixture). Its PTX for sm_90 is built
here too, without a GPU (sm90_compile.py)."""

from __future__ import annotations

import importlib.util
import math
import sys
from types import SimpleNamespace

import pytest
import torch

from services.inference.kernels import triton_attention, triton_prefill_attention
from services.inference.kernels.triton_prefill_attention import (build_prefill_tiles, paged_prefill_attention,
                                                                 prefill_tile_tokens)
from services.inference.model import attention
from services.inference.model.attention import (build_continued_prefills, build_decode_batch, build_fresh_prefills,
                                                paged_attention, write_kv)
from services.inference.model.context import StepContext
from tests.inference.sm90_compile import run_in_fresh_process
from tests.inference.triton_compiles import compiled_variants, unspecialized

# (cached tokens, new tokens): none cached (7 new), a partial block cached and one new token,
# a partial block and an odd count, exactly one block, several blocks and more new tokens than
# a 64-token tile holds.
CHUNKS = [(0, 7), (9, 1), (5, 9), (16, 16), (37, 70)]


def continued_batch(chunks, block_size, num_heads, num_kv_heads, head_dim, generator, dtype=torch.float32):
    """Contexts of cached + new tokens in shuffled, scattered blocks. Everything else in the
    cache is poison (K +Inf, V NaN): block 0 (where a masked table load's default lands), the
    block the table padding names, the unused tail of each last block. Returns q for the new
    tokens (packed), the caches, the padded tables and the (table row, first row, new,
    context) chunks."""
    contexts = [cached + new for cached, new in chunks]
    needed = [math.ceil(n / block_size) for n in contexts]
    num_blocks = sum(needed) + 5
    ids = 1 + torch.randperm(num_blocks - 1, generator=generator)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("inf"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    tables = torch.full((len(chunks), max(needed) + 2), int(ids[-1]), dtype=torch.int32)
    taken, first_row, described = 0, 0, []
    for s, ((_, new), context) in enumerate(zip(chunks, contexts)):
        own = ids[taken:taken + needed[s]]
        taken += needed[s]
        tables[s, :needed[s]] = own.to(torch.int32)
        positions = torch.arange(context)
        slots = (own[positions // block_size], positions % block_size)
        k_cache[slots] = torch.randn(context, num_kv_heads, head_dim, generator=generator).to(dtype)
        v_cache[slots] = torch.randn(context, num_kv_heads, head_dim, generator=generator).to(dtype)
        described.append((s, first_row, new, context))
        first_row += new
    q = (2 * torch.randn(first_row, num_heads, head_dim, generator=generator)).to(dtype)  # peaky softmax
    return q, k_cache, v_cache, tables, described


def reference_continued(q, k_cache, v_cache, tables, chunks, scale):
    """Each new token attends to its context up to its own position, in float64, one head at a
    time, reading only the table entries the context covers."""
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for table_row, first_row, new, context in chunks:
        positions = torch.arange(context)
        blocks = tables[table_row, :math.ceil(context / block_size)].long()[positions // block_size]
        keys = k_cache[blocks, positions % block_size].double()
        values = v_cache[blocks, positions % block_size].double()
        for j in range(new):
            visible = context - new + j + 1
            for h in range(q.shape[1]):
                weights = torch.softmax(keys[:visible, h // group] @ q[first_row + j, h].double() * scale, dim=0)
                out[first_row + j, h] = weights @ values[:visible, h // group]
    return out


def attend(device, q, k_cache, v_cache, tables, chunks, scale, tile_tokens=None, out=None):
    """paged_prefill_attention on `device`, result back on CPU."""
    if tile_tokens is None:
        tile_tokens = prefill_tile_tokens(q.shape[1], k_cache.shape[2], q.shape[2])
    tiles = build_prefill_tiles(chunks, tile_tokens, device)
    on = [t.to(device) for t in (q, k_cache, v_cache, tables)]
    return paged_prefill_attention(*on, tiles, scale, out).cpu()


@pytest.mark.parametrize("block_size,num_heads,num_kv_heads,head_dim", [
    (16, 4, 2, 16),  # the tiny test model's heads
    (12, 8, 8, 64),  # MHA, a block size that is no power of two
    (16, 8, 2, 128),  # GQA 4 at Llama's head_dim
    (5, 6, 2, 40),  # GQA 3 (padded to 4 heads a tile), head_dim no power of two, tiny blocks
])
def test_prefill_matches_block_table_semantics(triton_device, block_size, num_heads, num_kv_heads, head_dim):
    generator = torch.Generator().manual_seed(block_size * 1000 + num_heads * 100 + head_dim)
    q, k_cache, v_cache, tables, chunks = continued_batch(CHUNKS, block_size, num_heads, num_kv_heads, head_dim,
                                                          generator)
    scale = head_dim ** -0.5
    got = attend(triton_device, q, k_cache, v_cache, tables, chunks, scale)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), reference_continued(q, k_cache, v_cache, tables, chunks, scale),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (8, 1)])  # 16-row tiles: 16 tokens, 2 tokens
def test_small_tiles_split_chunks_and_never_mix_sequences(triton_device, num_heads, num_kv_heads):
    """Tiles of the fewest rows a GPU dot takes: most chunks span several tiles, and each tile's
    causal limit starts where the previous one ended."""
    generator = torch.Generator().manual_seed(num_heads)
    q, k_cache, v_cache, tables, chunks = continued_batch(CHUNKS, 16, num_heads, num_kv_heads, 16, generator)
    tile_tokens = 16 // (num_heads // num_kv_heads)
    got = attend(triton_device, q, k_cache, v_cache, tables, chunks, 0.25, tile_tokens=tile_tokens)
    torch.testing.assert_close(got.double(), reference_continued(q, k_cache, v_cache, tables, chunks, 0.25),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_accumulate_in_fp32(triton_device, dtype):
    if dtype == torch.bfloat16 and triton_device == "cpu":
        # fp16 stands in for it (same code: 16-bit loads, fp32 accumulation, weights cast to
        # the input type for P·V).
        pytest.skip("the 3.6 interpreter's tl.dot reads bf16 as integers")
    generator = torch.Generator().manual_seed(11)
    q, k_cache, v_cache, tables, chunks = continued_batch([(100, 40), (3, 5)], 16, 8, 2, 64, generator, dtype=dtype)
    got = attend(triton_device, q, k_cache, v_cache, tables, chunks, 0.125)
    assert got.dtype == dtype
    tolerance = 2e-3 if dtype == torch.float16 else 1.6e-2  # P is rounded to the input type for P·V
    torch.testing.assert_close(got.double(), reference_continued(q, k_cache, v_cache, tables, chunks, 0.125),
                               atol=tolerance, rtol=tolerance)


def test_strided_query_and_rows_no_tile_covers(triton_device):
    """q as a view into a fused projection output, out given by the caller: rows of the step
    that belong to other sequences (here row 0 and the last) keep what was there."""
    generator = torch.Generator().manual_seed(3)
    _, k_cache, v_cache, tables, chunks = continued_batch([(20, 6), (40, 3)], 16, 4, 2, 32, generator)
    chunks = [(row, first + 1, new, context) for row, first, new, context in chunks]  # rows 1..9 of 11
    fused = torch.randn(11, 3 * 4 * 32, generator=generator).to(triton_device)  # [T, q|k|v]
    q = fused[:, :4 * 32].view(11, 4, 32)
    assert not q.is_contiguous()
    out = torch.full((11, 4, 32), 7.0, device=triton_device)
    tiles = build_prefill_tiles(chunks, prefill_tile_tokens(4, 2, 32), triton_device)
    on = [t.to(triton_device) for t in (k_cache, v_cache, tables)]
    got = paged_prefill_attention(q, *on, tiles, 0.2, out)
    assert got is out
    got = got.cpu()
    assert torch.equal(got[0], torch.full((4, 32), 7.0)) and torch.equal(got[10], torch.full((4, 32), 7.0))
    expected = reference_continued(q.cpu(), k_cache, v_cache, tables, chunks, 0.2)
    torch.testing.assert_close(got[1:10].double(), expected[1:10], atol=1e-4, rtol=1e-4)


def test_tile_map_is_built_on_the_host_longest_context_first():
    tiles = build_prefill_tiles([(0, 0, 5, 5), (3, 5, 70, 100), (1, 75, 2, 40)], 32, "cpu")
    assert tiles.tile_tokens == 32 and tiles.map.dtype == torch.int32
    # (table row, first packed row, tokens, position of the first): ordered by last key position
    assert tiles.map.tolist() == [[3, 69, 6, 94], [3, 37, 32, 62], [3, 5, 32, 30], [1, 75, 2, 38], [0, 0, 5, 0]]
    with pytest.raises(ValueError, match="power of two"):
        build_prefill_tiles([(0, 0, 5, 5)], 24, "cpu")
    with pytest.raises(ValueError, match="context of 4"):
        build_prefill_tiles([(0, 0, 5, 4)], 16, "cpu")
    assert prefill_tile_tokens(32, 8, 128) == 32 and prefill_tile_tokens(28, 4, 128) == 16  # groups 4, 7 -> 8
    assert prefill_tile_tokens(4, 4, 64) == 128 and prefill_tile_tokens(8, 8, 256) == 64


def mixed_step(chunks, block_size, num_heads, num_kv_heads, head_dim, generator):
    """A step of chunks (tokens this step, context after it) written the way the model does:
    earlier context cached, then this step's K/V by write_kv before attention. Returns q and
    the caches, the context without kernel metadata (the PyTorch path) and the padded tables."""
    k_cache = torch.zeros(60, block_size, num_kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    blocks = torch.randperm(59, generator=generator) + 1
    tables, slots, cu_seqlens, taken = [], [], [0], 0
    for count, context in chunks:
        needed = math.ceil(context / block_size)
        table = blocks[taken:taken + needed]
        taken += needed
        positions = torch.arange(context)
        tables.append(table)
        slots.append(table[positions // block_size] * block_size + positions % block_size)
        old = slots[-1][:context - count]
        write_kv(k_cache, v_cache, torch.randn(len(old), num_kv_heads, head_dim, generator=generator),
                 torch.randn(len(old), num_kv_heads, head_dim, generator=generator), old)
        cu_seqlens.append(cu_seqlens[-1] + count)
    total = cu_seqlens[-1]
    new_slots = torch.cat([slot[context - count:] for slot, (count, context) in zip(slots, chunks)])
    q = torch.randn(total, num_heads, head_dim, generator=generator)
    k = torch.randn(total, num_kv_heads, head_dim, generator=generator)
    v = torch.randn(total, num_kv_heads, head_dim, generator=generator)
    write_kv(k_cache, v_cache, k, v, new_slots)
    ctx = StepContext(positions=torch.zeros(total, dtype=torch.int64), slot_mapping=new_slots, cu_seqlens=cu_seqlens,
                      context_lens=[c for _, c in chunks], block_tables=tables,
                      logits_indices=torch.arange(len(chunks)), block_size=block_size)
    padded = torch.zeros(len(chunks), max(len(t) for t in tables), dtype=torch.int64)  # as the runner pads
    for s, table in enumerate(tables):
        padded[s, :len(table)] = table
    return q, k, v, k_cache, v_cache, ctx, padded


def test_model_attention_sends_continued_chunks_through_the_kernel(triton_device, monkeypatch):
    """A step mixing a fresh prefill, chunks after a prefix-cache hit and after an earlier chunk,
    and decodes: with the runner's Triton metadata, the continued chunks go through one kernel
    launch (the per-sequence loop is never reached) and every row equals the PyTorch path."""
    if triton_device != "cpu":
        pytest.skip("the model-level comparison runs on CPU under the interpreter; the kernel tests cover the GPU")
    block_size, num_heads, num_kv_heads, head_dim = 4, 4, 2, 16  # the tiny model's heads
    generator = torch.Generator().manual_seed(8)
    # fresh 5, hit of 2 blocks + 3 new, decode 1 of 6, second chunk 7 of 15, fresh 2, odd 9 of 10
    chunks = [(5, 5), (3, 11), (1, 6), (7, 15), (2, 2), (9, 10)]
    q, k, v, k_cache, v_cache, ctx, padded = mixed_step(chunks, block_size, num_heads, num_kv_heads, head_dim,
                                                        generator)
    ctx.decode = build_decode_batch(ctx)
    expected = paged_attention(q, k_cache, v_cache, ctx, scale=0.3)  # the CPU path, untouched
    ctx.decode = build_decode_batch(ctx, padded_tables=padded)
    ctx.prefill = build_fresh_prefills(ctx)
    ctx.continued = build_continued_prefills(ctx, padded)
    assert ctx.continued.seq_indices == {1, 3, 5}
    assert ctx.continued.chunks == [(1, 5, 3, 11), (3, 9, 7, 15), (5, 18, 9, 10)]
    launches = []
    monkeypatch.setattr(attention, "paged_prefill_attention",
                        lambda *args: launches.append(args) or paged_prefill_attention(*args))
    monkeypatch.setattr(attention, "F", SimpleNamespace())  # the per-sequence loop's SDPA: gone
    got = paged_attention(q, k_cache, v_cache, ctx, scale=0.3, k=k, v=v)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert len(launches) == 1
    assert ctx.continued.tiles(prefill_tile_tokens(num_heads, num_kv_heads, head_dim)) is launches[0][4]  # reused


def test_no_continued_chunks_means_no_metadata():
    """Decodes and fresh prefills only: nothing for the kernel (and no tile upload)."""
    generator = torch.Generator().manual_seed(1)
    *_, ctx, padded = mixed_step([(5, 5), (1, 9)], 4, 4, 2, 16, generator)
    assert build_continued_prefills(ctx, padded) is None


@pytest.mark.skipif(not triton_attention.triton_available(), reason="triton is not installed")
def test_per_step_integers_are_left_unspecialized(triton_device):
    for name, args in triton_prefill_attention.STEP_VARYING_ARGS.items():
        kernel = triton_prefill_attention._jitted(getattr(triton_prefill_attention, name))
        assert set(args) <= set(kernel.arg_names), (name, args)
        assert set(args) <= unspecialized(kernel), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts the kernels Triton compiled: needs a GPU")
def test_steps_of_any_table_width_and_tile_count_reuse_the_compiled_kernel():
    kernel = triton_prefill_attention._jitted(triton_prefill_attention._paged_prefill_kernel)
    generator = torch.Generator().manual_seed(9)

    def step(chunks) -> None:
        q, k_cache, v_cache, tables, described = continued_batch(chunks, 16, 8, 2, 64, generator)
        got = attend("cuda", q, k_cache, v_cache, tables, described, 0.125)
        torch.testing.assert_close(got.double(), reference_continued(q, k_cache, v_cache, tables, described, 0.125),
                                   atol=1e-4, rtol=1e-4)

    step([(20, 30), (1, 2)])
    before = compiled_variants(kernel)
    step([(0, 3)])
    step([(300, 100), (17, 16), (40, 5)])
    assert compiled_variants(kernel) == before


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k_cache, v_cache, tables, chunks = continued_batch([(3, 2)], 16, 2, 1, 16, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        paged_prefill_attention(q, k_cache, v_cache, tables, build_prefill_tiles(chunks, 16, "cpu"), 0.25)


def test_module_imports_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("prefill_without_triton", triton_prefill_attention.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass looks its module up
    spec.loader.exec_module(module)
    tiles = module.build_prefill_tiles([(0, 0, 2, 3)], 16, "cpu")  # host side works without triton
    with pytest.raises(RuntimeError, match="needs triton"):
        module.paged_prefill_attention(torch.randn(2, 1, 16), torch.zeros(1, 4, 1, 16), torch.zeros(1, 4, 1, 16),
                                       torch.zeros(1, 1, dtype=torch.int32), tiles, 1.0)


# --------------------------------------------------------------------------------------------
# Compiling for the H200 without one


@pytest.mark.parametrize("dtype,group,head_dim,block_size", [("bf16", 4, 128, 16), ("bf16", 8, 128, 16),
                                                             ("fp16", 1, 64, 16), ("bf16", 7, 128, 16),
                                                             ("bf16", 4, 256, 16), ("fp32", 2, 64, 16)])
def test_paged_prefill_kernels_compile_for_hopper(tmp_path, dtype, group, head_dim, block_size):
    """The interpreter accepts what the GPU compiler may not: build the PTX for sm_90 with
    triton's own toolchain (no GPU needed), 16-bit dots on the tensor cores, no spills."""
    run_in_fresh_process("check_prefill_kernel", dtype, group, head_dim, block_size, cache_dir=tmp_path)


def test_prefill_steps_share_the_compiled_kernel(tmp_path):
    """The JIT's cache keys for an H200, computed here: a step's block-table width and tile
    count pick no new compile."""
    run_in_fresh_process("check_prefill_steps_share_compiled_kernel", cache_dir=tmp_path)
