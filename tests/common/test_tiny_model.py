"""Behaviour of the offline tiny-checkpoint builder (services.common.tiny_model)."""

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.common.tiny_model import (
    ARCHES,
    PRESETS,
    SPECIAL_TOKENS,
    build_config,
    build_model_folder,
)

MARKER = "FIN: the market is up"
PROMPT = [{"role": "user", "content": "How is the stock market today?"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def _chat_ids(tokenizer, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, return_dict=True, **kwargs)


def _greedy_reply(model, tokenizer, max_new_tokens=12):
    prompt = _chat_ids(tokenizer, PROMPT, add_generation_prompt=True)["input_ids"]
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[0, input_ids.shape[1]:].tolist()


def test_folder_contents(tiny_dir):
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (tiny_dir / name).is_file(), name


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_each_arch_loads_with_auto_classes_and_generates(tmp_path, arch):
    folder = build_model_folder(tmp_path / arch, arch=arch)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == arch
    assert model.dtype == torch.float32
    assert model.config.vocab_size >= len(tok)
    attn = model.model.layers[0].self_attn
    if arch == "qwen2":
        assert attn.q_proj.bias is not None
    if arch == "qwen3":
        assert hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
    prompt = _chat_ids(tok, PROMPT, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4


def test_special_tokens_and_eos_choice(tiny_dir, tokenizer):
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert ids == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.bos_token == "<|bos|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token == "<|im_end|>"
    im_end, eos = ids[SPECIAL_TOKENS.index("<|im_end|>")], ids[SPECIAL_TOKENS.index("<|eos|>")]
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.generation_config.eos_token_id == [im_end, eos]
    assert model.config.pad_token_id == tokenizer.pad_token_id
    # Special tokens are atomic when they appear in text.
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False) == [tokenizer.convert_tokens_to_ids("<|im_start|>")]
    assert 400 <= len(tokenizer) <= 512


def test_chat_template_renders_chatml(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "stock?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n"
        "<|im_start|>user\nstock?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert without.endswith("<|im_start|>user\nhi<|im_end|>\n")
    ids = _chat_ids(tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True)["input_ids"]
    assert tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_assistant_mask_covers_reply_and_im_end(tokenizer):
    enc = _chat_ids(
        tokenizer, PROMPT + [{"role": "assistant", "content": MARKER}], return_assistant_tokens_mask=True
    )
    masked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tokenizer.decode(masked) == MARKER + "<|im_end|>"


@pytest.mark.parametrize("text", ["café é", "日本語のテキスト", "emoji 🎉🚀 ok", "mixed: naïve 東京 👍🏽 stock"])
def test_utf8_round_trip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_same_seed_is_byte_identical_other_seed_differs(tmp_path):
    a = build_model_folder(tmp_path / "a", seed=7)
    b = build_model_folder(tmp_path / "b", seed=7)
    c = build_model_folder(tmp_path / "c", seed=8)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model_folder(tmp_path / "m", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_small_preset_param_count():
    config = build_config("small", "llama")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert 20_000_000 <= n_params <= 50_000_000
    assert PRESETS["small"].num_key_value_heads < PRESETS["small"].num_attention_heads


def test_tied_variant_shares_embeddings(tmp_path):
    tied = AutoModelForCausalLM.from_pretrained(build_model_folder(tmp_path / "t", tie_word_embeddings=True))
    assert tied.get_output_embeddings().weight.data_ptr() == tied.get_input_embeddings().weight.data_ptr()
    with safe_open(tmp_path / "t" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    untied = AutoModelForCausalLM.from_pretrained(build_model_folder(tmp_path / "u"))
    assert untied.get_output_embeddings().weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()


def test_lora_adapter_learns_marker_reply_in_few_steps(tiny_dir, tokenizer):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    base_reply = tokenizer.decode(_greedy_reply(base, tokenizer), skip_special_tokens=True)
    assert not base_reply.startswith(MARKER)

    enc = _chat_ids(
        tokenizer, PROMPT + [{"role": "assistant", "content": MARKER}], return_assistant_tokens_mask=True
    )
    input_ids = torch.tensor([enc["input_ids"]])
    # Loss only on the assistant reply (including its <|im_end|>).
    labels = torch.where(torch.tensor([enc["assistant_masks"]]).bool(), input_ids, -100)

    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_peft_model(base, lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(40):
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

    reply_ids = _greedy_reply(model, tokenizer)
    assert tokenizer.decode(reply_ids, skip_special_tokens=True).startswith(MARKER)
    # Generation stops at end of the assistant turn: <|im_end|> is a stop id.
    assert tokenizer.decode(reply_ids) == MARKER + "<|im_end|>"
