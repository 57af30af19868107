"""Token bytes for OpenAI logprobs: a character split over tokens comes back whole from their bytes."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from services.common.tiny_model import build_tokenizer
from services.inference.token_bytes import BYTE_OF_STAND_IN, TokenBytes

TEXT = "你好 é, plain words"


def test_byte_level_tokens_give_back_the_exact_bytes_where_decoding_one_token_cannot():
    tokenizer = build_tokenizer()
    ids = tokenizer.encode(TEXT)
    token_bytes = TokenBytes(tokenizer)
    assert "\ufffd" in "".join(tokenizer.decode([i]) for i in ids)  # what single-token decoding gives
    assert b"".join(token_bytes(i) for i in ids) == TEXT.encode()
    assert sorted(BYTE_OF_STAND_IN.values()) == list(range(256))


def _sentencepiece_with_byte_fallback() -> PreTrainedTokenizerFast:
    pieces = ["<unk>", *(f"<0x{b:02X}>" for b in range(256)), "▁hi", "▁"]
    model = models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>", byte_fallback=True)
    backend = Tokenizer(model)
    # Llama 2's decoder chain: the Strip drops the space a lone "▁hi" stands for
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_sentencepiece_byte_pieces_are_their_byte_and_words_their_text():
    tokenizer = _sentencepiece_with_byte_fallback()
    token_bytes = TokenBytes(tokenizer)
    ids = [tokenizer.convert_tokens_to_ids(p) for p in ("▁hi", "▁", "<0xE4>", "<0xBD>", "<0xA0>")]
    assert b"".join(token_bytes(i) for i in ids) == " hi 你".encode()
    assert token_bytes(ids[2]) == b"\xe4"
