"""Structured output, the parts: compiling schemas (and refusing bad ones), the grammar mask
against llguidance's own per-token answer, and the Sampler with it (masked rows choose allowed
tokens only, other rows are untouched, logprobs stay raw). Real grammars on the tiny model's
tokenizer throughout."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading

import llguidance
import llguidance.hf
import pytest
import torch
from transformers import AutoTokenizer

from services.common.errors import InvalidArgument
from services.inference.engine import sampler as sampler_module
from services.inference.engine import structured
from services.inference.engine.sampler import Sampler, make_generator
from services.inference.engine.sampling_params import MAX_JSON_SCHEMA_BYTES, SamplingParams
from services.inference.engine.structured import GrammarCompiler, JsonGrammar, mask_disallowed, unpack_bitmask
from tests.conftest import REPO_ROOT

#: An object with a bounded integer, a string enum and a short array of short strings.
SCHEMA = {"type": "object", "properties": {
    "count": {"type": "integer", "minimum": 0, "maximum": 999},
    "kind": {"enum": ["stock", "bond"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
    "required": ["count", "kind", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def vocab(tiny_model_dir) -> int:
    return json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def compiler(tokenizer, vocab) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, vocab, [4, 1])


def allowed_next(grammar: JsonGrammar, vocab: int) -> set[int]:
    """llguidance's answer by another path: one byte per token (0 = forbidden)."""
    return {t for t, byte in enumerate(grammar.matcher.compute_logit_bias()[:vocab]) if byte}


def walked(compiler: GrammarCompiler, vocab: int, steps: int, seed: int) -> JsonGrammar:
    """A SCHEMA grammar advanced by `steps` random allowed tokens: a state inside the value."""
    grammar, rng = compiler.compile(json.dumps(SCHEMA)), random.Random(seed)
    for _ in range(steps):
        if grammar.is_complete:
            break
        grammar.advance(rng.choice(sorted(allowed_next(grammar, vocab))))
    return grammar


@pytest.mark.parametrize(("schema", "says"), [
    ('{"type": "strin"}', "Invalid type: strin"),
    ('{"type": "array", "uniqueItems": true}', "uniqueItems"),  # known to JSON Schema, not implemented: refused
    ('{"type": "string", "format": "nope"}', "Unknown format"),
    ('{"type": "string", "pattern": "(a"}', "unclosed group"),  # llguidance draws the regex over lines
    ('{"$ref": "#/$defs/missing"}', "missing"),
    ("{", "EOF"),
    ("", "EOF"),
    ("[1]", "object"),
])
def test_a_schema_it_cannot_follow_is_invalid_argument_naming_structured_output(compiler, schema, says):
    with pytest.raises(InvalidArgument) as caught:
        compiler.compile(schema)
    assert caught.value.metadata["field"] == "structured_output"
    assert caught.value.message.startswith("structured_output ") and says in caught.value.message
    assert "\n" not in caught.value.message and len(caught.value.message) < 400


def test_a_schema_over_64_kib_is_refused_before_compiling_one_at_the_limit_is_not():
    def params(size: int) -> SamplingParams:
        padding = "x" * (size - len('{"description":""}'))
        return SamplingParams(json_schema=json.dumps({"description": padding}, separators=(",", ":")))

    assert params(MAX_JSON_SCHEMA_BYTES).validate(4, 64).json_schema is not None
    with pytest.raises(InvalidArgument) as caught:
        params(MAX_JSON_SCHEMA_BYTES + 1).validate(4, 64)
    assert caught.value.metadata["field"] == "structured_output" and "64 KiB" in caught.value.message


