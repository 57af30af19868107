"""response_format through the official `openai` SDK, the router and real nodes (the tiny
model, whose free text is noise): JSON mode and JSON Schema, streamed and not, the SDK's
`parse` with a pydantic model as users write it, and malformed formats as 400s naming the
parameter, whether the router or the node finds the fault."""

from __future__ import annotations

import json
from typing import Annotated, Literal

import jsonschema
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field, StringConstraints
from transformers import AutoTokenizer

from tests.router.conftest import CUSTOMER_A_MODEL
from tests.router.test_openai_sdk_conformance import refused

MESSAGES = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Rate this bond."}]
SCHEMA = {"type": "object", "properties": {
    "sector": {"enum": ["finance", "legal", "health"]},
    "risk": {"type": "integer", "minimum": 1, "maximum": 5},
    "notes": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
    "required": ["sector", "risk", "notes"], "additionalProperties": False}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "rating", "schema": SCHEMA, "strict": True}}


class Rating(BaseModel):
    """What a user hands to `parse`: the SDK turns it into a strict JSON schema."""

    sector: Literal["finance", "legal", "health"]
    risk: int = Field(ge=1, le=5)
    notes: list[Annotated[str, StringConstraints(max_length=8)]] = Field(max_length=3)


@pytest.fixture
def client(router, world) -> OpenAI:
    return OpenAI(base_url=router.base_url, api_key=world.a.token, max_retries=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_answers_parse_and_match_the_schema(client, temperature):
    completion = client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=MESSAGES, max_tokens=200,
                                                temperature=temperature, seed=3, response_format=JSON_SCHEMA_FORMAT)
    choice = completion.choices[0]
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert choice.finish_reason == "stop" and completion.usage.completion_tokens < 200


def test_a_streamed_json_schema_answer_is_the_same_json(client):
    def answer(stream: bool) -> tuple[str, str]:
        if not stream:
            choice = client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=MESSAGES, max_tokens=200,
                                                    temperature=0, response_format=JSON_SCHEMA_FORMAT).choices[0]
            return choice.message.content, choice.finish_reason
        chunks = list(client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=MESSAGES, max_tokens=200,
                                                     temperature=0, response_format=JSON_SCHEMA_FORMAT, stream=True))
        return ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason))

    streamed = answer(stream=True)
    assert streamed == answer(stream=False) and streamed[1] == "stop"
    jsonschema.validate(json.loads(streamed[0]), SCHEMA)


def test_the_sdks_parse_with_a_pydantic_model(client):
    completion = client.chat.completions.parse(model=CUSTOMER_A_MODEL, messages=MESSAGES, response_format=Rating,
                                               max_tokens=200, temperature=0)
    rating = completion.choices[0].message.parsed
    assert isinstance(rating, Rating) and 1 <= rating.risk <= 5


def test_json_object_mode(client, tiny_model_dir):
    """Any object: a bias on "}" closes it at once (the grammar's choice among allowed tokens);
    without one, the tiny model's endless key is cut by max_tokens as OpenAI's would be."""
    close = AutoTokenizer.from_pretrained(tiny_model_dir).convert_tokens_to_ids("}")
    closed = client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=MESSAGES, temperature=0, max_tokens=20,
                                            logit_bias={str(close): 100}, response_format={"type": "json_object"})
    assert (closed.choices[0].message.content, closed.choices[0].finish_reason) == ("{}", "stop")
    cut = client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=MESSAGES, temperature=0, max_tokens=8,
                                         response_format={"type": "json_object"}, stream=True)
    chunks = [c for c in cut if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.startswith("{")
    if chunks[-1].choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize(("response_format", "param"), [
    ({"type": "json"}, "response_format.type"),
    ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "has space", "schema": SCHEMA}},
     "response_format.json_schema.name"),
    # Only the node compiles schemas: its refusal names the caller's parameter all the same.
    ({"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "strin"}}}, "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "array", "uniqueItems": True}}},
     "response_format"),
])
def test_a_malformed_response_format_is_a_400_naming_it(client, response_format, param):
    body = refused(lambda: client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=MESSAGES, max_tokens=4,
                                                          response_format=response_format))
    assert body["param"] == param
    assert body["message"].startswith("response_format") or f"'{param}'" in body["message"]


def test_legacy_completions_take_no_response_format(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=CUSTOMER_A_MODEL, prompt="x", max_tokens=2,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert caught.value.body["param"] == "response_format"
