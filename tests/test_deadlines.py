"""Deadlines: a request's timeout_ms and a Generate call's gRPC deadline end the request,
queued or running, and its KV is freed within an iteration."""
import time

import pytest

from bros.client import BrosError, Client, Final, RetryPolicy
from bros.redis_server import EmbeddedRedis
from stack import Scheduler, Worker

SIM = ("--backend", "sim", "--sim-clock", "real", "--num-blocks", "1024")
LONG = 4000  # tokens: ~100 s on the simulated GPU, so only a deadline ends these


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deadlines")
    with EmbeddedRedis() as redis_server:
        worker = Worker(tmp, *SIM).start()
        sched = Scheduler(tmp, redis_server.url, [worker.address], "--max-num-seqs", "2").start()
        client = Client(sched.address, retry=RetryPolicy(max_attempts=20, initial_backoff_s=0.1))
        try:
            yield sched, worker, client
        finally:
            client.close()
            sched.stop()
            worker.stop()


def final_of(client: Client, rid: str) -> Final:
    return [ev for ev in client.watch(rid)][-1]


def pool_used(client: Client) -> int:
    w = client.load()["workers"][0]
    return int(w["occupancy"]["rt_slots"]) + int(w["occupancy"]["be_slots"]) + int(w["running_sequences"])


def wait_pool_empty(client: Client, timeout: float = 5.0) -> float:
    t0 = time.monotonic()
    while pool_used(client):
        assert time.monotonic() - t0 < timeout, "KV not freed"
        time.sleep(0.02)
    return time.monotonic() - t0


@pytest.mark.parametrize("service_class", ["rt", "be"])
def test_running_request_times_out_and_frees_its_kv(stack, service_class):
    _, _, client = stack
    t0 = time.monotonic()
    rid = client.submit([11] * 40, service_class=service_class, max_tokens=LONG, timeout_ms=1500)
    final = final_of(client, rid)
    took = time.monotonic() - t0
    assert final.finish_reason == "timeout" and final.error == "deadline passed"
    assert 0 < final.num_output_tokens < LONG
    assert 1.4 < took < 3.0
    assert wait_pool_empty(client) < 1.0


def test_queued_request_times_out_without_running(stack):
    _, _, client = stack
    blockers = [client.submit([12] * 30, service_class="be", max_tokens=LONG, timeout_ms=4000) for _ in range(2)]
    time.sleep(0.3)  # both seats (--max-num-seqs 2) taken
    rid = client.submit([13] * 30, service_class="be", max_tokens=8, timeout_ms=800)
    final = final_of(client, rid)
    assert final.finish_reason == "timeout" and final.num_output_tokens == 0
    load = {c["service_class"]: c for c in client.load()["classes"]}
    assert load["be"]["queued_requests"] == 0
    for b in blockers:
        assert final_of(client, b).finish_reason == "timeout"
    wait_pool_empty(client)


def test_generate_call_deadline_ends_the_request(stack):
    _, _, client = stack
    short = Client(stack[0].address, timeout=1.5, retry=RetryPolicy(max_attempts=1))
    stream = short.generate([14] * 20, service_class="rt", max_tokens=LONG)
    with pytest.raises(BrosError) as err:
        for _ in stream:
            pass
    short.close()
    assert err.value.code == "DEADLINE_EXCEEDED"
    final = final_of(client, stream.request_id)
    assert final.finish_reason in ("timeout", "abort") and final.num_output_tokens < LONG
    assert wait_pool_empty(client) < 1.0
