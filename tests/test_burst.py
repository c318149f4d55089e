"""A burst of 10x the stack's capacity for 30 s: the queues stay bounded (BE refused first,
with RESOURCE_EXHAUSTED), so scheduler, worker and Redis memory stay bounded too (RSS
sampled throughout), and the RT requests that were admitted meet their targets.

Long: runs under `make test-faults`. Capacity is measured first on the same stack."""
import asyncio
import json
import random
import time
from pathlib import Path

import pytest

from bros.client import AsyncClient, BrosError, Final, RetryPolicy
from bros.redis_server import EmbeddedRedis
from stack import Scheduler, Worker

pytestmark = pytest.mark.faults

SIM = ("--backend", "sim", "--sim-clock", "real", "--num-blocks", "1024")
BURST_S = 30.0
OVERLOAD = 10.0      # BE offered, in multiples of the measured capacity
RT_LOAD = 0.5        # RT offered, likewise: the chat traffic that must keep its targets
RT_SHARE = RT_LOAD / (OVERLOAD + RT_LOAD)
RT_TTFT_MS, RT_TPOT_MS = 2000, 500
NO_RETRY = RetryPolicy(max_attempts=1)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def be_request(client: AsyncClient, i: int) -> str:
    try:
        await client.submit([200 + i % 100] * 200, service_class="be", max_tokens=32)
        return "admitted"
    except BrosError as e:
        return e.code


async def rt_request(client: AsyncClient, i: int) -> Final | str:
    try:
        final = None
        async for ev in client.generate([300 + i % 100] * 50, service_class="rt", max_tokens=16,
                                        ttft_ms=RT_TTFT_MS, tpot_ms=RT_TPOT_MS):
            if isinstance(ev, Final):
                final = ev
        return final
    except BrosError as e:
        return e.code


async def measure_capacity(client: AsyncClient) -> float:
    """Requests/s with BE work always queued: the rate the stack finishes them at."""
    rids = [await client.submit([7] * 200, service_class="be", max_tokens=32) for _ in range(60)]
    t0 = time.monotonic()
    for rid in rids:
        async for _ in client.watch(rid):
            pass
    return len(rids) / (time.monotonic() - t0)


async def burst(client: AsyncClient, rate: float, procs: dict[str, int]) -> dict:
    rng = random.Random(7)
    tasks, samples = [], []
    t0 = time.monotonic()
    next_sample, i = t0, 0
    while (now := time.monotonic()) - t0 < BURST_S:
        if now >= next_sample:
            samples.append({"t": now - t0, **{name: rss_mb(pid) for name, pid in procs.items()}})
            next_sample += 0.5
        rt = rng.random() < RT_SHARE
        tasks.append((rt, asyncio.create_task(rt_request(client, i) if rt else be_request(client, i))))
        i += 1
        await asyncio.sleep(rng.expovariate(rate))
    results = [(rt, await t) for rt, t in tasks]
    samples.append({"t": time.monotonic() - t0, **{name: rss_mb(pid) for name, pid in procs.items()}})
    return {"results": results, "samples": samples, "sent": i}


def test_burst_of_ten_times_capacity_stays_bounded(tmp_path):
    with EmbeddedRedis() as redis_server:
        worker = Worker(tmp_path, *SIM).start()
        sched = Scheduler(tmp_path, redis_server.url, [worker.address], "--max-num-seqs", "8",
                          "--max-queued-requests", "120", "--max-queued-tokens", "40000",
                          "--be-queue-share", "0.6").start()
        procs = {"scheduler": sched.proc.pid, "worker": worker.proc.pid, "redis": redis_server.pid}

        async def main():
            async with AsyncClient(sched.address, retry=NO_RETRY) as client:
                capacity = await measure_capacity(client)
                out = await burst(client, (OVERLOAD + RT_LOAD) * capacity, procs)
                return capacity, out

        try:
            capacity, out = asyncio.run(main())
        finally:
            sched.stop()
            worker.stop()
    rt = [r for is_rt, r in out["results"] if is_rt]
    be = [r for is_rt, r in out["results"] if not is_rt]
    rt_admitted = [r for r in rt if isinstance(r, Final)]
    be_admitted = [r for r in be if r == "admitted"]
    refused = [r for r in rt + be if r == "RESOURCE_EXHAUSTED"]
    other = [r for r in rt + be if not isinstance(r, Final) and r not in ("admitted", "RESOURCE_EXHAUSTED")]
    attain = sum(f.ttft_met and f.tpot_met for f in rt_admitted) / max(1, len(rt_admitted))
    half = len(out["samples"]) // 2
    peaks = {name: (max(s[name] for s in out["samples"][:half]), max(s[name] for s in out["samples"][half:]))
             for name in ("scheduler", "worker", "redis")}
    report = {"capacity_req_s": capacity, "offered_req_s": out["sent"] / BURST_S, "sent": out["sent"],
              "rt_sent": len(rt), "rt_admitted": len(rt_admitted), "be_sent": len(be), "be_admitted": len(be_admitted),
              "refused": len(refused), "rt_attain_both": attain, "rss_peaks_mb_first_second_half": peaks}
    Path("bench/out").mkdir(parents=True, exist_ok=True)
    Path("bench/out/burst.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    assert not other, f"unexpected outcomes: {other[:5]}"
    assert out["sent"] / BURST_S > 5 * capacity, report   # the client really offered a burst
    assert len(refused) > 0 and len(be_admitted) < len(be), report
    # BE is refused first: RT keeps a larger share of its requests admitted.
    assert len(rt_admitted) / max(1, len(rt)) > len(be_admitted) / max(1, len(be)), report
    assert attain >= 0.9, report
    for name, (first, second) in peaks.items():
        # Bounded: the second half of the burst grows no further than noise.
        assert second <= first * 1.2 + 30, (name, peaks)
