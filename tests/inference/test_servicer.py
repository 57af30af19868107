"""The Inference gRPC service on a real server: streaming, errors with the documented
status codes, cancellation that frees KV at once, queue limits, adapter admin RPCs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoTokenizer

from services.common.config import ServerConfig
from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.common.pb.loraplex.inference.v1 import inference_pb2 as pb
from services.common.pb.loraplex.inference.v1 import inference_pb2_grpc
from services.common.server import start_server
from services.inference.app import InferenceApp
from services.inference.config import InferenceConfig
from services.registry.fingerprint import fingerprint_from_config
from tests.conftest import free_port


def serve_and_run(base: Path, adapters: Path, body, **overrides):
    """Starts an inference node in-process on a free port and runs `body(stub)` against it."""
    config = InferenceConfig(port=free_port(), metrics_port=0, base_model=base, adapter_dir=adapters,
                             **{"kv_cache_mb": 2, "adapter_pool_pages": 64, **overrides})

    async def main():
        app = InferenceApp(config)
        running = await start_server(app, ServerConfig(port=config.port))
        await app.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{config.port}") as channel:
                return await body(inference_pb2_grpc.InferenceStub(channel), app)
        finally:
            await running.stop(0)
            await app.close()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def adapter_root(varied_adapters) -> Path:
    return next(iter(varied_adapters.values())).parent


async def collect(call) -> list[pb.GenerateResponse]:
    return [message async for message in call]


def greedy(max_tokens=12, **extra) -> gen.SamplingParams:
    return gen.SamplingParams(max_tokens=max_tokens, temperature=0.0, **extra)


async def wait_until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


def test_generate_streams_text_then_finish_and_usage(tiny_model_dir, adapter_root):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    async def body(stub, app):
        messages = gen.ChatMessages(messages=[gen.ChatMessage(role="system", content="You are terse."),
                                              gen.ChatMessage(role="user", content="héllo 日本")])
        replies = await collect(stub.Generate(pb.GenerateRequest(
            request_id="r1", adapter=pb.AdapterRef(adapter_id="legal"), messages=messages,
            sampling=greedy(ignore_eos=True, logprobs=True, top_logprobs=2))))
        final = replies[-1].delta
        assert final.finish_reason == gen.FINISH_REASON_LENGTH
        assert all(r.delta.finish_reason == gen.FINISH_REASON_UNSPECIFIED for r in replies[:-1])
        token_ids = [t for r in replies for t in r.delta.token_ids]
        assert len(token_ids) == 12 == final.usage.completion_tokens
        prompt = tokenizer.apply_chat_template([{"role": "system", "content": "You are terse."},
                                                {"role": "user", "content": "héllo 日本"}],
                                               add_generation_prompt=True, tokenize=True, return_dict=False)
        assert final.usage.prompt_tokens == len(prompt)
        # The first message already says the prompt's length (quotas charge it at once), the others don't.
        assert [r.delta.prompt_tokens for r in replies] == [len(prompt)] + [0] * (len(replies) - 1)
        assert "".join(r.delta.text for r in replies) == tokenizer.decode(token_ids, skip_special_tokens=True)
        logprobs = [lp for r in replies for lp in r.delta.logprobs]
        assert [lp.token_id for lp in logprobs] == token_ids
        assert all(len(lp.top) == 2 and lp.top[0].logprob >= lp.top[1].logprob for lp in logprobs)

    serve_and_run(tiny_model_dir, adapter_root, body)


def test_an_eos_generated_under_ignore_eos_is_marked_special(tiny_model_dir, adapter_root):
    """The text skips special tokens, so their logprob entries say so (the router's text
    offsets must not count them); every other token is part of the text."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    special_ids = set(tokenizer.all_special_ids)

    async def body(stub, app):
        eos_ids = set(app.node.args.eos_token_ids)
        for seed in range(40):  # the base model's random weights: find an answer that goes on past an EOS
            sampling = gen.SamplingParams(max_tokens=64, temperature=1.0, seed=seed, ignore_eos=True, logprobs=True)
            replies = await collect(stub.Generate(pb.GenerateRequest(prompt="the market", sampling=sampling)))
            logprobs = [lp for r in replies for lp in r.delta.logprobs]
            if any(lp.token_id in eos_ids for lp in logprobs[:-1]):
                break
        else:
            pytest.fail("no answer held an EOS before its last token")
        assert replies[-1].delta.finish_reason == gen.FINISH_REASON_LENGTH and len(logprobs) == 64
        assert [lp.special for lp in logprobs] == [lp.token_id in special_ids for lp in logprobs]
        assert all(lp.special for lp in logprobs if lp.token_id in eos_ids)
        text = "".join(r.delta.text for r in replies)
        assert text == tokenizer.decode([lp.token_id for lp in logprobs if not lp.special])

    serve_and_run(tiny_model_dir, adapter_root, body)


