"""The Router's request path: authenticate, resolve, admit (quota), place, relay.

`RouterCore.open` does everything up to and including the first token: resolution and
quota errors, placement, and failover. A node that fails before its first token (down,
queue full, crashed, or marked unhealthy by its polls or heartbeats while the request
waited) is excluded and the request is placed again, up to --max-attempts nodes, invisibly
to the caller: nothing has been sent yet, so a retry cannot duplicate output. Because
`open` returns only once a token exists, the HTTP API can still answer an honest status
code (404, 429, 503) before it commits to a 200 event stream.

`Stream` then relays the rest one message at a time (the caller's pace is the node's pace:
see node_client.py on backpressure). After the first token a node failure cannot be hidden:
the text already delivered cannot be replayed elsewhere token-identically, so the stream
ends with UNAVAILABLE saying so. That includes a node that freezes mid-stream (a hung host, a
partition without RST): when the router's own probes mark it failed for not answering, a
stream that has had nothing from it since that silence began ends at once, instead of
hanging until HTTP/2 keepalive gives the connection up. A stream that did get deltas within
the silence is being served and runs on (a node busy enough to answer polls late, or one
refusing polls while it drains). No timer of its own decides this: a legitimately slow stream
on a node that answers its probes is never cut. Closing the stream early (client cancel,
a revoked key: open_streams.py) closes the node call, which cancels the request on the node
and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from services.common.errors import InvalidArgument, LoraplexError, ResourceExhausted, Unavailable
from services.common.fields import check_request_id
from services.common.pb.loraplex.common.v1 import generation_pb2
from services.common.pb.loraplex.inference.v1 import inference_pb2
from services.router import metrics
from services.router.auth import Authenticator, Caller
from services.router.membership import Membership, Node
from services.router.nodes import NodeFailure
from services.router.open_streams import InFlight, OpenStreams
from services.router.placement import place
from services.router.quotas import Lease, QuotaManager
from services.router.recent_adapters import RecentAdapters
from services.router.resolution import ModelEntry, Resolver, Target
from services.router.usage_metrics import UsageMeter, finish_name

log = logging.getLogger("loraplex.router")


@dataclasses.dataclass(frozen=True)
class GenerateCall:
    """One generation request, whichever API it came through."""

    model: str
    prompt: str | None = None
    #: A conversation (with any tool calls, results and definitions), passed to the node as is.
    messages: generation_pb2.ChatMessages | None = None
    sampling: generation_pb2.SamplingParams = dataclasses.field(default_factory=generation_pb2.SamplingParams)
    request_id: str = ""
    #: False for a further choice of an OpenAI `n` (openai_choices.py): the first choice pays the
    #: tokens-per-minute quota for the prompt, once, as usage counts it.
    charge_prompt: bool = True

    def node_request(self, request_id: str, target: Target) -> inference_pb2.GenerateRequest:
        # cache_scope: a tenant's requests share cached prompt KV only with its own (a hit is seen
        # in the time to first token and in usage, so sharing would tell one tenant another's prompts).
        request = inference_pb2.GenerateRequest(
            request_id=request_id, sampling=self.sampling, cache_scope=target.tenant_id,
            adapter=inference_pb2.AdapterRef(adapter_id=target.adapter_id, sha256=target.adapter_sha256,
                                             tenant_id=target.tenant_id))
        if self.messages is not None:
            request.messages.CopyFrom(self.messages)
        else:
            request.prompt = self.prompt or ""
        return request


@dataclasses.dataclass
class Completion:
    request_id: str
    target: Target
    text: str
    token_ids: list[int]
    logprobs: list[generation_pb2.TokenLogprob]
    finish_reason: int
    matched_stop: str
    usage: generation_pb2.Usage
    #: How the node's model writes tool calls (its first delta's tool_call_format; "" for none).
    tool_call_format: str = ""
    #: Where its text starts, if its model thinks (its first delta's reasoning_start).
    reasoning_start: str = ""


class Stream:
    """The deltas of one placed request; iterate once, then (or instead) `aclose`."""

    def __init__(self, request_id: str, target: Target, node: Node, deltas: AsyncIterator, first,
                 lease: Lease, membership: Membership, in_flight: InFlight, charge_prompt: bool = True,
                 tenant_name: str = "") -> None:
        self.request_id, self.target, self.node = request_id, target, node
        self._usage = UsageMeter(tenant_name, target.model)
        self._outcome = "cancelled"  # until it ends otherwise
        self._deltas, self._first, self._lease, self._membership = deltas, first, lease, membership
        self._in_flight = in_flight
        self._closed = False
        self._prompt_charged = not charge_prompt
        self._counts_prompt = charge_prompt  # this request's usage is the prompt's (one per n choices)
        self.tokens = 0
        self._last_delta_at = membership.clock()
        node.on_failed.add(self._node_marked_failed)

    def _node_marked_failed(self) -> None:
        """Ends the stream if its node was marked failed for not answering and nothing came on this
        stream since that silence began (see the module docstring)."""
        silent_since = self.node.silent_since
        if silent_since is not None and self._last_delta_at < silent_since:
            self._in_flight.cut(self._lost(f"it stopped answering mid-stream: {self.node.down_reason}"))

    async def __aiter__(self) -> AsyncIterator[generation_pb2.GenerationDelta]:
        try:
            delta = self._first
            while True:
                self._in_flight.check()  # cut while this delta was on its way: it is not passed on
                self.tokens += len(delta.token_ids)
                prompt_tokens = self._prompt_tokens(delta)
                self._lease.charge(len(delta.token_ids) + prompt_tokens)
                self._usage.count(prompt=prompt_tokens, completion=len(delta.token_ids))
                if delta.finish_reason:
                    self._outcome = finish_name(delta.finish_reason)
                    if self._counts_prompt:
                        self._usage.count(cached_prompt=delta.usage.cached_prompt_tokens)
                    self._usage.count(reasoning=delta.usage.reasoning_tokens)  # part of completion, per choice
                yield delta
                if delta.finish_reason:
                    # Read the call's end (trailers follow the last message at once), so closing
                    # it below does not cancel an RPC the node has in fact completed.
                    with contextlib.suppress(NodeFailure):
                        await anext(self._deltas, None)
                    return
                try:
                    delta = await self._in_flight.run(lambda: anext(self._deltas))
                except StopAsyncIteration:
                    raise self._lost("the node ended the stream without a finish reason") from None
                except NodeFailure as failure:
                    if failure.node_down:
                        self._membership.mark_failed(self.node, failure.error.message)
                    if not failure.retryable:
                        raise failure.error from None
                    raise self._lost(failure.error.message) from None
                self._last_delta_at = self._membership.clock()
        except LoraplexError:  # lost its node, or cut (a revoked key): not the caller's choice
            self._outcome = "error"
            raise
        finally:
            await self.aclose()

    def _prompt_tokens(self, delta: generation_pb2.GenerationDelta) -> int:
        """The prompt is charged once, as soon as the node says its length (the first delta), so
        hanging up early does not skip it; a node that only reports it in the final usage is
        charged then."""
        if self._prompt_charged:
            return 0
        tokens = delta.prompt_tokens or (delta.usage.prompt_tokens if delta.finish_reason else 0)
        self._prompt_charged = tokens > 0
        return tokens

    def _lost(self, why: str) -> Unavailable:
        metrics.MID_STREAM_FAILURES.inc()
        return Unavailable(f"inference node {self.node.address} failed after {self.tokens} tokens had been "
                           f"streamed ({why}); the partial output cannot be resumed on another node, so "
                           "retry the whole request", reason="NODE_FAILED_MID_STREAM", node=self.node.address,
                           tokens_streamed=self.tokens)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._usage.ended(self._outcome)
        self.node.on_failed.discard(self._node_marked_failed)
        try:
            await self._deltas.aclose()  # cancels the node call if it is still running
        finally:
            self._membership.finished(self.node)
            self._lease.release()
            self._in_flight.close()


async def _first_token(node: Node, deltas: AsyncIterator,
                       elsewhere: Callable[[], bool]) -> generation_pb2.GenerationDelta:
    """The node's first delta, or NodeFailure as soon as the node is marked failed meanwhile
    while another node could take the request (`elsewhere`).

    A node that freezes or drops off the network (no RST) never answers: without this, the
    request would wait for the caller's deadline (or forever) while other nodes idle. Giving up
    is safe because nothing has been sent to the caller yet; a stream past its first token is
    cut only when silent since its node went quiet (Stream: a node merely slow to answer polls
    keeps its streams).
    With no other node to go to, the request keeps waiting: a node marked failed for late
    polls may only be busy, and giving up would turn its answer into a 503.
    """
    async def read():
        return await anext(deltas)

    reading = asyncio.ensure_future(read())
    down = asyncio.ensure_future(node.down.wait())
    try:
        await asyncio.wait({reading, down}, return_when=asyncio.FIRST_COMPLETED)
        if not reading.done() and not elsewhere():
            await asyncio.wait({reading})
    finally:
        down.cancel()
        if not reading.done():
            reading.cancel()  # unwinds the node call (cancelling it on the node) before anyone closes it
            with contextlib.suppress(asyncio.CancelledError, NodeFailure, StopAsyncIteration):
                await reading
        elif not reading.cancelled():
            reading.exception()  # seen, even if we are leaving by our own cancellation
    if reading.done() and not reading.cancelled():
        return reading.result()  # NodeFailure / StopAsyncIteration are raised as the caller expects
    raise NodeFailure(Unavailable(f"inference node {node.address} was marked unhealthy ({node.down_reason}) "
                                  "before it sent a first token", reason="NODE_FAILED", node=node.address),
                      retryable=True, node_down=True)


class RouterCore:
    def __init__(self, authenticator: Authenticator, resolver: Resolver, membership: Membership,
                 quotas: QuotaManager, load_factor: float, max_attempts: int,
                 open_streams: OpenStreams | None = None, recent_adapters: RecentAdapters | None = None) -> None:
        self.authenticator, self.resolver, self.membership, self.quotas = authenticator, resolver, membership, quotas
        self.load_factor, self.max_attempts = load_factor, max_attempts
        self.open_streams = open_streams if open_streams is not None else OpenStreams()
        #: What placed requests ran with, for warming a node that joins (None: prefetch is off).
        self.recent_adapters = recent_adapters

    async def authenticate(self, authorization: str | None) -> Caller:
        return await self.authenticator.authenticate(authorization)

    async def list_models(self, caller: Caller) -> list[ModelEntry]:
        return await self.resolver.list_models(caller)

    async def resolve(self, caller: Caller, model: str) -> Target:
        return await self.resolver.resolve(caller, model)

    async def open(self, caller: Caller, call: GenerateCall, lease: Lease | None = None) -> Stream:
        """Resolves, admits and places the request; returns once its first token exists. From here
        until the stream closes, revoking the caller's key ends it (open_streams.py). With `lease`
        (from admit_together) the request is already admitted, and the stream owns the lease."""
        if call.prompt is None and call.messages is None:
            raise InvalidArgument("set prompt or messages", field="input")
        if call.messages is not None and not call.messages.messages:
            raise InvalidArgument("messages must not be empty", field="messages")
        if call.request_id:
            check_request_id(call.request_id)
        arrived = time.perf_counter()
        in_flight = self.open_streams.add(caller)
        try:
            stream = await in_flight.run(lambda: self._admit_and_place(caller, call, in_flight, lease))
        except BaseException:
            in_flight.close()
            raise
        metrics.TIME_TO_FIRST_TOKEN.labels(stream.target.base_model).observe(time.perf_counter() - arrived)
        return stream

    async def admit_together(self, caller: Caller, model: str, count: int) -> list[Lease]:
        """Quota for `count` requests to `model` at once, all or none (quotas.py). The model is
        resolved first, so a request naming no model of the caller's is a 404, not a 429."""
        await self.resolver.resolve(caller, model)
        return self._admitted(caller, count)

    def _admitted(self, caller: Caller, count: int) -> list[Lease]:
        try:
            return self.quotas.admit_together(caller.tenant_id, caller.tenant_name, count)
        except ResourceExhausted as exc:
            metrics.QUOTA_REJECTIONS.labels(caller.tenant_name, exc.reason).inc()
            raise

    async def _admit_and_place(self, caller: Caller, call: GenerateCall, in_flight: InFlight,
                               lease: Lease | None) -> Stream:
        target = await self.resolver.resolve(caller, call.model)
        if lease is None:
            (lease,) = self._admitted(caller, 1)
        try:
            return await self._place(call, target, lease, in_flight, caller.tenant_name)
        except BaseException:
            lease.release()
            raise

    async def _place(self, call: GenerateCall, target: Target, lease: Lease, in_flight: InFlight,
                     tenant_name: str) -> Stream:
        request_id = call.request_id or uuid.uuid4().hex
        request = call.node_request(request_id, target)
        if self.recent_adapters is not None:
            self.recent_adapters.record(target)
        tried: list[str] = []
        failures: list[NodeFailure] = []
        while len(tried) < self.max_attempts:
            placement = place(self.membership.placeable(), target.base_model, target.adapter_id,
                              self.load_factor, exclude=tried, tenant_id=target.tenant_id)
            if placement is None:
                break
            node = self.membership.nodes[placement.node_id]
            tried.append(node.node_id)
            metrics.PLACEMENTS.labels(placement.reason).inc()
            self.membership.started(node, target.adapter_id)
            deltas = node.client.generate(request)
            try:
                first = await _first_token(node, deltas, lambda: place(
                    self.membership.placeable(), target.base_model, target.adapter_id, self.load_factor,
                    exclude=tried) is not None)
            except (NodeFailure, StopAsyncIteration) as exc:
                await deltas.aclose()
                self.membership.finished(node)
                failure = exc if isinstance(exc, NodeFailure) else NodeFailure(
                    Unavailable(f"inference node {node.address} ended the stream before the first token"),
                    retryable=True)
                if not failure.retryable:
                    raise failure.error from None
                if failure.node_down:
                    self.membership.mark_failed(node, failure.error.message)
                log.warning("request %s: node %s failed before the first token (%s); trying another",
                            request_id, node.node_id, failure.error.message)
                metrics.RETRIES.labels(failure.error.reason).inc()
                failures.append(failure)
                continue
            except BaseException:  # cancelled while waiting for the first token
                await deltas.aclose()
                self.membership.finished(node)
                raise
            return Stream(request_id, target, node, deltas, first, lease, self.membership, in_flight,
                          call.charge_prompt, tenant_name)
        raise self._no_node(target, tried, failures)

    def _no_node(self, target: Target, tried: list[str], failures: list[NodeFailure]) -> Exception:
        base = target.base_model
        if failures and all(isinstance(f.error, ResourceExhausted) for f in failures):
            return ResourceExhausted(f"every inference node tried for base model '{base}' has a full queue; "
                                     "retry shortly", retry_after_s=1.0, reason="NODES_BUSY")
        if failures:
            return Unavailable(f"{len(tried)} inference node(s) for base model '{base}' failed before the first "
                               f"token (last: {failures[-1].error.message}); retry shortly",
                               reason="NODES_FAILED")
        if not self.membership.serves(base):
            return Unavailable(f"no inference node serves base model '{base}'", reason="NO_NODE", base_model=base)
        return Unavailable(f"no healthy inference node serves base model '{base}' right now; retry shortly",
                           reason="NO_HEALTHY_NODE", base_model=base)

    async def complete(self, caller: Caller, call: GenerateCall, lease: Lease | None = None) -> Completion:
        stream = await self.open(caller, call, lease)
        text, token_ids, logprobs = [], [], []
        final = first = None
        async for delta in stream:
            first = delta if first is None else first
            text.append(delta.text)
            token_ids.extend(delta.token_ids)
            logprobs.extend(delta.logprobs)
            final = delta
        return Completion(stream.request_id, stream.target, "".join(text), token_ids, logprobs,
                          final.finish_reason, final.matched_stop, final.usage, first.tool_call_format,
                          first.reasoning_start)
