"""PackedStep: a ScheduledBatch flattened into the host lists one forward needs.

Sequences sharing an adapter are placed next to each other, so each run of them is one
LoRA segment. Both ways of running a step read it: the eager forward (model_runner.py) and
the graphed decode step (decode_graphs.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from services.inference.adapters.batch import AdapterSegments
from services.inference.adapters.pool import AdapterPool
from services.inference.engine.scheduler import ScheduledBatch
from services.inference.engine.sequence import Sequence


@dataclass
class PackedStep:
    tokens: list[int] = field(default_factory=list)  # [T] all new tokens, sequence after sequence
    positions: list[int] = field(default_factory=list)  # [T]
    slots: list[int] = field(default_factory=list)  # [T] flat KV-cache slot of each token
    cu_seqlens: list[int] = field(default_factory=lambda: [0])  # [S+1]
    context_lens: list[int] = field(default_factory=list)  # [S] context after this step
    block_tables: list[list[int]] = field(default_factory=list)  # S block-id lists
    logits_rows: list[int] = field(default_factory=list)  # rows whose logits are sampled
    sampled: list[Sequence] = field(default_factory=list)  # their sequences, in the same order
    groups: list[AdapterSegments] = field(default_factory=list)  # LoRA segments by adapter

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def is_decode_only(self) -> bool:
        """Every sequence adds one token and samples from it: row i is sequence i."""
        return len(self.tokens) == self.num_seqs == len(self.sampled)

    @property
    def max_rank(self) -> int:
        return max((len(s.pages) for g in self.groups for s in g.segments), default=0)


def pack_step(batch: ScheduledBatch, pool: AdapterPool, block_size: int) -> PackedStep:
    packed = PackedStep()
    order = sorted(range(len(batch.seqs)), key=lambda i: batch.seqs[i].adapter_key or "")
    for i in order:
        seq, count = batch.seqs[i], batch.num_new_tokens[i]
        start, end = seq.num_cached_tokens, seq.num_cached_tokens + count
        first = len(packed.tokens)
        table = seq.block_table
        packed.tokens += seq.token_ids[start:end]
        packed.positions += range(start, end)
        packed.slots += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        packed.cu_seqlens.append(len(packed.tokens))
        packed.context_lens.append(end)
        packed.block_tables.append(table)
        if end == seq.num_tokens:
            packed.logits_rows.append(len(packed.tokens) - 1)
            packed.sampled.append(seq)
        if seq.adapter_key is not None:
            _extend_groups(packed.groups, pool.segments_of(seq.adapter_key, first, len(packed.tokens)))
    return packed


def _extend_groups(groups: list[AdapterSegments], group: AdapterSegments) -> None:
    """Adds one sequence's segment, merging it with the previous run of the same adapter."""
    new = group.segments[0]
    if groups and groups[-1].segments[-1].pages is new.pages and groups[-1].segments[-1].end == new.start:
        last = groups[-1].segments[-1]
        groups[-1].segments[-1] = dataclasses.replace(last, end=new.end)
    else:
        groups.append(group)
