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

from ..planner import BE
from ..store import RequestRecord, Store
from .live import _start, _stop, loop_stats, read_load
from .metrics import BenchMetrics, json_safe
from .plots import plot_planner_time, ready

WORKER_NICE = 10
# The sim worker's step budget, as in the sim scenarios: the queued prompts (512-1024
# tokens) then fit one step, so bros-no-chunking, which runs prompts whole, serves them too.
MAX_NUM_BATCHED_TOKENS = 2048


def split_cpus() -> tuple[set[int] | None, set[int] | None]:
    """(the scheduler's CPUs, everyone else's): the last CPU for the scheduler, the rest
    for Redis, the workers and this driver; (None, None) with fewer than two CPUs."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return None, None
    return {cpus[-1]}, set(cpus[:-1])


def run_scale(policies: list[str], num_workers: int = 8, num_be: int = 10_000, window_s: float = 30.0,
              out: Path = Path("bench/out"), seed: int = 0, own_core: bool = True) -> dict:
    """Each policy in turn on a fresh stack (Redis, workers, scheduler) and the same
    seeded backlog; writes <out>/sim-scale.json in the benchmark's points/policies shape
    (one point, no RT: rt_rate 0) and a planner-time plot."""
    # The scheduler gets a core of its own, as its Deployment's CPU request gives it in a
    # cluster; everything else (Redis, the 8 workers that stand for GPU hosts, this
    # driver) shares the rest. Sharing all cores, the wall-clock tail of a plan is the
    # operating system's: a plan descheduled mid-call is timed whole (docs/benchmarks.md).
    sched_cpus, other_cpus = split_cpus() if own_core else (None, None)
    all_cpus = os.sched_getaffinity(0) if other_cpus else None
    results = {}
    if other_cpus:
        os.sched_setaffinity(0, other_cpus)   # inherited by Redis and the workers
    try:
        for i, policy in enumerate(policies):
            log_dir = Path(tempfile.mkdtemp(prefix=f"bros-scale-{policy}-"))
            print(f"[{i + 1}/{len(policies)}] sim-scale {policy}: {num_workers} workers, {num_be} BE queued, "
                  f"{window_s:.0f} s (logs in {log_dir})", file=sys.stderr, flush=True)
            results[policy] = _serve(num_workers, num_be, window_s, policy, random.Random(seed), log_dir, sched_cpus)
            print(f"[{i + 1}/{len(policies)}] {policy}: planner p99 {results[policy]['planner_p99_ms']:.3f} ms, "
                  f"BE {results[policy]['be_tok_s']:.0f} tok/s", file=sys.stderr, flush=True)
    finally:
        if all_cpus:
            os.sched_setaffinity(0, all_cpus)
    doc = {"scenario": "sim-scale", "seed": seed,
           "config": {"num_workers": num_workers, "num_be": num_be, "window_s": window_s,
                      "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
                      "scheduler_cpus": sorted(sched_cpus) if sched_cpus else "shared"},
           "points": [{"rt_rate": 0.0, "rt_rate_frac": 0.0, "num_requests": num_be, "policies": results}]}
    _report(doc, out)
    return doc


def _serve(num_workers: int, num_be: int, window_s: float, policy: str, rng: random.Random, log_dir: Path,
           sched_cpus: set[int] | None) -> dict:
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
            # so all of it is queued before the first plan; one Submit through gRPC
            # checks the client path too.
            t0 = time.monotonic()
            asyncio.run(_prefill(redis_server.url, num_be - 1, rng))
            admit_s = time.monotonic() - t0
            t_start = time.monotonic()
            sched = _start(procs, log_dir / "scheduler.log", "scheduler_svc", "bros.v1.Inference", 60,
                           "--redis-url", redis_server.url, "--workers", ",".join(workers), "--policy", policy,
                           "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS), cpus=sched_cpus)
            with Client(sched, timeout=30) as client:
                client.submit(list(range(100, 612)), service_class="be", max_tokens=64, temperature=0.0)
            time.sleep(window_s)
            result = _collect(redis_server.url, workers, time.monotonic() - t_start)
        finally:
            for p in reversed(procs):
                _stop(p)
    result["admit_s"] = admit_s
    return result


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


# The benchmark's per-policy RT fields: null, sim-scale queues no RT.
_RT_FIELDS = [f for f in BenchMetrics.__dataclass_fields__ if f.startswith("rt_")]


def _collect(url: str, workers: list[str], elapsed_s: float) -> dict:
    """The loops' own figures (loop_stats): planner time as the worst loop's quantiles,
    what the plans did summed over the loops; and the BE queue at the end."""
    load = read_load(url, workers)
    states = loop_stats(load, workers)
    worst = lambda k: max(st[k] for st in states)  # noqa: E731
    total = lambda k: int(sum(st[k] for st in states))  # noqa: E731
    be = load["classes"][BE]
    num_steps = total("num_steps")
    return {
        **dict.fromkeys(_RT_FIELDS),
        "be_req_s": total("be_finished") / elapsed_s,
        "be_tok_s": total("be_output_tokens") / elapsed_s,
        "total_tok_s": (total("be_output_tokens") + total("rt_output_tokens")) / elapsed_s,
        "preemptions": total("preemptions"),
        "mean_batch_size": total("num_scheduled_seqs") / num_steps if num_steps else None,
        "planner_p50_ms": worst("planner_p50_ms"),
        "planner_p99_ms": worst("planner_p99_ms"),
        "planner_cpu_p50_ms": worst("planner_cpu_p50_ms"),
        "planner_cpu_p99_ms": worst("planner_cpu_p99_ms"),
        "redis_round_trips_per_iter": sum(st["redis_round_trips_per_iter"] for st in states) / len(states),
        "iterations": total("iterations"),
        "elapsed_s": elapsed_s,
        "be_queued_at_end": be.queued_requests,
        "be_running_at_end": be.running_requests,
    }


def _report(doc: dict, out: Path) -> None:
    cfg, results = doc["config"], doc["points"][0]["policies"]
    cpus = cfg["scheduler_cpus"]
    where = f"the scheduler alone on CPU {cpus}" if cpus != "shared" else "the scheduler sharing every CPU"
    print(f"\nsim-scale: {cfg['num_workers']} sim workers, {cfg['num_be']} BE queued, "
          f"{cfg['window_s']:.0f} s window, {where}")
    print("planner time per iteration, the worst of the loops: wall clock, and CPU time of the planning thread")
    print("| policy | planner p50 | planner p99 | CPU p50 | CPU p99 | Redis round trips / iter | iterations "
          "| mean batch | BE tok/s | BE queued at end |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        batch = "-" if r["mean_batch_size"] is None else f"{r['mean_batch_size']:.1f}"
        print(f"| {name} | {r['planner_p50_ms']:.3f} ms | {r['planner_p99_ms']:.3f} ms | {r['planner_cpu_p50_ms']:.3f} ms "
              f"| {r['planner_cpu_p99_ms']:.3f} ms | {r['redis_round_trips_per_iter']:.2f} | {r['iterations']} "
              f"| {batch} | {r['be_tok_s']:.0f} | {r['be_queued_at_end']} |")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sim-scale.json"
    path.write_text(json.dumps(json_safe(doc), indent=2, allow_nan=False))
    print(f"wrote {path}")
    if ready():
        plot_planner_time(out / "sim-scale-planner.png", results,
                          f"sim-scale: {cfg['num_workers']} workers, {cfg['num_be']:,} BE queued")
