"""The Redis store against a real server (the embedded one), one key prefix per test.

No pytest-asyncio here: each test is a sync function that runs its coroutine with
asyncio.run and a fresh client (a redis.asyncio client belongs to one event loop).
"""
import asyncio
import os
import re
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bros.redis_server import EmbeddedRedis, server_binary
from bros.v1 import types_pb2
from scheduler_svc import keys as keys_mod
from scheduler_svc import store as store_mod
from scheduler_svc.keys import BEST_EFFORT, REALTIME
from scheduler_svc.store import PLAN_FIELDS, RequestRecord, StreamEntry, Store

T0 = 1_700_000_000_000.0  # an epoch-ms origin for readable times


@pytest.fixture(scope="session")
def server():
    with EmbeddedRedis() as s:
        yield s


def run(server, body, n_stores=1, **store_kw):
    """Run body(*stores) with n_stores Stores (separate clients: separate "replicas")
    sharing one fresh prefix."""
    prefix = "t" + uuid.uuid4().hex[:10]

    async def main():
        clients = [aioredis.Redis.from_url(server.url) for _ in range(n_stores)]
        try:
            return await body(*[Store(c, prefix=prefix, **store_kw) for c in clients])
        finally:
            for c in clients:
                await c.aclose()
    return asyncio.run(main())


async def peek(store, max_rt, max_be):
    """Both queues' heads, read the way a worker loop reads them (lease held)."""
    assert await store.acquire_lease("peek-worker", "peek-replica", 5000)
    held, _, rt, be = await store.loop_inputs("peek-worker", "peek-replica", 5000, max_rt, max_be)
    assert held
    return rt, be


def rec(request_id, cls=REALTIME, arrival=0.0, ttft=1000.0, tpot=100.0, prompt_len=4, **kw):
    sampling = types_pb2.SamplingParams(max_tokens=16, temperature=0.0).SerializeToString()
    return RequestRecord(request_id=request_id, service_class=cls,
                         prompt_token_ids=list(range(100, 100 + prompt_len)), sampling=sampling,
                         ttft_ms=ttft, tpot_ms=tpot, arrival_ms=T0 + arrival, **kw)


# --- admission and queues --------------------------------------------------------------

def test_admit_is_atomic_and_idempotent(server):
    async def body(store):
        r = rec("a", prompt_len=6, submitted=True)
        r.prompt_token_ids = [0, 1, 2**32 - 1, 7, 8, 9]
        assert await store.admit(r) == ("a", True)
        assert await store.get("a") == r
        other = rec("a", cls=BEST_EFFORT, prompt_len=50)
        assert await store.admit(other) == ("a", False)
        assert await store.get("a") == r
        # Concurrent admits of one new id: exactly one creates it.
        results = await asyncio.gather(*[store.admit(rec("b", arrival=i)) for i in range(8)])
        assert sorted(created for _, created in results) == [False] * 7 + [True]
        load = await store.load([])
        assert load["classes"][REALTIME].queued_requests == 2
        assert load["classes"][REALTIME].queued_tokens == 6 + 4
        assert load["classes"][BEST_EFFORT].queued_requests == 0
        assert await store.get("nope") is None
        with pytest.raises(ValueError):
            await store.admit(rec("c", state="running"))
    run(server, body)


def test_queue_order_rt_by_deadline_be_by_arrival(server):
    async def body(store):
        await store.admit(rec("rt-a", arrival=0, ttft=500))     # deadline 500
        await store.admit(rec("rt-b", arrival=100, ttft=200))   # deadline 300
        await store.admit(rec("rt-c", arrival=50, ttft=1000))   # deadline 1050
        await store.admit(rec("be-x", cls=BEST_EFFORT, arrival=30, ttft=0))
        await store.admit(rec("be-y", cls=BEST_EFFORT, arrival=10, ttft=0))
        rt, be = await peek(store, 10, 10)
        assert [r.request_id for r in rt] == ["rt-b", "rt-a", "rt-c"]
        assert [r.request_id for r in be] == ["be-y", "be-x"]
        full = rec("rt-b", arrival=100, ttft=200)
        # Light records: everything but the prompt and sampling, whose length stays known.
        assert rt[0].prompt_token_ids == [] and rt[0].sampling == b""
        assert rt[0].num_prompt_tokens == full.num_prompt_tokens
        assert rt[0].request_id == full.request_id and rt[0].arrival_ms == full.arrival_ms
        assert await store.get("rt-b") == full
        rt, be = await peek(store, 2, 0)
        assert [r.request_id for r in rt] == ["rt-b", "rt-a"] and be == []
    run(server, body)


