"""The sim backend: no model. Iteration time comes from the cost model, tokens are
deterministic, and the clock is real (sleeps) or virtual (a simulator advances it).

The engine, allocator and validation are the real ones: only the forward pass is fake,
so the scheduler sees a GPU-sized pool that behaves exactly like the torch backend's.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..block_allocator import SlotCopy
from ..engine import RunResult, StepItem
from ..sampler import SamplingConfig
from .clock import Clock
from .cost_model import CostModel


@dataclass(frozen=True)
class SimModel:
    """What the simulated GPU serves. Default: OPT-13B in fp16."""
    name: str = "sim-opt-13b"
    vocab_size: int = 50272
    max_model_len: int = 8192
    num_layers: int = 40
    hidden_size: int = 5120
    dtype_bytes: int = 2
    eos_token_id: int = 2
    # Host <-> device copy bandwidth for checkpoints (PCIe 4.0 x16, achieved), bytes/ms.
    host_copy_bytes_per_ms: float = 25e6
    # Checkpoint copies (to host) run on the GPU's copy engine beside the forward pass
    # (see SimRunner); False: every copy runs in line, as on a CPU worker.
    overlap_copies: bool = True

    @property
    def kv_bytes_per_slot(self) -> int:
        """K and V of one token over all layers: 2 * 40 * 5120 * 2 = 819,200 for OPT-13B."""
        return 2 * self.num_layers * self.hidden_size * self.dtype_bytes


class _SimDetokenizer:
    def push(self, token_id: int) -> str:
        return f" t{token_id}"


class SimRunner:
    """The forward pass timed by the cost model; host copies timed as the torch worker
    makes them on a GPU (worker_svc/kv_cache.py), at PCIe bandwidth:

    - to_host (a paused BE run checkpointed before its slots are reused): the slots are
      gathered into a device buffer in the step's own stream (at HBM speed: not charged),
      and the buffer goes to pinned host memory on a copy stream while the GPU computes.
      This is the paper's lazy, background checkpoint. Nothing waits for it except a
      later restore of the same run.
    - from_host (a run restored for the step that reads it): in line, once its own
      checkpoint has landed.

    With overlap_copies False (a CPU worker, no copy engine) every copy runs in line.
    """
    name = "sim"

    def __init__(self, clock: Clock, cost: CostModel | None = None, model: SimModel | None = None):
        self.clock = clock
        self.cost = cost or CostModel.opt13b_a100()
        self.sim = model or SimModel()
        self.model_name = self.sim.name
        self.vocab_size = self.sim.vocab_size
        self.max_model_len = self.sim.max_model_len
        self.eos_token_ids = (self.sim.eos_token_id,)
        self.kv_bytes_per_slot = self.sim.kv_bytes_per_slot
        self.dtype_name, self.device = "float16", "sim"
        self.default_sampling = SamplingConfig(max_tokens=1, temperature=0.0)
        self._d2h_free_ms = 0.0                  # when the copy stream's queue drains
        self._host_ready_ms: dict[int, float] = {}  # checkpoint handle -> when it lands in host memory

    @property
    def max_num_fused_tokens(self) -> int:
        """The cost model's fused-path size (0: none), as a torch worker reports its own."""
        return self.cost.fused_max_tokens

    def apply_copies(self, copies: list[SlotCopy]) -> float:
        """Issue the copies; returns their PCIe time, whether or not the step waits for it."""
        total_ms = 0.0
        for c in copies:
            ms = len(c.slots) * self.kv_bytes_per_slot / self.sim.host_copy_bytes_per_ms
            total_ms += ms
            if c.kind == "drop_host":
                self._host_ready_ms.pop(c.handle, None)
            elif not self.sim.overlap_copies:
                self.clock.sleep_ms(ms)
            elif c.kind == "to_host":
                self._d2h_free_ms = max(self._d2h_free_ms, self.clock.now_ms()) + ms
                self._host_ready_ms[c.handle] = self._d2h_free_ms
            else:  # from_host: the step reads these slots, so it waits for them
                now = self.clock.now_ms()
                ready = self._host_ready_ms.pop(c.handle, now)
                self.clock.sleep_ms(max(ready, now) + ms - now)
        return total_ms

    def new_detokenizer(self) -> _SimDetokenizer:
        return _SimDetokenizer()

    def now_ms(self) -> float:
        return self.clock.now_ms()

    def execute(self, items: list[StepItem]) -> RunResult:
        prefill = [i for i in items if i.start_position < len(i.seq.prompt_token_ids) or i.num_new_tokens > 1]
        decode = [i for i in items if i not in prefill]
        ms = self.cost.iteration_ms([i.num_new_tokens for i in prefill],
                                    [i.start_position + 1 for i in decode],
                                    [i.start_position for i in prefill])
        self.clock.sleep_ms(ms)
        tokens = [self._token(i) for i in items if i.samples]
        return RunResult(tokens, ms, 0.0)

    def _token(self, item: StepItem) -> int:
        """A token that depends only on (seed or seq_id, position): replays are identical.
        Never an EOS id, so sim sequences end by length (or stop ids the caller set)."""
        seed = item.seq.sampling.seed if item.seq.sampling.seed is not None else _stable_hash(item.seq.seq_id)
        position = item.seq.num_tokens
        t = (seed * 6364136223846793005 + position * 1442695040888963407) % (2**61 - 1)
        t = 3 + t % (self.vocab_size - 3)
        return t


def _stable_hash(text: str) -> int:
    """FNV-1a: Python's hash() is salted per process, which would break replays."""
    h = 0xcbf29ce484222325
    for b in text.encode():
        h = ((h ^ b) * 0x100000001b3) % 2**64
    return h
