"""OpenAI request bodies -> GenerateCall, and Router results -> OpenAI response objects.

Pure functions (no HTTP, no gRPC). Fields we cannot honour are refused with a 400 that
names them (n > 1, penalties, tools, logit_bias, echo, suffix, non-text response formats)
rather than silently ignored; fields that change nothing here (user, metadata, store,
stream_options other than include_usage) are accepted. Two common extensions are taken
as vLLM takes them: top_k and ignore_eos.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from services.common.errors import InvalidArgument
from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.router.proxy import Completion, GenerateCall

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH = {gen.FINISH_REASON_STOP: "stop", gen.FINISH_REASON_LENGTH: "length"}
#: OpenAI's default for /v1/completions; chat defaults to the node's (the context).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class Options:
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False


def _bad(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"'{field}': {message}", field=field)


def _number(body: dict, field: str, kind: type | tuple = (int, float)) -> Any:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise _bad(field, f"expected a {'integer' if kind is int else 'number'}, got {value!r}")
    return value


def _refuse_unsupported(body: dict) -> None:
    n = body.get("n")
    if n not in (None, 1):
        raise _bad("n", "only n = 1 is supported")
    for field in ("presence_penalty", "frequency_penalty"):
        if body.get(field) not in (None, 0, 0.0):
            raise _bad(field, "penalties are not supported")
    if body.get("logit_bias"):
        raise _bad("logit_bias", "logit_bias is not supported")
    for field in ("tools", "functions", "tool_choice", "function_call"):
        if body.get(field):
            raise _bad(field, "tool and function calling are not supported")
    if body.get("best_of") not in (None, 1):
        raise _bad("best_of", "only best_of = 1 is supported")
    if body.get("echo"):
        raise _bad("echo", "echo is not supported")
    if body.get("suffix"):
        raise _bad("suffix", "suffix is not supported")
    response_format = body.get("response_format")
    if response_format and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise _bad("response_format", "only {'type': 'text'} is supported")


def _sampling(body: dict, max_tokens: int | None) -> gen.SamplingParams:
    params = gen.SamplingParams()
    if max_tokens is not None:
        if max_tokens < 1:
            raise _bad("max_tokens", f"must be >= 1, got {max_tokens}")
        params.max_tokens = max_tokens
    for field in ("temperature", "top_p"):
        value = _number(body, field)
        if value is not None:
            setattr(params, field, float(value))
    for field in ("top_k", "seed"):
        value = _number(body, field, int)
        if value is not None:
            if value < 0:
                raise _bad(field, f"must be >= 0, got {value}")
            setattr(params, field, value)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise _bad("stop", "expected a string or a list of strings")
    params.stop.extend(stop or [])
    params.ignore_eos = bool(body.get("ignore_eos", False))
    return params


def _options(body: dict) -> Options:
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise _bad("stream_options", "expected an object")
    return Options(stream=bool(body.get("stream", False)), include_usage=bool(stream_options.get("include_usage")))


def _text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{index}].content", "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise _bad(f"messages[{index}].content", "expected a string or a list of text parts")


def chat_call(body: dict) -> tuple[GenerateCall, Options]:
    _refuse_unsupported(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "expected a non-empty list of {role, content} objects")
    turns = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise _bad(f"messages[{i}].role", f"must be one of {sorted(ROLES)}, got {role!r}")
        turns.append((ROLES[role], _text(message.get("content"), i)))
    max_tokens = _number(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int)
    sampling = _sampling(body, max_tokens)
    top_logprobs = _number(body, "top_logprobs", int)
    sampling.logprobs = bool(body.get("logprobs", False))
    if top_logprobs:
        if not sampling.logprobs:
            raise _bad("top_logprobs", "needs logprobs: true")
        sampling.top_logprobs = top_logprobs
    call = GenerateCall(model=_model(body), messages=tuple(turns), sampling=sampling)
    return call, dataclasses.replace(_options(body), logprobs=sampling.logprobs)


def completion_call(body: dict) -> tuple[GenerateCall, Options]:
    _refuse_unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("prompt", "expected one non-empty string (batches of prompts are not supported)")
    max_tokens = _number(body, "max_tokens", int)
    sampling = _sampling(body, COMPLETIONS_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens)
    logprobs = _number(body, "logprobs", int)
    if logprobs is not None:
        sampling.logprobs, sampling.top_logprobs = True, logprobs
    call = GenerateCall(model=_model(body), prompt=prompt, sampling=sampling)
    return call, dataclasses.replace(_options(body), logprobs=logprobs is not None)


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "a model name is required (GET /v1/models lists yours)")
    return model


# --- responses ---

def usage(value: gen.Usage) -> dict:
    return {"prompt_tokens": value.prompt_tokens, "completion_tokens": value.completion_tokens,
            "total_tokens": value.total_tokens}


def chat_logprobs(entries) -> dict:
    def item(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t.token, t.logprob) for t in e.top]}
                        for e in entries]}


def completion_logprobs(entries, offset: int = 0) -> dict:
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries], "text_offset": offsets}


def chat_completion(done: Completion, created: int, options: Options) -> dict:
    return {"id": f"chatcmpl-{done.request_id}", "object": "chat.completion", "created": created,
            "model": done.target.model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "logprobs": chat_logprobs(done.logprobs) if options.logprobs else None,
                         "finish_reason": FINISH.get(done.finish_reason)}],
            "usage": usage(done.usage)}


def text_completion(done: Completion, created: int, options: Options) -> dict:
    return {"id": f"cmpl-{done.request_id}", "object": "text_completion", "created": created,
            "model": done.target.model, "system_fingerprint": None,
            "choices": [{"index": 0, "text": done.text,
                         "logprobs": completion_logprobs(done.logprobs) if options.logprobs else None,
                         "finish_reason": FINISH.get(done.finish_reason)}],
            "usage": usage(done.usage)}


def model_object(entry, owner: str) -> dict:
    return {"id": entry.name, "object": "model", "created": int(entry.created_at),
            "owned_by": owner if entry.adapter_name else "loraplex"}


def chat_chunk(request_id: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
               logprobs: dict | None = None, usage_: dict | None = None, with_choice: bool = True) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    choices = [choice] if with_choice else []
    chunk = {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk", "created": created, "model": model,
             "system_fingerprint": None, "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def completion_chunk(request_id: str, created: int, model: str, text: str, finish_reason: str | None = None,
                     logprobs: dict | None = None, usage_: dict | None = None, with_choice: bool = True) -> dict:
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    choices = [choice] if with_choice else []
    chunk = {"id": f"cmpl-{request_id}", "object": "text_completion", "created": created, "model": model,
             "system_fingerprint": None, "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk
