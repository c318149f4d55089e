"""A hybrid client load for fault tests: RT requests as live Generate streams, BE requests
submitted then watched, each consumed on its own thread, with the checks every fault test
makes afterwards (every request finished, every token index seen exactly once, in order)."""
from __future__ import annotations

import threading
import time

from bros.client import Chunk, Client, Final


class HybridRun:
    def __init__(self, client: Client, num_requests: int, max_tokens: int, prefix: str = "",
                 prompt_len=lambda i: 8 + i % 13):
        self.client, self.num_requests, self.max_tokens = client, num_requests, max_tokens
        self.prefix, self.prompt_len = prefix, prompt_len
        self.seen: dict[int, list[tuple[int, list[int]]]] = {i: [] for i in range(num_requests)}
        self.done: dict[int, Final] = {}
        self.errors: dict[int, BaseException] = {}
        self._threads: list[threading.Thread] = []

    def request_id(self, i: int) -> str:
        return f"{self.prefix}{'rt' if i % 2 else 'be'}-{i}"

    def start(self) -> "HybridRun":
        for i in range(self.num_requests):
            prompt = [100 + i % 500] * self.prompt_len(i)
            opts = dict(max_tokens=self.max_tokens, temperature=0.0, request_id=self.request_id(i))
            if i % 2:  # RT: a live stream; targets loose enough that admission never refuses it
                events = self.client.generate(prompt, service_class="rt", ttft_ms=120_000, tpot_ms=60_000, **opts)
            else:      # BE: submitted, then watched
                events = self.client.watch(self.client.submit(prompt, service_class="be", **opts))
            t = threading.Thread(target=self._consume, args=(i, events), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _consume(self, i: int, events) -> None:
        try:
            for ev in events:
                if isinstance(ev, Chunk):
                    self.seen[i].append((ev.index, list(ev.token_ids)))
                elif isinstance(ev, Final):
                    self.done[i] = ev
        except BaseException as e:  # noqa: BLE001 — reported by check()
            self.errors[i] = e

    def num_progressed(self) -> int:
        return sum(len(s) > 0 for s in self.seen.values())

    def wait_progress(self, num: int, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.num_progressed() < num and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.num_progressed()

    def join(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def check(self) -> None:
        """Every request finished by length, every index 0..max_tokens-1 seen exactly once."""
        assert not self.errors, f"client errors: {dict(list(self.errors.items())[:5])}"
        missing = sorted(set(range(self.num_requests)) - set(self.done))
        assert not missing, f"{len(missing)} unfinished, e.g. {[self.request_id(i) for i in missing[:10]]}"
        for i, chunks in self.seen.items():
            indices = [idx + k for idx, toks in chunks for k in range(len(toks))]
            f = self.done[i]
            assert indices == list(range(self.max_tokens)), f"{self.request_id(i)}: saw indices {indices}, then {f}"
            assert f.num_output_tokens == self.max_tokens and f.finish_reason == "length", (self.request_id(i), f)
