"""Adapters with per-module ranks and alphas (PEFT's rank_pattern / alpha_pattern) are served
exactly: the node pads each module to the adapter's largest rank and folds each module's scale
into its B (services/inference/adapters/weights.py), and gets HF transformers + peft's logits
and greedy tokens. Patterns cover plain module names, full dotted names, regexes, rsLoRA, and
keys whose order decides the outcome."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from services.common.lora_patterns import LoraPatterns, lora_scaling
from services.inference.adapters.pool import AdapterPool
from services.inference.adapters.weights import load_adapter_folder
from services.inference.model.loader import load_model
from tests.inference.peft_adapters import ALL_MODULES
from tests.inference.test_adapters import LENGTH, packed_logits, peft_logits
from tests.inference.test_oracle import NEW_TOKENS, PROMPTS, assert_matches_reference, run_engine

# name -> LoraConfig arguments. Each has modules below, at and above its default rank.
PATTERNED = {
    "names": dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 8, "model.layers.1.mlp.down_proj": 2},
                  alpha_pattern={"v_proj": 32}),
    "regexes": dict(r=8, lora_alpha=16, rank_pattern={r"^.*\.1\.mlp\.down_proj": 2,
                                                      r"model\.layers\.0\.self_attn\.(q|k)_proj": 12},
                    alpha_pattern={r".*\.0\.mlp\..*": 4, "o_proj": 5.5}),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"o_proj": 16, "gate_proj": 2},
                   alpha_pattern={"up_proj": 3.5, "layers.1.self_attn.k_proj": 64}),
    # Only some modules targeted, and every one of them overridden: the pool rank is the
    # patterns' largest, not r.
    "subset": dict(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2, "v_proj": 6}),
}
# Both keys match layer 0's q_proj and the first in the file wins (peft tries keys in order).
# peft writes configs with sorted keys, which would put layers.0... first: the file is rewritten
# in this order after saving, as a customer may hand it to us.
ORDERED = ("ordered", dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 6, "layers.0.self_attn.q_proj": 2},
                           alpha_pattern={"self_attn.q_proj": 24, "layers.0.self_attn.q_proj": 2}))


def _build(base: Path, out: Path, config: dict, seed: int) -> Path:
    """Saves a PEFT adapter with seeded random, non-zero A and B, and its patterns in `config`'s order."""
    config = {"target_modules": list(ALL_MODULES), **config}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(lora_dropout=0.0, init_lora_weights=False, **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    model.save_pretrained(out)
    saved = json.loads((out / "adapter_config.json").read_text())
    saved.update(rank_pattern=config.get("rank_pattern", {}), alpha_pattern=config.get("alpha_pattern", {}))
    (out / "adapter_config.json").write_text(json.dumps(saved))
    return out


@pytest.fixture(scope="module")
def patterned(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("patterned")
    return {name: _build(tiny_model_dir, root / name, config, seed)
            for seed, (name, config) in enumerate([*PATTERNED.items(), ORDERED])}


def _peft_modules(base: Path, adapter: Path) -> dict[str, tuple[int, float]]:
    """module name in the base model -> (r, scaling) as peft built it."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    prefix = "base_model.model."
    return {name.removeprefix(prefix): (module.r["default"], module.scaling["default"])
            for name, module in model.named_modules() if isinstance(getattr(module, "r", None), dict)}


@pytest.mark.parametrize("name", [*PATTERNED, ORDERED[0]])
def test_each_module_gets_the_rank_and_scale_peft_gives_it(tiny_model_dir, patterned, name):
    config = json.loads((patterned[name] / "adapter_config.json").read_text())
    theirs = _peft_modules(tiny_model_dir, patterned[name])
    ours = LoraPatterns.from_config(config, config["r"], config["lora_alpha"]).resolve(theirs)
    assert len({r for r, _ in theirs.values()}) > 1, "the patterns must make ranks differ"
    for module, (rank, scaling) in theirs.items():
        assert ours[module].rank == rank, module
        assert lora_scaling(ours[module].alpha, ours[module].rank, config["use_rslora"]) == pytest.approx(scaling)
    if name == ORDERED[0]:
        assert theirs["model.layers.0.self_attn.q_proj"] == (6, 4.0)  # the first key in the file won both


def test_the_pool_holds_the_largest_rank_with_zero_padding(tiny_model_dir, patterned):
    _, args = load_model(tiny_model_dir)
    weights = load_adapter_folder(patterned["names"], args)
    assert weights.rank == 8 and weights.scaling == 8 / 8
    down = weights.a["down_proj"][1], weights.b["down_proj"][1]  # layer 1's, r=2 by its full name; B transposed
    assert down[0].shape == (8, args.intermediate_size) and down[1].shape == (8, args.hidden_size)
    assert down[0][:2].abs().sum() > 0 and down[1][:2].abs().sum() > 0
    assert down[0][2:].abs().sum() == 0 and down[1][2:].abs().sum() == 0
    assert load_adapter_folder(patterned["subset"], args).rank == 6


def test_logits_equal_peft_for_every_patterned_adapter_in_one_batch(tiny_model_dir, patterned):
    model, args = load_model(tiny_model_dir)
    pool = AdapterPool(args, num_pages=96)
    for name, folder in patterned.items():
        pool.load(name, load_adapter_folder(folder, args))
    keys = [None, *patterned]
    ids = torch.randint(0, args.vocab_size, (len(keys), LENGTH), generator=torch.Generator().manual_seed(5))
    got = packed_logits(model, args, ids, pool, keys)
    for row, key in enumerate(keys):
        expected = peft_logits(tiny_model_dir, patterned[key] if key else None, ids[row:row + 1])[0]
        torch.testing.assert_close(got[row], expected, atol=1e-4, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


def test_engine_tokens_equal_peft_for_a_mixed_batch(tiny_model_dir, patterned):
    root = next(iter(patterned.values())).parent
    mix = [(PROMPTS[(i + j) % len(PROMPTS)], key) for i, key in enumerate(["", *patterned]) for j in range(2)]
    node, results = run_engine(tiny_model_dir, root, pool_pages=64, mix=mix)
    assert assert_matches_reference(tiny_model_dir, root, mix, results) >= 0.9 * len(mix) * NEW_TOKENS
    assert {adapter.key: adapter.rank for adapter in node.pool.resident()} == \
        {"names": 8, "regexes": 12, "rslora": 16, "subset": 6, "ordered": 6}
