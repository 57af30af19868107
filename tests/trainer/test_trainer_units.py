"""Pure functions of the trainer: loss masks, schedules, data order, config flags, and the
worker's command-line entry point (the one torchrun or an operator would run)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from services.common.config import build_parser, parse_config
from services.trainer.config import TrainerConfig
from services.trainer.examples import IGNORE_INDEX, encode
from services.trainer.hyperparams import (LoraRequest, TrainingRequest, plan_schedule, resolve_lora,
                                          resolve_training)
from services.trainer.worker.data import StepPlan
from services.trainer.worker.protocol import WorkerSpec, decode_event
from tests.conftest import REPO_ROOT
from tests.trainer.harness import finance_chat_lines

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the market doing?"},
        {"role": "assistant", "content": "FIN: up."}, {"role": "user", "content": "And bonds?"},
        {"role": "assistant", "content": "FIN: flat."}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def learned_text(tokenizer, encoded) -> str:
    return tokenizer.decode([label for label in encoded.labels if label != IGNORE_INDEX])


def test_chat_loss_is_on_assistant_turns_only(tokenizer):
    encoded = encode(tokenizer, "chat", {"messages": CHAT})
    assert learned_text(tokenizer, encoded) == "FIN: up.<|im_end|>FIN: flat.<|im_end|>"
    assert len(encoded.labels) == len(encoded.input_ids)


def test_prompt_completion_loss_is_on_the_completion_and_eos(tokenizer):
    encoded = encode(tokenizer, "prompt_completion", {"prompt": "Q: rates?\nA:", "completion": " FIN: up."})
    assert learned_text(tokenizer, encoded) == " FIN: up.<|im_end|>"
    assert tokenizer.decode(encoded.input_ids).startswith("Q: rates?")


def test_defaults_and_the_schedule_follow_the_dataset():
    lora = resolve_lora(LoraRequest(), max_rank=256)
    assert (lora.r, lora.alpha, lora.dropout, len(lora.target_modules)) == (16, 32.0, 0.0, 7)
    training = resolve_training(TrainingRequest(), max_position_embeddings=512)
    assert (training.epochs, training.learning_rate, training.lr_schedule, training.batch_size,
            training.max_seq_len) == (3.0, 2e-4, "linear", 4, 512)
    # 103 examples, 10% held out -> 93 train; batches of 4 -> 24 micro-batches; x3 accumulation -> 8 steps/epoch.
    training = resolve_training(TrainingRequest(epochs=2.5, batch_size=4, gradient_accumulation_steps=3,
                                                eval_fraction=0.1), 512)
    schedule = plan_schedule(training, num_examples=103, longest_example=100)
    assert (schedule.num_eval, schedule.num_train, schedule.steps_per_epoch, schedule.total_steps,
            schedule.checkpoint_every) == (10, 93, 8, 20, 8)


def test_every_epoch_visits_every_example_once_in_a_seeded_order():
    plan = StepPlan(num_train=10, batch_size=3, accumulation=2, steps_per_epoch=2, seed=5)
    epochs = [[i for step in (2 * e, 2 * e + 1) for batch in plan.micro_batches(step) for i in batch]
              for e in range(3)]
    assert all(sorted(order) == list(range(10)) for order in epochs)
    assert epochs[0] != epochs[1]
    again = StepPlan(num_train=10, batch_size=3, accumulation=2, steps_per_epoch=2, seed=5)
    assert again.micro_batches(3) == plan.micro_batches(3)  # a resumed run sees the same batches
    other = StepPlan(num_train=10, batch_size=3, accumulation=2, steps_per_epoch=2, seed=6)
    assert other.micro_batches(0) != plan.micro_batches(0)


def test_config_flags_and_environment(tmp_path):
    config = parse_config(TrainerConfig, ["--devices", "cuda:0", "--devices", "cuda:1", "--max-rank", "64",
                                          "--blob-store", "s3", "--s3-secure", "--data-dir", str(tmp_path)],
                          env={"LORAPLEX_CANCEL_GRACE_SECONDS": "2.5", "LORAPLEX_DEVICES": "cpu"})
    assert config.devices == ["cuda:0", "cuda:1"] and config.max_rank == 64 and config.s3_secure
    assert config.cancel_grace_seconds == 2.5
    assert config.effective_database_url == f"sqlite:///{(tmp_path / 'trainer.db').resolve()}"
    help_text = build_parser(TrainerConfig, "trainer").format_help()
    for field in dataclasses.fields(TrainerConfig):
        assert "--" + field.name.replace("_", "-") in help_text and field.metadata.get("help")


@pytest.mark.parametrize(("argv", "message"), [
    (["--devices", "tpu"], "--devices entries must be cpu, cuda or cuda:N"),
    (["--dtype", "int8"], "--dtype must be one of"),
    (["--blob-store", "ftp"], "--blob-store must be one of"),
    (["--max-rank", "0"], "--max-rank must be >= 1"),
    (["--cancel-grace-seconds", "0"], "--cancel-grace-seconds must be > 0"),
])
def test_bad_flags_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_config(TrainerConfig, argv, env={})
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_the_worker_runs_by_hand_with_json_events_on_stdout(tiny_model_dir, tmp_path):
    dataset = tmp_path / "data.jsonl"
    dataset.write_text("\n".join(finance_chat_lines()) + "\n")
    lora = dataclasses.asdict(resolve_lora(LoraRequest(r=2, target_modules=("q_proj",)), 256))
    lora["target_modules"] = list(lora["target_modules"])
    training = resolve_training(TrainingRequest(max_steps=3, learning_rate=1e-2, eval_fraction=0.2), 512)
    schedule = plan_schedule(training, 12, 100)
    spec = WorkerSpec(job_id="job_manual", base_model_name="tiny", base_model_path=str(tiny_model_dir),
                      dataset_path=str(dataset), dataset_format="chat", lora=lora,
                      training=dataclasses.asdict(training), num_eval=schedule.num_eval,
                      total_steps=schedule.total_steps, steps_per_epoch=schedule.steps_per_epoch,
                      checkpoint_every=schedule.checkpoint_every, checkpoint_dir=str(tmp_path / "checkpoints"),
                      output_dir=str(tmp_path / "output"), device="cpu", dtype="auto", torch_threads=1,
                      keep_checkpoints=1)
    spec.write(tmp_path / "spec.json")
    result = subprocess.run([sys.executable, "-m", "services.trainer.worker", str(tmp_path / "spec.json")],
                            cwd=REPO_ROOT, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    events = [decode_event(line) for line in result.stdout.splitlines()]
    assert all(events) and [e["event"] for e in events][0] == "started" and events[-1]["event"] == "done"
    assert any(e["event"] == "eval" for e in events)
    config = json.loads((tmp_path / "output" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny" and config["r"] == 2
    assert (tmp_path / "output" / "adapter_model.safetensors").is_file()
    assert not Path(tmp_path / "output.partial").exists()


def test_the_benchmark_runs_and_prints_its_figures(capsys):
    import torch

    from bench.trainer import main

    threads = torch.get_num_threads()
    try:
        assert main(["--preset", "tiny", "--steps", "1", "--warmup", "0", "--batch-size", "2", "--seq-len", "32",
                     "--examples", "4", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark sets it for the whole process
    result = json.loads(capsys.readouterr().out)
    assert result["benchmark"] == "trainer" and result["tokens_per_s"] > 0 and "cpu" in result["machine"]