def test_concurrent_claims_take_each_request_once(server):
    ids = [f"r{i}" for i in range(30)]

    async def body(a, b):
        for i, rid in enumerate(ids):
            await a.admit(rec(rid, cls=REALTIME if i % 2 else BEST_EFFORT, arrival=i))
        got_a, got_b = await asyncio.gather(a.claim("w-a", ids, T0 + 5), b.claim("w-b", ids, T0 + 6))
        assert not set(got_a) & set(got_b)
        assert sorted(got_a + got_b) == sorted(ids)
        assert await a.running("w-a") == set(got_a) and await a.running("w-b") == set(got_b)
        for rid in got_a:
            r = await a.get(rid)
            assert (r.state, r.worker_id, r.first_scheduled_ms) == ("running", "w-a", T0 + 5)
        assert await a.claim("w-a", ids, T0 + 7) == []   # nothing left to claim
        load = await a.load(["w-a", "w-b"])
        for c in (REALTIME, BEST_EFFORT):
            cs = load["classes"][c]
            assert (cs.queued_requests, cs.queued_tokens, cs.running_requests) == (0, 0, 15)
        assert load["workers"]["w-a"].running_requests == len(got_a)
    run(server, body, n_stores=2)


def test_requeue_restores_queue_position_and_keeps_tokens(server):
    async def body(store):
        for rid, arrival, ttft in (("x", 0, 300), ("y", 10, 100), ("z", 20, 900)):
            await store.admit(rec(rid, arrival=arrival, ttft=ttft))
        await store.admit(rec("be", cls=BEST_EFFORT, arrival=5))
        qkey = store.keys.queue(REALTIME)
        before = {rid: await store.redis.zscore(qkey, rid) for rid in ("x", "y", "z")}
        assert await store.claim("w0", ["x", "y", "be"], T0 + 50) == ["x", "y", "be"]
        await store.append_tokens("y", 0, [5, 6], ["a", "b"], T0 + 60)
        assert await store.requeue("w0", ["y", "be", "z"], T0 + 70) == ["y", "be"]  # z never ran
        after = {rid: await store.redis.zscore(qkey, rid) for rid in ("x", "y", "z")}
        assert after["y"] == before["y"] and after["z"] == before["z"] and after["x"] is None
        y = await store.get("y")
        assert (y.state, y.worker_id, y.num_output_tokens) == ("queued", "", 2)
        assert await store.running("w0") == {"x"}
        rt, be = await peek(store, 5, 5)
        assert [r.request_id for r in rt] == ["y", "z"] and [r.request_id for r in be] == ["be"]
        load = await store.load(["w0"])
        assert load["classes"][REALTIME].queued_tokens == 8
        assert load["classes"][REALTIME].running_requests == 1
        assert load["classes"][BEST_EFFORT].running_requests == 0
        # Claimed again: first_scheduled_ms is the first time, not this one.
        assert await store.claim("w1", ["y"], T0 + 90) == ["y"]
        assert (await store.get("y")).first_scheduled_ms == T0 + 50
    run(server, body)


# --- tokens ------------------------------------------------------------------------------

async def stream_indices(store, rid):
    return [(e.index, e.token_id, e.text, e.final)
            for e in await store.read_stream(rid, -1)]


