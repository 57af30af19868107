"""An adapter's host form (services/inference/adapters/weights.py): parsed straight into the
pool's dtype and layout, it puts in the pages exactly what a float32 parse converted on its way
in puts there, scale folds of per-module patterns included, and it refuses values the pool's
dtype cannot hold, naming the tensor."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.errors import InvalidArgument
from services.inference.adapters.manager import parse_runner
from services.inference.adapters.pool import AdapterPool
from services.inference.adapters.weights import load_adapter_folder, parse_adapter
from services.inference.model.config import load_model_args
from tests.inference.test_rank_pattern_oracle import PATTERNED, _build

HALF_DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def args(tiny_model_dir):
    return load_model_args(tiny_model_dir)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, varied_adapters, tmp_path_factory):
    """The varied adapters (uniform scales, some modules absent) and one whose per-module
    alphas and ranks fold a scale into B and pad with zeros."""
    patterned = _build(tiny_model_dir, tmp_path_factory.mktemp("host_form") / "rslora", PATTERNED["rslora"], seed=3)
    return {**varied_adapters, "rslora": patterned}


def _parse(folder, args, dtype):
    return parse_adapter((folder / "adapter_config.json").read_text(),
                         (folder / "adapter_model.safetensors").read_bytes(), args, dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_parsed_in_the_pools_dtype_the_pages_hold_what_a_float32_parse_converted_gives(args, adapters, dtype):
    direct, converted = (AdapterPool(args, num_pages=128, dtype=dtype) for _ in range(2))
    for name, folder in adapters.items():
        host = _parse(folder, args, dtype)
        wide = _parse(folder, args, torch.float32)
        assert {t.dtype for t in (*host.a.values(), *host.b.values())} == {dtype}
        assert 2 * host.nbytes == wide.nbytes and host.fingerprint == wide.fingerprint
        direct.load(name, host)
        converted.load(name, wide)  # converted to dtype by the copy into the pages
    assert {adapter.key for adapter in direct.resident()} == set(adapters)  # room for all: none evicted
    for module in direct.a:
        assert torch.equal(direct.a[module], converted.a[module]), module
        assert torch.equal(direct.b[module], converted.b[module]), module
    # Not vacuous: the rslora adapter's folded scales and every target module reached the pages.
    for module in ("o_proj", "gate_proj", "up_proj"):
        assert direct.b[module][:, direct.get("rslora").pages].abs().sum() > 0


def _with_value(folder, tmp_path, name: str, value: float):
    """A copy of the adapter folder whose tensor `name` holds `value` at one element."""
    target = tmp_path / "edited"
    shutil.copytree(folder, target)
    tensors = load_file(target / "adapter_model.safetensors")
    tensors[name] = tensors[name].float().clone()
    tensors[name][0, 1] = value
    save_file(tensors, target / "adapter_model.safetensors")
    return target


def test_a_value_beyond_the_pools_dtype_is_refused_naming_its_tensor(args, adapters, tmp_path):
    name = "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"
    folder = _with_value(adapters["rslora"], tmp_path, name, 1e6)  # float32 holds it; float16 tops out at 65504
    assert _parse(folder, args, torch.float32).b["o_proj"].abs().max() >= 1e5
    with pytest.raises(InvalidArgument, match=f"^{name}: values beyond the range of torch.float16"):
        _parse(folder, args, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES], ids=str)
@pytest.mark.parametrize("value", [float("nan"), float("-inf")], ids=str)
def test_a_nan_or_inf_in_one_tensor_is_refused_naming_it(args, adapters, tmp_path, dtype, value):
    name = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    folder = _with_value(adapters["rslora"], tmp_path, name, value)
    with pytest.raises(InvalidArgument, match=f"^{name}: contains NaN or Inf$"):
        _parse(folder, args, dtype)


def test_a_folder_loads_in_float32_by_default(args, adapters):
    weights = load_adapter_folder(adapters["rslora"], args)
    assert {t.dtype for t in (*weights.a.values(), *weights.b.values())} == {torch.float32}
    assert weights.a["o_proj"].shape == (args.num_layers, weights.rank, args.num_heads * args.head_dim)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and a device's queue need a GPU")
def test_a_load_into_a_gpu_pool_queues_its_copies_without_waiting_for_the_device(args, adapters):
    """The engine thread runs the load between steps: a copy that waited for the device would
    hold every running request's next token for the transfer (and, with steps overlapped, for
    the queued step's forward)."""
    pool = AdapterPool(args, num_pages=128, dtype=torch.bfloat16, device="cuda")
    parsed = {name: parse_adapter((folder / "adapter_config.json").read_text(),
                                  (folder / "adapter_model.safetensors").read_bytes(), args, torch.bfloat16,
                                  pin_memory=True) for name, folder in adapters.items()}
    assert all(t.is_pinned() for weights in parsed.values() for t in (*weights.a.values(), *weights.b.values()))
    busy = torch.randn(4096, 4096, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):  # queued work the loads must not wait for
            torch.mm(busy, busy)
        for name, weights in parsed.items():
            pool.load(name, weights)
        pool.evict("fin")
        pool.load("fin again", parsed["fin"])  # into reused pages
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert {adapter.key for adapter in pool.resident()} == set(parsed) - {"fin"} | {"fin again"}
    for name, weights in {**parsed, "fin again": parsed["fin"]}.items():
        if name == "fin":
            continue
        pages = pool.get(name).pages
        for module, host in weights.a.items():
            assert torch.equal(pool.a[module][:, pages].cpu(), host) and \
                torch.equal(pool.b[module][:, pages].cpu(), weights.b[module]), (name, module)


def test_a_cuda_node_parses_beside_its_engine_thread_and_a_cpu_node_between_steps():
    def engine_call(fn):
        raise AssertionError("not called here")

    assert parse_runner(torch.device("cpu"), engine_call) is engine_call
    assert parse_runner(torch.device("cuda", 0), engine_call) is asyncio.to_thread
