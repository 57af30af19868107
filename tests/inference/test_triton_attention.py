"""The Triton paged decode-attention kernel against a float64 computation written straight
from the block tables (and against the model's own PyTorch paged attention): on CPU under
TRITON_INTERPRET=1 (set for the session by tests/conftest.py), compiled on a GPU when there
is one (the `triton_device` fixture). Its PTX for sm_90 is built here too, without a GPU, in
a process without the interpreter (sm90_compile.py). Then the varlen prefill wrapper: its
CPU path, its calls into varlen_attn (against fakes of both signatures torch has shipped),
and the real thing on a GPU."""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys

import numpy as np
import pytest
import torch

from services.inference.kernels import triton_attention
from services.inference.kernels.triton_attention import (
    MAX_PARTITIONS,
    choose_num_partitions,
    paged_decode_attention,
    prefill_attention_sdpa,
    varlen_prefill_attention,
)
from services.inference.model.attention import (build_decode_batch, build_fresh_prefills, paged_attention,
                                                write_kv)
from services.inference.model.context import StepContext
from tests.inference.sm90_compile import run_in_fresh_process
from tests.inference.triton_compiles import compiled_variants, unspecialized

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --------------------------------------------------------------------------------------------
# Decode


def reference_decode(q, k_cache, v_cache, block_tables, context_lens, scale):
    """out[s, h] = softmax(q[s, h]·K[s, g]ᵀ * scale) V[s, g] in float64, one head at a time,
    reading only the table entries a context covers."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros(num_seqs, num_heads, head_dim, dtype=torch.float64)
    for s in range(num_seqs):
        length = int(context_lens[s])
        positions = torch.arange(length)
        blocks = block_tables[s, :math.ceil(length / block_size)].long()[positions // block_size]
        keys = k_cache[blocks, positions % block_size].double()  # [length, kv_heads, D]
        values = v_cache[blocks, positions % block_size].double()
        for h in range(num_heads):
            if length:
                weights = torch.softmax(keys[:, h // group] @ q[s, h].double() * scale, dim=0)
                out[s, h] = weights @ values[:, h // group]
    return out


def paged_batch(context_lens, block_size, num_kv_heads, head_dim, generator, dtype=torch.float32,
                extra_table_entries=2):
    """Random K/V for each context in shuffled, scattered blocks; everything else is NaN.

    Block-table padding points at a NaN block, block 0 (where a masked table load's default
    lands) is NaN and so is the unused tail of each last block: reading anything outside a
    context poisons the result.
    """
    needed = [math.ceil(n / block_size) for n in context_lens]
    num_blocks = sum(needed) + 7
    ids = 1 + torch.randperm(num_blocks - 1, generator=generator)
    poison = int(ids[-1])
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    width = max(needed) + extra_table_entries
    block_tables = torch.full((len(context_lens), width), poison, dtype=torch.int32)
    taken = 0
    for s, n in enumerate(context_lens):
        own = ids[taken:taken + needed[s]]
        taken += needed[s]
        block_tables[s, :needed[s]] = own.to(torch.int32)
        positions = torch.arange(n)
        slots = (own[positions // block_size], positions % block_size)
        k_cache[slots] = torch.randn(n, num_kv_heads, head_dim, generator=generator).to(dtype)
        v_cache[slots] = torch.randn(n, num_kv_heads, head_dim, generator=generator).to(dtype)
    return k_cache, v_cache, block_tables, torch.tensor(context_lens, dtype=torch.int32)


BLOCK = 16
# 1 token, one short of a block, exactly a block, several blocks (odd), over two 64-row tiles.
LENGTHS = [1, BLOCK - 1, BLOCK, 3 * BLOCK + 5, 131]


def decode(device, q, k_cache, v_cache, block_tables, context_lens, scale, **options):
    """paged_decode_attention on `device`, result back on CPU."""
    on = [t.to(device) for t in (q, k_cache, v_cache, block_tables, context_lens)]
    return paged_decode_attention(*on, scale, **options).cpu()


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 4), (8, 2), (8, 1)])  # GQA 1, 2, 4, MQA
def test_decode_matches_block_table_semantics(triton_device, num_heads, num_kv_heads, head_dim):
    generator = torch.Generator().manual_seed(num_heads * 100 + num_kv_heads + head_dim)
    k_cache, v_cache, tables, lens = paged_batch(LENGTHS, BLOCK, num_kv_heads, head_dim, generator)
    q = 2 * torch.randn(len(LENGTHS), num_heads, head_dim, generator=generator)  # peaky softmax
    scale = head_dim ** -0.5
    got = decode(triton_device, q, k_cache, v_cache, tables, lens, scale, num_partitions=1)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), reference_decode(q, k_cache, v_cache, tables, lens, scale),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_partitions", [2, 3, 5])
def test_split_k_partitions_merge_to_the_same_result(triton_device, num_partitions):
    """Partitions of 64 tokens over a 320-token table: short contexts leave trailing
    partitions empty, which must weigh nothing in the merge."""
    generator = torch.Generator().manual_seed(num_partitions)
    lengths = [1, 70, 300, 190]
    k_cache, v_cache, tables, lens = paged_batch(lengths, BLOCK, 2, 64, generator, extra_table_entries=1)
    assert tables.shape[1] * BLOCK == 320
    q = 2 * torch.randn(len(lengths), 8, 64, generator=generator)
    expected = reference_decode(q, k_cache, v_cache, tables, lens, 0.125)
    got = decode(triton_device, q, k_cache, v_cache, tables, lens, 0.125, num_partitions=num_partitions)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tile_tokens, num_stages, num_partitions", [(16, 4, None), (32, 3, 2), (128, 2, None)])
def test_tile_and_pipeline_knobs_change_nothing(triton_device, tile_tokens, num_stages, num_partitions):
    """bench.kernels sweeps the loop's tile and pipeline depth: contexts shorter than a tile, a
    tile's width and a ragged end, whole and split, all equal the reference."""
    generator = torch.Generator().manual_seed(tile_tokens)
    lengths = [5, 16, 37, 130]
    k_cache, v_cache, tables, lens = paged_batch(lengths, BLOCK, 2, 64, generator)
    q = torch.randn(len(lengths), 4, 64, generator=generator)
    expected = reference_decode(q, k_cache, v_cache, tables, lens, 0.125)
    got = decode(triton_device, q, k_cache, v_cache, tables, lens, 0.125, tile_tokens=tile_tokens,
                 num_stages=num_stages, num_partitions=num_partitions)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