def test_append_tokens_exactly_once_with_overlapping_resends(server):
    async def body(store):
        await store.admit(rec("r"))
        await store.claim("w", ["r"], T0)
        assert await store.append_tokens("r", 0, [10, 11, 12], ["a", "b", "c"], T0 + 1) == 3
        assert await store.append_tokens("r", 0, [10, 11, 12], ["a", "b", "c"], T0 + 2) == 0
        assert await store.append_tokens("r", 1, [11, 12, 13, 14], ["b", "c", "d", "é"], T0 + 3) == 2
        assert await store.append_tokens("r", 5, [], [], T0 + 4) == 0
        with pytest.raises(ResponseError, match="BROSGAP"):
            await store.append_tokens("r", 7, [17], ["x"], T0 + 5)
        assert await stream_indices(store, "r") == [
            (0, 10, "a", False), (1, 11, "b", False), (2, 12, "c", False),
            (3, 13, "d", False), (4, 14, "é", False)]
        r = await store.get("r")
        assert (r.num_output_tokens, r.first_token_ms, r.last_token_ms) == (5, T0 + 1, T0 + 3)
        assert await store.append_tokens("unknown", 0, [1], ["x"]) == 0
        with pytest.raises(ValueError):
            await store.append_tokens("r", 5, [1, 2], ["x"])
    run(server, body)


def test_batch_writes_in_one_round_trip_and_survives_script_flush(server, monkeypatch):
    sends = []
    real_send = store_mod.Batch._send

    async def counting_send(self):
        sends.append(len(self._ops))
        return await real_send(self)

    monkeypatch.setattr(store_mod.Batch, "_send", counting_send)

    async def body(store):
        for rid in ("p", "q"):
            await store.admit(rec(rid))
        await store.claim("w", ["p", "q"], T0)
        async with store.batch() as b:
            b.append_tokens("p", 0, [1], ["x"], T0 + 10)
            b.append_tokens("q", 0, [2, 3], ["y", "z"], T0 + 10)
            b.finish("q", "length", T0 + 11)
            b.set_worker_state("w", {"occupancy": b"\x00\xff", "last_step_ms": 1.5})
        # One pipeline, four writes (the worker state: its hash, and when, in the workers zset).
        assert sends == [4] and b.results == [1, 2, 1, 2, 1]
        assert await store.redis.zscore(store.keys.workers(), "w") >= T0
        assert (await store.get("q")).state == "finished"
        assert await store.redis.hgetall(store.keys.worker("w")) == {
            b"occupancy": b"\x00\xff", b"last_step_ms": b"1.5"}
        # The server forgets the scripts: the batch reloads them and sends again, once.
        # EXEC does not roll back, so the first send's HSET ran; every op is idempotent.
        sends.clear()
        await store.redis.script_flush()
        async with store.batch() as b:
            b.append_tokens("p", 0, [1, 4], ["x", "w"], T0 + 12)
            b.finish("p", "stop", T0 + 13)
            b.set_worker_state("w", {"last_step_ms": 2.5})
        assert sends == [3, 3] and b.results == [1, 1, 0, 0]
        assert [e.index for e in await store.read_stream("p", -1)] == [0, 1, -1]
        # An exception inside the block sends nothing.
        await store.admit(rec("r"))
        with pytest.raises(RuntimeError):
            async with store.batch() as b:
                b.finish("r", "stop", T0 + 20)
                raise RuntimeError("planner failed")
        assert (await store.get("r")).state == "queued"
    run(server, body)


def test_read_stream_resumes_without_loss_or_duplication(server):
    async def body(store):
        await store.admit(rec("r"))
        await store.claim("w", ["r"], T0)
        await store.append_tokens("r", 0, list(range(5)), list("abcde"), T0 + 1)
        assert await store.finish("r", "stop", T0 + 2)
        everything = await store.read_stream("r", -1)
        assert [e.index for e in everything[:-1]] == [0, 1, 2, 3, 4]
        assert everything[-1] == StreamEntry(final=True)
        after2 = await store.read_stream("r", 2)
        assert [e.index for e in after2] == [3, 4, -1] and after2[-1].final
        assert await store.read_stream("r", 4) == [StreamEntry(final=True)]
        # Reading in pages of 2 gives each token once, in order.
        seen, last = [], -1
        while True:
            page = await store.read_stream("r", last, count=2)
            tokens = [e for e in page if not e.final]
            seen += [e.index for e in tokens]
            if any(e.final for e in page):
                break
            last = tokens[-1].index
        assert seen == [0, 1, 2, 3, 4]
    run(server, body)


# --- results -----------------------------------------------------------------------------

