"""OpenAI request bodies -> GenerateCall, and Router results -> OpenAI response objects.

Pure functions (no HTTP, no gRPC). As OpenAI does, a field it does not define is refused with
a 400 ("unrecognized request argument"), and so is a wrong type or an out-of-range value.
Fields OpenAI defines that we cannot honour are refused with a 400 that names them (best_of
beyond n, the deprecated functions, echo, suffix, audio, predictions,
reasoning effort, moderation) rather than silently ignored; fields that change nothing here
(user, metadata, store, service_tier, prompt caching hints, ...) are accepted, type-checked as
OpenAI does, so a typo'd value fails here as it would there. presence_penalty,
frequency_penalty and logit_bias are honoured (semantics: the node's Sampler), and so are n (up
to 16 choices: openai_choices.py), chat's response_format (JSON mode and JSON Schema:
openai_response_format.py) and tools with any tool_choice (openai_tools.py). Three common
extensions are taken as vLLM takes them: top_k, ignore_eos and repetition_penalty (the SDK sends
them through `extra_body`).
Limits the node would enforce after placement (stop sequences, penalty and bias ranges) are
checked here too, so the caller gets OpenAI's kind of 400 naming the parameter instead of the
node's `node_rejected`; only the node knows its vocabulary, so a logit_bias id past it is the
node's 400 (still naming logit_bias).

A response's `id` (chatcmpl-..., cmpl-...) is the caller's handle on one answer, so it is
built from an id the HTTP layer makes fresh per response, never from the request id, which
a client may choose and reuse (retries carry the same X-Client-Request-Id).
"""

from __future__ import annotations

import codecs
import dataclasses
import re

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.inference.engine.sampling_params import (
    MAX_ABS_LOGIT_BIAS,
    MAX_ABS_PENALTY,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_STOP_STRINGS,
)
from services.router.choice_reader import ChoiceReader
from services.router.openai_messages import bad_param as _bad
from services.router.openai_messages import chat_messages
from services.router.openai_messages import flag as _flag
from services.router.openai_messages import template_kwargs_json
from services.router.openai_response_format import structured_output
from services.router.openai_tools import ToolUse, tool_use
from services.router.proxy import Completion, GenerateCall
from services.router.openai_choices import MAX_CHOICES, total_usage

FINISH = {gen.FINISH_REASON_STOP: "stop", gen.FINISH_REASON_LENGTH: "length"}
#: OpenAI's default for /v1/completions; chat generates until the context is full, as OpenAI's does.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
#: The node's limit on alternatives per position (SamplingParams.top_logprobs).
MAX_TOP_LOGPROBS = 20
#: The node's limit on stop sequences, checked here so the caller gets OpenAI's kind of 400.
MAX_STOP = MAX_STOP_STRINGS
UINT32, UINT64, INT64_MIN = 2**32 - 1, 2**64 - 1, -(2**63)
#: The proto's floats are float32: a larger repetition_penalty would reach the node as infinity.
FLOAT32_MAX = 3.4028234663852886e38
#: A logit_bias key: a token id in decimal digits (int() would also take "+5", " 5" and "٥", and
#: raise on a string of over 4300 digits); at most 10 digits, as a uint32 has.
TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")

#: Accepted and without effect here, each with the JSON type OpenAI requires of it.
NO_OP_FIELDS = {"user": str, "metadata": dict, "store": bool, "service_tier": str, "safety_identifier": str,
                "prompt_cache_key": str, "prompt_cache_retention": str, "prompt_cache_options": dict}
