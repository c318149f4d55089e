"""Overload: bounded queues refuse BE first with RESOURCE_EXHAUSTED and a retry hint, and an
RT request whose TTFT target can no longer be met is refused at once (or admitted and
flagged, by config). Nothing refused is written."""
import time

import pytest

from bros.client import BrosError, Client, RetryPolicy
from bros.redis_server import EmbeddedRedis
from stack import Scheduler, Worker

SIM = ("--backend", "sim", "--sim-clock", "real", "--num-blocks", "1024")
NO_RETRY = RetryPolicy(max_attempts=1)


@pytest.fixture(scope="module")
def redis_url():
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(tmp_path_factory.mktemp("overload"), *SIM).start()
    yield w
    w.stop()


def queued(client: Client) -> dict:
    return {c["service_class"]: (c["queued_requests"], int(c["queued_tokens"])) for c in client.load()["classes"]}


def start_blocker(client: Client) -> str:
    """One long RT request in the only seat (--max-num-seqs 1): everything after it queues
    (bros would pause a BE blocker to seat RT; a running RT gives way to no one)."""
    rid = client.submit([1] * 80, service_class="rt", max_tokens=4000, timeout_ms=60_000, ttft_ms=60_000,
                        tpot_ms=60_000)
    deadline = time.monotonic() + 10
    while queued(client)["rt"][0] and time.monotonic() < deadline:
        time.sleep(0.02)
    return rid


def test_bounded_queues_refuse_be_first_with_a_retry_hint(tmp_path, redis_url, worker):
    sched = Scheduler(tmp_path, redis_url, [worker.address], "--max-num-seqs", "1", "--max-queued-requests", "10",
                      "--be-queue-share", "0.5", "--retry-after-ms", "1500", prefix="ovl1").start()
    client = Client(sched.address, retry=NO_RETRY)
    try:
        blocker = start_blocker(client)
        be = [client.submit([2] * 10, service_class="be", max_tokens=4) for _ in range(5)]
        before = queued(client)
        with pytest.raises(BrosError) as be_refused:
            client.submit([3] * 10, service_class="be", max_tokens=4)
        assert queued(client) == before  # nothing of the refused request was written
        # RT still gets the rest of the bound...
        rt = [client.submit([4] * 10, service_class="rt", max_tokens=4, ttft_ms=60_000) for _ in range(5)]
        with pytest.raises(BrosError) as rt_refused:
            client.submit([5] * 10, service_class="rt", max_tokens=4, ttft_ms=60_000)
        assert queued(client)["rt"] == (5, 50) and queued(client)["be"] == (5, 50)
        client.abort(blocker)
        # ...and everything admitted completes.
        finals = [[ev for ev in client.watch(rid)][-1] for rid in be + rt]
    finally:
        client.close()
        sched.stop()
    for err in (be_refused.value, rt_refused.value):
        assert err.code == "RESOURCE_EXHAUSTED" and "service_class" in err.message
        assert err.retry_after_s == 1.5
    assert all(f.finish_reason == "length" and f.num_output_tokens == 4 for f in finals)


@pytest.mark.parametrize("mode", ["reject", "flag"])
def test_rt_whose_ttft_target_cannot_be_met(tmp_path, redis_url, worker, mode):
    sched = Scheduler(tmp_path, redis_url, [worker.address], "--max-num-seqs", "1", "--rt-infeasible", mode,
                      prefix=f"ovl-{mode}").start()
    client = Client(sched.address, retry=NO_RETRY)
    try:
        # A prefill the loop can measure its rate on, then the seat taken.
        [ev for ev in client.generate([6] * 200, service_class="be", max_tokens=2)]
        blocker = start_blocker(client)
        admitted, refused = [], None
        for i in range(200):  # 50-token prompts with a 50 ms target: only a few fit
            try:
                admitted.append(client.submit([7] * 50, service_class="rt", max_tokens=2, ttft_ms=50))
            except BrosError as e:
                refused = e
                break
        rt_queue = queued(client)["rt"]
        client.abort(blocker)
        finals = [[ev for ev in client.watch(rid)][-1] for rid in admitted]
    finally:
        client.close()
        sched.stop()
    if mode == "reject":
        assert refused is not None and refused.code == "RESOURCE_EXHAUSTED" and "TTFT" in refused.message
        assert 1 <= len(admitted) < 200 and rt_queue[0] == len(admitted)
        assert not any(f.ttft_flagged for f in finals)
    else:
        assert refused is None and len(admitted) == 200
        assert finals[0].ttft_flagged is False and finals[-1].ttft_flagged is True
