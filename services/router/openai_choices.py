"""OpenAI's `n`: several choices for one request, each its own generation on the nodes.

Each choice is a request of its own to RouterCore (placement, failover, quotas). The choices are
admitted together, all or none: a tenant limited to 4 requests at a time gets a 429 for n = 8, and
two n = 2 requests against a limit of 2 cannot each take one place and both be refused.
All of them must reach their first token before the answer starts, so an error before it is
still a real status code for the whole request, and the choices already opened are closed.
After that, a choice that fails ends the response with an error event, as one choice would.

Seeds: with `seed`, choice i draws with seed + i, so the choices differ from one another and the
request stays reproducible (choice 0 is exactly what n = 1 gives). Without one, each choice
draws from its node's own randomness. Greedy choices are all alike, as OpenAI's are.

Usage counts the prompt once and every choice's completion tokens, as OpenAI reports it, and
the tenant's tokens-per-minute quota is charged the same: a tenant budgeting by the usage it is
shown is not throttled for prompts it is not shown.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.router.auth import Caller
from services.router.proxy import Completion, GenerateCall, RouterCore, Stream
from services.router.quotas import Lease

#: The most choices one request may ask for: each is a full generation on a node.
MAX_CHOICES = 16

T = TypeVar("T")


def choice_calls(call: GenerateCall, n: int) -> list[GenerateCall]:
    """The n requests behind n choices (see the module docstring on seeds)."""
    calls = [call]
    for index in range(1, n):
        sampling = gen.SamplingParams()
        sampling.CopyFrom(call.sampling)
        if sampling.HasField("seed"):
            sampling.seed = (sampling.seed + index) % 2**64
        calls.append(dataclasses.replace(call, sampling=sampling, charge_prompt=False))
    return calls


async def complete_all(core: RouterCore, caller: Caller, calls: list[GenerateCall]) -> list[Completion]:
    """Every choice's completion; the first failure cancels the others and is raised."""
    if len(calls) == 1:
        return [await core.complete(caller, calls[0])]
    return await _admitted_together(core, caller, calls, core.complete)


async def open_all(core: RouterCore, caller: Caller, calls: list[GenerateCall]) -> Streams:
    """Every choice's stream, each past its first token; on a failure the others are closed."""
    if len(calls) == 1:
        return Streams([await core.open(caller, calls[0])])
    return Streams(await _admitted_together(core, caller, calls, core.open))


async def _admitted_together(core: RouterCore, caller: Caller, calls: list[GenerateCall],
                             run: Callable[[Caller, GenerateCall, Lease], Awaitable[T]]) -> list[T]:
    leases = await core.admit_together(caller, calls[0].model, len(calls))
    try:
        return await _together([run(caller, call, lease) for call, lease in zip(calls, leases)])
    except BaseException:
        for lease in leases:  # those a choice never took over (cancelled before it started); idempotent
            lease.release()
        raise


async def _together(work: list[Awaitable[T]]) -> list[T]:
    """All results, or the first failure as it is (not in an ExceptionGroup: callers map it to
    a status) after cancelling the rest and closing the streams already opened."""
    tasks = [asyncio.ensure_future(item) for item in work]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        closing = asyncio.ensure_future(_close_streams(tasks))
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            # Cancelled while the others unwind (the client hanging up as a choice failed): the
            # streams already opened must still be closed, or each holds its lease and node call
            # for good. asyncio.wait, unlike awaiting the task, does not cancel it with us.
            await asyncio.wait({closing})
            raise
        raise


async def _close_streams(tasks: list[asyncio.Future]) -> None:
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(result, Stream):
            await result.aclose()


class Streams:
    """The streams of one response's choices, read together in the order their deltas arrive."""

    def __init__(self, streams: list[Stream]) -> None:
        self.streams = streams
        self.request_id = streams[0].request_id
        self.target = streams[0].target
        #: The reads in flight (task -> choice index): `aclose` ends them before it closes the
        #: streams, which cannot be closed while a read is running inside them.
        self._reads: dict[asyncio.Future, int] = {}
        #: Each choice's final usage, by index (not in the order they finish: see `usage`).
        self._usages: list[gen.Usage | None] = [None] * len(streams)

    async def deltas(self) -> AsyncIterator[tuple[int, gen.GenerationDelta]]:
        """(choice index, delta). One read is outstanding per stream at a time, so each node
        still goes at its caller's pace (node_client.py on backpressure)."""
        if len(self.streams) == 1:
            async for delta in self.streams[0]:
                yield self._seen(0, delta)
            return
        readers = [aiter(stream) for stream in self.streams]
        pending = self._reads
        pending.update({asyncio.ensure_future(anext(reader)): index for index, reader in enumerate(readers)})
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=pending.__getitem__):
                    index = pending.pop(task)
                    try:
                        delta = task.result()
                    except StopAsyncIteration:
                        continue
                    yield self._seen(index, delta)
                    pending[asyncio.ensure_future(anext(readers[index]))] = index
        finally:
            await self._end_reads()

    def _seen(self, index: int, delta: gen.GenerationDelta) -> tuple[int, gen.GenerationDelta]:
        if delta.finish_reason:
            self._usages[index] = delta.usage
        return index, delta

    def usage(self) -> gen.Usage:
        """Every choice's usage together, once all have finished: the prompt's figures are choice
        0's, as the answer unstreamed reports them (cached tokens differ between choices: a later
        one may find the prompt that an earlier one computed)."""
        return total_usage(self._usages)

    async def _end_reads(self) -> None:
        reads = list(self._reads)
        self._reads.clear()  # in place: the reading loop holds this dict
        for task in reads:
            task.cancel()
        await asyncio.gather(*reads, return_exceptions=True)

    async def aclose(self) -> None:
        await self._end_reads()
        for stream in self.streams:
            await stream.aclose()


def total_usage(usages: list[gen.Usage]) -> gen.Usage:
    """The prompt once, every choice's completion tokens."""
    prompt = usages[0].prompt_tokens
    completion = sum(usage.completion_tokens for usage in usages)
    return gen.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     cached_prompt_tokens=usages[0].cached_prompt_tokens,
                     reasoning_tokens=sum(usage.reasoning_tokens for usage in usages))