def test_finish_writes_final_once_and_sets_result_ttl(server):
    async def body(store):
        await store.admit(rec("r"))
        await store.claim("w", ["r"], T0)
        await store.append_tokens("r", 0, [1], ["a"], T0 + 5)
        assert await store.finish("r", "stop", T0 + 9) is True
        assert await store.finish("r", "length", T0 + 10, error="late") is False
        assert await store.append_tokens("r", 1, [2], ["b"], T0 + 11) == 0  # after the end
        entries = await store.redis.xrange(store.keys.tok("r"))
        assert [e[0] for e in entries] == [b"0-1", b"1-0"]
        r = await store.get("r")
        assert (r.state, r.finish_reason, r.error, r.finished_ms) == ("finished", "stop", "", T0 + 9)
        assert r.worker_id == "w" and await store.running("w") == set()
        for key in (store.keys.req("r"), store.keys.tok("r")):
            assert 100 < await store.redis.ttl(key) <= 123
        assert await store.finish("unknown", "stop", T0) is False
    run(server, body, result_ttl_s=123)


def test_outcomes_feed_attainment(server):
    async def body(store):
        # met both: first token 50 ms after arrival (target 100), 10 ms per token (target 20)
        await store.admit(rec("good", ttft=100, tpot=20))
        # TTFT met, TPOT missed: (200 - 50) / 2 = 75 ms per token
        await store.admit(rec("slow", ttft=100, tpot=20))
        # no token at all: TTFT missed; one token or none: TPOT met
        await store.admit(rec("none", ttft=100, tpot=20))
        await store.claim("w", ["good", "slow", "none"], T0)
        await store.append_tokens("good", 0, [1, 2], ["a", "b"], T0 + 50)
        await store.append_tokens("good", 2, [3], ["c"], T0 + 70)
        await store.append_tokens("slow", 0, [1], ["a"], T0 + 50)
        await store.append_tokens("slow", 1, [2], ["b"], T0 + 60)
        await store.append_tokens("slow", 2, [3], ["c"], T0 + 200)
        for rid in ("good", "slow", "none"):
            await store.finish(rid, "stop", T0 + 300)
        assert await store.redis.lrange(store.keys.recent(REALTIME), 0, -1) == [b"01", b"10", b"11"]
        cs = (await store.load([]))["classes"][REALTIME]
        assert cs.recent_finished == 3
        assert cs.recent_ttft_attainment == pytest.approx(2 / 3)
        assert cs.recent_tpot_attainment == pytest.approx(2 / 3)
    run(server, body)


# --- leases ------------------------------------------------------------------------------

def test_leases(server):
    async def body(store):
        assert await store.acquire_lease("w", "A", 5000)
        assert not await store.acquire_lease("w", "B", 5000)
        assert await store.lease_holder("w") == "A"
        assert await store.acquire_lease("w", "A", 150)     # ours: re-acquire extends
        assert await store.renew_lease("w", "A", 150)
        assert not await store.renew_lease("w", "B", 5000)
        assert not await store.release_lease("w", "B")
        assert await store.lease_holder("w") == "A"
        await asyncio.sleep(0.3)                            # A stops renewing
        assert await store.lease_holder("w") is None
        assert not await store.renew_lease("w", "A", 150)   # too late for A
        assert await store.acquire_lease("w", "B", 5000)
        assert not await store.release_lease("w", "A")
        assert await store.release_lease("w", "B")
        assert await store.lease_holder("w") is None
        ids = {await store.new_replica_id() for _ in range(3)}
        assert len(ids) == 3
    run(server, body)


# --- aborts ------------------------------------------------------------------------------

def test_abort_queued_request_finishes_it(server):
    async def body(store):
        await store.admit(rec("q", prompt_len=9))
        assert await store.request_abort("q", T0 + 5)
        r = await store.get("q")
        assert (r.state, r.finish_reason, r.finished_ms) == ("finished", "abort", T0 + 5)
        assert await store.read_stream("q", -1) == [StreamEntry(final=True)]
        cs = (await store.load([]))["classes"][REALTIME]
        assert (cs.queued_requests, cs.queued_tokens, cs.recent_finished) == (0, 0, 0)
        assert not await store.request_abort("q")
        assert not await store.request_abort("unknown")
        assert await store.claim("w", ["q"], T0) == []
    run(server, body)


