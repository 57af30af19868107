"""OpenAI's `n` against RouterCore with a scripted node: when one choice fails before its first
token, the choices already opened are closed even if the caller is cancelled (the client
hanging up) while the others are still being unwound."""

from __future__ import annotations

import asyncio

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.router.openai_choices import choice_calls, open_all
from services.router.proxy import GenerateCall
from tests.router.test_proxy import BAD, CALLER, FakeNode, build, poll_all, token


class ByChoice(FakeNode):
    """Choice 0 (seed 0) sends a token and holds; choice 1 is refused when `refuse` is set;
    choice 2 waits for a first token that never comes and, cancelled, unwinds only once
    `unwound` is set (a node call whose cancellation takes a moment)."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse, self.unwinding, self.unwound = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def generate(self, request):
        self.requests.append(request)
        try:
            if request.sampling.seed == 0:
                yield token(0)
            elif request.sampling.seed == 1:
                await self.refuse.wait()
                raise BAD
            try:
                await asyncio.Event().wait()
            finally:
                if request.sampling.seed == 2:
                    self.unwinding.set()
                    await self.unwound.wait()
        finally:
            self.closed += 1


def test_a_caller_cancelled_while_failed_choices_unwind_still_closes_the_opened_ones():
    async def main():
        fake = ByChoice()
        core, membership, quotas = build({"a:1": fake})
        await poll_all(membership)
        node = membership.nodes["a:1"]
        calls = choice_calls(GenerateCall(model="tiny", prompt="hi", sampling=gen.SamplingParams(seed=0)), 3)
        opening = asyncio.ensure_future(open_all(core, CALLER, calls))
        while not node.on_failed:  # choice 0's stream exists (it listens to its node): its open is done
            await asyncio.sleep(0)
        fake.refuse.set()
        await fake.unwinding.wait()  # choice 1 failed; open_all is closing the others
        opening.cancel()  # the client hangs up meanwhile
        fake.unwound.set()
        await asyncio.gather(opening, return_exceptions=True)
        assert fake.closed == 3  # choice 0's node call too: it used to run on, never closed
        assert quotas.in_flight("tnt_a") == 0 and node.in_flight == 0 and len(core.open_streams) == 0

    asyncio.run(main())
