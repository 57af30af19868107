"""What a caller of a real Inference node sees at the edges of adapter admission: adapters that
can never fit (another base model, a rank above the pool, a pool held by pins), pins that
survive refused evictions, adapters whose bytes changed under the same id, and malformed
inputs that used to surface as INTERNAL or as the wrong status."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path

import grpc
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.common.pb.loraplex.inference.v1 import inference_pb2 as pb
from tests.inference.test_oracle import NEW_TOKENS, hf_greedy
from tests.inference.test_servicer import collect, greedy, serve_and_run


@pytest.fixture
def adapter_root(varied_adapters, tmp_path) -> Path:
    """A private copy: some tests change adapters on disk."""
    root = tmp_path / "adapters"
    for name, folder in varied_adapters.items():
        shutil.copytree(folder, root / name)
    return root


def sha256_of(folder: Path) -> str:
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()


async def status_of(awaitable) -> grpc.aio.AioRpcError:
    """The error an RPC ends with; a call that hangs fails the test instead of blocking it."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(awaitable, timeout=60)
    return caught.value


def generate(stub, adapter_id: str = "", sha256: str = "", **sampling):
    return collect(stub.Generate(pb.GenerateRequest(prompt="the market is", sampling=greedy(**sampling),
                                                    adapter=pb.AdapterRef(adapter_id=adapter_id, sha256=sha256))))


def test_an_empty_conversation_is_invalid_argument(tiny_model_dir, adapter_root):
    """The chat template raises on no messages: that used to reach the caller as INTERNAL."""
    async def body(stub, app):
        error = await status_of(collect(stub.Generate(pb.GenerateRequest(messages=gen.ChatMessages()))))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "at least one message" in error.details()

    serve_and_run(tiny_model_dir, adapter_root, body)


def test_adapter_digests_are_checked_for_form_and_compared_case_blind(tiny_model_dir, adapter_root):
    async def body(stub, app):
        error = await status_of(generate(stub, "fin", "zz", max_tokens=2))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "adapter.sha256" in error.details()
        replies = await generate(stub, "fin", sha256_of(adapter_root / "fin").upper(), max_tokens=2)
        assert replies[-1].delta.usage.completion_tokens == 2

    serve_and_run(tiny_model_dir, adapter_root, body)


def test_an_adapter_built_for_another_base_model_is_failed_precondition(tiny_model_dir, adapter_root):
    """The request is well formed; the adapter cannot run here (proto: FAILED_PRECONDITION)."""
    tensors = load_file(adapter_root / "fin" / "adapter_model.safetensors")
    other = adapter_root / "wider"  # as if trained on a base with twice the hidden size
    other.mkdir()
    shutil.copy(adapter_root / "fin" / "adapter_config.json", other)
    save_file({name: torch.zeros(t.shape[0], 2 * t.shape[1]) if "lora_A" in name else torch.zeros(2 * t.shape[0],
                                                                                                  t.shape[1])
               for name, t in tensors.items()}, other / "adapter_model.safetensors")

    async def body(stub, app):
        load = stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="wider"))
        for call in (generate(stub, "wider", max_tokens=2), load):
            error = await status_of(call)
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "base model" in error.details()

    serve_and_run(tiny_model_dir, adapter_root, body)


def test_an_adapter_bigger_than_the_pool_is_refused_instead_of_waiting_forever(tiny_model_dir, adapter_root):
    """travel has rank 32; a pool of 16 pages can never hold it. Its request used to queue for
    good (and, once starving, pause every other adapter's admissions)."""
    async def body(stub, app):
        error = await status_of(generate(stub, "travel", max_tokens=2))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "16 pages" in error.details()
        assert (await stub.GetStats(pb.GetStatsRequest())).waiting_requests == 0
        replies = await generate(stub, "retail", max_tokens=2)  # rank 16: fits exactly
        assert replies[-1].delta.usage.completion_tokens == 2

    serve_and_run(tiny_model_dir, adapter_root, body, adapter_pool_pages=16)


def test_a_pool_held_by_pins_refuses_adapters_that_cannot_fit(tiny_model_dir, adapter_root):
    """Five pages, four pinned by legal: fin (rank 2) cannot be admitted until the pin goes, so it
    is refused with RESOURCE_EXHAUSTED (the router can place it elsewhere) rather than queued."""
    async def body(stub, app):
        await stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="legal", pin=True))
        error = await status_of(generate(stub, "fin", max_tokens=2))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned" in error.details()
        assert (await generate(stub, "legal", max_tokens=2))[-1].delta.usage.completion_tokens == 2
        await stub.EvictAdapter(pb.EvictAdapterRequest(adapter_id="legal", unpin=True))
        assert (await generate(stub, "fin", max_tokens=2))[-1].delta.usage.completion_tokens == 2

    serve_and_run(tiny_model_dir, adapter_root, body, adapter_pool_pages=5)


def test_a_refused_eviction_leaves_the_pin_in_place(tiny_model_dir, adapter_root):
    async def body(stub, app):
        async def legal_slot():
            listed = await stub.ListAdapters(pb.ListAdaptersRequest())
            return next(s for s in listed.adapters if s.adapter_id == "legal")

        await stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="legal", pin=True))
        error = await status_of(stub.EvictAdapter(pb.EvictAdapterRequest(adapter_id="legal")))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "pinned" in error.details()
        slot = await legal_slot()
        assert (slot.tier, slot.pinned) == (pb.ADAPTER_TIER_DEVICE, True)

        call = stub.Generate(pb.GenerateRequest(prompt="x", adapter=pb.AdapterRef(adapter_id="legal"),
                                                sampling=greedy(max_tokens=400, ignore_eos=True)))
        await call.read()
        error = await status_of(stub.EvictAdapter(pb.EvictAdapterRequest(adapter_id="legal", unpin=True)))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "running requests" in error.details()
        assert (await legal_slot()).pinned  # the refused call dropped nothing
        call.cancel()

    serve_and_run(tiny_model_dir, adapter_root, body)


def test_a_request_naming_new_bytes_runs_with_them_not_the_resident_copy(tiny_model_dir, adapter_root):
    """legal is resident; its folder then holds other weights. A request naming the new digest
    used to run with the stale device copy; it must match HF + PEFT on the new weights."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt_ids = tokenizer.encode("the market is")

    async def body(stub, app):
        await stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="legal", pin=True))
        shutil.rmtree(adapter_root / "legal")
        shutil.copytree(adapter_root / "games", adapter_root / "legal")
        new = sha256_of(adapter_root / "legal")
        replies = await generate(stub, "legal", new, max_tokens=NEW_TOKENS, ignore_eos=True)
        slot = next(s for s in (await stub.ListAdapters(pb.ListAdaptersRequest())).adapters
                    if s.adapter_id == "legal" and s.tier == pb.ADAPTER_TIER_DEVICE)
        assert (slot.sha256, slot.rank, slot.pinned) == (new, 6, True)  # replaced, pin kept
        return [t for r in replies for t in r.delta.token_ids]

    served = serve_and_run(tiny_model_dir, adapter_root, body)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_root / "legal")
    expected, _ = hf_greedy(model.eval(), prompt_ids)
    assert served == expected