def test_a_tile_that_is_not_a_power_of_two_is_refused(triton_device):
    generator = torch.Generator().manual_seed(0)
    k_cache, v_cache, tables, lens = paged_batch([20], BLOCK, 2, 64, generator)
    with pytest.raises(ValueError, match="tile_tokens must be a power of two"):
        decode(triton_device, torch.randn(1, 4, 64), k_cache, v_cache, tables, lens, 0.125, tile_tokens=48)


def test_partition_choice_splits_only_small_batches_with_long_contexts():
    assert choose_num_partitions(num_seqs=64, num_kv_heads=8, max_context=32768) == 1  # GPU already full
    assert choose_num_partitions(num_seqs=1, num_kv_heads=8, max_context=8192) == MAX_PARTITIONS
    assert choose_num_partitions(num_seqs=8, num_kv_heads=8, max_context=8192) == 4
    assert choose_num_partitions(num_seqs=1, num_kv_heads=8, max_context=600) == 4  # >= 128 tokens each
    assert choose_num_partitions(num_seqs=1, num_kv_heads=1, max_context=200) == 1


@pytest.mark.parametrize("num_seqs", [1, 3])
def test_contexts_far_shorter_than_the_table_split_by_their_own_length(triton_device, num_seqs):
    """The chosen split for a table sized for 2048 tokens (a graph's width): each sequence's
    partitions are sized from its own context (here 1 to 1100 tokens, so some partitions are
    a couple of tiles, some empty, one context not a whole tile) and merge to the reference."""
    generator = torch.Generator().manual_seed(40 + num_seqs)
    lengths = [1100, 1, 200][:num_seqs]
    k_cache, v_cache, tables, lens = paged_batch(lengths, BLOCK, 2, 64, generator,
                                                 extra_table_entries=2048 // BLOCK - max(lengths) // BLOCK - 1)
    assert tables.shape[1] * BLOCK == 2048
    assert choose_num_partitions(num_seqs, 2, 2048) == 16  # split: programs are few
    q = 2 * torch.randn(num_seqs, 8, 64, generator=generator)
    got = decode(triton_device, q, k_cache, v_cache, tables, lens, 0.125)
    torch.testing.assert_close(got.double(), reference_decode(q, k_cache, v_cache, tables, lens, 0.125),
                               atol=1e-4, rtol=1e-4)


def test_decode_matches_the_model_paged_attention(triton_device):
    """The model's CPU decode path (write_kv, build_decode_batch, paged_attention) with its
    small blocks of 4 (one 64-row tile spans 16 blocks) and a head_dim that is no power of 2."""
    block_size, num_heads, num_kv_heads, head_dim = 4, 6, 2, 40
    generator = torch.Generator().manual_seed(5)
    lengths = [9, 1, 22, 4]
    k_cache = torch.zeros(40, block_size, num_kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    tables = [torch.randperm(40, generator=generator)[:math.ceil(n / block_size)] for n in lengths]
    for table, n in zip(tables, lengths):
        positions = torch.arange(n)
        slots = table[positions // block_size] * block_size + positions % block_size
        write_kv(k_cache, v_cache, torch.randn(n, num_kv_heads, head_dim, generator=generator),
                 torch.randn(n, num_kv_heads, head_dim, generator=generator), slots)
    q = torch.randn(len(lengths), num_heads, head_dim, generator=generator)
    ctx = StepContext(positions=torch.tensor([n - 1 for n in lengths]), slot_mapping=torch.zeros(4, dtype=torch.int64),
                      cu_seqlens=list(range(len(lengths) + 1)), context_lens=lengths, block_tables=tables,
                      logits_indices=torch.arange(len(lengths)), block_size=block_size)
    ctx.decode = build_decode_batch(ctx)
    expected = paged_attention(q, k_cache, v_cache, ctx, scale=0.2)
    padded = torch.zeros(len(lengths), max(len(t) for t in tables), dtype=torch.int32)
    for s, table in enumerate(tables):
        padded[s, :len(table)] = table
    got = decode(triton_device, q, k_cache, v_cache, padded, torch.tensor(lengths, dtype=torch.int32), 0.2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_partitions", [1, 2])
def test_half_precision_inputs_accumulate_in_fp32(triton_device, dtype, num_partitions):
    if dtype == torch.bfloat16 and triton_device == "cpu":
        # fp16 stands in for it (same code: 16-bit loads, fp32 accumulation, weights cast to
        # the input type for P·V).
        pytest.skip("the 3.6 interpreter's tl.dot reads bf16 as integers")
    generator = torch.Generator().manual_seed(11)
    lengths = [150, 3]
    k_cache, v_cache, tables, lens = paged_batch(lengths, BLOCK, 2, 64, generator, dtype=dtype)
    q = torch.randn(2, 4, 64, generator=generator).to(dtype)
    got = decode(triton_device, q, k_cache, v_cache, tables, lens, 0.125, num_partitions=num_partitions)
    assert got.dtype == dtype
    tolerance = 2e-3 if dtype == torch.float16 else 1.6e-2  # P is rounded to the input type for P·V
    torch.testing.assert_close(got.double(), reference_decode(q, k_cache, v_cache, tables, lens, 0.125),
                               atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("num_partitions", [1, 3])
def test_strided_query_given_output_and_empty_rows(triton_device, num_partitions):
    """q as a view into a fused projection output, out given by the caller, and a padded
    row (context 0, as in a CUDA-graph batch) that must come out as zeros, not NaN."""
    generator = torch.Generator().manual_seed(3)
    k_cache, v_cache, tables, lens = paged_batch([40, 1, 200], BLOCK, 2, 64, generator)
    lens[1] = 0
    fused = torch.randn(3, 3 * 4 * 64, generator=generator).to(triton_device)  # [S, q|k|v]
    q = fused[:, :4 * 64].view(3, 4, 64)
    assert not q.is_contiguous()
    out = torch.full((3, 4, 64), float("nan"), device=triton_device)
    on = [t.to(triton_device) for t in (k_cache, v_cache, tables, lens)]
    got = paged_decode_attention(q, *on, 0.125, out, num_partitions=num_partitions)
    assert got is out
    got = got.cpu()
    assert torch.equal(got[1], torch.zeros(4, 64))
    torch.testing.assert_close(got.double(), reference_decode(q.cpu(), k_cache, v_cache, tables, lens, 0.125),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not triton_attention.triton_available(), reason="triton is not installed")
def test_per_batch_integers_are_left_unspecialized(triton_device):
    """Block-table width, partition size and count change with the batch; specialized, each first
    1, multiple of 16 or other value would compile a new kernel in the middle of serving."""
    for name, args in triton_attention.STEP_VARYING_ARGS.items():
        kernel = triton_attention._jitted(getattr(triton_attention, name))
        assert set(args) <= set(kernel.arg_names), (name, args)
        assert set(args) <= unspecialized(kernel), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts the kernels Triton compiled: needs a GPU")
def test_batches_of_any_table_width_and_partition_count_reuse_the_compiled_kernels():
    kernels = [triton_attention._jitted(triton_attention._paged_decode_kernel),
               triton_attention._jitted(triton_attention._merge_partitions_kernel)]
    generator = torch.Generator().manual_seed(9)

    def step(lengths: list[int], extra_table_entries: int, num_partitions: int, table_width: int) -> None:
        k_cache, v_cache, tables, lens = paged_batch(lengths, BLOCK, 2, 64, generator,
                                                     extra_table_entries=extra_table_entries)
        assert tables.shape[1] == table_width
        q = torch.randn(len(lengths), 8, 64, generator=generator)
        got = decode("cuda", q, k_cache, v_cache, tables, lens, 0.125, num_partitions=num_partitions)
        torch.testing.assert_close(got.double(), reference_decode(q, k_cache, v_cache, tables, lens, 0.125),
                                   atol=1e-4, rtol=1e-4)

    step([70, 5], 2, 1, 7)  # unsplit
    step([700, 300], 4, 12, 48)  # 12 partitions of 64 tokens, merged with PARTITIONS_P 16
    before = [compiled_variants(kernel) for kernel in kernels]
    step([1], 0, 1, 1)
    step([200, 9], 3, 1, 16)
    step([1000, 1], 1, 16, 64)  # 16 partitions, still PARTITIONS_P 16
    assert [compiled_variants(kernel) for kernel in kernels] == before


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    k_cache, v_cache, tables, lens = paged_batch([3], BLOCK, 1, 16, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        paged_decode_attention(torch.randn(1, 1, 16), k_cache, v_cache, tables, lens, 0.25)


def test_module_imports_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("triton_attention_without_triton", triton_attention.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.triton_available()
    with pytest.raises(RuntimeError, match="needs triton"):
        module.paged_decode_attention(torch.randn(1, 1, 16), torch.zeros(1, 4, 1, 16), torch.zeros(1, 4, 1, 16),
                                      torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0)


# --------------------------------------------------------------------------------------------
# Prefill


def reference_prefill(q, k, v, cu_seqlens, scale):
    """Causal attention per sequence in float64 with an explicit mask; GQA by head index."""
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        n = end - start
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for h in range(q.shape[1]):
            logits = q[start:end, h].double() @ k[start:end, h // group].double().T * scale
            weights = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
            out[start:end, h] = weights @ v[start:end, h // group].double()
    return out


def prefill_batch(lengths, num_heads, num_kv_heads, head_dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, num_heads, head_dim, generator=generator)
    k = torch.randn(total, num_kv_heads, head_dim, generator=generator)
    v = torch.randn(total, num_kv_heads, head_dim, generator=generator)
    cu_seqlens = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
    return q, k, v, cu_seqlens


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (4, 1)])
def test_prefill_cpu_path_is_causal_attention_per_sequence(num_heads, num_kv_heads):
    lengths = [5, 1, 0, 17]
    q, k, v, cu_seqlens = prefill_batch(lengths, num_heads, num_kv_heads)
    got = varlen_prefill_attention(q, k, v, cu_seqlens, max_seqlen=max(lengths), scale=0.3)
    torch.testing.assert_close(got.double(), reference_prefill(q, k, v, cu_seqlens, 0.3), atol=1e-5, rtol=1e-5)


def fake_varlen_attn_current(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                             window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None,
                             num_splits=None):
    """torch 2.13's varlen_attn signature, computed with the reference: causal must come as
    window_size=(-1, 0) and fewer KV heads need enable_gqa, as the real one checks."""
    assert window_size == (-1, 0) and scale is not None and cu_seq_q is cu_seq_k
    assert cu_seq_q.dtype == torch.int32 and max_q == max_k
    assert enable_gqa == (key.shape[1] != query.shape[1])
    return prefill_attention_sdpa(query, key, value, cu_seq_q, scale)


def fake_varlen_attn_first(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """The first varlen_attn (no scale, no window, no GQA flag): default scale 1/sqrt(D)."""
    assert is_causal and key.shape[1] == query.shape[1]
    return prefill_attention_sdpa(query, key, value, cu_seq_q, query.shape[-1] ** -0.5)


@pytest.mark.parametrize("varlen_attn", [fake_varlen_attn_current, fake_varlen_attn_first])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2)])
def test_prefill_calls_varlen_attn_causally_across_signatures(varlen_attn, num_heads, num_kv_heads):
    """The CUDA branch's argument building, checked on CPU against fakes of both signatures."""
    lengths = [6, 11]
    q, k, v, cu_seqlens = prefill_batch(lengths, num_heads, num_kv_heads, seed=1)
    got = triton_attention._flash_varlen_call(varlen_attn, q, k, v, cu_seqlens, max(lengths), 0.3)
    torch.testing.assert_close(got.double(), reference_prefill(q, k, v, cu_seqlens, 0.3), atol=1e-5, rtol=1e-5)


@needs_cuda
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 2)])
def test_prefill_flash_path_on_gpu(num_heads, num_kv_heads):
    lengths = [70, 1, 300]
    q, k, v, cu_seqlens = prefill_batch(lengths, num_heads, num_kv_heads, head_dim=128, seed=2)
    expected = reference_prefill(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu_seqlens, 0.1)
    got = varlen_prefill_attention(*(t.cuda().bfloat16() for t in (q, k, v)), cu_seqlens.cuda(), max(lengths), 0.1)
    torch.testing.assert_close(got.double().cpu(), expected, atol=2e-2, rtol=2e-2)


def test_this_torch_varlen_attn_takes_a_signature_the_wrapper_knows():
    """A torch upgrade that renames these again should fail here, not on the GPU machine. The
    wrapper needs a causal switch (window_size, or is_causal in the first release); scale and
    enable_gqa it can do without (torch 2.11 on the GPU machine predates enable_gqa)."""
    from torch.nn.attention.varlen import varlen_attn
    params = inspect.signature(varlen_attn).parameters.values()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(positional) >= 7  # q, k, v, cu_seq_q, cu_seq_k, max_q, max_k: how the wrapper calls it
    assert {p.name for p in params} & {"window_size", "is_causal"}


# --------------------------------------------------------------------------------------------
# Compiling for the H200 without one


@pytest.mark.parametrize("dtype,group,head_dim,split", [("bf16", 4, 128, False), ("bf16", 8, 128, True),
                                                        ("fp16", 1, 64, True), ("fp32", 2, 128, False),
                                                        ("bf16", 4, 256, False)])
def test_decode_kernels_compile_for_hopper(tmp_path, dtype, group, head_dim, split):
    """The interpreter accepts what the GPU compiler may not: build the PTX for sm_90 with
    triton's own toolchain (no GPU needed) and check the 16-bit dots use the tensor cores."""
    run_in_fresh_process("check_decode_kernels", dtype, group, head_dim, split, cache_dir=tmp_path)


def test_decode_batches_of_any_table_width_share_the_compiled_kernels(tmp_path):
    """The JIT's cache keys for an H200, computed here: a batch's block-table width and partition
    count pick no new compile (a new one would stall serving for seconds)."""
    run_in_fresh_process("check_decode_batches_share_compiled_kernels", cache_dir=tmp_path)


@pytest.mark.parametrize("fresh_only", [False, True])
def test_model_attention_sends_fresh_prefills_through_varlen(fresh_only):
    """A step mixing fresh prefills (from position 0) with a continued chunk and a decode: the
    fresh ones attend in one varlen call over the step's own K/V (ctx.prefill), the others over
    the paged cache, and every row equals the per-sequence path without ctx.prefill."""
    block_size, num_heads, num_kv_heads, head_dim = 4, 4, 2, 8
    generator = torch.Generator().manual_seed(3)
    # (tokens this step, context after it): fresh 5, continued 3 of 9, decode 1 of 6, fresh 2
    chunks = [(5, 5), (2, 2)] if fresh_only else [(5, 5), (3, 9), (1, 6), (2, 2)]
    k_cache = torch.zeros(30, block_size, num_kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    tables, slots, cu_seqlens = [], [], [0]
    for s, (_, context) in enumerate(chunks):
        table = torch.arange(s * 7, s * 7 + math.ceil(context / block_size))
        positions = torch.arange(context)
        tables.append(table)
        slots.append(table[positions // block_size] * block_size + positions % block_size)
    new_slots = torch.cat([slot[context - count:] for slot, (count, context) in zip(slots, chunks)])
    for slot, (count, context) in zip(slots, chunks):  # earlier context already cached
        old = slot[:context - count]
        write_kv(k_cache, v_cache, torch.randn(len(old), num_kv_heads, head_dim, generator=generator),
                 torch.randn(len(old), num_kv_heads, head_dim, generator=generator), old)
        cu_seqlens.append(cu_seqlens[-1] + count)
    total = cu_seqlens[-1]
    q = torch.randn(total, num_heads, head_dim, generator=generator)
    k = torch.randn(total, num_kv_heads, head_dim, generator=generator)
    v = torch.randn(total, num_kv_heads, head_dim, generator=generator)
    write_kv(k_cache, v_cache, k, v, new_slots)
    ctx = StepContext(positions=torch.zeros(total, dtype=torch.int64), slot_mapping=new_slots, cu_seqlens=cu_seqlens,
                      context_lens=[c for _, c in chunks], block_tables=tables,
                      logits_indices=torch.arange(len(chunks)), block_size=block_size)
    ctx.decode = build_decode_batch(ctx)
    expected = paged_attention(q, k_cache, v_cache, ctx, scale=0.3)
    ctx.prefill = build_fresh_prefills(ctx)
    assert ctx.prefill.seq_indices == ({0, 1} if fresh_only else {0, 3})
    assert (ctx.prefill.rows is None) == fresh_only
    assert ctx.prefill.cu_seqlens.tolist() == [0, 5, 7] and ctx.prefill.max_seqlen == 5
    torch.testing.assert_close(paged_attention(q, k_cache, v_cache, ctx, scale=0.3, k=k, v=v), expected)
