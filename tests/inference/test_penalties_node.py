"""Penalties and logit bias through a real node: repetition_penalty against HF transformers'
generate (the oracle), and frequency_penalty / logit_bias / their errors over gRPC."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.common.pb.loraplex.inference.v1 import inference_pb2 as pb
from services.common.rpc import error_info
from services.inference.config import InferenceConfig
from services.inference.engine.sampling_params import SamplingParams
from services.inference.node import Node, Prompt
from tests.inference.test_oracle import PROMPTS, TIE
from tests.inference.test_servicer import collect, greedy, serve_and_run

NEW_TOKENS = 12
PENALTIES = (1.0, 1.5, 0.7)  # off, discourage, encourage repeats
LONG = 40  # tokens: long enough that the tiny model repeats itself without a penalty


def hf_generate(model, prompt_ids: list[int], repetition_penalty: float) -> tuple[list[int], list[torch.Tensor]]:
    """HF's greedy tokens and the processed scores each was the argmax of (EOS does not stop it)."""
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                         repetition_penalty=repetition_penalty, eos_token_id=None, pad_token_id=None,
                         output_scores=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt_ids):].tolist(), [s[0] for s in out.scores]


def run_node(base, adapter_dir, requests: list[tuple[str, SamplingParams]]) -> list[list[int]]:
    """All requests at once, in one engine: each row's penalty is its own."""
    config = InferenceConfig(base_model=base, adapter_dir=adapter_dir, kv_cache_mb=4, kernels="torch", device="cpu",
                             dtype="float32", cuda_graphs="off", adapter_pool_pages=16, max_num_seqs=16,
                             max_batched_tokens=96)
    node = Node.build(config)

    async def one(prompt, sampling):
        return [t async for o in node.generate(Prompt(text=prompt), sampling) for t in o.token_ids]

    async def everything():
        node.start()
        try:
            return await asyncio.gather(*[one(prompt, sampling) for prompt, sampling in requests])
        finally:
            node.close()

    return asyncio.run(everything())


def test_repetition_penalty_greedy_equals_hf_generate(tiny_model_dir, tmp_path):
    requests = [(prompt, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True,
                                        repetition_penalty=r)) for prompt in PROMPTS for r in PENALTIES]
    results = run_node(tiny_model_dir, tmp_path, requests)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    by_request, compared = {}, 0
    for (prompt, sampling), ours in zip(requests, results):
        theirs, scores = hf_generate(model, tokenizer.encode(prompt), sampling.repetition_penalty)
        assert len(ours) == len(theirs) == NEW_TOKENS
        for step, (mine, hf) in enumerate(zip(ours, theirs)):
            if mine != hf:  # only where HF's own processed top two are a float-rounding tie
                top2 = scores[step].topk(2).values
                assert float(top2[0] - top2[1]) < TIE, f"{prompt!r} r={sampling.repetition_penalty}: step {step}"
                break
            compared += 1
        by_request[prompt, sampling.repetition_penalty] = ours
    assert compared >= 0.9 * len(requests) * NEW_TOKENS
    # The penalty did change what greedy picks, both ways: the comparison above was not vacuous.
    for r in PENALTIES[1:]:
        assert any(by_request[p, r] != by_request[p, 1.0] for p in PROMPTS), r


def test_frequency_penalty_keeps_a_greedy_stream_from_repeating_itself(tiny_model_dir, tmp_path):
    async def body(stub, app):
        async def tokens(**extra):
            replies = await collect(stub.Generate(pb.GenerateRequest(
                prompt="hello", sampling=greedy(max_tokens=LONG, ignore_eos=True, **extra))))
            return [t for r in replies for t in r.delta.token_ids]

        plain, penalized = await tokens(), await tokens(frequency_penalty=2.0)
        assert len(set(plain)) < LONG  # without the penalty the tiny model repeats itself
        assert len(penalized) == len(set(penalized)) == LONG

    serve_and_run(tiny_model_dir, tmp_path, body)


def test_logit_bias_forces_or_bans_a_token_for_greedy(tiny_model_dir, tmp_path):
    async def body(stub, app):
        async def tokens(**extra):
            replies = await collect(stub.Generate(pb.GenerateRequest(
                prompt="the market is", sampling=greedy(max_tokens=8, ignore_eos=True, logprobs=True, **extra))))
            return [t for r in replies for t in r.delta.token_ids], [e for r in replies for e in r.delta.logprobs]

        plain, plain_logprobs = await tokens()
        forced, forced_logprobs = await tokens(logit_bias={77: 100.0})
        assert forced == [77] * 8 and 77 not in plain
        assert forced_logprobs[0].logprob < plain_logprobs[0].logprob  # the raw logprob, not the biased one
        banned, _ = await tokens(logit_bias={plain[0]: -100.0})
        assert plain[0] not in banned

    serve_and_run(tiny_model_dir, tmp_path, body)


@pytest.mark.parametrize(("sampling", "field"), [
    (gen.SamplingParams(presence_penalty=2.5), "presence_penalty"),
    (gen.SamplingParams(frequency_penalty=-3), "frequency_penalty"),
    (gen.SamplingParams(repetition_penalty=0), "repetition_penalty"),
    (gen.SamplingParams(logit_bias={5: 101}), "logit_bias"),
    (gen.SamplingParams(logit_bias={i: 1 for i in range(301)}), "logit_bias"),
    (gen.SamplingParams(logit_bias={10**6: 1}), "logit_bias"),
])
def test_bad_penalties_and_biases_are_invalid_argument_naming_the_field(tiny_model_dir, tmp_path, sampling, field):
    async def body(stub, app):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(stub.Generate(pb.GenerateRequest(prompt="x", sampling=sampling)))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).metadata["field"] == field and field in caught.value.details()

    serve_and_run(tiny_model_dir, tmp_path, body)


def test_a_bias_on_the_last_vocabulary_id_is_accepted_one_past_it_is_not(tiny_model_dir, tmp_path):
    async def body(stub, app):
        vocab = app.node.args.vocab_size
        replies = await collect(stub.Generate(pb.GenerateRequest(
            prompt="x", sampling=greedy(max_tokens=2, ignore_eos=True, logit_bias={vocab - 1: 100}))))
        assert [t for r in replies for t in r.delta.token_ids] == [vocab - 1] * 2
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(stub.Generate(pb.GenerateRequest(prompt="x", sampling=greedy(logit_bias={vocab: 1}))))
        assert f"token id {vocab} " in caught.value.details()

    serve_and_run(tiny_model_dir, tmp_path, body)
