"""Assemble an Engine from a WorkerConfig: pick the runner, size the pool."""
from __future__ import annotations

import logging
from dataclasses import replace

from .config import MB, WorkerConfig
from .engine import Engine, EngineLimits
from .kv_cache import num_blocks_for_budget

log = logging.getLogger(__name__)


def build_engine(cfg: WorkerConfig, clock=None) -> Engine:
    if cfg.backend == "sim":
        runner, budget_mb = _sim_runner(cfg, clock), cfg.sim_kv_cache_mb
    else:
        runner, budget_mb = _torch_runner(cfg), cfg.kv_cache_mb
    num_blocks = cfg.num_blocks or num_blocks_for_budget(budget_mb * MB, cfg.block_size, runner.kv_bytes_per_slot)
    if cfg.backend == "torch":
        runner.allocate_cache(num_blocks, cfg.block_size)
        if cfg.resolved_attention == "triton":
            from kernels.backend import TritonAttention
            runner.set_attention(TritonAttention(runner.cache, cfg.block_size, runner.cfg.num_heads))
    limits = EngineLimits(num_blocks=num_blocks, block_size=cfg.block_size,
                          max_num_host_slots=cfg.host_cache_mb * MB // runner.kv_bytes_per_slot,
                          max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens)
    log.info("pool: %d blocks x %d slots (%.0f MB), host %d slots", num_blocks, cfg.block_size,
             num_blocks * cfg.block_size * runner.kv_bytes_per_slot / MB, limits.max_num_host_slots)
    return Engine(runner, limits)


def _torch_runner(cfg: WorkerConfig):
    import torch

    from .model.checkpoint import resolve_model
    from .torch_runner import TorchRunner

    if cfg.resolved_attention == "triton":
        _check_triton_can_run(cfg.device)   # before the weights load: fail fast
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return TorchRunner(str(resolve_model(cfg.model)), cfg.dtype, cfg.device, cfg.max_model_len,
                       weight_blocks=cfg.cpu_weights == "auto", int16_activations=cfg.cpu_activations == "int16")


def _check_triton_can_run(device: str) -> None:
    """The Triton kernels (kernels/) run on CUDA, or on CPU in Triton's interpreter, which
    must be switched on (TRITON_INTERPRET=1) before any kernel is defined."""
    import os

    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"attention 'triton' on device {device!r}: torch sees no CUDA device")
    elif os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"attention 'triton' needs a CUDA device, got device {device!r}; use --attention torch, "
                         "or set TRITON_INTERPRET=1 to run the kernels in Triton's (slow) interpreter")


def _sim_runner(cfg: WorkerConfig, clock):
    from .sim.clock import RealClock, VirtualClock
    from .sim.cost_model import PRESETS
    from .sim.runner import SimModel, SimRunner

    cost = PRESETS[cfg.sim_cost]()
    if cfg.sim_cost_overrides:
        cost = cost.with_overrides(dict(cfg.sim_cost_overrides))
    clock = clock or (VirtualClock() if cfg.sim_clock == "virtual" else RealClock())
    model = SimModel(overlap_copies=cfg.sim_overlap_copies)
    if cfg.max_model_len is not None:
        model = replace(model, max_model_len=cfg.max_model_len)
    return SimRunner(clock, cost, model)
