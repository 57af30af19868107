"""Sampler: greedy, top-k, top-p, seeds, the temperature distribution, logprobs."""

from __future__ import annotations

import math

import torch

from services.inference.engine.sampler import Sampler, make_generator
from services.inference.engine.sampling_params import SamplingParams

VOCAB = 50


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3  # [rows, V]


def sample_ids(logits, params, generators=None):
    generators = generators if generators is not None else [None] * len(params)
    return [s.token_id for s in Sampler().sample(logits, params, generators)]


def test_greedy_rows_take_the_argmax():
    logits = random_logits(6)
    assert sample_ids(logits, [SamplingParams(temperature=0.0)] * 6) == logits.argmax(-1).tolist()


def test_top_k_one_equals_greedy_at_any_temperature():
    logits = random_logits(6)
    params = [SamplingParams(temperature=t, top_k=1) for t in (0.5, 1.0, 2.0, 5.0, 1.0, 0.1)]
    assert sample_ids(logits, params) == logits.argmax(-1).tolist()


def test_tiny_top_p_keeps_only_the_best_token():
    logits = random_logits(6)
    params = [SamplingParams(temperature=3.0, top_p=1e-6)] * 6
    for _ in range(5):
        assert sample_ids(logits, params) == logits.argmax(-1).tolist()


def test_top_k_samples_stay_within_the_k_best():
    logits = random_logits(1)
    allowed = set(logits[0].topk(3).indices.tolist())
    generator = make_generator(1)
    for _ in range(200):
        assert sample_ids(logits, [SamplingParams(temperature=5.0, top_k=3)], [generator])[0] in allowed


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    # probs 0.5, 0.3, 0.15, 0.05: top_p 0.7 needs the two best tokens, never the others.
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]])
    generator = make_generator(3)
    seen = {sample_ids(logits, [SamplingParams(top_p=0.7)], [generator])[0] for _ in range(300)}
    assert seen == {0, 1}


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = random_logits(1)
    params = [SamplingParams(temperature=1.0, seed=42)]

    def run(seed):
        generator = make_generator(seed)
        return [sample_ids(logits, params, [generator])[0] for _ in range(40)]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_seeded_row_is_independent_of_its_batch_neighbours():
    logits = random_logits(3)
    alone = [sample_ids(logits[1:2], [SamplingParams()], [make_generator(7)])[0]]
    together = sample_ids(logits, [SamplingParams(), SamplingParams(), SamplingParams(temperature=0.0)],
                          [make_generator(99), make_generator(7), None])
    assert together[1] == alone[0]


def test_unseeded_generators_and_huge_seeds_work():
    logits = random_logits(2)
    assert len(sample_ids(logits, [SamplingParams()] * 2)) == 2
    make_generator(2**64 - 1)  # a proto uint64 seed
    make_generator(-5)


def test_temperature_sampling_follows_the_softmax():
    logits = torch.tensor([[1.0, 0.0]])  # p(0) = sigmoid(1 / T)
    for temperature in (1.0, 2.0):
        generator = make_generator(123)
        ids = sample_ids(logits.repeat(2000, 1), [SamplingParams(temperature=temperature)] * 2000, [generator] * 2000)
        expected = 1 / (1 + math.exp(-1 / temperature))
        assert abs(ids.count(0) / 2000 - expected) < 0.05, (temperature, ids.count(0))


def test_logprobs_are_log_softmax_of_the_raw_logits():
    logits = random_logits(3)
    params = [SamplingParams(temperature=0.0, logprobs=True),
              SamplingParams(temperature=2.0, top_k=5, logprobs=True),
              SamplingParams(temperature=0.0)]
    results = Sampler().sample(logits, params, [None, make_generator(0), None])
    expected = torch.log_softmax(logits, dim=-1)
    for row in (0, 1):
        assert math.isclose(results[row].logprob, expected[row, results[row].token_id].item(), abs_tol=1e-6)
        assert results[row].top == []
    assert results[2].logprob is None and results[2].top == []


