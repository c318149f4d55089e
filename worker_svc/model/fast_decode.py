"""The decoder stack for decode-only steps, compiled with TorchScript.

At batch 1 on a CPU each of the ~40 ops per layer costs 10-20 us of Python and dispatch,
much of it on cold caches right after a matmul has streamed megabytes of weights
through them: about a third of the step. Running the same ops from TorchScript's
interpreter removes the Python share. Same functions (`rms_norm`, `apply_rope`) and the
same op order as `LlamaModel` + `TorchAttention`, so the numbers are the same;
tests/test_model_parity.py covers both paths (its decode steps take this one).

Used only with the torch attention backend and when every row of the step decodes one
token; prefill and mixed steps take the eager path.
"""
from __future__ import annotations

import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F

from .llama import LlamaModel, apply_rope, rms_norm


def _decode_stack_eager(x: torch.Tensor, freqs: torch.Tensor, input_norms: List[torch.Tensor],
                  qkv_ws: List[torch.Tensor], o_ws: List[torch.Tensor], post_norms: List[torch.Tensor],
                  gate_up_ws: List[torch.Tensor], down_ws: List[torch.Tensor], k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor, blocks: torch.Tensor,
                  mask: Optional[torch.Tensor], num_heads: int, num_kv_heads: int, head_dim: int,
                  block_size: int, eps: float) -> torch.Tensor:
    # x [S, hidden] (one token per row); k_cache/v_cache [L, slots, Hkv, D];
    # blocks [S, nb]: each row's blocks; mask [S, 1, 1, nb * B] or None.
    S = x.shape[0]
    nb = blocks.shape[1]
    flat_blocks = blocks.reshape(-1)
    q_kv = (num_heads + num_kv_heads) * head_dim
    for i in range(len(qkv_ws)):
        h = rms_norm(x, input_norms[i], eps)
        qkv = F.linear(h, qkv_ws[i])
        qk = apply_rope(qkv[:, :q_kv].reshape(S, num_heads + num_kv_heads, head_dim), freqs)
        q = qk[:, :num_heads]
        k = qk[:, num_heads:]
        v = qkv[:, q_kv:].reshape(S, num_kv_heads, head_dim)
        kc = k_cache[i]
        vc = v_cache[i]
        kc.index_copy_(0, slot_mapping, k)
        vc.index_copy_(0, slot_mapping, v)
        num_blocks = kc.shape[0] // block_size
        kd = kc.view(num_blocks, -1).index_select(0, flat_blocks).view(S, nb * block_size, num_kv_heads, head_dim)
        vd = vc.view(num_blocks, -1).index_select(0, flat_blocks).view(S, nb * block_size, num_kv_heads, head_dim)
        qd = q.reshape(S, num_kv_heads, num_heads // num_kv_heads, head_dim)
        o = F.scaled_dot_product_attention(qd, kd.transpose(1, 2), vd.transpose(1, 2), attn_mask=mask)
        x = torch.addmm(x, o.reshape(S, -1), o_ws[i].t())
        h = rms_norm(x, post_norms[i], eps)
        gate_up = F.linear(h, gate_up_ws[i])
        half = gate_up.shape[1] // 2
        x = torch.addmm(x, F.silu(gate_up[:, :half]) * gate_up[:, half:], down_ws[i].t())
    return x


def _script(fn):
    """TorchScript is deprecated in favour of torch.compile, which on CPU costs a long
    compile and (measured here) ran this loop slower. If scripting ever stops working,
    the eager function is the same computation, only slower."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(fn)
    except Exception:  # noqa: BLE001
        return fn


_decode_stack = _script(_decode_stack_eager)


class FastDecode:
    """Binds a model's weights and a KV cache to the scripted decode stack."""

    def __init__(self, model: LlamaModel, k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int):
        layers = model.layers
        self.model = model
        self.weights = dict(
            input_norms=[l.input_norm for l in layers], qkv_ws=[l.qkv_proj.weight for l in layers],
            o_ws=[l.o_proj.weight for l in layers], post_norms=[l.post_attn_norm for l in layers],
            gate_up_ws=[l.gate_up_proj.weight for l in layers], down_ws=[l.down_proj.weight for l in layers])
        cfg = model.cfg
        self.k_cache, self.v_cache = k_cache, v_cache
        self.shape = dict(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                          block_size=block_size, eps=cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """Same contract as LlamaModel.forward for a decode-only step."""
        x = self.model.embed_tokens(input_ids)
        x = _decode_stack(x, self.model.rope.lookup(positions), k_cache=self.k_cache, v_cache=self.v_cache,
                          slot_mapping=meta.slot_mapping, blocks=meta.decode_blocks, mask=meta.decode_mask,
                          **self.weights, **self.shape)
        return rms_norm(x, self.model.norm, self.model.cfg.rms_norm_eps)