#: The JSON names of those types, for the error message.
JSON_TYPES = {str: "a string", bool: "true or false", dict: "an object"}
#: OpenAI's limits on `metadata`, which it refuses past them.
METADATA_MAX_PAIRS, METADATA_MAX_KEY, METADATA_MAX_VALUE = 16, 64, 512
#: stream_options keys: include_usage is honoured; we never obfuscate, so asking not to is a no-op.
STREAM_OPTIONS = {"include_usage", "include_obfuscation"}
#: Every field OpenAI's chat API defines, plus vLLM's extensions we take; value checks come after.
CHAT_FIELDS = set(NO_OP_FIELDS) | {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "logprobs",
    "top_logprobs", "stream", "stream_options", "n", "presence_penalty", "frequency_penalty", "logit_bias", "tools",
    "functions", "tool_choice", "parallel_tool_calls", "function_call", "response_format", "modalities", "audio",
    "prediction", "reasoning_effort", "verbosity", "web_search_options", "moderation", "top_k", "ignore_eos",
    "repetition_penalty", "chat_template_kwargs"}
COMPLETION_FIELDS = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "logprobs", "stream", "stream_options",
    "n", "best_of", "echo", "suffix", "presence_penalty", "frequency_penalty", "logit_bias", "user", "top_k",
    "ignore_eos", "repetition_penalty"}
#: Defined by OpenAI, meaningful only for what we do not serve: refused when set at all.
NOT_SERVED = {"audio": "audio output is not supported", "prediction": "predicted outputs are not supported",
              "reasoning_effort": "reasoning effort cannot be set: a model that thinks always does (Qwen3's "
                                  "thinking is turned off by chat_template_kwargs {\"enable_thinking\": false})",
              "verbosity": "verbosity is not supported", "web_search_options": "web search is not supported",
              "moderation": "moderation is not supported"}


@dataclasses.dataclass(frozen=True)
class Options:
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    #: The request's name for the token limit: the node names it max_tokens in its errors (a
    #: limit beyond the context), which must name the parameter the caller actually sent.
    max_tokens_param: str = "max_tokens"
    #: How many choices (openai_choices.py).
    n: int = 1
    #: Set when the answers are tool calls (openai_tools.py).
    tool_use: ToolUse | None = None
    #: The request's name for what the node calls structured_output, for its errors.
    structured_output_param: str = "response_format"
    #: Decoded under a grammar (JSON response_format, guaranteed tool calls): no thinking to split.
    constrained: bool = False


def _present(body: dict, allowed: set[str]) -> dict:
    """The body without null fields (OpenAI treats null as unset), after refusing unknown ones."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _bad(unknown[0], f"unrecognized request argument (not part of this API): {', '.join(unknown)}")
    return {key: value for key, value in body.items() if value is not None}


def _number(body: dict, field: str, low: float, high: float) -> float | None:
    return _in_range(body.get(field), field, low, high)


def _in_range(value, field: str, low: float, high: float) -> float | None:
    """A JSON number in [low, high] as a float (None stays None), else a 400 naming `field`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(field, f"expected a number, got {value!r}")
    if not low <= value <= high:  # NaN fails this too
        raise _bad(field, f"must be between {low} and {high}, got {value}")
    return float(value)


def _integer(body: dict, field: str, low: int, high: int) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(field, f"expected an integer, got {value!r}")
    if not low <= value <= high:
        raise _bad(field, f"must be between {low} and {high}, got {value}")
    return value



def _check_no_ops(body: dict) -> None:
    """Fields without effect here are still typed as OpenAI types them: a wrong one is a 400."""
    for field, kind in NO_OP_FIELDS.items():
        value = body.get(field)
        if value is not None and not isinstance(value, kind):
            raise _bad(field, f"expected {JSON_TYPES[kind]}, got {value!r}")
    metadata = body.get("metadata") or {}
    if len(metadata) > METADATA_MAX_PAIRS:
        raise _bad("metadata", f"at most {METADATA_MAX_PAIRS} key-value pairs, got {len(metadata)}")
    for key, value in metadata.items():
        if len(key) > METADATA_MAX_KEY or not isinstance(value, str) or len(value) > METADATA_MAX_VALUE:
            raise _bad(f"metadata.{key}", f"keys are strings of at most {METADATA_MAX_KEY} characters, values "
                                          f"strings of at most {METADATA_MAX_VALUE}")


