"""A Generate whose call ends early keeps its request for --resume-grace-s, so a client
whose connection broke can resume it without loss (ARCHITECTURE.md, delivery
guarantees); a request nobody comes back for is aborted after the grace, and the
clients abort at once when their caller stops reading. Real processes: Redis, a sim
worker, a scheduler; a TCP relay in between to break connections."""
from __future__ import annotations

import time

import grpc
import pytest

from bros.client import Chunk, Client, Final
from bros.v1 import inference_pb2 as ipb
from bros.v1 import inference_pb2_grpc
from bros.v1 import types_pb2 as tpb
from stack import sim_stack
from tcp_proxy import TcpProxy

GRACE_S = 3.0
MAX_TOKENS = 400      # a few seconds of decoding on the sim worker: long enough to cut into


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    with sim_stack(tmp_path_factory.mktemp("grace"), "--resume-grace-s", str(GRACE_S)) as (sched, _):
        yield sched


@pytest.fixture(scope="module")
def stub(scheduler):
    return inference_pb2_grpc.InferenceStub(grpc.insecure_channel(scheduler.address))


def request(rid: str, **kw) -> ipb.GenerateRequest:
    return ipb.GenerateRequest(request_id=rid, token_ids=ipb.TokenIds(ids=[5, 6, 7, 8]),
                               service_class=tpb.REALTIME, ttft_ms=60_000, tpot_ms=60_000,
                               sampling=tpb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), **kw)


def read_some(call, n: int) -> int:
    """Read n chunks; the last index seen."""
    last = -1
    for _ in range(n):
        msg = next(call)
        assert msg.HasField("chunk"), msg
        last = msg.chunk.index + len(msg.chunk.token_ids) - 1
    return last


def rest(call, after: int) -> tuple[int, tpb.FinishReason]:
    """Read to the end: (last index, finish reason); chunks must continue at after + 1."""
    final = None
    for msg in call:
        if msg.HasField("chunk"):
            assert msg.chunk.index == after + 1, f"index {msg.chunk.index} after {after}"
            after += len(msg.chunk.token_ids)
        else:
            final = msg.final
    return after, final.finish_reason


def final_of(stub, rid: str, timeout: float) -> ipb.FinalResult:
    for msg in stub.Watch(ipb.WatchRequest(request_id=rid, wait=True), timeout=timeout):
        if msg.HasField("final"):
            return msg.final
    raise AssertionError(f"{rid}: no final")


def unique(name: str) -> str:
    return f"{name}-{time.monotonic_ns()}"


def test_a_generate_cancelled_mid_stream_resumes_within_the_grace(stub):
    rid = unique("back")
    call = stub.Generate(request(rid), timeout=60)
    last = read_some(call, 2)
    call.cancel()          # to the server, a cancel and a broken connection are the same
    time.sleep(0.5)
    last, reason = rest(stub.Generate(request(rid, resume_from_index=last), timeout=60), last)
    assert (last, reason) == (MAX_TOKENS - 1, tpb.LENGTH)


def test_a_resume_that_is_abandoned_again_is_aborted_after_the_grace(stub):
    rid = unique("twice")
    first = stub.Generate(request(rid), timeout=60)
    last = read_some(first, 1)
    first.cancel()
    second = stub.Generate(request(rid, resume_from_index=last), timeout=60)
    read_some(second, 1)
    cut = time.monotonic()
    second.cancel()
    final = final_of(stub, rid, timeout=GRACE_S + 30)
    # The first stream's abort (due GRACE_S after its cancel) is stale: the second
    # attached since. The second's lands GRACE_S after its own cancel, not before.
    assert final.finish_reason == tpb.ABORT and final.num_output_tokens < MAX_TOKENS
    assert time.monotonic() - cut >= GRACE_S - 0.1


def test_a_request_nobody_resumes_is_aborted_after_the_grace_watched_or_not(stub):
    rid = unique("gone")
    call = stub.Generate(request(rid), timeout=60)
    read_some(call, 1)
    cut = time.monotonic()
    call.cancel()
    final = final_of(stub, rid, timeout=30)   # a Watch only looks on: it keeps nothing alive
    assert final.finish_reason == tpb.ABORT and final.num_output_tokens < MAX_TOKENS
    assert time.monotonic() - cut >= GRACE_S - 0.1


def test_the_client_resumes_through_a_broken_connection_without_loss(scheduler):
    """The ARCHITECTURE.md guarantee end to end: the connection is reset mid-stream (both
    ends see it die), the client library calls again with the last index it saw, and the
    caller gets every token exactly once, in order; the request was not aborted."""
    with TcpProxy(scheduler.address) as proxy, Client(proxy.address, timeout=60) as client:
        stream = client.generate([5, 6, 7, 8], service_class="rt", max_tokens=MAX_TOKENS, ttft_ms=60_000,
                                 tpot_ms=60_000, temperature=0.0)
        tokens, final, cuts = [], None, 0
        for event in stream:
            if isinstance(event, Chunk):
                assert event.index == len(tokens), f"index {event.index} after {len(tokens)} tokens"
                tokens += event.token_ids
                if cuts < 2 and len(tokens) >= 20 * (cuts + 1):
                    proxy.cut()
                    cuts += 1
            else:
                final = event
        assert cuts == 2 and proxy.num_connections >= 3
    assert isinstance(final, Final) and final.finish_reason == "length"
    assert len(tokens) == final.num_output_tokens == MAX_TOKENS


def test_a_client_that_stops_reading_aborts_at_once(scheduler, stub):
    """Not after the grace: the client library sends Abort itself."""
    with Client(scheduler.address, timeout=60) as client:
        stream = client.generate([5, 6, 7, 8], service_class="rt", max_tokens=MAX_TOKENS, ttft_ms=60_000,
                                 tpot_ms=60_000, temperature=0.0)
        next(stream)
        stopped = time.monotonic()
        stream.close()
        final = final_of(stub, stream.request_id, timeout=30)
    assert final.finish_reason == tpb.ABORT
    assert time.monotonic() - stopped < GRACE_S - 1
