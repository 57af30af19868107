"""Overlapped decode steps (engine/overlap.py): a step queued before the last one's tokens are
read gives every request exactly what the step-by-step engine gives it — tokens, logprobs,
text, finish reason — through EOS, stop strings, length limits, aborts while a step is in
flight, arrivals, preemption, and requests that must not be run ahead (penalties). Run
eagerly on CPU here; the graphed step (CUDA graphs, or their static twin) is in test_oracle.py.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch

from services.inference.engine import decode_graphs, sampler
from services.inference.engine.decode_graphs import CAPTURE
from services.inference.engine.sampling_params import SamplingParams
from tests.inference.test_engine_pressure import KEYS, make_engine, random_prompts, run, sampled_of, tokens_of
from tests.inference.test_engine_pressure import adapters  # noqa: F401 - the fixture

ROOMY = dict(num_blocks=256, budget=512, max_context=96)


def outcome(results) -> list[tuple]:
    """What a client sees of each request, logprobs aside (see same)."""
    return [(tokens_of(outputs), "".join(o.text for o in outputs), outputs[-1].finish_reason,
             outputs[-1].matched_stop, outputs[-1].completion_tokens,
             [(s.token_id, s.logprob is None, [t for t, _ in s.top]) for s in sampled_of(outputs)])
            for outputs in results]


def same(results, expected) -> bool:
    """The same outcome, and logprobs within 1e-5: a batch of another size sums in another
    order, which moves them by ~1e-6."""
    if outcome(results) != outcome(expected):
        return False
    pairs = [(a, b) for ours, theirs in zip(results, expected) for a, b in zip(sampled_of(ours), sampled_of(theirs))]
    return all(a.logprob is None or abs(a.logprob - b.logprob) < 1e-5 for a, b in pairs) and \
        all(abs(x - y) < 1e-5 for a, b in pairs for (_, x), (_, y) in zip(a.top, b.top))


def both_ways(base, adapters, requests, **engine_kwargs):
    """The requests through the step-by-step engine and the overlapped one."""
    stepwise = run(make_engine(base, adapters, **engine_kwargs), requests)
    engine = make_engine(base, adapters, overlap=True, **engine_kwargs)
    return stepwise, run(engine, requests), engine


def mixed_requests(eos_id: int) -> list[tuple]:
    """Every adapter and the base model; greedy and seeded draws, logprobs, lengths from 1 to
    20 tokens, a request that stops at EOS on its first token."""
    prompts = random_prompts(10, seed=21, lengths=(3, 20))
    requests = []
    for i, prompt in enumerate(prompts):
        sampling = SamplingParams(max_tokens=(20, 7, 12, 1, 16, 3, 20, 9, 14, 5)[i], ignore_eos=True,
                                  temperature=0.0 if i % 2 else 0.8, seed=300 + i, logprobs=i % 3 == 0,
                                  top_logprobs=2 if i % 4 == 0 else 0)
        requests.append((prompt, sampling, KEYS[i % len(KEYS)]))
    eos_first = SamplingParams(max_tokens=10, temperature=0.0, logit_bias=((eos_id, 100.0),))
    return requests + [(prompts[0], eos_first, "fin")]


def test_overlapped_steps_give_what_the_step_by_step_engine_gives(tiny_model_dir, adapters):
    eos_id = min(make_engine(tiny_model_dir, adapters, **ROOMY).scheduler.eos_token_ids)
    requests = mixed_requests(eos_id)
    stepwise, overlapped, engine = both_ways(tiny_model_dir, adapters, requests, **ROOMY)
    assert same(overlapped, stepwise)
    assert engine.overlapped_steps >= 15  # 20 decode steps, all but the last few queued ahead
    assert tokens_of(overlapped[-1]) == [eos_id] and overlapped[-1][-1].finish_reason.name == "STOP"


def test_a_stop_string_ends_a_request_whose_next_step_is_already_queued(tiny_model_dir, adapters):
    """The stop string is seen after the next step was queued: that step's row is dropped."""
    prompt, greedy = random_prompts(1, seed=22, lengths=(8, 8))[0], SamplingParams(max_tokens=24, temperature=0.0,
                                                                                    ignore_eos=True)
    free = run(make_engine(tiny_model_dir, adapters, **ROOMY), [(prompt, greedy, "legal")])[0]
    text = "".join(o.text for o in free)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip() and len(free) == 24
    requests = [(prompt, dataclasses.replace(greedy, stop=(stop,)), "legal"), (prompt, greedy, "fin")]
    stepwise, overlapped, engine = both_ways(tiny_model_dir, adapters, requests, **ROOMY)
    assert same(overlapped, stepwise)
    assert overlapped[0][-1].matched_stop == stop and len(tokens_of(overlapped[0])) < 24
    assert engine.overlapped_steps > 0


def test_an_abort_while_a_step_is_in_flight_drops_only_that_request(tiny_model_dir, adapters):
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=True)
    requests = [(prompt, greedy, KEYS[i]) for i, prompt in enumerate(random_prompts(4, seed=23, lengths=(4, 12)))]
    alone = run(make_engine(tiny_model_dir, adapters, **ROOMY), requests[:1] + requests[2:])
    engine = make_engine(tiny_model_dir, adapters, overlap=True, **ROOMY)
    ids = [engine.add(prompt, sampling, key) for prompt, sampling, key in requests]
    outputs = {seq_id: [] for seq_id in ids}
    while not (engine.has_step_in_flight and outputs[ids[1]]):
        for output in engine.step():
            outputs[output.seq_id].append(output)
    before = len(outputs[ids[1]])
    engine.abort(ids[1])  # its row is in the queued step
    while engine.has_work:
        for output in engine.step():
            outputs[output.seq_id].append(output)
    assert len(outputs[ids[1]]) == before
    assert same([outputs[i] for i in ids[:1] + ids[2:]], alone)
    manager = engine.scheduler.block_manager
    assert manager.num_free_blocks == manager.num_blocks
    assert all(adapter.refs == 0 for adapter in engine.runner.pool.resident())


