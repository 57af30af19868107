"""The reference LoRA kernels: segment and per-token forms against a float64 loop written
straight from the DESIGN.md semantics, across adapter popularity patterns (Punica-style)."""

from __future__ import annotations

import pytest
import torch

from services.inference.kernels.reference import Segment, lora_segments, lora_tokens, segments_to_tokens

IN, OUT, PAGES = 48, 40, 256


def semantics(x, a_pages, b_pages, token_pages, token_scales):
    """s[t, j] = x[t]·A[p[t, j]];  y[t] = scale[t] Σ_j s[t, j] B[p[t, j]] — one token at a time."""
    y = torch.zeros(x.shape[0], b_pages.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for page in token_pages[t].tolist():
            if page >= 0:
                y[t] += token_scales[t].double() * (x[t].double() @ a_pages[page].double()) * b_pages[page].double()
    return y


def popularity(pattern: str, num_tokens: int, generator) -> list[int]:
    """Adapter index per token (-1 = base only), grouped so equal adapters are contiguous."""
    if pattern == "identical":
        choice = [0] * num_tokens
    elif pattern == "distinct":
        choice = list(range(num_tokens))
    elif pattern == "uniform":
        choice = torch.randint(0, 6, (num_tokens,), generator=generator).tolist()
    elif pattern == "zipf":
        weights = torch.tensor([1 / (k + 1) ** 1.2 for k in range(8)])
        choice = torch.multinomial(weights, num_tokens, replacement=True, generator=generator).tolist()
    elif pattern == "skewed":
        choice = [0] * (num_tokens - 3) + [1, 2, 3]
    else:
        choice = [-1 if t % 3 == 0 else t % 4 for t in range(num_tokens)]  # "with_base"
    return sorted(choice)


@pytest.mark.parametrize("pattern", ["identical", "distinct", "uniform", "zipf", "skewed", "with_base"])
def test_segment_and_token_forms_match_the_semantics(pattern):
    generator = torch.Generator().manual_seed(hash(pattern) % 1000)
    num_tokens = 24
    x = torch.randn(num_tokens, IN, generator=generator)
    a_pages = torch.randn(PAGES, IN, generator=generator)
    b_pages = torch.randn(PAGES, OUT, generator=generator)
    choice = popularity(pattern, num_tokens, generator)
    free = torch.randperm(PAGES, generator=generator).tolist()
    adapters = {}
    for adapter in sorted(set(choice) - {-1}):
        rank = int(torch.randint(1, 9, (1,), generator=generator))
        adapters[adapter] = (torch.tensor([free.pop() for _ in range(rank)]), float(torch.rand(1, generator=generator)) + 0.1)
    segments, start = [], 0
    for t in range(1, num_tokens + 1):
        if t == num_tokens or choice[t] != choice[start]:
            if choice[start] >= 0:
                pages, scale = adapters[choice[start]]
                segments.append(Segment(start, t, pages, scale))
            start = t
    segments.append(Segment(num_tokens, num_tokens, torch.tensor([0]), 1.0))  # empty segment: no-op
    token_pages, token_scales = segments_to_tokens(segments, num_tokens)
    expected = semantics(x, a_pages, b_pages, token_pages, token_scales)
    base = torch.randn(num_tokens, OUT, generator=generator)
    by_segments = lora_segments(base.clone(), x, a_pages, b_pages, segments)
    by_tokens = lora_tokens(base.clone(), x, a_pages, b_pages, token_pages, token_scales)
    torch.testing.assert_close(by_segments.double() - base.double(), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(by_tokens.double() - base.double(), expected, atol=1e-4, rtol=1e-5)
    base_only = [t for t in range(num_tokens) if choice[t] < 0]
    assert torch.equal(by_segments[base_only], base[base_only])


@pytest.mark.parametrize("pattern", ["identical", "distinct", "uniform", "zipf", "skewed", "with_base"])
def test_gathered_decode_form_matches_the_semantics(pattern):
    """One token per sequence (decode), ranks 1-16 mixed: the batched gather form used on CPU."""
    from services.inference.adapters.batch import gather_single_token_segments
    from services.inference.kernels.reference import lora_gathered

    generator = torch.Generator().manual_seed(len(pattern))
    num_tokens = 20
    x = torch.randn(num_tokens, IN, generator=generator)
    a_pages = torch.randn(PAGES, IN, generator=generator)
    b_pages = torch.randn(PAGES, OUT, generator=generator)
    choice = popularity(pattern, num_tokens, generator)
    free = torch.randperm(PAGES, generator=generator).tolist()
    adapters = {a: (torch.tensor([free.pop() for _ in range(int(torch.randint(1, 17, (1,), generator=generator)))]),
                    float(torch.rand(1, generator=generator)) + 0.1) for a in set(choice) - {-1}}
    segments = [Segment(t, t + 1, *adapters[a]) for t, a in enumerate(choice) if a >= 0]
    token_pages, token_scales = segments_to_tokens(segments, num_tokens)
    expected = semantics(x, a_pages, b_pages, token_pages, token_scales)
    gathered = gather_single_token_segments(segments)
    base = torch.randn(num_tokens, OUT, generator=generator)
    got = base.clone()
    if gathered is not None:
        lora_gathered(got, x, a_pages, b_pages, gathered.rows, gathered.pages, gathered.scales)
    torch.testing.assert_close(got.double() - base.double(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("pattern", ["identical", "distinct", "uniform", "zipf", "skewed", "with_base"])
def test_grouped_gemm_prefill_matches_the_reference(pattern):
    """Segments of 1-9 tokens, ranks 1-12, base-only gaps and empty segments."""
    from services.inference.kernels.grouped import lora_grouped

    generator = torch.Generator().manual_seed(7 + len(pattern))
    choice = popularity(pattern, 12, generator)
    free = torch.randperm(PAGES, generator=generator).tolist()
    segments, start = [], 0
    for adapter in choice:
        length = int(torch.randint(1, 10, (1,), generator=generator))
        if adapter >= 0:
            rank = int(torch.randint(1, 13, (1,), generator=generator))
            pages = torch.tensor([free.pop() for _ in range(rank)])
            segments.append(Segment(start, start + length, pages, float(torch.rand(1, generator=generator)) + 0.1))
        start += length
    segments.append(Segment(start, start, torch.tensor([0]), 1.0))
    x = torch.randn(start, IN, generator=generator)
    a_pages = torch.randn(PAGES, IN, generator=generator)
    b_pages = torch.randn(PAGES, OUT, generator=generator)
    base = torch.randn(start, OUT, generator=generator)
    expected = lora_segments(base.clone(), x, a_pages, b_pages, segments)
    got = lora_grouped(base.clone(), x, a_pages, b_pages, segments)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUTLASS grouped GEMM runs on a GPU")
def test_grouped_gemm_in_bfloat16_on_the_gpu_takes_any_rank():
    """Ranks 1..12 on CUTLASS's bf16 path (16-byte rows: the rank is padded to 8), Llama-like widths."""
    from services.inference.kernels.grouped import lora_grouped

    generator = torch.Generator().manual_seed(3)
    segments = [Segment(start, start + 37, torch.arange(64 * i, 64 * i + rank), 0.5 + i / 8)
                for i, (start, rank) in enumerate(zip(range(0, 12 * 40, 40), range(1, 13)))]
    a_pages = torch.randn(12 * 64, 512, generator=generator) / 512 ** 0.5
    b_pages = torch.randn(12 * 64, 256, generator=generator) * 0.1
    x, base = torch.randn(12 * 40, 512, generator=generator), torch.randn(12 * 40, 256, generator=generator)
    expected = lora_segments(base.double(), x.double(), a_pages.double(), b_pages.double(), segments)
    on_gpu = [t.to("cuda", torch.bfloat16) for t in (base, x, a_pages, b_pages)]
    got = lora_grouped(*on_gpu, [Segment(s.start, s.end, s.pages.cuda(), s.scale) for s in segments])
    torch.testing.assert_close(got.double().cpu(), expected, atol=5e-2, rtol=2e-2)
