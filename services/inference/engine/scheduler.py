"""Continuous batching: which sequences run in the next forward, and how many tokens each.

Per step: running sequences first (decodes, 1 token each, then prefills already under way),
then admissions from the waiting queues into the remaining max_num_batched_tokens budget.
Admission needs KV blocks and, for a LoRA request, a reference on its adapter from the pool
(`AdapterGate`); with prefix caching, an admitted sequence starts past the leading blocks it
shares with earlier ones of the same scope and adapter bytes (block_manager.py). Waiting
sequences queue per adapter key so one adapter that is still loading never blocks the
others, and keys take turns so a flood for one adapter cannot starve another.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import Counter, deque
from typing import Protocol

from services.common.errors import ResourceExhausted
from services.inference.engine.block_manager import BlockManager
from services.inference.engine.sequence import FinishReason, Sequence, SequenceStatus

AdapterKey = str | None  # None = base model only; it queues as a key of its own
Lane = tuple[AdapterKey, str]  # (adapter key, cache scope): one queue, taking turns with the others


def _lane(seq: Sequence) -> Lane:
    return seq.adapter_key, seq.cache_scope


class Admission(enum.Enum):
    """The adapter gate's answer to one admission, with the reason for a refusal: the
    scheduler pauses other adapters only for one that lacks pool room, never for one whose
    bytes are still on their way."""

    ADMITTED = "admitted"  # resident and referenced once more (not evictable until released)
    FETCHING = "fetching"  # its bytes are not in host memory yet: the gate asked for them
    NO_ROOM = "no_room"  # in host memory, but the pool has no room for it now


class AdapterGate(Protocol):
    """The adapter pool as the scheduler sees it."""

    def try_acquire(self, adapter_key: str, sha256: str = "") -> Admission:
        """Admit a sequence for this adapter (with these bytes, when sha256 is given). Refused,
        the sequence stays waiting and others are scheduled; the gate loads it itself."""
        ...

    def release(self, adapter_key: str) -> None: ...

    def resident_sha256(self, adapter_key: str) -> str | None:
        """What names the adapter on the device now (its bytes' digest, or a fingerprint of its
        bytes and config), None if it is not there. No side effects: the prefix cache asks it
        before try_acquire, and after, to name a request's KV by what computed it."""
        ...


class AlwaysReadyGate:
    """Every adapter is always resident; counts references (tests, base-only serving)."""

    def __init__(self) -> None:
        self.references: Counter[str] = Counter()

    def try_acquire(self, adapter_key: str, sha256: str = "") -> Admission:
        self.references[adapter_key] += 1
        return Admission.ADMITTED

    def release(self, adapter_key: str) -> None:
        if self.references[adapter_key] <= 0:
            raise RuntimeError(f"release of adapter {adapter_key!r} that holds no reference")
        self.references[adapter_key] -= 1
        if not self.references[adapter_key]:
            del self.references[adapter_key]

    def resident_sha256(self, adapter_key: str) -> str | None:
        return ""  # one fixed set of bytes per key, whatever they are

    @property
    def total_references(self) -> int:
        return sum(self.references.values())


@dataclasses.dataclass
class SchedulerConfig:
    max_num_seqs: int = 64  # running sequences at once
    max_num_batched_tokens: int = 2048  # tokens per forward
    max_waiting: int = 1024  # queue depth; beyond it add() raises ResourceExhausted
    # Starvation guard for a full adapter pool: once a waiting adapter has been refused room by
    # the gate while this many sequences of other adapters were admitted, admissions of other
    # adapters pause (base-only continues) so their references drain and the pool can make room.
    # An adapter whose bytes are still being fetched is not refused room and pauses nothing.
    adapter_starvation_limit: int = 64


