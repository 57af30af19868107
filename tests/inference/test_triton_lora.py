"""Segment-tiled Triton LoRA (kernels/triton_lora.py) against the reference.

On a machine without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1, which
tests/conftest.py sets for the whole session; on a GPU machine they run compiled on CUDA
tensors (the `triton_device` fixture). Shapes are small because the interpreter runs every
program in Python; in/out features (72 -> 200) are not multiples of any block size, ranks
are random in 1..64. test_triton_lora_compile.py checks that the same kernels compile for
the H200 (sm_90) without one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.inference.kernels.reference import Segment, lora_segments, lora_tokens, segments_to_tokens
from tests.inference.triton_compiles import compiled_variants, unspecialized

IN, OUT, PAGES = 72, 200, 4096
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def lora(triton_device):
    from services.inference.kernels import triton_lora

    return triton_lora


def make_adapters(count: int, generator, max_rank: int = 64) -> list[tuple[torch.Tensor, float]]:
    """`count` adapters with disjoint random pages, random ranks 1..max_rank, scales 0.1..1.1."""
    free = torch.randperm(PAGES, generator=generator).tolist()
    adapters = []
    for _ in range(count):
        rank = int(torch.randint(1, max_rank + 1, (1,), generator=generator))
        pages = torch.tensor([free.pop() for _ in range(rank)], dtype=torch.int64)
        adapters.append((pages, float(torch.rand(1, generator=generator)) + 0.1))
    return adapters


def pool(generator, in_features: int = IN, out_features: int = OUT):
    # A scaled by 1/sqrt(in) keeps the shrunk values O(1), so one tolerance fits every test.
    a_pages = torch.randn(PAGES, in_features, generator=generator) / in_features ** 0.5
    b_pages = torch.randn(PAGES, out_features, generator=generator)
    return a_pages, b_pages


def launch(lora, y, x, a_pages, b_pages, plan, **kernel_options):
    """lora_shrink_expand on the plan's device (CPU inputs are moved there); y back on CPU."""
    device = plan.tile_rows.device
    return lora.lora_shrink_expand(*(t.to(device) for t in (y, x, a_pages, b_pages)), plan, **kernel_options).cpu()


def check_against_reference(lora, device, segments, num_tokens, generator, *, in_features=IN, out_features=OUT,
                            block_m=16, **kernel_options):
    """Run the Triton pair and the float64 reference; base-only rows must be bitwise unchanged."""
    a_pages, b_pages = pool(generator, in_features, out_features)
    x = torch.randn(num_tokens, in_features, generator=generator)
    base = torch.randn(num_tokens, out_features, generator=generator)
    plan = lora.build_lora_plan(segments, num_tokens, device, block_m=block_m)
    got = launch(lora, base.clone(), x, a_pages, b_pages, plan, **kernel_options)
    expected = lora_segments(base.double(), x.double(), a_pages.double(), b_pages.double(), segments)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    covered = torch.zeros(num_tokens, dtype=torch.bool)
    for segment in segments:
        covered[segment.start:segment.end] = True
    assert torch.equal(got[~covered], base[~covered])
    return plan


def popularity(pattern: str, num_tokens: int, generator) -> list[int]:
    """Adapter index per token, -1 for base only; not sorted, so an adapter's tokens are scattered."""
    if pattern == "identical":
        return [0] * num_tokens
    if pattern == "distinct":
        return list(range(num_tokens))
    if pattern == "zipf":
        weights = torch.tensor([1 / (k + 1) ** 1.2 for k in range(8)])
        return torch.multinomial(weights, num_tokens, replacement=True, generator=generator).tolist()
    if pattern == "skewed":
        return [0] * (num_tokens - 3) + [1, 2, 3]
    return [-1 if t % 3 == 0 else t % 4 for t in range(num_tokens)]  # "with_base"


