"""Per-tenant quotas: requests in flight and tokens per minute.

Concurrency is a counter taken at admission and given back when the stream ends, however
it ends. Tokens per minute is a token bucket holding at most one minute's allowance and
refilling continuously at tpm/60 per second. A request is admitted while the bucket is
positive and is charged what it really used (prompt tokens + each generated token as it
streams), so the bucket can go negative: the overshoot is bounded by the requests
already in flight, and nobody has to guess max_tokens up front (which would refuse short
requests for a long max_tokens they never use). The retry hint is the time the bucket
needs to become positive again (for concurrency: a second, as a stream's end is not
predictable). Quotas are per router process: with several routers, divide the limits.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable

from services.common.errors import ResourceExhausted


@dataclasses.dataclass(frozen=True)
class Limits:
    max_concurrent: int = 0  # 0: unlimited
    tokens_per_minute: int = 0  # 0: unlimited


@dataclasses.dataclass
class _TenantState:
    limits: Limits
    in_flight: int = 0
    bucket: float = 0.0
    refreshed: float = 0.0


class Lease:
    """One admitted request: charge tokens as they stream, release exactly once at the end."""

    def __init__(self, state: _TenantState) -> None:
        self._state = state
        self._released = False

    def charge(self, tokens: int) -> None:
        if self._state.limits.tokens_per_minute and tokens:
            self._state.bucket -= tokens

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._state.in_flight -= 1


class QuotaManager:
    def __init__(self, default: Limits, overrides: Iterable[tuple[str, Limits]] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.default, self.clock = default, clock
        self.overrides = dict(overrides)  # tenant id or name -> limits
        self._tenants: dict[str, _TenantState] = {}

    def limits_for(self, tenant_id: str, tenant_name: str) -> Limits:
        return self.overrides.get(tenant_id) or self.overrides.get(tenant_name) or self.default

    def admit(self, tenant_id: str, tenant_name: str) -> Lease:
        """A lease for one request, or ResourceExhausted with a retry hint."""
        return self.admit_together(tenant_id, tenant_name, 1)[0]

    def admit_together(self, tenant_id: str, tenant_name: str, count: int) -> list[Lease]:
        """Leases for `count` requests that only make sense together (OpenAI's n choices): all of
        them or none. One at a time, two such requests against a limit of their size could each
        take a part and both be refused."""
        state = self._state(tenant_id, tenant_name)
        limits, now = state.limits, self.clock()
        if limits.max_concurrent and state.in_flight + count > limits.max_concurrent:
            if count > limits.max_concurrent:
                message = (f"tenant '{tenant_name}' may have {limits.max_concurrent} requests in flight, and this "
                           f"one asks for {count} choices, each a request; ask for at most {limits.max_concurrent}")
            else:
                asked = "its limit" if count == 1 else (f"and this one asks for {count} choices, each a request, "
                                                         f"beyond its limit of {limits.max_concurrent}")
                message = (f"tenant '{tenant_name}' already has {state.in_flight} requests in flight, {asked}; "
                           "retry when one of them finishes")
            raise ResourceExhausted(message, retry_after_s=1.0, reason="CONCURRENCY_QUOTA",
                                    limit=limits.max_concurrent)
        if limits.tokens_per_minute:
            rate = limits.tokens_per_minute / 60.0
            state.bucket = min(float(limits.tokens_per_minute), state.bucket + (now - state.refreshed) * rate)
            state.refreshed = now
            if state.bucket <= 0:
                wait = (1 - state.bucket) / rate
                raise ResourceExhausted(
                    f"tenant '{tenant_name}' used its {limits.tokens_per_minute} tokens per minute; "
                    f"retry in {math.ceil(wait)}s", retry_after_s=wait, reason="TOKENS_PER_MINUTE_QUOTA",
                    limit=limits.tokens_per_minute)
        state.in_flight += count
        return [Lease(state) for _ in range(count)]

    def in_flight(self, tenant_id: str) -> int:
        state = self._tenants.get(tenant_id)
        return state.in_flight if state else 0

    def _state(self, tenant_id: str, tenant_name: str) -> _TenantState:
        state = self._tenants.get(tenant_id)
        limits = self.limits_for(tenant_id, tenant_name)
        if state is None:
            state = _TenantState(limits, bucket=float(limits.tokens_per_minute), refreshed=self.clock())
            self._tenants[tenant_id] = state
        state.limits = limits
        return state
