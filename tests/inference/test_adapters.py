"""Paged adapter pool and PEFT parsing: a mixed-adapter packed batch equals PEFT per adapter;
LRU eviction touches only unreferenced, unpinned adapters; reused pages carry no residue."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.inference.adapters.batch import LoraBatch
from services.inference.adapters.pool import AdapterPool
from services.inference.adapters.weights import load_adapter_folder
from services.inference.model.context import StepContext
from services.inference.model.loader import load_model
from tests.inference.peft_adapters import VARIED_SPECS

LENGTH = 7


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


def packed_logits(model, args, ids, pool, keys):
    """Runs sequences ids[i] (LENGTH tokens each) in one packed prefill, sequence i with
    adapter keys[i] (None = base model only)."""
    count = ids.shape[0]
    for layer in model.attention_layers():
        layer.k_cache = torch.zeros(count, 16, args.num_kv_heads, args.head_dim)
        layer.v_cache = torch.zeros_like(layer.k_cache)
    groups = [pool.segments_of(key, i * LENGTH, (i + 1) * LENGTH) for i, key in enumerate(keys) if key is not None]
    ctx = StepContext(positions=torch.arange(LENGTH).repeat(count),
                      slot_mapping=torch.cat([torch.arange(LENGTH) + 16 * i for i in range(count)]),
                      cu_seqlens=[LENGTH * i for i in range(count + 1)], context_lens=[LENGTH] * count,
                      block_tables=[torch.tensor([i]) for i in range(count)],
                      logits_indices=torch.arange(LENGTH * count), lora=LoraBatch(groups, pool.a, pool.b))
    return model.compute_logits(model(ids.reshape(-1), ctx)).view(count, LENGTH, -1)


def peft_logits(base_dir, adapter_dir, ids):
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        return model.eval()(ids).logits


def test_mixed_adapter_batch_equals_peft_per_adapter(tiny, tiny_model_dir, varied_adapters):
    model, args = tiny
    pool = AdapterPool(args, num_pages=96)
    keys = [None] + [spec.name for spec in VARIED_SPECS] + [VARIED_SPECS[0].name]
    for spec in VARIED_SPECS:
        pool.load(spec.name, load_adapter_folder(varied_adapters[spec.name], args))
    ids = torch.randint(0, args.vocab_size, (len(keys), LENGTH), generator=torch.Generator().manual_seed(5))
    got = packed_logits(model, args, ids, pool, keys)
    base = peft_logits(tiny_model_dir, None, ids[:1])[0]
    torch.testing.assert_close(got[0], base, atol=1e-4, rtol=0)
    for i, key in enumerate(keys[1:], start=1):
        expected = peft_logits(tiny_model_dir, varied_adapters[key], ids[i:i + 1])[0]
        assert (expected - peft_logits(tiny_model_dir, None, ids[i:i + 1])[0]).abs().max() > 1e-2, \
            f"{key} must change the output, or this test proves nothing"
        torch.testing.assert_close(got[i], expected, atol=1e-4, rtol=0, msg=f"adapter {key}")


def test_lru_eviction_spares_referenced_and_pinned_adapters(tiny, varied_adapters):
    _, args = tiny
    weights = {name: load_adapter_folder(path, args) for name, path in varied_adapters.items()}
    pool = AdapterPool(args, num_pages=24)  # fin 2 + legal 4 + health 8 + games 6 = 20 pages
    for name in ("fin", "legal", "health", "games"):
        pool.load(name, weights[name])
    pool.acquire("fin")
    pool.set_pinned("legal", True)
    pool.acquire("health")
    pool.release("health")  # health is now the most recently used, unreferenced
    pool.load("retail", weights["retail"])  # 16 pages: 4 free -> evict games (6), then health (8)
    assert {a.key for a in pool.resident()} == {"fin", "legal", "retail"}
    assert pool.counters.evictions == 2
    with pytest.raises(ResourceExhausted, match="needs 32 pages; the pool has 24"):
        pool.load("travel", weights["travel"])
    pool.acquire("retail")
    with pytest.raises(ResourceExhausted, match="adapter pool full"):
        pool.load("health", weights["health"])  # 8 pages: 2 free, everything else referenced or pinned
    pool.release("retail")
    with pytest.raises(FailedPrecondition, match="used by 1 running"):
        pool.evict("fin")
    pool.release("fin")
    pool.evict("fin")
    assert pool.num_free_pages == 24 - 4 - 16


def test_reused_pages_carry_no_residue(tiny, tiny_model_dir, varied_adapters):
    model, args = tiny
    weights = {name: load_adapter_folder(path, args) for name, path in varied_adapters.items()}
    pool = AdapterPool(args, num_pages=32)
    pool.load("travel", weights["travel"])  # all seven modules, all 32 pages
    pool.evict("travel")
    pool.load("fin", weights["fin"])  # only q_proj and v_proj, on pages travel used
    ids = torch.randint(0, args.vocab_size, (1, LENGTH), generator=torch.Generator().manual_seed(9))
    got = packed_logits(model, args, ids, pool, ["fin"])
    torch.testing.assert_close(got[0], peft_logits(tiny_model_dir, varied_adapters["fin"], ids)[0], atol=1e-4, rtol=0)
    unused = [m for m in pool.a if m not in weights["fin"].target_modules]
    pages = pool.get("fin").pages
    assert all(pool.a[m][:, pages].abs().sum() == 0 and pool.b[m][:, pages].abs().sum() == 0 for m in unused)


def _copy(adapter_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(adapter_dir, target)
    return target


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t, c: t.update({k: v[:, :-1] for k, v in t.items() if "lora_A" in k}), "expected"),
        (lambda t, c: t.update({k: torch.full_like(v, float("nan")) for k, v in t.items()}), "NaN or Inf"),
        (lambda t, c: t.update({"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight":
                                next(iter(t.values())).clone()}), "layer 9 does not exist"),
        (lambda t, c: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 2)}), "unsupported tensor"),
        # fin is r=2: a pattern giving its q_proj rank 4 disagrees with the weights' shapes.
        (lambda t, c: c.update({"rank_pattern": {"q_proj": 4}}),
         r"expected \(4, 64\) \(r from rank_pattern key 'q_proj'\)"),
        (lambda t, c: c.update({"alpha_pattern": {"(q_proj": 4}}), r"alpha_pattern key '\(q_proj': is not a valid"),
        (lambda t, c: c.update({"peft_type": "IA3"}), "peft_type must be LORA"),
    ],
)
def test_bad_adapters_are_refused_with_a_reason(tiny, varied_adapters, tmp_path, mutate, message):
    _, args = tiny
    folder = _copy(varied_adapters["fin"], tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    mutate(tensors, config)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidArgument, match=message):
        load_adapter_folder(folder, args)


def test_pickled_adapters_are_never_loaded(tiny, varied_adapters, tmp_path):
    _, args = tiny
    folder = _copy(varied_adapters["fin"], tmp_path)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(InvalidArgument, match="pickled .bin is never loaded"):
        load_adapter_folder(folder, args)
