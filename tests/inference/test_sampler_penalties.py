"""Penalties and logit bias in the Sampler, against a plain-Python twin (a loop over rows and
tokens) on random logits, for random mixes of rows with and without each option."""

from __future__ import annotations

import collections
import dataclasses
import math
import random

import pytest
import torch

from services.inference.engine.block_manager import BlockManager
from services.inference.engine.logits_processors import PenaltyCounts, RunningTokenCounts, process_logits
from services.inference.engine.sampler import Sampler, make_generator
from services.inference.engine.sampling_params import SamplingParams
from services.inference.engine.scheduler import AlwaysReadyGate, Scheduler, SchedulerConfig
from services.inference.engine.sequence import Sequence

VOCAB = 64


@dataclasses.dataclass
class History:
    token_ids: list[int]
    num_prompt_tokens: int
    penalty_counts: PenaltyCounts | None = None


def reference_logits(logits: torch.Tensor, params: list[SamplingParams], histories: list[History]) -> torch.Tensor:
    """The Sampler docstring's semantics, one row and one token at a time."""
    out = logits.clone()
    for i, (p, history) in enumerate(zip(params, histories)):
        row = out[i].tolist()
        if p.repetition_penalty != 1.0:
            for t in set(history.token_ids):
                row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
        generated = collections.Counter(history.token_ids[history.num_prompt_tokens:])
        for t, count in generated.items():
            row[t] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
        for t, bias in p.logit_bias:
            row[t] += bias
        out[i] = torch.tensor(row)
    return out


