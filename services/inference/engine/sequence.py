"""Per-request state inside the engine: tokens, KV blocks, status."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from services.inference.engine.prefix_cache import BlockHashes
from services.inference.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from services.inference.engine.logits_processors import PenaltyCounts
    from services.inference.engine.structured import JsonGrammar


#: What a reserved token reads until the sampled one replaces it: a valid id, so nothing that
#: packs a step's token list can fail on it, though the step takes the real id from the device.
RESERVED_TOKEN_ID = 0


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class FinishReason(enum.Enum):
    STOP = enum.auto()  # EOS token, stop string, or a complete structured-output value
    LENGTH = enum.auto()  # max_tokens or the context length
    ABORTED = enum.auto()  # cancelled by the client or the engine


class Sequence:
    """One generation request as the scheduler, block manager and model runner see it.

    token_ids holds the prompt followed by the generated tokens. num_cached_tokens counts the
    leading tokens whose KV is already in the paged cache: the next forward computes tokens
    [num_cached_tokens, num_cached_tokens + n). After a preemption it drops to 0 and all tokens,
    generated ones included, are recomputed as a prefill (less what the prefix cache still
    holds: with prefix caching, admission starts num_cached_tokens past the shared blocks).

    grammar (structured output) follows the generated tokens: every appended token advances it.
    A preemption keeps the tokens, so it keeps the grammar's state too.
    """

    def __init__(
        self,
        seq_id: int,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        adapter_key: str | None = None,
        block_size: int = 16,
        request_id: str = "",
        adapter_sha256: str = "",
        cache_scope: str = "",
        grammar: JsonGrammar | None = None,
    ) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.sampling = sampling
        self.adapter_key = adapter_key  # None = base model only
        self.adapter_sha256 = adapter_sha256  # the adapter bytes it must run with ("" = any)
        self.block_size = block_size
        self.cache_scope = cache_scope  # shares cached prompt KV only with sequences of the same scope
        self.grammar = grammar  # None = free text
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        # Prefix caching (block_manager.py): the hashes of its full blocks, how many leading
        # blocks of block_table the cache knows, and the prompt tokens read from the cache
        # without having computed them itself (usage's cached tokens).
        self.block_hashes: BlockHashes | None = None
        self.num_published_blocks = 0
        self.num_cached_prompt_tokens = 0
        # Token counts for its penalties on the logits' device, made by the sampler on first
        # use and updated one step's tokens at a time (logits_processors.py).
        self.penalty_counts: PenaltyCounts | None = None
        self.finish_reason: FinishReason | None = None
        self.arrival_index = -1  # set by Scheduler.add
        self.num_preemptions = 0
        # 1 while the last token is a stand-in for one sampled but not yet read back: an
        # overlapped step (overlap.py) already computes its KV from the device's copy.
        self.num_reserved_tokens = 0

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, adapter={self.adapter_key!r}, {self.status.name}, "
                f"tokens={self.num_tokens}, cached={self.num_cached_tokens})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_blocks(self) -> int:
        """KV blocks needed to hold every token's KV."""
        return -(-self.num_tokens // self.block_size)

    @property
    def num_uncached_tokens(self) -> int:
        return self.num_tokens - self.num_cached_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def reserve_token(self) -> None:
        """Holds the place of the token being sampled on the device (never read: the step that
        computes it takes the id from the device), so the next step can be scheduled now."""
        if self.num_reserved_tokens or self.grammar is not None:
            raise RuntimeError(f"{self!r} cannot reserve a token (one is reserved already, or a grammar "
                               "needs each token before the next)")
        self.token_ids.append(RESERVED_TOKEN_ID)
        self.num_reserved_tokens = 1

    def append_token(self, token_id: int) -> None:
        """Appends a sampled token, or puts it in the place reserve_token held for it."""
        if self.num_reserved_tokens:
            self.token_ids[-1] = token_id
            self.num_reserved_tokens = 0
            return  # no grammar: reserve_token refuses sequences with one
        self.token_ids.append(token_id)
        if self.grammar is not None:
            self.grammar.advance(token_id)
