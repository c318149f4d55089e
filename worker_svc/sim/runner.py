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
    # Host copies run on the GPU's copy engine beside the forward pass (see SimRunner);
    # False: they run before it, in line, as on a CPU worker.
    overlap_copies: bool = True

    @property
    def kv_bytes_per_slot(self) -> int:
        """K and V of one token over all layers: 2 * 40 * 5120 * 2 = 819,200 for OPT-13B."""
        return 2 * self.num_layers * self.hidden_size * self.dtype_bytes


class _SimDetokenizer:
    def push(self, token_id: int) -> str:
        return f" t{token_id}"


class SimRunner:
    """Host copies and the forward pass, timed as on a GPU with a copy engine.

    The paper checkpoints BE KV to host "lazily, in the background", and a GPU's copy
    engine moves data while the SMs compute. A step depends on the copies issued before
    it (a checkpointed run's slots are about to be overwritten; a restored run is about
    to be read), but only layer by layer: layer l waits for layer l's share of the copies.
    With copies issued in layer order, a step that starts at t0 and computes for C ms
    ends at

        max(t0 + C, copies_done + C / num_layers)

    where copies_done is when the copy engine finishes everything issued so far: it
    cannot end before its own compute, nor less than one layer's compute after the last
    layer's copy lands. Copies issued while the worker idles finish in the background.
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
        self._copies_done_ms = 0.0    # when the copy engine finishes what was issued so far

    def apply_copies(self, copies: list[SlotCopy]) -> float:
        """Issue the copies; returns how long they take on the copy engine."""
        num_slots = sum(len(c.slots) for c in copies)
        ms = num_slots * self.kv_bytes_per_slot / self.sim.host_copy_bytes_per_ms
        if not ms:
            return 0.0
        if not self.sim.overlap_copies:
            self.clock.sleep_ms(ms)
            return ms
        self._copies_done_ms = max(self._copies_done_ms, self.clock.now_ms()) + ms
        return ms

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
        start_ms = self.clock.now_ms()
        end_ms = max(start_ms + ms, self._copies_done_ms + ms / self.sim.num_layers)
        self.clock.sleep_ms(end_ms - start_ms)
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
