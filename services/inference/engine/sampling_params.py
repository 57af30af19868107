"""Per-request sampling parameters and their validation against the model's context."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

from services.common.errors import InvalidArgument

DEFAULT_MAX_TOKENS = 256
#: max_tokens for "until the context is full": a soft limit `validate` caps to the room left.
UNTIL_CONTEXT_FULL = 2**31 - 1
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
# Temperatures below this divide logits into overflow; they mean "greedy" in practice (as in vLLM).
GREEDY_TEMPERATURE_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    max_tokens has two meanings, told apart by `max_tokens_explicit`:
    - set by the caller (explicit): a promise we must keep, so `validate` rejects a value the
      context cannot hold ("max_tokens beyond the context") instead of silently truncating;
    - left unset (the default 256, or UNTIL_CONTEXT_FULL when asked): a soft limit, so
      `validate` caps it to the room left.
    Direct construction treats max_tokens as a soft limit; `from_request` marks it explicit when
    the request carried one.

    top_logprobs > 0 implies logprobs of the chosen token too.
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    max_tokens_explicit: bool = False

    @classmethod
    def from_request(
        cls,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Iterable[str] | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        ignore_eos: bool | None = None,
        until_context_full: bool = False,
    ) -> SamplingParams:
        """Build from request fields where None means "not set": defaults apply.
        until_context_full turns an unset max_tokens into "as many as the context leaves"."""
        defaults = cls()
        default_max_tokens = UNTIL_CONTEXT_FULL if until_context_full else defaults.max_tokens
        return cls(
            max_tokens=default_max_tokens if max_tokens is None else int(max_tokens),
            temperature=defaults.temperature if temperature is None else float(temperature),
            top_p=defaults.top_p if top_p is None else float(top_p),
            top_k=defaults.top_k if top_k is None else int(top_k),
            seed=seed,
            stop=tuple(stop or ()),
            logprobs=bool(logprobs),
            top_logprobs=int(top_logprobs or 0),
            ignore_eos=bool(ignore_eos),
            max_tokens_explicit=max_tokens is not None,
        )

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    def validate(self, prompt_len: int, max_context: int) -> SamplingParams:
        """Check every field; return a copy whose max_tokens fits the context.

        Raises InvalidArgument (metadata `field` names the culprit) for a bad parameter, an
        empty prompt, a prompt that leaves no room to generate, or an explicit max_tokens
        that does not fit after the prompt.
        """
        if math.isnan(self.temperature) or math.isinf(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"temperature must be a finite number >= 0, got {self.temperature}",
                                  field="temperature")
        if not 0.0 < self.top_p <= 1.0:  # NaN fails this comparison too
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}", field="top_p")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 = off), got {self.top_k}", field="top_k")
        if self.max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be >= 1, got {self.max_tokens}", field="max_tokens")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}",
                                  field="stop")
        if any(not s for s in self.stop):
            raise InvalidArgument("stop strings must not be empty", field="stop")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}",
                                  field="top_logprobs")
        if prompt_len < 1:
            raise InvalidArgument("prompt is empty", field="prompt")
        if prompt_len >= max_context:
            raise InvalidArgument(f"prompt of {prompt_len} tokens does not fit the context of {max_context}",
                                  field="prompt", prompt_tokens=prompt_len, max_context=max_context)
        room = max_context - prompt_len
        if self.max_tokens > room and self.max_tokens_explicit:
            raise InvalidArgument(
                f"max_tokens beyond the context: {self.max_tokens} requested, but a prompt of "
                f"{prompt_len} tokens leaves room for {room} in the context of {max_context}",
                field="max_tokens", max_tokens=self.max_tokens, room=room)
        return dataclasses.replace(self, max_tokens=min(self.max_tokens, room))
