"""OpenAI's `n` against RouterCore with a scripted node: when one choice fails before its first
token, the choices already opened are closed even if the caller is cancelled (the client
hanging up) while the others are still being unwound; a streamed answer's usage is the one
the same answer unstreamed reports, whichever choice finishes first."""

from __future__ import annotations

import asyncio

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.router import openai_schema as schema
from services.router.http_api import chat_events
from services.router.openai_choices import choice_calls, complete_all, open_all
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


class CachedByChoice(FakeNode):
    """Choice 1 (seed 1) finishes first, having found part of the prompt in the node's prefix
    cache; choice 0, which computed it, finishes last."""

    async def generate(self, request):
        choice = request.sampling.seed
        steps = 3 if choice == 0 else 1
        for i in range(steps):
            await asyncio.sleep(0)
            delta = token(i, final=i == steps - 1)
            delta.usage.cached_prompt_tokens = 4 * choice if delta.finish_reason else 0
            yield delta


def test_a_streamed_n_answers_usage_is_the_unstreamed_ones_whichever_choice_finishes_first():
    async def main():
        core, membership, _ = build({"a:1": CachedByChoice()})
        await poll_all(membership)
        calls = choice_calls(GenerateCall(model="tiny", prompt="hi", sampling=gen.SamplingParams(seed=0)), 2)
        options = schema.Options(stream=True, include_usage=True, n=2)
        whole = schema.chat_completion(await complete_all(core, CALLER, calls), "id", 0, options)["usage"]
        streamed = [chunk async for chunk in chat_events(await open_all(core, CALLER, calls), "id", 0, options)]
        assert whole["prompt_tokens_details"]["cached_tokens"] == 0  # choice 0's: the prompt once
        assert streamed[-1]["usage"] == whole  # it took the first choice to finish

    asyncio.run(main())
