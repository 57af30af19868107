"""Per-module LoRA rank and alpha from PEFT's `rank_pattern` / `alpha_pattern`, resolved as peft does.

PEFT gives every targeted module the config's `r` and `lora_alpha` unless a pattern key
matches the module's name (e.g. `model.layers.0.self_attn.q_proj`). A key matches when the
name, read as `(anything ending in ".")? key` up to the end, fits the key as a regular
expression: `q_proj` matches every q_proj, `layers.0.self_attn.q_proj` one module, and
`^.*\\.1\\.mlp\\.down_proj` is a regex. Keys are tried in the dict's order and the first one that
matches wins, so the order of a pattern dict is part of the adapter's meaning and must be kept
wherever the config is stored or passed on.

Keys are customer-supplied regular expressions, so matching runs with the `regex` package under
a time budget (Python's `re` cannot be interrupted): a pattern that backtracks without end is
refused by name instead of hanging the registry or a node. `regex` expands counted repeats when
it compiles (`(?:x{65535}){65535}` exhausts memory), so their bounds are capped before it sees a
key. Each key is also compiled with `re`, the engine peft itself uses, so a key peft could not
load is refused here too. Keys that are plain dotted names, the usual case, are matched without
any regex engine: they are fixed-length patterns (a dot fits any character), so only the name's
last characters can fit them.

Domain code: no grpc. Errors are InvalidArgument naming the field and the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Iterable

import regex

from services.common.errors import InvalidArgument

PATTERN_FIELDS = ("rank_pattern", "alpha_pattern")
#: The largest float32: alpha and scaling travel as float32 on the wire, and a larger alpha
#: would reach inference nodes as an infinite scale.
MAX_ALPHA = 3.4028234663852886e38
#: Seconds compiling one adapter's patterns, and then matching them, may take; real keys take
#: microseconds each.
MATCH_BUDGET_S = 1.0
#: One key per module of a 128-layer model is ~900 keys (what AdaLoRA-style conversions write).
MAX_PATTERN_KEYS = 4096
MAX_KEY_LENGTH = 1024
#: The product of a key's counted-repeat bounds ({m}, {m,n}): what `regex` may expand it to.
MAX_REPEAT_PRODUCT = 1000
_COUNTED_REPEAT = re.compile(r"\{(\d*)(?:,(\d*))?\}")
# Keys made only of these are fixed-length patterns and are matched by `_fits_as_suffix`.
_DOTTED_NAME = re.compile(r"[A-Za-z0-9_.]+")


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scale of B·A: alpha / r, or alpha / sqrt(r) with rank-stabilized LoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _invalid(message: str, field: str, key: str | None = None, reason: str = "BAD_LORA_PATTERN",
             **metadata: object) -> InvalidArgument:
    where = f"{field} key {key!r:.120}" if key is not None else field
    extra = {"key": key} if key is not None else {}
    return InvalidArgument(f"{where}: {message}", reason=reason, field=field, **extra, **metadata)


def _fits_as_suffix(key: str, name: str) -> bool:
    """`(.*\\.)?(key)$` on `name` for a key of [A-Za-z0-9_.]: its regex matches exactly len(key)
    characters, so it must fit the name's tail, with the start of the name or a dot before it."""
    start = len(name) - len(key)
    if start < 0 or (start > 0 and name[start - 1] != "."):
        return False
    return all(want == "." or want == got for want, got in zip(key, name[start:]))


@dataclasses.dataclass(frozen=True)
class PatternKey:
    field: str
    text: str
    value: float  # an int for rank_pattern
    compiled: regex.Pattern | None  # None: a dotted name, matched by _fits_as_suffix

    def matches(self, name: str, deadline: float) -> bool:
        if self.compiled is None:
            return _fits_as_suffix(self.text, name)
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            return self.compiled.match(name, timeout=remaining) is not None
        except TimeoutError:
            raise _invalid(f"matching module names took longer than the {MATCH_BUDGET_S:g} s allowed for all of "
                           "an adapter's patterns (a regex that backtracks catastrophically?); simplify the pattern",
                           self.field, self.text) from None


