"""One request's usage on the router's per-tenant metrics (metrics.py says which series).

Counted as the deltas stream, so a request that is cut or cancelled still shows what it used,
as the tokens-per-minute quota charges it; the outcome is counted once, when the stream closes.
"""

from __future__ import annotations

from services.common.pb.loraplex.common.v1 import generation_pb2
from services.router import metrics


def finish_name(finish_reason: int) -> str:
    """FINISH_REASON_LENGTH -> "length"."""
    return generation_pb2.FinishReason.Name(finish_reason).removeprefix("FINISH_REASON_").lower()


class UsageMeter:
    def __init__(self, tenant_name: str, model: str) -> None:
        self._labels = (tenant_name, model)

    def count(self, prompt: int = 0, completion: int = 0, cached_prompt: int = 0, reasoning: int = 0) -> None:
        for kind, tokens in (("prompt", prompt), ("completion", completion), ("cached_prompt", cached_prompt),
                             ("reasoning", reasoning)):
            if tokens:
                metrics.TENANT_TOKENS.labels(*self._labels, kind).inc(tokens)

    def ended(self, outcome: str) -> None:
        """Once per request (Stream.aclose runs once)."""
        metrics.TENANT_REQUESTS.labels(*self._labels, outcome).inc()
