"""Scheduler: budgets, chunked prefill, preemption by recompute, cancellation, adapter-aware
admission and fairness. A fake model writes each token into a simulated paged KV cache and
derives the next token from what it reads back, so any KV accounting slip changes the output."""

from __future__ import annotations

from collections import Counter

import pytest

from services.common.errors import ResourceExhausted
from services.inference.engine.block_manager import BlockManager
from services.inference.engine.sampling_params import SamplingParams
from services.inference.engine.scheduler import Admission, AlwaysReadyGate, Scheduler, SchedulerConfig
from services.inference.engine.sequence import FinishReason, Sequence, SequenceStatus

EOS = 1
BLOCK_SIZE = 4


class CacheReadingModel:
    """Stores token ids at their KV slots; a sequence's next token is a hash of its cache."""

    def __init__(self, block_manager: BlockManager) -> None:
        self.block_manager = block_manager
        self.kv: dict[int, int] = {}

    def forward(self, batch) -> dict[int, int]:
        sampled = {}
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            for position in range(seq.num_cached_tokens, seq.num_cached_tokens + num_new):
                self.kv[self.block_manager.slot(seq, position)] = seq.token_ids[position]
            if seq.num_cached_tokens + num_new == seq.num_tokens:
                history = [self.kv[self.block_manager.slot(seq, p)] for p in range(seq.num_tokens)]
                sampled[seq.seq_id] = 10 + (sum(t * (p + 1) for p, t in enumerate(history)) % 90)
        return sampled


class LruGate:
    """A pool of `capacity` adapters: loads take `load_calls` refusals, only unreferenced
    adapters are evicted (least recently used first)."""

    def __init__(self, capacity: int, load_calls: int = 1) -> None:
        self.capacity, self.load_calls = capacity, load_calls
        self.references: dict[str, int] = {}  # resident adapters, least recently used first
        self.loading: dict[str, int] = {}
        self.max_in_flight = 0

    def try_acquire(self, key: str, sha256: str = "") -> Admission:
        if key in self.loading:
            self.loading[key] -= 1
            if self.loading[key] > 0:
                return Admission.FETCHING
            del self.loading[key]
            self.references[key] = 0
        if key in self.references:
            self.references[key] = self.references.pop(key) + 1
            self.max_in_flight = max(self.max_in_flight, sum(1 for r in self.references.values() if r))
            return Admission.ADMITTED
        if len(self.references) + len(self.loading) >= self.capacity:
            idle = next((k for k, refs in self.references.items() if refs == 0), None)
            if idle is None:
                return Admission.NO_ROOM
            del self.references[idle]
        self.loading[key] = self.load_calls
        return Admission.FETCHING

    def release(self, key: str) -> None:
        assert self.references[key] > 0
        self.references[key] -= 1


def make_scheduler(num_blocks=64, max_num_seqs=8, budget=64, max_waiting=1024, gate=None,
                   max_context=128, starvation_limit=64) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                             max_waiting=max_waiting, adapter_starvation_limit=starvation_limit)
    return Scheduler(config, BlockManager(num_blocks, BLOCK_SIZE), gate or AlwaysReadyGate(), {EOS}, max_context)


def make_seq(seq_id, prompt_len=8, adapter=None, max_tokens=4, ignore_eos=False, scope="") -> Sequence:
    prompt = [20 + (seq_id * 7 + i) % 50 for i in range(prompt_len)]
    return Sequence(seq_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos),
                    adapter_key=adapter, block_size=BLOCK_SIZE, cache_scope=scope)


