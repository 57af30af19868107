"""Per-request sampling parameters and their validation against the model's context."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

from services.common.errors import InvalidArgument

DEFAULT_MAX_TOKENS = 256
#: max_tokens for "until the context is full": a soft limit `validate` caps to the room left.
UNTIL_CONTEXT_FULL = 2**31 - 1
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
# Temperatures below this divide logits into overflow; they mean "greedy" in practice (as in vLLM).
GREEDY_TEMPERATURE_EPS = 1e-5
#: OpenAI's range for presence_penalty and frequency_penalty.
MAX_ABS_PENALTY = 2.0
#: OpenAI's range for a logit_bias value: +-100 all but forces or bans a token.
MAX_ABS_LOGIT_BIAS = 100.0
#: At most this many logit_bias entries (OpenAI-like): each is applied to every step's logits.
MAX_LOGIT_BIAS_ENTRIES = 300
#: The largest JSON schema a request may constrain its output to. Compiling one holds a worker
#: thread and memory in proportion to its size (llguidance bounds the per-token work, not the
#: compile); schemas of real response models are a few KiB, so 64 KiB leaves ample room.
MAX_JSON_SCHEMA_BYTES = 64 * 1024
#: The schema of OpenAI's {"type": "json_object"}: any JSON object.
ANY_JSON_OBJECT = '{"type":"object"}'


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

    presence_penalty, frequency_penalty, repetition_penalty and logit_bias change the logits
    before sampling; their exact semantics and order are in the Sampler's docstring. logit_bias
    is a tuple of (token id, bias) pairs, sorted by id, so the params stay hashable.

    json_schema (JSON text; None = free text) constrains the output to JSON matching it
    (engine/structured.py); the node compiles it, so here it is only bounded in size.

    kept_special_ids: special tokens that stay in the text (decoding skips the others): a tool-call
    format's markers, for a request showing tools (services/inference/tool_format.py). The node
    sets it, not the request.
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 = off
    logit_bias: tuple[tuple[int, float], ...] = ()
    json_schema: str | None = None
    kept_special_ids: tuple[int, ...] = ()

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
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        repetition_penalty: float | None = None,
        logit_bias: Mapping[int, float] | None = None,
        json_schema: str | None = None,
    ) -> SamplingParams:
        """Build from request fields where None means "not set": defaults apply.
        until_context_full turns an unset max_tokens into "as many as the context leaves"."""
        if logit_bias and len(logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            # Refused before copying: a 64 MB request holds millions of entries, and sorting
            # them here would hold the caller's thread (the node's event loop) for seconds.
            raise _too_many_logit_biases(len(logit_bias))
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
            presence_penalty=defaults.presence_penalty if presence_penalty is None else float(presence_penalty),
            frequency_penalty=defaults.frequency_penalty if frequency_penalty is None else float(frequency_penalty),
            repetition_penalty=defaults.repetition_penalty if repetition_penalty is None else float(repetition_penalty),
            logit_bias=tuple(sorted((int(t), float(b)) for t, b in (logit_bias or {}).items())),
            json_schema=json_schema,
        )

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    @property
    def has_penalties(self) -> bool:
        """Needs the request's token history: counts or the set of tokens seen."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def processes_logits(self) -> bool:
        """Changes the logits before sampling (rows without it skip that work entirely)."""
        return self.has_penalties or bool(self.logit_bias)

    def validate(self, prompt_len: int, max_context: int, vocab_size: int | None = None) -> SamplingParams:
        """Check every field; return a copy whose max_tokens fits the context.

        Raises InvalidArgument (metadata `field` names the culprit) for a bad parameter, an
        empty prompt, a prompt that leaves no room to generate, or an explicit max_tokens
        that does not fit after the prompt. vocab_size, where known, bounds logit_bias's ids.
        """
        self._validate_logit_processing(vocab_size)
        schema_bytes = len(self.json_schema.encode()) if self.json_schema is not None else 0
        if schema_bytes > MAX_JSON_SCHEMA_BYTES:
            raise InvalidArgument(f"structured_output must be a JSON schema of at most {MAX_JSON_SCHEMA_BYTES // 1024} "
                                  f"KiB, got {schema_bytes} bytes", field="structured_output")
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

    def _validate_logit_processing(self, vocab_size: int | None) -> None:
        for field in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, field)
            if not -MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY:  # NaN fails this comparison too
                raise InvalidArgument(f"{field} must be in [-{MAX_ABS_PENALTY:g}, {MAX_ABS_PENALTY:g}], got {value}",
                                      field=field)
        if not 0.0 < self.repetition_penalty < math.inf:
            raise InvalidArgument(f"repetition_penalty must be a finite number > 0 (1 = off), got "
                                  f"{self.repetition_penalty}", field="repetition_penalty")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise _too_many_logit_biases(len(self.logit_bias))
        for token_id, bias in self.logit_bias:
            if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
                where = f"[0, {vocab_size})" if vocab_size is not None else "the ids >= 0"
                raise InvalidArgument(f"logit_bias token id {token_id} is not in the vocabulary {where}",
                                      field="logit_bias", token_id=token_id)
            if not -MAX_ABS_LOGIT_BIAS <= bias <= MAX_ABS_LOGIT_BIAS:
                raise InvalidArgument(f"logit_bias for token {token_id} must be in [-{MAX_ABS_LOGIT_BIAS:g}, "
                                      f"{MAX_ABS_LOGIT_BIAS:g}], got {bias}", field="logit_bias", token_id=token_id)


def _too_many_logit_biases(count: int) -> InvalidArgument:
    return InvalidArgument(f"logit_bias has at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {count}",
                           field="logit_bias")