def test_the_llguidance_tokenizer_is_built_once_for_concurrent_first_requests(tokenizer, vocab, monkeypatch):
    calls, original = [], llguidance.hf.from_tokenizer

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(llguidance.hf, "from_tokenizer", counting)
    compiler = GrammarCompiler(tokenizer, vocab, [4, 1])
    assert not calls  # lazily: a node without structured requests never builds it
    grammars = []
    threads = [threading.Thread(target=lambda: grammars.append(compiler.compile('{"type":"object"}')))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(grammars) == 8 and len(calls) == 1


def test_a_schema_seen_before_in_its_scope_is_a_fresh_copy_of_the_compiled_grammar(tokenizer, vocab):
    """Clients send one schema with every request: it is compiled once per scope (the router's
    tenant: a compile shows in the time to first token, so scopes do not share), and each
    request starts from the start state whatever earlier ones consumed."""
    compiler = GrammarCompiler(tokenizer, vocab, [4, 1], cache_size=2)
    schema = json.dumps(SCHEMA)
    start = allowed_next(compiler.compile(schema, scope="a"), vocab)
    first = compiler.compile(schema, scope="a")
    walked_to = allowed_next(first, vocab)
    first.advance(min(walked_to))  # the first request moves on...
    assert allowed_next(first, vocab) != start
    again = compiler.compile(schema, scope="a")
    assert compiler.compilations == 1  # ...the cached grammar did not
    assert allowed_next(again, vocab) == start and again.matcher is not first.matcher
    compiler.compile(schema, scope="b")
    assert compiler.compilations == 2  # another tenant compiles its own
    compiler.compile('{"type": "object"}', scope="a")  # the third entry: the least recent ("a", SCHEMA) goes
    compiler.compile(schema, scope="b")
    assert compiler.compilations == 3
    compiler.compile(schema, scope="a")
    assert compiler.compilations == 4
    for _ in range(2):  # refusals are not kept: each says why again
        with pytest.raises(InvalidArgument):
            compiler.compile('{"type": "strin"}', scope="a")
    assert compiler.compilations == 4


def test_the_engine_imports_without_llguidance_and_a_structured_request_is_then_refused():
    """The GPU machine's image has no llguidance and runs the engine's checks (bench/device_check.py)."""
    script = ("import sys; sys.modules['llguidance'] = None\n"
              "import services.inference.node, services.inference.servicer\n"
              "from services.inference.engine.structured import GrammarCompiler\n"
              "from services.common.errors import FailedPrecondition\n"
              "try:\n    GrammarCompiler(None, 8, []).compile('{}')\n"
              "except FailedPrecondition as exc:\n    print(exc.metadata['field'])\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "structured_output"  # FailedPrecondition: the caller's 400, not a 500


def test_unpack_bitmask_reads_token_32w_plus_b_from_bit_b_of_word_w():
    packed = torch.randint(-2**31, 2**31 - 1, (3, 5), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    vocab = 150  # not a multiple of 32: the last word's high bits are cut off
    expected = [[bool((int(packed[r, t // 32]) >> (t % 32)) & 1) for t in range(vocab)] for r in range(3)]
    assert unpack_bitmask(packed, vocab).tolist() == expected


def test_the_mask_forbids_exactly_what_llguidance_forbids_and_leaves_free_rows_alone(compiler, vocab):
    grammars = [walked(compiler, vocab, steps, seed) for seed, steps in enumerate((0, 3, 9, 20))]
    rows: list[JsonGrammar | None] = [grammars[0], None, grammars[1], grammars[2], None, grammars[3]]
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(1))  # [N, V]
    masked = logits.clone()
    mask_disallowed(masked, rows)
    for i, grammar in enumerate(rows):
        if grammar is None:
            assert torch.equal(masked[i], logits[i])
            continue
        allowed = allowed_next(grammar, vocab)
        assert 0 < len(allowed) < vocab
        assert set(torch.isfinite(masked[i]).nonzero().squeeze(-1).tolist()) == allowed
        assert torch.equal(masked[i, sorted(allowed)], logits[i, sorted(allowed)])


def test_without_a_grammar_in_the_batch_no_mask_is_computed(monkeypatch):
    def fail(*_):
        raise AssertionError("masked a batch without grammars")

    monkeypatch.setattr(sampler_module, "mask_disallowed", fail)
    logits = torch.randn(3, 40)
    params = [SamplingParams(temperature=0.0)] * 3
    for grammars in (None, [None, None, None]):
        assert [s.token_id for s in Sampler().sample(logits, params, [None] * 3, None, grammars)] == \
            logits.argmax(-1).tolist()


def test_the_sampler_picks_allowed_tokens_only_and_reports_raw_logprobs(compiler, vocab):
    """Greedy takes the best allowed token; sampled rows (top-k, top-p, seeds) never leave the
    allowed set; a +100 bias cannot bring back a forbidden token; logprobs are the raw ones."""
    forbidden_first = 300  # any token but "{" is forbidden at the start of an object
    params = [SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3),
              SamplingParams(temperature=0.0, logprobs=True),  # free: plain argmax
              SamplingParams(temperature=1.0, seed=7, logprobs=True),
              SamplingParams(temperature=1.5, top_k=5, top_p=0.9, seed=8),
              SamplingParams(temperature=0.0, logit_bias=((forbidden_first, 100.0),))]
    logits = torch.randn(len(params), vocab, generator=torch.Generator().manual_seed(2)) * 3
    raw = torch.log_softmax(logits, dim=-1)
    for trial in range(20):
        grammars = [walked(compiler, vocab, 4 + trial, trial), None, walked(compiler, vocab, trial, trial + 1),
                    walked(compiler, vocab, 2 * trial, trial + 2), compiler.compile(json.dumps(SCHEMA))]
        allowed = [allowed_next(g, vocab) if g is not None else set(range(vocab)) for g in grammars]
        assert forbidden_first not in allowed[4]
        generators = [None, None, make_generator(trial), make_generator(trial + 100), None]
        sampled = Sampler().sample(logits.clone(), params, generators, None, grammars)
        for i, token in enumerate(sampled):
            assert token.token_id in allowed[i], (trial, i)
        best_allowed = max(allowed[0], key=lambda t: (float(logits[0, t]), -t))
        assert sampled[0].token_id == best_allowed
        assert sampled[1].token_id == int(logits[1].argmax())
        assert sampled[4].token_id != forbidden_first and sampled[4].token_id in allowed[4]
        assert sampled[0].logprob == pytest.approx(float(raw[0, best_allowed]), abs=1e-5)
        assert [t for t, _ in sampled[0].top] == raw[0].topk(3).indices.tolist()  # forbidden ones included
        assert sampled[2].logprob == pytest.approx(float(raw[2, sampled[2].token_id]), abs=1e-5)


def test_a_refused_token_stops_the_grammar_and_is_logged(compiler, vocab, caplog):
    """Cannot happen through the mask; if the parser ever refuses (a bug, a resource limit),
    the sequence ends rather than going on unconstrained."""
    grammar = compiler.compile(json.dumps(SCHEMA), request_id="req-7")
    forbidden = next(t for t in range(vocab) if t not in allowed_next(grammar, vocab))
    with caplog.at_level("WARNING", logger="loraplex.engine"):
        grammar.advance(forbidden)
    assert grammar.is_complete
    assert "req-7" in caplog.text and "structured output stopped early" in caplog.text
    assert structured.MAX_ERROR_CHARS + 100 > max(len(r.getMessage()) for r in caplog.records)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_mask_and_the_sampler_agree_with_the_cpu(compiler, vocab):
    grammars = [walked(compiler, vocab, steps, seed) for seed, steps in enumerate((0, 5, 12))]
    rows = [grammars[0], None, grammars[1], grammars[2]]
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(3))
    on_cpu, on_cuda = logits.clone(), logits.cuda()
    mask_disallowed(on_cpu, rows)
    mask_disallowed(on_cuda, rows)
    assert torch.equal(on_cuda.cpu(), on_cpu)
    params = [SamplingParams(temperature=0.0)] * 2 + [SamplingParams(temperature=1.0)] * 2
    generators = [None, None, make_generator(1, "cuda"), make_generator(2, "cuda")]
    sampled = Sampler().sample(logits.cuda(), params, generators, None, rows)
    for i, token in enumerate(sampled):
        assert rows[i] is None or token.token_id in allowed_next(rows[i], vocab)
