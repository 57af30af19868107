"""Chat's response_format -> the node's StructuredOutput, as a pure function: what OpenAI
defines becomes the proto field, anything malformed is a 400 naming the part at fault."""

from __future__ import annotations

import json

import pytest

from services.common.errors import InvalidArgument
from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.inference.engine.sampling_params import MAX_JSON_SCHEMA_BYTES
from services.router import openai_schema as schema
from services.router.openai_response_format import structured_output

HI = [{"role": "user", "content": "x"}]


def sampling_of(response_format) -> gen.SamplingParams:
    call, _ = schema.chat_call({"model": "m", "messages": HI, "response_format": response_format})
    return call.sampling


def test_text_or_null_is_free_text():
    for response_format in (None, {"type": "text"}):
        assert not sampling_of(response_format).HasField("structured_output")


def test_json_object_is_any_object():
    assert sampling_of({"type": "json_object"}).structured_output == gen.StructuredOutput(json_object=True)


def test_a_json_schema_goes_to_the_node_as_compact_json_in_the_order_given():
    body = {"type": "object", "required": ["zeta", "alpha"], "additionalProperties": False,
            "properties": {"zeta": {"type": "string", "description": "é"}, "alpha": {"type": "integer"}}}
    sent = sampling_of({"type": "json_schema", "json_schema": {
        "name": "Quote_v-1", "description": "a quote", "schema": body, "strict": True}}).structured_output
    assert sent.WhichOneof("kind") == "json_schema"
    assert sent.json_schema == json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    assert list(json.loads(sent.json_schema)["properties"]) == ["zeta", "alpha"]  # generated in this order
    loose = structured_output({"type": "json_schema", "json_schema": {"name": "q", "schema": body, "strict": False,
                                                                       "description": None}})
    assert loose.json_schema == sent.json_schema  # strict or not, the node enforces the schema
    assert structured_output({"type": "json_schema", "json_schema": {"name": "any"}}).json_schema == "{}"


@pytest.mark.parametrize(("response_format", "param"), [
    ("json", "response_format"),
    ({}, "response_format.type"),
    ({"type": "xml"}, "response_format.type"),
    ({"type": "text", "json_schema": {"name": "q"}}, "response_format.json_schema"),
    ({"type": "json_object", "schema": {}}, "response_format.schema"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": "q"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": ""}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "a b"}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "q" * 65}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": 5}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "q", "schema": "{}"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "q", "schema": True}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "q", "strict": "yes"}}, "response_format.json_schema.strict"),
    ({"type": "json_schema", "json_schema": {"name": "q", "schema": {}, "shema": {}}},
     "response_format.json_schema.shema"),
    ({"type": "json_schema", "json_schema": {"name": "q", "schema": {"maximum": float("nan")}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "q", "schema": {"description": "x" * MAX_JSON_SCHEMA_BYTES}}},
     "response_format.json_schema.schema"),
])
def test_a_malformed_response_format_is_a_400_naming_the_part(response_format, param):
    with pytest.raises(InvalidArgument) as caught:
        sampling_of(response_format)
    assert caught.value.metadata["field"] == param and f"'{param}'" in caught.value.message
