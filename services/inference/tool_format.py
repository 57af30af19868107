"""Which format a model writes its tool calls in, read from its chat template (no grpc here).

With tool_choice "auto" the model generates freely and the Router reads calls out of its text
(services/router/tool_parsers.py), in the format its family was trained on. Each family's
chat template shows that format to the model, so the template tells it, as vLLM's
--tool-call-parser is chosen per model by hand:
- "mistral": the template writes `[TOOL_CALLS]` (Mistral 7B v0.3, Mixtral, Mistral Nemo/Small; from
  tokenizer v11 on also `[ARGS]` and `[CALL_ID]`, special tokens too);
- "hermes": `<tool_call>` (Qwen 2/2.5/3, Hermes 2 Pro/3 and the many fine-tunes that copied them);
- "llama3_json": Llama 3.1/3.2's `<|python_tag|>` or its "ipython" role (calls as JSON objects
  with "parameters").
Checked in that order; a template naming none of them has no known format (""), and neither
does one overridden with --tool-call-format none.

A marker that is a special token of the tokenizer would be skipped by the node's decoding
(`skip_special_tokens`, as Mistral's `[TOOL_CALLS]` is): `kept_marker_ids` lists those, for the
node to keep them in the text of requests that show tools.
"""

from __future__ import annotations

FORMATS = ("hermes", "llama3_json", "mistral")
#: --tool-call-format: detect it from the chat template, no format, or one of FORMATS.
CHOICES = ("auto", "none", *FORMATS)
#: What a format's calls are marked with (the texts the node keeps, should they be special tokens).
MARKERS = {"hermes": ("<tool_call>", "</tool_call>"), "mistral": ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
           "llama3_json": ("<|python_tag|>",)}
#: (format, what in a template's source gives it away), in the order they are tried.
CLUES = (("mistral", ("[TOOL_CALLS]",)), ("hermes", ("<tool_call>",)), ("llama3_json", ("<|python_tag|>", "ipython")))


def detect(template) -> str:
    """The format a chat template shows its model (str, or a dict of named templates), "" for none."""
    if isinstance(template, dict):
        template = "\n".join(str(source) for source in template.values())
    source = template or ""
    return next((name for name, clues in CLUES if any(clue in source for clue in clues)), "")


def resolve(choice: str, tokenizer) -> str:
    """The format of --tool-call-format `choice` for this tokenizer's model."""
    if choice == "auto":
        return detect(getattr(tokenizer, "chat_template", None))
    return "" if choice == "none" else choice


def kept_marker_ids(tokenizer, fmt: str, special: frozenset[int]) -> tuple[int, ...]:
    """The format's markers that are single special tokens (`special`: the ids decoding skips)."""
    vocab = tokenizer.get_vocab()
    return tuple(sorted({vocab[marker] for marker in MARKERS.get(fmt, ()) if vocab.get(marker) in special}))
