"""How long BE outputs turn out: the spread of recently finished BE requests' output
lengths, learned from the planner's own inputs (no extra I/O).

A running BE request's output so far is num_tokens - num_prompt_tokens; one that was
running at the last plan and is gone now has finished with that many tokens (or was
aborted, or handed back to the queue by a draining worker: rare, and counted alike).
Sums are kept so the spread costs O(1) per finish.
"""
from __future__ import annotations

import math
from collections import deque

from ..planner import BE, SeqView


class FinishedLengths:
    def __init__(self, window: int = 256, min_samples: int = 32) -> None:
        self.min_samples = min_samples
        self._lengths: deque[int] = deque(maxlen=window)
        self._sum = 0
        self._sum_sq = 0
        self._running: dict[str, int] = {}   # BE request id -> output tokens at the last plan

    def observe(self, running: list[SeqView]) -> None:
        now = {s.request_id: s.num_tokens - s.num_prompt_tokens for s in running if s.service_class == BE}
        for rid, n in self._running.items():
            if rid not in now and n > 0:
                self._add(n)
        self._running = now

    def _add(self, n: int) -> None:
        if len(self._lengths) == self._lengths.maxlen:
            old = self._lengths[0]
            self._sum -= old
            self._sum_sq -= old * old
        self._lengths.append(n)
        self._sum += n
        self._sum_sq += n * n

    def stdev(self) -> float | None:
        """Population standard deviation, or None until min_samples have finished."""
        k = len(self._lengths)
        if k < self.min_samples:
            return None
        mean = self._sum / k
        return math.sqrt(max(0.0, self._sum_sq / k - mean * mean))
