"""What a job publishes is what it was asked to train, with HF peft as the oracle: the adapter
downloaded from the Registry, loaded with `PeftModel.from_pretrained` on the same base, has the
requested config (nothing added, values as the caller wrote them) and gives, on the held-out
examples, exactly the eval loss the job reported, a loss taken only on what the model must
generate after the prompt the inference node would send."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb

CHAT = [{"role": "system", "content": "You are a finance assistant."},
        {"role": "user", "content": "What is the stock market doing?"},
        {"role": "assistant", "content": "FIN: the market is up."}]
PROMPT, COMPLETION = "Q: Should I buy bonds?\nA:", " FIN: bonds pay interest."


def download(registry_admin, adapter_id: str, folder) -> dict:
    manifest, weights = registry_admin.download(adapter_id)
    folder.mkdir()
    (folder / "adapter_config.json").write_text(manifest.config_json)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return json.loads(manifest.config_json)


def completion_loss(model, prompt_ids: list[int], target_ids: list[int]) -> float:
    """Mean next-token cross-entropy of `target_ids` after `prompt_ids` (eval mode, float32)."""
    ids = torch.tensor([prompt_ids + target_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1]
    return F.cross_entropy(logits.float(), torch.tensor(target_ids)).item()


def chat_targets(tokenizer) -> tuple[list[int], list[int]]:
    """(the inference node's prompt, the reply and its end-of-turn token)."""
    prompt = list(tokenizer.apply_chat_template(CHAT[:-1], add_generation_prompt=True, tokenize=True,
                                                return_dict=False))
    reply = tokenizer(CHAT[-1]["content"], add_special_tokens=False)["input_ids"]
    return prompt, list(reply) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def completion_targets(tokenizer) -> tuple[list[int], list[int]]:
    prompt = tokenizer(PROMPT)["input_ids"]  # with special tokens, as the node tokenizes text prompts
    completion = tokenizer(COMPLETION, add_special_tokens=False)["input_ids"]
    return list(prompt), list(completion) + [tokenizer.eos_token_id]


@pytest.mark.parametrize("fmt", ["chat", "prompt_completion"])
def test_the_published_adapter_is_the_requested_one_and_gives_the_reported_eval_loss(
        fmt, tenant, registry_admin, tiny_model_dir, tmp_path):
    # Identical examples: whichever the seeded split holds out, the oracle knows what they are.
    line = json.dumps({"messages": CHAT} if fmt == "chat" else {"prompt": PROMPT, "completion": COMPLETION})
    dataset = tenant.trainer.upload([line] * 8)
    lora = pb.LoraConfig(r=4, alpha=12, dropout=0.1, target_modules=["v_proj", "down_proj", "q_proj"],
                         use_rslora=True)
    job = tenant.trainer.wait(tenant.trainer.start(dataset.id, name=f"oracle-{fmt.replace('_', '-')}", lora=lora,
                                                   max_steps=12, eval_fraction=0.25, seed=11).id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error

    config = download(registry_admin, job.adapter_id, tmp_path / "adapter")
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["use_rslora"]) == (4, 12, 0.1, True)
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert (config["peft_type"], config["task_type"], config["bias"]) == ("LORA", "CAUSAL_LM", "none")
    assert not config["modules_to_save"] and not config["rank_pattern"] and not config["alpha_pattern"]
    assert not config["use_dora"] and config["base_model_name_or_path"] == "tiny"

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt, targets = chat_targets(tokenizer) if fmt == "chat" else completion_targets(tokenizer)
    before = completion_loss(base, prompt, targets)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    layer = model.base_model.model.model.layers[0]
    assert layer.self_attn.q_proj.scaling["default"] == pytest.approx(12 / 2)  # alpha / sqrt(r): rsLoRA
    assert not hasattr(layer.self_attn.k_proj, "lora_A") and hasattr(layer.mlp.down_proj, "lora_A")

    after = completion_loss(model, prompt, targets)
    assert after < before  # it learned the reply
    # The job's last eval loss is this very loss: only the reply (and its end token) after
    # exactly the prompt the inference node sends, no prompt token, no template text after.
    assert job.progress.eval_loss == pytest.approx(after, rel=1e-4)
