"""Issue #8's targets read off a device_check folder: each figure, its threshold, met or not.

  python -m bench.targets OUT_DIR [--markdown]

Reads OUT_DIR/kernels.json and OUT_DIR/engine.json (engine_partial.json when the engine step
was cut short; engine_fallback's for a figure the engine step lost to a failure) and prints
one JSON report (or a Markdown table for bench/gpu_notes.md), so a GPU session reads its
verdict off the run instead of by hand. Standard library only: it runs
wherever the JSON is, GPU or not. A figure the run did not produce is "not measured", with
the reason the run gave (skipped, failed, step missing), never met.

The targets (issue #8, deliverable 4), at batch 64 with 512-token contexts:
  - LoRA shrink+expand for 64 decode tokens of 64 adapters within 3x the byte floor, read as
    the engine launches a layer (q|k|v in one launch pair, o, gate|up in one, down): the best
    correct variant of each, summed, against their floors summed;
  - 16 distinct adapters at least 0.85x our own base-only decode rate;
  - 64 distinct adapters at least 0.7x base-only and at least 5,000 decode tokens/s;
  - at least 100x HF peft's mixed batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LORA_GROUPS = {"q|k|v": "decode qkv", "o": "decode qo", "gate|up": "decode gate|up", "down": "decode down"}
LORA_X_FLOOR = 3.0
FEW_ADAPTERS_OVER_BASE = 0.85
MANY_ADAPTERS_OVER_BASE = 0.7
MANY_ADAPTERS_TOKENS_PER_S = 5000.0
OVER_HF_PEFT = 100.0


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def engine_report(folder: Path, step: str = "engine") -> dict | None:
    """STEP.json is the matrix's stdout, whole only when the step finished; the partial file
    (--json, rewritten as configurations finish) holds what a cut-off step got through."""
    return read_json(folder / f"{step}.json") or read_json(folder / f"{step}_partial.json")


def target_configurations(batch: int = 64, few: int = 16, many: int = 64) -> list[str]:
    return [f"b{batch}_base", f"b{batch}_a{few}", f"b{batch}_a{many}"]


def lost_configurations(folder: Path, batch: int = 64, few: int = 16, many: int = 64) -> list[str]:
    """The target configurations the engine step neither measured nor skipped for its budget:
    lost to a failure (the node not building, a configuration raising, the step hanging until
    killed). device_check then runs the matrix again without the paths no GPU has run yet."""
    engine = engine_report(folder)
    wanted = target_configurations(batch, few, many)
    if engine is None:
        return wanted
    done = {entry.get("name") for kind in ("ours_base", "ours_adapters", "skipped") for entry in engine.get(kind, [])}
    return [name for name in wanted if name not in done]


def target(name: str, threshold: float, value: float | None, *, at_most: bool = False, why_missing: str = "",
           **figures) -> dict:
    entry = {"target": name, "threshold": threshold, "value": value, **figures}
    if value is None:
        entry.update(met=False, status=f"not measured: {why_missing}")
    else:
        entry["met"] = value <= threshold if at_most else value >= threshold
        entry["status"] = "met" if entry["met"] else "not met"
    return entry


def lora_target(kernels: dict | None, tokens: int, adapters: int) -> dict:
    name = f"LoRA shrink+expand, {tokens} decode tokens, {adapters} adapters, x byte floor (a layer)"
    if kernels is None:
        return target(name, LORA_X_FLOOR, None, at_most=True, why_missing="no kernels.json")
    groups, missing = {}, []
    for group, prefix in LORA_GROUPS.items():
        case = next((case for case in kernels.get("lora", [])
                     if case["case"] == f"{prefix} {tokens} tokens {adapters} adapters"), None)
        timed = [(variant["us"], label) for label, variant in (case or {}).get("variants", {}).items()
                 if variant.get("correct") and variant.get("us")]
        if case is None or not timed or not case.get("floor_us"):
            missing.append(group)
            continue
        us, label = min(timed)
        groups[group] = {"variant": label, "us": us, "floor_us": case["floor_us"], "x_floor": us / case["floor_us"]}
    if missing:
        return target(name, LORA_X_FLOOR, None, at_most=True, groups=groups,
                      why_missing=f"no correct timed variant for {', '.join(missing)}")
    value = sum(group["us"] for group in groups.values()) / sum(group["floor_us"] for group in groups.values())
    return target(name, LORA_X_FLOOR, value, at_most=True, groups=groups)


def _named(entries: list[dict], name: str) -> dict | None:
    return next((entry for entry in entries if entry.get("name") == name), None)


def _why_missing(engine: dict | None, name: str) -> str:
    if engine is None:
        return "no engine report"
    for kind in ("skipped", "failed"):
        entry = _named(engine.get(kind, []), name)
        if entry is not None:
            return f"{name} {kind}: {entry.get('reason') or entry.get('error') or ''}".rstrip(": ")
    failures = "; ".join(f"{entry.get('name')}: {entry.get('error')}" for entry in engine.get("failed", []))
    return f"{name} is not in the engine report" + (f" (failed: {failures})" if failures else "")


def worst_repeat_ratio(adapters_run: dict, base_run: dict | None) -> float | None:
    """The slowest repeat with adapters over the fastest base-only one: how far the kept
    (fastest) figures' ratio may flatter the configuration."""
    slow = adapters_run.get("repeats_decode_tokens_per_s") or []
    fast = (base_run or {}).get("repeats_decode_tokens_per_s") or []
    return min(slow) / max(fast) if slow and fast else None


