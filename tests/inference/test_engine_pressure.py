"""The engine under pressure against HF transformers + peft: a KV cache far too small for the
load (preemption by recompute, again and again), prompts longer than the token budget (chunked
prefill), prompts at the context limit, a cancel in the middle of a chunked prefill, and mixed
batches of the base model and adapters of ranks 1 (q_proj only) to 64 (all seven projections).

The oracle is teacher-forced: HF + peft scores each request's prompt plus our tokens in one
forward; a greedy token must be HF's argmax there (or within TIE of it) — by induction, HF's
own greedy continuation — and every logprob must be HF's log_softmax. After every scenario
all KV blocks are free again and no adapter is referenced.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.inference.adapters.pool import AdapterPool
from services.inference.adapters.weights import load_adapter_folder
from services.inference.engine.block_manager import BlockManager
from services.inference.engine.llm_engine import LLMEngine
from services.inference.engine.model_runner import ModelRunner
from services.inference.engine.sampling_params import UNTIL_CONTEXT_FULL, SamplingParams
from services.inference.engine.scheduler import Admission, Scheduler, SchedulerConfig
from services.inference.model.loader import load_model
from tests.inference.peft_adapters import ALL_MODULES, AdapterSpec, build_peft_adapter

TIE = 1e-4
BLOCK_SIZE = 4
EXTREME_SPECS = (AdapterSpec("rank1_q", 1, 2, ("q_proj",), seed=11),  # the smallest adapter, one module
                 AdapterSpec("rank64_all", 64, 64, ALL_MODULES, seed=12))  # the node's default max rank
KEYS = (None, "rank1_q", "rank64_all", "fin", "legal", "health", "travel")


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, varied_adapters, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("extreme-adapters")
    extreme = {spec.name: build_peft_adapter(tiny_model_dir, root / spec.name, spec, std=0.05) for spec in EXTREME_SPECS}
    return {**varied_adapters, **extreme}


class PoolGate:
    """Every adapter is resident: admission takes a pool reference, finishing returns it."""

    def __init__(self, pool: AdapterPool) -> None:
        self.pool = pool

    def try_acquire(self, adapter_key: str, sha256: str = "") -> Admission:
        self.pool.acquire(adapter_key)
        return Admission.ADMITTED

    def release(self, adapter_key: str) -> None:
        self.pool.release(adapter_key)

    def resident_sha256(self, adapter_key: str) -> str | None:
        return self.pool.get(adapter_key).sha256


def make_engine(base: Path, adapters: dict[str, Path], num_blocks: int, budget: int, max_context: int,
                prefix_caching: bool = False, overlap: bool = False, **runner_options) -> LLMEngine:
    """runner_options: ModelRunner's device, kernels, graphs... (default: float32 PyTorch on CPU)."""
    device = runner_options.get("device", "cpu")
    model, args = load_model(base, device=device)
    pool = AdapterPool(args, num_pages=160, device=device)
    for key in KEYS[1:]:
        pool.load(key, load_adapter_folder(adapters[key], args))
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=budget),
                          BlockManager(num_blocks, BLOCK_SIZE, prefix_caching), PoolGate(pool), set(args.eos_token_ids),
                          max_context)
    runner = ModelRunner(model, pool, num_blocks, BLOCK_SIZE, **runner_options)
    return LLMEngine(runner, scheduler, AutoTokenizer.from_pretrained(base), BLOCK_SIZE, overlap=overlap)


def run(engine: LLMEngine, requests, abort: tuple[int, int] | None = None) -> list[list]:
    """requests: (prompt ids, SamplingParams, adapter key); abort: (request index, after that
    many steps). Returns each request's outputs; checks that everything was given back."""
    ids = [engine.add(prompt, sampling, key) for prompt, sampling, key in requests]
    outputs = {seq_id: [] for seq_id in ids}
    steps = 0
    while engine.has_work:
        if abort is not None and steps == abort[1]:
            engine.abort(ids[abort[0]])
        for output in engine.step():
            outputs[output.seq_id].append(output)
        steps += 1
        assert steps < 5000, "no progress"
    block_manager = engine.scheduler.block_manager
    assert block_manager.num_free_blocks == block_manager.num_blocks
    assert all(adapter.refs == 0 for adapter in engine.runner.pool.resident())
    return [outputs[seq_id] for seq_id in ids]


def tokens_of(outputs) -> list[int]:
    return [t for output in outputs for t in output.token_ids]


def sampled_of(outputs) -> list:
    return [s for output in outputs for s in output.logprobs]


class Oracle:
    def __init__(self, base: Path, adapters: dict[str, Path]) -> None:
        self.base, self.adapters, self.models = base, adapters, {}

    def logprobs(self, key: str | None, prompt: list[int], tokens: list[int]) -> torch.Tensor:
        """log p(· | prompt + tokens[:i]) for each generated position i: [len(tokens), V]."""
        if key not in self.models:
            model = AutoModelForCausalLM.from_pretrained(self.base)
            self.models[key] = (PeftModel.from_pretrained(model, self.adapters[key]) if key else model).eval()
        with torch.no_grad():
            logits = self.models[key](torch.tensor([prompt + tokens])).logits[0].float()
        return torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)

    def check(self, key: str | None, prompt: list[int], outputs, greedy: bool) -> None:
        tokens, sampled = tokens_of(outputs), sampled_of(outputs)
        expected = self.logprobs(key, prompt, tokens)
        for step, (token, got) in enumerate(zip(tokens, sampled, strict=True)):
            where = f"{key or 'base'}, prompt of {len(prompt)}, step {step}"
            if greedy:
                assert float(expected[step].max() - expected[step, token]) < TIE, f"{where}: not HF's greedy token"
            assert abs(got.logprob - float(expected[step, token])) < TIE, where
            for top_id, top_logprob in got.top:
                assert abs(top_logprob - float(expected[step, top_id])) < TIE, where
            if got.top:
                assert {t for t, _ in got.top} == set(expected[step].topk(len(got.top)).indices.tolist()), where


