"""Prefix caching through the real engine on the tiny model: with it on, greedy tokens and
logprobs are those with it off (within TIE) and HF + peft's (teacher-forced, as in
test_engine_pressure.py), while the prompt tokens read from the cache are exactly those of the
full blocks that an earlier request of the same adapter wrote."""

from __future__ import annotations

from itertools import cycle

from services.inference.engine.sampling_params import SamplingParams
from tests.inference.test_engine_pressure import (BLOCK_SIZE, KEYS, TIE, Oracle, adapters, make_engine,  # noqa: F401
                                                  random_prompts, run, sampled_of, tokens_of)

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)


def assert_same_as_without_caching(plain, cached) -> None:
    for without, with_cache in zip(plain, cached, strict=True):
        assert tokens_of(with_cache) == tokens_of(without)
        for a, b in zip(sampled_of(without), sampled_of(with_cache), strict=True):
            assert abs(a.logprob - b.logprob) < TIE


def cached_tokens(outputs) -> int:
    return outputs[-1].cached_prompt_tokens


def test_a_long_shared_prefix_is_computed_once_per_adapter(tiny_model_dir, adapters):
    """Two requests warm the cache for the base model and fin; ten more with the same 38-token
    prefix follow, over those two and two adapters that must not read their blocks."""
    prefix = random_prompts(1, seed=5, lengths=(38, 38))[0]
    suffixes = random_prompts(12, seed=6, lengths=(1, 9))
    warm = [(prefix + suffixes[0], GREEDY, None), (prefix + suffixes[1], GREEDY, "fin")]
    rest = [(prefix + s, GREEDY, key) for s, key in zip(suffixes[2:], cycle((None, "fin", "legal", "rank1_q")))]

    def serve(prefix_caching: bool):
        engine = make_engine(tiny_model_dir, adapters, num_blocks=256, budget=64, max_context=96,
                             prefix_caching=prefix_caching)
        return engine, run(engine, warm) + run(engine, rest)

    plain_engine, plain = serve(False)
    engine, cached = serve(True)
    assert_same_as_without_caching(plain, cached)
    shared = len(prefix) // BLOCK_SIZE * BLOCK_SIZE
    assert [cached_tokens(o) for o in cached[:2]] == [0, 0]
    by_key = {}
    for (_, _, key), outputs in zip(rest, cached[2:]):
        by_key.setdefault(key, []).append(cached_tokens(outputs))
    assert by_key[None] == by_key["fin"] == [shared] * 3
    assert min(by_key["legal"]) == min(by_key["rank1_q"]) == 0  # nothing of theirs was cached before
    assert plain_engine.scheduler.block_manager.prompt_tokens_cached == 0
    assert engine.scheduler.block_manager.prompt_tokens_cached >= 6 * shared
    oracle = Oracle(tiny_model_dir, adapters)
    for (prompt, _, key), outputs in zip(warm + rest, cached):
        oracle.check(key, prompt, outputs, greedy=True)


def test_repeats_of_whole_block_prompts_and_of_a_reply_reuse_what_is_written(tiny_model_dir, adapters):
    """A 24-token prompt (six blocks) repeated reads five (its last token is computed); a
    26-token one reads six; a follow-up whose prompt holds the first reply reads that reply's
    blocks too (generated tokens' blocks are cached)."""
    whole, ragged = random_prompts(2, seed=7, lengths=(24, 26))
    whole, ragged = whole[:24], (ragged + whole)[:26]
    engine = make_engine(tiny_model_dir, adapters, num_blocks=64, budget=64, max_context=96, prefix_caching=True)
    first_whole, again_whole = run(engine, [(whole, GREEDY, "legal")]) + run(engine, [(whole, GREEDY, "legal")])
    first_ragged, again_ragged = run(engine, [(ragged, GREEDY, None)]) + run(engine, [(ragged, GREEDY, None)])
    follow_up = ragged + tokens_of(first_ragged)[:6]  # 32 tokens: 26 prompt + 6 generated
    (continued,) = run(engine, [(follow_up, GREEDY, None)])
    assert [cached_tokens(o) for o in (first_whole, again_whole, first_ragged, again_ragged, continued)] == \
        [0, 20, 0, 24, 28]
    assert_same_as_without_caching([first_whole, first_ragged], [again_whole, again_ragged])
    oracle = Oracle(tiny_model_dir, adapters)
    for prompt, key, outputs in ((whole, "legal", again_whole), (ragged, None, again_ragged),
                                 (follow_up, None, continued)):
        oracle.check(key, prompt, outputs, greedy=True)


def test_preempted_requests_sharing_prefixes_keep_their_tokens(tiny_model_dir, adapters):
    """A cache of 96 tokens for ~600, 12 tokens a step: requests over two prefixes and four
    adapters are preempted and resumed, partly from cached blocks."""
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)
    prefixes = random_prompts(2, seed=8, lengths=(16, 20))
    requests = [(prefixes[i % 2] + suffix, greedy, KEYS[i % 4])
                for i, suffix in enumerate(random_prompts(12, seed=9, lengths=(3, 12)))]
    plain = run(make_engine(tiny_model_dir, adapters, num_blocks=24, budget=12, max_context=96), requests)
    engine = make_engine(tiny_model_dir, adapters, num_blocks=24, budget=12, max_context=96, prefix_caching=True)
    cached = run(engine, requests)
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.block_manager.prompt_tokens_cached > 0
    assert_same_as_without_caching(plain, cached)
    oracle = Oracle(tiny_model_dir, adapters)
    for (prompt, _, key), outputs in zip(requests, cached):
        oracle.check(key, prompt, outputs, greedy=True)


def test_aborting_a_sharer_mid_prefill_leaves_the_prefix_to_the_others(tiny_model_dir, adapters):
    """The second request shares the first's 20-token prefix and is cancelled in the middle of
    its 30-token suffix; the first keeps decoding, a third repeats the second's prompt and
    reads the blocks the cancelled one wrote."""
    prefix, suffix = random_prompts(2, seed=10, lengths=(30, 30))
    prefix = prefix[:20]
    decoding = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=True)
    engine = make_engine(tiny_model_dir, adapters, num_blocks=64, budget=8, max_context=96, prefix_caching=True)
    blocks = engine.scheduler.block_manager
    outputs: dict[int, list] = {}
    first = engine.add(prefix + [7], decoding, "rank64_all")
    for step in range(8):
        if step == 4:  # the first has written its prompt and decodes
            second = engine.add(prefix + suffix, GREEDY, "rank64_all")
        if step == 6:
            assert blocks.prompt_tokens_cached == 20 and second not in outputs  # sharing, mid-prefill
            engine.abort(second)
            third = engine.add(prefix + suffix, GREEDY, "rank64_all")
        for output in engine.step():
            outputs.setdefault(output.seq_id, []).append(output)
    while engine.has_work:
        for output in engine.step():
            outputs.setdefault(output.seq_id, []).append(output)
    assert blocks.num_free_blocks == blocks.num_blocks
    assert second not in outputs and cached_tokens(outputs[third]) > 20
    oracle = Oracle(tiny_model_dir, adapters)
    oracle.check("rank64_all", prefix + [7], outputs[first], greedy=True)
    oracle.check("rank64_all", prefix + suffix, outputs[third], greedy=True)
