"""The bench scripts (kernels, engine, device_check, adapter_load, ...) run end to end (tiny shapes, no timing).

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
    assert {"reference_segments", "reference_gathered", "grouped_mm", "triton", "triton_tiles32", "triton_tiles64",
            "triton_per_projection", "triton_slices",  # q|k|v apart and in one launch
            "triton_serial_splits", "triton_n256",  # the expand's knobs
            "gemm_then_lora_graph_plan", "shrink_beside_gemm_graph_plan",  # with the layer's GEMM
            "lora_beside_gemm_graph_plan"} <= lora
    # with the split sweep
    assert {"torch_padded_gather", "triton", "triton_partitions1", "triton_partitions32"} <= attention
    prefill = {name for case in report["prefill_attention"] for name in case["variants"]}
    assert {"torch_per_sequence", "triton"} <= prefill  # chunks after cached context: loop vs paged kernel
    for case in report["lora"] + report["attention"] + report["prefill_attention"]:
        assert case["floor_us"] > 0
        for name, variant in case["variants"].items():
            assert "error" not in variant, (case["case"], name, variant)
            assert variant["correct"] and variant["us"] > 0 and variant["x_floor"] > 0
    assert all(variant["tflops"] > 0 for case in report["prefill_attention"] for variant in case["variants"].values())


def test_device_check_leaves_a_summary_even_when_steps_fail(tmp_path):
    """Here there is no GPU, so every CUDA step fails: the summary must still say which and why."""
    result = subprocess.run([sys.executable, "-m", "bench.device_check", str(tmp_path / "out"),
                             "--budget-seconds", "120", "--steps", "gpu,kernels,engine,engine_fallback"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [step["step"] for step in summary] == ["gpu", "engine", "engine_fallback", "kernels"]  # STEPS order
    assert all(step["status"] != "passed" for step in summary)
    assert (tmp_path / "out" / "kernels.log").read_text()  # the reason is kept
    # The engine step lost every target configuration (no CUDA): the fallback matrix was tried.
    assert '"because_the_engine_step_lost": ["b64_base", "b64_a16", "b64_a64"]' in result.stdout
    verdict = json.loads((tmp_path / "out" / "targets.json").read_text())  # issue #8's, from what was left
    assert [entry["status"].split(":")[0] for entry in verdict["targets"]] == ["not measured"] * 5
    assert "| not measured: no kernels.json |" in result.stdout


def test_every_engine_step_of_device_check_parses_its_flags(tmp_path):
    """On CPU those steps fail for want of CUDA whatever their flags say: a misspelt flag would
    only show on the GPU, costing its minutes. The fallback turns off the paths no GPU has run."""
    from bench import device_check, engine

    steps = {name: args for name, args, _ in device_check.STEPS if args[:2] == ["-m", "bench.engine"]}
    assert set(steps) == {"engine", "engine_fallback"}
    for name, args in steps.items():
        flags = [arg.replace("{out}", str(tmp_path)).replace("{budget}", "100") for arg in args[2:]]
        options = engine.engine_options(engine.parse_args(flags))
        assert options["kernels"] == "triton", name
    fallback = engine.engine_options(engine.parse_args([arg.replace("{out}", str(tmp_path)).replace("{budget}", "1")
                                                        for arg in steps["engine_fallback"][2:]]))
    assert (fallback["overlap_steps"], fallback["decode_lora_tuning"], fallback["decode_lora_beside_gemm"]) == (
        "off", "off", "off")


def test_engine_bench_runs_every_variant_on_a_tiny_model(tmp_path):
    out = tmp_path / "engine.json"
    result = subprocess.run([sys.executable, "-m", "bench.engine", "--device", "cpu", "--preset", "tiny", "--adapters",
                             "3", "--batch", "4", "--prompt-len", "12", "--gen-len", "4", "--hf-gen-len", "2",
                             "--repeat", "1", "--decode-lora-tuning", "off", "--json", str(out)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ours_adapters"]["tokens"] == 16 and report["ours_base"]["tokens"] == 16
    assert report["hf_peft_mixed"]["tokens"] == 8 and report["hf_peft_single"]["tokens"] == 8
    assert 0 < report["ratios"]["byte_bound"] < 1 and report["adapter_bytes_distinct"] > 0


MATRIX_SMOKE = ["-m", "bench.engine", "--device", "cpu", "--preset", "tiny", "--matrix", "--matrix-batches", "1,4",
                "--matrix-adapters", "1,4", "--prompt-len", "16", "--gen-len", "4", "--hf-batch", "4",
                "--hf-adapters", "2"]


def run_matrix_smoke(tmp_path, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    """The CPU matrix run with `flags`: the process, and the report it wrote with --json."""
    out = tmp_path / "engine.json"  # the name device_check gives the matrix's report
    result = subprocess.run([sys.executable, *MATRIX_SMOKE, *flags, "--json", str(out)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads(out.read_text())


def test_engine_matrix_measures_every_configuration_on_one_node(tmp_path):
    """--hf-adapters 2 is not in the matrix: our engine runs that configuration too, to compare."""
    _, report = run_matrix_smoke(tmp_path, "--bandwidth-gbs", "10", "--repeat", "2")
    assert report["skipped"] == [] and report["failed"] == []
    assert [run["name"] for run in report["ours_base"]] == ["b4_base", "b1_base"]  # the largest batch first
    assert [run["name"] for run in report["ours_adapters"]] == ["b4_a1", "b4_a2", "b4_a4", "b1_a1"]
    for run in report["ours_base"] + report["ours_adapters"]:
        assert run["tokens"] == run["batch"] * 4, run
        for figure in ("tokens_per_s", "decode_tokens_per_s", "ttft_p50_s", "ttft_max_s", "floor_tokens_per_s"):
            assert run[figure] > 0, (run["name"], figure)
        assert run["bytes_per_decode_step"] > report["model"]["base_bytes_read_per_step"]
        # Each configuration run twice, the faster kept, both rates reported.
        assert len(run["repeats_decode_tokens_per_s"]) == 2
        assert run["decode_tokens_per_s"] in run["repeats_decode_tokens_per_s"]
    assert [ratio["name"] for ratio in report["ratios"]] == ["b4_a1", "b4_a2", "b4_a4", "b1_a1"]
    for ratio in report["ratios"]:
        assert 0 < ratio["byte_bound"] < ratio["byte_bound_with_kv"] < 1
        assert ratio["adapters_over_base"] > 0 and ratio["fraction_of_byte_bound"] > 0
    load = report["adapter_load"]
    assert load["count"] == 4 and load["bytes_per_adapter"] == report["model"]["adapter_bytes"] > 0
    for figure in ("fetch_parse_ms", "host_to_device_ms", "resident_ms"):
        assert set(load[figure]) == {"mean", "p50", "max"} and load[figure]["max"] > 0
    hf = report["hf_peft_mixed"]
    assert (hf["batch"], hf["adapters"], hf["tokens"]) == (4, 2, 4 * 8)  # --hf-gen-len is 8 in matrix mode
    assert hf["decode_tokens_per_s"] > 0 and hf["ours_over_hf_mixed"] > 0
    hf_ratio = hf["ours_over_hf_mixed"]
    assert report["copy_bandwidth_source"] == "flag"
    steps = report["engine_steps"]  # CPU: graphs are off by default, every step eager
    assert steps["graph_mode"] == "off" and steps["graph"] == 0 and steps["eager"] > 0
    assert steps["prefill_lora"] == "grouped" and steps["prefill_lora_measured_us"] == {}  # nothing to measure
    # bench.targets reads this report as it would a GPU run's, at this matrix's batch and adapter counts
    scored = subprocess.run([sys.executable, "-m", "bench.targets", str(tmp_path), "--batch", "4", "--few-adapters",
                             "2", "--many-adapters", "4"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    _, few, many, rate, hf = json.loads(scored.stdout)["targets"]
    assert (few["value"], many["value"]) == tuple(ratio["adapters_over_base"] for ratio in report["ratios"][1:3])
    assert rate["value"] == report["ours_adapters"][2]["decode_tokens_per_s"] and rate["worst_repeat"] > 0
    assert hf["value"] == hf_ratio and many["worst_repeat"] <= many["value"]
    assert list(report["node_startup_s"]) == ["weights", "prefill LoRA tuning"]  # CPU: no graphs, no decode tuning
    assert json.loads(scored.stdout)["node_startup_s"] == report["node_startup_s"]


def test_engine_matrix_reports_what_the_budget_left_no_time_for(tmp_path):
    result, report = run_matrix_smoke(tmp_path, "--budget-seconds", "0")
    assert json.loads(result.stdout) == report
    assert [entry["name"] for entry in report["skipped"]] == ["b4_base", "b4_a1", "b4_a2", "b4_a4", "b1_base",
                                                              "b1_a1", "hf_peft_mixed"]
    assert report["ours_base"] == report["ours_adapters"] == report["ratios"] == [] and report["failed"] == []
    assert report["copy_bandwidth_gbs"] is None  # no CUDA here, no flag: no floor


# The GPU machine's grpcio (1.84) is older than our generated stubs allow, so the scripts
# device_check runs must never import them: this prelude makes any such import fail here too.
WITHOUT_GRPC_STUBS = """
import runpy, sys
class NoStubs:
    def find_spec(self, name, path=None, target=None):
        if name.startswith("services.common.pb"):
            raise ImportError(f"{name}: generated gRPC stubs are not importable on the GPU machine")