def random_prompts(count: int, seed: int, lengths: tuple[int, int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(6, 500) for _ in range(rng.randint(*lengths))] for _ in range(count)]


def test_preempted_and_chunked_requests_keep_the_oracle_tokens(tiny_model_dir, adapters):
    """12 requests, 7 adapters (and none), a cache of 96 tokens for ~800 and a budget of 12
    tokens a step: sequences are preempted and recomputed in chunks many times over."""
    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)
    requests = [(prompt, greedy, KEYS[i % len(KEYS)])
                for i, prompt in enumerate(random_prompts(12, seed=1, lengths=(5, 40)))]
    assert max(len(prompt) for prompt, _, _ in requests) > 12  # some prompts need several chunks
    engine = make_engine(tiny_model_dir, adapters, num_blocks=24, budget=12, max_context=96)
    results = run(engine, requests)
    assert engine.scheduler.num_preemptions >= len(requests)
    oracle = Oracle(tiny_model_dir, adapters)
    for (prompt, _, key), outputs in zip(requests, results):
        assert len(tokens_of(outputs)) == 30
        oracle.check(key, prompt, outputs, greedy=True)


SAMPLING = (dict(temperature=1.5, top_k=1), dict(temperature=0.8, top_p=1e-6), dict(temperature=1.0),
            dict(temperature=0.6, top_k=3, top_p=0.8), dict(temperature=2.0, top_p=0.95), dict(temperature=0.7, top_k=50))


def test_seeded_sampling_is_the_same_with_preemption_and_any_neighbours(tiny_model_dir, adapters):
    """A seeded request draws the same tokens whether it runs alone, in a batch with room, or
    preempted and recomputed; top_k=1 and a tiny top_p are greedy; logprobs are HF's."""
    requests = [(prompt, SamplingParams(max_tokens=25, seed=100 + i, ignore_eos=True, top_logprobs=3,
                                        **SAMPLING[i % len(SAMPLING)]), KEYS[i % len(KEYS)])
                for i, prompt in enumerate(random_prompts(12, seed=2, lengths=(3, 30)))]
    roomy = run(make_engine(tiny_model_dir, adapters, num_blocks=256, budget=512, max_context=96), requests)
    tight_engine = make_engine(tiny_model_dir, adapters, num_blocks=24, budget=10, max_context=96)
    tight = run(tight_engine, requests)
    assert tight_engine.scheduler.num_preemptions > 0
    assert [tokens_of(o) for o in tight] == [tokens_of(o) for o in roomy]
    alone = run(make_engine(tiny_model_dir, adapters, num_blocks=256, budget=512, max_context=96), requests[4:5])
    assert tokens_of(alone[0]) == tokens_of(roomy[4])
    oracle = Oracle(tiny_model_dir, adapters)
    for i, ((prompt, sampling, key), outputs) in enumerate(zip(requests, tight)):
        oracle.check(key, prompt, outputs, greedy=i % len(SAMPLING) < 2)
    assert len({tuple(tokens_of(o)) for o in tight}) == len(requests)  # the draws are not all greedy


def test_prompts_at_the_context_limit_fill_it_exactly(tiny_model_dir, adapters):
    """Prompts of max_context - 1 and - 2 tokens (and short ones run to the end of the context),
    chunked and preempted, give exactly the room left, finish with LENGTH and HF's tokens."""
    max_context = 48
    prompts = random_prompts(1, seed=3, lengths=(47, 47))[0]
    lengths = (47, 46, 40, 10, 1, 47)
    requests = [(prompts[:n], SamplingParams(max_tokens=UNTIL_CONTEXT_FULL, temperature=0.0, ignore_eos=True,
                                             logprobs=True).validate(n, max_context), KEYS[i % 3])
                for i, n in enumerate(lengths)]
    engine = make_engine(tiny_model_dir, adapters, num_blocks=12, budget=5, max_context=max_context)
    results = run(engine, requests)
    assert engine.scheduler.num_preemptions > 0
    oracle = Oracle(tiny_model_dir, adapters)
    for (prompt, _, key), outputs in zip(requests, results):
        assert len(prompt) + len(tokens_of(outputs)) == max_context
        assert outputs[-1].finish_reason.name == "LENGTH"
        assert outputs[-1].completion_tokens == max_context - len(prompt)
        oracle.check(key, prompt, outputs, greedy=True)


def test_a_request_cancelled_mid_chunked_prefill_gives_everything_back(tiny_model_dir, adapters):
    """A 60-token prompt prefilled 8 tokens a step is cancelled after 3 steps: its blocks and
    its rank-64 adapter reference return at once (run checks), and its neighbour is untouched."""
    long_prompt, short_prompt = random_prompts(2, seed=4, lengths=(60, 60))
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=True)
    requests = [(long_prompt, greedy, "rank64_all"), (short_prompt[:9], greedy, "rank1_q")]
    engine = make_engine(tiny_model_dir, adapters, num_blocks=64, budget=8, max_context=96)
    results = run(engine, requests, abort=(0, 3))
    assert results[0] == []  # no token: it never finished its prefill
    Oracle(tiny_model_dir, adapters).check("rank1_q", short_prompt[:9], results[1], greedy=True)
