"""Crash tolerance on the full stack over loopback: workers killed or stalled, a scheduler
replica killed while another stands by, Redis killed and restarted from its AOF. Every
test runs a hybrid load (RT streams, BE submit + watch) and asserts that every request
completes and every token index reaches its client exactly once."""
import os
import signal
import time

import pytest

from bros.client import BrosError, Client, RetryPolicy
from bros.redis_server import EmbeddedRedis
from hybrid import HybridRun
from stack import Scheduler, Worker, free_port, health_status

RETRY = RetryPolicy(max_attempts=60, initial_backoff_s=0.1, max_backoff_s=0.5)
SIM = ("--backend", "sim", "--sim-clock", "real", "--num-blocks", "1024")


def workers_by_id(client: Client) -> dict:
    return {w["worker_id"]: w for w in client.load()["workers"]}


def wait_until(predicate, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def running_on(client: Client, address: str) -> int:
    return int(workers_by_id(client).get(address, {}).get("running_sequences", 0))


# Serially, and with a plan always in flight beside the step (--pipeline-depth 1) when
# the worker dies or stalls.
PIPELINE = pytest.mark.parametrize("depth", [0, 1], ids=["serial", "pipelined"])


@PIPELINE
def test_sigkill_worker_requeues_its_requests_on_the_other(tmp_path, depth):
    with EmbeddedRedis() as redis_server:
        w1, w2 = Worker(tmp_path, *SIM, name="w1").start(), Worker(tmp_path, *SIM, name="w2").start()
        sched = Scheduler(tmp_path, redis_server.url, [w1.address, w2.address],
                          "--worker-requeue-after-ms", "1000", "--pipeline-depth", str(depth)).start()
        client = Client(sched.address, retry=RETRY)
        try:
            run = HybridRun(client, 60, 60).start()
            wait_until(lambda: running_on(client, w1.address) >= 5, 30, "w1 runs requests")
            w1.kill()
            run.join(timeout=90)
            finished_without_w1 = len(run.done)
            # Requeued work ran on w2; w1 comes back and is used again.
            w1 = Worker(tmp_path, *SIM, name="w1b", port=w1.port).start()
            wait_until(lambda: workers_by_id(client)[w1.address]["reachable"], 30, "w1 reachable again")
            again = HybridRun(client, 20, 10, prefix="again-").start()
            again.join(timeout=60)
        finally:
            client.close()
            sched.stop()
            w1.stop()
            w2.stop()
    assert finished_without_w1 == 60, "requests stuck on the dead worker"
    run.check()
    again.check()


@PIPELINE
def test_stalled_worker_is_dropped_and_its_work_requeued(tmp_path, depth):
    with EmbeddedRedis() as redis_server:
        w1, w2 = Worker(tmp_path, *SIM, name="w1").start(), Worker(tmp_path, *SIM, name="w2").start()
        sched = Scheduler(tmp_path, redis_server.url, [w1.address, w2.address], "--step-timeout-ms", "1500",
                          "--worker-requeue-after-ms", "500", "--pipeline-depth", str(depth)).start()
        client = Client(sched.address, retry=RETRY)
        try:
            run = HybridRun(client, 60, 60).start()
            wait_until(lambda: running_on(client, w1.address) >= 5, 30, "w1 runs requests")
            os.kill(w1.proc.pid, signal.SIGSTOP)   # alive, but it answers nothing
            run.join(timeout=90)
            finished_while_stalled = len(run.done)
            stalled_reachable = workers_by_id(client)[w1.address]["reachable"]
            os.kill(w1.proc.pid, signal.SIGCONT)
            # Back: the next session reconciles, freeing what now runs elsewhere.
            wait_until(lambda: workers_by_id(client)[w1.address]["reachable"], 30, "w1 reachable again")
            wait_until(lambda: _pool_empty(workers_by_id(client)[w1.address]), 30, "w1's pool freed")
        finally:
            client.close()
            sched.stop()
            w1.stop()
            w2.stop()
    assert finished_while_stalled == 60, "requests stuck on the stalled worker"
    run.check()
    assert not stalled_reachable


def _pool_empty(worker: dict) -> bool:
    occ = worker.get("occupancy", {})
    return int(occ.get("rt_slots", 0)) == 0 and int(occ.get("be_slots", 0)) == 0 and \
        int(worker.get("running_sequences", 0)) == 0


def test_standby_replica_takes_over_within_the_lease(tmp_path):
    lease_ms = 1500
    with EmbeddedRedis() as redis_server:
        worker = Worker(tmp_path, *SIM).start()
        args = ("--lease-ttl-ms", str(lease_ms))
        s1 = Scheduler(tmp_path, redis_server.url, [worker.address], *args, "--replica-id", "s1").start()
        wait_until(lambda: Client(s1.address).load()["workers"][0]["leased_by"] == "s1", 10, "s1 leases")
        s2 = Scheduler(tmp_path, redis_server.url, [worker.address], *args, "--replica-id", "s2").start()
        # One channel over both replicas, first s1: when s1 dies, calls go to s2 and resume.
        client = Client(f"ipv4:127.0.0.1:{s1.port},127.0.0.1:{s2.port}", retry=RETRY)
        watcher = Client(s2.address, retry=RETRY)
        try:
            run = HybridRun(client, 60, 60).start()
            run.wait_progress(20)
            s1.kill()
            took_s = wait_until(lambda: watcher.load()["workers"][0]["leased_by"] == "s2", 15, "s2 leases")
            run.join(timeout=90)
        finally:
            client.close()
            watcher.close()
            s2.stop()
            worker.stop()
    run.check()
    assert took_s < lease_ms / 1e3 + 2.0  # the lease running out, plus one probe period


@pytest.mark.parametrize("appendfsync", ["always"])
def test_redis_killed_and_restarted_from_aof_loses_nothing(tmp_path, appendfsync):
    data = tmp_path / "redis"
    data.mkdir()
    redis_server = EmbeddedRedis(port=free_port(), data_dir=str(data), appendonly=True,
                                 appendfsync=appendfsync).start()
    worker = Worker(tmp_path, *SIM).start()
    sched = Scheduler(tmp_path, redis_server.url, [worker.address]).start()
    client = Client(sched.address, retry=RETRY)
    no_retry = Client(sched.address, retry=RetryPolicy(max_attempts=1))
    try:
        early = HybridRun(client, 10, 8, prefix="early-").start()
        early.join(timeout=60)
        run = HybridRun(client, 40, 80).start()
        run.wait_progress(10)
        redis_server.kill()
        wait_until(lambda: health_status(sched.address) == "NOT_SERVING", 10, "NOT_SERVING while Redis is away")
        with pytest.raises(BrosError) as refused:
            no_retry.submit([5, 6, 7], service_class="be", max_tokens=4)
        time.sleep(1.0)
        redis_server.start()  # same port, same dir: replays the AOF
        wait_until(lambda: health_status(sched.address) == "SERVING", 30, "SERVING again")
        run.join(timeout=120)
        # Results finished before the crash are still there.
        replay = {i: [ev for ev in client.watch(early.request_id(i))] for i in range(10)}
    finally:
        client.close()
        no_retry.close()
        sched.stop()
        worker.stop()
        redis_server.stop()
    assert refused.value.code == "UNAVAILABLE"
    early.check()
    run.check()
    for i, events in replay.items():
        tokens = [t for ev in events if hasattr(ev, "token_ids") for t in ev.token_ids]
        assert len(tokens) == 8 and events[-1].finish_reason == "length", (i, events)


def test_a_stream_abandoned_while_redis_is_away_is_aborted_once_it_is_back(tmp_path):
    """A Generate cancelled mid-stream, then Redis killed before the resume grace ends: the
    abort that the grace's end owes the request waits for Redis (retried with backoff for
    --redis-retry-s) instead of being dropped, and the request ends ABORT, not LENGTH."""
    import grpc

    from bros.v1 import inference_pb2 as ipb
    from bros.v1 import inference_pb2_grpc
    from bros.v1 import types_pb2 as tpb

    data = tmp_path / "redis"
    data.mkdir()
    redis_server = EmbeddedRedis(port=free_port(), data_dir=str(data), appendonly=True,
                                 appendfsync="always").start()
    worker = Worker(tmp_path, *SIM).start()
    sched = Scheduler(tmp_path, redis_server.url, [worker.address], "--resume-grace-s", "1").start()
    channel = grpc.insecure_channel(sched.address)
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        call = stub.Generate(ipb.GenerateRequest(
            request_id="left-while-redis-away", token_ids=ipb.TokenIds(ids=[5, 6, 7, 8]),
            service_class=tpb.REALTIME, ttft_ms=60_000, tpot_ms=60_000,
            sampling=tpb.SamplingParams(max_tokens=4000, temperature=0.0)))
        assert next(call).HasField("chunk")
        call.cancel()
        redis_server.kill()
        time.sleep(3.0)            # the grace (1 s) ends while Redis is away
        redis_server.start()       # same port, same dir: replays the AOF
        wait_until(lambda: health_status(sched.address) == "SERVING", 30, "SERVING again")
        final = None
        for msg in stub.Watch(ipb.WatchRequest(request_id="left-while-redis-away", wait=True), timeout=120):
            if msg.HasField("final"):
                final = msg.final
    finally:
        channel.close()
        sched.stop()
        worker.stop()
        redis_server.stop()
    assert final is not None and final.finish_reason == tpb.ABORT, final
    assert final.num_output_tokens < 4000
