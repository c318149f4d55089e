"""The StreamHub: one blocking read wakes every waiting call, on a real Redis server."""
import asyncio
import time

import pytest
import redis.asyncio as aioredis

from bros.redis_server import EmbeddedRedis
from scheduler_svc.store import RequestRecord, Store
from scheduler_svc.stream_hub import StreamHub


async def admit(store: Store, rid: str) -> None:
    """Tokens are only taken for a request the store knows."""
    await store.admit(RequestRecord(
        request_id=rid, service_class=2, prompt_token_ids=[1, 2], sampling=b"", ttft_ms=0.0, tpot_ms=0.0,
        arrival_ms=time.time() * 1e3, submitted=True, state="queued", worker_id="", num_output_tokens=0,
        first_scheduled_ms=None, first_token_ms=None, last_token_ms=None, finished_ms=None,
        finish_reason="", error=""))


@pytest.fixture(scope="module")
def redis_url():
    with EmbeddedRedis() as server:
        yield server.url


def test_hub_wakes_hundreds_of_waiters_over_one_connection(redis_url):
    async def main():
        # A pool smaller than the number of waiters: a blocking read per waiter would fail.
        client = aioredis.from_url(redis_url, max_connections=8)
        store = Store(client, prefix="hub1")
        hub = StreamHub(client, store.keys, "r1", block_ms=4_000)
        hub.start()
        rids = [f"r{i}" for i in range(300)]
        for rid in rids:
            await admit(store, rid)
        events = [await hub.register(rid, -1) for rid in rids]
        assert hub.num_watched == 300
        await asyncio.sleep(0.2)  # the hub is now blocked on all 300 streams
        t0 = time.monotonic()
        async with store.batch() as b:
            for rid in rids:
                b.append_tokens(rid, 0, [7], ["x"], None)
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 5)
        woke_s = time.monotonic() - t0
        for rid, e in zip(rids, events):
            hub.unregister(rid, e)
        assert hub.num_watched == 0
        await hub.close()
        await client.aclose()
        return woke_s

    # Far below the hub's 4 s block and the calls' 1 s poll: the wake came from the hub.
    assert asyncio.run(main()) < 1.0


def test_new_waiter_is_woken_without_waiting_out_the_block(redis_url):
    async def main():
        client = aioredis.from_url(redis_url)
        store = Store(client, prefix="hub2")
        hub = StreamHub(client, store.keys, "r2", block_ms=4_000)
        hub.start()
        await admit(store, "late")
        await asyncio.sleep(0.2)          # blocked on its poke stream alone
        event = await hub.register("late", -1)  # the poke restarts the read with this key
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        await store.append_tokens("late", 0, [1], ["a"])
        await asyncio.wait_for(event.wait(), 5)
        woke_s = time.monotonic() - t0
        # A second waiter further back on the same stream is woken by entries already there.
        behind = await hub.register("late", -1)
        await asyncio.wait_for(behind.wait(), 5)
        await hub.close()
        await client.aclose()
        return woke_s

    assert asyncio.run(main()) < 1.0