def test_abort_running_request_goes_to_its_worker(server):
    async def body(store):
        for rid in ("r1", "r2"):
            await store.admit(rec(rid))
        await store.claim("w", ["r1", "r2"], T0)
        assert await store.request_abort("r1")
        assert await store.request_abort("r2")
        r1 = await store.get("r1")
        assert r1.state == "running" and r1.abort_requested
        assert await store.acquire_lease("w", "me", 5000)
        assert (await store.loop_inputs("w", "me", 5000, 0, 0))[1] == ["r1", "r2"]
        assert (await store.loop_inputs("w", "me", 5000, 0, 0))[1] == []
        assert await store.finish("r1", "abort", T0 + 9)    # the worker confirms r1
        # The worker dies before confirming r2: requeue must not run it again.
        assert await store.requeue("w", ["r2"], T0 + 10) == []
        r2 = await store.get("r2")
        assert (r2.state, r2.finish_reason) == ("finished", "abort")
        load = await store.load(["w"])
        assert load["classes"][REALTIME].running_requests == 0
        assert load["classes"][REALTIME].queued_requests == 0
        assert load["workers"]["w"].running_requests == 0
    run(server, body)


def test_an_abort_for_an_abandoned_stream_lands_only_while_no_stream_has_attached_since(server):
    async def body(store):
        await store.admit(rec("g", num_attaches=1))       # made by a Generate: its stream is the first
        assert (await store.get("g")).num_attaches == 1
        assert await store.attach("g") == 2               # the client came back (a resume)
        assert not await store.abort_abandoned("g", 1, T0 + 1)   # the first stream's abort is stale
        assert (await store.get("g")).state == "queued"
        assert await store.abort_abandoned("g", 2, T0 + 2)       # the resumed one's is not
        assert (await store.get("g")).finish_reason == "abort"
        assert not await store.abort_abandoned("g", 2, T0 + 3)   # once only
        # Made by Submit: never aborted because a stream that watched it through Generate left.
        await store.admit(rec("s", submitted=True))
        assert await store.attach("s") == 1
        assert not await store.abort_abandoned("s", 1, T0)
        assert (await store.get("s")).state == "queued"
        assert await store.request_abort("s", T0)                 # a client's Abort still works
        # An unknown (or expired) request is not brought back as a stub record.
        assert await store.attach("gone") == 0
        assert await store.get("gone") is None
        assert not await store.abort_abandoned("gone", 0)
    run(server, body)


# --- load --------------------------------------------------------------------------------

def test_load_numbers(server):
    async def body(store):
        for rid, n in (("rt1", 10), ("rt2", 20), ("rt3", 30)):
            await store.admit(rec(rid, prompt_len=n))
        for rid, n in (("be1", 5), ("be2", 7)):
            await store.admit(rec(rid, cls=BEST_EFFORT, prompt_len=n, ttft=0, tpot=0))
        await store.claim("w0", ["rt1"], T0)
        await store.claim("w1", ["be1"], T0)
        await store.append_tokens("rt1", 0, [1], ["a"], T0 + 10)
        await store.finish("rt1", "length", T0 + 20)
        await store.set_worker_state("w0", {"occupancy": b"\x01\x02", "running_sequences": 0})
        await store.acquire_lease("w0", "replica-1", 5000)
        load = await store.load(["w0", "w1", "w2"])
        rt, be = load["classes"][REALTIME], load["classes"][BEST_EFFORT]
        assert rt == store_mod.ClassStats(REALTIME, 2, 50, 0, 1, 1.0, 1.0)
        assert be == store_mod.ClassStats(BEST_EFFORT, 1, 7, 1, 0, 1.0, 1.0)
        assert load["workers"]["w0"] == store_mod.WorkerStats(
            "w0", 0, "replica-1", {"occupancy": b"\x01\x02", "running_sequences": b"0"})
        assert load["workers"]["w1"] == store_mod.WorkerStats("w1", 1, "", {})
        assert load["workers"]["w2"] == store_mod.WorkerStats("w2", 0, "", {})
    run(server, body)


# --- static checks -----------------------------------------------------------------------

