"""Whether a model thinks in `<think>` blocks before answering, and where its answer starts.

Qwen3, QwQ and the DeepSeek-R1 family think first, between `<think>` and `</think>`; the Router
gives that text back as `reasoning_content`, apart from the answer (services/router/
reasoning_text.py). Their chat templates say so: they write both tags (to strip old thinking
from the history, or to open the block in the prompt). What the Router must know per request is
where generation starts (GenerationDelta.reasoning_start):
- "open": the rendered prompt ends inside a block (DeepSeek-R1's templates end it with
  `<think>\n`): the model's first words are thinking;
- "closed": the model opens its own block, if it thinks at all (Qwen3; or a template that
  already closed an empty block, Qwen3 with thinking turned off);
- "": the model does not reason this way (or --reasoning-format none).
No grpc here.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
#: --reasoning-format: detect it from the chat template, never, or always `<think>` blocks.
CHOICES = ("auto", "none", "think")
#: Prompt tokens decoded to find an open block at the end of a prompt: the R1 generation prompt
#: is `<｜Assistant｜><think>\n`, a handful of tokens.
TAIL_TOKENS = 8


def detect(template) -> str:
    """"think" when a chat template (str, or a dict of named templates) writes both tags."""
    if isinstance(template, dict):
        template = "\n".join(str(source) for source in template.values())
    source = template or ""
    return "think" if OPEN in source and CLOSE in source else ""


def resolve(choice: str, tokenizer) -> str:
    if choice == "auto":
        return detect(getattr(tokenizer, "chat_template", None))
    return "" if choice == "none" else choice


def reasoning_start(tokenizer, prompt_ids: list[int]) -> str:
    """"open" when the prompt ends by opening a `<think>` block (only whitespace after it: a
    user's message ending in the tag is followed by the template's turn markers), else "closed"."""
    tail = tokenizer.decode(prompt_ids[-TAIL_TOKENS:], skip_special_tokens=False)
    return "open" if tail.rstrip().endswith(OPEN) else "closed"


def kept_tag_ids(tokenizer, special: frozenset[int]) -> tuple[int, ...]:
    """The tags that are special tokens of this tokenizer (decoding would skip them and hide
    where the thinking ends)."""
    vocab = tokenizer.get_vocab()
    return tuple(sorted({vocab[tag] for tag in (OPEN, CLOSE) if vocab.get(tag) in special}))
