"""A failure on the engine thread that is not an Exception (a native extension's panic:
pyo3's PanicException derives from BaseException) fails the requests in flight and leaves the
engine serving. Uncaught, it ended the engine thread: every request after it hung."""

from __future__ import annotations

import asyncio

import pytest

from services.inference.config import InferenceConfig
from services.inference.engine.sampling_params import SamplingParams
from services.inference.node import Node, Prompt


class Panic(BaseException):
    """Stands in for pyo3's PanicException, which we cannot raise without a Rust crate panicking."""


def test_a_panic_in_an_engine_step_fails_its_requests_and_the_engine_keeps_serving(tiny_model_dir):
    node = Node.build(InferenceConfig(base_model=tiny_model_dir, kv_cache_mb=2))
    sampling = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    step, panics = node.engine.step, []

    def panicking_once():
        if not panics:
            panics.append(True)
            raise Panic("called `Option::unwrap()` on a `None` value")
        return step()

    node.engine.step = panicking_once

    async def ask() -> list[int]:
        return [t for output in [o async for o in node.generate(Prompt(text="the market"), sampling)]
                for t in output.token_ids]

    async def run():
        node.start()
        try:
            with pytest.raises(RuntimeError, match="the engine failed: Panic: called `Option::unwrap"):
                await asyncio.wait_for(ask(), timeout=60)
            return await asyncio.wait_for(ask(), timeout=60)  # hung here before: the thread was gone
        finally:
            node.close()

    assert len(asyncio.run(run())) == 3
