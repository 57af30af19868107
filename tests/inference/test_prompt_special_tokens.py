"""A text prompt is tokenized as the trainer tokenized its prompts (prompt/completion
datasets): with the tokenizer's special tokens. For Llama- and Mistral-family tokenizers that
means a leading BOS; the node used to leave it out, so an adapter trained with BOS saw prompts
without it in production (and HF `tokenizer(prompt)`, vLLM's completions, do add it)."""

from __future__ import annotations

import shutil

import pytest
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from services.common.tiny_model import BOS
from services.inference.config import InferenceConfig
from services.inference.node import Node, Prompt
from services.trainer.examples import encode_prompt_completion


@pytest.fixture(scope="module")
def bos_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a tokenizer that prepends BOS, as Llama's does."""
    folder = tmp_path_factory.mktemp("bos-model") / "tiny-bos"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bos_id = tokenizer.convert_tokens_to_ids(BOS)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                                   special_tokens=[(BOS, bos_id)])
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model", ["tiny", "bos"])
def test_a_text_prompt_is_tokenized_as_the_trainer_tokenized_prompts(model, tiny_model_dir, bos_model_dir):
    folder = bos_model_dir if model == "bos" else tiny_model_dir
    node = Node.build(InferenceConfig(base_model=folder, kv_cache_mb=2))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        prompt = "Q: what is an index fund?\nA:"
        trained = encode_prompt_completion(tokenizer, prompt, " a fund").input_ids
        served = node.encode(Prompt(text=prompt))
        assert trained[:len(served)] == served and len(served) == len(tokenizer(prompt)["input_ids"])
        assert (served[0] == tokenizer.bos_token_id) == (model == "bos")
    finally:
        node.close()


def test_an_empty_text_prompt_is_still_refused_when_the_tokenizer_adds_bos(bos_model_dir):
    node = Node.build(InferenceConfig(base_model=bos_model_dir, kv_cache_mb=2))
    try:
        with pytest.raises(Exception, match="the prompt is empty"):
            node.encode(Prompt(text=""))
    finally:
        node.close()
