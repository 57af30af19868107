"""RouterCore and Membership with scripted nodes: failover before the first token, a clear
UNAVAILABLE after it, no retry for the request's own faults, bookkeeping on every exit,
and node health coming and going."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.common import errors
from services.common.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.router.auth import Caller
from services.common.feed_cache import FeedState
from services.router.membership import Health, Membership
from services.router.nodes import NodeFailure, NodeStats
from services.router.proxy import GenerateCall, RouterCore
from services.router.quotas import Limits, QuotaManager
from services.router.resolution import Resolver, Target

CALLER = Caller("tnt_a", "acme", "key_1")


def token(i: int, final: bool = False) -> gen.GenerationDelta:
    delta = gen.GenerationDelta(text=f"t{i}", token_ids=[i])
    if final:
        delta.finish_reason = gen.FINISH_REASON_LENGTH
        delta.usage.prompt_tokens, delta.usage.completion_tokens = 5, i + 1
    return delta


DOWN = NodeFailure(Unavailable("connection refused"), retryable=True, node_down=True)
SLOW = NodeFailure(Unavailable("DEADLINE_EXCEEDED"), retryable=True, node_down=True, timed_out=True)
BUSY = NodeFailure(ResourceExhausted("queue full"), retryable=True)
BAD = NodeFailure(NotFound("adapter adp_1 not found"), retryable=False)


class FakeNode:
    def __init__(self, plan=None, base: str = "tiny") -> None:
        self.plan = plan if plan is not None else [token(0), token(1), token(2, final=True)]
        self.base, self.stats_fail, self.requests, self.closed = base, False, [], 0

    async def stats(self, timeout_s):
        if self.stats_fail:
            raise self.stats_fail if isinstance(self.stats_fail, NodeFailure) else DOWN
        return NodeStats()

    async def base_model(self, timeout_s):
        return self.base

    async def generate(self, request):
        self.requests.append(request)
        try:
            for step in self.plan:
                if isinstance(step, NodeFailure):
                    raise step
                await asyncio.sleep(0)
                yield step
        finally:
            self.closed += 1

    async def close(self):
        pass


class Catalog:
    async def resolve_deployment(self, name, tenant_id):
        if name == "fin":
            return Target("fin", "tiny", tenant_id, "adp_1", "sha")
        raise NotFound("no")

    async def get_base_model(self, name):
        if name in ("tiny", "other"):
            return name
        raise NotFound("no")


def build(fakes: dict[str, FakeNode], limits: Limits = Limits()) -> tuple[RouterCore, Membership, QuotaManager]:
    feed = FeedState()
    membership = Membership(lambda address: fakes[address], poll_s=1, timeout_s=1, heartbeat_s=1)
    for address in fakes:
        membership.add_static(address)
    quotas = QuotaManager(limits)
    core = RouterCore(None, Resolver(Catalog(), 60, feed), membership, quotas, 1.25, 3)
    return core, membership, quotas


async def poll_all(membership: Membership) -> None:
    for node in list(membership.nodes.values()):
        await membership.poll(node)


async def drain(stream) -> list[int]:
    return [t for delta in [d async for d in stream] for t in delta.token_ids]


def test_a_node_failing_before_the_first_token_is_retried_elsewhere_invisibly():
    async def main():
        fakes = {"a:1": FakeNode([DOWN]), "b:1": FakeNode([BUSY]), "c:1": FakeNode()}
        core, membership, quotas = build(fakes)
        await poll_all(membership)
        membership.nodes["c:1"].in_flight = 3  # least attractive: the failing nodes are tried first
        membership.nodes["c:1"].in_flight_at_report = 3
        stream = await core.open(CALLER, GenerateCall(model="fin", prompt="hi"))
        assert await drain(stream) == [0, 1, 2]
        assert [len(f.requests) for f in fakes.values()] == [1, 1, 1]  # each node tried once
        assert membership.nodes["a:1"].health is Health.UNHEALTHY  # down: no new requests
        assert membership.nodes["b:1"].health is Health.HEALTHY  # a full queue is not a dead node
        assert all(f.closed == 1 for f in fakes.values())
        assert [n.in_flight for n in membership.nodes.values()] == [0, 0, 3] and quotas.in_flight("tnt_a") == 0
        request = fakes["c:1"].requests[0]
        assert request.adapter.adapter_id == "adp_1" and request.adapter.sha256 == "sha"
        assert request.adapter.tenant_id == "tnt_a" and request.prompt == "hi"

    asyncio.run(main())


def test_a_failure_after_the_first_token_ends_the_stream_with_a_clear_unavailable():
    async def main():
        fakes = {"a:1": FakeNode([token(0), token(1), DOWN]), "b:1": FakeNode()}
        core, membership, quotas = build(fakes)
        await poll_all(membership)
        membership.nodes["b:1"].health = Health.UNHEALTHY  # make the placement land on a:1
        hi = gen.ChatMessages(messages=[gen.ChatMessage(role="user", content="hi")])
        stream = await core.open(CALLER, GenerateCall(model="tiny", messages=hi))
        seen = []
        with pytest.raises(Unavailable) as lost:
            async for delta in stream:
                seen += delta.token_ids
        assert seen == [0, 1] and len(fakes["b:1"].requests) == 0
        assert "after 2 tokens" in lost.value.message and "retry the whole request" in lost.value.message
        assert lost.value.reason == "NODE_FAILED_MID_STREAM"
        assert membership.nodes["a:1"].health is Health.UNHEALTHY
        assert membership.nodes["a:1"].in_flight == 0 and quotas.in_flight("tnt_a") == 0

    asyncio.run(main())


def test_the_requests_own_faults_are_not_retried():
    async def main():
        fakes = {"a:1": FakeNode([BAD]), "b:1": FakeNode([BAD])}
        core, membership, quotas = build(fakes)
        await poll_all(membership)
        with pytest.raises(NotFound, match="adp_1"):
            await core.open(CALLER, GenerateCall(model="fin", prompt="hi"))
        assert sum(len(f.requests) for f in fakes.values()) == 1
        assert quotas.in_flight("tnt_a") == 0

    asyncio.run(main())


def test_no_node_busy_nodes_and_unhealthy_nodes_have_distinct_answers():
    async def main():
        core, membership, _ = build({"a:1": FakeNode([BUSY]), "b:1": FakeNode([BUSY])})
        await poll_all(membership)
        with pytest.raises(ResourceExhausted) as busy:
            await core.open(CALLER, GenerateCall(model="tiny", prompt="hi"))
        assert busy.value.reason == "NODES_BUSY" and busy.value.retry_after_s > 0
        with pytest.raises(Unavailable) as none:
            await core.open(CALLER, GenerateCall(model="other", prompt="hi"))
        assert none.value.reason == "NO_NODE" and "'other'" in none.value.message
        for node in membership.nodes.values():
            membership.mark_failed(node, "test")
        with pytest.raises(Unavailable) as unhealthy:
            await core.open(CALLER, GenerateCall(model="tiny", prompt="hi"))
        assert unhealthy.value.reason == "NO_HEALTHY_NODE"

    asyncio.run(main())


def test_closing_a_stream_early_closes_the_node_call_and_returns_quota():
    async def main():
        fake = FakeNode([token(i) for i in range(100)])
        core, membership, quotas = build({"a:1": fake}, Limits(max_concurrent=1))
        await poll_all(membership)
        stream = await core.open(CALLER, GenerateCall(model="tiny", prompt="hi"))
        with pytest.raises(ResourceExhausted):
            await core.open(CALLER, GenerateCall(model="tiny", prompt="hi"))
        async for _ in stream:
            break
        await stream.aclose()
        assert fake.closed == 1 and membership.nodes["a:1"].in_flight == 0 and quotas.in_flight("tnt_a") == 0
        await (await core.open(CALLER, GenerateCall(model="tiny", prompt="hi"))).aclose()

    asyncio.run(main())


def test_a_stream_cancelled_after_one_token_still_pays_for_its_prompt():
    async def main():
        first = token(0)
        first.prompt_tokens = 1000  # the node tells the prompt's length on the first message
        fake = FakeNode([first] + [token(i) for i in range(1, 100)])
        core, membership, quotas = build({"a:1": fake}, Limits(tokens_per_minute=600))
        quotas.clock = lambda: 0.0  # no refill during the test
        await poll_all(membership)
        stream = await core.open(CALLER, GenerateCall(model="tiny", prompt="long prompt"))
        async for _ in stream:
            break  # read one token and hang up: the final usage never arrives
        await stream.aclose()
        with pytest.raises(ResourceExhausted) as refused:  # 600 - 1001 tokens left
            await core.open(CALLER, GenerateCall(model="tiny", prompt="again"))
        assert refused.value.reason == "TOKENS_PER_MINUTE_QUOTA"

        # A node that reports the prompt only in the final usage: 5 prompt + 2 tokens, charged once.
        for limit, refused_after in ((7, True), (8, False)):
            core, membership, quotas = build({"a:1": FakeNode([token(0), token(1, final=True)])},
                                             Limits(tokens_per_minute=limit))
            quotas.clock = lambda: 0.0
            await poll_all(membership)
            assert await drain(await core.open(CALLER, GenerateCall(model="tiny", prompt="x"))) == [0, 1]
            try:
                await (await core.open(CALLER, GenerateCall(model="tiny", prompt="x"))).aclose()
                refused = False
            except ResourceExhausted:
                refused = True
            assert refused is refused_after

    asyncio.run(main())


def test_a_cancel_while_waiting_for_the_first_token_cleans_up():
    async def main():
        gate = asyncio.Event()

        class Slow(FakeNode):
            async def generate(self, request):
                try:
                    await gate.wait()
                    yield token(0, final=True)
                finally:
                    self.closed += 1

        fake = Slow()
        core, membership, quotas = build({"a:1": fake})
        await poll_all(membership)
        task = asyncio.ensure_future(core.open(CALLER, GenerateCall(model="tiny", prompt="hi")))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fake.closed == 1 and membership.nodes["a:1"].in_flight == 0 and quotas.in_flight("tnt_a") == 0

    asyncio.run(main())


def test_unhealthy_static_nodes_are_retried_and_come_back():
    async def main():
        fake = FakeNode()
        _, membership, _ = build({"a:1": fake})
        fake.stats_fail = True
        await poll_all(membership)
        assert membership.placeable() == []
        fake.stats_fail = False
        await poll_all(membership)
        assert [v.node_id for v in membership.placeable()] == ["a:1"]

    asyncio.run(main())


def test_late_health_polls_take_a_node_out_only_when_they_come_in_a_row():
    async def main():
        fake = FakeNode()
        _, membership, _ = build({"a:1": fake})  # slow_polls=3, the default
        await poll_all(membership)
        placeable = lambda: [v.node_id for v in membership.placeable()]  # noqa: E731
        fake.stats_fail = SLOW
        for _ in range(2):
            await poll_all(membership)
            assert placeable() == ["a:1"]  # busy for a moment: still taking requests
        fake.stats_fail = False
        await poll_all(membership)  # an answer in time starts the count again
        fake.stats_fail = SLOW
        for _ in range(2):
            await poll_all(membership)
        assert placeable() == ["a:1"]
        await poll_all(membership)  # the third late answer in a row
        assert placeable() == []
        fake.stats_fail = False
        await poll_all(membership)
        assert placeable() == ["a:1"]
        fake.stats_fail = SLOW
        await poll_all(membership)
        fake.stats_fail = DOWN  # refused: out at once, late answers before it or not
        await poll_all(membership)
        assert placeable() == []

    asyncio.run(main())


def test_a_node_out_for_refusing_is_silent_only_after_late_polls_in_a_row():
    """A draining node (NOT_SERVING) finishes its streams, and they end once it goes silent; one
    late answer from it is a busy moment, not silence, as for a healthy node."""
    async def main():
        fake = FakeNode()
        _, membership, _ = build({"a:1": fake})  # slow_polls=3
        await poll_all(membership)
        node = membership.nodes["a:1"]
        fake.stats_fail = DOWN
        await poll_all(membership)
        assert node.health is Health.UNHEALTHY and node.silent_since is None
        fake.stats_fail = SLOW
        for _ in range(2):
            await poll_all(membership)
            assert node.silent_since is None
        await poll_all(membership)
        assert node.silent_since is not None

    asyncio.run(main())


def test_only_a_deadline_counts_as_a_late_answer():
    from services.router.node_client import failure_of

    def failure(code):
        return failure_of(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "x"), "a:1")

    assert failure(grpc.StatusCode.DEADLINE_EXCEEDED).timed_out
    assert failure(grpc.StatusCode.DEADLINE_EXCEEDED).node_down
    assert not failure(grpc.StatusCode.UNAVAILABLE).timed_out and failure(grpc.StatusCode.UNAVAILABLE).node_down


@pytest.mark.parametrize("reason", sorted(errors.DEPENDENCY_REASONS))
def test_a_node_whose_registry_cannot_deliver_an_adapter_stays_in_service(reason):
    """An UNAVAILABLE blaming the adapter's source (the Registry down, bytes corrupted): the node
    still serves every other request, so it is tried elsewhere and not taken out of service (a
    Registry outage took every node that missed an adapter out, base-model traffic with them)."""
    from services.common.rpc import to_rpc_status
    from services.router.node_client import failure_of

    status = to_rpc_status(errors.Unavailable("registry r:1 failed to send adapter adp_1", reason=reason))
    failure = failure_of(grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                              grpc.aio.Metadata(*status.trailing_metadata), status.details), "a:1")
    assert failure.retryable and not failure.node_down
    assert failure.error.reason == reason and "could not load the adapter" in failure.error.message


def test_a_drained_static_node_returns_to_service_when_registered_again():
    async def main():
        _, membership, _ = build({"a:1": FakeNode()})
        await poll_all(membership)
        membership.deregister("a:1")
        await poll_all(membership)
        assert membership.placeable() == [] and membership.nodes["a:1"].health is Health.DRAINING
        with pytest.raises(InvalidArgument):  # only with its own address
            membership.register("a:1", "b:2", "tiny")
        membership.register("a:1", "a:1", "tiny")
        await poll_all(membership)
        assert [v.node_id for v in membership.placeable()] == ["a:1"]
        with pytest.raises(InvalidArgument):  # in service: still not a registered node's id
            membership.register("a:1", "a:1", "tiny")

    asyncio.run(main())


def test_client_request_ids_are_printable_and_bounded():
    async def main():
        core, membership, _ = build({"a:1": FakeNode()})
        await poll_all(membership)
        for bad in ("two words", "line\nbreak", "x" * 129, "naïve"):
            with pytest.raises(InvalidArgument) as caught:
                await core.open(CALLER, GenerateCall(model="fin", prompt="hi", request_id=bad))
            assert caught.value.metadata["field"] == "request_id"
        stream = await core.open(CALLER, GenerateCall(model="fin", prompt="hi", request_id="trace-" + "x" * 122))
        assert stream.request_id == "trace-" + "x" * 122
        await drain(stream)

    asyncio.run(main())


def test_registered_nodes_heartbeat_expire_and_drain():
    async def main():
        now = [0.0]
        membership = Membership(lambda address: FakeNode(), poll_s=1, timeout_s=1, heartbeat_s=2,
                                clock=lambda: now[0])
        assert membership.register("n1", "10.0.0.1:5", "tiny") == 2
        membership.heartbeat("n1", NodeStats(running_requests=3, resident_adapter_ids=("adp_1",)))
        assert membership.placeable() == []  # not before the router has reached the node itself
        await poll_all(membership)
        (view,) = membership.placeable()
        assert view.load == 3 and "adp_1" in view.resident
        now[0] = 6.5  # three intervals without a heartbeat
        await poll_all(membership)
        assert membership.placeable() == []
        membership.heartbeat("n1", NodeStats())
        await poll_all(membership)
        assert len(membership.placeable()) == 1
        node = membership.nodes["n1"]
        membership.started(node, "adp_2")
        membership.deregister("n1")
        assert membership.placeable() == [] and "n1" in membership.nodes  # draining its request
        membership.finished(node)
        membership.heartbeat("n1", NodeStats())  # still alive: stays drained, not forgotten
        await poll_all(membership)
        assert membership.placeable() == [] and membership.nodes["n1"].health is Health.DRAINING
        now[0] = 13.0  # then silent: it has shut down
        await poll_all(membership)
        assert "n1" not in membership.nodes
        with pytest.raises(NotFound):
            membership.heartbeat("n1", NodeStats())

    asyncio.run(main())


def test_the_proxy_pulls_from_the_node_only_as_fast_as_the_caller_reads():
    async def main():
        produced = []

        class Endless(FakeNode):
            async def generate(self, request):
                try:
                    i = 0
                    while True:
                        produced.append(i)
                        yield token(i)
                        i += 1
                finally:
                    self.closed += 1

        fake = Endless()
        core, membership, _ = build({"a:1": fake})
        await poll_all(membership)
        stream = await core.open(CALLER, GenerateCall(model="tiny", prompt="hi"))
        seen = 0
        async for _ in stream:
            seen += 1
            await asyncio.sleep(0.01)  # a slow reader: the node stream must not run ahead
            if seen == 5:
                break
        assert len(produced) == 5  # no read-ahead buffer between node and caller: backpressure holds
        await stream.aclose()
        assert fake.closed == 1

    asyncio.run(main())


@pytest.mark.parametrize(("node_id", "address", "base", "field"), [
    ("", "h:1", "tiny", "node_id"), ("n", "nohost", "tiny", "address"), ("n", "h:99999", "tiny", "address"),
    ("n", "h:1", "", "base_model")])
def test_registration_checks_its_fields(node_id, address, base, field):
    from services.common.errors import InvalidArgument

    membership = Membership(lambda address: FakeNode(), poll_s=1, timeout_s=1, heartbeat_s=1)
    with pytest.raises(InvalidArgument) as caught:
        membership.register(node_id, address, base)
    assert caught.value.metadata["field"] == field
