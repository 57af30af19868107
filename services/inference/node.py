"""The inference node's domain API: prompts in, token deltas out (no grpc here).

`Node.build` loads the tokenizer and model, sizes the KV cache and adapter pool from the
config, and wires scheduler, runner, adapter tiers and the async engine together.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer

from services.common.errors import InvalidArgument
from services.inference.adapters.manager import AdapterManager, parse_runner
from services.inference.adapters.pool import AdapterPool
from services.inference.adapters.sources import AdapterSource, LocalFolderSource
from services.inference.chat_template import ChatTurn, render
from services.inference.config import InferenceConfig
from services.inference.engine.async_engine import AsyncEngine
from services.inference.engine.block_manager import BlockManager
from services.inference.engine.decode_graphs import CAPTURE, resolve_graph_mode
from services.inference.engine.llm_engine import LLMEngine, RequestOutput
from services.inference.engine.model_runner import ModelRunner, kv_block_bytes
from services.inference.engine.sampling_params import SamplingParams
from services.inference.engine.scheduler import Scheduler, SchedulerConfig
from services.inference.engine.structured import GrammarCompiler
from services.inference.engine.torch_thread import TorchThread
from services.inference.kernels.backend import resolve_kernels
from services.inference.kernels.prefill_lora import resolve_prefill_lora
from services.inference.model.config import ModelArgs, load_model_args
from services.inference.model.loader import load_model, random_model
from services.inference.reasoning_format import kept_tag_ids
from services.inference.reasoning_format import resolve as resolve_reasoning_format
from services.inference.startup_phases import StartupPhases
from services.inference.token_bytes import longest_token_bytes, special_token_ids
from services.inference.tool_format import kept_marker_ids
from services.inference.tool_format import resolve as resolve_tool_format

log = logging.getLogger("loraplex.inference")

_SHA256 = re.compile(r"[0-9a-f]{64}")
#: Threads compiling structured-output schemas (see Node.__init__); llguidance releases the GIL.
GRAMMAR_THREADS = 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Prompt:
    """Exactly one of text (raw), messages (chat template; with tools_json, the tool definitions
    it shows) or token_ids. Any sequence will do: the servicer hands over views of the request,
    not copies (see encode)."""

    text: str | None = None
    messages: Sequence[ChatTurn] | None = None
    token_ids: Sequence[int] | None = None
    tools_json: str = ""
    template_kwargs_json: str = ""  # extra chat-template variables (chat_template.template_kwargs)


def resolve_dtype(config: InferenceConfig) -> torch.dtype:
    if config.dtype == "auto":
        return torch.float32 if config.device == "cpu" else torch.bfloat16
    return DTYPES[config.dtype]


class Node:
    def __init__(self, config: InferenceConfig, tokenizer, args: ModelArgs, pool: AdapterPool,
                 manager: AdapterManager, engine: LLMEngine, num_kv_blocks: int, max_context: int,
                 torch_thread: TorchThread, startup_seconds: dict[str, float] | None = None) -> None:
        self.config, self.tokenizer, self.args = config, tokenizer, args
        self.startup_seconds = startup_seconds or {}  # phase -> seconds of Node.build (startup_phases.py)
        self.pool, self.manager, self.engine = pool, manager, engine
        self.num_kv_blocks, self.max_context = num_kv_blocks, max_context
        # No token covers more bytes than this, so a prompt longer than max_context of them
        # cannot fit: refused before the tokenizer spends seconds on it (see encode).
        self.max_prompt_bytes = max_context * longest_token_bytes(tokenizer)
        self.async_engine = AsyncEngine(engine, torch_thread)
        self.dtype = resolve_dtype(config)
        self.grammars = GrammarCompiler(tokenizer, args.vocab_size, args.eos_token_ids)
        # Compiling a large schema takes up to a second: on the default executor (a few threads
        # on a small host, shared with tokenizing) a burst of them held up every prompt's
        # tokenizing, free requests' included. Here they wait for each other only.
        self._grammar_threads = ThreadPoolExecutor(GRAMMAR_THREADS, thread_name_prefix="grammar")
        #: How the model writes tool calls ("" for no known way), and which of that format's
        #: markers are special tokens, kept in the text of requests that show tools.
        self.tool_call_format = resolve_tool_format(config.tool_call_format, tokenizer)
        self.tool_markers = kept_marker_ids(tokenizer, self.tool_call_format, special_token_ids(tokenizer))
        #: "think" when the model thinks in <think> blocks (reasoning_format.py), and those tags
        #: that are special tokens, kept in the text of chat requests.
        self.reasoning_format = resolve_reasoning_format(config.reasoning_format, tokenizer)
        self.reasoning_tags = kept_tag_ids(tokenizer, special_token_ids(tokenizer)) if self.reasoning_format else ()

    @classmethod
    def build(cls, config: InferenceConfig, source: AdapterSource | None = None,
              random_weights: bool = False) -> Node:
        """Loads everything on the node's torch thread (see engine/torch_thread.py).
        random_weights: the checkpoint's shapes with random values (benchmarks only)."""
        torch_thread = TorchThread()
        return torch_thread.run(lambda: cls._build(config, source, random_weights, torch_thread))

    @classmethod
    def _build(cls, config: InferenceConfig, source: AdapterSource | None, random_weights: bool,
               torch_thread: TorchThread) -> Node:
        dtype = resolve_dtype(config)
        folder = Path(config.base_model)
        load_model_args(folder)  # a clear error for a wrong folder before anything else reads it
        phases = StartupPhases(config.device)
        with phases.phase("weights"):
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            if random_weights:
                model, args = random_model(folder, dtype=dtype, device=config.device)
            else:
                model, args = load_model(folder, dtype=dtype, device=config.device)
        max_context = min(config.max_model_len or args.max_position_embeddings, args.max_position_embeddings)
        pool = AdapterPool(args, config.adapter_pool_pages, dtype=dtype, device=config.device)
        kernels = resolve_kernels(config.kernels, config.device)
        graphs = resolve_graph_mode(config.cuda_graphs, config.device, kernels)
        # Measured (with auto on CUDA) before the KV cache takes its share of the free memory:
        # the trial step's buffers are returned to the device first.
        with phases.phase("prefill LoRA tuning"):
            prefill_lora = resolve_prefill_lora(config.prefill_lora, kernels, config.device, pool.shapes(), dtype,
                                                tokens=config.max_batched_tokens)
        num_kv_blocks = max(2, _kv_cache_bytes(config) // kv_block_bytes(model, config.block_size, dtype))
        if source is None:
            source = LocalFolderSource(config.adapter_dir) if config.adapter_dir else _registry_source(config)
        manager = AdapterManager(pool, args, source, config.host_cache_mb * 1024 * 1024, config.max_adapter_rank)
        runner = ModelRunner(model, pool, num_kv_blocks, config.block_size, dtype=dtype, device=config.device,
                             kernels=kernels, graphs=graphs, max_graph_batch=min(config.max_graph_batch,
                                                                                 config.max_num_seqs),
                             max_context=max_context, max_rank=config.max_adapter_rank, prefill_lora=prefill_lora,
                             decode_lora=config.decode_lora_tuning,
                             lora_beside_gemm=config.decode_lora_beside_gemm,
                             tuning_cache_dir=config.tuning_cache_dir, phases=phases)
        scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_batched_tokens,
                            max_waiting=config.max_waiting),
            BlockManager(num_kv_blocks, config.block_size, prefix_caching=config.prefix_caching), manager,
            set(args.eos_token_ids), max_context)
        # auto: only where the device runs ahead of the host; elsewhere each step's work is done
        # by the time it returns, and a look-ahead would only compute dropped rows.
        overlap = config.overlap_steps == "on" or (config.overlap_steps == "auto" and graphs == CAPTURE)
        engine = LLMEngine(runner, scheduler, tokenizer, config.block_size, overlap=overlap)
        log.info("loaded %s (%s, %s, %s kernels, CUDA graphs %s, overlapped steps %s, prefill LoRA %s) with %d KV "
                 "blocks (prefix caching %s), %d adapter pages, tool calls %s", folder, args.model_type, dtype, kernels,
                 graphs, "on" if overlap else "off", runner.prefill_lora.summary(), num_kv_blocks,
                 "on" if config.prefix_caching else "off",
                 config.adapter_pool_pages, resolve_tool_format(config.tool_call_format, tokenizer) or "none")
        if runner.prefill_lora.report:
            log.info("prefill LoRA kernels measured (median µs, or why dropped): %s", runner.prefill_lora.report)
        if runner.decode_lora.error is not None:
            log.warning("decode LoRA launches: %s", runner.decode_lora.summary())
        elif runner.decode_lora.report:
            log.info("decode LoRA launches %s", runner.decode_lora.summary())
        log.info("engine ready in %s", phases.summary())
        return cls(config, tokenizer, args, pool, manager, engine, num_kv_blocks, max_context, torch_thread,
                   dict(phases.seconds))

    def start(self) -> None:
        """Starts the engine thread (call from the event loop that will consume outputs)."""
        self.manager.loop = asyncio.get_running_loop()
        self.manager.on_arrival = self.async_engine.wake
        self.manager.fail_waiting = self.async_engine.fail_adapter
        self.manager.run_parse = parse_runner(self.pool.device, self.async_engine.call)
        self.async_engine.start()

    def close(self) -> None:
        self.async_engine.stop()
        self._grammar_threads.shutdown(wait=False, cancel_futures=True)

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt; INVALID_ARGUMENT for bad input. Runs off the event loop
        (tokenizers release the GIL), and refuses a prompt too big for the context by its
        size alone: a 64 MB prompt would otherwise keep a core busy for a minute."""
        if prompt.messages is not None and len(prompt.messages) >= self.max_context:
            # Every turn costs at least its role marker. Rendering the template is pure Python
            # holding the GIL: 300 000 empty turns (a 2.4 MB request) took 11 s here, every other
            # stream slowed ninefold meanwhile, and the prompt was refused afterwards anyway.
            raise InvalidArgument(f"a conversation of {len(prompt.messages)} messages does not fit the context of "
                                  f"{self.max_context} tokens", field="messages", messages=len(prompt.messages),
                                  max_context=self.max_context)
        text_bytes = (sum(turn.text_bytes() for turn in prompt.messages or ()) + len((prompt.text or "").encode())
                      + len(prompt.tools_json.encode()))
        if text_bytes > self.max_prompt_bytes:
            raise InvalidArgument(f"prompt of {text_bytes} bytes does not fit the context of {self.max_context} "
                                  f"tokens (no token here covers more than {self.max_prompt_bytes // self.max_context} "
                                  "bytes)", field="prompt", prompt_bytes=text_bytes, max_context=self.max_context)
        if prompt.token_ids is not None:
            if len(prompt.token_ids) >= self.max_context:  # before reading every id of a huge list
                raise InvalidArgument(f"prompt of {len(prompt.token_ids)} tokens does not fit the context of "
                                      f"{self.max_context}", field="prompt", prompt_tokens=len(prompt.token_ids),
                                      max_context=self.max_context)
            ids = list(prompt.token_ids)
            if any(not 0 <= t < self.args.vocab_size for t in ids):
                raise InvalidArgument(f"token ids must be in [0, {self.args.vocab_size})", field="token_ids")
        elif prompt.messages is not None:
            if not prompt.messages:  # the chat template raises on it: that would be INTERNAL
                raise InvalidArgument("messages must hold at least one message", field="messages")
            ids = render(self.tokenizer, prompt.messages, prompt.tools_json, prompt.template_kwargs_json)
        elif prompt.text:
            # With the tokenizer's special tokens (a leading BOS for Llama and Mistral), as the
            # trainer tokenizes prompt/completion examples and as HF and vLLM's completions do:
            # an adapter trained with BOS must not be served without it.
            ids = self.tokenizer.encode(prompt.text, add_special_tokens=True)
        else:
            ids = []
        if not ids:
            raise InvalidArgument("the prompt is empty", field="input")
        return ids

    async def generate(self, prompt: Prompt, sampling: SamplingParams, adapter_id: str = "", sha256: str = "",
                       request_id: str = "", cache_scope: str = "",
                       on_prompt: Callable[[list[int]], None] | None = None) -> AsyncIterator[RequestOutput]:
        """Validates, fetches the adapter if needed (this request waits, others run), streams.
        cache_scope: the request shares cached prompt KV only with requests of the same scope.
        on_prompt: called with the prompt's token ids once encoded (before any output)."""
        token_ids = await asyncio.to_thread(self.encode, prompt)  # other requests' streams keep flowing
        if on_prompt is not None:
            on_prompt(token_ids)
        sampling = sampling.validate(len(token_ids), self.max_context, self.args.vocab_size)
        kept = (self.tool_markers if prompt.tools_json else ()) + (self.reasoning_tags if prompt.messages else ())
        if kept:  # markup the router's parsers read must stay in the text
            sampling = dataclasses.replace(sampling, kept_special_ids=kept)
        grammar = None
        if sampling.json_schema is not None:  # compiling takes up to a second: off the loop too
            grammar = await asyncio.get_running_loop().run_in_executor(self._grammar_threads, functools.partial(
                self.grammars.compile, sampling.json_schema, request_id, cache_scope))
        sha256 = expected_digest(sha256)
        # A hit: the bytes asked for are on the device as the request arrives (counted once queued).
        hit = bool(adapter_id) and self.manager.on_device(adapter_id, sha256)
        # A resident adapter needs no host copy (if it is evicted before this request is
        # scheduled, the scheduler asks for a re-fetch): with a host tier smaller than the
        # device pool, fetching here would re-read it from its source on every request.
        if adapter_id and not hit:
            weights = await self.manager.ensure_host(adapter_id, sha256)
            await self.async_engine.call(lambda: self.manager.check_room(adapter_id, weights.rank))
        on_queued = (lambda: self.manager.count_request(hit)) if adapter_id else (lambda: None)
        async for output in self.async_engine.generate(token_ids, sampling, adapter_id or None, request_id, sha256,
                                                       cache_scope, on_queued, grammar):
            yield output


def expected_digest(sha256: str) -> str:
    """The expected adapter digest in the form adapters are hashed to (lowercase hex): a
    malformed one could never match, so it is the caller's mistake, not a mismatch."""
    digest = sha256.lower()
    if digest and not _SHA256.fullmatch(digest):
        raise InvalidArgument(f"adapter.sha256 must be 64 hex digits, got {sha256[:80]!r}", field="adapter.sha256")
    return digest


def _kv_cache_bytes(config: InferenceConfig) -> int:
    if config.kv_cache_mb:
        return config.kv_cache_mb * 1024 * 1024
    torch.cuda.empty_cache()  # memory freed while building (e.g. a random init's temporaries) counts as free
    free, _ = torch.cuda.mem_get_info(torch.device(config.device))
    return int(free * 0.9)  # leave room for activations and CUDA graphs


def _registry_source(config: InferenceConfig) -> AdapterSource:
    from services.inference.adapters.registry_source import RegistrySource

    return RegistrySource(config.registry_address, config.admin_token, client_tls=config.client_tls)