def test_no_keys_or_scan_anywhere():
    for module in (store_mod, keys_mod):
        source = Path(module.__file__).read_text()
        assert not re.search(r"""['"](KEYS|SCAN|HSCAN|SSCAN|ZSCAN)['"\s]""", source, re.I), module
        assert not re.search(r"\.(keys|scan|scan_iter|hscan|sscan|zscan)\(", source), module


def test_store_refuses_decoding_client(server):
    async def body():
        client = aioredis.Redis.from_url(server.url, decode_responses=True)
        try:
            with pytest.raises(ValueError):
                Store(client)
        finally:
            await client.aclose()
    asyncio.run(body())


# --- the embedded server -------------------------------------------------------------------

def test_embedded_server_kill_then_fresh_start():
    binary = server_binary()
    assert os.access(binary, os.X_OK)
    server = EmbeddedRedis()
    server.start()
    try:
        import redis
        first_pid, data_dir = server.pid, server.data_dir
        assert redis.Redis.from_url(server.url).ping()
        server.kill()
        assert server.pid is None
        with pytest.raises(ProcessLookupError):
            os.kill(first_pid, 0)
        assert Path(data_dir).is_dir()                  # a crash leaves the data behind
        server.start()                                  # same port, same dir
        assert server.pid != first_pid
        client = redis.Redis.from_url(server.url)
        assert client.ping() and client.set("k", "v") and client.get("k") == b"v"
        client.close()
    finally:
        server.stop()
    assert not Path(data_dir).exists()
    with EmbeddedRedis() as fresh:
        import redis
        assert redis.Redis.from_url(fresh.url).ping()


def test_peek_carries_what_planning_reads_and_nothing_else(server):
    """A requeued request keeps its progress in the peek (output count, token times: the
    planner's view of it); the prompt, sampling and owner stay in Redis."""
    async def body(store):
        await store.admit(rec("moved", arrival=3, ttft=250, tpot=50, prompt_len=9, owner="tenant-a"))
        assert await store.claim("w0", ["moved"], 10) == ["moved"]
        await store.append_tokens("moved", 0, [5, 6], ["a", "b"], now_ms=T0 + 40)
        assert await store.requeue("w0", ["moved"]) == ["moved"]
        full = await store.get("moved")
        assert await store.acquire_lease("w1", "me", 5000)
        _, _, rt, _ = await store.loop_inputs("w1", "me", 5000, 10, 0)
        [peeked] = rt
        for name in PLAN_FIELDS:
            assert getattr(peeked, name) == getattr(full, name), name
        assert peeked.num_output_tokens == 2 and peeked.first_token_ms is not None
        assert peeked.prompt_token_ids == [] and peeked.sampling == b"" and peeked.owner == ""
        assert full.owner == "tenant-a" and full.sampling
    run(server, body)


def test_loop_inputs_renews_takes_aborts_and_peeks_in_one_round_trip(server):
    async def body(store):
        await store.admit(rec("rt-1", arrival=0, ttft=100))
        await store.admit(rec("be-1", cls=BEST_EFFORT, arrival=5, ttft=0))
        await store.admit(rec("run", arrival=1))
        assert await store.claim("w0", ["run"], 10) == ["run"]
        assert await store.acquire_lease("w0", "me", 5000)
        assert await store.request_abort("run")
        calls = []
        original = store.redis.pipeline
        store.redis.pipeline = lambda *a, **k: calls.append(1) or original(*a, **k)
        held, aborts, rt, be = await store.loop_inputs("w0", "me", 5000, 10, 10)
        store.redis.pipeline = original
        assert len(calls) == 1  # one pipeline: one round trip
        assert held and aborts == ["run"]
        assert [r.request_id for r in rt] == ["rt-1"] and [r.request_id for r in be] == ["be-1"]
        assert rt[0].num_prompt_tokens == 4 and rt[0].prompt_token_ids == []  # light records
        held, aborts, _, _ = await store.loop_inputs("w0", "me", 5000, 10, 0)
        assert held and aborts == []  # each abort handed out once
        held, _, _, be = await store.loop_inputs("w0", "someone-else", 5000, 10, 0)
        assert not held and be == []
    run(server, body)
