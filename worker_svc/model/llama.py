"""A Llama-family decoder in plain PyTorch, written for a paged KV pool.

RMSNorm, RoPE (rotate-half layout, keys stored after rotation), grouped-query attention,
SwiGLU, optional tied embeddings. The model sees a flat batch of T new tokens from many
sequences (prefill chunks and decode tokens mixed); attention over each sequence's cached
context is delegated to an AttentionBackend, which owns the pool layout.

Weights are fused at load time (q|k|v and gate|up) so a decoder layer is four matmuls.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class AttentionBackend(Protocol):
    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: object) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] (k already rotated) -> out [T, H, D].

        Writes k/v into the pool at meta's slot mapping, then attends over each sequence's
        context in the pool."""


class RotaryEmbedding:
    """cos/sin tables for every position, built once; indexed per step."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
        t = torch.arange(max_positions, dtype=torch.float64, device=device)
        freqs = torch.outer(t, inv_freq)              # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)       # [P, D]
        self.cos = emb.cos().to(dtype)
        self.sin = emb.sin().to(dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [T, 1, D] each: broadcast over heads.
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; rotate-half form: (x1, x2) -> (x1*cos - x2*sin, x2*cos + x1*sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.eps = cfg.rms_norm_eps
        self.input_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=False)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=False)
        self.post_attn_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, layer_idx: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionBackend, meta: object) -> torch.Tensor:
        T = x.shape[0]
        h = F.rms_norm(x, (x.shape[-1],), self.input_norm, self.eps)
        q, k, v = self.qkv_proj(h).split(self.split, dim=-1)
        q = apply_rope(q.view(T, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(T, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        o = attn.forward(layer_idx, q, k, v, meta)                      # [T, H, D]
        x = x + self.o_proj(o.reshape(T, -1))
        h = F.rms_norm(x, (x.shape[-1],), self.post_attn_norm, self.eps)
        gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope: RotaryEmbedding | None = None

    def init_rope(self, max_positions: int) -> None:
        w = self.embed_tokens.weight
        self.rope = RotaryEmbedding(self.cfg.head_dim, max_positions, self.cfg.rope_theta, w.dtype, w.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend,
                meta: object) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden] (normed)."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope.lookup(positions)
        for i, layer in enumerate(self.layers):
            x = layer(i, x, cos, sin, attn, meta)
        return F.rms_norm(x, (x.shape[-1],), self.norm, self.cfg.rms_norm_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in float32."""
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, w).float()

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state: dict[str, torch.Tensor],
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> "LlamaModel":
        """Build from Hugging Face parameter names, fusing q|k|v and gate|up."""
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device=device).to(dtype)

        def take(name: str) -> torch.Tensor:
            return state[name].to(device=device, dtype=dtype)

        with torch.no_grad():
            model.embed_tokens.weight.copy_(take("model.embed_tokens.weight"))
            model.norm.copy_(take("model.norm.weight"))
            if model.lm_head is not None:
                model.lm_head.weight.copy_(take("lm_head.weight"))
            for i, layer in enumerate(model.layers):
                p = f"model.layers.{i}."
                layer.input_norm.copy_(take(p + "input_layernorm.weight"))
                layer.post_attn_norm.copy_(take(p + "post_attention_layernorm.weight"))
                layer.qkv_proj.weight.copy_(torch.cat(
                    [take(p + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")]))
                layer.o_proj.weight.copy_(take(p + "self_attn.o_proj.weight"))
                layer.gate_up_proj.weight.copy_(torch.cat(
                    [take(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")]))
                layer.down_proj.weight.copy_(take(p + "mlp.down_proj.weight"))
        model.init_rope(cfg.max_position_embeddings)
        return model.eval().requires_grad_(False)
