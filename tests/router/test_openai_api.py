"""The OpenAI-compatible HTTP API, driven by the official `openai` package."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from services.common.pb.loraplex.registry.v1 import registry_pb2 as registry_pb
from services.common.tiny_model import PRESETS
from tests.registry.client import unique
from tests.registry.lora_files import AdapterFiles
from tests.router.conftest import CUSTOMER_A_MODEL


def http(method: str, url: str, body: bytes | None = None, token: str = "") -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a raw request, errors included."""
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read()), dict(reply.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


@pytest.fixture
def client_a(router, world) -> OpenAI:
    return OpenAI(base_url=router.base_url, api_key=world.a.token, max_retries=0)


def test_the_briefs_example_works_unchanged_apart_from_base_url_and_api_key(router, world, capsys):
    client = OpenAI(base_url=router.base_url, api_key=world.a.token)

    completion = client.chat.completions.create(
        model="base-llm-with-customerA-adapter",  # base model + adapter
        messages=[
            {"role": "system", "content": "You are a finance assistant."},
            {"role": "user", "content": "Summarize today’s stock market trends."},
        ],
    )

    print(completion.choices[0].message.content)
    assert capsys.readouterr().out.strip() == completion.choices[0].message.content.strip()
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.model == CUSTOMER_A_MODEL and completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_streaming_chat_matches_the_non_streaming_answer(client_a):
    messages = [{"role": "system", "content": "You are a finance assistant."},
                {"role": "user", "content": "Summarize Q3."}]
    args = dict(model=CUSTOMER_A_MODEL, messages=messages, temperature=0, max_tokens=16)
    whole = client_a.chat.completions.create(**args)
    chunks = list(client_a.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.id == chunks[0].id for c in chunks)


def test_completions_streaming_and_not_with_logprobs(client_a):
    args = dict(model="customerA-legal", prompt="The contract says", temperature=0, max_tokens=10,
                extra_body={"ignore_eos": True})
    whole = client_a.completions.create(**args, logprobs=2)
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 10
    assert whole.choices[0].finish_reason == "length"
    assert len(whole.choices[0].logprobs.tokens) == 10 and len(whole.choices[0].logprobs.top_logprobs[0]) == 2
    streamed = "".join(c.choices[0].text for c in client_a.completions.create(**args, stream=True) if c.choices)
    assert streamed == whole.choices[0].text


def test_models_list_only_the_callers_deployments_and_base_models(router, world):
    own = {m.id: m for m in OpenAI(base_url=router.base_url, api_key=world.a.token).models.list()}
    other = {m.id for m in OpenAI(base_url=router.base_url, api_key=world.b.token).models.list()}
    assert {CUSTOMER_A_MODEL, "customerA-legal", "tiny"} <= set(own) and "customerB-model" not in own
    assert own[CUSTOMER_A_MODEL].owned_by == world.a.tenant_name and own["tiny"].owned_by == "loraplex"
    base_models = {m.name for m in world.admin.ListBaseModels(registry_pb.ListBaseModelsRequest()).base_models}
    assert "tiny" in base_models and other == {"customerB-model"} | base_models  # a session may register more
    client_b = OpenAI(base_url=router.base_url, api_key=world.b.token, max_retries=0)
    assert client_b.models.retrieve("customerB-model").id == "customerB-model"
    with pytest.raises(openai.NotFoundError):
        client_b.models.retrieve(CUSTOMER_A_MODEL)


def test_models_delete_removes_only_the_callers_own_deployment(router, world):
    """The SDK's models.delete (fine-tuned models): the deployment name goes, at once, for its
    tenant only; the adapter version stays and can be deployed again; base models are refused."""
    tenant = world.new_tenant("del")
    name = unique("gone")
    tenant.BindDeployment(registry_pb.BindDeploymentRequest(name=name, base_model="tiny",
                                                            adapter_name=_any_adapter_of(world.a, tenant)))
    client = OpenAI(base_url=router.base_url, api_key=tenant.token, max_retries=0)
    assert client.models.retrieve(name).id == name
    other = OpenAI(base_url=router.base_url, api_key=world.b.token, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.models.delete(name)  # another tenant's name is not found, and stays
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.models.delete("tiny")
    assert refused.value.status_code == 403 and "is a base model" in refused.value.message
    deleted = client.models.delete(name)
    assert deleted.id == name and deleted.deleted
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(name)  # at once, not once the change feed catches up
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
    assert name not in {m.id for m in client.models.list()}
    assert tenant.ListAdapters(registry_pb.ListAdaptersRequest()).adapters  # the weights stay


def _any_adapter_of(owner, tenant) -> str:
    """Uploads a copy of one of `owner`'s adapters for `tenant`; returns its name."""
    source = owner.ListAdapters(registry_pb.ListAdaptersRequest()).adapters[0]
    manifest, weights = owner.download(source.id)
    name = unique("copy")
    tenant.upload(AdapterFiles(manifest.config_json.encode(), weights), name=name, as_files=True)
    return name


def test_tenant_b_cannot_use_tenant_as_model_over_http(router, world):
    client_b = OpenAI(base_url=router.base_url, api_key=world.b.token, max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client_b.chat.completions.create(model=CUSTOMER_A_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found" and caught.value.status_code == 404
    assert caught.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client_b.chat.completions.create(model=CUSTOMER_A_MODEL, messages=[{"role": "user", "content": "hi"}],
                                         stream=True)


def test_openai_shaped_errors_with_matching_status_codes(router, world, client_a):
    bad_key = OpenAI(base_url=router.base_url, api_key="lpx_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad_key.chat.completions.create(model=CUSTOMER_A_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as caught:
        client_a.chat.completions.create(model=CUSTOMER_A_MODEL, messages=[{"role": "user", "content": "hi"}], n=17)
    assert caught.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as caught:
        client_a.chat.completions.create(model=CUSTOMER_A_MODEL, messages=[{"role": "function", "content": "x"}])
    assert "role" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:  # the node's own validation, passed through
        client_a.chat.completions.create(model=CUSTOMER_A_MODEL, messages=[{"role": "user", "content": "hi"}],
                                         top_p=5)
    assert "top_p" in caught.value.message
    status, body, _ = http("POST", f"{router.base_url}/chat/completions", b"{not json", world.a.token)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body, _ = http("GET", f"{router.base_url}/models")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert http("GET", f"{router.base_url}/nowhere")[0] == 404
    status, body, _ = http("GET", f"{router.base_url}/chat/completions")
    assert status == 405 and body["error"]["message"]


def test_chat_without_max_tokens_generates_until_the_context_is_full(client_a):
    """OpenAI's chat default: not the node's 256-token default, the room the context leaves."""
    answer = client_a.chat.completions.create(model=CUSTOMER_A_MODEL, messages=[{"role": "user", "content": "hi"}],
                                              temperature=0, extra_body={"ignore_eos": True})
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens > 256
    assert answer.usage.total_tokens == PRESETS["tiny"].max_position_embeddings


def test_the_nodes_context_errors_name_the_field_and_say_context_length_exceeded(client_a):
    with pytest.raises(openai.BadRequestError) as caught:
        client_a.chat.completions.create(model=CUSTOMER_A_MODEL, messages=[{"role": "user", "content": "word " * 400}])
    assert caught.value.code == "context_length_exceeded" and caught.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as caught:
        client_a.completions.create(model=CUSTOMER_A_MODEL, prompt="word " * 400)
    assert caught.value.code == "context_length_exceeded" and caught.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as caught:
        client_a.chat.completions.create(model=CUSTOMER_A_MODEL, messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=100_000)
    assert caught.value.code == "context_length_exceeded" and caught.value.body["param"] == "max_tokens"


def test_streamed_chunks_carry_a_null_usage_until_the_last_with_include_usage(router, world):
    body = json.dumps({"model": CUSTOMER_A_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                       "stream": True, "stream_options": {"include_usage": True},
                       "ignore_eos": True}).encode()  # a sampled EOS would end the stream before 4 tokens
    request = urllib.request.Request(f"{router.base_url}/chat/completions", data=body, method="POST",
                                     headers={"authorization": f"Bearer {world.a.token}"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        events = [line[len(b"data: "):] for line in reply.read().splitlines() if line.startswith(b"data: ")]
    chunks = [json.loads(event) for event in events[:-1]]
    assert events[-1] == b"[DONE]" and all("usage" in chunk for chunk in chunks)
    assert [chunk["usage"] is None for chunk in chunks] == [True] * (len(chunks) - 1) + [False]
    assert chunks[-1]["usage"]["completion_tokens"] == 4 and chunks[-1]["choices"] == []


@pytest.mark.parametrize(("extra", "param"), [({"max_token": 3}, "max_token"), ({"stream": "false"}, "stream"),
                                              ({"seed": 2**64}, "seed"), ({"max_tokens": 2**32}, "max_tokens"),
                                              ({"user": 42}, "user")])
def test_unknown_fields_wrong_types_and_out_of_range_values_are_a_400_not_ignored_or_a_500(router, world, extra, param):
    body = {"model": CUSTOMER_A_MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}
    status, reply, _ = http("POST", f"{router.base_url}/chat/completions", json.dumps(body).encode(), world.a.token)
    assert status == 400 and reply["error"]["param"] == param and reply["error"]["type"] == "invalid_request_error"


def test_logprob_bytes_rebuild_the_answer_even_where_tokens_split_characters(client_a, tiny_model_dir):
    special = set(AutoTokenizer.from_pretrained(tiny_model_dir).all_special_tokens)  # the answer's text skips them
    # the base model's random weights pick byte tokens that split characters
    answer = client_a.chat.completions.create(model="tiny", temperature=0, max_tokens=48, logprobs=True,
                                              messages=[{"role": "user", "content": "你好, é à ü — 日本語"}],
                                              extra_body={"ignore_eos": True})
    entries = answer.choices[0].logprobs.content
    assert len(entries) == 48
    rebuilt = b"".join(bytes(e.bytes) for e in entries if e.token not in special).decode("utf-8", errors="replace")
    assert rebuilt == answer.choices[0].message.content
