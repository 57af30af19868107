"""Adapters with per-module ranks and alphas (PEFT's rank_pattern / alpha_pattern) are accepted on
every backend pair and recorded with their largest rank; the pattern dicts keep their order
(it decides which key wins); each tensor is checked against its own module's rank; and bad
patterns are refused with INVALID_ARGUMENT naming the field and the key, leaving nothing behind."""

from __future__ import annotations

import json
import math

import grpc
import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.lora_patterns import LoraPatterns
from services.inference.adapters.weights import parse_adapter
from services.inference.model.config import load_model_args
from tests.registry.client import expect_error
from tests.registry.lora_files import AdapterFiles, key, make_peft_adapter

CONFIG = "adapter_config.json"
RANK_PATTERN = {"q_proj": 8, r"^.*\.1\.mlp\.down_proj": 2}
ALPHA_PATTERN = {"v_proj": 32, "model.layers.0.self_attn.o_proj": 3}


@pytest.fixture(scope="module")
def patterned(tiny_model_dir, tmp_path_factory) -> AdapterFiles:
    """Real PEFT: r=4, q_proj r=8, layer 1's down_proj r=2 (by regex); alphas for v_proj and one o_proj."""
    return make_peft_adapter(tiny_model_dir, tmp_path_factory.mktemp("patterned") / "adapter", r=4, alpha=8,
                             rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN)


def _with_q_rank(files: AdapterFiles, rank: int) -> AdapterFiles:
    """Every q_proj of `files` resized to `rank` (random values)."""
    rng = np.random.default_rng(rank)

    def resize(tensors):
        for layer in (0, 1):
            a, b = key(layer, "q_proj", "A"), key(layer, "q_proj", "B")
            tensors[a] = rng.standard_normal((rank, tensors[a].shape[1])).astype(np.float32)
            tensors[b] = rng.standard_normal((tensors[b].shape[0], rank)).astype(np.float32)
    return files.mutate(resize)


def test_patterned_adapter_is_accepted_with_its_largest_rank(registry, tenant, patterned, tiny_model_dir):
    assert patterned.tensors[key(1, "down_proj", "A")].shape == (2, 128)  # peft applied the regex
    before = registry.counts()
    response = tenant.upload(patterned, name="patterned")
    adapter = response.adapter
    assert response.created
    assert (adapter.rank, adapter.alpha, adapter.scaling) == (8, 8.0, 1.0)  # lora_alpha / largest rank
    assert registry.counts()["adapters"] == before["adapters"] + 1
    manifest, weights = tenant.download(adapter.id)
    assert json.loads(manifest.config_json) == patterned.config_dict
    served = parse_adapter(manifest.config_json, weights, load_model_args(tiny_model_dir))
    assert (served.rank, served.scaling) == (adapter.rank, adapter.scaling)


def test_rslora_records_the_scale_of_the_largest_rank(registry, tenant, tiny_model_dir, tmp_path):
    files = make_peft_adapter(tiny_model_dir, tmp_path / "rs", r=4, alpha=8, use_rslora=True, modules=["q_proj"],
                              rank_pattern={"q_proj": 16})
    adapter = tenant.upload(files, name="rs").adapter
    assert adapter.rank == 16 and math.isclose(adapter.scaling, 8 / math.sqrt(16), rel_tol=1e-6)


def test_pattern_order_is_kept_and_decides_the_rank(registry, tenant, peft_adapter):
    # Both keys match layer 0's q_proj; the first one in the file wins, so every q_proj is r=6.
    first_wins = {"q_proj": 6, "layers.0.self_attn.q_proj": 2}
    files = _with_q_rank(peft_adapter, 6).with_config(rank_pattern=first_wins)
    manifest, _ = tenant.download(tenant.upload(files, name="ordered").adapter.id)
    assert list(json.loads(manifest.config_json)["rank_pattern"]) == list(first_wins)  # not sorted
    # The same keys in sorted order give layer 0's q_proj r=2: its r=6 tensors no longer fit.
    before = registry.counts()
    swapped = files.with_config(rank_pattern=dict(sorted(first_wins.items())))
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.upload, swapped, name="swapped")
    assert "expected [2, 64]" in error.details() and "rank_pattern key 'layers.0.self_attn.q_proj'" in error.details()
    assert registry.counts() == before


