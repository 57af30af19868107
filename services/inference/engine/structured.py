"""Structured output: decoding constrained to JSON matching a schema, with llguidance.

The node compiles a request's schema into a JsonGrammar (GrammarCompiler.compile, on threads
of its own: a burst of large schemas must not hold up tokenizing everyone's prompts); the
grammar travels with its Sequence. Compiled grammars are kept per cache scope (the router's
tenant) and schema, and a request gets a copy in the start state: clients send the same schema
with every request, and a large one on a large vocabulary takes up to a second to compile. Each step the Sampler masks every
constrained row's logits to the tokens its grammar allows next (`mask_disallowed`), the
scheduler advances the grammar with the sampled token (Sequence.append_token) and finishes
the sequence with STOP once the JSON value is complete: the end-of-sequence token would be
the only choice left, so it is implied rather than generated.

llguidance is imported on first use, not with this module: the engine runs on the GPU
machine's image (bench/device_check.py installs nothing there), which lacks it, and only a
structured request needs it.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from services.common.errors import FailedPrecondition, InvalidArgument
from services.inference.engine.host_lists import to_device_async

if TYPE_CHECKING:
    import llguidance

log = logging.getLogger("loraplex.engine")

FIELD = "structured_output"
#: Compact JSON, no whitespace outside strings: with flexible whitespace a small model can
#: wander into newlines and spaces until max_tokens, all of them valid JSON. A schema's own
#: "x-guidance" options override this.
COMPILE_OPTIONS = {"whitespace_flexible": False}
#: llguidance's errors can span lines (a regex error draws the pattern) or dump the parser's
#: state: they are joined into one line, cut at this length.
MAX_ERROR_CHARS = 300
#: Compiled grammars kept (least recently used dropped first). Each holds its schema's lexer and
#: parser tables, not the vocabulary (shared by all, in the tokenizer).
CACHED_GRAMMARS = 64


class JsonGrammar:
    """One request's place in its grammar: which tokens may come next, and whether the JSON
    value is complete. Used by the engine thread only, once compiled."""

    def __init__(self, matcher: llguidance.LLMatcher, request_id: str = "") -> None:
        self.matcher = matcher
        self.request_id = request_id

    def advance(self, token_id: int) -> None:
        """Consume a sampled token. The mask allows only tokens the grammar takes, so a refusal
        is a bug or a parser resource limit: the matcher then stops (only EOS allowed, as
        llguidance does), which ends the sequence; the warning says why."""
        if not self.matcher.consume_token(token_id):
            log.warning("request %s: structured output stopped early: %s", self.request_id,
                        _one_line(self.matcher.get_error()))

    @property
    def is_complete(self) -> bool:
        """The JSON value is whole (or the matcher failed): nothing but EOS may follow."""
        return self.matcher.is_stopped()


class GrammarCompiler:
    """Compiles JSON schemas for one tokenizer (one per node). Thread-safe."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int],
                 cache_size: int = CACHED_GRAMMARS) -> None:
        self._hf_tokenizer = tokenizer
        self._vocab_size = vocab_size  # the logits' width, which can exceed len(tokenizer)
        self._eos_token_ids = list(eos_token_ids)
        self._lock = threading.Lock()
        self._llg_tokenizer: llguidance.LLTokenizer | None = None
        self._cache_size = cache_size
        #: (scope, schema) -> a matcher in its start state, never advanced: requests get copies.
        self._compiled: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.compilations = 0  # schemas compiled, not found in the cache

    def compile(self, json_schema: str, request_id: str = "", scope: str = "") -> JsonGrammar:
        """The grammar of JSON text matching `json_schema` (JSON text), in its start state.
        Compiling blocks for up to about a second on a complex schema (llguidance releases the
        GIL meanwhile): call it off the event loop. A schema compiled before in the same
        `scope` is a copy of that grammar, at once. Scoped, because the time a compile takes
        shows in the time to first token: one cache for all would tell a tenant which schemas
        another one sends. InvalidArgument (field structured_output) for a schema it cannot
        compile; refusals are not kept."""
        key = (scope, json_schema)
        with self._cache_lock:
            prototype = self._compiled.get(key)
            if prototype is not None:
                self._compiled.move_to_end(key)
                return JsonGrammar(prototype.deep_copy(), request_id)
        matcher = self._compiled_matcher(json_schema)
        with self._cache_lock:
            self.compilations += 1
            self._compiled[key] = matcher.deep_copy()
            self._compiled.move_to_end(key)
            while len(self._compiled) > self._cache_size:
                self._compiled.popitem(last=False)
        return JsonGrammar(matcher, request_id)

    def _compiled_matcher(self, json_schema: str) -> llguidance.LLMatcher:
        llg = _llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(json_schema, defaults=COMPILE_OPTIONS)
        except ValueError as exc:  # not JSON text, or not a JSON object
            raise _refused(str(exc)) from None
        matcher = llg.LLMatcher(self._tokenizer(), grammar, log_level=0)  # errors: reported here, not printed
        if matcher.is_error():
            raise _refused(matcher.get_error())
        return matcher

    def _tokenizer(self) -> llguidance.LLTokenizer:
        """Built on the first structured request, not at node start: a node that never gets
        one never pays (about a second for a 150k-token vocabulary). The lock builds it once
        when the first requests arrive together."""
        with self._lock:
            if self._llg_tokenizer is None:
                try:
                    self._llg_tokenizer = _llguidance().hf.from_tokenizer(
                        self._hf_tokenizer, n_vocab=self._vocab_size, eos_token=self._eos_token_ids or None)
                except ValueError as exc:  # a slow (pure Python) tokenizer: llguidance needs a fast one
                    raise FailedPrecondition(f"structured output needs a fast tokenizer on this node: {exc}",
                                             field=FIELD) from None
            return self._llg_tokenizer


