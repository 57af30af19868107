"""Which tokens of a rendered conversation a chat example learns from (examples.py).

The rule: for each assistant turn, what the model must generate after the prompt the inference
node sends for that turn (services/inference/node.py renders the conversation before it with
the generation prompt): the turn's text and the end-of-turn token that stops generation, no
prompt token and no template text after that token.

- Templates that mark assistant turns with `{% generation %}` get transformers' mask
  (`return_assistant_tokens_mask=True`).
- Most real templates have no markers. Each assistant turn is then located in the rendered
  text, from the end of its generation prompt (when the rendered conversation starts with it)
  to the end of its content and the end-of-turn token right after it (`<|im_end|>`,
  `<|eot_id|>`, `</s>`, after blanks only), and mapped to tokens by their character offsets.
- Rendering the conversation up to and including each turn, an older fallback, is only the
  last resort (a tokenizer without offsets, a template that rewrites contents): templates that
  render the final turn differently (Qwen3's empty think block) shift it onto other tokens.

An assistant message with `"weight": 0` (OpenAI's fine-tuning format) stays in the context and
is not learned: its tokens are located the same way and taken out of the mask.
"""

from __future__ import annotations

import os
import re

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and bool(_GENERATION_TAG.search(template))


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=False)
    return list(ids)


def _prompt_text(tokenizer, messages: list[dict]) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - some templates refuse a conversation that ends early (or is empty)
        return None


def _mask_by_prefix(tokenizer, messages: list[dict], length: int) -> list[int]:
    mask = [0] * length
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            start = len(render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        except Exception:  # noqa: BLE001 - some templates refuse a conversation that starts mid-way
            start = 0
        end = len(render(tokenizer, messages[:i + 1], add_generation_prompt=False))
        for position in range(start, min(end, length)):
            mask[position] = 1
    return mask


def _turn_spans(tokenizer, messages: list[dict], text: str) -> dict[int, tuple[int, int]] | None:
    """Message index -> [start, end) characters of each assistant turn in `text`; None if one
    is not there verbatim."""
    spans, cursor = {}, 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _prompt_text(tokenizer, messages[:i])
        # Templates may trim the content (Llama 3's `| trim`): look for what they keep.
        needle = message["content"].strip()
        aligned = prompt is not None and len(prompt) >= cursor and text.startswith(prompt)
        # Where the prompt and the conversation part ways is before this turn: searching from
        # there, a reply quoted in an earlier message is not taken for the reply.
        shared = len(os.path.commonprefix([prompt, text])) if prompt is not None else 0
        found = text.find(needle, len(prompt) if aligned else max(cursor, shared))
        if found < 0:
            return None
        # What the template puts between the generation prompt and the content (an empty
        # think block) is what the model must generate after that prompt, so it counts too.
        spans[i] = (len(prompt) if aligned else found, found + len(needle))
        cursor = found + len(needle)
    return spans


def _tokens_of(span: tuple[int, int], ids: list[int], offsets: list[tuple[int, int]], special: set[int],
               text: str) -> list[int]:
    """Token positions overlapping `span`, then the end-of-turn token (and the blank before it)."""
    start, end = span
    positions = [p for p, (low, high) in enumerate(offsets) if low < end and high > start]
    after = next((p for p, (low, _) in enumerate(offsets) if low >= end), len(ids))
    for position in range(after, len(ids)):
        if ids[position] in special:
            return positions + list(range(after, position + 1))
        low, high = offsets[position]
        if text[low:high].strip():
            break
    return positions


def _turn_tokens(tokenizer, messages: list[dict], ids: list[int]) -> dict[int, list[int]] | None:
    """Message index -> token positions of each assistant turn; None when they cannot be located."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # a tokenizer without offsets
        return None
    if list(encoded["input_ids"]) != ids:
        return None
    spans = _turn_spans(tokenizer, messages, text)
    if spans is None:
        return None
    offsets = [tuple(span) for span in encoded["offset_mapping"]]
    special = set(tokenizer.all_special_ids)
    return {i: _tokens_of(span, ids, offsets, special, text) for i, span in spans.items()}


def _unmark_run(mask: list[int], position: int) -> None:
    """Clears the run of marked tokens around `position` (a turn's whole `{% generation %}` block)."""
    low = high = position
    while low > 0 and mask[low - 1]:
        low -= 1
    while high < len(mask) and mask[high]:
        high += 1
    mask[low:high] = [0] * (high - low)


def assistant_mask(tokenizer, messages: list[dict], skipped: set[int]) -> tuple[list[int], list[int]] | None:
    """(ids, mask: 1 where the loss is taken) for role/content `messages`; the assistant turns
    at the indices in `skipped` are not learned. None when a skipped turn cannot be located."""
    if has_generation_markers(tokenizer):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        turns = _turn_tokens(tokenizer, messages, ids) if skipped else {}
        if turns is None:
            return None
        for i in skipped:
            for position in turns[i]:
                if mask[position]:
                    _unmark_run(mask, position)
        return ids, mask
    ids = render(tokenizer, messages, add_generation_prompt=False)
    turns = _turn_tokens(tokenizer, messages, ids)
    if turns is None:
        return None if skipped else (ids, _mask_by_prefix(tokenizer, messages, len(ids)))
    mask = [0] * len(ids)
    for i, positions in turns.items():
        for position in positions:
            mask[position] = int(i not in skipped)
    return ids, mask
