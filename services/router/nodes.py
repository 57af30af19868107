"""What the Router needs from an inference node, as plain types (the gRPC side is node_client.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Protocol

from services.common.errors import LoraplexError
from services.common.pb.loraplex.common.v1 import generation_pb2
from services.common.pb.loraplex.inference.v1 import inference_pb2


@dataclasses.dataclass(frozen=True)
class NodeStats:
    running_requests: int = 0
    waiting_requests: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    adapter_pages_used: int = 0
    adapter_pages_total: int = 0
    resident_adapter_ids: tuple[str, ...] = ()

    @property
    def load(self) -> int:
        return self.running_requests + self.waiting_requests


class NodeFailure(Exception):
    """A node call that failed. `error` is what the caller would see if nobody retried.

    retryable: another node may well succeed (node down, queue full, internal error);
    False for the request's own fault (bad sampling, unknown adapter) that every node
    would refuse alike. node_down: the node itself is unreachable; stop placing on it.
    timed_out: the node did not answer within the call's deadline (it may only be busy).
    """

    def __init__(self, error: LoraplexError, *, retryable: bool, node_down: bool = False,
                 timed_out: bool = False) -> None:
        super().__init__(error.message)
        self.error, self.retryable, self.node_down, self.timed_out = error, retryable, node_down, timed_out


class NodeClient(Protocol):
    async def stats(self, timeout_s: float) -> NodeStats: ...

    async def base_model(self, timeout_s: float) -> str: ...

    async def prefetch_adapter(self, adapter_id: str, sha256: str, timeout_s: float) -> str:
        """Has the node fetch the adapter into its host tier (no device pages); returns the tier
        it is in now, HOST or DEVICE (resident already). NodeFailure on any error."""

    def generate(self, request: inference_pb2.GenerateRequest) -> AsyncIterator[generation_pb2.GenerationDelta]:
        """Streams deltas; raises NodeFailure. Closing the iterator early cancels the request on
        the node (its KV blocks are freed)."""

    async def close(self) -> None: ...
