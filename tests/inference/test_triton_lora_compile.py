"""The Triton LoRA kernels (kernels/triton_lora_kernels.py) compile for the H200 (sm_90).

test_triton_lora.py checks them under the interpreter, which accepts what the GPU would not
(tl.dot dims under 16, odd layouts) and cannot do bf16 dots. Here triton compiles them for
sm_90 with its own ptxas, no GPU needed, in a process without TRITON_INTERPRET (see
sm90_compile.py).
"""

from __future__ import annotations

from tests.inference.sm90_compile import run_in_fresh_process


def test_kernels_compile_for_hopper(tmp_path):
    """Both kernels, bf16 and fp16, 16- to 64-row tiles, ranks padded to 16..64: tensor cores, no spills."""
    run_in_fresh_process("check_lora_kernels", cache_dir=tmp_path)


def test_steps_of_any_tile_count_share_the_compiled_kernels(tmp_path):
    """The JIT's cache keys for an H200, computed here: the tile count and split of a step pick no
    new compile (a new one would stall serving for seconds)."""
    run_in_fresh_process("check_lora_steps_share_compiled_kernels", cache_dir=tmp_path)
