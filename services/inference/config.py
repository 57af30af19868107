"""Inference node configuration (flags / LORAPLEX_* env, see services/common/config.py)."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

from services.common.config import ClientTlsConfig, ServerConfig, option
from services.inference.kernels.backend import CHOICES as KERNEL_CHOICES
from services.inference.kernels.decode_lora_tuning import CHOICES as DECODE_LORA_TUNING_CHOICES
from services.inference.kernels.prefill_lora import CHOICES as PREFILL_LORA_CHOICES
from services.inference.kernels.streams import CHOICES as BESIDE_CHOICES
from services.inference.reasoning_format import CHOICES as REASONING_FORMATS
from services.inference.tool_format import CHOICES as TOOL_CALL_FORMATS

GRAPH_MODES = ("auto", "on", "off", "static")
OVERLAP_MODES = ("auto", "on", "off")

DEFAULT_PORT = 50053


@dataclasses.dataclass(frozen=True)
class InferenceConfig(ClientTlsConfig, ServerConfig):
    """loraplex Inference node: resident base model, paged adapter pool, batched LoRA."""

    port: int = option(DEFAULT_PORT, "gRPC port")
    metrics_port: int = option(9403, "Prometheus /metrics HTTP port (0 disables it)")
    base_model: Path | None = option(None, "Hugging Face checkpoint folder of the base model (required)")
    base_model_name: str = option("", "the base model's name in the Registry (default: the --base-model folder's "
                                      "name)")
    node_id: str = option("", "stable node id (default: hostname:port)")
    device: str = option("cpu", "torch device: cpu, cuda, cuda:1 ...")
    dtype: str = option("auto", "float32, bfloat16, float16 or auto (float32 on cpu, bfloat16 on cuda)")
    max_model_len: int = option(0, "context length in tokens (0: the model's max_position_embeddings)")
    block_size: int = option(16, "tokens per paged-KV block")
    kv_cache_mb: int = option(256, "memory for the paged KV cache, in MiB (0: 90%% of the device memory "
                                   "left free after weights and adapter pool; CUDA only)")
    max_num_seqs: int = option(64, "sequences running at once")
    max_batched_tokens: int = option(2048, "tokens per forward pass (prefill chunks + decodes)")
    max_waiting: int = option(256, "queued requests before RESOURCE_EXHAUSTED")
    prefix_caching: bool = option(True, "reuse the KV of full prompt blocks already computed for a request of the "
                                        "same cache scope (the router's tenant) and adapter bytes, computing only "
                                        "the rest (off: every prompt is computed in full)")
    adapter_pool_pages: int = option(1024, "device adapter pool size in pages (one page = one rank of one "
                                           "adapter across all layers and projections)")
    max_adapter_rank: int = option(64, "largest LoRA rank this node accepts")
    host_cache_mb: int = option(2048, "host-memory tier for adapters, in MiB")
    adapter_dir: Path | None = option(None, "serve adapters from this folder (one PEFT folder per adapter id) "
                                            "instead of downloading them from the Registry")
    registry_address: str = option("127.0.0.1:50051", "host:port of the Registry (adapter downloads)")
    admin_token: str = option("", "token presented to the Registry for downloads and to the router; "
                                  "when set, every call to this node must present it too")
    router_address: str = option("", "register with this router (host:port) and heartbeat load and resident "
                                     "adapters (empty: the router lists this node statically)")
    advertise_address: str = option("", "host:port the router should dial (default: --host:--port; with --host "
                                        "0.0.0.0 or ::, this machine's hostname:--port)")
    kernels: str = option("auto", "LoRA and attention kernels: torch, triton (with varlen prefill attention), or "
                                  "auto (Triton on CUDA, verified on the H200 against HF + peft; PyTorch elsewhere)")
    cuda_graphs: str = option("auto", "decode steps replayed from CUDA graphs: auto (on CUDA with Triton kernels), on, "
                                      "off, or static (the same static-buffer step without capture, for debugging)")
    overlap_steps: str = option("auto", "queue each decode step on the device before reading the last one's tokens, "
                                        "so the host's work per step hides behind the GPU's: auto (with captured "
                                        "CUDA graphs), on, off")
    max_graph_batch: int = option(64, "largest decode batch given a CUDA graph (bigger batches run eagerly)")
    prefill_lora: str = option("auto", "kernel for the LoRA of prefill segments with --kernels triton: tiles16, "
                                       "tiles32, tiles64 (Triton tiles of that many rows), grouped (CUTLASS "
                                       "grouped GEMM), or auto (measured per projection shape at start-up on CUDA)")
    decode_lora_tuning: str = option("auto", "the LoRA launches of captured decode graphs: auto (out-block width and "
                                             "split-K measured per shape at start-up on the GPU), or off (the "
                                             "kernels' defaults)")
    decode_lora_beside_gemm: str = option("auto", "where captured decode graphs run each LoRA against its base "
                                                  "GEMM, which reads the same input: off (after it), shrink (its "
                                                  "shrink beside it on a second CUDA stream), lora (all of it "
                                                  "beside it), or auto (measured per shape at start-up with "
                                                  "--decode-lora-tuning auto, else off)")
    tuning_cache_dir: Path | None = option(None, "keep what start-up measures (the decode LoRA launches) in this "
                                                 "folder and reuse it when a node starts again on the same GPU, "
                                                 "software and shapes (default: measure at every start)")
    tool_call_format: str = option("auto", "how the model writes tool calls, for OpenAI's tool_choice auto: hermes "
                                           "(<tool_call> blocks: Qwen, Hermes), llama3_json (Llama 3.1/3.2), "
                                           "mistral ([TOOL_CALLS]), none (never read calls), or auto (told by "
                                           "the chat template)")
    reasoning_format: str = option("auto", "how the model thinks before answering, for the OpenAI API's "
                                           "reasoning_content: think (<think> blocks: Qwen3, QwQ, DeepSeek-R1), "
                                           "none (all text is the answer), or auto (told by the chat template)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base_model is None:
            raise ValueError("--base-model is required: a Hugging Face checkpoint folder "
                             "(build a test one with `loraplex model tiny DIR`)")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.kv_cache_mb < 0 or (self.kv_cache_mb == 0 and not self.device.startswith("cuda")):
            raise ValueError("--kv-cache-mb must be >= 1 (0, sized from free memory, needs a CUDA device)")
        positive = ("block_size", "max_num_seqs", "max_batched_tokens", "max_waiting",
                    "adapter_pool_pages", "max_adapter_rank", "host_cache_mb")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        choices = {"kernels": KERNEL_CHOICES, "cuda_graphs": GRAPH_MODES, "prefill_lora": PREFILL_LORA_CHOICES,
                   "decode_lora_tuning": DECODE_LORA_TUNING_CHOICES, "decode_lora_beside_gemm": BESIDE_CHOICES,
                   "tool_call_format": TOOL_CALL_FORMATS, "reasoning_format": REASONING_FORMATS,
                   "overlap_steps": OVERLAP_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        if self.max_graph_batch < 1:
            raise ValueError(f"--max-graph-batch must be >= 1, got {self.max_graph_batch}")
        if self.max_model_len < 0:
            raise ValueError("--max-model-len must be >= 0")

    @property
    def resolved_base_model_name(self) -> str:
        # The folder's name, as vLLM serves a model under its path: a fixed default ("tiny", once)
        # named every checkpoint the same, so a Llama node answered requests for the tiny model.
        return self.base_model_name or (self.base_model.name if self.base_model is not None else "")

    @property
    def resolved_node_id(self) -> str:
        return self.node_id or f"{socket.gethostname()}:{self.port}"

    @property
    def resolved_advertise_address(self) -> str:
        if self.advertise_address:
            return self.advertise_address
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{host}:{self.port}"
