"""The raw bytes of one token, for the `bytes` of OpenAI's logprobs.

Decoding one token id alone gives U+FFFD when the token holds part of a multi-byte character
(byte-level BPE splits most non-Latin text that way), so the decoded text's UTF-8 loses the
bytes a client needs to put such characters back together. They come from the vocabulary:
- byte-level BPE (GPT-2, Llama 3, Qwen, our tiny model): each character of the piece stands
  for one byte, through GPT-2's printable stand-ins for the 256 byte values;
- SentencePiece (Llama 2, Mistral): a byte-fallback piece "<0xE3>" is that one byte, and "▁"
  in other pieces is the space it stands for (decoding a lone piece strips that space);
- anything else (whole words, special tokens): the decoded text's UTF-8.
"""

from __future__ import annotations

import json
import re

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_of_stand_in() -> dict[str, int]:
    """GPT-2's table: printable Latin-1 bytes stand for themselves, the other 68 byte values
    for the characters from U+0100 upwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    stand_in = {byte: chr(byte) for byte in printable}
    for byte in range(256):
        if byte not in stand_in:
            stand_in[byte] = chr(256 + len(stand_in) - len(printable))
    return {char: byte for byte, char in stand_in.items()}


BYTE_OF_STAND_IN = _byte_of_stand_in()


def _decoder_types(tokenizer) -> set[str]:
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return set()
    types, pending = set(), [json.loads(decoder.__getstate__())]
    while pending:
        config = pending.pop()
        types.add(config.get("type"))
        pending.extend(config.get("decoders", []))
    return types


class TokenBytes:
    """token id -> its bytes, computed once per id (a vocabulary is at most a few MB of them)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        types = _decoder_types(tokenizer)
        self._byte_level = "ByteLevel" in types
        self._sentencepiece = bool({"Metaspace", "Replace", "ByteFallback"} & types)
        self._known: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        known = self._known.get(token_id)
        if known is None:
            known = self._known[token_id] = self._compute(token_id)
        return known

    def _compute(self, token_id: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if self._byte_level and all(char in BYTE_OF_STAND_IN for char in piece):
                return bytes(BYTE_OF_STAND_IN[char] for char in piece)
            if self._sentencepiece:
                match = BYTE_PIECE.fullmatch(piece)
                return bytes([int(match.group(1), 16)]) if match else piece.replace("▁", " ").encode()
        return self._tokenizer.decode([token_id]).encode()


def longest_token_bytes(tokenizer) -> int:
    """An upper bound on the bytes of text one token covers: the UTF-8 length of its longest
    vocabulary piece. Each stand-in character (byte-level), "▁" (SentencePiece) or "<0xNN>"
    piece is at least as long in UTF-8 as the bytes it stands for."""
    return max(len(piece.encode()) for piece in tokenizer.get_vocab())


def special_token_ids(tokenizer) -> frozenset[int]:
    """The ids the node's text leaves out: it decodes with skip_special_tokens, which skips the
    tokenizer's special tokens and, in a fast tokenizer, every added token marked special (a
    chat marker may be one without being listed among the special tokens)."""
    ids = set(getattr(tokenizer, "all_special_ids", ()))
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(token_id)
    return frozenset(ids)
