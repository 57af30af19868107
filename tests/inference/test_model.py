"""Our Llama-family forward against HF transformers on the same checkpoint: packed ragged
batches, paged KV cache, chunked prefill mixed with decode, every supported architecture."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.common.errors import InvalidArgument
from services.common.tiny_model import build_model_folder
from services.inference.model.config import load_model_args
from services.inference.model.context import StepContext
from services.inference.model.loader import load_model

BLOCK = 4


def allocate_cache(model, args, num_blocks=32):
    for layer in model.attention_layers():
        layer.k_cache = torch.zeros(num_blocks, BLOCK, args.num_kv_heads, args.head_dim)
        layer.v_cache = torch.zeros_like(layer.k_cache)


def run_step(model, ids, tables, chunks):
    """chunks: (sequence index, first token, end token) run together in one packed step."""
    tokens, positions, slots, cu, lens = [], [], [], [0], []
    for seq, start, end in chunks:
        tokens.append(ids[seq, start:end])
        positions += range(start, end)
        slots += [int(tables[seq][p // BLOCK]) * BLOCK + p % BLOCK for p in range(start, end)]
        cu.append(cu[-1] + end - start)
        lens.append(end)
    ctx = StepContext(positions=torch.tensor(positions), slot_mapping=torch.tensor(slots), cu_seqlens=cu,
                      context_lens=lens, block_tables=[tables[seq] for seq, _, _ in chunks],
                      logits_indices=torch.tensor(cu[1:]) - 1)
    return model.compute_logits(model(torch.cat(tokens), ctx)[ctx.logits_indices])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("tied", [False, True])
def test_packed_paged_forward_matches_transformers(arch, tied, tmp_path):
    folder = build_model_folder(tmp_path / arch, arch=arch, tie_word_embeddings=tied, seed=7)
    model, args = load_model(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, args.vocab_size, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits  # [2, 14, V]
    allocate_cache(model, args)
    tables = [torch.tensor([0, 1, 2, 3]), torch.tensor([9, 4, 17, 6])]  # scattered blocks
    got = run_step(model, ids, tables, [(0, 0, 8), (1, 0, 5)])  # two prefills of different lengths
    torch.testing.assert_close(got, torch.stack([expected[0, 7], expected[1, 4]]), atol=1e-4, rtol=0)
    got = run_step(model, ids, tables, [(0, 8, 9), (1, 5, 10)])  # a decode next to a prefill chunk
    torch.testing.assert_close(got, torch.stack([expected[0, 8], expected[1, 9]]), atol=1e-4, rtol=0)
    for position in range(10, 14):  # decode both, the first one lagging
        got = run_step(model, ids, tables, [(0, position - 1, position), (1, position, position + 1)])
        torch.testing.assert_close(got, torch.stack([expected[0, position - 1], expected[1, position]]),
                                   atol=1e-4, rtol=0)


def test_llama31_rope_scaling_matches_transformers(tmp_path):
    folder = build_model_folder(tmp_path / "m", seed=3)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64}
    (folder / "config.json").write_text(json.dumps(config))
    model, args = load_model(folder)
    assert args.rope_type == "llama3"
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, args.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
    allocate_cache(model, args)
    got = run_step(model, ids, [torch.arange(10)], [(0, 0, 40)])
    torch.testing.assert_close(got[0], expected[0, -1], atol=1e-4, rtol=0)


def test_sharded_checkpoints_load(tmp_path):
    folder = build_model_folder(tmp_path / "m")
    reference = AutoModelForCausalLM.from_pretrained(folder)
    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        (sharded / name).write_bytes((folder / name).read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file()
    model, _ = load_model(sharded)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, reference.model.layers[1].mlp.down_proj.weight)


def test_unsupported_or_broken_checkpoints_are_refused_clearly(tmp_path):
    with pytest.raises(InvalidArgument, match="config.json is missing"):
        load_model_args(tmp_path)
    folder = build_model_folder(tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "elsewhere.safetensors")
    with pytest.raises(InvalidArgument, match="no model.safetensors"):
        load_model(folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidArgument, match="rope type 'yarn' is not supported"):
        load_model_args(folder)