def _patterns(rank: dict | None = None, alpha: dict | None = None):
    return lambda files: files.with_config(rank_pattern=rank or {}, alpha_pattern=alpha or {})


CATASTROPHIC = r"(?:(?:[\w.]|[\w.][\w.])+)+a"  # backtracks for seconds on a module name before failing

# name -> (change to the patterned adapter, substrings the message must contain)
REFUSED = {
    "shape_disagrees_with_pattern": (_patterns({"q_proj": 4}), [key(0, "q_proj", "A"), "[8, 64]", "expected [4, 64]",
                                                                "rank_pattern key 'q_proj'"]),
    "rank_not_an_integer": (_patterns({"q_proj": 8.0}), [CONFIG, "rank_pattern key 'q_proj'", "positive integer",
                                                         "8.0"]),
    "rank_zero": (_patterns({"q_proj": 0}), ["rank_pattern key 'q_proj'", "positive integer, got 0"]),
    "rank_boolean": (_patterns({"q_proj": True}), ["rank_pattern key 'q_proj'", "got True"]),
    "rank_above_limit": (_patterns({"q_proj": 300}), ["rank_pattern key 'q_proj'", "rank 300", "limit of 256"]),
    "alpha_not_a_number": (_patterns(alpha={"v_proj": "32"}), [CONFIG, "alpha_pattern key 'v_proj'",
                                                               "positive number", "'32'"]),
    "alpha_negative": (_patterns(alpha={"v_proj": -1}), ["alpha_pattern key 'v_proj'", "positive number"]),
    # JSON object keys are always strings: a list of pairs is how a non-string key reaches us.
    "pattern_not_an_object": (_patterns([["q_proj", 8]]), [CONFIG, "rank_pattern: must be an object"]),
    "bad_regex": (_patterns({"(q_proj": 8}), ["rank_pattern key '(q_proj'", "not a valid regular expression"]),
    # `regex` would accept this; peft's `re` does not, so peft could not load it either.
    "flags_not_at_the_start": (_patterns(alpha={"q(?i)_proj": 8}), ["alpha_pattern key 'q(?i)_proj'",
                                                                    "not a valid regular expression"]),
    "repeats_that_would_exhaust_memory": (_patterns({"(?:x{65535}){65535}": 8}),
                                          ["rank_pattern key '(?:x{65535}){65535}'", "counted repeats"]),
    "catastrophic_backtracking": (_patterns({"q_proj": 8, CATASTROPHIC: 2}),
                                  [CONFIG, f"rank_pattern key {CATASTROPHIC!r}", "took longer than"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_patterns_are_refused_and_leave_nothing(registry, tenant, patterned, case):
    change, expected = REFUSED[case]
    before = registry.counts()
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.upload, change(patterned), name="bad")
    for part in expected:
        assert part in error.details(), f"{part!r} not in {error.details()!r}"
    assert registry.counts() == before


def test_pattern_keys_must_be_strings():
    """A config parsed from JSON has string keys only; one built in code (a node's local folder
    source reads JSON too, but callers may pass dicts) is held to the same rule."""
    with pytest.raises(InvalidArgument, match="rank_pattern: keys must be strings") as caught:
        LoraPatterns.from_config({"rank_pattern": {1: 8}}, 4, 8.0, max_rank=64)
    assert caught.value.metadata["field"] == "rank_pattern"


def test_matching_budget_bounds_a_catastrophic_pattern():
    patterns = LoraPatterns.from_config({"alpha_pattern": {CATASTROPHIC: 2.0}}, 4, 8.0)
    with pytest.raises(InvalidArgument, match="alpha_pattern key .* took longer than") as caught:
        patterns.resolve(["model.layers.0.self_attn.q_proj"])
    assert caught.value.metadata["key"] == CATASTROPHIC
