"""A local adapter whose adapter_config.json is edited under the same weights (alpha, rsLoRA,
patterns) computes something else: once the node reads the new config, neither the device copy
loaded under the old one nor KV cached with it may serve it (LoraWeights.fingerprint)."""

from __future__ import annotations

import asyncio
import json
import shutil

from services.inference.config import InferenceConfig
from services.inference.engine.sampling_params import SamplingParams
from services.inference.node import Node, Prompt
from services.inference.pool_admin import PoolAdmin

#: Long enough for whole KV blocks (16 tokens each), which the prefix cache keeps.
PROMPT = "the market opened higher today while bonds slipped and the central bank " * 2


def build(model_dir, root) -> Node:
    return Node.build(InferenceConfig(base_model=model_dir, adapter_dir=root, kv_cache_mb=2, adapter_pool_pages=64,
                                      block_size=16))


async def ask(node: Node, key: str) -> tuple[list[int], int]:
    sampling = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outputs = [o async for o in node.generate(Prompt(text=PROMPT), sampling, key, cache_scope="t")]
    return [t for o in outputs for t in o.token_ids], outputs[-1].cached_prompt_tokens


def edit_alpha(folder, factor: float) -> None:
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["lora_alpha"] = config["lora_alpha"] * factor
    config_file.write_text(json.dumps(config))


def test_an_edited_config_replaces_the_resident_copy_and_its_cached_prefixes(tiny_model_dir, varied_adapters,
                                                                            tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(varied_adapters["legal"], root / "legal")
    node = build(tiny_model_dir, root)

    async def run():
        node.start()
        try:
            before, _ = await ask(node, "legal")
            _, cached = await ask(node, "legal")
            assert cached > 0  # the prompt's blocks are cached for this adapter
            edit_alpha(root / "legal", 8.0)
            # The host tier dropped its copy (as its LRU does); an operator reloads the adapter.
            assert node.manager.drop_host("legal")
            await PoolAdmin(node).load("legal", pin=False)
            after, cached_after = await ask(node, "legal")
            return before, after, cached_after
        finally:
            node.close()

    before, after, cached_after = asyncio.run(run())
    assert cached_after == 0  # KV computed with the old scaling is not read back
    fresh = build(tiny_model_dir, root)  # a node that only ever saw the new config

    async def fresh_run():
        fresh.start()
        try:
            return (await ask(fresh, "legal"))[0]
        finally:
            fresh.close()

    expected = asyncio.run(fresh_run())
    assert after == expected
    assert after != before  # the edit matters: alpha x8 changes the greedy tokens
