"""presence_penalty, frequency_penalty, logit_bias and vLLM's repetition_penalty through the
router, from the official `openai` SDK (chat and legacy completions) and from gRPC: accepted,
effective, and refused with a 400 / INVALID_ARGUMENT naming the parameter when out of range."""

from __future__ import annotations

import grpc
import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from services.common.pb.loraplex.router.v1 import router_pb2 as pb
from services.common.rpc import error_info
from services.inference.token_bytes import TokenBytes
from tests.router.conftest import CUSTOMER_A_MODEL
from tests.router.harness import bearer
from tests.router.test_openai_sdk_conformance import refused
from tests.router.test_router_grpc import greedy

HI = [{"role": "user", "content": "Summarize today's stock market trends."}]
LONG = 40  # tokens: the tiny model repeats itself within that many without a penalty


@pytest.fixture
def client(router, world) -> OpenAI:
    return OpenAI(base_url=router.base_url, api_key=world.a.token, max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def word_id(tokenizer) -> int:
    """A token that decodes alone to a plain word, so the text shows where it was generated."""
    return next(i for i in range(300, len(tokenizer)) if tokenizer.decode([i]).strip().isalpha())


def chat_tokens(client: OpenAI, max_tokens: int = LONG, **extra) -> list[bytes]:
    """The greedy answer's tokens (raw bytes: unlike their text, one per token id here)."""
    answer = client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=HI, temperature=0, logprobs=True,
                                            max_tokens=max_tokens, **extra)
    assert answer.usage.completion_tokens == max_tokens
    return [bytes(entry.bytes) for entry in answer.choices[0].logprobs.content]


def test_frequency_and_presence_penalties_keep_greedy_chat_from_repeating(client):
    plain = chat_tokens(client, extra_body={"ignore_eos": True})
    assert len(set(plain)) < LONG  # the comparison below is not vacuous
    for penalty in ({"frequency_penalty": 2}, {"presence_penalty": 2}):
        penalized = chat_tokens(client, extra_body={"ignore_eos": True}, **penalty)
        assert len(set(penalized)) == LONG, penalty


def test_logit_bias_forces_and_bans_tokens_in_chat_and_completions(client, tokenizer, word_id):
    forced = client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=HI, temperature=0, max_tokens=3,
                                            logit_bias={str(word_id): 100})
    assert forced.choices[0].message.content == tokenizer.decode([word_id] * 3)
    first = chat_tokens(client, max_tokens=1)[0]
    token_bytes = TokenBytes(tokenizer)
    first_id = next(i for i in range(len(tokenizer)) if token_bytes(i) == first)
    assert chat_tokens(client, max_tokens=1, logit_bias={str(first_id): -100})[0] != first
    completion = client.completions.create(model=CUSTOMER_A_MODEL, prompt="The contract says", temperature=0,
                                           max_tokens=2, logit_bias={str(word_id): 100})
    assert completion.choices[0].text == tokenizer.decode([word_id] * 2)


def test_repetition_penalty_is_taken_through_extra_body(client):
    args = {"ignore_eos": True}
    plain = chat_tokens(client, extra_body=args)
    encouraged = chat_tokens(client, extra_body={**args, "repetition_penalty": 0.5})
    assert encouraged != plain and len(set(encouraged)) < len(set(plain))  # < 1 favours repeats
    completion = client.completions.create(model=CUSTOMER_A_MODEL, prompt="The contract says", temperature=0,
                                           max_tokens=4, extra_body={"repetition_penalty": 1.3})
    assert completion.usage.completion_tokens == 4


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"extra_body": {"frequency_penalty": "high"}}, "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"-5": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 150}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"logit_bias": {"100000": 1}}, "logit_bias"),  # past the vocabulary: only the node knows it
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"extra_body": {"repetition_penalty": -1.2}}, "repetition_penalty"),
])
def test_out_of_range_values_are_a_400_naming_the_parameter(client, kwargs, param):
    body = refused(lambda: client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=HI, max_tokens=1,
                                                          **kwargs))
    assert body["param"] == param
    body = refused(lambda: client.completions.create(model=CUSTOMER_A_MODEL, prompt="x", max_tokens=1, **kwargs))
    assert body["param"] == param


def test_grpc_callers_pass_them_through_to_the_node(router, world, word_id):
    def call(**sampling):
        request = pb.GenerateRequest(model=CUSTOMER_A_MODEL, prompt="The quarterly report",
                                     sampling=greedy(3, ignore_eos=True, **sampling))
        return router.stub.Complete(request, metadata=bearer(world.a.token), timeout=60)

    assert list(call(logit_bias={word_id: 100}, repetition_penalty=1.2).token_ids) == [word_id] * 3
    for sampling, field in (({"logit_bias": {10**6: 1}}, "logit_bias"), ({"presence_penalty": 9}, "presence_penalty"),
                            ({"repetition_penalty": 0}, "repetition_penalty")):
        with pytest.raises(grpc.RpcError) as caught:
            call(**sampling)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).metadata["field"] == field
