"""The worker's configuration: one frozen dataclass, validated on construction, filled
from the command line (the one place arguments and the environment are read)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from bros.config_cli import add_config_flags

MB = 1024 * 1024


@dataclass(frozen=True)
class WorkerConfig:
    backend: str = "torch"                 # "torch" (a real model) or "sim" (cost model, no model)
    model: str | None = None               # HF checkpoint dir or .gguf file; None = bundled SmolLM2-135M
    host: str = "127.0.0.1"
    port: int = 50061
    worker_id: str = ""                    # default: host:port
    dtype: str = "float32"                 # weights and KV: float32, float16, bfloat16
    device: str = "cpu"                    # "cpu" or "cuda[:N]"
    attention: str = "auto"                # "torch", "triton", or "auto" (triton on CUDA, else torch)
    block_size: int = 16                   # slots per KV block
    kv_cache_mb: int = 512                 # KV pool budget (torch backend)
    num_blocks: int | None = None          # overrides the budget when set
    host_cache_mb: int = 1024              # host memory for checkpointed BE slots
    max_num_seqs: int = 64                 # sequences per step
    max_num_batched_tokens: int = 2048     # tokens per step
    max_model_len: int | None = None       # default: the model's context
    warmup: bool = True                    # run one step before reporting SERVING
    # sim backend
    sim_clock: str = "real"                # "real" (sleeps) or "virtual"
    sim_cost: str = "opt13b_a100"          # cost-model preset
    sim_cost_overrides: tuple[tuple[str, float], ...] = field(default_factory=tuple)
    sim_kv_cache_mb: int = 12 * 1024       # A100-40GB minus OPT-13B's fp16 weights and activations

    def __post_init__(self) -> None:
        checks = [
            (self.backend in ("torch", "sim"), "backend", "must be 'torch' or 'sim'"),
            (self.dtype in ("float32", "float16", "bfloat16"), "dtype", "must be float32, float16 or bfloat16"),
            (self.attention in ("auto", "torch", "triton"), "attention", "must be auto, torch or triton"),
            (0 <= self.port < 65536, "port", "must be in [0, 65536)"),
            (self.block_size > 0, "block_size", "must be > 0"),
            (self.kv_cache_mb > 0 and self.sim_kv_cache_mb > 0, "kv_cache_mb", "must be > 0"),
            (self.num_blocks is None or self.num_blocks > 0, "num_blocks", "must be > 0"),
            (self.host_cache_mb >= 0, "host_cache_mb", "must be >= 0"),
            (self.max_num_seqs > 0, "max_num_seqs", "must be > 0"),
            (self.max_num_batched_tokens > 0, "max_num_batched_tokens", "must be > 0"),
            (self.sim_clock in ("real", "virtual"), "sim_clock", "must be 'real' or 'virtual'"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

    @property
    def resolved_worker_id(self) -> str:
        return self.worker_id or f"{self.host}:{self.port}"

    @property
    def resolved_attention(self) -> str:
        if self.attention != "auto":
            return self.attention
        return "triton" if self.device.startswith("cuda") else "torch"

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> "WorkerConfig":
        p = argparse.ArgumentParser(prog="python -m worker_svc", description="bros GPU worker")
        add_config_flags(p, cls, skip=("sim_cost_overrides",))
        p.add_argument("--sim-cost-set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one cost-model coefficient (repeatable)")
        ns = vars(p.parse_args(argv))
        overrides = tuple((k, float(v)) for k, v in (kv.split("=", 1) for kv in ns.pop("sim_cost_set")))
        return cls(**ns, sim_cost_overrides=overrides)
