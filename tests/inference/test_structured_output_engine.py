"""Structured output through the real engine and node on the tiny model (random weights, so
its free text is noise): whatever it would say, a constrained answer parses as JSON that
matches the schema and ends with STOP, greedy or sampled, beside free requests that stay as
they are alone, under KV pressure (preemption by recompute keeps the grammar's state), with
ignore_eos, and over gRPC with the proto's StructuredOutput."""

from __future__ import annotations

import asyncio
import json
import threading

import grpc
import jsonschema
import pytest
from transformers import AutoTokenizer

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.common.pb.loraplex.inference.v1 import inference_pb2 as pb
from services.common.rpc import error_info
from services.inference.adapters.pool import AdapterPool
from services.inference.engine.block_manager import BlockManager
from services.inference.engine.llm_engine import LLMEngine
from services.inference.engine.model_runner import ModelRunner
from services.inference.engine.sampling_params import MAX_JSON_SCHEMA_BYTES, SamplingParams
from services.inference.engine.scheduler import AlwaysReadyGate, Scheduler, SchedulerConfig
from services.inference.engine.sequence import FinishReason
from services.inference.engine.structured import GrammarCompiler
from services.inference.node import GRAMMAR_THREADS
from services.inference.model.loader import load_model
from tests.inference.test_servicer import collect, greedy, serve_and_run
from tests.inference.test_structured_output import SCHEMA

BLOCK_SIZE = 4
PROMPTS = ("The market answer", "A legal contract binds", "The patient asked the doctor", "Finance teams track")


class Engine:
    """An LLMEngine on the tiny model with its grammar compiler; `run` drives requests to the end."""

    def __init__(self, model_dir, num_blocks: int = 256, max_context: int = 256) -> None:
        model, args = load_model(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
                              BlockManager(num_blocks, BLOCK_SIZE), AlwaysReadyGate(), set(args.eos_token_ids),
                              max_context)
        self.engine = LLMEngine(ModelRunner(model, AdapterPool(args, num_pages=4), num_blocks, BLOCK_SIZE), scheduler,
                                self.tokenizer, BLOCK_SIZE)
        self.compiler = GrammarCompiler(self.tokenizer, args.vocab_size, args.eos_token_ids)
        self.eos = set(args.eos_token_ids)

    def run(self, requests: list[tuple[str, SamplingParams]]) -> list[tuple[str, list[int], FinishReason]]:
        """(text, token ids, finish reason) per request, all in one engine at once."""
        ids = [self.engine.add(self.tokenizer.encode(prompt), sampling,
                               grammar=self.compiler.compile(sampling.json_schema) if sampling.json_schema else None)
               for prompt, sampling in requests]
        outputs = {seq_id: [] for seq_id in ids}
        for _ in range(5000):
            if not self.engine.has_work:
                break
            for output in self.engine.step():
                outputs[output.seq_id].append(output)
        assert not self.engine.has_work, "no progress"
        return [("".join(o.text for o in outputs[i]), [t for o in outputs[i] for t in o.token_ids],
                 outputs[i][-1].finish_reason) for i in ids]


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine(tiny_model_dir)


def structured(**kwargs) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 200, "json_schema": json.dumps(SCHEMA), **kwargs})


def assert_matches_schema(text: str, token_ids: list[int], finish: FinishReason, eos: set[int]) -> None:
    jsonschema.validate(json.loads(text), SCHEMA)
    assert finish is FinishReason.STOP
    assert not eos & set(token_ids)  # the end-of-sequence token is implied, not generated
    assert len(token_ids) < 200


def test_greedy_and_sampled_answers_match_the_schema_and_free_requests_are_unchanged(engine):
    free = [(prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)) for prompt in PROMPTS[:2]]
    constrained = [(PROMPTS[0], structured(temperature=0.0)), (PROMPTS[1], structured(temperature=0.0)),
                   *[(prompt, structured(temperature=1.0, seed=seed)) for seed, prompt in enumerate(PROMPTS)],
                   (PROMPTS[2], structured(temperature=0.7, top_k=20, top_p=0.9, seed=9))]
    results = engine.run([free[0], *constrained, free[1]])
    for text, token_ids, finish in results[1:-1]:
        assert_matches_schema(text, token_ids, finish, engine.eos)
    assert {json.loads(text)["kind"] for text, _, _ in results[1:-1]} <= {"stock", "bond"}
    assert [results[0], results[-1]] == engine.run(free)  # as without constrained neighbours
    # Seeded sampling under a grammar is reproducible, and greedy is deterministic.
    assert engine.run(constrained[2:3] + constrained[:1]) == [results[3], results[1]]


