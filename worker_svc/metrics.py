"""The worker's own view in Prometheus metrics (served on --metrics-port), under the same
names the scheduler uses for its view of the worker (docs/scheduler.md):

    bros_kv_slots{worker,end="rt|be|free"}   bros_kv_utilization{worker}
    bros_running_sequences{worker,class}     bros_iteration_seconds{worker}
    bros_preemptions_total{worker}           bros_checkpointed_bytes_total{worker}

Updated once per step from the step's report and the engine's counters, on the event
loop while the engine is between steps; a step that ran no tokens (the scheduler's idle
plans) updates only the pool.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .block_allocator import SeqClass
from .sequence import SeqState

ITERATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_CLASS_NAMES = {SeqClass.RT: "rt", SeqClass.BE: "be"}
_ACTIVE = (SeqState.WAITING, SeqState.RUNNING)     # resident, neither paused nor finished


class WorkerMetrics:
    def __init__(self, worker_id: str, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r, w = self.registry, worker_id
        slots = Gauge("bros_kv_slots", "KV pool slots by end (rt, be) and free, after the last step",
                      ["worker", "end"], registry=r)
        self.kv_slots = {end: slots.labels(w, end) for end in ("rt", "be", "free")}
        self.kv_utilization = Gauge("bros_kv_utilization", "Fraction of the KV pool's slots holding KV (0..1)",
                                    ["worker"], registry=r).labels(w)
        running = Gauge("bros_running_sequences", "Sequences resident and not paused",
                        ["worker", "class"], registry=r)
        self.running = {cls: running.labels(w, name) for cls, name in _CLASS_NAMES.items()}
        self.iteration = Histogram("bros_iteration_seconds", "One engine step that ran tokens, plan in to report out",
                                   ["worker"], buckets=ITERATION_BUCKETS, registry=r).labels(w)
        self.preemptions = Counter("bros_preemptions", "Sequences paused, checkpointed or recomputed",
                                   ["worker"], registry=r).labels(w)
        self.checkpointed_bytes = Counter("bros_checkpointed_bytes", "KV bytes copied from the pool to host "
                                          "memory (checkpoints and evictions of paused BE sequences)",
                                          ["worker"], registry=r).labels(w)
        self._seen_preemptions = 0
        self._seen_checkpointed_slots = 0

    def observe_pool(self, occupancy: dict) -> None:
        for end, gauge in self.kv_slots.items():
            gauge.set(occupancy.get(f"{end}_slots", 0))
        total = occupancy.get("num_blocks", 0) * occupancy.get("block_size", 0)
        used = occupancy.get("rt_slots", 0) + occupancy.get("be_slots", 0)
        self.kv_utilization.set(used / total if total else 0.0)

    def observe_step(self, engine, report) -> None:
        self.observe_pool(report.occupancy)
        t = report.timings
        if t.num_prefill_tokens or t.num_decode_tokens:
            self.iteration.observe(t.step_ms / 1e3)
        counts = {cls: 0 for cls in self.running}
        for seq in list(engine.seqs.values()):  # a copy: another stream's step may be starting
            if seq.state in _ACTIVE and seq.seq_class in counts:
                counts[seq.seq_class] += 1
        for cls, n in counts.items():
            self.running[cls].set(n)
        self._count_engine_events(engine)

    def _count_engine_events(self, engine) -> None:
        """The engine counts in plain ints (it knows nothing of Prometheus); add the news."""
        if engine.num_preemptions > self._seen_preemptions:
            self.preemptions.inc(engine.num_preemptions - self._seen_preemptions)
            self._seen_preemptions = engine.num_preemptions
        if engine.num_checkpointed_slots > self._seen_checkpointed_slots:
            slots = engine.num_checkpointed_slots - self._seen_checkpointed_slots
            self.checkpointed_bytes.inc(slots * engine.runner.kv_bytes_per_slot)
            self._seen_checkpointed_slots = engine.num_checkpointed_slots