def diagnostics(run: dict | None) -> dict:
    """What says why a decode figure is where it is: whether its steps ran overlapped, the GPU's
    time per replayed step against the wall's, the graph variant's tile capacity, and the
    rate with overlap off (--compare-overlap)."""
    run = run or {}
    profile = run.get("step_profile") or {}
    figures = {"overlapped_steps": run.get("overlapped_steps"), "gpu_ms_p50": profile.get("gpu_ms_p50"),
               "wall_ms_per_decode_step": profile.get("wall_ms_per_decode_step"),
               "tile_capacity": profile.get("tile_capacity"),
               "without_overlap_tokens_per_s": (run.get("without_overlap") or {}).get("decode_tokens_per_s")}
    return {name: value for name, value in figures.items() if value is not None}


def ratio_target(engine: dict | None, batch: int, adapters: int, threshold: float) -> dict:
    name = f"batch {batch}, {adapters} distinct adapters over base-only decode"
    config = f"b{batch}_a{adapters}"
    ratio = _named((engine or {}).get("ratios", []), config)
    if ratio is None:
        return target(name, threshold, None, why_missing=_why_missing(engine, config))
    run = _named(engine.get("ours_adapters", []), config) or {}
    base = _named(engine.get("ours_base", []), f"b{batch}_base")
    return target(name, threshold, ratio["adapters_over_base"], byte_bound=ratio.get("byte_bound_with_kv"),
                  fraction_of_byte_bound=ratio.get("fraction_of_byte_bound"),
                  worst_repeat=worst_repeat_ratio(run, base),
                  diagnostics={"adapters": diagnostics(run), "base": diagnostics(base)})


def rate_target(engine: dict | None, batch: int, adapters: int) -> dict:
    name = f"batch {batch}, {adapters} distinct adapters, decode tokens/s"
    config = f"b{batch}_a{adapters}"
    run = _named((engine or {}).get("ours_adapters", []), config)
    if run is None:
        return target(name, MANY_ADAPTERS_TOKENS_PER_S, None, why_missing=_why_missing(engine, config))
    repeats = run.get("repeats_decode_tokens_per_s") or []
    return target(name, MANY_ADAPTERS_TOKENS_PER_S, run["decode_tokens_per_s"],
                  floor_tokens_per_s=run.get("floor_tokens_per_s"),
                  fraction_of_floor=run.get("decode_fraction_of_floor"), worst_repeat=min(repeats, default=None),
                  diagnostics=diagnostics(run))


