"""One shrink and one expand launch for up to three projections that read the same x
(kernels/triton_lora.py: lora_shrink_expand_slices): each slice must equal its own
lora_shrink_expand on its columns of the fused output, with its own pages and plan, and leave
every other row and column bitwise alone. On CPU under TRITON_INTERPRET=1, compiled on a GPU."""

from __future__ import annotations

import pytest
import torch

from services.inference.kernels.reference import Segment, lora_segments
from tests.inference.test_triton_lora import make_adapters

IN, PAGES, TOKENS = 72, 4096, 11


@pytest.fixture
def lora(triton_device):
    from services.inference.kernels import triton_lora

    return triton_lora


def segments_of(adapters, owners: list[int]) -> list[Segment]:
    """One-token segments: token t uses adapters[owners[t]] (-1: base only)."""
    return [Segment(t, t + 1, *adapters[o]) for t, o in enumerate(owners) if o >= 0]


def run_slices(lora, device, outs, owners_per_slice, generator, **options):
    adapters = make_adapters(4, generator, max_rank=40)
    x = torch.randn(TOKENS, IN, generator=generator)
    y = torch.randn(TOKENS, sum(outs), generator=generator)
    columns = [sum(outs[:i]) for i in range(len(outs))]
    pieces, expected = [], y.double().clone()
    for out, column, owners in zip(outs, columns, owners_per_slice):
        a_pages = torch.randn(PAGES, IN, generator=generator) / IN ** 0.5
        b_pages = torch.randn(PAGES, out, generator=generator)
        segments = segments_of(adapters, owners)
        # The same capacity and rank padding for every slice, as a CUDA graph's plans have.
        plan = lora.build_lora_plan(segments, TOKENS, device, block_r=64, max_tiles=TOKENS)
        pieces.append(lora.LoraSlice(a_pages.to(device), b_pages.to(device), plan, column))
        part = expected[:, column:column + out]
        part.copy_(lora_segments(part.clone(), x.double(), a_pages.double(), b_pages.double(), segments))
    got = lora.lora_shrink_expand_slices(y.to(device), x.to(device), pieces, **options).cpu()
    return got, expected, y


@pytest.mark.parametrize("outs", [(200, 40, 40), (130, 130), (96,)])
def test_each_slice_is_its_own_lora_on_its_columns(lora, triton_device, outs):
    generator = torch.Generator().manual_seed(len(outs))
    everyone = [t % 4 for t in range(TOKENS)]
    some = [(t % 3) - 1 for t in range(TOKENS)]  # base-only rows, and one adapter absent
    nobody = [-1] * TOKENS  # a projection no adapter of the step targets
    owners = [everyone, some, nobody][:len(outs)]
    got, expected, y = run_slices(lora, triton_device, list(outs), owners, generator)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    if len(outs) == 3:
        assert torch.equal(got[:, 240:], y[:, 240:])  # the untargeted slice: bitwise untouched
    base_rows = [t for t in range(TOKENS) if some[t] < 0]
    if len(outs) >= 2:
        assert torch.equal(got[base_rows, outs[0]:outs[0] + outs[1]], y[base_rows, outs[0]:outs[0] + outs[1]])


@pytest.mark.parametrize("split_k", [1, 3])
def test_splits_of_the_shrink_sum_per_slice(lora, triton_device, split_k):
    generator = torch.Generator().manual_seed(split_k)
    owners = [[t % 4 for t in range(TOKENS)], [(t + 1) % 4 for t in range(TOKENS)]]
    got, expected, _ = run_slices(lora, triton_device, [64, 48], owners, generator, split_k=split_k, block_k=16)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("splits_per_load", [1, 2, 16])
def test_the_expands_split_loads_change_nothing(lora, triton_device, splits_per_load):
    """Five splits summed one, two (a remainder) or all sixteen slots at a time, with padding
    tiles throughout (capacity = tokens): all equal the reference."""
    generator = torch.Generator().manual_seed(splits_per_load)
    owners = [[t % 4 for t in range(TOKENS)], [(t % 3) - 1 for t in range(TOKENS)]]
    got, expected, y = run_slices(lora, triton_device, [130, 40], owners, generator, split_k=5, block_k=16,
                                  block_n=16, splits_per_load=splits_per_load)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    base_rows = [t for t in range(TOKENS) if owners[1][t] < 0]
    assert torch.equal(got[base_rows, 130:], y[base_rows, 130:])


def test_splits_per_load_must_be_a_power_of_two(lora, triton_device):
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="splits_per_load must be a power of two"):
        run_slices(lora, triton_device, [32], [[0] * TOKENS], generator, splits_per_load=3)


def test_slices_that_cannot_share_a_launch_are_refused(lora, triton_device):
    generator = torch.Generator().manual_seed(0)
    adapters = make_adapters(2, generator)
    x, y = torch.randn(4, IN).to(triton_device), torch.zeros(4, 60).to(triton_device)
    a, b = torch.randn(PAGES, IN).to(triton_device), torch.randn(PAGES, 20).to(triton_device)
    plan = lora.build_lora_plan(segments_of(adapters, [0, 1, 0, 1]), 4, triton_device)
    smaller = lora.build_lora_plan(segments_of(adapters, [0, 0, 0, 0]), 4, triton_device)
    with pytest.raises(ValueError, match="1 to 3 slices"):
        lora.lora_shrink_expand_slices(y, x, [lora.LoraSlice(a, b, plan, 0)] * 4)
    with pytest.raises(ValueError, match="plans differ"):
        lora.lora_shrink_expand_slices(y, x, [lora.LoraSlice(a, b, plan, 0), lora.LoraSlice(a, b, smaller, 20)])
    with pytest.raises(ValueError, match="outside y"):
        lora.lora_shrink_expand_slices(y, x, [lora.LoraSlice(a, b, plan, 0), lora.LoraSlice(a, b, plan, 50)])
