"""One tenant's adapter cannot change another tenant's tokens through the shared KV cache.

An adapter may hold any finite weights (the Registry checks finiteness, not size), and large
ones overflow: its sequence's keys and values become Inf/NaN. Those stay in its blocks after
it finishes. The PyTorch decode path pads short contexts with slot 0 and masks the padding,
but a masked 0 x Inf is still NaN, so whoever held block 0 last decided the output of every
shorter row decoding beside a longer one: other tenants' and the base model's alike.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from services.inference.config import InferenceConfig
from services.inference.engine.sampling_params import SamplingParams
from services.inference.node import Node, Prompt
from tests.inference.peft_adapters import AdapterSpec, build_peft_adapter

SHORT, LONG = "the market is", "a contract says that the parties agree to the following terms"


def _overflowing_adapter(base: Path, folder: Path) -> None:
    """A PEFT adapter the Registry accepts (every weight finite) whose v_proj output overflows."""
    build_peft_adapter(base, folder, AdapterSpec("evil", 4, 8, ("v_proj",), seed=2))
    weights = load_file(folder / "adapter_model.safetensors")
    weights = {name: tensor * 1e30 for name, tensor in weights.items()}
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})


def test_an_overflowing_adapter_leaves_other_requests_tokens_unchanged(tiny_model_dir, tmp_path):
    adapters = tmp_path / "adapters"
    build_peft_adapter(tiny_model_dir, adapters / "good", AdapterSpec("good", 4, 8, ("q_proj", "v_proj"), seed=1))
    _overflowing_adapter(tiny_model_dir, adapters / "evil")
    node = Node.build(InferenceConfig(base_model=tiny_model_dir, adapter_dir=adapters, kv_cache_mb=4, device="cpu",
                                      dtype="float32", adapter_pool_pages=32, max_num_seqs=8))
    sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    async def tokens(prompt: str, adapter: str) -> list[int]:
        return [t async for output in node.generate(Prompt(text=prompt), sampling, adapter) for t in output.token_ids]

    async def scenario():
        node.start()
        try:
            # First on a fresh node, the attacker's request is given block 0; its Inf/NaN values
            # stay there after it ends (freed blocks go to the back of the free list).
            assert set(await tokens(LONG, "evil")) == {0}  # its own output is garbage, which is its business
            alone = [await tokens(SHORT, "good"), await tokens(SHORT, ""), await tokens(LONG, "good")]
            # Decoding together, the two short requests are padded to the long one's context.
            together = await asyncio.gather(tokens(SHORT, "good"), tokens(SHORT, ""), tokens(LONG, "good"))
            return alone, list(together)
        finally:
            node.close()

    alone, together = asyncio.run(scenario())
    assert together == alone