@pytest.mark.parametrize("pattern", ["identical", "distinct", "zipf", "skewed", "with_base"])
def test_one_token_segments_match_the_reference(lora, triton_device, pattern):
    """Decode steps under Punica's popularity patterns, with an empty segment thrown in."""
    generator = torch.Generator().manual_seed(len(pattern))
    num_tokens = 24
    choice = popularity(pattern, num_tokens, generator)
    adapters = make_adapters(max(choice) + 1, generator)
    segments = [Segment(t, t + 1, *adapters[a]) for t, a in enumerate(choice) if a >= 0]
    segments.append(Segment(5, 5, adapters[0][0], 1.0))
    plan = check_against_reference(lora, triton_device, segments, num_tokens, generator)
    # Tokens of one adapter share tiles even when they are not adjacent.
    per_adapter = [choice.count(a) for a in set(choice) - {-1}]
    assert plan.real_tiles == sum(-(-n // plan.block_m) for n in per_adapter)


@pytest.mark.parametrize("num_adapters", [64, 8])
def test_decode_batch_of_64_tokens(lora, triton_device, num_adapters):
    """64 decode tokens over 64 distinct adapters (one tile each) and over 8 (tokens pooled)."""
    generator = torch.Generator().manual_seed(num_adapters)
    adapters = make_adapters(num_adapters, generator)
    order = torch.randperm(64, generator=generator).tolist()
    segments = [Segment(t, t + 1, *adapters[order[t] % num_adapters]) for t in range(64)]
    plan = check_against_reference(lora, triton_device, segments, 64, generator, in_features=64, out_features=96)
    assert plan.real_tiles == num_adapters


@pytest.mark.parametrize("block_m", [16, 64])
def test_prefill_segments_longer_than_a_tile(lora, triton_device, block_m):
    """2-3 segments of 50-300 tokens with base-only gaps: several tiles per segment."""
    generator = torch.Generator().manual_seed(block_m)
    adapters = make_adapters(3, generator)
    segments = [Segment(0, 50, *adapters[0]), Segment(53, 353, *adapters[1]), Segment(360, 451, *adapters[2])]
    plan = check_against_reference(lora, triton_device, segments, 455, generator, in_features=40, out_features=48,
                                   block_m=block_m)
    assert plan.real_tiles == sum(-(-(s.end - s.start) // block_m) for s in segments)


@pytest.mark.parametrize("split_k", [None, 1, 3, 8])
def test_split_k_slices_of_in_features(lora, triton_device, split_k):
    """K slices of 32 over in=72 (the last one ragged, or past `in` and dropped), and the heuristic."""
    generator = torch.Generator().manual_seed(11)
    adapters = make_adapters(4, generator)
    segments = [Segment(0, 5, *adapters[0]), Segment(5, 6, *adapters[1]), Segment(8, 30, *adapters[2]),
                Segment(30, 31, *adapters[3])]
    check_against_reference(lora, triton_device, segments, 32, generator, block_k=16, block_n=64, split_k=split_k)


def test_strided_views_are_updated_in_place(lora, triton_device):
    """x and y as column slices of wider tensors (e.g. y inside a fused qkv output)."""
    generator = torch.Generator().manual_seed(5)
    adapters = make_adapters(3, generator)
    segments = [Segment(0, 7, *adapters[0]), Segment(9, 10, *adapters[1]), Segment(10, 14, *adapters[2])]
    a_pages, b_pages = pool(generator)
    wide_x = torch.randn(16, IN + 8, generator=generator)
    before = torch.randn(16, OUT + 30, generator=generator)
    wide_y = before.to(triton_device, copy=True)
    x, y = wide_x.to(triton_device)[:, 8:], wide_y[:, 10:10 + OUT]  # sliced where the kernels run
    plan = lora.build_lora_plan(segments, 16, triton_device)
    assert lora.lora_shrink_expand(y, x, a_pages.to(triton_device), b_pages.to(triton_device), plan) is y
    wide_y = wide_y.cpu()
    expected = lora_segments(before[:, 10:10 + OUT].clone(), wide_x[:, 8:], a_pages, b_pages, segments)
    torch.testing.assert_close(wide_y[:, 10:10 + OUT], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(wide_y[:, :10], before[:, :10]) and torch.equal(wide_y[:, 10 + OUT:], before[:, 10 + OUT:])


def test_per_token_plan_matches_lora_tokens(lora, triton_device):
    generator = torch.Generator().manual_seed(3)
    adapters = make_adapters(5, generator, max_rank=20)
    choice = [-1, 0, 1, 0, 2, -1, 3, 3, 4, 1, 0, -1]
    segments = [Segment(t, t + 1, *adapters[a]) for t, a in enumerate(choice) if a >= 0]
    token_pages, token_scales = segments_to_tokens(segments, len(choice))
    a_pages, b_pages = pool(generator)
    x = torch.randn(len(choice), IN, generator=generator)
    base = torch.randn(len(choice), OUT, generator=generator)
    plan = lora.plan_from_token_pages(token_pages.to(triton_device), token_scales.to(triton_device))
    assert plan.real_tiles == 5
    got = launch(lora, base.clone(), x, a_pages, b_pages, plan)
    expected = lora_tokens(base.clone(), x, a_pages, b_pages, token_pages, token_scales)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_fixed_capacity_plan_pads_with_empty_tiles(lora, triton_device):
    """A graph-shaped plan (max_tiles, block_r fixed) gives the same result as a tight one."""
    generator = torch.Generator().manual_seed(8)
    adapters = make_adapters(3, generator, max_rank=8)
    segments = [Segment(0, 20, *adapters[0]), Segment(20, 21, *adapters[1]), Segment(22, 23, *adapters[2])]
    capacity = lora.max_tiles_for(24, max_adapters=8)
    padded = lora.build_lora_plan(segments, 24, triton_device, block_r=64, max_tiles=capacity)
    assert (padded.num_tiles, padded.real_tiles, padded.block_r) == (capacity, 4, 64)
    assert padded.tile_sizes[4:].eq(0).all() and padded.tile_rows[4:].eq(-1).all()
    a_pages, b_pages = pool(generator)
    x = torch.randn(24, IN, generator=generator)
    base = torch.randn(24, OUT, generator=generator)
    tight = lora.build_lora_plan(segments, 24, triton_device)
    got = launch(lora, base.clone(), x, a_pages, b_pages, padded)
    torch.testing.assert_close(got, launch(lora, base.clone(), x, a_pages, b_pages, tight), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_tiles"):
        lora.build_lora_plan(segments, 24, triton_device, max_tiles=3)


BF16_IN_INTERPRETER = ("triton 3.6's interpreter keeps bfloat16 as uint16 (numpy has none) and tl.dot multiplies "
                       "the raw bits; bf16 is covered by test_triton_lora_compile.py and on the GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_update_y_in_its_dtype(lora, triton_device, dtype):
    if dtype == torch.bfloat16 and triton_device == "cpu":
        pytest.skip(BF16_IN_INTERPRETER)
    generator = torch.Generator().manual_seed(13)
    adapters = make_adapters(3, generator)
    segments = [Segment(0, 9, *adapters[0]), Segment(9, 10, *adapters[1]), Segment(12, 16, *adapters[2])]
    a_pages, b_pages = (t.to(dtype) for t in pool(generator))
    x = torch.randn(16, IN, generator=generator).to(dtype)
    base = torch.randn(16, OUT, generator=generator).to(dtype)
    plan = lora.build_lora_plan(segments, 16, triton_device)
    got = launch(lora, base.clone(), x, a_pages, b_pages, plan)
    assert got.dtype == dtype
    expected = lora_segments(base.double(), x.double(), a_pages.double(), b_pages.double(), segments)
    # The shrunk values are rounded to `dtype` before the expand, like PEFT's lora_A output.
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=5e-2)
    assert torch.equal(got[10:12], base[10:12]) and torch.equal(got[16:], base[16:])


def test_no_segments_leaves_y_alone(lora, triton_device):
    a_pages, b_pages = pool(torch.Generator().manual_seed(0))
    y = torch.randn(4, OUT)
    plan = lora.build_lora_plan([Segment(2, 2, torch.tensor([1]), 1.0)], 4, triton_device)
    assert plan.num_tiles == 0
    assert torch.equal(launch(lora, y.clone(), torch.randn(4, IN), a_pages, b_pages, plan), y)


def test_per_step_integers_are_left_unspecialized(triton_device):
    """The tile count and the split differ from step to step; specialized, each first 1, multiple
    of 16 or other value would compile a new kernel in the middle of serving."""
    from services.inference.kernels import triton_lora_kernels as kernels

    for name, args in kernels.STEP_VARYING_ARGS.items():
        kernel = getattr(kernels, name)
        assert set(args) <= set(kernel.arg_names), (name, args)
        assert set(args) <= unspecialized(kernel), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts the kernels Triton compiled: needs a GPU")
def test_steps_of_any_tile_count_and_split_reuse_the_compiled_kernels(lora):
    from services.inference.kernels import triton_lora_kernels as kernels

    generator = torch.Generator().manual_seed(3)
    adapters = make_adapters(48, generator, max_rank=16)  # block_r 16 in every step

    def step(num_tiles: int, split_k: int) -> None:
        segments = [Segment(t, t + 1, *adapters[t]) for t in range(num_tiles)]
        check_against_reference(lora, "cuda", segments, num_tiles, generator, split_k=split_k)

    step(7, 3)
    before = [compiled_variants(kernels.lora_shrink_kernel), compiled_variants(kernels.lora_expand_kernel)]
    for num_tiles, split_k in ((1, 1), (16, 3), (48, 2), (16, 1), (5, 16)):
        step(num_tiles, split_k)
    assert [compiled_variants(kernels.lora_shrink_kernel), compiled_variants(kernels.lora_expand_kernel)] == before


def test_plan_rejects_what_the_kernels_cannot_do():
    from services.inference.kernels.triton_lora import build_lora_plan

    pages = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="overlaps"):
        build_lora_plan([Segment(0, 4, pages, 1.0), Segment(3, 5, pages, 1.0)], 8, "cpu")
    with pytest.raises(ValueError, match="outside"):
        build_lora_plan([Segment(6, 9, pages, 1.0)], 8, "cpu")
    with pytest.raises(ValueError, match="block_m"):
        build_lora_plan([Segment(0, 4, pages, 1.0)], 8, "cpu", block_m=24)
    with pytest.raises(ValueError, match="block_r"):
        build_lora_plan([Segment(0, 4, torch.arange(20), 1.0)], 8, "cpu", block_r=16)


def test_plan_builder_imports_without_triton():
    """CPU users without triton can import the module and build plans; only launching needs it."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from services.inference.kernels import triton_lora as m\n"
            "from services.inference.kernels.reference import Segment\n"
            "assert not m.triton_available()\n"
            "assert m.build_lora_plan([Segment(0, 2, torch.tensor([3]), 1.0)], 2, 'cpu').real_tiles == 1\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=REPO_ROOT)

