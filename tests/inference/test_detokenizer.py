"""Incremental detokenization (whole UTF-8 characters only) and stop-string matching."""

from __future__ import annotations

import pytest

from services.common.tiny_model import build_tokenizer
from services.inference.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher, _raw_decoder

MULTI_BYTE_TEXTS = ["café é", "日本語", "👍🏽 ok", "The stock market rose 3% — très bien! 👍🏽日本語é"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def stream(detokenizer: IncrementalDetokenizer, token_ids: list[int]) -> list[str]:
    chunks = [detokenizer.push([t]) for t in token_ids]
    return chunks + [detokenizer.flush()]


@pytest.mark.parametrize("text", MULTI_BYTE_TEXTS)
def test_one_token_at_a_time_round_trips_and_never_emits_partial_characters(tokenizer, text):
    prompt = tokenizer.encode("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    token_ids = tokenizer.encode(text)
    assert len(token_ids) > len(text.split())  # the tokenizer really splits characters into bytes
    chunks = stream(IncrementalDetokenizer(tokenizer, prompt), token_ids)
    assert "".join(chunks) == text == tokenizer.decode(token_ids, skip_special_tokens=True)
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert "" in chunks  # some pushes completed no character and were held back


def test_several_tokens_per_push(tokenizer):
    text = MULTI_BYTE_TEXTS[-1]
    token_ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    chunks = [detokenizer.push(token_ids[i:i + 3]) for i in range(0, len(token_ids), 3)]
    assert "".join(chunks) + detokenizer.flush() == text


def test_special_tokens_are_skipped_like_decode(tokenizer):
    token_ids = tokenizer.encode("Hi é") + [tokenizer.eos_token_id]
    chunks = stream(IncrementalDetokenizer(tokenizer, []), token_ids)
    assert "".join(chunks) == tokenizer.decode(token_ids, skip_special_tokens=True) == "Hi é"
    kept = stream(IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False), token_ids)
    assert "".join(kept) == "Hi é<|im_end|>"


def test_the_raw_decoder_gives_what_the_tokenizer_gives_and_only_where_it_can(tokenizer):
    """The detokenizer calls the Rust decode directly (the Python wrapper cost twice the
    decode): same text for any window of ids, specials kept or skipped. With clean-up asked
    for, it is taken only where transformers would not clean up (this version skips clean-up
    for BPE tokenizers like ours, unless forced); never for a tokenizer that is not a stock
    transformers fast tokenizer."""
    raw = _raw_decoder(tokenizer)
    assert raw is not None
    ids = tokenizer.encode(MULTI_BYTE_TEXTS[-1] + " <|im_end|> x .") + [tokenizer.eos_token_id]
    for skip in (True, False):
        for start in range(0, len(ids), 3):
            window = ids[start:start + 5]
            assert raw(window, skip_special_tokens=skip) == tokenizer.decode(window, skip_special_tokens=skip)
    forced = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
    saved = tokenizer.clean_up_tokenization_spaces, getattr(tokenizer, forced, False)
    try:
        tokenizer.clean_up_tokenization_spaces = True
        assert _raw_decoder(tokenizer) is not None  # asked for, but not done for BPE
        setattr(tokenizer, forced, True)
        assert _raw_decoder(tokenizer) is None  # really done: "a ." would become "a."
    finally:
        tokenizer.clean_up_tokenization_spaces = saved[0]
        setattr(tokenizer, forced, saved[1])
    assert _raw_decoder(object()) is None


def test_a_lone_invalid_byte_is_emitted_by_flush(tokenizer):
    broken = tokenizer.encode("é")[:1]  # half a character: the model may end like this
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert detokenizer.push(broken) == ""
    assert detokenizer.flush() == tokenizer.decode(broken) == "\ufffd"


def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> tuple[str, str | None]:
    out = []
    for piece in pieces:
        text, stop = matcher.feed(piece)
        out.append(text)
        if stop is not None:
            return "".join(out), stop
    return "".join(out) + matcher.flush(), None


def test_stop_string_spanning_several_pushes():
    matcher = StopStringMatcher(("<|user|>",))
    emitted = []
    for piece in ["Hello <", "|us", "er", "|> more"]:
        text, stop = matcher.feed(piece)
        emitted.append(text)
    assert emitted == ["Hello ", "", "", ""] and stop == "<|user|>"
    assert matcher.feed("later")[0] == "" and matcher.flush() == ""


def test_stop_string_at_the_very_start():
    assert feed_all(StopStringMatcher(("END",)), ["EN", "D and more"]) == ("", "END")


def test_held_back_prefix_that_is_not_a_stop_is_released():
    matcher = StopStringMatcher(("STOP",))
    assert matcher.feed("go ST") == ("go ", None)
    assert matcher.feed("OP") == ("", "STOP")
    assert feed_all(StopStringMatcher(("STOP",)), ["go ST", "AY here"]) == ("go STAY here", None)
    assert feed_all(StopStringMatcher(("STOP",)), ["the end ST"]) == ("the end ST", None)  # flush


def test_earliest_stop_wins_and_text_after_is_dropped():
    assert feed_all(StopStringMatcher(("world", "lo w")), ["hello world"]) == ("hel", "lo w")
    assert feed_all(StopStringMatcher(("ab", "abc")), ["xabcd"]) == ("x", "abc")


def test_no_stops_passes_everything_through():
    matcher = StopStringMatcher(())
    assert matcher.feed("anything <|user|>") == ("anything <|user|>", None)
    assert matcher.flush() == ""


def test_detokenizer_and_stop_matcher_together(tokenizer):
    text = "The market rose é, then STOP and more"
    detokenizer, matcher = IncrementalDetokenizer(tokenizer, []), StopStringMatcher(("STOP",))
    emitted, matched = [], None
    for token_id in tokenizer.encode(text):
        piece, matched = matcher.feed(detokenizer.push([token_id]))
        emitted.append(piece)
        if matched:
            break
    assert "".join(emitted) == "The market rose é, then " and matched == "STOP"