def test_seeds_reproduce_and_stop_strings_cut_the_text(tiny_model_dir, adapter_root):
    async def body(stub, app):
        sampled = gen.SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
        first = await collect(stub.Generate(pb.GenerateRequest(prompt="the market", sampling=sampled)))
        again = await collect(stub.Generate(pb.GenerateRequest(prompt="the market", sampling=sampled)))
        assert [r.delta.token_ids for r in first] == [r.delta.token_ids for r in again]

        plain = await collect(stub.Generate(pb.GenerateRequest(prompt="the market", sampling=greedy(ignore_eos=True))))
        text = "".join(r.delta.text for r in plain)
        stop = text[len(text) // 2:len(text) // 2 + 2]
        cut = await collect(stub.Generate(pb.GenerateRequest(
            prompt="the market", sampling=greedy(ignore_eos=True, stop=[stop]))))
        assert "".join(r.delta.text for r in cut) == text[:text.index(stop)]
        assert cut[-1].delta.matched_stop == stop and cut[-1].delta.finish_reason == gen.FINISH_REASON_STOP

    serve_and_run(tiny_model_dir, adapter_root, body)


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (pb.GenerateRequest(prompt="x", adapter=pb.AdapterRef(adapter_id="nope")), "NOT_FOUND", "not found"),
        (pb.GenerateRequest(prompt="x", sampling=gen.SamplingParams(temperature=-1)), "INVALID_ARGUMENT", "temperature"),
        (pb.GenerateRequest(prompt="x", sampling=gen.SamplingParams(top_p=0)), "INVALID_ARGUMENT", "top_p"),
        (pb.GenerateRequest(prompt="x", sampling=gen.SamplingParams(max_tokens=100000)), "INVALID_ARGUMENT", "context"),
        (pb.GenerateRequest(prompt="word " * 600), "INVALID_ARGUMENT", "does not fit the context"),
        (pb.GenerateRequest(), "INVALID_ARGUMENT", "set one of prompt"),
        (pb.GenerateRequest(messages=gen.ChatMessages(messages=[gen.ChatMessage(role="function", content="x")])),
         "INVALID_ARGUMENT", "role must be one of"),
        (pb.GenerateRequest(messages=gen.ChatMessages(messages=[gen.ChatMessage(role="tool", content="x")])),
         "INVALID_ARGUMENT", "tool_call_id"),
        (pb.GenerateRequest(messages=gen.ChatMessages(messages=[gen.ChatMessage(role="assistant", tool_calls=[
            gen.ToolCall(id="c", name="f", arguments="[1]")])])), "INVALID_ARGUMENT", "JSON text of an object"),
        (pb.GenerateRequest(token_ids=gen.TokenIds(ids=[10**6])), "INVALID_ARGUMENT", "token ids must be in"),
        (pb.GenerateRequest(prompt="x", adapter=pb.AdapterRef(adapter_id="fin", sha256="0" * 64)),
         "FAILED_PRECONDITION", "does not match"),
    ],
)
def test_bad_requests_get_the_documented_status(tiny_model_dir, adapter_root, request_, code, message):
    async def body(stub, app):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(stub.Generate(request_))
        assert caught.value.code().name == code
        assert message in caught.value.details()

    serve_and_run(tiny_model_dir, adapter_root, body)


