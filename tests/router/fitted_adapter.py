"""A base model served with one adapter fitted in the test to write an exact answer, so tests
of how the router reads a model's text (tool calls, thinking) read text a node really generated.

The adapter is fitted with peft on one example (the chat-templated prompt the node renders, then
the answer and the end of turn) until greedy decoding reproduces the answer by a margin the
node's numerics cannot undo; a few dozen steps on the CPU. The base model is the tiny random one
under a chat template of the test's choosing, registered under its own name."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.tiny_model import build_model_folder, build_tokenizer
from tests.conftest import stop_process, wait_for_health
from tests.registry.client import unique
from tests.registry.lora_files import ALL_MODULES, AdapterFiles
from tests.router.harness import InProcessRouter, NodeProcess, router_config


def fit_lora(model_dir: Path, prompt: list[int], answer: str, out: Path) -> AdapterFiles:
    """A LoRA adapter that makes greedy decoding write `answer` (then <|im_end|>) after `prompt`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    ids = torch.tensor([prompt + answer_ids])
    labels = ids.clone()
    labels[0, :len(prompt)] = -100
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(
            r=8, lora_alpha=16, target_modules=ALL_MODULES, lora_dropout=0.0, task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.tensor(answer_ids)
    for _ in range(300):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # every next token the argmax, by a margin the node's numerics cannot undo
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
            chosen = logits.gather(1, target[:, None])[:, 0]
            if (chosen - logits.scatter(1, target[:, None], -1e9).max(1).values).min() > 3:
                break
    else:
        raise AssertionError("the adapter did not learn the answer")
    model.save_pretrained(out)
    return AdapterFiles((out / "adapter_config.json").read_bytes(), (out / "adapter_model.safetensors").read_bytes())


@contextlib.contextmanager
def serve_fitted(world, root: Path, base: str, template: str,
                 fit: Callable[[Path, Path], AdapterFiles]) -> Iterator[tuple[InProcessRouter, str]]:
    """(router, deployment of the adapter `fit(model_dir, out)` makes) over one node serving
    `base`: the tiny model under `template`."""
    model_dir = build_model_folder(root / base)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = template
    tokenizer.save_pretrained(model_dir)
    world.admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name=base, location=str(model_dir)))
    node = NodeProcess(model_dir, world.registry.address, root / "node.log", base_model_name=base)
    try:
        files = fit(model_dir, root / "adapter")  # while the node starts
        adapter = unique("fitted")
        world.a.upload(files, name=adapter, as_files=True, base_model=base)
        deployment = unique("fitted")
        world.a.BindDeployment(pb.BindDeploymentRequest(name=deployment, adapter_name=adapter))
        wait_for_health(node.address, timeout=120, process=node.process)
        router = InProcessRouter(router_config([node.address], world.registry.address)).start()
        try:
            router.wait_feed_live()
            router.wait_healthy(1)
            yield router, deployment
        finally:
            router.stop()
    finally:
        node.close()
        stop_process(node.process)