def hf_target(engine: dict | None) -> dict:
    name = "ours over HF peft, mixed batch decode"
    hf = (engine or {}).get("hf_peft_mixed")
    if not hf or hf.get("ours_over_hf_mixed") is None:
        return target(name, OVER_HF_PEFT, None, why_missing=_why_missing(engine, "hf_peft_mixed"))
    return target(name, OVER_HF_PEFT, hf["ours_over_hf_mixed"], configuration=hf.get("name"))


def engine_targets(engine: dict | None, batch: int, few: int, many: int) -> list[dict]:
    return [ratio_target(engine, batch, few, FEW_ADAPTERS_OVER_BASE),
            ratio_target(engine, batch, many, MANY_ADAPTERS_OVER_BASE),
            rate_target(engine, batch, many),
            hf_target(engine)]


#: What device_check's engine_fallback step turns off; a figure from it says so.
FALLBACK_SOURCE = "engine_fallback: overlapped steps, start-up LoRA tuning and LoRA beside the GEMM off"


def scorecard(folder: Path, batch: int = 64, few: int = 16, many: int = 64, lora_tokens: int = 64) -> dict:
    kernels, engine = read_json(folder / "kernels.json"), engine_report(folder)
    targets = engine_targets(engine, batch, few, many)
    fallback = engine_report(folder, "engine_fallback")
    if fallback is not None:
        for index, (entry, other) in enumerate(zip(targets, engine_targets(fallback, batch, few, many))):
            if entry["value"] is None and other["value"] is not None:
                targets[index] = {**other, "source": FALLBACK_SOURCE, "engine": entry["status"]}
    targets.insert(0, lora_target(kernels, lora_tokens, many))
    device = ((engine or {}).get("machine") or (kernels or {}).get("machine") or {}).get("gpu")
    # Not a target, but what serving these figures costs an operator at every start.
    return {"device": device, "targets": targets, "all_met": all(entry["met"] for entry in targets),
            "node_startup_s": (engine or {}).get("node_startup_s")}


def markdown(report: dict) -> str:
    def figure(value) -> str:
        return "" if value is None else f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"

    startup = report.get("node_startup_s") or {}
    lines = [f"Targets (issue #8) on {report['device'] or 'an unnamed device'}"
             + (f"; the engine's node started in {sum(startup.values()):.0f} s "
                f"({', '.join(f'{phase} {seconds:.0f} s' for phase, seconds in startup.items())})" if startup else "")
             + ":", "",
             "| target | threshold | value | worst repeat | of its floor | status |",
             "| --- | --- | --- | --- | --- | --- |"]
    for entry in report["targets"]:
        floor = entry.get("fraction_of_byte_bound", entry.get("fraction_of_floor"))
        lines.append(f"| {entry['target']} | {'<=' if 'LoRA' in entry['target'] else '>='} "
                     f"{figure(entry['threshold'])} | {figure(entry['value'])} | {figure(entry.get('worst_repeat'))} "
                     f"| {figure(floor)} | {entry['status']}{' (fallback run)' if 'source' in entry else ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a device_check output folder")
    parser.add_argument("--batch", type=int, default=64, help="the batch the decode targets are set at")
    parser.add_argument("--few-adapters", type=int, default=16)
    parser.add_argument("--many-adapters", type=int, default=64)
    parser.add_argument("--lora-tokens", type=int, default=64, help="decode tokens of the LoRA kernel target")
    parser.add_argument("--markdown", action="store_true", help="a table for bench/gpu_notes.md instead of JSON")
    args = parser.parse_args(argv)
    report = scorecard(args.folder, args.batch, args.few_adapters, args.many_adapters, args.lora_tokens)
    print(markdown(report) if args.markdown else json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
