"""OpenAI request parsing and response shaping, as pure functions."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.router import openai_schema as schema
from services.router.proxy import Completion
from services.router.resolution import Target


def test_chat_bodies_become_calls():
    call, options = schema.chat_call({
        "model": "fin", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "developer", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                     {"role": "assistant", "content": None}],
        "max_tokens": 50, "max_completion_tokens": 20, "temperature": 0, "top_p": 0.5, "seed": 7, "stop": "END",
        "logprobs": True, "top_logprobs": 3, "n": 1, "presence_penalty": 0, "user": "u-1"})
    assert call.model == "fin" and call.prompt is None
    assert [(m.role, m.content) for m in call.messages.messages] == [("system", "Be brief."), ("user", "Hi there"),
                                                                      ("assistant", "")]
    assert not call.messages.tools_json
    s = call.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.seed, list(s.stop)) == (20, 0.0, 0.5, 7, ["END"])
    assert s.logprobs and s.top_logprobs == 3
    assert options == schema.Options(stream=True, include_usage=True, logprobs=True,
                                     max_tokens_param="max_completion_tokens")
    bare, _ = schema.chat_call({"model": "fin", "messages": [{"role": "user", "content": "x"}]})
    assert not bare.sampling.HasField("max_tokens") and not bare.sampling.HasField("temperature")
    assert bare.sampling.until_context_full  # OpenAI's chat default, not the node's 256


def test_null_fields_are_unset_and_no_op_fields_are_accepted():
    call, options = schema.chat_call({"model": "fin", "messages": [{"role": "user", "content": "x"}],
                                      "max_tokens": None, "temperature": None, "stream": None, "user": "u",
                                      "metadata": {"k": "v"}, "store": False, "modalities": ["text"],
                                      "service_tier": "auto", "parallel_tool_calls": False})
    assert not call.sampling.HasField("max_tokens") and not options.stream
    older, _ = schema.chat_call({"model": "fin", "messages": [{"role": "user", "content": "x"}],
                                 "max_completion_tokens": None, "max_tokens": 5})
    assert older.sampling.max_tokens == 5 and not older.sampling.until_context_full


def test_top_p_zero_is_greedy():
    call, _ = schema.chat_call({"model": "fin", "messages": [{"role": "user", "content": "x"}], "top_p": 0,
                                "temperature": 1.0})
    assert call.sampling.temperature == 0.0 and not call.sampling.HasField("top_p")


def test_penalties_and_logit_bias_become_sampling_params():
    for build, body in ((schema.chat_call, {"messages": [{"role": "user", "content": "x"}]}),
                        (schema.completion_call, {"prompt": "x"})):
        call, _ = build({"model": "fin", **body, "presence_penalty": 0.5, "frequency_penalty": -2,
                         "repetition_penalty": 1.25, "logit_bias": {"7": 100, "0012": -3.5}})
        s = call.sampling
        assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -2.0, 1.25)
        assert dict(s.logit_bias) == {7: 100.0, 12: -3.5}
        off, _ = build({"model": "fin", **body, "presence_penalty": 0, "frequency_penalty": 0.0,
                        "repetition_penalty": 1, "logit_bias": {}})
        assert not any(off.sampling.HasField(f) for f in ("presence_penalty", "frequency_penalty",
                                                          "repetition_penalty")) and not off.sampling.logit_bias


def test_completion_bodies_become_calls():
    call, options = schema.completion_call({"model": "fin", "prompt": ["once"], "logprobs": 2,
                                            "stop": ["a", "b"]})
    assert call.prompt == "once" and call.sampling.max_tokens == schema.COMPLETIONS_DEFAULT_MAX_TOKENS
    assert call.sampling.top_logprobs == 2 and options.logprobs and list(call.sampling.stop) == ["a", "b"]


@pytest.mark.parametrize(("body", "field"), [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 17}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2, "best_of": 3}, "best_of"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "frequency_penalty": 2.5}, "frequency_penalty"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"+5": 1}}, "logit_bias"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"5" * 5000: 1}}, "logit_bias"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"4294967296": 1}},
     "logit_bias"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": None}}, "logit_bias"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": True}}, "logit_bias"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": [5]}, "logit_bias"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "repetition_penalty": 0}, "repetition_penalty"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "repetition_penalty": 1e39},
     "repetition_penalty"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools[0].type"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}, "functions"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": True}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "xml"}}, "response_format.type"),
    ({"model": "m", "messages": ["hello"]}, "messages[0]"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_token": 3}, "max_token"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "false"}, "stream"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": "yes"}, "logprobs"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
     "stream_options"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2**32}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 2**64}, "seed"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_k": 2**32}, "top_k"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": -1},
     "top_logprobs"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, "top_p"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "modalities": ["text", "audio"]},
     "modalities"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "audio": {"voice": "alloy"}}, "audio"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "low"},
     "reasoning_effort"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "prediction": {"type": "content"}},
     "prediction"),
])
def test_unsupported_or_malformed_chat_fields_name_the_field(body, field):
    with pytest.raises(InvalidArgument) as caught:
        schema.chat_call(body)
    assert caught.value.metadata["field"] == field and f"'{field}'" in caught.value.message


@pytest.mark.parametrize(("body", "field"), [
    ({"model": "m", "prompt": ["a", "b"]}, "prompt"), ({"model": "m", "prompt": ""}, "prompt"),
    ({"model": "m", "prompt": "x", "echo": True}, "echo"), ({"model": "m", "prompt": "x", "suffix": "y"}, "suffix"),
    ({"model": "m", "prompt": "x", "logprobs": -1}, "logprobs"),
    ({"model": "m", "prompt": "x", "max_completion_tokens": 5}, "max_completion_tokens"),
    ({"model": "m", "prompt": "x", "response_format": {"type": "json_object"}}, "response_format")])  # chat only
def test_unsupported_completion_bodies(body, field):
    with pytest.raises(InvalidArgument) as caught:
        schema.completion_call(body)
    assert caught.value.metadata["field"] == field


def test_responses_are_openai_shaped():
    entry = gen.TokenLogprob(token_id=5, token="ab", logprob=-0.5, top=[gen.TopLogprob(token="ab", logprob=-0.5)])
    done = Completion("rid", Target("fin", "tiny", "t"), "ab", [5], [entry], gen.FINISH_REASON_STOP, "",
                      gen.Usage(prompt_tokens=3, completion_tokens=1, total_tokens=4))
    chat = schema.chat_completion([done], "resp", 123, schema.Options(logprobs=True))
    assert chat["id"] == "chatcmpl-resp" and chat["object"] == "chat.completion" and chat["model"] == "fin"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "ab"}
    assert chat["choices"][0]["finish_reason"] == "stop"
    assert chat["choices"][0]["logprobs"]["content"][0]["bytes"] == [97, 98]
    assert chat["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4,
                             "prompt_tokens_details": {"cached_tokens": 0},
                             "completion_tokens_details": {"reasoning_tokens": 0}}
    text = schema.text_completion([done], "resp", 123, schema.Options())
    assert text["id"] == "cmpl-resp"  # the response's own id, not the (client-chosen) request id
    assert text["choices"][0]["text"] == "ab" and text["choices"][0]["logprobs"] is None
    offsets = schema.TextOffsets()
    assert schema.completion_logprobs([entry], offsets)["text_offset"] == [0]
    logprobs = schema.completion_logprobs([entry, entry], offsets)  # a later streamed chunk continues the count
    assert logprobs["text_offset"] == [2, 4] and logprobs["top_logprobs"][0] == {"ab": -0.5}


def test_text_offsets_index_characters_where_tokens_split_them():
    """"é" (c3 a9) and "日" (e6 97 a5) split over tokens: each decodes alone to U+FFFD, but the
    text holds one character for them, so the tokens after them must not drift."""
    pieces = [b"a", b"\xc3", b"\xa9", b"b\xe6", b"\x97", b"\xa5c", b"\xff", b"d"]
    text = b"".join(pieces).decode("utf-8", errors="replace")
    assert text == "aéb日c\ufffdd"
    entries = [gen.TokenLogprob(token=p.decode("utf-8", errors="replace"), token_bytes=p) for p in pieces]
    offsets = schema.completion_logprobs(entries)["text_offset"]
    assert offsets == [0, 1, 1, 2, 3, 3, 5, 6]
    assert [text[o] for o in offsets] == ["a", "é", "é", "b", "日", "日", "\ufffd", "d"]


def test_a_special_token_the_text_leaves_out_takes_its_place_but_no_room():
    """The node skips special tokens when it decodes (an EOS under ignore_eos): one gets the
    offset where it would be, the tokens after it index the text as if it were not there, and
    it does not cut off a character whose bytes lie on either side of it."""
    eos = gen.TokenLogprob(token="<|eos|>", token_bytes=b"<|eos|>", special=True)
    pieces = [b"ab", eos, b"c", b"\xe6", eos, b"\x97\xa5", b"d", eos]
    entries = [p if isinstance(p, gen.TokenLogprob) else gen.TokenLogprob(
        token=p.decode("utf-8", errors="replace"), token_bytes=p) for p in pieces]
    text = b"".join(p for p in pieces if isinstance(p, bytes)).decode("utf-8", errors="replace")
    assert text == "abc日d"
    offsets = schema.TextOffsets()
    assert offsets(entries[:4]) == [0, 2, 2, 3]
    assert offsets(entries[4:]) == [3, 3, 4, 5]  # a later streamed chunk: the held-back byte still joins


@pytest.mark.parametrize(("pieces", "expected"), [
    ([b"\xe6", b"nt"], [0, 1]),  # an unfinished character cut off by plain text: its U+FFFD comes first
    ([b"\xe6\x97", b"\xe6", b" x"], [0, 1, 2]),  # cut off by a new lead byte, which is cut off in turn
    ([b"\xef\xbf", b"\xbd!"], [0, 0]),  # a real U+FFFD (ef bf bd) split over two tokens
    ([b"\xe0", b"\x80"], [0, 1]),  # e0 80 is no character: two replacements
    ([b"\xed", b"\xbe", b" x"], [0, 1, 2]),  # nor is ed be, which Python's decoder holds until the space
])
def test_text_offsets_where_an_unfinished_character_is_never_finished(pieces, expected):
    text = b"".join(pieces).decode("utf-8", errors="replace")
    entries = [gen.TokenLogprob(token=p.decode("utf-8", errors="replace"), token_bytes=p) for p in pieces]
    offsets = schema.completion_logprobs(entries)["text_offset"]
    assert offsets == expected and offsets[-1] < len(text)


@pytest.mark.parametrize(("stop", "wording"), [
    ("", "non-empty"), (["END", ""], "non-empty"),
    ([f"s{i}" for i in range(schema.MAX_STOP + 1)], f"maximum length {schema.MAX_STOP}, but got an array with "
                                                    f"length {schema.MAX_STOP + 1}")])
def test_stop_sequences_the_node_would_refuse_are_a_400_here(stop, wording):
    for parse, body in ((schema.chat_call, {"model": "m", "messages": [{"role": "user", "content": "x"}]}),
                        (schema.completion_call, {"model": "m", "prompt": "x"})):
        with pytest.raises(InvalidArgument) as caught:
            parse({**body, "stop": stop})
        assert caught.value.metadata["field"] == "stop" and wording in caught.value.message
    call, _ = schema.completion_call({"model": "m", "prompt": "x", "stop": [f"s{i}" for i in range(schema.MAX_STOP)]})
    assert len(call.sampling.stop) == schema.MAX_STOP


def test_user_is_accepted_but_must_be_a_string():
    assert schema.chat_call({"model": "m", "messages": [{"role": "user", "content": "x"}], "user": "u-1"})
    with pytest.raises(InvalidArgument) as caught:
        schema.completion_call({"model": "m", "prompt": "x", "user": 42})
    assert caught.value.metadata["field"] == "user"


@pytest.mark.parametrize(("seed", "node_seed"), [(-1, 2**64 - 1), (-(2**63), 2**63), (0, 0), (2**64 - 1, 2**64 - 1)])
def test_openai_int64_seeds_map_onto_the_nodes_uint64_seed(seed, node_seed):
    call, _ = schema.chat_call({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": seed})
    assert call.sampling.seed == node_seed
