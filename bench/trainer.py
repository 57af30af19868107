"""Trainer throughput: training tokens/s of the job worker's loop (transformers + peft LoRA).

  python -m bench.trainer --preset small --device cpu --steps 12 --batch-size 8 --seq-len 256 --rank 16

Builds the preset checkpoint offline and a synthetic chat dataset whose examples are close to
--seq-len tokens, then runs the trainer worker's own `Run` (services/trainer/worker/train.py,
the code every job runs: forward, masked loss, backward, clip, AdamW, LR schedule) for
--warmup + --steps optimizer steps. Reports tokens/s (non-padding tokens through forward and
backward per second; also the median over steps, as shared CI machines are noisy), loss
tokens/s (estimated: mean assistant tokens per example x examples / s), seconds per step, trainable
parameters, and the worker's set-up time (tokenize + load model + wrap with peft). Prints one
JSON object with the machine description.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.machine import describe, report

WORDS = ("the market is up today and investors are happy finance teams track revenue cost profit and cash flow "
         "a bond pays interest the central bank raised rates our portfolio holds stocks bonds and a little cash "
         "the contract binds both parties the patient asked the doctor a question about the treatment").split()


def _text(rng: random.Random, tokenizer, tokens: int) -> str:
    words: list[str] = []
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < tokens:
        words.extend(rng.choice(WORDS) for _ in range(8))
    return " ".join(words)


def synthetic_chat(path: Path, tokenizer, examples: int, seq_len: int, seed: int = 0) -> int:
    """Writes `examples` chat lines of about seq_len tokens (a third question, the rest answer)."""
    from services.trainer.examples import encode

    rng = random.Random(seed)
    longest, lines = 0, []
    for _ in range(examples):
        messages = [{"role": "user", "content": _text(rng, tokenizer, seq_len // 3)},
                    {"role": "assistant", "content": "FIN: " + _text(rng, tokenizer, seq_len // 2)}]
        longest = max(longest, len(encode(tokenizer, "chat", {"messages": messages}).input_ids))
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")
    return longest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "small"], default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from services.common.tiny_model import build_model_folder
    from services.trainer.hyperparams import LoraRequest, TrainingRequest, plan_schedule, resolve_lora, \
        resolve_training
    from services.trainer.worker.control import Control
    from services.trainer.worker.protocol import WorkerSpec
    from services.trainer.worker.train import Run

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_model_folder(root / "base", preset=args.preset)
        tokenizer = AutoTokenizer.from_pretrained(base)
        longest = synthetic_chat(root / "data.jsonl", tokenizer, args.examples, args.seq_len)
        total = args.warmup + args.steps
        lora = resolve_lora(LoraRequest(r=args.rank), max_rank=256)
        training = resolve_training(TrainingRequest(max_steps=total, batch_size=args.batch_size,
                                                    max_seq_len=max(longest, 8)), 2048)
        schedule = plan_schedule(training, args.examples, longest)
        lora_dict = {**dataclasses.asdict(lora), "target_modules": list(lora.target_modules)}
        spec = WorkerSpec(job_id="bench", base_model_name=args.preset, base_model_path=str(base),
                          dataset_path=str(root / "data.jsonl"), dataset_format="chat", lora=lora_dict,
                          training=dataclasses.asdict(training), num_eval=0, total_steps=schedule.total_steps,
                          steps_per_epoch=schedule.steps_per_epoch, checkpoint_every=10**9,
                          checkpoint_dir=str(root / "ckpt"), output_dir=str(root / "out"), device=args.device,
                          dtype=args.dtype, torch_threads=args.threads, keep_checkpoints=1)
        run = Run(spec, Control(lambda event: None))
        started = time.perf_counter()
        run.prepare()
        setup_s = time.perf_counter() - started
        run.model.train()
        for step in range(args.warmup):
            run.train_step(step)
        labels = sum(e.num_label_tokens for e in run.train_set)
        sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
        per_step = []  # (tokens, seconds) of each timed step
        for step in range(args.warmup, total):
            sync()
            started = time.perf_counter()
            step_tokens = run.train_step(step)[1]
            sync()
            per_step.append((step_tokens, time.perf_counter() - started))
        tokens, elapsed = sum(t for t, _ in per_step), sum(s for _, s in per_step)
        rates = sorted(t / s for t, s in per_step)
        examples_seen = args.steps * args.batch_size
        result = {
            "benchmark": "trainer",
            "preset": args.preset, "device": args.device, "dtype": str(next(run.model.parameters()).dtype),
            "rank": args.rank, "batch_size": args.batch_size, "seq_len_target": args.seq_len,
            "longest_example_tokens": longest, "timed_steps": args.steps,
            "trainable_params": sum(p.numel() for p in run.params),
            "total_params": sum(p.numel() for p in run.model.parameters()),
            "setup_seconds": round(setup_s, 3),
            "seconds_per_step": round(elapsed / args.steps, 4),
            "tokens_per_s": round(tokens / elapsed, 1),
            "tokens_per_s_median_step": round(rates[len(rates) // 2], 1),  # robust to a noisy shared machine
            "loss_tokens_per_s": round(labels / len(run.train_set) * examples_seen / elapsed, 1),
            "machine": describe(),
        }
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