sys.meta_path.insert(0, NoStubs())
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def test_step_profiling_is_a_no_op_without_cuda_graphs(tmp_path):
    """--profile-steps profiles graphed steps only: on CPU (no graphs) the matrix runs as before."""
    _, report = run_matrix_smoke(tmp_path, "--profile-steps", "--skip-hf", "--matrix-batches", "1",
                                 "--matrix-adapters", "1")
    assert [run["name"] for run in report["ours_base"] + report["ours_adapters"]] == ["b1_base", "b1_a1"]
    assert not any("step_profile" in run for run in report["ours_base"] + report["ours_adapters"])


def test_the_matrix_compares_overlapped_steps_with_step_by_step_on_one_node(tmp_path):
    _, report = run_matrix_smoke(tmp_path, "--overlap-steps", "on", "--compare-overlap", "--skip-hf",
                                 "--matrix-batches", "1,16", "--matrix-adapters", "4")
    runs = {run["name"]: run for run in report["ours_base"] + report["ours_adapters"]}
    assert set(runs) == {"b1_base", "b16_base", "b16_a4"}  # 4 adapters do not fit a batch of 1
    for name in ("b16_base", "b16_a4"):  # batches of 16 and more run both ways
        assert runs[name]["overlapped_steps"] > 0 and runs[name]["without_overlap"]["decode_tokens_per_s"] > 0
    assert "without_overlap" not in runs["b1_base"]
    assert report["engine_steps"]["overlap"] is True  # switched back on after each run without


