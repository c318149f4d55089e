"""The worker loop writes each report to Redis while the worker runs the next step, and
still frees a finished sequence on the worker only once its tokens and finish are in
Redis; a write that fails costs a reconnect, never a token.

In-process stack (tests/inprocess.py): real gRPC to a sim worker, a real Redis. The
report's write is the loop's only use of `worker_loop.Batch`, which these tests wrap.
"""
from __future__ import annotations

import asyncio
import time

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

import scheduler_svc.worker_loop as worker_loop
from bros.client import Client, Final
from bros.redis_server import EmbeddedRedis
from inprocess import InProcessStack
from scheduler_svc.store import Batch

PROMPT = list(range(100, 140))


@pytest.fixture(scope="module")
def redis_server():
    with EmbeddedRedis() as r:
        yield r


@pytest.fixture(params=[0, 1], ids=["serial", "pipelined"])
def depth(request):
    """The loop's pipeline depth: each test holds for both."""
    return request.param


def count_plans(monkeypatch, sent: list[int]) -> None:
    """sent[0]: plans sent so far (counted as the loop starts sending one). Patched on the
    class before the stack starts: patched on a running loop, a call already inside the
    old method (its write held by the test, waiting for a plan the loop cannot send)
    would go uncounted and stall the test."""
    write_plan = worker_loop.WorkerLoop._write_plan

    async def counting(self, stream, plan):
        sent[0] += 1
        return await write_plan(self, stream, plan)

    monkeypatch.setattr(worker_loop.WorkerLoop, "_write_plan", counting)


def generate(address: str, max_tokens: int) -> Final:
    with Client(address, timeout=30) as client:
        events = list(client.generate(PROMPT, service_class="rt", max_tokens=max_tokens, temperature=0.0))
    return events[-1]


def test_a_reports_write_waits_for_the_next_plan_to_be_sent(redis_server, monkeypatch, depth):
    """Each report write is held until the loop has sent the plan after it: a loop that
    waited for its write before planning again would stall here."""
    sent, held, stalled = [0], [], []

    class HeldUntilNextPlan(Batch):
        def __init__(self, store):
            super().__init__(store)
            self.plans_before = sent[0]

        async def execute(self):
            deadline = time.monotonic() + 5
            while sent[0] <= self.plans_before:
                if time.monotonic() > deadline:
                    stalled.append(self.plans_before)
                    break
                await asyncio.sleep(0.001)
            held.append(self.plans_before)
            return await super().execute()

    monkeypatch.setattr(worker_loop, "Batch", HeldUntilNextPlan)
    count_plans(monkeypatch, sent)
    with InProcessStack(redis_server.url, pipeline_depth=depth) as stack:
        final = generate(stack.address, 6)
    assert not final.error and final.num_output_tokens == 6
    assert not stalled, f"report writes waited on by the loop after plans {stalled}"
    assert len(held) >= 6   # 3 prefill chunks of 16 tokens and 5 decodes, at least


def test_a_finished_sequence_is_freed_only_once_redis_has_it(redis_server, monkeypatch, depth):
    freed, early = [], []
    with InProcessStack(redis_server.url, chunk_budget=64, pipeline_depth=depth) as stack:
        loop = stack.worker_loop
        write_plan = loop._write_plan

        async def checking(stream, plan):
            for rid in plan.free:
                rec = await stack.store.get(rid)
                entries = await stack.store.read_stream(rid, -1)
                freed.append(rid)
                if rec.state != "finished" or not entries or not entries[-1].final:
                    early.append((rid, rec.state, len(entries)))
            return await write_plan(stream, plan)

        monkeypatch.setattr(loop, "_write_plan", checking)
        with Client(stack.address, timeout=30) as client:
            streams = [client.generate(PROMPT, service_class="be", max_tokens=n, temperature=0.0)
                       for n in (1, 2, 3, 5, 8, 13)]
            finals = [list(s)[-1] for s in streams]
            ids = {s.request_id for s in streams}
        deadline = time.monotonic() + 5
        while not ids <= set(freed) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert [f.num_output_tokens for f in finals] == [1, 2, 3, 5, 8, 13]
    assert not early, f"freed on the worker before Redis had them: {early}"
    assert ids <= set(freed), "every finished sequence is freed on the worker"


def test_a_failed_report_write_loses_no_token(redis_server, monkeypatch, depth):
    """The third report write fails (Redis drops the connection): the session ends, the
    loop reconnects and adopts what the worker holds, and the stream is whole."""
    writes = []

    class FailingOnce(Batch):
        async def execute(self):
            writes.append(1)
            if len(writes) == 3:
                raise RedisConnectionError("connection dropped (test)")
            return await super().execute()

    monkeypatch.setattr(worker_loop, "Batch", FailingOnce)
    with InProcessStack(redis_server.url, pipeline_depth=depth) as stack:
        with Client(stack.address, timeout=30) as client:
            stream = client.generate(PROMPT, service_class="rt", max_tokens=8, temperature=0.0)
            events = list(stream)
        rec = stack.record(stream.request_id)
    final = events[-1]
    tokens = [t for e in events[:-1] for t in e.token_ids]
    assert len(writes) > 3
    assert not final.error and final.num_output_tokens == 8 and len(tokens) == 8
    assert rec.state == "finished" and rec.num_output_tokens == 8


def test_a_pipelined_loop_sends_the_next_plan_before_reading_a_report(redis_server, monkeypatch, depth):
    """With --pipeline-depth 1 the worker finds plan k+1 waiting when it ends step k: every
    report of a step that ran work is read after a later plan was sent. Serially, none is."""
    lead = []
    with InProcessStack(redis_server.url, pipeline_depth=depth) as stack:
        loop = stack.worker_loop
        read_report = loop._read_report

        async def reading(stream):
            report = await read_report(stream)
            if report.outputs:   # a step that ran work
                lead.append(loop._plan_id - report.plan_id)   # plans sent after this one
            return report

        monkeypatch.setattr(loop, "_read_report", reading)
        final = generate(stack.address, 12)
    assert not final.error and final.num_output_tokens == 12
    assert len(lead) >= 14, lead   # 3 prompt chunks of 16 tokens, 11 decodes (and maybe a retry)
    assert set(lead) == {depth}, lead
