"""One JSON line per step a worker ran: what its plan held and how long it took
(--step-log PATH; off by default). The data the sim worker's cost presets are fitted to
(`python -m scheduler_svc.bench.fit_cost`), and a way to see a live worker's step costs
without a tracer.

A line, for a step whose plan was sent at plan_ms and whose report was read at report_ms
(both the scheduler's wall clock, ms):

    {"worker": "10.0.0.7:50061", "plan_ms": ..., "report_ms": ..., "step_ms": 21.3,
     "num_seqs": 3, "num_tokens": 40, "num_prefill_tokens": 38, "prefill": true,
     "max_num_fused_tokens": 64}

step_ms is the worker's own time for the step; the gap from one line's plan_ms to the
next's (same worker) is what bros' step-time model sees when the loop runs serially:
the step plus the loop's Redis and gRPC round trips. Lines are appended as written and
flushed per line, so a scheduler that is killed loses at most the line being written.
"""
from __future__ import annotations

import json
from typing import IO


class StepLog:
    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[str] = open(path, "a", buffering=1, encoding="utf-8")   # line-buffered

    def record(self, worker: str, plan_ms: float, report_ms: float, step_ms: float, num_seqs: int,
               num_tokens: int, num_prefill_tokens: int, prefill: bool, max_num_fused_tokens: int) -> None:
        self._file.write(json.dumps({
            "worker": worker, "plan_ms": round(plan_ms, 3), "report_ms": round(report_ms, 3),
            "step_ms": round(step_ms, 3), "num_seqs": num_seqs,
            "num_tokens": num_tokens, "num_prefill_tokens": num_prefill_tokens,
            "prefill": prefill, "max_num_fused_tokens": max_num_fused_tokens}) + "\n")

    def close(self) -> None:
        self._file.close()
