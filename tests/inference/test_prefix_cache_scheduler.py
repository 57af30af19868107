"""The scheduler with prefix caching, against a fake model whose KV is a function of the
token, the adapter bytes and the cache scope: a block shared across any of them, written
while shared, or read before it was written changes the tokens. Caching on must give the
tokens caching off gives, with hits, under preemption and aborts."""

from __future__ import annotations

import random
import zlib

from services.inference.engine.block_manager import BlockManager
from services.inference.engine.sampling_params import SamplingParams
from services.inference.engine.scheduler import Admission, AlwaysReadyGate, Scheduler, SchedulerConfig
from services.inference.engine.sequence import Sequence, SequenceStatus

EOS = 1
BS = 4


class BytesGate(AlwaysReadyGate):
    """Every adapter is resident, with the bytes `sha` says (operators may replace them)."""

    def __init__(self) -> None:
        super().__init__()
        self.sha: dict[str, str] = {}

    def resident_sha256(self, adapter_key: str) -> str | None:
        return self.sha.get(adapter_key, "0" * 64)


class ScopedKvModel:
    """Writes f(token, adapter bytes, scope) at each new token's KV slot; a sequence's next
    token is a hash of every slot it reads back. Checks that nothing shared is written."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.kv: dict[int, int] = {}

    def forward(self, batch) -> dict[int, int]:
        manager, gate = self.scheduler.block_manager, self.scheduler.gate
        sampled = {}
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            others = {b for s in self.scheduler.running if s is not seq for b in s.block_table}
            start = seq.num_cached_tokens
            assert start >= seq.num_published_blocks * BS, "writes into a published block"
            sha = seq.adapter_sha256 or (gate.resident_sha256(seq.adapter_key) if seq.adapter_key else "")
            for position in range(start, start + num_new):
                assert seq.block_table[position // BS] not in others, "writes into a shared block"
                self.kv[manager.slot(seq, position)] = zlib.crc32(f"{seq.token_ids[position]}/{sha}/"
                                                                  f"{seq.cache_scope}".encode())
            if start + num_new == seq.num_tokens:
                history = [self.kv[manager.slot(seq, p)] for p in range(seq.num_tokens)]
                sampled[seq.seq_id] = 10 + sum(v * (p + 1) for p, v in enumerate(history)) % 90
        return sampled


def make_scheduler(prefix_caching: bool, num_blocks: int = 64, budget: int = 16) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget)
    return Scheduler(config, BlockManager(num_blocks, BS, prefix_caching), BytesGate(), {EOS}, max_context=64)


def make_seq(seq_id: int, prompt: list[int], adapter: str | None = None, scope: str = "") -> Sequence:
    return Sequence(seq_id, prompt, SamplingParams(max_tokens=8, ignore_eos=True), adapter_key=adapter, block_size=BS,
                    cache_scope=scope)


def run(scheduler: Scheduler, seqs: list[Sequence], on_step, last_arrival: int = 0,
        model: ScopedKvModel | None = None) -> dict[int, list[int]]:
    """Steps until every sequence finished; on_step(step) runs before each step's schedule
    (arrivals, aborts) and the last arrival comes at step last_arrival. A model passed in
    holds the KV of earlier runs' cached blocks."""
    model, steps = model or ScopedKvModel(scheduler), 0
    while scheduler.has_unfinished or steps <= last_arrival:
        on_step(steps)
        batch = scheduler.schedule()
        held = [b for s in scheduler.running for b in s.block_table]
        assert len(set(held)) == scheduler.block_manager.num_used_blocks
        scheduler.postprocess(batch, model.forward(batch))
        steps += 1
        assert steps < 2000, "no progress"
    manager = scheduler.block_manager
    assert manager.num_used_blocks == 0 and manager.num_free_blocks == manager.num_blocks
    return {seq.seq_id: seq.completion_token_ids for seq in seqs}


def run_alone(seq: Sequence) -> list[int]:
    scheduler = make_scheduler(False)
    return run(scheduler, [seq], lambda step: scheduler.add(seq) if step == 0 else None)[seq.seq_id]


