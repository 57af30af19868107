"""Compile the Triton kernels for the H200 (sm_90) without a GPU, with triton's own ptxas.

The interpreter the CPU tests use accepts what the GPU compiler may not (tl.dot dims under
16, odd layouts) and cannot run bf16 dots, so test_triton_lora_compile.py and
test_triton_attention.py also build real PTX and cubins with the argument types a launch on
the GPU would see. Compiling needs triton imported without TRITON_INTERPRET, which
tests/conftest.py sets for the whole test session on machines without a GPU, so tests call
`run_in_fresh_process`: it runs one of the check_* functions below in a new interpreter with
the variable removed.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_in_fresh_process(check: str, *args, cache_dir: Path) -> None:
    """Run `check(*args)` from this module in a subprocess without TRITON_INTERPRET (args are
    repr'd into the command line); fail with its stderr. Skips without triton or its NVIDIA
    backend."""
    pytest.importorskip("triton", reason="triton is not installed")
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    code = f"from tests.inference import sm90_compile; sm90_compile.{check}(*{args!r})"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]


def compile_sm90(kernel, constexprs: dict, pointer_types: dict, options: dict, *, unit_strides=(),
                 scalar_types: dict | None = None, divisible_scalars=()):
    """Compile `kernel` (a triton.jit kernel or its plain function) for sm_90 as a launch on
    the GPU specialises it: `constexprs` as given, `unit_strides` folded to the constant 1,
    pointers (types from `pointer_types`) and the other strides 16-divisible (what the JIT
    marks for torch tensors of 4096-wide rows) unless the kernel leaves them unspecialized,
    like `divisible_scalars`; other scalars i32 unless `scalar_types` says otherwise."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    assert not triton.knobs.runtime.interpret, "compile in a process without TRITON_INTERPRET (run_in_fresh_process)"
    jit = kernel if isinstance(kernel, JITFunction) else triton.jit(kernel)
    unspecialized = {jit.arg_names[i] if isinstance(i, int) else i for i in jit.do_not_specialize}
    signature, constants, divisible = {}, dict(constexprs), []
    for index, name in enumerate(jit.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in unit_strides:
            signature[name], constants[name] = "constexpr", 1
        elif name.endswith("_ptr"):
            signature[name] = pointer_types[name]
            divisible.append(index)
        else:
            signature[name] = (scalar_types or {}).get(name, "i32")
            if (name.startswith("stride") or name in divisible_scalars) and name not in unspecialized:
                divisible.append(index)
    source = ASTSource(jit, signature, constexprs=constants,
                       attrs={(index,): [["tt.divisibility", 16]] for index in divisible})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def uses_tensor_cores(compiled) -> bool:
    return "mma.sync" in compiled.asm["ptx"] or "wgmma" in compiled.asm["ptx"]


def cuobjdump(compiled, flag: str) -> str:
    """What triton's bundled cuobjdump prints for the kernel's cubin with `flag`."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(compiled.asm["cubin"])
        file.flush()
        return subprocess.run([triton.knobs.nvidia.cuobjdump.path, flag, file.name],
                              capture_output=True, text=True, check=True).stdout


def stack_bytes(compiled) -> int:
    """The kernel's stack frame (register spills)."""
    return int(cuobjdump(compiled, "--dump-resource-usage").split("STACK:")[1].split()[0])


def loads_16_bytes_at_once(compiled) -> bool:
    """Whether the SASS has 16-byte global loads (LDG.E.128, or cp.async's LDGSTS.E.BYPASS.128):
    what a tile's row pieces should be read with, rather than one 2-byte element at a time."""
    return any(word.startswith(("LDG", "LDGSTS")) and word.endswith(".128")
               for word in cuobjdump(compiled, "-sass").split())


LORA_SHAPES = [("bf16", 16, 16), ("bf16", 16, 64), ("bf16", 64, 64), ("fp16", 32, 32)]  # dtype, BLOCK_M, BLOCK_R


def check_lora_kernels() -> None:
    """Both LoRA kernels (kernels/triton_lora_kernels.py) for each of LORA_SHAPES, 128-wide
    K blocks, 128-wide N blocks and 256 for decode tiles (the bench sweeps it): fail unless each
    uses the tensor cores (mma.sync for 16-row tiles, wgmma from 64) without spills, reading 16
    bytes a load."""
    from services.inference.kernels import triton_lora_kernels as kernels
    from services.inference.kernels.triton_lora import default_splits_per_load

    for (dtype, block_m, block_r), block_n in itertools.product(LORA_SHAPES, (128, 256)):
        if block_n > 128 and block_m > 16:  # the wider out blocks are swept for decode tiles only
            continue
        for kernel, options in ((kernels.lora_shrink_kernel, {"num_warps": 4, "num_stages": 3}),
                                (kernels.lora_expand_kernel, {"num_warps": 4})):
            constexprs = {"BLOCK_M": block_m, "BLOCK_R": block_r, "BLOCK_K": 128, "BLOCK_N": block_n,
                          "SPLITS_PER_LOAD": default_splits_per_load(block_m, block_r),
                          "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
            pointer_types = {name: ("*fp32" if name == "partial_ptr" or name.startswith("tile_scales")
                                    else "*i32" if name.startswith("tile_") else f"*{dtype}")
                             for name in kernel.arg_names if name.endswith("_ptr")}
            # Widths and column offsets: multiples of 16 in every Llama, and the JIT marks them so.
            compiled = compile_sm90(kernel, {k: v for k, v in constexprs.items() if k in kernel.arg_names},
                                    pointer_types, options,
                                    divisible_scalars=("k_per_split", "in_features", "out0", "out1", "out2",
                                                       "column1", "column2"),
                                    unit_strides=("stride_xk", "stride_ak", "stride_yn", "stride_bn"))
            where = f"{kernel.fn.__name__} {dtype} BLOCK_M={block_m} BLOCK_R={block_r} BLOCK_N={block_n}"
            assert uses_tensor_cores(compiled), f"{where}: no tensor cores"
            assert stack_bytes(compiled) == 0, f"{where}: registers spill to local memory"
            assert loads_16_bytes_at_once(compiled), f"{where}: no 16-byte loads (x, A, B or y element by element)"


def check_decode_kernels(dtype: str, group: int, head_dim: int, split: bool) -> None:
    """The paged decode kernel (kernels/triton_attention.py), and the partition merge when
    `split`: the 16-bit dots must use the tensor cores, K and V come in 16-byte loads."""
    import triton

    from services.inference.kernels import triton_attention

    unit_strides = ("stride_qd", "stride_kd", "stride_vd", "stride_od")  # last-dim strides of contiguous heads
    partial = "*fp32" if split else f"*{dtype}"
    decode = compile_sm90(
        triton_attention._jitted(triton_attention._paged_decode_kernel),
        {"BLOCK_SIZE": 16, "GROUP": group, "GROUP_P": max(16, triton.next_power_of_2(group)), "HEAD_DIM": head_dim,
         "BLOCK_D": head_dim, "TILE_N": triton_attention._tile_tokens(head_dim), "SPLIT": split,
         "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"},
        {"q_ptr": f"*{dtype}", "k_cache_ptr": f"*{dtype}", "v_cache_ptr": f"*{dtype}", "block_tables_ptr": "*i32",
         "context_lens_ptr": "*i32", "out_ptr": f"*{dtype}", "partial_out_ptr": partial, "partial_lse_ptr": partial},
        {"num_warps": 4, "num_stages": 2}, unit_strides=unit_strides, scalar_types={"scale_log2": "fp32"})
    if dtype != "fp32":
        assert uses_tensor_cores(decode), "the decode dots do not use the tensor cores"
    assert loads_16_bytes_at_once(decode), "the decode kernel reads K and V element by element"
    if split:
        compile_sm90(triton_attention._jitted(triton_attention._merge_partitions_kernel),
                     {"HEAD_DIM": head_dim, "BLOCK_D": head_dim, "PARTITIONS_P": 32},
                     {"partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32", "out_ptr": f"*{dtype}"},
                     {"num_warps": 4}, unit_strides=unit_strides)


def launch_keys(kernels: dict, launch) -> dict[str, list[str]]:
    """What Triton's JIT would key its compiled-kernel cache on (argument specializations and
    options) for each launch of each of `kernels` (name -> jitted kernel) that `launch()`
    makes, computed for an H200 without one: the launches are caught before anything runs."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    keys: dict[str, list[str]] = {name: [] for name in kernels}

    def catch(name: str, kernel):
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)

        def run(*args, grid, warmup, **kwargs):
            _, specialization, options = binder(*args, **kwargs)
            keys[name].append(repr((specialization, sorted(options.items()))))
        return run

    for name, kernel in kernels.items():
        kernel.run = catch(name, kernel)  # shadows JITFunction.run for this process only
    launch()
    return keys


def check_lora_steps_share_compiled_kernels() -> None:
    """Steps of 1, 7, 16 and 48 one-token tiles, split 1, 2, 3 and 16: one compile key per kernel."""
    import torch

    from services.inference.kernels import triton_lora, triton_lora_kernels
    from services.inference.kernels.reference import Segment

    generator = torch.Generator().manual_seed(0)
    a_pages, b_pages = torch.randn(64, 4096, generator=generator), torch.randn(64, 1024, generator=generator)

    def steps() -> None:
        for num_tiles, split_k in ((1, 1), (7, 3), (16, 2), (48, 16), (16, 1)):
            segments = [Segment(t, t + 1, torch.arange(t, t + 16) % 64, 1.0) for t in range(num_tiles)]
            plan = triton_lora.build_lora_plan(segments, num_tiles, "cpu")
            x, y = torch.randn(num_tiles, 4096), torch.zeros(num_tiles, 1024)
            triton_lora.lora_shrink_expand(y, x, a_pages, b_pages, plan, split_k=split_k)

    kernels = {"shrink": triton_lora_kernels.lora_shrink_kernel, "expand": triton_lora_kernels.lora_expand_kernel}
    for name, keys in launch_keys(kernels, steps).items():
        assert len(keys) == 5 and len(set(keys)) == 1, f"{name}: {len(set(keys))} compile keys for 5 steps"


def check_decode_batches_share_compiled_kernels() -> None:
    """Decode batches with block tables 1, 7 and 16 wide unsplit, 48 and 64 wide in 12 and 16
    partitions: one compile key per kernel and split."""
    import torch

    from services.inference.kernels import triton_attention

    triton_attention._interpreting = lambda: True  # lets CPU tensors through to the caught launch
    generator = torch.Generator().manual_seed(0)
    cache = torch.randn(80, 16, 2, 64, generator=generator)

    def batches(shapes) -> None:
        for width, num_partitions in shapes:
            tables = torch.randint(0, 80, (2, width), dtype=torch.int32, generator=generator)
            lens = torch.tensor([width * 16, 1], dtype=torch.int32)
            q = torch.randn(2, 8, 64, generator=generator)
            triton_attention.paged_decode_attention(q, cache, cache, tables, lens, 0.125,
                                                    num_partitions=num_partitions)

    kernels = {"decode": triton_attention._jitted(triton_attention._paged_decode_kernel),
               "merge": triton_attention._jitted(triton_attention._merge_partitions_kernel)}
    for shapes in (((1, 1), (7, 1), (16, 1)), ((48, 12), (64, 16))):
        keys = launch_keys(kernels, lambda: batches(shapes))
        split = shapes[0][1] > 1
        assert len(keys["decode"]) == len(shapes) and len(keys["merge"]) == (len(shapes) if split else 0)
        for name in ("decode", "merge") if split else ("decode",):
            assert len(set(keys[name])) == 1, f"{name} (split {split}): {len(set(keys[name]))} compile keys"


def check_prefill_kernel(dtype: str, group: int, head_dim: int, block_size: int) -> None:
    """The paged prefill kernel (kernels/triton_prefill_attention.py) at the tile shape the
    model runner launches for these heads: the 16-bit dots on the tensor cores, no spills, K and
    V in 16-byte loads."""
    from services.inference.kernels import triton_prefill_attention as prefill

    group_p = prefill._next_power_of_2(group)
    tile_tokens = prefill.prefill_tile_tokens(group, 1, head_dim)
    block_d = max(16, prefill._next_power_of_2(head_dim))
    compiled = compile_sm90(
        prefill._jitted(prefill._paged_prefill_kernel),
        {"BLOCK_SIZE": block_size, "GROUP": group, "GROUP_P": group_p, "TILE_TOKENS": tile_tokens,
         "HEAD_DIM": head_dim, "BLOCK_D": block_d, "TILE_N": prefill._tile_shape(head_dim)[1],
         "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"},
        {"q_ptr": f"*{dtype}", "k_cache_ptr": f"*{dtype}", "v_cache_ptr": f"*{dtype}", "block_tables_ptr": "*i64",
         "tiles_ptr": "*i32", "out_ptr": f"*{dtype}"},
        {"num_warps": prefill._num_warps(tile_tokens * group_p, block_d), "num_stages": 2},
        unit_strides=("stride_qd", "stride_kd", "stride_vd", "stride_od"), scalar_types={"scale_log2": "fp32"})
    where = f"prefill {dtype} group {group} head_dim {head_dim} block_size {block_size}"
    if dtype != "fp32":
        assert uses_tensor_cores(compiled), f"{where}: no tensor cores"
        assert stack_bytes(compiled) == 0, f"{where}: registers spill to local memory"
    assert loads_16_bytes_at_once(compiled), f"{where}: K and V read element by element"


def check_prefill_steps_share_compiled_kernel() -> None:
    """Steps with block tables 1, 7, 16 and 40 wide and 1 to 12 tiles: one compile key."""
    import torch

    from services.inference.kernels import triton_attention, triton_prefill_attention

    triton_attention._interpreting = lambda: True  # lets CPU tensors through to the caught launch
    generator = torch.Generator().manual_seed(0)
    cache = torch.randn(80, 16, 2, 64, generator=generator)

    def steps() -> None:
        for width, chunks in ((1, [(0, 0, 3, 9)]), (7, [(0, 0, 100, 110), (1, 100, 5, 64)]),
                              (16, [(1, 0, 256, 256)]), (40, [(0, 0, 17, 640), (1, 17, 2, 30)])):
            tables = torch.randint(0, 80, (2, width), dtype=torch.int64, generator=generator)
            total = sum(n for *_, n, _ in chunks)
            tiles = triton_prefill_attention.build_prefill_tiles(chunks, 32, "cpu")
            q = torch.randn(total, 8, 64, generator=generator)
            triton_prefill_attention.paged_prefill_attention(q, cache, cache, tables, tiles, 0.125)

    kernel = triton_prefill_attention._jitted(triton_prefill_attention._paged_prefill_kernel)
    keys = launch_keys({"prefill": kernel}, steps)["prefill"]
    assert len(keys) == 4 and len(set(keys)) == 1, f"prefill: {len(set(keys))} compile keys for 4 steps"
