"""Overlapped decode steps: the next step is queued on the device before this one's tokens are read.

Why: on the H200 a graphed Llama-3-8B decode step at batch 64 is 6.3 ms of GPU work, and the
host's work around it (schedule, pack, fill and upload the graph's inputs; then read the
tokens back, detokenize, check stop strings, build outputs) added 2.5 ms a step in series
(bench/gpu_notes.md, v3), a third of the step. Queued one step ahead, the host prepares step
N+1 while the GPU runs step N, and handles step N's tokens while it runs step N+1.

How: the scheduler's bookkeeping of step N is split in two (Scheduler.advance / accept). With
N's forward and sampling queued, `schedule_ahead` advances N's KV accounting, puts a reserved
token (Sequence.reserve_token) where each sequence's sampled token will go, and schedules
them one decode each; the step's input ids come from N's sampled tokens on the device
(`rows` selects them), never from the host. Then N's tokens are read and accepted, filling
the reserved places; stop checks run as before.

What it costs: a sequence that stops at step N (EOS, a stop string, an abort) already has a
row in step N+1, computed and dropped (its KV slot is its own until then, and a freed block
is reused only by steps queued after). A sequence that will reach its length limit at N is
left out of N+1. Requests that arrive meanwhile are admitted one step later.

When: only where the next step would be exactly these decodes anyway: every sequence of step
N gets a token and none is left out of it (no prefill chunk under way, nothing else running),
nothing waiting could be admitted, and no sequence needs its token on the host before the
next logits (a grammar's mask, penalties' counts). Otherwise the step runs as it always did.
"""

from __future__ import annotations

import dataclasses

from services.inference.engine.scheduler import ScheduledBatch, Scheduler
from services.inference.engine.sequence import Sequence


@dataclasses.dataclass
class AheadBatch:
    batch: ScheduledBatch  # one decode per sequence, each computing its reserved token
    rows: list[int]  # for each of batch.seqs, its row among the sampled tokens of the step before


def schedule_ahead(scheduler: Scheduler, batch: ScheduledBatch, sampled: list[Sequence]) -> AheadBatch | None:
    """The step after `batch`, scheduled before its tokens (sampled: its sequences that get one,
    in the order of the sampled rows) are known; None where it must wait for them (see the
    module docstring). On success `batch` is advanced: call scheduler.accept, not postprocess."""
    live = [seq for seq in batch.seqs if not seq.is_finished]
    if not live or len(live) != len(scheduler.running) or scheduler.num_waiting and \
            len(scheduler.running) < scheduler.config.max_num_seqs:
        return None
    live_ids = {id(seq) for seq in live}
    sampled_live = [seq for seq in sampled if id(seq) in live_ids]
    if len(sampled_live) != len(live):  # a prefill chunk under way: it must not wait a step
        return None
    if any(seq.grammar is not None or seq.sampling.has_penalties for seq in live):
        return None
    rows = [row for row, seq in enumerate(sampled) if id(seq) in live_ids and not _reaches_length(scheduler, seq)]
    continuing = [sampled[row] for row in rows]
    if not continuing or len(continuing) > scheduler.config.max_num_batched_tokens:
        return None
    manager = scheduler.block_manager
    # After the reserve, each needs room for num_tokens + 1 tokens: checked for all before any change.
    needed = sum(manager.num_blocks_needed(seq, seq.num_tokens + 1) for seq in continuing)
    if needed > manager.num_free_blocks:
        return None
    scheduler.advance(batch)
    ahead = ScheduledBatch()
    for seq in continuing:
        seq.reserve_token()
        manager.allocate(seq, seq.num_tokens)
        ahead.add(seq, 1)
    return AheadBatch(ahead, rows)


def _reaches_length(scheduler: Scheduler, seq: Sequence) -> bool:
    """Whether the token being sampled for seq ends it by length (then it has no next step)."""
    return seq.num_completion_tokens + 1 >= seq.sampling.max_tokens or seq.num_tokens + 1 >= scheduler.max_context