def test_the_step_profiler_keeps_the_last_step_of_the_largest_batch():
    from types import SimpleNamespace

    from bench.step_profile import LastGraphedStep

    class Graphs:  # DecodeGraphs' run and prepare; replaying needs CUDA, which this test has not
        prepared = None

        def run(self, step, packed):
            return f"ran {step.name}"

        def prepare(self, step, packed):
            self.prepared = (step.name, packed)

    graphs = Graphs()
    tracker = LastGraphedStep(graphs)
    steps = {batch: SimpleNamespace(name=f"b{batch}", layout=SimpleNamespace(batch=batch)) for batch in (8, 64)}
    for batch, packed in ((64, "first"), (64, "second"), (8, "tail")):
        assert graphs.run(steps[batch], packed) == f"ran b{batch}"
    assert tracker.take() is steps[64] and graphs.prepared == ("b64", "second")  # its inputs written back
    assert tracker.take() is None


def test_host_overhead_bench_reports_the_engine_and_the_graph_fill(tmp_path):
    out = tmp_path / "host.json"
    result = subprocess.run([sys.executable, "-c", WITHOUT_GRPC_STUBS, "bench.host_overhead", "--batch", "4",
                             "--steps", "5", "--json", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    engine = report["engine"]
    assert engine["decode_steps"] == 4 and engine["runner_ms"] > 0 and engine["outside_runner_ms"] > 0
    assert [(g["batch"], g["adapters"]) for g in report["graph_fill"]] == [(4, 1), (4, 4)]
    assert all(g["fill_and_upload_ms"] > 0 and g["buffer_words"] > 0 for g in report["graph_fill"])


def test_prefix_cache_bench_reads_the_shared_prefix_only_with_caching_on(tmp_path):
    out = tmp_path / "prefix.json"
    result = subprocess.run([sys.executable, "-m", "bench.prefix_cache", "--preset", "tiny", "--prefix-len", "48",
                             "--suffix-len", "5", "--requests", "3", "--gen-len", "2", "--json", str(out)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    on, off = report["prefix_caching_on"], report["prefix_caching_off"]
    assert on["prompt_tokens_cached"] == 2 * 48  # requests 2 and 3 read the 3 blocks of the prefix
    assert off["prompt_tokens_cached"] == 0 and off["prompt_tokens_computed"] == 3 * 53
    assert on["prompt_tokens_computed"] + on["prompt_tokens_cached"] == 3 * 53
    assert report["ttft_speedup_median"] > 0 and on["ttft_median_ms"] > 0


def test_tenant_fairness_bench_runs_both_ways(tmp_path):
    out = tmp_path / "fairness.json"
    result = subprocess.run([sys.executable, "-m", "bench.tenant_fairness", "--preset", "tiny", "--flood", "6",
                             "--max-num-seqs", "2", "--prompt-len", "8", "--gen-len", "3", "--kv-cache-mb", "4",
                             "--json", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for run in ("tenant_lanes", "one_queue"):
        assert 0 < report[run]["tenant_b_ttft_ms"] <= report[run]["tenant_b_done_ms"]
        assert report[run]["tenant_a_done_median_ms"] <= report[run]["tenant_a_done_last_ms"]


def test_prefetch_bench_serves_a_prefetched_adapter_without_fetching_it(tmp_path):
    out = tmp_path / "prefetch.json"
    result = subprocess.run([sys.executable, "-m", "bench.prefetch", "--preset", "tiny", "--repetitions", "1",
                             "--json", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["no_prefetch"]["node_fetches_during_request"] == [1]
    assert report["prefetch_request_after_warm"]["node_fetches_during_request"] == [0]
    assert all(report[name]["ttft_ms_median"] > 0 for name in ("no_prefetch", "prefetch_request_at_bind",
                                                                "prefetch_request_after_warm", "resident"))


def test_adapter_load_bench_reports_each_phase_and_checks_the_pages(tmp_path):
    out = tmp_path / "adapter_load.json"
    result = subprocess.run([sys.executable, "-m", "bench.adapter_load", "--preset", "small", "--device", "cpu",
                             "--repeat", "2", "--json", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["pages_match_host_form"] is True
    assert report["host_bytes"] == report["pool_bytes"] > 0  # the host form is the pages' dtype and size
    assert all(report[phase] > 0 for phase in ("read_ms", "parse_ms", "pool_load_ms"))