def test_any_json_object_and_a_bias_that_chooses_among_allowed_tokens_only(engine):
    close = engine.tokenizer.convert_tokens_to_ids("}")
    letter = engine.tokenizer.convert_tokens_to_ids("x")
    params = dict(max_tokens=40, temperature=0.0, json_schema='{"type":"object"}')
    (closed, _, finish), (biased_wrong, _, _) = engine.run([
        (PROMPTS[0], SamplingParams(logit_bias=((close, 100.0),), **params)),
        (PROMPTS[0], SamplingParams(logit_bias=((letter, 100.0),), **params))])
    assert (closed, finish) == ("{}", FinishReason.STOP)  # "}" was the best allowed token after "{"
    assert biased_wrong.startswith('{"x')  # "x" can neither open an object nor follow "{", but can start a key


def test_max_tokens_cuts_the_value_short_with_length(engine):
    [(text, token_ids, finish)] = engine.run([(PROMPTS[0], structured(temperature=0.0, max_tokens=6))])
    assert finish is FinishReason.LENGTH and len(token_ids) == 6
    full, _, _ = engine.run([(PROMPTS[0], structured(temperature=0.0))])[0]
    assert full.startswith(text) and full != text  # a prefix of the whole answer, not valid JSON


def test_ignore_eos_still_ends_when_the_value_is_complete(engine):
    """Once the value is complete, EOS is the only choice: ignoring it would repeat it to max_tokens."""
    [(text, token_ids, finish)] = engine.run([(PROMPTS[1], structured(temperature=0.0, ignore_eos=True))])
    assert_matches_schema(text, token_ids, finish, engine.eos)


def test_preemption_by_recompute_keeps_each_grammar_where_it_was(tiny_model_dir):
    """A KV cache for about two answers and eight of them: sequences are preempted mid-value and
    recomputed; a grammar reset or advanced twice would refuse the next tokens (invalid JSON)."""
    pressed = Engine(tiny_model_dir, num_blocks=40, max_context=160)
    requests = [(prompt, structured(temperature=temperature, seed=i))
                for i, (prompt, temperature) in enumerate((p, t) for p in PROMPTS for t in (0.0, 1.0))]
    for text, token_ids, finish in pressed.run(requests):
        assert_matches_schema(text, token_ids, finish, pressed.eos)
    assert pressed.engine.scheduler.num_preemptions > 0


def test_over_grpc_the_proto_structured_output_constrains_and_bad_schemas_are_invalid_argument(tiny_model_dir,
                                                                                                tmp_path):
    async def body(stub, app):
        async def generate(structured_output: gen.StructuredOutput, **extra):
            replies = await collect(stub.Generate(pb.GenerateRequest(
                prompt=PROMPTS[0], sampling=greedy(max_tokens=200, structured_output=structured_output, **extra))))
            return "".join(r.delta.text for r in replies), replies[-1].delta

        text, final = await generate(gen.StructuredOutput(json_schema=json.dumps(SCHEMA)))
        jsonschema.validate(json.loads(text), SCHEMA)
        assert final.finish_reason == gen.FINISH_REASON_STOP and final.usage.completion_tokens < 200
        free, _ = await generate(gen.StructuredOutput())
        assert (await generate(gen.StructuredOutput(json_object=False)))[0] == free  # false: as unset
        close = app.node.tokenizer.convert_tokens_to_ids("}")
        assert (await generate(gen.StructuredOutput(json_object=True), logit_bias={close: 100}))[0] == "{}"
        for bad in ('{"type": "strin"}', "not json", json.dumps({"description": "x" * MAX_JSON_SCHEMA_BYTES})):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await generate(gen.StructuredOutput(json_schema=bad))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info(caught.value).metadata["field"] == "structured_output"

    serve_and_run(tiny_model_dir, tmp_path, body)


def test_schemas_compiling_do_not_hold_up_other_requests_tokenizing(tiny_model_dir, tmp_path):
    """Compiles run on threads of their own: on the default executor (shared with tokenizing,
    at most 32 threads) a burst of slow compiles held up every prompt behind them, free ones too."""
    compiling, release = threading.Semaphore(0), threading.Event()

    async def body(stub, app):
        original = app.node.grammars.compile

        def slow_compile(*args, **kwargs):
            compiling.release()
            release.wait(60)
            return original(*args, **kwargs)

        app.node.grammars.compile = slow_compile
        schema = gen.StructuredOutput(json_schema=json.dumps(SCHEMA))
        held = [asyncio.ensure_future(collect(stub.Generate(pb.GenerateRequest(
            prompt=PROMPTS[0], sampling=greedy(max_tokens=3, structured_output=schema))))) for _ in range(40)]
        try:
            await asyncio.to_thread(compiling.acquire, timeout=30)  # the compiles have started
            free = await asyncio.wait_for(collect(stub.Generate(pb.GenerateRequest(
                prompt=PROMPTS[1], sampling=greedy(max_tokens=3)))), 30)
            assert free[-1].delta.usage.completion_tokens == 3
        finally:
            release.set()
        for replies in await asyncio.gather(*held):
            assert replies[-1].delta.usage.completion_tokens <= 3
        assert app.node.grammars.compilations <= GRAMMAR_THREADS  # compiled at most once per thread, not 40 times

    serve_and_run(tiny_model_dir, tmp_path, body)
