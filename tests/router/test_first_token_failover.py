"""A node marked failed (missed heartbeats, refused or late polls) while requests wait there
for their first token: they are placed again elsewhere, invisibly, instead of waiting for the
caller's deadline (or forever) on a node that froze or fell off the network; with no other
node to go to they keep waiting (the node may only be busy); a stream past its first token that
the node still serves is not cut by the mark (test_frozen_node.py has the one that is)."""

from __future__ import annotations

import asyncio

from services.router.proxy import GenerateCall
from tests.router.test_proxy import CALLER, FakeNode, build, drain, poll_all


class Frozen(FakeNode):
    """Takes the call and never answers (SIGSTOP, a partition without RST)."""

    async def generate(self, request):
        self.requests.append(request)
        try:
            await asyncio.Event().wait()
            yield  # pragma: no cover - never reached
        finally:
            self.closed += 1


class Slow(FakeNode):
    """Answers once `go` is set: a node busy enough to miss its polls."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()

    async def generate(self, request):
        await self.go.wait()
        async for delta in super().generate(request):
            yield delta


async def called(fake: FakeNode) -> None:
    for _ in range(1000):
        if fake.requests:
            return
        await asyncio.sleep(0)
    raise AssertionError("the request never reached the node")


def test_a_request_waiting_on_a_node_marked_failed_is_placed_again_elsewhere():
    async def main():
        frozen, live = Frozen(), FakeNode()
        core, membership, quotas = build({"a:1": frozen, "b:1": live})
        await poll_all(membership)
        a, b = membership.nodes["a:1"], membership.nodes["b:1"]
        membership.mark_failed(b, "test: keep the first placement on a:1")
        opening = asyncio.ensure_future(core.open(CALLER, GenerateCall(model="tiny", prompt="hi")))
        await called(frozen)
        await membership.poll(b)  # b is back
        membership.mark_failed(a, "no heartbeat for 0.7s")
        stream = await asyncio.wait_for(opening, 10)  # bounds a hang; never a timing check
        assert stream.node is b and await drain(stream) == [0, 1, 2]
        assert frozen.closed == 1 and len(live.requests) == 1  # the frozen call was cancelled
        assert a.in_flight == b.in_flight == 0 and quotas.in_flight(CALLER.tenant_id) == 0

    asyncio.run(main())


def test_with_no_other_node_a_request_keeps_waiting_on_a_node_marked_failed():
    async def main():
        slow = Slow()
        core, membership, quotas = build({"a:1": slow})
        await poll_all(membership)
        opening = asyncio.ensure_future(core.open(CALLER, GenerateCall(model="tiny", prompt="hi")))
        for _ in range(1000):  # until the request waits on the node
            if membership.nodes["a:1"].in_flight:
                break
            await asyncio.sleep(0)
        membership.mark_failed(membership.nodes["a:1"], "three late polls")
        for _ in range(100):
            await asyncio.sleep(0)
        assert not opening.done()  # not turned into "no healthy node" while the node works
        slow.go.set()
        stream = await asyncio.wait_for(opening, 10)  # bounds a hang; never a timing check
        assert await drain(stream) == [0, 1, 2]
        assert membership.nodes["a:1"].in_flight == 0 and quotas.in_flight(CALLER.tenant_id) == 0

    asyncio.run(main())


def test_a_stream_its_node_still_serves_is_not_cut_when_the_node_is_marked_failed():
    """Marked for refusing polls (a node draining its streams), or for late polls that began
    before this stream's last token (a node busy, not frozen): the stream runs to its end."""
    async def main():
        for late_polls in (False, True):
            fake = FakeNode()
            core, membership, quotas = build({"a:1": fake})
            await poll_all(membership)
            silent_since = membership.clock() if late_polls else None
            stream = await core.open(CALLER, GenerateCall(model="tiny", prompt="hi"))
            membership.mark_failed(membership.nodes["a:1"], "three late polls", silent_since=silent_since)
            assert await drain(stream) == [0, 1, 2]
            assert membership.nodes["a:1"].in_flight == 0 and quotas.in_flight(CALLER.tenant_id) == 0

    asyncio.run(main())