def test_a_request_arriving_mid_run_is_admitted_and_runs_as_if_alone(tiny_model_dir, adapters):
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    first, late = random_prompts(2, seed=24, lengths=(5, 10))
    alone = run(make_engine(tiny_model_dir, adapters, **ROOMY), [(first, greedy, "fin"), (late, greedy, "health")])
    engine = make_engine(tiny_model_dir, adapters, overlap=True, **ROOMY)
    first_id = engine.add(first, greedy, "fin")
    outputs = {first_id: []}
    for _ in range(4):
        for output in engine.step():
            outputs[output.seq_id].append(output)
    assert engine.has_step_in_flight
    late_id = engine.add(late, greedy, "health")
    outputs[late_id] = []
    while engine.has_work:
        for output in engine.step():
            outputs[output.seq_id].append(output)
    assert same([outputs[first_id], outputs[late_id]], alone)
    assert engine.overlapped_steps >= 12  # overlap resumes once the newcomer decodes too


def test_preemption_and_chunked_prefill_with_overlap_on(tiny_model_dir, adapters):
    """A cache too small for the load: steps run ahead only when the KV for them is free."""
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=True)
    requests = [(prompt, greedy, KEYS[i % len(KEYS)])
                for i, prompt in enumerate(random_prompts(8, seed=25, lengths=(5, 30)))]
    stepwise, overlapped, engine = both_ways(tiny_model_dir, adapters, requests, num_blocks=24, budget=12,
                                             max_context=96)
    assert same(overlapped, stepwise)
    assert engine.scheduler.num_preemptions > 0 and engine.overlapped_steps > 0


def test_requests_with_penalties_are_never_run_ahead(tiny_model_dir, adapters):
    """A penalty counts the last token on the host: the next logits must wait for it."""
    penalized = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, repetition_penalty=1.3,
                               frequency_penalty=0.5)
    requests = [(prompt, penalized, key) for prompt, key in zip(random_prompts(2, seed=26, lengths=(4, 8)),
                                                                 ("fin", None))]
    stepwise, overlapped, engine = both_ways(tiny_model_dir, adapters, requests, **ROOMY)
    assert same(overlapped, stepwise)
    assert engine.overlapped_steps == 0


def test_prompt_blocks_published_while_running_ahead_serve_later_requests(tiny_model_dir, adapters):
    """Prefix caching names a full block by its tokens: blocks published by overlapped steps
    must hold real tokens' KV (never a reserved token's), or the second wave, reading them from
    the cache, would part from the step-by-step engine's tokens."""
    greedy = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, logprobs=True)
    wave = [(prompt, greedy, key) for prompt, key in zip(random_prompts(3, seed=27, lengths=(9, 17)),
                                                         ("fin", None, "legal"))]

    def two_waves(overlap: bool):
        engine = make_engine(tiny_model_dir, adapters, prefix_caching=True, overlap=overlap, **ROOMY)
        first = run(engine, wave)
        # the second wave's prompts are the first's whole answers: blocks written by decodes
        second = [(prompt + tokens_of(outputs), sampling, key)
                  for (prompt, sampling, key), outputs in zip(wave, first)]
        return engine, first + run(engine, second)

    _, stepwise = two_waves(overlap=False)
    engine, overlapped = two_waves(overlap=True)
    assert same(overlapped, stepwise)
    assert engine.overlapped_steps > 0 and all(outputs[-1].cached_prompt_tokens >= 16 for outputs in overlapped[3:])


def _event_waits() -> set[tuple[str, int]]:
    """The two places a step may wait: for its tokens' copy (sampler.py) and for the last
    upload to leave the graphs' pinned buffer (decode_graphs.py); both wait on an event."""
    return {(module.__file__, number) for module in (sampler, decode_graphs)
            for number, line in enumerate(Path(module.__file__).read_text().splitlines(), 1)
            if "_copied.synchronize()" in line}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
def test_overlapped_graphed_decode_steps_wait_for_nothing_but_their_tokens(tiny_model_dir, adapters):
    """Issue #8's "no host sync in the decode step": with CUDA's sync debug mode on, the decode
    steps (captured graphs, LoRA of every adapter, overlapped; logprobs, a logit bias and
    seeded draws) must not synchronize the stream anywhere but at the event waits; one stray
    sync would serialize host and GPU again."""
    engine = make_engine(tiny_model_dir, adapters, overlap=True, device="cuda", kernels="triton", graphs=CAPTURE,
                         max_graph_batch=16, **ROOMY)
    # Greedy rows with top logprobs, a logit bias, seeded top-k/top-p draws: each puts small lists
    # on the device every step, or ranks on it, and must not wait for the step queued before them.
    kinds = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3),
             SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logit_bias=((5, 2.0), (7, -3.0))),
             SamplingParams(max_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=3, ignore_eos=True)]
    for i, prompt in enumerate(random_prompts(len(KEYS), seed=28, lengths=(4, 12))):
        engine.add(prompt, kinds[i % len(kinds)], KEYS[i])
    engine.step()  # the prefills run eagerly and may wait: not a decode step
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            while engine.has_work:
                engine.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert engine.runner.steps["graph"] >= 10 and engine.overlapped_steps >= 9
    allowed = _event_waits()
    stray = [f"{Path(w.filename).name}:{w.lineno}: {w.message}" for w in caught
             if "synchroniz" in str(w.message) and (w.filename, w.lineno) not in allowed]
    assert not stray, "\n".join(stray)
