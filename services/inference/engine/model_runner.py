"""ModelRunner: turns a ScheduledBatch into one packed forward and the logits to sample.

It owns the paged KV cache tensors, orders the batch so that sequences sharing an adapter
are contiguous (each run becomes one LoRA segment), and fills the StepContext once per
step — layers only read it.
"""

from __future__ import annotations

import torch

from services.inference.adapters.batch import AdapterSegments, LoraBatch
from services.inference.adapters.pool import AdapterPool
from services.inference.engine.scheduler import ScheduledBatch
from services.inference.engine.sequence import Sequence
from services.inference.model.attention import build_decode_batch
from services.inference.model.context import StepContext
from services.inference.model.llama import LlamaForCausalLM


def kv_block_bytes(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    args = model.args
    per_token = 2 * args.num_layers * args.num_kv_heads * args.head_dim * torch.finfo(dtype).bits // 8
    return per_token * block_size


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, pool: AdapterPool, num_kv_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", kernels: str = "torch") -> None:
        self.model, self.pool, self.kernels = model, pool, kernels
        self.block_size, self.device = block_size, torch.device(device)
        args = model.args
        for layer in model.attention_layers():
            layer.k_cache = torch.zeros(num_kv_blocks, block_size, args.num_kv_heads, args.head_dim,
                                        dtype=dtype, device=device)
            layer.v_cache = torch.zeros_like(layer.k_cache)

    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """Runs one step; returns the sequences that get a token and their logits [N, V]."""
        order = sorted(range(len(batch.seqs)), key=lambda i: batch.seqs[i].adapter_key or "")
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_seqlens, context_lens, block_tables, logits_rows = [0], [], [], []
        sampled: list[Sequence] = []
        groups: list[AdapterSegments] = []
        for i in order:
            seq, count = batch.seqs[i], batch.num_new_tokens[i]
            start, end = seq.num_cached_tokens, seq.num_cached_tokens + count
            first = len(tokens)
            tokens += seq.token_ids[start:end]
            positions += range(start, end)
            table = seq.block_table
            slots += [table[p // self.block_size] * self.block_size + p % self.block_size for p in range(start, end)]
            cu_seqlens.append(len(tokens))
            context_lens.append(end)
            block_tables.append(torch.tensor(table, dtype=torch.int64, device=self.device))
            if end == seq.num_tokens:
                logits_rows.append(len(tokens) - 1)
                sampled.append(seq)
            if seq.adapter_key is not None:
                self._extend_groups(groups, seq.adapter_key, first, len(tokens))
        ctx = StepContext(
            positions=torch.tensor(positions, dtype=torch.int64, device=self.device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=self.device),
            cu_seqlens=cu_seqlens, context_lens=context_lens, block_tables=block_tables,
            logits_indices=torch.tensor(logits_rows, dtype=torch.int64, device=self.device),
            lora=LoraBatch(groups, self.pool.a, self.pool.b, len(tokens), self.kernels) if groups else None,
            block_size=self.block_size)
        ctx.decode = build_decode_batch(ctx, paged_tables=self.kernels == "triton")
        hidden = self.model(torch.tensor(tokens, dtype=torch.int64, device=self.device), ctx)
        if not logits_rows:
            return [], torch.empty(0)
        return sampled, self.model.compute_logits(hidden[ctx.logits_indices])

    def _extend_groups(self, groups: list[AdapterSegments], key: str, start: int, end: int) -> None:
        """Adds tokens [start, end) for adapter `key`, merging with the previous run of it."""
        group = self.pool.segments_of(key, start, end)
        if groups and groups[-1].segments[-1].pages is group.segments[0].pages \
                and groups[-1].segments[-1].end == start:
            last = groups[-1].segments[-1]
            groups[-1].segments[-1] = type(last)(last.start, end, last.pages, last.scale)
        else:
            groups.append(group)