@dataclasses.dataclass
class ScheduledBatch:
    """One forward's work. Sequence i computes tokens [num_cached_tokens, +num_new_tokens[i]);
    it completes its prefill (and gets a sampled token) when that reaches its num_tokens."""

    seqs: list[Sequence] = dataclasses.field(default_factory=list)
    num_new_tokens: list[int] = dataclasses.field(default_factory=list)
    # Kept as the batch grows: the scheduler asks for it once per sequence it considers.
    total_tokens: int = dataclasses.field(default=0, init=False)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def sampled_seqs(self) -> list[Sequence]:
        """The sequences that get a new token from this step (valid before postprocess)."""
        return [s for s, n in zip(self.seqs, self.num_new_tokens) if s.num_cached_tokens + n == s.num_tokens]

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)
        self.total_tokens += num_new_tokens


class Scheduler:
    """Continuous-batching scheduler with chunked prefill, preemption by recompute,
    adapter-aware admission and round-robin fairness across lanes: a lane is an adapter key and
    a cache scope (the Router sends the tenant), so tenants take turns on the base model too.
    A tenant queuing hundreds of base-model requests (within its quota) then delays another
    tenant's first token by one admission, not by its whole backlog. The adapter gate still
    decides per adapter key: a refusal skips every lane of that adapter for the round.

    Not thread-safe: call it from the engine loop only. abort() may come between schedule()
    and postprocess(): postprocess skips the aborted sequence, and its freed KV blocks go to
    others only at the next schedule(), after the step. (Its adapter reference is released at
    once too, so the pool must not overwrite an unreferenced adapter's pages outside
    try_acquire, i.e. while a step may still read them.)
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, gate: AdapterGate,
                 eos_token_ids: set[int], max_context: int) -> None:
        capacity = block_manager.num_blocks * block_manager.block_size
        if capacity < max_context:
            # Otherwise a long sequence could preempt itself forever.
            raise ValueError(f"KV cache of {capacity} tokens cannot hold one sequence of the "
                             f"context length {max_context}")
        self.config = config
        self.block_manager = block_manager
        self.gate = gate
        self.eos_token_ids = set(eos_token_ids)
        self.max_context = max_context
        self.running: list[Sequence] = []  # admission order: the last is the first victim
        self._preempted: deque[Sequence] = deque()  # resumed before any new admission
        self._waiting: dict[Lane, deque[Sequence]] = {}
        self._lane_order: list[Lane] = []  # least recently admitted lane first
        self._sequences: dict[int, Sequence] = {}  # every unfinished sequence
        self._num_arrivals = 0
        self._num_adapter_admissions = 0
        self._refused_at: dict[str, int] = {}  # adapter -> _num_adapter_admissions at first refusal
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self._preempted) + sum(len(q) for q in self._waiting.values())

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._sequences)

    def add(self, seq: Sequence) -> None:
        if self.num_waiting >= self.config.max_waiting:
            raise ResourceExhausted(f"queue full: {self.num_waiting} requests already waiting",
                                    retry_after_s=1.0, queue_depth=self.config.max_waiting)
        if seq.block_size != self.block_manager.block_size:
            raise ValueError(f"sequence block_size {seq.block_size} != KV block size {self.block_manager.block_size}")
        seq.status = SequenceStatus.WAITING
        seq.arrival_index = self._num_arrivals
        self._num_arrivals += 1
        self._sequences[seq.seq_id] = seq
        lane = _lane(seq)
        if lane not in self._waiting:
            self._waiting[lane] = deque()
            self._lane_order.append(lane)
        self._waiting[lane].append(seq)

    def waiting_for(self, adapter_key: AdapterKey, sha256: str | None = None) -> list[int]:
        """Ids of the sequences queued (or preempted) for this adapter; with sha256, only those
        asking for exactly that digest ("" = any bytes)."""
        queued = [s for lane, queue in self._waiting.items() if lane[0] == adapter_key for s in queue]
        return [s.seq_id for s in [*self._preempted, *queued]
                if s.adapter_key == adapter_key and (sha256 is None or s.adapter_sha256 == sha256)]

    def abort(self, seq_id: int) -> Sequence | None:
        """Cancel now: KV blocks and the adapter reference are released at once."""
        seq = self._sequences.get(seq_id)
        if seq is not None:
            self.finish(seq, FinishReason.ABORTED)
        return seq

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End seq (stop string, abort, ...), wherever it is, releasing what it holds."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq in self._preempted:
            self._preempted.remove(seq)
        else:
            lane = _lane(seq)
            queue = self._waiting[lane]
            queue.remove(seq)
            if not queue:
                del self._waiting[lane]
                self._lane_order.remove(lane)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.penalty_counts = None  # device memory: freed now, not when the last reference to seq goes
        self._sequences.pop(seq.seq_id, None)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        self._schedule_running(batch, decodes=True)
        self._schedule_running(batch, decodes=False)
        self._admit(batch)
        return batch

    def postprocess(self, batch: ScheduledBatch, sampled: dict[int, int]) -> list[Sequence]:
        """Advance the KV accounting of `batch`, append the sampled tokens (seq_id -> token id,
        for sequences that completed their prefill) and finish sequences that are done.
        Returns the sequences that finished this step."""
        self.advance(batch)
        return self.accept(batch, sampled)

    def advance(self, batch: ScheduledBatch) -> None:
        """The KV half of postprocess: the step's tokens are in the cache now. Needs no sampled
        token, so an overlapped step (overlap.py) runs it before the tokens are read."""
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            if seq.is_finished:  # aborted since schedule()
                continue
            seq.num_cached_tokens += num_new
            self.block_manager.publish_written_blocks(seq)

    def accept(self, batch: ScheduledBatch, sampled: dict[int, int]) -> list[Sequence]:
        """The token half of postprocess (after advance): append each sampled token and finish
        the sequences that are done; returns those."""
        finished = []
        for seq in batch.seqs:
            if seq.is_finished:  # aborted since schedule()
                continue
            if seq.num_cached_tokens < seq.num_tokens - seq.num_reserved_tokens:
                continue  # mid-prefill: no token this step
            if seq.seq_id not in sampled:
                raise RuntimeError(f"no sampled token for {seq!r}, which completed its prefill")
            token_id = sampled[seq.seq_id]
            seq.append_token(token_id)
            reason = self._finish_reason(seq, token_id)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def _finish_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        if token_id in self.eos_token_ids and not seq.sampling.ignore_eos:
            return FinishReason.STOP
        if seq.grammar is not None and seq.grammar.is_complete:  # only EOS may follow: ignore_eos would loop on it
            return FinishReason.STOP
        if seq.num_completion_tokens >= seq.sampling.max_tokens or seq.num_tokens >= self.max_context:
            return FinishReason.LENGTH
        return None

    def _budget_left(self, batch: ScheduledBatch) -> int:
        return self.config.max_num_batched_tokens - batch.total_tokens

    def _schedule_running(self, batch: ScheduledBatch, decodes: bool) -> None:
        """Schedule running decodes (1 token) or prefills under way, oldest first; free KV for
        them by preempting the newest unscheduled running sequences when the cache is full."""
        for seq in [s for s in self.running if (s.num_uncached_tokens == 1) == decodes]:
            if self._budget_left(batch) == 0:
                return
            while seq.status is SequenceStatus.RUNNING and \
                    self.block_manager.num_tokens_fitting(seq) <= seq.num_cached_tokens:
                victim = next((s for s in reversed(self.running) if s is not seq and s not in batch.seqs), seq)
                self._preempt(victim)
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted: for its own KV, or as a victim earlier in this loop
            # A prefill chunk shrinks to the free KV rather than evicting more work.
            num_new = min(seq.num_uncached_tokens, self._budget_left(batch),
                          self.block_manager.num_tokens_fitting(seq) - seq.num_cached_tokens)
            self.block_manager.allocate(seq, seq.num_cached_tokens + num_new)
            batch.add(seq, num_new)

    def _admit(self, batch: ScheduledBatch) -> None:
        """Admit waiting sequences: preempted ones first, then one per adapter key per round,
        least recently served key first. A key whose adapter the gate refuses is skipped."""
        waiting_keys = {s.adapter_key for s in self._preempted} | {key for key, _ in self._waiting}
        self._refused_at = {k: at for k, at in self._refused_at.items() if k in waiting_keys}
        starving = {k for k, at in self._refused_at.items()
                    if self._num_adapter_admissions - at >= self.config.adapter_starvation_limit}
        refused: set[AdapterKey] = set()
        for seq in list(self._preempted):
            if seq.adapter_key in refused:
                continue
            admitted = self._try_admit(seq, batch, starving)
            if admitted is None:
                return  # out of KV, sequence slots or token budget
            if admitted:
                self._preempted.remove(seq)
            else:
                refused.add(seq.adapter_key)
        progress = True
        while progress:
            progress = False
            for lane in list(self._lane_order):
                if lane[0] in refused:  # refused earlier this round, maybe in another tenant's lane
                    continue
                queue = self._waiting[lane]
                admitted = self._try_admit(queue[0], batch, starving)
                if admitted is None:
                    return
                if not admitted:
                    refused.add(lane[0])
                    continue
                progress = True
                queue.popleft()
                self._lane_order.remove(lane)  # served: to the back of the line
                if queue:
                    self._lane_order.append(lane)
                else:
                    del self._waiting[lane]

    def _try_admit(self, seq: Sequence, batch: ScheduledBatch, starving: set[str]) -> bool | None:
        """True if admitted, False if its adapter cannot run now, None if nothing more can be
        admitted this step (token budget, sequence slots or KV blocks are spent)."""
        budget = self._budget_left(batch)
        if budget == 0 or len(self.running) >= self.config.max_num_seqs:
            return None
        # The cached-prefix lookup costs one dict lookup per cached block: done for every head
        # the gate refuses (hundreds of adapters being fetched), it stalled each step for tens
        # of ms. So it waits for the gate's yes, unless only a shared prefix could fit.
        plan = self.block_manager.plan_fresh_start(seq, budget)
        if plan is None:
            plan = self.block_manager.plan_admission(seq, budget, self._adapter_sha256(seq))
            if plan is None:
                return None
        key = seq.adapter_key
        if key is not None:
            if starving and key not in starving:
                return False
            admission = self.gate.try_acquire(key, seq.adapter_sha256)
            if admission is Admission.FETCHING:
                # Pausing the other adapters frees pool room, which is not what it lacks: a slow
                # or hung re-fetch would stall them all for as long as it takes.
                self._refused_at.pop(key, None)
                return False
            if admission is Admission.NO_ROOM:
                self._refused_at.setdefault(key, self._num_adapter_admissions)
                return False
            self._refused_at.pop(key, None)
            self._num_adapter_admissions += 1
        adapter_sha256 = self._adapter_sha256(seq)  # admitted: its bytes are settled
        if not plan.shared_blocks:  # a fresh start fits, so this finds one (a shared one first)
            plan = self.block_manager.plan_admission(seq, budget, adapter_sha256)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        self.block_manager.admit(seq, plan, adapter_sha256)
        batch.add(seq, plan.num_new_tokens)
        return True

    def _adapter_sha256(self, seq: Sequence) -> str | None:
        """What names the adapter seq runs with if admitted now ("" without adapter): the
        resident copy's identity, which names its cached KV (once admitted, the copy it runs
        with; before, a guess that admission re-checks). None while none is resident (the gate
        may load one) or when unneeded (no prefix caching)."""
        if not self.block_manager.prefix_caching:
            return None
        if seq.adapter_key is None:
            return ""
        return self.gate.resident_sha256(seq.adapter_key)

    def _preempt(self, seq: Sequence) -> None:
        """Preemption by recompute: drop the KV, keep the tokens, resume first when room returns."""
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._preempted.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        if seq.adapter_key is not None:
            self.gate.release(seq.adapter_key)