def _refuse_unsupported(body: dict) -> None:
    _check_no_ops(body)
    for field in ("functions", "function_call"):
        if body.get(field):
            raise _bad(field, "the deprecated functions API is not supported: use tools and tool_choice")
    if _flag(body, "echo"):
        raise _bad("echo", "echo is not supported")
    if body.get("suffix"):
        raise _bad("suffix", "suffix is not supported")
    if body.get("modalities") not in (None, ["text"]):
        raise _bad("modalities", "only ['text'] is supported")
    for field, why in NOT_SERVED.items():
        if field in body:
            raise _bad(field, why)


def _sampling(body: dict, max_tokens_field: str, default_max_tokens: int | None) -> gen.SamplingParams:
    params = gen.SamplingParams()
    max_tokens = _integer(body, max_tokens_field, 1, UINT32)
    if max_tokens is not None or default_max_tokens is not None:
        params.max_tokens = default_max_tokens if max_tokens is None else max_tokens
    else:  # OpenAI's chat default: as much as the context leaves
        params.until_context_full = True
    temperature = _number(body, "temperature", 0.0, 2.0)
    if temperature is not None:
        params.temperature = temperature
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p == 0.0:  # the smallest nucleus is the most likely token alone: greedy
        params.temperature = 0.0
    elif top_p is not None:
        params.top_p = top_p
    top_k = _integer(body, "top_k", 0, UINT32)
    if top_k is not None:
        params.top_k = top_k
    # OpenAI takes any int64 seed (clients send -1 and other negatives); the node's is a uint64,
    # so a negative seed maps to its two's complement: still one fixed seed per value.
    seed = _integer(body, "seed", INT64_MIN, UINT64)
    if seed is not None:
        params.seed = seed % 2**64
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise _bad("stop", "expected a string or a list of strings")
    if stop and len(stop) > MAX_STOP:
        raise _bad("stop", f"array too long. Expected an array with maximum length {MAX_STOP}, but got an array "
                           f"with length {len(stop)} instead.")
    if stop and not all(stop):  # the empty string would match before the first token
        raise _bad("stop", "stop sequences must be non-empty strings")
    params.stop.extend(stop or [])
    params.ignore_eos = _flag(body, "ignore_eos")
    _penalties(body, params)
    return params


def _penalties(body: dict, params: gen.SamplingParams) -> None:
    """presence/frequency penalties (OpenAI), repetition_penalty (vLLM) and logit_bias."""
    for field in ("presence_penalty", "frequency_penalty"):
        value = _number(body, field, -MAX_ABS_PENALTY, MAX_ABS_PENALTY)
        if value:  # 0 is off: left unset, as the node's default
            setattr(params, field, value)
    repetition = _number(body, "repetition_penalty", -FLOAT32_MAX, FLOAT32_MAX)
    if repetition is not None and repetition <= 0.0:
        raise _bad("repetition_penalty", f"must be greater than 0 (1 = off), got {body['repetition_penalty']}")
    if repetition is not None and repetition != 1.0:
        params.repetition_penalty = repetition
    bias = body.get("logit_bias", {})
    if not isinstance(bias, dict):
        raise _bad("logit_bias", f"expected an object mapping token ids to biases, got {bias!r}")
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise _bad("logit_bias", f"at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(bias)}")
    for key in bias:
        if not TOKEN_ID_KEY.fullmatch(key) or int(key) > UINT32:
            raise _bad("logit_bias", f"invalid key {key[:40]!r}: keys are token ids (non-negative integers)")
        value = _in_range(bias[key], "logit_bias", -MAX_ABS_LOGIT_BIAS, MAX_ABS_LOGIT_BIAS)
        if value is None:  # null means "unset" for a field, but a bias must be a number
            raise _bad("logit_bias", f"the bias for token {key} must be a number, got null")
        params.logit_bias[int(key)] = value


def _max_tokens_field(body: dict) -> str:
    """Chat's limit: max_completion_tokens over the deprecated max_tokens, but a null one counts
    as absent (`max_completion_tokens: null, max_tokens: 5` is 5 tokens, not "until EOS")."""
    return "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"


