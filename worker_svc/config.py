"""The worker's configuration: one frozen dataclass, validated on construction, filled
from the command line (the one place arguments and the environment are read)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from bros.config_cli import add_config_flags
from bros.telemetry import telemetry_checks
from bros.tls import check_pair

from .sim.cost_model import PRESETS as COST_PRESETS

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
    # What the CPU decode stack streams: "auto" = a GGUF model's own quantized blocks where
    # it reads them (Q4_0/Q4_1/Q8_0: the same weights, bit for bit, in a fraction of the
    # bytes), "float32" = the dequantized fp32 copy (docs/performance.md)
    cpu_weights: str = "auto"
    # How the CPU decode stack multiplies those blocks (AVX2 builds): "int16" = each input
    # quantized to int16 per 32 values, integer dot products, in steps of up to 8 rows
    # (~1.4-1.7x faster steps of 1-4 rows, ~1.1-1.3x of 5-7, logits within ~2e-4 of fp32's;
    # decode.cpp, "int16 activations"); "float32" = the blocks dequantized to fp32 in
    # registers in steps of up to 4 rows, fp32 weights beyond (the fp32 outputs bit for bit)
    cpu_activations: str = "int16"
    block_size: int = 16                   # slots per KV block
    kv_cache_mb: int = 512                 # KV pool budget (torch backend)
    num_blocks: int | None = None          # overrides the budget when set
    host_cache_mb: int = 1024              # host memory for checkpointed BE slots
    max_num_seqs: int = 64                 # sequences per step
    max_num_batched_tokens: int = 2048     # tokens per step
    max_model_len: int | None = None       # default: the model's context
    warmup: bool = True                    # run one step before reporting SERVING
    # Run the engine's and the pool's check_integrity() after every step and report a
    # violation as a step error (field "integrity") and in Describe. Costs a pass over
    # the pool per step: for tests and debugging, off in production.
    check_integrity: bool = False
    drain_grace_s: float = 30.0            # SIGTERM: time to finish RT and hand back BE, then exit
    # TLS on the worker's port (docs/reliability.md#access); the files are read once, at startup
    tls_cert_file: str = ""                # this worker's certificate ("" = plaintext)
    tls_key_file: str = ""
    tls_client_ca_file: str = ""           # require a client (scheduler) certificate signed by this CA
    # observability (docs/scheduler.md#tracing-and-metrics)
    metrics_port: int = 0                  # Prometheus /metrics on host:metrics_port (0 = off)
    otlp_endpoint: str = ""                # OTLP trace collector URL ("" = tracing off)
    otlp_protocol: str = "grpc"            # grpc, or http (http/protobuf, path /v1/traces)
    trace_sample_ratio: float = 1.0        # share of root traces kept (the scheduler's decision wins)
    service_name: str = "bros-worker"      # service.name of this process's spans
    # sim backend
    sim_clock: str = "real"                # "real" (sleeps) or "virtual"
    sim_cost: str = "opt13b_a100"          # cost-model preset
    sim_cost_overrides: tuple[tuple[str, float], ...] = field(default_factory=tuple)
    sim_kv_cache_mb: int = 12 * 1024       # A100-40GB minus OPT-13B's fp16 weights and activations
    sim_overlap_copies: bool = True        # host copies beside the forward pass (a GPU's copy engine)

    def __post_init__(self) -> None:
        checks = [
            (self.backend in ("torch", "sim"), "backend", "must be 'torch' or 'sim'"),
            (self.dtype in ("float32", "float16", "bfloat16"), "dtype", "must be float32, float16 or bfloat16"),
            (self.attention in ("auto", "torch", "triton"), "attention", "must be auto, torch or triton"),
            (self.cpu_weights in ("auto", "float32"), "cpu_weights", "must be auto or float32"),
            (self.cpu_activations in ("int16", "float32"), "cpu_activations", "must be int16 or float32"),
            (0 <= self.port < 65536, "port", "must be in [0, 65536)"),
            (self.block_size > 0, "block_size", "must be > 0"),
            (self.kv_cache_mb > 0 and self.sim_kv_cache_mb > 0, "kv_cache_mb", "must be > 0"),
            (self.num_blocks is None or self.num_blocks > 0, "num_blocks", "must be > 0"),
            (self.host_cache_mb >= 0, "host_cache_mb", "must be >= 0"),
            (self.max_num_seqs > 0, "max_num_seqs", "must be > 0"),
            (self.max_num_batched_tokens > 0, "max_num_batched_tokens", "must be > 0"),
            (self.sim_clock in ("real", "virtual"), "sim_clock", "must be 'real' or 'virtual'"),
            (self.sim_cost in COST_PRESETS, "sim_cost", f"must be one of {', '.join(sorted(COST_PRESETS))}"),
            *telemetry_checks(self),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")
        check_pair(self.tls_cert_file, self.tls_key_file, "--tls-cert-file", "--tls-key-file")

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
        try:
            return cls(**ns, sim_cost_overrides=overrides)
        except ValueError as e:  # one line naming the flag, exit 2, instead of a traceback
            p.error(str(e))