def check_invariants(scheduler: Scheduler, batch) -> None:
    config = scheduler.config
    assert batch.total_tokens <= config.max_num_batched_tokens
    assert scheduler.num_running <= config.max_num_seqs
    assert len({s.seq_id for s in batch.seqs}) == len(batch.seqs)
    blocks = [b for s in scheduler.running for b in s.block_table]
    assert len(blocks) == len(set(blocks)) == scheduler.block_manager.num_used_blocks
    for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
        assert seq.status is SequenceStatus.RUNNING and num_new >= 1
        assert seq.num_cached_tokens + num_new <= seq.num_tokens
        assert len(seq.block_table) * BLOCK_SIZE >= seq.num_cached_tokens + num_new
    new_tokens = dict(zip((s.seq_id for s in batch.seqs), batch.num_new_tokens))
    for seq in scheduler.running:  # blocks cover cached tokens plus this step's, no more
        covered = seq.num_cached_tokens + new_tokens.get(seq.seq_id, 0)
        assert len(seq.block_table) == -(-covered // BLOCK_SIZE)
    # Each running sequence with an adapter holds exactly one reference on it; nothing else does.
    references = {key: count for key, count in scheduler.gate.references.items() if count}
    assert references == Counter(s.adapter_key for s in scheduler.running if s.adapter_key is not None)


def run(scheduler: Scheduler, on_step=None, max_steps=5000, model=None) -> int:
    model = model or CacheReadingModel(scheduler.block_manager)
    steps = 0
    while scheduler.has_unfinished:
        batch = scheduler.schedule()
        check_invariants(scheduler, batch)
        scheduler.postprocess(batch, model.forward(batch))
        if on_step:
            on_step(steps, batch)
        steps += 1
        assert steps < max_steps, "no progress"
    assert scheduler.block_manager.num_used_blocks == 0
    return steps


def test_long_prompt_is_prefilled_in_chunks_within_the_budget():
    scheduler = make_scheduler(budget=16)
    seq = make_seq(0, prompt_len=40, max_tokens=2)
    scheduler.add(seq)
    model, chunks = CacheReadingModel(scheduler.block_manager), []
    for _ in range(3):
        batch = scheduler.schedule()
        chunks.append(batch.num_new_tokens)
        assert batch.sampled_seqs == ([seq] if len(chunks) == 3 else [])
        scheduler.postprocess(batch, model.forward(batch))
    assert chunks == [[16], [16], [8]]
    assert seq.num_cached_tokens == 40 and seq.num_completion_tokens == 1


def test_decode_and_prefill_share_a_step_decode_first():
    scheduler = make_scheduler(budget=10)
    model = CacheReadingModel(scheduler.block_manager)
    first, second, third = make_seq(0, prompt_len=6), make_seq(1, prompt_len=6), make_seq(2, prompt_len=6)
    scheduler.add(first)
    batch = scheduler.schedule()
    scheduler.postprocess(batch, model.forward(batch))
    scheduler.add(second)
    scheduler.add(third)
    batch = scheduler.schedule()
    assert batch.seqs == [first, second, third] and batch.num_new_tokens == [1, 6, 3]
    assert batch.total_tokens == 10 and batch.sampled_seqs == [first, second]


def test_preemption_by_recompute_gives_identical_tokens():
    def completions(num_blocks):
        scheduler = make_scheduler(num_blocks=num_blocks, budget=32, max_context=64)
        seqs = [make_seq(i, prompt_len=6 + i % 5, max_tokens=24, adapter=[None, "a", "b"][i % 3]) for i in range(8)]
        for seq in seqs:
            scheduler.add(seq)
        run(scheduler)
        assert all(s.finish_reason is FinishReason.LENGTH and s.num_completion_tokens == 24 for s in seqs)
        assert scheduler.num_preemptions == sum(s.num_preemptions for s in seqs)
        return [s.completion_token_ids for s in seqs], scheduler.num_preemptions

    roomy, roomy_preemptions = completions(num_blocks=256)
    tight, tight_preemptions = completions(num_blocks=16)
    assert roomy_preemptions == 0 and tight_preemptions > 0
    assert tight == roomy


def test_preempted_sequence_releases_everything_and_resumes_before_new_arrivals():
    gate = AlwaysReadyGate()
    scheduler = make_scheduler(num_blocks=4, gate=gate, max_context=16)  # 16 KV slots in all
    model = CacheReadingModel(scheduler.block_manager)
    older, newer = make_seq(0, prompt_len=4, adapter="a", max_tokens=2), make_seq(1, prompt_len=8, adapter="b")
    scheduler.add(older)
    scheduler.add(newer)
    batch = scheduler.schedule()
    scheduler.postprocess(batch, model.forward(batch))
    batch = scheduler.schedule()  # older takes the last free block; newer cannot get a slot
    assert batch.seqs == [older] and scheduler.num_preemptions == 1 and newer.num_preemptions == 1
    assert newer.status is SequenceStatus.WAITING and newer.block_table == [] and newer.num_cached_tokens == 0
    assert gate.references == {"a": 1}
    late = make_seq(2, prompt_len=4)
    scheduler.add(late)
    assert scheduler.postprocess(batch, model.forward(batch)) == [older]
    batch = scheduler.schedule()
    assert batch.seqs == [newer, late] and batch.num_new_tokens == [9, 4]  # prompt + its generated token
    scheduler.postprocess(batch, model.forward(batch))
    run(scheduler, model=model)
    assert newer.num_completion_tokens == 4


def test_abort_waiting_and_running_frees_blocks_and_adapter_references():
    gate = AlwaysReadyGate()
    scheduler = make_scheduler(max_num_seqs=1, gate=gate)
    running, waiting = make_seq(0, adapter="a"), make_seq(1, adapter="b")
    scheduler.add(running)
    scheduler.add(waiting)
    batch = scheduler.schedule()
    assert batch.seqs == [running] and gate.references == {"a": 1}
    assert scheduler.block_manager.num_used_blocks == 2
    assert scheduler.abort(waiting.seq_id) is waiting
    assert scheduler.abort(running.seq_id) is running  # mid-step: the batch is still out
    for seq in (running, waiting):
        assert seq.is_finished and seq.finish_reason is FinishReason.ABORTED and seq.block_table == []
    assert scheduler.block_manager.num_free_blocks == 64 and gate.total_references == 0
    assert scheduler.postprocess(batch, {}) == []  # the aborted sequence is skipped
    assert not scheduler.has_unfinished and scheduler.abort(running.seq_id) is None
    assert scheduler.schedule().is_empty


def test_adapter_not_ready_does_not_block_others_behind_it():
    ready = {"b"}
    asked = []

    class Gate(AlwaysReadyGate):
        def try_acquire(self, key, sha256=""):
            asked.append(key)
            return super().try_acquire(key) if key in ready else Admission.FETCHING

    scheduler = make_scheduler(gate=Gate())
    a_seqs = [make_seq(i, adapter="a") for i in range(3)]
    for seq in a_seqs + [make_seq(3, adapter="b"), make_seq(4)]:
        scheduler.add(seq)
    batch = scheduler.schedule()
    assert [s.seq_id for s in batch.seqs] == [3, 4]
    assert asked == ["a", "b"]  # one refusal skips adapter a for the rest of the step
    assert scheduler.num_waiting == 3
    ready.add("a")
    assert {s.seq_id for s in scheduler.schedule().seqs} >= {0, 1, 2}


def test_a_flood_for_one_adapter_does_not_starve_another():
    scheduler = make_scheduler(max_num_seqs=4, budget=64)
    for i in range(1000):
        scheduler.add(make_seq(i, adapter="x"))
    lonely = make_seq(1000, adapter="y")
    scheduler.add(lonely)
    assert lonely in scheduler.schedule().seqs


def test_keys_take_turns_when_slots_free_up_one_at_a_time():
    scheduler = make_scheduler(max_num_seqs=1)
    for i in range(20):
        scheduler.add(make_seq(i, adapter="x", max_tokens=2))
    for i in range(20, 23):
        scheduler.add(make_seq(i, adapter="y", max_tokens=2))
    scheduler.add(make_seq(23, adapter=None, max_tokens=2))
    order = []
    run(scheduler, on_step=lambda _, batch: order.extend(s.adapter_key for s in batch.seqs
                                                       if s.num_completion_tokens == 1))
    assert order[:8] == ["x", "y", None, "x", "y", "x", "y", "x"]


def test_tenants_take_turns_on_the_base_model():
    """The Router sends the tenant as cache scope: a backlog of one tenant's base-model requests
    does not hold another tenant's behind it."""
    scheduler = make_scheduler(max_num_seqs=1)
    for i in range(20):
        scheduler.add(make_seq(i, max_tokens=2, scope="tenant-a"))
    scheduler.add(make_seq(20, max_tokens=2, scope="tenant-b"))
    scheduler.add(make_seq(21, adapter="x", max_tokens=2, scope="tenant-c"))
    scheduler.add(make_seq(22, max_tokens=2, scope="tenant-b"))
    order = []
    run(scheduler, on_step=lambda _, batch: order.extend(s.seq_id for s in batch.seqs if s.num_completion_tokens == 1))
    assert order[:6] == [0, 20, 21, 1, 22, 2]
    assert sorted(order) == list(range(23))


def test_an_adapter_refused_in_one_tenants_lane_is_not_asked_again_that_round():
    gate = LruGate(capacity=1, load_calls=3)
    scheduler = make_scheduler(gate=gate)
    for i, scope in enumerate(["a", "b", "c"]):
        scheduler.add(make_seq(i, adapter="x", scope=scope))
    calls = []
    original = gate.try_acquire
    gate.try_acquire = lambda key, sha256="": calls.append(key) or original(key, sha256)
    scheduler.schedule()
    assert calls == ["x"]  # fetching: the other lanes of "x" wait without asking
    assert sorted(scheduler.waiting_for("x")) == [0, 1, 2]
    run(scheduler)


def test_queue_full_raises_resource_exhausted():
    scheduler = make_scheduler(max_waiting=3, max_num_seqs=1)
    for i in range(3):
        scheduler.add(make_seq(i))
    with pytest.raises(ResourceExhausted) as excinfo:
        scheduler.add(make_seq(3))
    assert excinfo.value.retry_after_s > 0
    scheduler.schedule()  # admits one, making room
    scheduler.add(make_seq(4))


def test_pool_with_room_for_two_adapters_never_has_three_in_flight():
    gate = LruGate(capacity=2, load_calls=2)
    scheduler = make_scheduler(max_num_seqs=6, gate=gate)
    seqs = [make_seq(i, adapter=f"a{i % 5}", max_tokens=3) for i in range(40)] + [make_seq(40)]
    for seq in seqs:
        scheduler.add(seq)

    def distinct_in_flight(_, batch):
        assert len({s.adapter_key for s in scheduler.running} - {None}) <= 2

    run(scheduler, on_step=distinct_in_flight)
    assert all(s.finish_reason is FinishReason.LENGTH for s in seqs)
    assert gate.max_in_flight == 2 and not any(gate.references.values())


@pytest.mark.parametrize("starvation_limit, finishes_early", [(4, True), (10_000, False)])
def test_starvation_guard_lets_a_refused_adapter_into_a_full_pool(starvation_limit, finishes_early):
    gate = LruGate(capacity=1)
    scheduler = make_scheduler(max_num_seqs=4, gate=gate, starvation_limit=starvation_limit)
    for i in range(60):  # staggered lengths: some "hot" sequence is always running
        scheduler.add(make_seq(i, adapter="hot", max_tokens=2 + i % 5))
    lonely = make_seq(60, adapter="cold", max_tokens=3)
    scheduler.add(lonely)
    finished_before = []
    run(scheduler, on_step=lambda *_: finished_before.append(lonely.is_finished))
    hot_done_when_cold_finished = finished_before.index(True)
    # Without the guard "hot" keeps its reference forever and "cold" waits for the whole flood.
    assert (hot_done_when_cold_finished < len(finished_before) // 2) == finishes_early


def test_finish_reasons_and_release_on_finish():
    gate = AlwaysReadyGate()
    scheduler = make_scheduler(gate=gate, max_context=16)
    eos, ignoring, long, stopped = (make_seq(0, adapter="a", max_tokens=10), make_seq(1, max_tokens=3, ignore_eos=True),
                                    make_seq(2, prompt_len=14, max_tokens=10), make_seq(3, adapter="a", max_tokens=10))
    for seq in (eos, ignoring, long, stopped):
        scheduler.add(seq)
    batch = scheduler.schedule()
    finished = scheduler.postprocess(batch, {0: EOS, 1: EOS, 2: 50, 3: 50})
    assert finished == [eos] and eos.finish_reason is FinishReason.STOP and gate.references == {"a": 1}
    scheduler.finish(stopped, FinishReason.STOP)  # the engine matched a stop string
    assert gate.total_references == 0 and stopped.block_table == []
    batch = scheduler.schedule()
    assert scheduler.postprocess(batch, {1: EOS, 2: 51}) == [long]  # 16 tokens = max_context
    assert long.finish_reason is FinishReason.LENGTH
    batch = scheduler.schedule()
    assert scheduler.postprocess(batch, {1: EOS}) == [ignoring]  # max_tokens, past two EOS
    assert ignoring.completion_token_ids == [EOS, EOS, EOS] and ignoring.finish_reason is FinishReason.LENGTH
    assert not scheduler.has_unfinished and scheduler.block_manager.num_used_blocks == 0


def test_configuration_errors_are_caught_early():
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        make_scheduler(num_blocks=4, max_context=64)
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match="block_size"):
        scheduler.add(Sequence(0, [1, 2], SamplingParams(), block_size=8))