def test_cancel_frees_kv_and_adapter_references_at_once(tiny_model_dir, adapter_root):
    async def body(stub, app):
        call = stub.Generate(pb.GenerateRequest(prompt="the market", adapter=pb.AdapterRef(adapter_id="health"),
                                                sampling=greedy(max_tokens=400, ignore_eos=True)))
        await call.read()
        stats = await stub.GetStats(pb.GetStatsRequest())
        assert stats.running_requests == 1 and stats.kv_blocks_used > 0
        call.cancel()

        async def released():
            now = await stub.GetStats(pb.GetStatsRequest())
            return now.running_requests == 0 and now.kv_blocks_used == 0

        await wait_until(released)
        slots = (await stub.ListAdapters(pb.ListAdaptersRequest())).adapters
        assert [s.active_requests for s in slots if s.adapter_id == "health"] == [0]
        assert (await stub.GetStats(pb.GetStatsRequest())).generated_tokens_total < 400

    serve_and_run(tiny_model_dir, adapter_root, body)


def test_a_full_queue_answers_resource_exhausted(tiny_model_dir, adapter_root):
    async def body(stub, app):
        long = greedy(max_tokens=500, ignore_eos=True)
        running = stub.Generate(pb.GenerateRequest(prompt="a", sampling=long))
        await running.read()  # one sequence runs (max_num_seqs=1)...
        waiting = stub.Generate(pb.GenerateRequest(prompt="b", sampling=long))

        async def one_waiting():
            return (await stub.GetStats(pb.GetStatsRequest())).waiting_requests == 1

        await wait_until(one_waiting)  # ...and one waits (max_waiting=1): the queue is full
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(stub.Generate(pb.GenerateRequest(prompt="c", sampling=long)))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue full" in caught.value.details()
        running.cancel()
        waiting.cancel()

    serve_and_run(tiny_model_dir, adapter_root, body, max_num_seqs=1, max_waiting=1)


