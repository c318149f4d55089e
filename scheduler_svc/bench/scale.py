"""The sim-scale scenario (live): 8 sim workers, 10,000 queued BE requests, one
scheduler replica. Measures what the scheduler costs per iteration while the queue is
deep: planner time (p50/p99 over each loop's recent iterations) and Redis round trips.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from bros.client import Client
from bros.redis_server import EmbeddedRedis

from bros.v1 import types_pb2

from ..store import RequestRecord, Store
from .live import _start, _stop

WORKER_NICE = 10


def split_cpus() -> tuple[set[int] | None, set[int] | None]:
    """(the scheduler's CPUs, everyone else's): the last CPU for the scheduler, the rest
    for Redis, the workers and this driver; (None, None) with fewer than two CPUs."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return None, None
    return {cpus[-1]}, set(cpus[:-1])


def run_scale(num_workers: int = 8, num_be: int = 10_000, window_s: float = 30.0, policy: str = "bros",
              out: Path = Path("bench/out"), seed: int = 0, own_core: bool = True) -> dict:
    rng = random.Random(seed)
    log_dir = Path(tempfile.mkdtemp(prefix="bros-scale-"))
    # The scheduler gets a core of its own, as its Deployment's CPU request gives it in a
    # cluster; everything else (Redis, the 8 workers that stand for GPU hosts, this
    # driver) shares the rest. Sharing all cores, the wall-clock tail of a plan is the
    # operating system's: a plan descheduled mid-call is timed whole (docs/benchmarks.md).
    sched_cpus, other_cpus = split_cpus() if own_core else (None, None)
    all_cpus = os.sched_getaffinity(0) if other_cpus else None
    if other_cpus:
        os.sched_setaffinity(0, other_cpus)   # inherited by Redis and the workers
    try:
        result, submit_s = _serve(num_workers, num_be, window_s, policy, rng, log_dir, sched_cpus)
    finally:
        if all_cpus:
            os.sched_setaffinity(0, all_cpus)
    result.update(scenario="sim-scale", policy=policy, num_workers=num_workers, num_be=num_be,
                  window_s=window_s, admit_s=submit_s,
                  scheduler_cpus=sorted(sched_cpus) if sched_cpus else "shared")
    _report(result, out)
    return result


def _serve(num_workers: int, num_be: int, window_s: float, policy: str, rng: random.Random, log_dir: Path,
           sched_cpus: set[int] | None) -> tuple[dict, float]:
    with EmbeddedRedis() as redis_server:
        procs = []
        try:
            # Each sim worker stands for a GPU host of its own: here they share cores with
            # Redis (and, with --shared-cores, with the scheduler), so they run at a lower
            # priority (nice 10). Planner CPU time (below) is immune to sharing; wall time
            # is not.
            workers = [_start(procs, log_dir / f"worker-{i}.log", "worker_svc", "bros.v1.Worker", 120,
                              "--backend", "sim", "--sim-clock", "real", nice=WORKER_NICE)
                       for i in range(num_workers)]
            # The backlog goes straight into Redis (the same admission script Submit runs),
            # so all 10,000 are queued before the first plan; one Submit through gRPC
            # checks the client path too.
            t0 = time.monotonic()
            asyncio.run(_prefill(redis_server.url, num_be - 1, rng))
            submit_s = time.monotonic() - t0
            sched = _start(procs, log_dir / "scheduler.log", "scheduler_svc", "bros.v1.Inference", 60,
                           "--redis-url", redis_server.url, "--workers", ",".join(workers), "--policy", policy,
                           cpus=sched_cpus)
            with Client(sched, timeout=30) as client:
                client.submit(list(range(100, 612)), service_class="be", max_tokens=64, temperature=0.0)
            time.sleep(window_s)
            result = asyncio.run(_collect(redis_server.url, workers))
        finally:
            for p in reversed(procs):
                _stop(p)
    return result, submit_s


async def _prefill(url: str, n: int, rng: random.Random) -> None:
    client = aioredis.from_url(url)
    store = Store(client)
    try:
        now = time.time() * 1e3
        for i in range(n):
            sampling = types_pb2.SamplingParams(max_tokens=rng.randint(32, 128), temperature=0.0, ignore_eos=True)
            await store.admit(RequestRecord(
                request_id=f"scale-{i}", service_class=2, sampling=sampling.SerializeToString(),
                prompt_token_ids=[100 + j % 1000 for j in range(rng.randint(512, 1024))],
                ttft_ms=0.0, tpot_ms=0.0, arrival_ms=now + i * 1e-3, submitted=True))
            if i % 2000 == 1999:
                print(f"queued {i + 1}", file=sys.stderr)
    finally:
        await client.aclose()


async def _collect(url: str, workers: list[str]) -> dict:
    client = aioredis.from_url(url)
    try:
        load = await Store(client).load(workers)
    finally:
        await client.aclose()
    states = [load["workers"][w].state for w in workers]
    num = lambda st, k: float(st.get(k, 0) or 0)  # noqa: E731
    be = load["classes"][2]
    return {
        "planner_p50_ms": max(num(st, "planner_p50_ms") for st in states),
        "planner_p99_ms": max(num(st, "planner_p99_ms") for st in states),
        "planner_cpu_p50_ms": max(num(st, "planner_cpu_p50_ms") for st in states),
        "planner_cpu_p99_ms": max(num(st, "planner_cpu_p99_ms") for st in states),
        "redis_round_trips_per_iter": sum(num(st, "redis_round_trips_per_iter") for st in states) / len(states),
        "iterations": int(sum(num(st, "iterations") for st in states)),
        "be_queued_at_end": be.queued_requests,
        "be_running_at_end": be.running_requests,
        "be_finished_recent": be.recent_finished,
    }


def _report(r: dict, out: Path) -> None:
    cpus = r["scheduler_cpus"]
    where = f"the scheduler alone on CPU {cpus}" if cpus != "shared" else "the scheduler sharing every CPU"
    print(f"\nsim-scale: {r['num_workers']} sim workers, {r['num_be']} BE queued, policy {r['policy']}, "
          f"{r['window_s']:.0f} s window, {where}")
    print("planner time per iteration, the worst of the loops: wall clock, and CPU time of the planning thread")
    print("| planner p50 | planner p99 | CPU p50 | CPU p99 | Redis round trips / iter | iterations | BE queued at end |")
    print(f"| {r['planner_p50_ms']:.3f} ms | {r['planner_p99_ms']:.3f} ms | {r['planner_cpu_p50_ms']:.3f} ms "
          f"| {r['planner_cpu_p99_ms']:.3f} ms | {r['redis_round_trips_per_iter']:.2f} "
          f"| {r['iterations']} | {r['be_queued_at_end']} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sim-scale.json").write_text(json.dumps(r, indent=2))
    print(f"wrote {out / 'sim-scale.json'}")