def test_top_logprobs_are_sorted_best_first_and_sized_per_row():
    logits = random_logits(2)
    results = Sampler().sample(logits, [SamplingParams(temperature=0.0, top_logprobs=5),
                                        SamplingParams(temperature=0.0, top_logprobs=2)], [None, None])
    expected = torch.log_softmax(logits, dim=-1)
    assert [len(r.top) for r in results] == [5, 2]
    for row, result in enumerate(results):
        values = [lp for _, lp in result.top]
        assert values == sorted(values, reverse=True)
        assert result.top[0][0] == result.token_id  # greedy: the chosen token is the best
        for token_id, logprob in result.top:
            assert math.isclose(logprob, expected[row, token_id].item(), abs_tol=1e-6)
        assert result.logprob is not None  # top_logprobs implies the chosen token's logprob


def test_top_logprobs_rank_like_sorting_by_value_then_token_id():
    """_top_logprobs against the plain ranking it must equal: by logprob, best first, ties by
    lowest id; values quantized so most rows tie many times, with positive and negative
    values, both zeros (equal), and -inf."""
    from services.inference.engine.sampler import _top_logprobs

    generator = torch.Generator().manual_seed(5)
    values = (torch.randn(6, 300, generator=generator) * 4).round() / 2  # [6, 300], many ties
    values[0, :40] = float("-inf")
    values[1] = -values[1].abs() - 1
    values[1, [3, 9]] = -0.0  # the best four
    values[1, [4, 8]] = 0.0
    values[2] = 0.0  # every token tied
    top_values, top_ids = _top_logprobs(values, 25)
    for row in range(values.shape[0]):
        expected = sorted(range(values.shape[1]), key=lambda t: (-values[row, t].item(), t))[:25]
        assert top_ids[row].tolist() == expected
        assert torch.equal(top_values[row], values[row, expected])


def test_rows_without_top_logprobs_do_not_shift_the_others():
    """Only the rows that ask are ranked (then put back in place): each row's list is the one
    it gets alone."""
    logits = random_logits(4)
    params = [SamplingParams(temperature=0.0, logprobs=True), SamplingParams(temperature=0.0, top_logprobs=3),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, top_logprobs=1)]
    together = Sampler().sample(logits, params, [None] * 4)
    for row, param in enumerate(params):
        alone = Sampler().sample(logits[row:row + 1], [param], [None])[0]
        assert together[row].top == alone.top and together[row].logprob == alone.logprob
    assert [len(result.top) for result in together] == [0, 3, 0, 1]


def test_tied_top_logprobs_list_the_lowest_token_id_first_like_greedy():
    """bf16 logits tie often (~1% of greedy steps on the tiny model). torch.topk orders equal
    values arbitrarily and may keep any of those tied at its last place; argmax takes the lowest
    id. Ties are listed in token-id order, so a greedy token tied for best is top_logprobs[0]."""
    logits = torch.zeros(2, 512)
    logits[0, [7, 100, 300]] = 1.0  # three tied for best: topk gave 300, 100, 7
    logits[1, 2] = 5.0
    logits[1, [10, 20, 30, 400]] = 3.0  # four tied for second: only the lowest ids fit in k
    params = [SamplingParams(temperature=0.0, top_logprobs=k) for k in (1, 3)]
    for row, expected in ((0, ([7], [7, 100, 300])), (1, ([2], [2, 10, 20]))):
        results = Sampler().sample(logits[[row, row]], params, [None, None])
        assert [r.token_id for r in results] == [expected[0][0]] * 2
        assert [[token_id for token_id, _ in r.top] for r in results] == list(expected)
        log_softmax = torch.log_softmax(logits[row], dim=-1)
        for token_id, logprob in results[1].top:
            assert math.isclose(logprob, log_softmax[token_id].item(), abs_tol=1e-6)
