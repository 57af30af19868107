"""Chat's `response_format` -> the node's StructuredOutput (grammar-constrained decoding).

As OpenAI defines it:
- {"type": "text"}: free text, as without it;
- {"type": "json_object"}: the answer is one JSON object;
- {"type": "json_schema", "json_schema": {"name", "description"?, "schema"?, "strict"?}}: the
  answer is JSON matching `schema` (without one: any JSON value). `name` is required (1-64 of
  a-z, A-Z, 0-9, _ and -); `description` guides OpenAI's model only, and `strict` is taken
  either way: the node enforces the schema by masking tokens, so there is no loose mode.
The schema goes to the node as compact JSON text in the key order given (properties are
generated in that order); only the node compiles it, so a schema it cannot follow is its 400,
renamed to `response_format` by the HTTP layer. OpenAI requires the word "JSON" in the
messages for json_object; not here (the grammar guarantees JSON), though saying what to put
in it is what makes the content useful.
"""

from __future__ import annotations

import json
import re
from typing import Any

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.inference.engine.sampling_params import MAX_JSON_SCHEMA_BYTES
from services.router.openai_messages import bad_param

FIELD = "response_format"
TYPES = ("text", "json_object", "json_schema")
#: OpenAI's rule for json_schema.name.
SCHEMA_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
#: json_schema's keys, each with the JSON type OpenAI gives it.
JSON_SCHEMA_KEYS = {"name": str, "description": str, "schema": dict, "strict": bool}
JSON_TYPES = {str: "a string", dict: "an object", bool: "true or false"}


def structured_output(response_format: Any) -> gen.StructuredOutput | None:
    """None for free text (the field absent or {"type": "text"}); a 400 naming the part of
    response_format at fault for anything malformed."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise bad_param(FIELD, f"expected an object with a type, one of {', '.join(TYPES)}")
    kind = response_format.get("type")
    if kind not in TYPES:
        raise bad_param(f"{FIELD}.type", f"must be one of {', '.join(TYPES)}, got {kind!r}")
    allowed = {"type", "json_schema"} if kind == "json_schema" else {"type"}
    unknown = sorted(key for key, value in response_format.items() if key not in allowed and value is not None)
    if unknown:
        raise bad_param(f"{FIELD}.{unknown[0]}", f"not a key of a {kind} response format")
    if kind == "text":
        return None
    if kind == "json_object":
        return gen.StructuredOutput(json_object=True)
    return gen.StructuredOutput(json_schema=_schema_text(response_format.get("json_schema")))


def _schema_text(json_schema: Any) -> str:
    where = f"{FIELD}.json_schema"
    present = named_object(json_schema, where, JSON_SCHEMA_KEYS, "expected an object with a name and a schema")
    return schema_text(present.get("schema", {}), f"{where}.schema")


def named_object(value: Any, where: str, keys: dict[str, type], expected: str) -> dict:
    """An OpenAI object with a `name` (a json_schema, a function): its keys that are not null
    (null is unset, as OpenAI reads it), each of its type, the name 1-64 of a-z, A-Z, 0-9, _
    and -; else a 400 naming the part at fault (`expected` when it is no object at all)."""
    if not isinstance(value, dict):
        raise bad_param(where, expected)
    present = {key: item for key, item in value.items() if item is not None}
    unknown = sorted(set(present) - set(keys))
    if unknown:
        raise bad_param(f"{where}.{unknown[0]}", f"unrecognized key: {', '.join(unknown)}")
    for key, kind in keys.items():
        if key in present and not isinstance(present[key], kind):
            raise bad_param(f"{where}.{key}", f"expected {JSON_TYPES[kind]}, got {present[key]!r}"[:200])
    if not SCHEMA_NAME.fullmatch(present.get("name", "")):
        raise bad_param(f"{where}.name", "required: 1-64 characters among a-z, A-Z, 0-9, _ and -")
    return present


def schema_text(schema: dict, where: str) -> str:
    """A schema as the node takes it: compact JSON text in the key order given, of at most
    64 KiB; else a 400 naming `where`."""
    try:
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:  # NaN or Infinity, which Python's parser takes but JSON has not
        raise bad_param(where, "NaN and Infinity are not JSON numbers") from None
    except RecursionError:
        raise bad_param(where, "nested too deeply") from None
    if len(text.encode()) > MAX_JSON_SCHEMA_BYTES:
        raise bad_param(where, f"at most {MAX_JSON_SCHEMA_BYTES // 1024} KiB as compact JSON, got "
                               f"{len(text.encode())} bytes")
    return text