def _compile(field: str, key: str) -> regex.Pattern | None:
    if len(key) > MAX_KEY_LENGTH:
        raise _invalid(f"is {len(key)} characters long; at most {MAX_KEY_LENGTH} are allowed", field, key)
    if _DOTTED_NAME.fullmatch(key):
        return None
    # Every {m,n} counts, nested or not and even escaped: refusing too much is safe, too little is not.
    repeats = math.prod(max(1, *(int(bound) for bound in match.groups() if bound))
                        for match in _COUNTED_REPEAT.finditer(key))
    if repeats > MAX_REPEAT_PRODUCT:
        raise _invalid(f"has counted repeats ({{m,n}}) whose bounds multiply to more than {MAX_REPEAT_PRODUCT}, "
                       "the most allowed", field, key)
    source = rf"(.*\.)?({key})$"  # peft's form: the key must end the name, after a dot or at its start
    try:
        re.compile(source)
        return regex.compile(source)
    except (re.error, regex.error, OverflowError, RecursionError) as exc:
        raise _invalid(f"is not a valid regular expression ({str(exc)[:120]})", field, key) from None


def _rank_value(key: str, value: object, max_rank: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _invalid(f"rank must be a positive integer, got {value!r:.60}", "rank_pattern", key,
                       expected="integer >= 1", actual=f"{value!r:.60}")
    if max_rank is not None and value > max_rank:
        raise _invalid(f"rank {value} is above this registry's limit of {max_rank}", "rank_pattern", key,
                       reason="RANK_TOO_LARGE", expected=f"<= {max_rank}", actual=value)
    return value


def _alpha_value(key: str, value: object) -> float:
    # Compared, not converted: float(10**400) overflows, and `not 0 < x` also refuses NaN.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_ALPHA:
        raise _invalid(f"alpha must be a positive number of at most {MAX_ALPHA:.7g}, got {value!r:.60}",
                       "alpha_pattern", key, expected=f"> 0 and <= {MAX_ALPHA:.7g}", actual=f"{value!r:.60}")
    return float(value)


def _read_pattern(config: dict, field: str, max_rank: int | None) -> tuple[PatternKey, ...]:
    pattern = config.get(field)
    if pattern is None:
        return ()
    if not isinstance(pattern, dict):
        raise _invalid(f"must be an object mapping module names or regexes to values, got "
                       f"{type(pattern).__name__}", field)
    if len(pattern) > MAX_PATTERN_KEYS:
        raise _invalid(f"has {len(pattern)} keys; at most {MAX_PATTERN_KEYS} are allowed", field)
    keys, deadline = [], time.monotonic() + MATCH_BUDGET_S
    for key, value in pattern.items():  # in the dict's order: the first match wins
        if time.monotonic() > deadline:  # each compile is short (length and repeats are capped), many are not
            raise _invalid(f"compiling its keys took longer than {MATCH_BUDGET_S:g} s; use fewer regex keys", field,
                           key)
        if not isinstance(key, str):
            raise _invalid(f"keys must be strings (module names or regexes), got {type(key).__name__} {key!r:.60}",
                           field)
        value = _rank_value(key, value, max_rank) if field == "rank_pattern" else _alpha_value(key, value)
        keys.append(PatternKey(field, key, value, _compile(field, key)))
    return tuple(keys)


@dataclasses.dataclass(frozen=True)
class ModuleLora:
    """One module's rank and alpha, and the pattern keys that set them (None: the default)."""

    rank: int
    alpha: float
    rank_key: str | None = None
    alpha_key: str | None = None


@dataclasses.dataclass(frozen=True)
class LoraPatterns:
    """An adapter's default rank and alpha with its pattern keys, in the config's order."""

    rank: int
    alpha: float
    rank_pattern: tuple[PatternKey, ...] = ()
    alpha_pattern: tuple[PatternKey, ...] = ()

    @classmethod
    def from_config(cls, config: dict, rank: int, alpha: float, max_rank: int | None = None) -> LoraPatterns:
        """Reads and checks both pattern fields of a parsed adapter_config.json; `rank` and `alpha`
        are the config's (already checked) defaults. `max_rank` None skips the rank limit."""
        return cls(rank, alpha, _read_pattern(config, "rank_pattern", max_rank),
                   _read_pattern(config, "alpha_pattern", max_rank))

    def resolve(self, module_names: Iterable[str]) -> dict[str, ModuleLora]:
        """Each module's rank and alpha, as peft gives them when it builds the adapter's layers."""
        deadline = time.monotonic() + MATCH_BUDGET_S
        resolved = {}
        for name in module_names:
            rank_key = next((key for key in self.rank_pattern if key.matches(name, deadline)), None)
            alpha_key = next((key for key in self.alpha_pattern if key.matches(name, deadline)), None)
            resolved[name] = ModuleLora(int(rank_key.value) if rank_key else self.rank,
                                        alpha_key.value if alpha_key else self.alpha,
                                        rank_key.text if rank_key else None, alpha_key.text if alpha_key else None)
        return resolved
