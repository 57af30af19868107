"""A real node at the edges production reaches: an adapter whose re-fetch hangs while other
adapters' traffic flows, requests so big that merely reading them used to stall every stream
before they were refused, and the metrics an operator scrapes against what GetStats says."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from peft import PeftModel
from prometheus_client import REGISTRY
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.common.pb.loraplex.inference.v1 import inference_pb2 as pb
from services.common.rpc import error_info
from services.inference.engine.scheduler import SchedulerConfig
from tests.inference.test_adapter_admission import adapter_root, generate  # noqa: F401
from tests.inference.test_adapter_admission_queued import GatedSource, hold_the_only_slot, until_waiting
from tests.inference.test_oracle import NEW_TOKENS, hf_greedy
from tests.inference.test_servicer import collect, greedy, serve_and_run, wait_until

BOUND_S = 60  # a request that has not ended by then hangs: the test fails rather than blocking


def test_a_hung_refetch_of_one_adapter_never_pauses_the_others(tiny_model_dir, adapter_root):
    """fin waits behind a busy slot when an operator evicts it from every tier, and its re-fetch
    hangs (a slow Registry). legal's requests used to stop after 64 admissions: the starvation
    guard took fin's wait for its bytes for a wait for pool room, and paused every other adapter
    until the fetch ended (up to the Registry timeout, 300 s). They now all run, and fin gets
    the tokens HF + PEFT give once its bytes arrive."""
    async def body(stub, app):
        source = GatedSource(adapter_root)
        app.node.manager.source = source
        busy = await hold_the_only_slot(stub)
        for adapter_id in ("fin", "legal"):  # both resident before the source hangs
            await stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id=adapter_id))
        fin = asyncio.ensure_future(generate(stub, "fin", max_tokens=NEW_TOKENS, ignore_eos=True))
        await until_waiting(stub, 1)
        source.opened.clear()
        await stub.EvictAdapter(pb.EvictAdapterRequest(adapter_id="fin", all_tiers=True))
        busy.cancel()
        for _ in range(SchedulerConfig().adapter_starvation_limit + 8):
            replies = await asyncio.wait_for(generate(stub, "legal", max_tokens=1), BOUND_S)
            assert replies[-1].delta.usage.completion_tokens == 1
        assert not fin.done()  # still waiting for its bytes
        loading = [s.adapter_id for s in (await stub.ListAdapters(pb.ListAdaptersRequest())).adapters
                   if s.tier == pb.ADAPTER_TIER_LOADING]
        assert loading == ["fin"]
        source.opened.set()
        replies = await asyncio.wait_for(fin, BOUND_S)
        return [t for r in replies for t in r.delta.token_ids]

    served = serve_and_run(tiny_model_dir, adapter_root, body, max_num_seqs=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_root / "fin")
    expected, _ = hf_greedy(model.eval(), tokenizer.encode("the market is"))
    assert served == expected


def test_a_conversation_of_more_turns_than_the_context_is_refused_unrendered(tiny_model_dir, adapter_root):
    """Each turn costs at least its role marker, so max_context turns cannot fit. Such a
    conversation used to be rendered through the chat template first (pure Python, holding
    the GIL: 11 s for 300 000 empty turns, with every other stream slowed meanwhile); it is
    now refused by its length. Shorter ones render as before."""
    async def body(stub, app):
        node, rendered = app.node, []
        render = node.tokenizer.apply_chat_template
        node.tokenizer.apply_chat_template = lambda chat, **kw: rendered.append(len(chat)) or render(chat, **kw)
        turns = [gen.ChatMessage(role="user", content="")] * node.max_context
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(stub.Generate(pb.GenerateRequest(messages=gen.ChatMessages(messages=turns))))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"{node.max_context} messages does not fit the context" in caught.value.details()
        assert error_info(caught.value).metadata["field"] == "messages"
        assert rendered == []
        few = gen.ChatMessages(messages=[gen.ChatMessage(role="system", content="be brief"),
                                         gen.ChatMessage(role="user", content="hello")])
        replies = await collect(stub.Generate(pb.GenerateRequest(messages=few, sampling=greedy(max_tokens=2))))
        assert rendered == [2] and replies[-1].delta.usage.completion_tokens >= 1

    serve_and_run(tiny_model_dir, adapter_root, body)


def test_every_figure_of_get_stats_is_exported_with_the_same_value(tiny_model_dir, adapter_root):
    """Requests finished, prompt tokens, tokens per second and the pool's page total and host
    bytes were in GetStats but missing from /metrics; every number is now in both, and once
    traffic stops they agree."""
    async def body(stub, app):
        for adapter_id in ("fin", "", "legal"):
            await generate(stub, adapter_id, max_tokens=3, ignore_eos=True)

        def exported(stats: pb.Stats) -> dict[str, tuple[float, float | None]]:
            figures = {name: (value, REGISTRY.get_sample_value(f"loraplex_inference_{name}"))
                       for name, value in _scalars(stats).items()}
            figures.update({f"adapter_{name}": (value, REGISTRY.get_sample_value(f"loraplex_inference_adapter_{name}"))
                            for name, value in _scalars(stats.pool).items()})
            return figures

        async def agree():
            figures = exported(await stub.GetStats(pb.GetStatsRequest()))
            return all(gauge is not None and gauge == pytest.approx(value, rel=1e-6) for value, gauge in figures.values())

        await wait_until(agree)
        figures = exported(await stub.GetStats(pb.GetStatsRequest()))
        assert figures["requests_finished"][1] == 3 and figures["generated_tokens_total"][1] == 9

    serve_and_run(tiny_model_dir, adapter_root, body)


def _scalars(message) -> dict[str, float]:
    """The numeric fields of a Stats or PoolUsage message, unset ones as 0."""
    return {field.name: getattr(message, field.name) for field in message.DESCRIPTOR.fields
            if field.type not in (field.TYPE_MESSAGE, field.TYPE_STRING)}
