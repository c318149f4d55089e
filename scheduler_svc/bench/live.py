"""The live mode of the benchmark: the same workload through the full stack (a real
Redis server, a scheduler process, sim worker processes on a real clock, gRPC clients
sending at the workload's arrival times). Slower than virtual mode by the workload's
length, and it measures what a client sees: TTFT and TPOT from the client's side.
"""
from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import redis.asyncio as aioredis

from bros.client import Chunk, Client, Final
from bros.health import wait_serving
from bros.redis_server import EmbeddedRedis

from ..planner import PlannerConfig, RT
from ..store import Store
from ..worker_loop import LoopStats
from .metrics import BenchMetrics, RequestRecord, compute
from .workload import Request


def run_live(requests: list[Request], policy: str, planner: PlannerConfig, **kwargs) -> BenchMetrics:
    """The metrics of one live replay (keyword arguments: replay_live's)."""
    records, steps = replay_live(requests, policy, planner, **kwargs)
    return with_steps(compute(records, []), steps)


def with_steps(m: BenchMetrics, steps: list[dict]) -> BenchMetrics:
    """The step figures a client cannot see, from the loops' own counts (loop_stats)."""
    num_steps = sum(st["num_steps"] for st in steps)
    return replace(m, preemptions=int(sum(st["preemptions"] for st in steps)),
                   mean_batch_size=sum(st["num_scheduled_seqs"] for st in steps) / num_steps if num_steps else math.nan)


def read_load(redis_url: str, workers: list[str]) -> dict:
    """Store.load from outside the scheduler: the queues per class and each worker's state hash."""
    async def read() -> dict:
        client = aioredis.from_url(redis_url)
        try:
            return await Store(client).load(workers)
        finally:
            await client.aclose()
    return asyncio.run(read())


def loop_stats(load: dict, workers: list[str]) -> list[dict]:
    """Each worker loop's LoopStats summary, as it last published it in the worker's
    state hash (numbers; a loop that never reported gives zeros)."""
    keys = LoopStats().summary()
    return [{k: float(load["workers"][w].state.get(k, 0) or 0) for k in keys} for w in workers]


def replay_live(requests: list[Request], policy: str, planner: PlannerConfig, num_blocks: int | None = None,
                num_workers: int = 1, sim_cost: str = "opt13b_a100", log_dir: str | None = None,
                worker_args: tuple[str, ...] | None = None,
                scheduler_args: tuple[str, ...] = ()) -> tuple[list[RequestRecord], list[dict]]:
    """Every request's record, as its client saw it, and each worker loop's own counts
    (loop_stats). worker_args replaces the sim worker's backend flags (e.g. the
    torch backend); scheduler_args are added to the scheduler's (e.g. policy knobs)."""
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="bros-live-"))
    with EmbeddedRedis() as redis_server:
        procs = []
        try:
            backend = worker_args or ("--backend", "sim", "--sim-clock", "real", "--sim-cost", sim_cost)
            workers = [_start(procs, log_dir / f"worker-{i}.log", "worker_svc", "bros.v1.Worker", 300,
                              *backend, "--max-num-seqs", str(planner.max_num_seqs),
                              "--max-num-batched-tokens", str(planner.max_num_batched_tokens),
                              *(["--num-blocks", str(num_blocks)] if num_blocks else []))
                       for i in range(num_workers)]
            sched = _start(procs, log_dir / "scheduler.log", "scheduler_svc", "bros.v1.Inference", 60,
                           "--redis-url", redis_server.url, "--workers", ",".join(workers), "--policy", policy,
                           "--max-num-seqs", str(planner.max_num_seqs),
                           "--max-num-batched-tokens", str(planner.max_num_batched_tokens), *scheduler_args)
            records = _replay(sched, requests)
            return records, loop_stats(read_load(redis_server.url, workers), workers)
        finally:
            for p in reversed(procs):
                _stop(p)


def _replay(target: str, requests: list[Request]) -> list[RequestRecord]:
    """Send each request at its arrival time (ms from now) and time what comes back."""
    records = {r.request_id: RequestRecord(r) for r in requests}
    t0 = time.monotonic() * 1e3 + 200.0  # a little head start to spawn the senders
    client = Client(target, timeout=600)

    def one(req: Request) -> None:
        delay = (t0 + req.arrival_ms - time.monotonic() * 1e3) / 1e3
        if delay > 0:
            time.sleep(delay)
        rec = records[req.request_id]
        rt = req.service_class == RT
        events = client.generate([100 + (i % 1000) for i in range(req.prompt_len)],
                                 service_class="rt" if rt else "be", max_tokens=req.output_len,
                                 temperature=0.0, ignore_eos=True, request_id=req.request_id,
                                 ttft_ms=int(req.ttft_ms) if rt else 0, tpot_ms=int(req.tpot_ms) if rt else 0)
        for ev in events:
            now = time.monotonic() * 1e3 - t0
            if isinstance(ev, Chunk):
                if rec.first_token_ms is None:
                    rec.first_token_ms = now
                rec.num_output_tokens += len(ev.token_ids)
            elif isinstance(ev, Final):
                rec.finish_ms = now
                rec.error = ev.error or None

    threads = [threading.Thread(target=one, args=(r,), daemon=True) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    return list(records.values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(procs: list, log: Path, module: str, service: str, timeout: float, *args: str, nice: int = 0,
           cpus: set[int] | None = None) -> str:
    """Start `python -m module` on a free port, wait until it serves; nice > 0 runs it at
    a lower CPU priority (a stand-in for a process that would have its own machine);
    cpus, when given, are the only CPUs it may run on."""
    port = _free_port()

    def before_exec() -> None:
        if nice:
            os.nice(nice)
        if cpus:
            os.sched_setaffinity(0, cpus)

    proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), *args], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=before_exec if nice or cpus else None)
    procs.append(proc)
    address = f"127.0.0.1:{port}"
    wait_serving(address, service, proc, timeout, log)
    return address


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
