"""Our Llama-family model (Llama 2/3, Mistral, Qwen2 with qkv bias, Qwen3 with q/k norm).

The forward takes a packed ragged batch — all scheduled tokens of all sequences
concatenated — plus one StepContext. Parameter names mirror Hugging Face checkpoints so
weights load by name. LoRA enters only through LoRALinear and the step's LoraBatch.

With `use_fused_ops(True)` (the runner's Triton kernels) the element-wise work between the
GEMMs goes through kernels/triton_fused.py: residual add + RMSNorm in one kernel, rotary on q
and k with the KV-cache write in one, SiLU-and-mul in one. The PyTorch code below stays the
reference those kernels are tested against, and the CPU path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.inference.kernels.triton_fused import add_rms_norm, rms_norm, rotary_write_kv, silu_mul
from services.inference.model.attention import paged_attention, write_kv
from services.inference.model.config import LORA_MODULES, ModelArgs
from services.inference.model.context import StepContext
from services.inference.model.layers import FusedProjections, LoRALinear, RMSNorm, RotaryEmbedding, apply_rotary


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        q_out, kv_out = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.q_proj = LoRALinear(args.hidden_size, q_out, args.qkv_bias, layer, "q_proj")
        self.k_proj = LoRALinear(args.hidden_size, kv_out, args.qkv_bias, layer, "k_proj")
        self.v_proj = LoRALinear(args.hidden_size, kv_out, args.qkv_bias, layer, "v_proj")
        self.o_proj = LoRALinear(q_out, args.hidden_size, args.o_bias, layer, "o_proj")
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        self.qk_norm = args.qk_norm
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.scale = args.head_dim ** -0.5
        self.k_cache = torch.empty(0)  # [num_blocks, block_size, kv_heads, head_dim], set by the runner
        self.v_cache = torch.empty(0)
        self.fused = False  # rotary + KV write in one Triton kernel (LlamaForCausalLM.use_fused_ops)
        self.qkv: FusedProjections | None = None  # q|k|v in one GEMM, with the fused ops

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        tokens = x.shape[0]
        if self.fused:  # use_fused_ops made self.qkv
            q, k, v = self.qkv(x, ctx.lora)
        else:
            q, k, v = self.q_proj(x, ctx.lora), self.k_proj(x, ctx.lora), self.v_proj(x, ctx.lora)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.fused:
            rotary_write_kv(q, k, v, cos, sin, self.k_cache, self.v_cache, ctx.slot_mapping)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            write_kv(self.k_cache, self.v_cache, k, v, ctx.slot_mapping)
        out = paged_attention(q, self.k_cache, self.v_cache, ctx, self.scale, k, v)
        return self.o_proj(out.reshape(tokens, -1), ctx.lora)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        hidden, inner, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = LoRALinear(hidden, inner, bias, layer, "gate_proj")
        self.up_proj = LoRALinear(hidden, inner, bias, layer, "up_proj")
        self.down_proj = LoRALinear(inner, hidden, bias, layer, "down_proj")
        self.fused = False  # SiLU-and-mul in one Triton kernel (LlamaForCausalLM.use_fused_ops)
        self.gate_up: FusedProjections | None = None  # gate|up in one GEMM, with the fused ops

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if self.fused:  # use_fused_ops made self.gate_up
            gate, up = self.gate_up(x, ctx.lora)
            return self.down_proj(silu_mul(gate, up), ctx.lora)
        return self.down_proj(F.silu(self.gate_proj(x, ctx.lora)) * self.up_proj(x, ctx.lora), ctx.lora)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args, layer)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)

    def forward_fused(self, normed: torch.Tensor, residual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      ctx: StepContext, next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """forward() with each residual add fused into the RMSNorm after it: takes this layer's
        input_layernorm(x) and x, returns next_norm(output) and the output (the next residual)."""
        normed, residual = add_rms_norm(self.self_attn(normed, cos, sin, ctx), residual,
                                        self.post_attention_layernorm.weight, self.post_attention_layernorm.eps)
        return add_rms_norm(self.mlp(normed, ctx), residual, next_norm.weight, next_norm.eps)


class LlamaBackbone(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary = RotaryEmbedding(args)


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = LlamaBackbone(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.fused = False

    def use_fused_ops(self, enabled: bool) -> None:
        """Element-wise work through kernels/triton_fused.py (GPU, or CPU under TRITON_INTERPRET=1),
        and q|k|v and gate|up each as one GEMM (layers.FusedProjections; fused once, kept after)."""
        self.fused = enabled
        for layer in self.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            attention.fused = mlp.fused = enabled
            if enabled and attention.qkv is None:
                attention.qkv = FusedProjections([attention.q_proj, attention.k_proj, attention.v_proj])
                mlp.gate_up = FusedProjections([mlp.gate_proj, mlp.up_proj])
        if enabled and self.lm_head.weight.is_cuda:  # the unfused weights' blocks back to the device
            torch.cuda.empty_cache()

    def lora_launch_groups(self) -> list[list[str]]:
        """The modules each LoRA launch pair of a layer serves: one pair for q|k|v and one for
        gate|up with the fused ops (their GEMMs are fused too), else one per module."""
        if self.fused:
            return [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
        return [[m] for m in LORA_MODULES]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """input_ids: [T] packed tokens -> hidden states [T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary(ctx.positions, x.dtype)
        layers = self.model.layers
        if self.fused and len(layers):
            first = layers[0].input_layernorm
            normed = rms_norm(x, first.weight, first.eps)
            for i, layer in enumerate(layers):
                next_norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
                normed, x = layer.forward_fused(normed, x, cos, sin, ctx, next_norm)
            return normed
        for layer in layers:
            x = layer(x, cos, sin, ctx)
        return self.model.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> float32 logits [N, vocab]."""
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.model.layers]
