"""The worker loop's cost figures (in the worker state hash; sim-scale reads them):
planner time as wall clock and as CPU time of the planning thread, which part when the
OS runs something else mid-plan; Redis round trips, counted at the socket."""
import asyncio
import time

import redis.asyncio as aioredis

from bros.redis_server import EmbeddedRedis
from inprocess import InProcessStack
from scheduler_svc import round_trips
from scheduler_svc.worker_loop import LoopStats


def test_summary_reports_wall_and_cpu_quantiles_separately():
    stats = LoopStats(iterations=4, round_trips=10)
    stats.planner_ms.extend([0.1] * 98 + [5.0, 9.0])      # two plans cut by a time slice
    stats.planner_cpu_ms.extend([0.1] * 99 + [0.3])
    s = stats.summary()
    assert s["planner_p50_ms"] == 0.1 and s["planner_p99_ms"] == 9.0
    assert s["planner_cpu_p50_ms"] == 0.1 and s["planner_cpu_p99_ms"] == 0.3
    assert s["redis_round_trips_per_iter"] == 2.5 and s["iterations"] == 4


def test_planner_quantiles_are_re_sorted_every_so_many_iterations():
    """Every report publishes a summary; the quantiles are sorted again only every
    QUANTILES_EVERY iterations (off the loop's path between two steps otherwise)."""
    stats = LoopStats()
    stats.planner_ms.append(1.0)
    stats.planner_cpu_ms.append(1.0)
    assert stats.summary()["planner_p99_ms"] == 1.0
    stats.planner_ms.append(50.0)
    stats.planner_cpu_ms.append(50.0)
    stats.iterations += LoopStats.QUANTILES_EVERY - 1
    assert stats.summary()["planner_p99_ms"] == 1.0      # not yet
    stats.iterations += 1
    assert stats.summary()["planner_p99_ms"] == 50.0
    assert stats.summary()["iterations"] == LoopStats.QUANTILES_EVERY   # counts are always current


def test_summary_of_no_plans_is_zero():
    s = LoopStats().summary()
    assert s["planner_p99_ms"] == s["planner_cpu_p99_ms"] == 0.0 and s["redis_round_trips_per_iter"] == 0.0



# ---- round trips, counted at the socket (scheduler_svc/round_trips.py) ----------------------

class Sink:
    round_trips = 0


def test_round_trips_are_counted_per_send_and_only_for_the_counting_context():
    async def main(url):
        client = aioredis.from_url(url)
        round_trips.install(client)
        round_trips.install(client)                       # idempotent: still one count a send
        await client.ping()                               # the connection's handshake, uncounted
        sink = Sink()

        async def counted():
            round_trips.count_into(sink)
            await client.set("k", "v")                    # 1
            pipe = client.pipeline(transaction=True)
            pipe.incr("n").incr("n").get("k")
            await pipe.execute()                          # 1: three commands, one round trip
            await asyncio.get_running_loop().create_task(client.get("k"))   # 1: a task it starts

        await asyncio.get_running_loop().create_task(counted())
        await client.get("k")                             # this context counts nowhere
        await client.aclose()
        return sink.round_trips

    with EmbeddedRedis() as r:
        assert asyncio.run(main(r.url)) == 3


def test_an_idle_worker_loop_makes_two_round_trips_per_iteration():
    """Peek the queues and renew the lease; write the (empty) report: the O(1) of a
    planning step, measured on a real loop against a real Redis."""
    with EmbeddedRedis() as r, InProcessStack(r.url) as stack:
        loop = stack.worker_loop

        async def snapshot():
            return loop.stats.iterations, loop.stats.round_trips

        deadline = time.monotonic() + 30
        while stack.call(snapshot())[0] < 50 and time.monotonic() < deadline:
            time.sleep(0.05)                              # warm: every connection opened
        it0, rt0 = stack.call(snapshot())
        time.sleep(1.0)
        it1, rt1 = stack.call(snapshot())
    assert it1 - it0 >= 50
    # Give or take a snapshot that falls mid-iteration, and the handshake of a connection
    # the pool opens late (the write task and the next queue read overlapping).
    assert 2 * (it1 - it0) - 2 <= rt1 - rt0 <= 2 * (it1 - it0) + 8, (it1 - it0, rt1 - rt0)
