"""Requests in flight, by the tenant and API key that opened them, so that revoking the key or
deleting the tenant ends them too, not only the requests that come after.

Which change-feed events end a running request (app.py applies them):

- API_KEY_REVOKED and TENANT_DELETED do, with UNAUTHENTICATED (the status a new request with
  that key gets). They withdraw the caller's right to the service (a leaked key, an offboarded
  customer), and a stream that outlived them would keep handing output, minutes of it for a
  long generation, to whoever holds the key. The request ends wherever it is: waiting for
  resolution, queued on a node for its first token, or streaming; the node call is cancelled,
  which stops the generation on the node and frees its KV blocks.
- DEPLOYMENT_UNBOUND and ADAPTER_DELETED do not. They are routing and lifecycle changes made by
  the tenant itself, typically a rollout (bind the name to v2, delete v1): the caller is still
  entitled to the answer it asked for, the node already holds the weights it started with, and
  cutting would turn every rollout into errors for the requests in flight, as a load balancer
  drains connections on a deploy instead of resetting them. New requests see the change at once
  (resolution.py).

A key that expires while its request is in flight ends it too, at its expiry (the Registry
sends no event for an expiry; the key's expiry time came with its verification). And a
revocation that arrives while the key is being verified (the Registry answered "valid" just
before the revocation committed) is remembered: the request registers after the event, and
is ended as it registers.

A feed reset (the cursor fell out of the Registry's retained history, feed.py) ends nothing: it
says events may have been missed, not that anything was revoked, and cutting every tenant's
streams for a Registry blip would be an outage of its own. A plain reconnect replays the events
after the cursor, so a revocation committed while the feed was down still ends its streams
once the feed is back.

`InFlight.cut` is also how a stream whose node stopped answering is ended (proxy.py): one way
to end a request from outside, whoever decides it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from services.common.errors import LoraplexError, Unauthenticated
from services.router.auth import Caller

T = TypeVar("T")

#: How many revoked key ids and deleted tenant ids are remembered for requests whose key check
#: was in flight when the event arrived: that window is one Registry round trip, so the last
#: few suffice; this many costs a few MB at most.
MAX_REMEMBERED = 10_000


class InFlight:
    """One request in flight: what it awaits can be ended from outside with an error."""

    def __init__(self, caller: Caller, forget: Callable[[InFlight], None]) -> None:
        self.caller = caller
        #: Why the request was ended from outside, or None while it may run on.
        self.error: LoraplexError | None = None
        self._forget = forget
        self._awaiting: asyncio.Timeout | None = None
        self._expiry: asyncio.TimerHandle | None = None
        if caller.expires_at is not None:
            self._expiry = asyncio.get_running_loop().call_later(
                max(0.0, caller.expires_at - time.time()), self.cut, _expired(caller.key_id))

    def cut(self, error: LoraplexError) -> None:
        """Ends the request with `error`: the await in progress in `run` is cancelled (a node call
        with it), and every later `run` or `check` raises `error`. The first cut wins."""
        if self.error is not None:
            return
        self.error = error
        if self._awaiting is not None:
            # A deadline of "now" cancels the awaiting task and turns that into TimeoutError in
            # `run`, exactly as asyncio.timeout does: a cancellation of the task by anyone else
            # (the client hanging up) still arrives as CancelledError.
            self._awaiting.reschedule(asyncio.get_running_loop().time())

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    async def run(self, make: Callable[[], Awaitable[T]]) -> T:
        """`await make()`, or the cut's error if the request is cut before or meanwhile."""
        self.check()
        try:
            async with asyncio.timeout(None) as self._awaiting:
                return await make()
        except TimeoutError:
            if self.error is None:
                raise
            raise self.error from None
        finally:
            self._awaiting = None

    def close(self) -> None:
        """The request is over: no event needs to find it any more."""
        if self._expiry is not None:
            self._expiry.cancel()
        self._forget(self)


class OpenStreams:
    """Every request from `RouterCore.open` until its stream closes, by tenant (feed events
    name the tenant, so a revocation looks only at that tenant's requests)."""

    def __init__(self) -> None:
        self._by_tenant: dict[str, set[InFlight]] = {}
        self._revoked_keys: dict[str, None] = {}  # insertion-ordered sets: the oldest is dropped first
        self._deleted_tenants: dict[str, None] = {}

    def add(self, caller: Caller) -> InFlight:
        in_flight = InFlight(caller, self._forget)
        self._by_tenant.setdefault(caller.tenant_id, set()).add(in_flight)
        if caller.key_id in self._revoked_keys:  # revoked while its verification was in flight
            in_flight.cut(_revoked(caller.key_id))
        elif caller.tenant_id in self._deleted_tenants:
            in_flight.cut(_deleted(caller.tenant_name))
        return in_flight

    def _forget(self, in_flight: InFlight) -> None:
        tenant = self._by_tenant.get(in_flight.caller.tenant_id)
        if tenant is not None:
            tenant.discard(in_flight)
            if not tenant:
                del self._by_tenant[in_flight.caller.tenant_id]

    def __len__(self) -> int:
        return sum(len(requests) for requests in self._by_tenant.values())

    def key_revoked(self, tenant_id: str, key_id: str) -> None:
        _remember(self._revoked_keys, key_id)
        for in_flight in list(self._by_tenant.get(tenant_id, ())):
            if in_flight.caller.key_id == key_id:
                in_flight.cut(_revoked(key_id))

    def tenant_deleted(self, tenant_id: str) -> None:
        _remember(self._deleted_tenants, tenant_id)
        for in_flight in list(self._by_tenant.get(tenant_id, ())):
            in_flight.cut(_deleted(in_flight.caller.tenant_name))


def _remember(recent: dict[str, None], item: str) -> None:
    recent[item] = None
    if len(recent) > MAX_REMEMBERED:
        del recent[next(iter(recent))]


def _revoked(key_id: str) -> Unauthenticated:
    return Unauthenticated(f"API key {key_id} was revoked while this request was in progress; the rest of its "
                           "output is withheld", reason="API_KEY_REVOKED")


def _expired(key_id: str) -> Unauthenticated:
    return Unauthenticated(f"API key {key_id} expired while this request was in progress; the rest of its "
                           "output is withheld", reason="API_KEY_EXPIRED")


def _deleted(tenant_name: str) -> Unauthenticated:
    return Unauthenticated(f"tenant {tenant_name} was deleted while this request was in progress; the rest of "
                           "its output is withheld", reason="TENANT_DELETED")
