"""Our Llama-family model (Llama 2/3, Mistral, Qwen2 with qkv bias, Qwen3 with q/k norm).

The forward takes a packed ragged batch — all scheduled tokens of all sequences
concatenated — plus one StepContext. Parameter names mirror Hugging Face checkpoints so
weights load by name. LoRA enters only through LoRALinear and the step's LoraBatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.inference.model.attention import paged_attention, write_kv
from services.inference.model.config import ModelArgs
from services.inference.model.context import StepContext
from services.inference.model.layers import LoRALinear, RMSNorm, RotaryEmbedding, apply_rotary


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_proj(x, ctx.lora).view(tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x, ctx.lora).view(tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, ctx.lora).view(tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
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

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
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

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """input_ids: [T] packed tokens -> hidden states [T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary(ctx.positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, ctx)
        return self.model.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> float32 logits [N, vocab]."""
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.model.layers]
