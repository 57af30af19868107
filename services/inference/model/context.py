"""StepContext: the per-step metadata the model runner fills once and every layer reads.

Tokens of all scheduled sequences are packed into one flat batch (no padding). Sequence i
owns tokens [cu_seqlens[i], cu_seqlens[i+1]); they are the last q_len tokens of its
context of context_lens[i] tokens whose K/V live in the paged cache at block_tables[i].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from services.inference.adapters.batch import LoraBatch

if TYPE_CHECKING:
    from services.inference.model.attention import ContinuedPrefills, DecodeBatch, FreshPrefills


@dataclass
class StepContext:
    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, flat KV-cache slot each token's K/V is written to
    cu_seqlens: list[int]  # [S+1] token offsets of each sequence in the packed batch
    context_lens: list[int]  # [S] tokens in each sequence's context after this step
    block_tables: list[torch.Tensor]  # S x [num_blocks_i] int64 block ids
    logits_indices: torch.Tensor  # [N] int64, rows whose logits are needed (last token of each)
    lora: LoraBatch | None = None  # None when no token uses an adapter
    block_size: int = 16
    decode: DecodeBatch | None = None  # batched metadata of the one-token sequences, set by the runner
    prefill: FreshPrefills | None = None  # prefills from position 0 for one varlen call (Triton kernels)
    continued: ContinuedPrefills | None = None  # chunks after cached context, one paged prefill launch (Triton)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)
