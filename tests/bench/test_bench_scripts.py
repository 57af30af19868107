"""bench/kernels.py, bench/engine.py and bench/device_check.py run end to end (tiny shapes, no timing asserted).

GPU time is scarce (minutes per session), so the scripts a GPU session runs are exercised here
first: every path is built, checked against the reference, and reported; a broken variant
would show up as an error entry, not as lost device time.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_kernel_bench_smoke_checks_every_path_against_the_reference(tmp_path):
    out = tmp_path / "kernels.json"
    result = subprocess.run([sys.executable, "-m", "bench.kernels", "--device", "cpu", "--smoke", "--json", str(out)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["all_correct"] and report["machine"]["cpu_count"]
    lora = {name for case in report["lora"] for name in case["variants"]}
    attention = {name for case in report["attention"] for name in case["variants"]}
    assert {"reference_segments", "reference_gathered", "grouped_mm", "triton"} <= lora
    assert {"torch_padded_gather", "triton"} <= attention
    for case in report["lora"] + report["attention"]:
        assert case["floor_us"] > 0
        for name, variant in case["variants"].items():
            assert "error" not in variant, (case["case"], name, variant)
            assert variant["correct"] and variant["us"] > 0 and variant["x_floor"] > 0


def test_device_check_leaves_a_summary_even_when_steps_fail(tmp_path):
    """Here there is no GPU, so every CUDA step fails: the summary must still say which and why."""
    result = subprocess.run([sys.executable, "-m", "bench.device_check", str(tmp_path / "out"),
                             "--budget-seconds", "120", "--steps", "gpu,kernels,engine"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [step["step"] for step in summary] == ["gpu", "kernels", "engine"]
    assert all(step["status"] != "passed" for step in summary)
    assert (tmp_path / "out" / "kernels.log").read_text()  # the reason is kept


def test_engine_bench_runs_every_variant_on_a_tiny_model(tmp_path):
    out = tmp_path / "engine.json"
    result = subprocess.run([sys.executable, "-m", "bench.engine", "--device", "cpu", "--preset", "tiny", "--adapters",
                             "3", "--batch", "4", "--prompt-len", "12", "--gen-len", "4", "--hf-gen-len", "2",
                             "--repeat", "1", "--json", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ours_adapters"]["tokens"] == 16 and report["ours_base"]["tokens"] == 16
    assert report["hf_peft_mixed"]["tokens"] == 8 and report["hf_peft_single"]["tokens"] == 8
    assert 0 < report["ratios"]["byte_bound"] < 1 and report["adapter_bytes_distinct"] > 0
