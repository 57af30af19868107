"""Streaming text out of token ids: whole UTF-8 characters only, and stop strings."""

from __future__ import annotations

import functools
from typing import Any

REPLACEMENT_CHAR = "\ufffd"  # what decoding yields for an incomplete UTF-8 tail


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, O(window) per token.

    vLLM's prefix/read offsets: tokens[prefix_offset:read_offset] were already emitted;
    decoding tokens[prefix_offset:] and dropping the text of the emitted part gives the new
    text. Decoding a short window rather than everything keeps the cost per token constant,
    and starting it on emitted tokens keeps context-dependent pieces (a SentencePiece leading
    space) right. Byte-level BPE can split one character ("é", an emoji) across tokens; a
    window whose text ends in U+FFFD is an incomplete character, held back until the next
    token completes it. The concatenated output (with flush()) equals
    tokenizer.decode(generated ids, skip_special_tokens=...).

    prompt_token_ids is accepted for API symmetry with vLLM but not decoded: the first
    generated token's text is the same as tokenizer.decode gives it on its own.

    kept: special tokens (id -> text) that stay in the text although special tokens are skipped
    (a tool-call format's markers, as vLLM keeps them for its tool parsers): the ids between
    them are decoded as runs of their own, each kept token written as its text.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 kept: dict[int, str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.kept = kept or {}
        self._raw_decode = _raw_decoder(tokenizer)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []  # generated only
        self.prefix_offset = 0  # window start: tokens emitted in the previous delta
        self.read_offset = 0  # tokens before it have been emitted as text

    def _decode(self, token_ids: list[int]) -> str:
        if not self.kept or not self.kept.keys() & set(token_ids):
            return self._decode_run(token_ids)
        parts, start = [], 0
        for index, token_id in enumerate(token_ids):
            if token_id in self.kept:
                parts += [self._decode_run(token_ids[start:index]), self.kept[token_id]]
                start = index + 1
        return "".join(parts) + self._decode_run(token_ids[start:])

    def _decode_run(self, token_ids: list[int]) -> str:
        if self._raw_decode is not None:
            return self._raw_decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_ids: list[int]) -> str:
        """Add generated tokens; return the text they complete (possibly "")."""
        self.token_ids.extend(token_ids)
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing yet, or an incomplete character: wait for more bytes
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """At the end of generation: whatever is held back (a U+FFFD the model did produce)."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return new_text[len(prefix_text):]


# Text that transformers' clean_up_tokenization would change (spaces before punctuation and
# English contractions): if both decodes agree on it, neither cleans up for this tokenizer.
_CLEAN_UP_PROBE = "a . b , c ! d ? e n't f 'm g 's h 've i 're j"


def _raw_decoder(tokenizer: Any):
    """tokenizer.backend_tokenizer.decode where it is exact, else None (see _raw_decoder_for)."""
    forced = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    return _raw_decoder_for(tokenizer, getattr(tokenizer, "clean_up_tokenization_spaces", False), forced)


@functools.lru_cache(maxsize=8)  # per tokenizer and clean-up settings: a request must not pay the probe
def _raw_decoder_for(tokenizer: Any, clean_up: bool, forced_clean_up: bool):
    """The Rust tokenizer's decode when it gives exactly what tokenizer.decode gives, else None.

    Twice per token per sequence, the Python wrapper around it (argument conversion, kwargs,
    the clean-up check) cost twice the decode itself: ~0.3 ms per step at batch 64. Taken for
    transformers fast tokenizers whose decode and _decode are the stock ones, unless they clean
    up spaces: with clean_up_tokenization_spaces set, whether transformers actually cleans up
    depends on its version and the tokenizer model (5.24 skips it for BPE, as Llama 3's is), so
    a probe decides, once per tokenizer."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    if not (isinstance(tokenizer, TokenizersBackend) and type(tokenizer)._decode is TokenizersBackend._decode
            and type(tokenizer).decode is PreTrainedTokenizerBase.decode):
        return None
    raw = tokenizer.backend_tokenizer.decode
    if clean_up:
        probe = tokenizer.backend_tokenizer.encode(_CLEAN_UP_PROBE, add_special_tokens=False).ids
        if raw(probe, skip_special_tokens=True) != tokenizer.decode(probe, skip_special_tokens=True):
            return None
    return raw


class StopStringMatcher:
    """Cuts a text stream before the first stop string.

    feed() holds back the longest tail that could still grow into a stop string, so a stop
    split across deltas ("<|us" + "er|>") is caught and never partly emitted.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(stops)
        self._held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, str | None]:
        """Return (text safe to emit now, the stop string matched or None). After a match the
        stream is over: the stop string and anything after it are dropped."""
        if self.matched is not None:
            return "", None
        buffer = self._held + text
        hits = [(buffer.find(s), -len(s), s) for s in self.stops if s in buffer]
        if hits:
            index, _, stop = min(hits)  # earliest; the longest of those starting there
            self._held, self.matched = "", stop
            return buffer[:index], stop
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(buffer)), 0, -1)
                    if buffer.endswith(s[:k])), default=0)
        self._held = buffer[len(buffer) - keep:]
        return buffer[:len(buffer) - keep], None

    def flush(self) -> str:
        """At the end of the stream: the held-back tail, which turned out not to be a stop."""
        held, self._held = self._held, ""
        return held