def test_adapter_load_pin_evict_and_list(tiny_model_dir, adapter_root):
    async def body(stub, app):
        slot = await stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="retail", pin=True))
        assert (slot.tier, slot.rank, slot.pages, slot.pinned) == (pb.ADAPTER_TIER_DEVICE, 16, 16, True)
        assert set(slot.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
        listed = await stub.ListAdapters(pb.ListAdaptersRequest())
        assert listed.pool.pages_used == 16 and listed.pool.pages_free == 48

        call = stub.Generate(pb.GenerateRequest(prompt="x", adapter=pb.AdapterRef(adapter_id="retail"),
                                                sampling=greedy(max_tokens=400, ignore_eos=True)))
        await call.read()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.EvictAdapter(pb.EvictAdapterRequest(adapter_id="retail", unpin=True))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        call.cancel()

        async def evicted():
            try:
                await stub.EvictAdapter(pb.EvictAdapterRequest(adapter_id="retail", unpin=True, all_tiers=True))
                return True
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
                return False

        await wait_until(evicted)
        assert not (await stub.ListAdapters(pb.ListAdaptersRequest())).adapters
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.EvictAdapter(pb.EvictAdapterRequest(adapter_id="retail"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="missing"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        for empty in (stub.LoadAdapter(pb.LoadAdapterRequest()), stub.EvictAdapter(pb.EvictAdapterRequest())):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await empty
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "adapter_id" in caught.value.details()
        stats = await stub.GetStats(pb.GetStatsRequest())
        assert stats.adapter_loads == 1 and stats.adapter_evictions == 1 and stats.adapter_misses == 0
        assert stats.eager_steps > 0 and stats.graph_steps == 0  # it generated, without graphs on CPU

    serve_and_run(tiny_model_dir, adapter_root, body)


def test_info_describes_the_model_like_the_registry_does(tiny_model_dir, adapter_root):
    import json

    async def body(stub, app):
        info = await stub.GetInfo(pb.GetInfoRequest())
        expected = fingerprint_from_config(json.loads((tiny_model_dir / "config.json").read_text()))
        assert info.fingerprint.digest == expected.digest and info.fingerprint.num_layers == 2
        assert (info.dtype, info.device, info.max_context, info.adapter_pool_pages) == ("float32", "cpu", 512, 64)
        assert (info.kernels, info.cuda_graphs) == ("torch", "off")  # auto on CPU
        assert info.prefill_lora == "grouped"  # PyTorch kernels run prefill segments through grouped_mm
        assert info.decode_lora == "defaults"  # no captured decode graphs on CPU: nothing measured

    serve_and_run(tiny_model_dir, adapter_root, body)


def test_a_node_with_an_admin_token_refuses_every_call_without_it(tiny_model_dir, adapter_root):
    """The node runs any tenant's adapter by id: reached directly, it must not bypass the Router."""
    async def body(stub, app):
        request = pb.GenerateRequest(request_id="r", adapter=pb.AdapterRef(adapter_id="legal"), prompt="hi",
                                     sampling=greedy(max_tokens=2))
        calls = [lambda md: collect(stub.Generate(request, metadata=md)),
                 lambda md: stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="legal", pin=True), metadata=md),
                 lambda md: stub.EvictAdapter(pb.EvictAdapterRequest(adapter_id="legal"), metadata=md),
                 lambda md: stub.ListAdapters(pb.ListAdaptersRequest(), metadata=md),
                 lambda md: stub.GetStats(pb.GetStatsRequest(), metadata=md),
                 lambda md: stub.GetInfo(pb.GetInfoRequest(), metadata=md)]
        for call in calls:
            for metadata, code in ((None, grpc.StatusCode.UNAUTHENTICATED),
                                   ((("authorization", "Bearer wrong"),), grpc.StatusCode.PERMISSION_DENIED)):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(metadata)
                assert caught.value.code() == code
        admin = (("authorization", "Bearer s3cret"),)
        assert (await stub.ListAdapters(pb.ListAdaptersRequest(), metadata=admin)).adapters == []  # nothing loaded
        replies = await collect(stub.Generate(request, metadata=admin))
        assert replies[-1].delta.usage.completion_tokens >= 1
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.config.port}") as channel:  # health stays open
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())

    serve_and_run(tiny_model_dir, adapter_root, body, admin_token="s3cret")


def test_a_prompt_too_big_for_any_tokenization_is_refused_before_tokenizing(tiny_model_dir, adapter_root):
    """A multi-megabyte prompt used to hold the event loop (and every other stream) while it
    was tokenized only to be refused; now its size alone refuses it."""
    async def body(stub, app):
        node, asked = app.node, []
        encode = node.tokenizer.encode
        node.tokenizer.encode = lambda *args, **kwargs: asked.append(args) or encode(*args, **kwargs)
        huge = [pb.GenerateRequest(prompt="x" * (node.max_prompt_bytes + 1)),
                pb.GenerateRequest(messages=gen.ChatMessages(messages=[gen.ChatMessage(role="user", content="y" * (
                    node.max_prompt_bytes + 1))])),
                pb.GenerateRequest(token_ids=gen.TokenIds(ids=[1] * node.max_context))]
        for request in huge:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(stub.Generate(request))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "does not fit the context" in caught.value.details()
        assert asked == []
        replies = await collect(stub.Generate(pb.GenerateRequest(prompt="hello", sampling=greedy(max_tokens=3))))
        assert replies[-1].delta.usage.completion_tokens >= 1 and asked  # small prompts are tokenized as before

    serve_and_run(tiny_model_dir, adapter_root, body)
