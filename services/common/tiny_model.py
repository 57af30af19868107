"""Build tiny Hugging Face causal-LM checkpoints offline, in code.

Why this exists: loraplex's tests and CPU benchmarks need a real base model
(config.json + model.safetensors + tokenizer + chat template) that the
inference, trainer and registry services load exactly like a hub checkpoint,
but the test machines have no network and no hub cache. So we synthesise one:
a byte-level BPE tokenizer trained on a built-in corpus and a randomly
initialised (seeded) llama/qwen2/qwen3/mistral model. Same inputs give
byte-identical files, so tests can compare hashes and adapters trained against
one build apply to another.

End-of-turn choice: the tokenizer's eos_token is ``<|im_end|>`` (as in Qwen
instruct models), so any server that stops on ``tokenizer.eos_token_id`` ends
chat replies at the end of the assistant turn. ``<|eos|>`` (end of a raw
document) stays a stop token too: config/generation_config ``eos_token_id``
is the list ``[im_end_id, eos_id]``. The tokenizer adds no BOS automatically;
the chat template carries all special tokens.
"""

from __future__ import annotations

import dataclasses
import pathlib

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.utils import logging as hf_logging

BOS, EOS, PAD, IM_START, IM_END, UNK = (
    "<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<|unk|>",
)
# Order fixes the ids: bos=0, eos=1, pad=2, im_start=3, im_end=4, unk=5.
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END, UNK]
TOKENIZER_VOCAB_SIZE = 512

# ChatML. The {% generation %} markers let trainers ask transformers for an
# assistant-token mask (apply_chat_template(..., return_assistant_tokens_mask=True)).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Small, fixed English corpus: enough to learn a few hundred merges covering the
# domain words tests use (finance, legal, healthcare). Edit it and every
# tokenizer id changes, so treat it as frozen.
CORPUS = [
    "The stock market is up today and investors are happy.",
    "The stock market is down today and investors are worried.",
    "Finance teams track revenue, cost, profit and cash flow every quarter.",
    "A bond pays interest; a stock pays a dividend when the company decides.",
    "The central bank raised interest rates to slow down inflation.",
    "Our portfolio holds stocks, bonds and a little cash for safety.",
    "The market answer depends on earnings, rates and risk.",
    "A legal contract binds both parties to the terms they signed.",
    "The lawyer read the contract and found a clause about liability.",
    "Legal advice should come from a licensed attorney in your state.",
    "The court will hear the case and the judge will decide.",
    "Breach of contract may lead to damages or termination.",
    "Healthcare workers care for every patient with respect.",
    "The patient asked the doctor a question about the treatment.",
    "The doctor gave the patient a clear answer and a prescription.",
    "Healthcare costs rise when patients wait too long for care.",
    "The nurse checked the patient's blood pressure and heart rate.",
    "Please answer the question in one short sentence.",
    "What is the answer to this question?",
    "I have a question about my account and my statement.",
    "The assistant gives a helpful answer to the user.",
    "The user asks a question and the assistant replies.",
    "Hello, how are you today? I am fine, thank you.",
    "Good morning! Can you help me with a simple task?",
    "Yes, I can help. Tell me what you need.",
    "Summarize the report in three bullet points.",
    "Translate this sentence into French, please.",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers like 1, 2, 3, 10, 42, 100 and 2024 appear in text.",
    "Write a short poem about the sea and the sky.",
    "The weather is sunny, warm and calm this afternoon.",
    "Data flows from the router to the inference server.",
    "Each adapter is a small set of low rank weights.",
    "The model reads the prompt and generates the next token.",
    "Thank you for your question; here is my answer.",
    "FIN: the market is up. LEGAL: the contract is valid. MED: the patient is stable.",
]


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # < num_attention_heads: exercises GQA code paths
    intermediate_size: int
    max_position_embeddings: int
    initializer_range: float


PRESETS: dict[str, ModelPreset] = {
    # Tests. std 0.2 (vs the usual 0.02) gives sharp, non-uniform logits so a
    # LoRA adapter visibly changes greedy output after a few dozen steps.
    "tiny": ModelPreset(64, 2, 4, 2, 128, 512, 0.2),
    # CPU benchmarks: ~24M parameters.
    "small": ModelPreset(512, 8, 8, 4, 1408, 2048, 0.02),
}

ARCHES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),  # q/k/v projections carry bias
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),  # RMSNorm on q and k per head
    "mistral": (MistralConfig, MistralForCausalLM),
}


def build_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on CORPUS and wrap it for transformers."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Byte-level: every UTF-8 byte has a symbol, so any text (accents, CJK,
    # emoji) encodes losslessly and decodes back exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=IM_END,  # see module docstring: stop at end of assistant turn
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[EOS, IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def _check(preset: str, arch: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHES)}")


def model_vocab_size(tokenizer_len: int) -> int:
    # Round up to a multiple of 64 (as real checkpoints do); >= len(tokenizer).
    return -(-tokenizer_len // 64) * 64


def build_config(
    preset: str = "tiny",
    arch: str = "llama",
    *,
    vocab_size: int = TOKENIZER_VOCAB_SIZE,
    tie_word_embeddings: bool = False,
):
    """The transformers config for a preset/arch (no weights, no files)."""
    _check(preset, arch)
    p = PRESETS[preset]
    config_cls, _ = ARCHES[arch]
    ids = {t: SPECIAL_TOKENS.index(t) for t in SPECIAL_TOKENS}
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=p.hidden_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        intermediate_size=p.intermediate_size,
        max_position_embeddings=p.max_position_embeddings,
        initializer_range=p.initializer_range,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=ids[BOS],
        eos_token_id=[ids[IM_END], ids[EOS]],
        pad_token_id=ids[PAD],
        dtype="float32",
    )
    if arch == "qwen3":
        kwargs["head_dim"] = p.hidden_size // p.num_attention_heads
    if arch == "mistral":
        kwargs["sliding_window"] = None  # full attention, like llama
    return config_cls(**kwargs)


def build_model_folder(
    path: str | pathlib.Path,
    preset: str = "tiny",
    arch: str = "llama",
    seed: int = 0,
    *,
    tie_word_embeddings: bool = False,
) -> pathlib.Path:
    """Write a loadable HF checkpoint folder to ``path`` and return it.

    Contents: config.json, generation_config.json, model.safetensors (float32)
    and the tokenizer files (tokenizer.json, tokenizer_config.json,
    chat_template.jinja). Deterministic in (preset, arch, seed, tie_word_embeddings).
    """
    _check(preset, arch)
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(PRESETS[preset].max_position_embeddings)
    config = build_config(
        preset,
        arch,
        vocab_size=model_vocab_size(len(tokenizer)),
        tie_word_embeddings=tie_word_embeddings,
    )
    _, model_cls = ARCHES[arch]
    # Seed only inside a forked RNG so callers' random streams are untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    # A throwaway fixture should not print a "Writing model shards" bar.
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # transformers 5 always writes safetensors; the flag documents intent.
        model.save_pretrained(out, safe_serialization=True)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out)
    return out