def mask_disallowed(logits: torch.Tensor, grammars: Sequence[JsonGrammar | None]) -> None:
    """In place: each constrained row's logits are -inf where its grammar forbids the token
    next; rows without a grammar are untouched. [N, V], one grammar (or None) per row.

    The masks are computed on the host (llguidance, in parallel across rows), packed 32 tokens
    to an int32, and go to the logits' device in one small copy (pinned memory on CUDA, so the
    copy does not wait for the device), where they are unpacked: no read back from it."""
    rows = [i for i, grammar in enumerate(grammars) if grammar is not None]
    if not rows:
        return
    vocab, device = logits.shape[-1], logits.device
    packed = torch.full((len(rows), -(-vocab // 32)), -1, dtype=torch.int32,
                        pin_memory=device.type == "cuda")  # [C, ceil(V / 32)], contiguous, on the host
    # llguidance writes row k's mask at data_ptr + k * (its bytes): what llguidance.torch's
    # fill_next_token_bitmask_par does, without importing that module (torch.compile, ~2 s).
    _executor().unsafe_compute_mask_ptr([(grammars[i].matcher, k) for k, i in enumerate(rows)], packed.data_ptr(),
                                        packed.shape[1] * packed.element_size(), packed.shape[0])
    allowed = unpack_bitmask(packed.to(device, non_blocking=True), vocab)  # [C, V]
    index = to_device_async(rows, torch.int64, device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def unpack_bitmask(packed: torch.Tensor, vocab: int) -> torch.Tensor:
    """llguidance's packed mask [C, W] int32 -> [C, vocab] bool: token 32 * w + b is allowed
    when bit b of word w is set. (llguidance.torch's own apply goes through torch.compile,
    which needs a C++ toolchain on CPU and compiles on first use.)"""
    bits = torch.arange(32, device=packed.device, dtype=torch.int32)  # [32]
    return ((packed[:, :, None] >> bits) & 1).bool().flatten(1)[:, :vocab]


@functools.cache
def _executor() -> llguidance.LLExecutor:
    """The thread pool that computes a step's masks in parallel (one per process)."""
    return _llguidance().LLExecutor()


def _llguidance() -> ModuleType:
    """llguidance with the submodules used here (see the module docstring for why on first use)."""
    try:
        import llguidance
        import llguidance.hf
    except ImportError as exc:  # a node installed without it (a bare GPU image): the caller's 400, not a 500
        raise FailedPrecondition(f"structured output is not available on this node: {exc}", field=FIELD) from None
    return llguidance


def _one_line(error: str) -> str:
    line = " ".join(error.split()) or "unknown error"
    return line if len(line) <= MAX_ERROR_CHARS else line[:MAX_ERROR_CHARS] + "..."


def _refused(error: str) -> InvalidArgument:
    return InvalidArgument(f"structured_output is not a JSON schema this node can follow: {_one_line(error)}",
                           field=FIELD)