def workload(seed: int) -> list[Sequence]:
    """24 requests over three shared prefixes (one a whole number of blocks), two adapters,
    two scopes; some prompts repeat whole."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(20, 90) for _ in range(n)] for n in (12, 13, 18)]
    seqs = []
    for i in range(24):
        prompt = prefixes[i % 3] + ([] if i % 5 == 0 else [rng.randrange(20, 90) for _ in range(rng.randint(1, 9))])
        seqs.append(make_seq(i, prompt, adapter=(None, "fin", "legal")[i % 4 % 3], scope=("a", "b")[i % 7 % 2]))
    return seqs


def run_arriving(scheduler: Scheduler, seqs: list[Sequence]) -> dict[int, list[int]]:
    """Two arrivals a step: later requests find the prefixes of earlier ones."""
    return run(scheduler, seqs, lambda step: [scheduler.add(seq) for seq in seqs[step * 2:step * 2 + 2]],
               last_arrival=len(seqs) // 2)


def test_caching_gives_the_tokens_private_blocks_give_with_hits():
    expected = run_arriving(plain := make_scheduler(False), workload(1))
    cached = make_scheduler(True)
    assert run_arriving(cached, seqs := workload(1)) == expected
    assert cached.block_manager.prompt_tokens_cached >= 8 * BS
    assert plain.block_manager.prompt_tokens_cached == 0
    total = sum(len(s.token_ids) - len(s.completion_token_ids) for s in seqs)
    assert plain.block_manager.prompt_tokens_computed == total
    assert cached.block_manager.prompt_tokens_cached + cached.block_manager.prompt_tokens_computed == total


def test_under_kv_pressure_preempted_sequences_keep_their_tokens():
    """16 blocks for 24 requests: preempted again and again, resuming from what is cached."""
    expected = run_arriving(make_scheduler(False), workload(2))
    tight = make_scheduler(True, num_blocks=16, budget=8)
    assert run_arriving(tight, workload(2)) == expected
    assert tight.num_preemptions > 0 and tight.block_manager.prompt_tokens_cached > 0


def test_an_abort_mid_prefill_leaves_the_sharers_tokens_alone():
    """The second sequence shares the first's prefix and is aborted in the middle of its own
    long suffix; the first keeps decoding, and a third reuses what the aborted one wrote."""
    prefix, suffix = list(range(20, 40)), list(range(50, 80))
    decoding = SamplingParams(max_tokens=20, ignore_eos=True)  # the first still decodes at the abort
    first, second, third = (Sequence(0, prefix + [5], decoding, block_size=BS), make_seq(1, prefix + suffix),
                            make_seq(2, prefix + suffix))
    alone = [run_alone(Sequence(0, prefix + [5], decoding, block_size=BS)), run_alone(make_seq(2, prefix + suffix))]
    scheduler = make_scheduler(True, budget=8)

    def on_step(step: int) -> None:
        if step == 0:
            scheduler.add(first)
        if step == 4:  # the first is decoding; its 20-token prefix is published
            scheduler.add(second)
        if step == 6:
            assert second.num_cached_prompt_tokens == 20 and second.num_cached_tokens < second.num_tokens
            scheduler.abort(second.seq_id)
            scheduler.add(third)

    results = run(scheduler, [first, second, third], on_step, last_arrival=6)
    assert [results[0], results[2]] == alone
    assert second.completion_token_ids == []
    assert third.num_cached_prompt_tokens > 20  # the aborted one's written blocks were kept


def test_replaced_adapter_bytes_and_other_scopes_never_hit():
    scheduler = make_scheduler(True)
    gate: BytesGate = scheduler.gate
    prompt = list(range(20, 37))
    seqs = [make_seq(0, prompt, "fin", "a"), make_seq(1, prompt, "fin", "b"), make_seq(2, prompt, "fin", "a"),
            make_seq(3, prompt, "fin", "a"), make_seq(4, prompt, None, "a")]

    def on_step(step: int) -> None:
        if step < len(seqs):
            if step == 3:
                gate.sha["fin"] = "1" * 64  # same id, other bytes (any bytes asked for: the resident ones)
            scheduler.add(seqs[step])

    run(scheduler, seqs, on_step, last_arrival=len(seqs))
    assert [s.num_cached_prompt_tokens for s in seqs] == [0, 0, 16, 0, 0]


def test_a_prefill_resumed_from_its_own_blocks_reports_no_cached_prompt_tokens():
    """Three decoders fill a 16-block cache while a 31-token prompt that nobody else sends is
    prefilled 8 tokens a step: it is preempted before its first token, and one of its
    resumptions reads back a block it wrote itself. That is its own work, not a cache hit:
    usage would bill it as cached."""
    scheduler = make_scheduler(True, num_blocks=16, budget=8)
    decoders = [Sequence(i, list(range(100 + 20 * i, 100 + 20 * i + n)), SamplingParams(max_tokens=m, ignore_eos=True),
                         block_size=BS) for i, (n, m) in enumerate(((1, 28), (6, 17), (10, 12)))]
    long = make_seq(9, list(range(20, 51)))

    def on_step(step: int) -> None:
        if step == 0:
            for seq in decoders:
                scheduler.add(seq)
        if step == 1:
            scheduler.add(long)

    run(scheduler, [*decoders, long], on_step, last_arrival=1)
    assert long.num_preemptions > 0
    assert scheduler.block_manager.prompt_tokens_cached > 0  # its own blocks: no other prompt shares a block
    assert long.num_cached_prompt_tokens == 0


class FetchingGate(BytesGate):
    """Resident adapters, but those in `fetching` have their bytes still on the way."""

    def __init__(self) -> None:
        super().__init__()
        self.fetching: set[str] = set()

    def try_acquire(self, adapter_key: str, sha256: str = "") -> Admission:
        return Admission.FETCHING if adapter_key in self.fetching else super().try_acquire(adapter_key, sha256)


def test_adapters_being_fetched_cost_no_prefix_lookups_and_hit_once_they_arrive():
    """Each waiting head walked the prefix cache (a lookup per cached block) before the gate
    refused it: with hundreds of adapters being fetched, every step stalled for tens of ms."""
    gate = FetchingGate()
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16), BlockManager(256, BS, True),
                          gate, {EOS}, max_context=64)
    prompt = list(range(20, 45))  # six full blocks
    adapters = [f"adapter-{i}" for i in range(20)]
    first_turns = [make_seq(i, prompt, adapter) for i, adapter in enumerate(adapters)]
    model = ScopedKvModel(scheduler)
    run(scheduler, first_turns, lambda step: [scheduler.add(seq) for seq in first_turns] if step == 0 else None,
        model=model)

    cache = scheduler.block_manager._cache
    longest_prefix, lookups = cache.longest_prefix, []
    cache.longest_prefix = lambda hashes: lookups.append(len(hashes)) or longest_prefix(hashes)
    gate.fetching = set(adapters)  # replaced in the pool meanwhile: fetched again
    base = make_seq(100, prompt)
    second_turns = [make_seq(200 + i, prompt, adapter) for i, adapter in enumerate(adapters)]

    def on_step(step: int) -> None:
        if step == 0:
            for seq in [base, *second_turns]:
                scheduler.add(seq)
        if step == 3:
            assert lookups == [6]  # the base-only sequence's, once admitted; none for the 20 refused
            gate.fetching.clear()

    run(scheduler, [base, *second_turns], on_step, last_arrival=3, model=model)
    assert base.num_cached_prompt_tokens == 0  # no base-only turn before it
    assert all(seq.num_cached_prompt_tokens == 24 for seq in second_turns)


def test_a_sequence_only_its_shared_prefix_lets_in_waits_for_its_adapter_and_is_admitted_shared():
    """Too few free blocks to start afresh, enough past the prefix a running sequence holds:
    the prefix is looked up before the gate is asked, and a refusal takes no reference."""
    gate = FetchingGate()
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16), BlockManager(16, BS, True),
                          gate, {EOS}, max_context=64)
    prefix, decoding = list(range(20, 40)), SamplingParams(max_tokens=16, ignore_eos=True)
    holder = Sequence(0, prefix + [5], decoding, adapter_key="fin", block_size=BS)
    filler = Sequence(1, list(range(50, 78)), decoding, block_size=BS)
    sharer = make_seq(2, prefix + [6], "fin")
    expected = [run_alone(Sequence(0, prefix + [5], decoding, adapter_key="fin", block_size=BS)),
                run_alone(Sequence(1, list(range(50, 78)), decoding, block_size=BS)),
                run_alone(make_seq(2, prefix + [6], "fin"))]

    def on_step(step: int) -> None:
        if step == 0:
            scheduler.add(holder)
            scheduler.add(filler)
        if step == 4:  # both decode; the holder's prefix is published
            assert scheduler.block_manager.plan_fresh_start(sharer, 14) is None
            gate.fetching.add("fin")
            scheduler.add(sharer)
        if step == 6:
            assert sharer.status is SequenceStatus.WAITING and gate.references["fin"] == 1
            gate.fetching.clear()
        if step == 7:
            assert sharer.status is SequenceStatus.RUNNING and sharer.num_cached_prompt_tokens == 20

    assert list(run(scheduler, [holder, filler, sharer], on_step, last_arrival=7).values()) == expected
