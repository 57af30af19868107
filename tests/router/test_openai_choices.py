"""OpenAI's `n` through the router, from the official `openai` SDK: n choices, each its own
generation (seeded choice i draws with seed + i, so choice 0 is what n = 1 gives), streamed
interleaved by index, usage counting the prompt once; a failure before the first token is the
whole request's status, with nothing left running."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from services.router.quotas import Limits
from tests.router.conftest import CUSTOMER_A_MODEL
from tests.router.harness import wait_until

HI = [{"role": "user", "content": "Summarize today's stock market trends."}]
SAMPLED = {"temperature": 1.0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}


@pytest.fixture
def client(router, world) -> OpenAI:
    return OpenAI(base_url=router.base_url, api_key=world.a.token, max_retries=0)


def test_n_chat_choices_are_seeded_apart_and_choice_0_is_the_n_1_answer(client):
    one = client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=HI, seed=7, **SAMPLED)
    three = client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=HI, seed=7, n=3, **SAMPLED)
    again = client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=HI, seed=7, n=3, **SAMPLED)
    texts = [choice.message.content for choice in three.choices]
    assert [choice.index for choice in three.choices] == [0, 1, 2]
    assert texts[0] == one.choices[0].message.content
    assert len(set(texts)) == 3  # seeds 7, 8, 9 draw differently
    assert [choice.message.content for choice in again.choices] == texts  # and reproducibly
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt once
    assert three.usage.completion_tokens == 3 * 12
    assert three.usage.total_tokens == one.usage.prompt_tokens + 36


def test_n_streamed_choices_arrive_by_index_and_match_the_unstreamed_ones(client):
    whole = client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=HI, seed=3, n=2, **SAMPLED)
    chunks = list(client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=HI, seed=3, n=2, stream=True,
                                                 stream_options={"include_usage": True}, **SAMPLED))
    texts, roles, finishes = ["", ""], [None, None], [None, None]
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        roles[choice.index] = roles[choice.index] or choice.delta.role
        finishes[choice.index] = finishes[choice.index] or choice.finish_reason
        assert chunk.usage is None
    assert texts == [choice.message.content for choice in whole.choices]
    assert roles == ["assistant", "assistant"] and finishes == ["length", "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24  # after both finished
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_legacy_completions_with_logprobs(client):
    answer = client.completions.create(model=CUSTOMER_A_MODEL, prompt="The market", n=2, best_of=2, logprobs=1,
                                       seed=5, **SAMPLED)
    assert [choice.index for choice in answer.choices] == [0, 1]
    for choice in answer.choices:
        assert len(choice.logprobs.tokens) == 12 and choice.logprobs.text_offset[0] == 0  # each counts from 0
    assert answer.choices[0].text != answer.choices[1].text
    stream = client.completions.create(model=CUSTOMER_A_MODEL, prompt="The market", n=2, seed=5, stream=True,
                                       **SAMPLED)
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [choice.text for choice in answer.choices]


def test_n_beyond_the_limit_or_unreachable_best_of_is_a_400_naming_it(client):
    for extra, param in (({"n": 17}, "n"), ({"n": 0}, "n"), ({"n": 2, "extra_body": {"best_of": 3}}, "best_of")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model=CUSTOMER_A_MODEL, prompt="x", **extra)
        assert caught.value.body["param"] == param


def test_a_choice_refused_before_its_first_token_fails_the_request_and_frees_the_others(router, world, client):
    """Every choice is a request against the tenant's quota, admitted together: with room for 2 at
    a time, n = 3 is a 429 saying why before any choice reaches a node."""
    overrides = router.app.core.quotas.overrides
    router.run(lambda: overrides.__setitem__(world.a.tenant_id, Limits(max_concurrent=2)))
    try:
        for stream in (False, True):
            with pytest.raises(openai.RateLimitError) as refused:
                client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=HI, n=3, stream=stream, **SAMPLED)
            assert "asks for 3 choices" in refused.value.message and "at most 2" in refused.value.message
            assert router.run(lambda: router.app.core.quotas.in_flight(world.a.tenant_id)) == 0
        two = client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=HI, n=2, **SAMPLED)
        assert len(two.choices) == 2
    finally:
        router.run(lambda: overrides.pop(world.a.tenant_id))


def test_n_choices_charge_the_tokens_per_minute_quota_for_the_prompt_once_as_usage_counts_it(router, world):
    """A tenant budgeting by the usage it is shown must not be throttled for prompts it is not
    shown: each further choice used to pay for the prompt again."""
    tenant = world.new_tenant("tpm")  # a bucket no other request has touched
    long_prompt = [{"role": "user", "content": "Summarize the market. " * 40}]
    sized = dict(model="tiny", messages=long_prompt, max_tokens=2, extra_body={"ignore_eos": True})
    prompt = OpenAI(base_url=router.base_url, api_key=world.a.token, max_retries=0).chat.completions.create(
        **sized).usage.prompt_tokens
    # Room for the prompt once and both choices' tokens, plus half a prompt: charging the prompt
    # twice leaves the bucket half a prompt short, which takes 20 s to refill at this rate.
    limit = prompt + 4 + prompt // 2
    overrides = router.app.core.quotas.overrides
    router.run(lambda: overrides.__setitem__(tenant.tenant_id, Limits(tokens_per_minute=limit)))
    try:
        client = OpenAI(base_url=router.base_url, api_key=tenant.token, max_retries=0)
        assert client.chat.completions.create(n=2, **sized).usage.total_tokens == prompt + 4
        assert client.chat.completions.create(**sized).usage.prompt_tokens == prompt  # admitted: budget left
    finally:
        router.run(lambda: overrides.pop(tenant.tenant_id))


def test_a_client_leaving_an_n_stream_cancels_every_choice_on_its_node(held_node, world):
    """Each choice's read runs in a task of its own; a client hanging up ends them all, and every
    choice's node call is cancelled, its quota and its registration released."""
    router, node = held_node()
    client = OpenAI(base_url=router.base_url, api_key=world.a.token, max_retries=0, timeout=30)
    stream = client.chat.completions.create(model="tiny", messages=HI, n=2, stream=True)
    texts = ["", ""]
    for chunk in stream:  # two role chunks, then each choice's t0 t1; the node holds both after that
        texts[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
        if texts == ["t0t1", "t0t1"]:
            break
    stream.close()
    wait_until(lambda: router.run(lambda: node.cancelled) == 2, what="both node calls are cancelled")
    wait_until(lambda: router.run(lambda: len(router.app.core.open_streams)) == 0, what="both streams are forgotten")
    assert router.run(lambda: router.app.core.quotas.in_flight(world.a.tenant_id)) == 0


def test_choices_are_admitted_all_or_none(held_node, world):
    """With one request in flight and room for 2, n = 2 is refused whole, taking no place even for
    a moment: one at a time, two n = 2 requests could each hold one place and both be refused."""
    router, node = held_node()
    overrides = router.app.core.quotas.overrides
    router.run(lambda: overrides.__setitem__(world.a.tenant_id, Limits(max_concurrent=2)))
    client = OpenAI(base_url=router.base_url, api_key=world.a.token, max_retries=0, timeout=30)
    held = client.chat.completions.create(model="tiny", messages=HI, stream=True)
    next(iter(held))  # in flight: the node holds it
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="tiny", messages=HI, n=2)
    assert "1 requests in flight, and this one asks for 2 choices" in refused.value.message
    assert router.run(lambda: node.started) == 1  # no choice of the refused request reached the node
    held.close()
    wait_until(lambda: router.run(lambda: router.app.core.quotas.in_flight(world.a.tenant_id)) == 0,
               what="the held request is released")