def _options(body: dict) -> Options:
    stream = _flag(body, "stream")
    n = _integer(body, "n", 1, MAX_CHOICES) or 1
    best_of = _integer(body, "best_of", 1, UINT32)
    if best_of not in (None, n):  # more candidates than choices means ranking them: not done here
        raise _bad("best_of", f"best_of must equal n ({n}): ranking extra candidates is not supported")
    stream_options = body.get("stream_options")
    if stream_options is None:
        return Options(stream=stream, n=n)
    if not stream:
        raise _bad("stream_options", "only allowed when 'stream' is true")
    if not isinstance(stream_options, dict):
        raise _bad("stream_options", "expected an object")
    unknown = sorted(set(stream_options) - STREAM_OPTIONS)
    if unknown:  # as for the body's own fields: a typo'd option must not pass for an honoured one
        raise _bad(f"stream_options.{unknown[0]}", f"unrecognized stream option: {', '.join(unknown)}")
    for key, value in stream_options.items():  # each option is a boolean (null: unset)
        if value is not None and not isinstance(value, bool):
            raise _bad(f"stream_options.{key}", f"expected true or false, got {value!r}")
    return Options(stream=stream, include_usage=bool(stream_options.get("include_usage")), n=n)


def chat_call(body: dict) -> tuple[GenerateCall, Options]:
    body = _present(body, CHAT_FIELDS)
    _refuse_unsupported(body)
    messages = chat_messages(body.get("messages"))
    messages.template_kwargs_json = template_kwargs_json(body)
    max_tokens_param = _max_tokens_field(body)
    sampling = _sampling(body, max_tokens_param, None)
    sampling.logprobs = _flag(body, "logprobs")
    top_logprobs = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top_logprobs:
        if not sampling.logprobs:
            raise _bad("top_logprobs", "needs logprobs: true")
        sampling.top_logprobs = top_logprobs
    structured = structured_output(body.get("response_format"))
    tools = tool_use(body)
    if tools is not None:
        if structured is not None:
            raise _bad("response_format", "cannot be combined with tools unless tool_choice is 'none': the answer's "
                                          "grammar would be the calls' or the format's, not both")
        if tools.schema:  # "required" or a named function; "auto" generates freely
            structured = gen.StructuredOutput(json_schema=tools.schema)
        messages.tools_json = tools.tools_json
    if structured is not None:
        sampling.structured_output.CopyFrom(structured)
    call = GenerateCall(model=_model(body), messages=messages, sampling=sampling)
    return call, dataclasses.replace(_options(body), logprobs=sampling.logprobs, max_tokens_param=max_tokens_param,
                                     tool_use=tools, structured_output_param="tools" if tools else "response_format",
                                     constrained=structured is not None)


def completion_call(body: dict) -> tuple[GenerateCall, Options]:
    body = _present(body, COMPLETION_FIELDS)
    _refuse_unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("prompt", "expected one non-empty string (batches of prompts are not supported)")
    sampling = _sampling(body, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
    logprobs = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)
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
            "total_tokens": value.total_tokens,
            # the prompt tokens the node read from its prefix cache (the caller's own earlier requests)
            "prompt_tokens_details": {"cached_tokens": value.cached_prompt_tokens},
            "completion_tokens_details": {"reasoning_tokens": value.reasoning_tokens}}


def chat_logprobs(entries) -> dict:
    def item(entry) -> dict:  # the node's raw bytes: `token` is U+FFFD for part of a character
        return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.token_bytes or entry.token.encode())}

    return {"content": [{**item(e), "top_logprobs": [item(t) for t in e.top]} for e in entries]}


def _utf8_decoder():
    return codecs.getincrementaldecoder("utf-8")(errors="replace")  # as the node decodes its text