def random_row(rng: random.Random) -> tuple[SamplingParams, History]:
    """Each option present or absent at random; greedy or sampled; short or empty histories."""
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))]
    generated = [rng.randrange(VOCAB // 4) for _ in range(rng.randrange(0, 10))]  # few ids: repeats
    bias = {rng.randrange(VOCAB): rng.uniform(-100, 100) for _ in range(rng.randrange(4))} if rng.random() < 0.5 else {}
    params = SamplingParams.from_request(
        temperature=rng.choice([0.0, 0.8, 1.5]), top_k=rng.choice([0, 5]),
        presence_penalty=rng.uniform(-2, 2) if rng.random() < 0.5 else None,
        frequency_penalty=rng.uniform(-2, 2) if rng.random() < 0.5 else None,
        repetition_penalty=rng.uniform(0.5, 2.0) if rng.random() < 0.5 else None, logit_bias=bias)
    return params, History(prompt + generated, len(prompt))


def without_options(params: SamplingParams) -> SamplingParams:
    return dataclasses.replace(params, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0,
                               logit_bias=())


def random_batch(seed: int, rows: int = 12):
    """Every third row without any option, the others with a random mix."""
    rng = random.Random(seed)
    params, histories = map(list, zip(*[random_row(rng) for _ in range(rows)]))
    params = [without_options(p) if i % 3 == 0 else p for i, p in enumerate(params)]
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3  # [rows, V]
    return logits, params, histories


@pytest.mark.parametrize("seed", range(8))
def test_processed_logits_equal_the_plain_reference(seed):
    logits, params, histories = random_batch(seed)
    assert any(p.processes_logits for p in params) and not all(p.processes_logits for p in params)
    expected = reference_logits(logits, params, histories)
    torch.testing.assert_close(process_logits(logits, params, histories), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("seed", range(8))
def test_tokens_are_drawn_from_the_processed_logits(seed):
    """Greedy rows take the reference's argmax; a seeded sampled row draws what it draws from the
    reference's logits given as raw logits with no options: the same tokens, the same way."""
    logits, params, histories = random_batch(seed)
    expected = reference_logits(logits, params, histories)
    plain = [without_options(p) for p in params]
    ours = Sampler().sample(logits, params, [make_generator(i) for i in range(len(params))], histories)
    theirs = Sampler().sample(expected, plain, [make_generator(i) for i in range(len(params))])
    for i, p in enumerate(params):
        if p.is_greedy:
            assert expected[i, ours[i].token_id] >= expected[i].max() - 1e-4  # argmax, float rounding aside
        else:
            assert ours[i].token_id == theirs[i].token_id


def test_logprobs_stay_those_of_the_raw_logits():
    logits, params, histories = random_batch(3)
    params = [dataclasses.replace(p, top_logprobs=4) for p in params]
    results = Sampler().sample(logits, params, [make_generator(i) for i in range(len(params))], histories)
    raw = torch.log_softmax(logits, dim=-1)
    for i, result in enumerate(results):
        assert math.isclose(result.logprob, raw[i, result.token_id].item(), abs_tol=1e-5)
        assert [t for t, _ in result.top] == raw[i].topk(4).indices.tolist()


def test_a_row_without_options_is_unaffected_by_its_neighbours():
    logits, params, histories = random_batch(5)
    params[0] = SamplingParams(temperature=0.9, seed=11)
    params[1] = SamplingParams(temperature=0.0)
    processed = process_logits(logits, params, histories)
    assert torch.equal(processed[:2], logits[:2])
    together = Sampler().sample(logits, params, [make_generator(11)] + [None] * (len(params) - 1), histories)
    alone = Sampler().sample(logits[:2], params[:2], [make_generator(11), None])
    assert [t.token_id for t in together[:2]] == [t.token_id for t in alone]


def test_a_batch_without_options_is_returned_untouched_not_copied():
    logits = torch.randn(4, VOCAB)
    assert process_logits(logits, [SamplingParams()] * 4, None) is logits


def test_bias_alone_needs_no_history_but_penalties_do():
    logits = torch.zeros(2, VOCAB)
    biased = process_logits(logits, [SamplingParams(logit_bias=((7, 5.0),)), SamplingParams()], None)
    assert biased[0, 7] == 5.0 and biased.sum() == 5.0 and logits.sum() == 0  # the input is left as it was
    with pytest.raises(ValueError):
        process_logits(logits, [SamplingParams(presence_penalty=1.0), SamplingParams()], None)


def test_greedy_follows_a_plus_100_bias_and_avoids_a_minus_100_one():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1).tolist()
    params = [SamplingParams(temperature=0.0, logit_bias=((5, 100.0),)),
              SamplingParams(temperature=0.0, logit_bias=((best[1], -100.0),))]
    chosen = [s.token_id for s in Sampler().sample(logits, params, [None, None])]
    assert chosen[0] == 5 and chosen[1] != best[1]


def test_penalties_count_generated_tokens_only_repetition_counts_the_prompt_too():
    logits = torch.full((3, VOCAB), 2.0)
    history = History([1, 1, 2, 3, 3, 3], num_prompt_tokens=2)  # prompt 1 1, generated 2 3 3 3
    params = [SamplingParams(frequency_penalty=0.5), SamplingParams(presence_penalty=0.5),
              SamplingParams(repetition_penalty=2.0)]
    processed = process_logits(logits, params, [history] * 3)
    assert processed[0, [1, 2, 3, 4]].tolist() == [2.0, 1.5, 0.5, 2.0]
    assert processed[1, [1, 2, 3, 4]].tolist() == [2.0, 1.5, 1.5, 2.0]
    assert processed[2, [1, 2, 3, 4]].tolist() == [1.0, 1.0, 1.0, 2.0]


def test_running_token_counts_match_a_counter_as_tokens_are_appended():
    token_ids = [3, 3, 1]
    running = RunningTokenCounts(1, VOCAB, torch.device("cpu"))
    for appended in ([], [0, 63], [63], [63, 3]):
        token_ids += appended
        counts = running.update(token_ids)
        assert counted(counts) == collections.Counter(token_ids[1:])


def test_counts_kept_across_steps_and_preemptions_match_a_count_from_scratch():
    """Four sequences growing to 20 tokens in a 32-token KV cache are preempted again and
    again; their counts, kept since their first sampled token, must stay those of their tokens."""
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16), BlockManager(8, 4),
                          AlwaysReadyGate(), eos_token_ids=set(), max_context=32)
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=12, ignore_eos=True, frequency_penalty=0.5, repetition_penalty=1.3)
    seqs = [Sequence(i, [rng.randrange(VOCAB) for _ in range(8)], params, block_size=4) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    while scheduler.has_unfinished:
        batch = scheduler.schedule()
        sampled = batch.sampled_seqs
        logits = torch.randn(len(sampled), VOCAB, generator=generator)
        processed = process_logits(logits, [params] * len(sampled), sampled)
        torch.testing.assert_close(processed, reference_logits(logits, [params] * len(sampled), sampled))
        for seq in sampled:
            counts = seq.penalty_counts
            assert counted(counts.generated.counts) == collections.Counter(seq.completion_token_ids)
            assert counted(counts.every.counts) == collections.Counter(seq.token_ids)
        scheduler.postprocess(batch, {s.seq_id: t for s, t in zip(sampled, processed.argmax(-1).tolist())})
    assert scheduler.num_preemptions > 0
    assert all(seq.penalty_counts is None for seq in seqs)  # freed on finish


def counted(counts: torch.Tensor) -> dict[int, int]:
    return {t: int(c) for t, c in enumerate(counts.tolist()) if c}
