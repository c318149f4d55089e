"""Placement across several workers driven by one replica."""
import asyncio

import redis.asyncio as aioredis

from bros.redis_server import EmbeddedRedis
from scheduler_svc.placement import RoomBoard
from scheduler_svc.planner import BE, RT
from scheduler_svc.store import Store
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


def test_rt_requests_land_on_the_worker_with_room(tmp_path):
    with EmbeddedRedis() as redis_server:
        small = Worker(tmp_path, "--backend", "sim", "--sim-clock", "real", "--num-blocks", "64", name="small").start()
        big = Worker(tmp_path, "--backend", "sim", "--sim-clock", "real", "--num-blocks", "512", name="big").start()
        sched = Scheduler(tmp_path, redis_server.url, [small.address, big.address]).start()
        try:
            stub = stub_for(sched.address)
            ids = [f"place-{i}" for i in range(10)]
            # One at a time: both workers idle at each arrival, so without placement
            # whichever loop polls first would take it (about half each).
            for rid in ids:
                collect(stub.Generate(request(max_tokens=4, request_id=rid), timeout=30))

            async def workers():
                client = aioredis.from_url(redis_server.url)
                store = Store(client)
                try:
                    return [(await store.get(rid)).worker_id for rid in ids]
                finally:
                    await client.aclose()

            placed = asyncio.run(workers())
        finally:
            sched.stop()
            small.stop()
            big.stop()
    assert placed.count(big.address) >= 9, placed
