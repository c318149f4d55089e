"""A Llama-family decoder in plain PyTorch, written for a paged KV pool.

RMSNorm, RoPE (keys stored after rotation, interleaved pairs), grouped-query attention,
SwiGLU, optional tied embeddings. The model sees a flat batch of T new tokens from many
sequences (prefill chunks and decode tokens mixed); attention over each sequence's cached
context is delegated to an AttentionBackend, which owns the pool layout.

Weights are fused at load time (q|k|v and gate|up) so a decoder layer is four matmuls.
Those run through torch (MKL on a CPU) unless `use_linear` installs another GEMM for
steps of up to a given number of rows (the C++ one on a CPU: cpu_decode.py says why).
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


# x [T, K], w [N, K] -> x @ w^T [T, N]; x contiguous.
Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class AttentionBackend(Protocol):
    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: object) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] (k already rotated) -> out [T, H, D].

        Writes k/v into the pool at meta's slot mapping, then attends over each sequence's
        context in the pool."""


class RotaryEmbedding:
    """Rotations for every position as complex numbers, built once; indexed per step.

    We keep q and k in the *interleaved* pair layout (head_dim element 2i pairs with
    2i+1), as llama.cpp does, instead of Hugging Face's rotate-half layout (i pairs with
    i + D/2): `from_state_dict` permutes the q and k projection rows to match. Attention
    only sees q . k, and the same permutation of head_dim on both sides leaves every dot
    product unchanged, so outputs are identical; the gain is that RoPE becomes one complex
    multiply over q and k together. Keys are stored rotated, in this layout.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, device: torch.device | str = "cpu"):
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64, device=device), inv_freq)
        self.freqs = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)   # [P, D/2]

    def lookup(self, positions: torch.Tensor) -> torch.Tensor:
        return self.freqs[positions].unsqueeze(1)                                        # [T, 1, D/2]


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] in interleaved pairs, rotated by freqs [T, 1, D/2]."""
    T, heads, D = x.shape
    pairs = torch.view_as_complex(x.float().reshape(T, heads, D // 2, 2))
    return torch.view_as_real(pairs * freqs).reshape(T, heads, D).to(x.dtype)


def interleave_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Permute projection rows from rotate-half to interleaved pairs, head by head:
    new row 2i (2i+1) of a head is old row i (i + D/2)."""
    rows, cols = w.shape
    d = rows // num_heads
    return w.view(num_heads, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols)


# A layer's matrices as the model holds them (fused), and fused_matrix makes each.
FUSED_MATRICES = ("qkv", "o", "gate_up", "down")


def fused_matrix(cfg: ModelConfig, layer: int, which: str, take) -> torch.Tensor:
    """Layer `layer`'s matrix `which` from Hugging Face tensors (`take(name)`; rows of any
    dtype: fp32 weights, or GGUF blocks): q|k|v with q and k rows in interleaved RoPE
    pairs, o, gate|up, down."""
    p = f"model.layers.{layer}."
    if which == "qkv":
        return torch.cat([interleave_rope_rows(take(p + "self_attn.q_proj.weight"), cfg.num_heads),
                          interleave_rope_rows(take(p + "self_attn.k_proj.weight"), cfg.num_kv_heads),
                          take(p + "self_attn.v_proj.weight")])
    if which == "gate_up":
        return torch.cat([take(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")])
    if which in ("o", "down"):
        return take(p + ("self_attn.o_proj.weight" if which == "o" else "mlp.down_proj.weight"))
    raise ValueError(f"which must be one of {FUSED_MATRICES}, got {which!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Spelled out: on CPU this beats F.rms_norm for batched rows (fewer passes).
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


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

    def forward(self, layer_idx: int, x: torch.Tensor, freqs: torch.Tensor,
                attn: AttentionBackend, meta: object, linear: Linear | None = None) -> torch.Tensor:
        """linear: the GEMM for this step's four matmuls; None = torch's."""
        T = x.shape[0]
        h = rms_norm(x, self.input_norm, self.eps)
        qkv = _matmul(h, self.qkv_proj.weight, linear)                  # [T, (H + 2 Hkv) D]
        q_size, kv_size, _ = self.split
        # q and k rotate together: one complex multiply over H + Hkv heads.
        qk = apply_rope(qkv[:, :q_size + kv_size].view(T, -1, self.head_dim), freqs)
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
        v = qkv[:, q_size + kv_size:].view(T, self.num_kv_heads, self.head_dim)
        o = attn.forward(layer_idx, q, k, v, meta)                      # [T, H, D]
        x = _matmul_add(x, o.reshape(T, -1), self.o_proj.weight, linear)
        h = rms_norm(x, self.post_attn_norm, self.eps)
        gate, up = _matmul(h, self.gate_up_proj.weight, linear).chunk(2, dim=-1)
        return _matmul_add(x, F.silu(gate) * up, self.down_proj.weight, linear)


def _matmul(a: torch.Tensor, w: torch.Tensor, linear: Linear | None) -> torch.Tensor:
    """a @ w^T, by linear or torch."""
    return F.linear(a, w) if linear is None else linear(a.contiguous(), w)


def _matmul_add(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, linear: Linear | None) -> torch.Tensor:
    """x + a @ w^T. On torch's GEMM the residual add rides in the matmul (addmm): one op fewer."""
    return torch.addmm(x, a, w.t()) if linear is None else x + linear(a.contiguous(), w)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope: RotaryEmbedding | None = None
        self.linear: Linear | None = None      # see use_linear
        self.linear_max_rows = 0

    def use_linear(self, linear: Linear | None, max_rows: int) -> None:
        """Run the layers' matmuls of steps with at most max_rows tokens through linear
        (None: always torch's)."""
        self.linear, self.linear_max_rows = linear, max_rows

    def init_rope(self, max_positions: int) -> None:
        self.rope = RotaryEmbedding(self.cfg.head_dim, max_positions, self.cfg.rope_theta,
                                    self.embed_tokens.weight.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend,
                meta: object) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden] (normed)."""
        x = self.embed_tokens(input_ids)
        freqs = self.rope.lookup(positions)
        linear = self.linear if input_ids.shape[0] <= self.linear_max_rows else None
        for i, layer in enumerate(self.layers):
            x = layer(i, x, freqs, attn, meta, linear)
        return rms_norm(x, self.norm, self.cfg.rms_norm_eps)

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
                for which in FUSED_MATRICES:
                    getattr(layer, f"{which}_proj").weight.copy_(fused_matrix(cfg, i, which, take))
        model.init_rope(cfg.max_position_embeddings)
        return model.eval().requires_grad_(False)
