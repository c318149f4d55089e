"""Placement across several workers, driven by one replica or by several."""
import asyncio

import redis.asyncio as aioredis

from bros.redis_server import EmbeddedRedis
from scheduler_svc.placement import BOARD_FIELDS, RoomBoard
from scheduler_svc.planner import BE, RT
from scheduler_svc.store import Batch, Store
from stack import Scheduler, Worker
from test_e2e import collect, request, stub_for


def test_board_prefers_the_roomiest_worker_and_lets_idle_ones_take_be():
    board = RoomBoard(tolerance=0.9)
    board.report("big", {"rt_available_slots_with_preempt": 8000, "be_available_slots": 8000})
    board.report("small", {"rt_available_slots_with_preempt": 1000, "be_available_slots": 1000})
    assert board.takes("big", RT, idle=False) and not board.takes("small", RT, idle=False)
    assert not board.takes("small", BE, idle=False)
    assert board.takes("small", BE, idle=True)      # an idle worker takes queued BE work
    assert not board.takes("small", RT, idle=True)  # RT still goes where the room is
    board.forget("big")
    assert board.takes("small", RT, idle=False)


def test_a_roomy_worker_with_every_seat_taken_does_not_hold_work_back():
    board = RoomBoard(tolerance=0.9)
    board.report("big", {"rt_available_slots_with_preempt": 8000, "be_available_slots": 8000}, free_seats=0)
    board.report("small", {"rt_available_slots_with_preempt": 1000, "be_available_slots": 1000}, free_seats=4)
    assert board.takes("small", RT, idle=False) and board.takes("small", BE, idle=False)
    assert board.takes("big", RT, idle=False)        # its own policy decides (bros may pause BE)
    board.report("big", {"rt_available_slots_with_preempt": 8000, "be_available_slots": 8000}, free_seats=1)
    assert not board.takes("small", RT, idle=False)  # a seat frees up: the room decides again


def test_other_replicas_workers_come_from_redis_and_never_shadow_a_local_report():
    board = RoomBoard(tolerance=0.9)
    board.report("mine", {"rt_available_slots_with_preempt": 1000, "be_available_slots": 1000})
    board.merge_remote({"theirs": {"rt_available_slots_with_preempt": 8000, "be_available_slots": 8000,
                                   "free_seats": 3},
                        "mine": {"rt_available_slots_with_preempt": 9999, "be_available_slots": 9999}})
    assert board.rooms["mine"]["rt_available_slots_with_preempt"] == 1000   # the loop's report is newer
    assert not board.takes("mine", RT, idle=False) and board.takes("theirs", RT, idle=False)
    board.merge_remote({"theirs": {"rt_available_slots_with_preempt": 8000, "be_available_slots": 8000,
                                   "free_seats": 0}})
    assert board.takes("mine", RT, idle=False)       # their seats are all taken
    board.merge_remote({})                            # their reports went stale: off the board
    assert set(board.rooms) == {"mine"} and board.takes("mine", RT, idle=False)
    board.forget("mine")
    board.merge_remote({"mine": {"rt_available_slots_with_preempt": 5, "be_available_slots": 5}})
    assert board.rooms["mine"]["rt_available_slots_with_preempt"] == 5     # another replica drives it now


def test_worker_fields_are_every_replicas_fresh_reports():
    async def main(url):
        client = aioredis.from_url(url)
        store = Store(client, prefix="wf")
        try:
            b = Batch(store)
            b.set_worker_state("w-fresh", {"rt_available_slots_with_preempt": 800, "be_available_slots": 640,
                                           "free_seats": 7, "leased_by": "r1"})
            b.set_worker_state("w-partial", {"be_available_slots": 16})
            await b.execute()
            await client.zadd(store.keys.workers(), {"w-stale": 1.0})   # reported long ago
            await client.hset(store.keys.worker("w-stale"), mapping={"be_available_slots": "99"})
            fresh = await store.worker_fields(BOARD_FIELDS, max_age_ms=5_000)
            survivors = {m.decode() for m in await client.zrange(store.keys.workers(), 0, -1)}
            return fresh, survivors
        finally:
            await client.aclose()

    with EmbeddedRedis() as redis_server:
        fresh, survivors = asyncio.run(main(redis_server.url))
    assert fresh == {"w-fresh": {"rt_available_slots_with_preempt": 800, "be_available_slots": 640, "free_seats": 7},
                     "w-partial": {"be_available_slots": 16}}
    assert survivors == {"w-fresh", "w-partial"}    # an hour silent: forgotten


def _place_one_at_a_time(tmp_path, replicas) -> tuple[list[str], str]:
    """A small and a big sim worker, schedulers driving them as replicas(small, big)
    says (lists of worker addresses, one per replica), and ten RT requests sent one
    at a time to the first replica: (the worker each ran on, the big one's address)."""
    with EmbeddedRedis() as redis_server:
        small = Worker(tmp_path, "--backend", "sim", "--sim-clock", "real", "--num-blocks", "64", name="small").start()
        big = Worker(tmp_path, "--backend", "sim", "--sim-clock", "real", "--num-blocks", "512", name="big").start()
        scheds = [Scheduler(tmp_path, redis_server.url, workers).start()
                  for workers in replicas(small.address, big.address)]
        try:
            stub = stub_for(scheds[0].address)
            ids = [f"place-{i}" for i in range(10)]
            for rid in ids:
                collect(stub.Generate(request(max_tokens=4, request_id=rid), timeout=30))

            async def placed():
                client = aioredis.from_url(redis_server.url)
                try:
                    store = Store(client)
                    return [(await store.get(rid)).worker_id for rid in ids]
                finally:
                    await client.aclose()
            return asyncio.run(placed()), big.address
        finally:
            for proc in (*scheds, small, big):
                proc.stop()


def test_rt_requests_land_on_the_worker_with_room(tmp_path):
    # Both workers idle at each arrival: without placement whichever loop polls first
    # would take it (about half each).
    placed, big = _place_one_at_a_time(tmp_path, lambda small, big: [[small, big]])
    assert placed.count(big) >= 9, placed


def test_placement_spans_replicas(tmp_path):
    """Two replicas, each driving one worker: the requests sent to the replica with the
    small worker still land on the big one, whose room only Redis tells it about (without
    the shared board each replica sees its own worker and takes what it peeks first)."""
    placed, big = _place_one_at_a_time(tmp_path, lambda small, big: [[small], [big]])
    assert placed.count(big) >= 9, placed