class TextOffsets:
    """Completions' `text_offset`: for each token, the index in the returned text of the
    character its first byte belongs to. Summing len(token) drifted: a token holding part of a
    multi-byte character decodes alone to U+FFFD, one character per token, so an "é" split over
    two tokens counted two. Decoding the tokens' raw bytes incrementally counts each character
    once (tokens sharing a character share its offset). One per response, so streamed chunks
    continue the count. A special token (an EOS generated under ignore_eos) is not in the text,
    which the node decodes with special tokens skipped: it gets the offset where it would be
    and adds nothing, nor does it cut off a character held back (the node's decode joins the
    bytes on either side of it)."""

    def __init__(self) -> None:
        self._decoder = _utf8_decoder()
        self._chars = 0

    def __call__(self, entries) -> list[int]:
        offsets = []
        for entry in entries:
            if entry.special:
                offsets.append(self._chars)
                continue
            data = entry.token_bytes or entry.token.encode()
            offsets.append(self._chars + self._broken_before(data[:1]))
            self._chars += len(self._decoder.decode(data))
        return offsets

    def _broken_before(self, first: bytes) -> int:
        """The characters that bytes held back for an unfinished character become before this
        token's first byte: none when that byte continues them (together they are still one
        character), else the U+FFFDs they turn into on their own. Python's decoder holds some
        bytes no character can follow (ed be), so "continues" is judged by decoding, not by
        whether the decoder still holds bytes."""
        pending = self._decoder.getstate()[0]
        if not pending or not first or len((pending + first).decode("utf-8", errors="replace")) == 1:
            return 0
        return len(pending.decode("utf-8", errors="replace"))


def completion_logprobs(entries, offsets: TextOffsets | None = None) -> dict:
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
            "text_offset": (offsets or TextOffsets())(entries)}


def chat_completion(done: list[Completion], response_id: str, created: int, options: Options) -> dict:
    return {"id": f"chatcmpl-{response_id}", "object": "chat.completion", "created": created,
            "model": done[0].target.model, "system_fingerprint": None,
            "choices": [_chat_choice(index, choice, options) for index, choice in enumerate(done)],
            "usage": usage(total_usage([choice.usage for choice in done]))}


def _chat_choice(index: int, choice: Completion, options: Options) -> dict:
    message, finish = ChoiceReader(options.tool_use, choice.tool_call_format, choice.reasoning_start,
                                   options.constrained).answer(choice.text, FINISH.get(choice.finish_reason))
    return {"index": index, "message": {"role": "assistant", **message},
            "logprobs": chat_logprobs(choice.logprobs) if options.logprobs else None, "finish_reason": finish}


def text_completion(done: list[Completion], response_id: str, created: int, options: Options) -> dict:
    return {"id": f"cmpl-{response_id}", "object": "text_completion", "created": created,
            "model": done[0].target.model, "system_fingerprint": None,
            "choices": [{"index": index, "text": choice.text,
                         "logprobs": completion_logprobs(choice.logprobs) if options.logprobs else None,
                         "finish_reason": FINISH.get(choice.finish_reason)} for index, choice in enumerate(done)],
            "usage": usage(total_usage([choice.usage for choice in done]))}


def model_object(entry, owner: str) -> dict:
    return {"id": entry.name, "object": "model", "created": int(entry.created_at),
            "owned_by": owner if entry.adapter_name else "loraplex"}


def chat_chunk(response_id: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
               logprobs: dict | None = None, usage_: dict | None = None, with_choice: bool = True,
               include_usage: bool = False, index: int = 0) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    choices = [choice] if with_choice else []
    chunk = {"id": f"chatcmpl-{response_id}", "object": "chat.completion.chunk", "created": created, "model": model,
             "system_fingerprint": None, "choices": choices}
    if include_usage or usage_ is not None:  # with include_usage, null until the last chunk (OpenAI's shape)
        chunk["usage"] = usage_
    return chunk


def completion_chunk(response_id: str, created: int, model: str, text: str, finish_reason: str | None = None,
                     logprobs: dict | None = None, usage_: dict | None = None, with_choice: bool = True,
                     include_usage: bool = False, index: int = 0) -> dict:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    choices = [choice] if with_choice else []
    chunk = {"id": f"cmpl-{response_id}", "object": "text_completion", "created": created, "model": model,
             "system_fingerprint": None, "choices": choices}
    if include_usage or usage_ is not None:  # with include_usage, null until the last chunk (OpenAI's shape)
        chunk["usage"] = usage_
    return chunk
