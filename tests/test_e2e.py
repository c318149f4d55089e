"""The whole stack over real gRPC: a real Redis (embedded Valkey), real worker and
scheduler processes. The sim backend (real clock) for most cases, the model for one."""
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis.asyncio as aioredis

from bros.redis_server import EmbeddedRedis
from bros.v1 import inference_pb2 as ipb
from bros.v1 import inference_pb2_grpc
from bros.v1 import types_pb2 as tpb
from bros.v1 import worker_pb2
from scheduler_svc.store import Store
from stack import Scheduler, Worker

RT, BE = tpb.REALTIME, tpb.BEST_EFFORT


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def redis_server():
    with EmbeddedRedis() as r:
        yield r


@pytest.fixture(scope="module")
def sim_worker(tmp):
    w = Worker(tmp, "--backend", "sim", "--sim-clock", "real", "--num-blocks", "256", name="sim").start()
    yield w
    w.stop()


RESUME_GRACE_S = 0.5   # a cancelled Generate is aborted after this (tests/test_resume_grace.py)


@pytest.fixture(scope="module")
def scheduler(tmp, redis_server, sim_worker):
    s = Scheduler(tmp, redis_server.url, [sim_worker.address], "--max-num-batched-tokens", "256",
                  "--resume-grace-s", str(RESUME_GRACE_S)).start()
    yield s
    s.stop()


def stub_for(address):
    return inference_pb2_grpc.InferenceStub(grpc.insecure_channel(address))


@pytest.fixture(scope="module")
def stub(scheduler):
    return stub_for(scheduler.address)


def request(ids=(5, 6, 7, 8), cls=RT, max_tokens=8, **kw):
    return ipb.GenerateRequest(token_ids=ipb.TokenIds(ids=list(ids)), service_class=cls,
                               sampling=tpb.SamplingParams(max_tokens=max_tokens, temperature=0.0), **kw)


def collect(stream):
    """(tokens by index, final) from a Generate/Watch stream; asserts order and no repeats."""
    tokens, final = [], None
    for msg in stream:
        if msg.HasField("chunk"):
            assert msg.chunk.index == len(tokens), f"index {msg.chunk.index} after {len(tokens)} tokens"
            tokens += list(msg.chunk.token_ids)
        else:
            final = msg.final
    return tokens, final


def load(stub):
    return stub.GetLoad(ipb.GetLoadRequest(), timeout=5)


def test_generate_streams_every_token_then_the_final(stub):
    tokens, final = collect(stub.Generate(request(max_tokens=12), timeout=30))
    assert len(tokens) == 12 and final.num_output_tokens == 12 and final.num_prompt_tokens == 4
    assert final.finish_reason == tpb.LENGTH
    assert 0 < final.ttft_ms and 0 < final.tpot_ms and final.queue_ms >= 0
    assert final.ttft_met and final.tpot_met  # default RT targets: 1000 / 200 ms


def test_twenty_concurrent_clients_mixing_classes(stub):
    def one(i):
        cls = RT if i % 2 else BE
        return collect(stub.Generate(request(ids=[10 + i] * (5 + i), cls=cls, max_tokens=6 + i % 5), timeout=60))

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    for i, (tokens, final) in enumerate(results):
        assert len(tokens) == 6 + i % 5 == final.num_output_tokens
        assert final.finish_reason == tpb.LENGTH


def test_submit_then_watch_from_a_second_replica(tmp, redis_server, sim_worker, stub):
    other = Scheduler(tmp, redis_server.url, [sim_worker.address]).start()
    try:
        rid = stub.Submit(request(cls=BE, max_tokens=10), timeout=10).request_id
        tokens, final = collect(stub_for(other.address).Watch(ipb.WatchRequest(request_id=rid, wait=True), timeout=30))
        assert len(tokens) == 10 and final.finish_reason == tpb.LENGTH
        # The same result, read again later without waiting, from the first replica.
        again, final2 = collect(stub.Watch(ipb.WatchRequest(request_id=rid, wait=False), timeout=10))
        assert again == tokens and final2.num_output_tokens == 10
        # And resumed from an index: only what comes after it.
        tail, _ = collect_from(stub.Watch(ipb.WatchRequest(request_id=rid, wait=True, resume_from_index=6)), 7)
        assert tail == tokens[7:]
    finally:
        other.stop()


def collect_from(stream, start):
    tokens, final = [], None
    for msg in stream:
        if msg.HasField("chunk"):
            assert msg.chunk.index == start + len(tokens)
            tokens += list(msg.chunk.token_ids)
        else:
            final = msg.final
    return tokens, final


def occupancy(stub):
    w = load(stub).workers[0]
    return (w.occupancy.rt_slots, w.occupancy.be_slots, w.occupancy.free_blocks)


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_abort_frees_the_kv(stub):
    assert wait_for(lambda: occupancy(stub)[:2] == (0, 0))
    before = occupancy(stub)
    rid = stub.Submit(request(ids=list(range(1, 200)), cls=BE, max_tokens=2000), timeout=10).request_id
    assert wait_for(lambda: occupancy(stub)[1] > 0)
    assert stub.Abort(ipb.AbortRequest(request_id=rid), timeout=5).aborted
    assert wait_for(lambda: occupancy(stub) == before, timeout=5), (occupancy(stub), before)
    tokens, final = collect(stub.Watch(ipb.WatchRequest(request_id=rid, wait=True), timeout=10))
    assert final.finish_reason == tpb.ABORT and len(tokens) == final.num_output_tokens
    assert not stub.Abort(ipb.AbortRequest(request_id=rid), timeout=5).aborted  # already over


def test_cancelled_generate_is_aborted(stub):
    """Cancels land at different moments (mid-read, between chunks); each must abort
    (once the resume grace is over: nobody came back for them)."""
    assert wait_for(lambda: occupancy(stub)[:2] == (0, 0))
    ids = [f"cancel-me-{i}" for i in range(6)]
    for i, rid in enumerate(ids):
        call = stub.Generate(request(ids=list(range(1, 100)), max_tokens=2000, request_id=rid), timeout=30)
        for _ in range(1 + i % 3):
            next(call)
        if i % 2:
            time.sleep(0.03)
        call.cancel()
    assert wait_for(lambda: occupancy(stub)[:2] == (0, 0), timeout=5 + RESUME_GRACE_S), occupancy(stub)
    for rid in ids:
        _, final = collect(stub.Watch(ipb.WatchRequest(request_id=rid, wait=True), timeout=10))
        assert final.finish_reason == tpb.ABORT, rid


BAD = [
    ("empty text", ipb.GenerateRequest(text="", service_class=RT, sampling=tpb.SamplingParams(max_tokens=4)), "text"),
    ("no prompt", ipb.GenerateRequest(service_class=RT, sampling=tpb.SamplingParams(max_tokens=4)), "prompt"),
    ("empty ids", request(ids=()), "token_ids"),
    ("too long", request(max_tokens=9000), "sampling.max_tokens"),
    ("max_tokens 0", request(max_tokens=0), "sampling.max_tokens"),
    ("negative temperature", ipb.GenerateRequest(token_ids=ipb.TokenIds(ids=[1]), service_class=RT,
                                                 sampling=tpb.SamplingParams(max_tokens=4, temperature=-1)),
     "sampling.temperature"),
    ("top_p 0", ipb.GenerateRequest(token_ids=ipb.TokenIds(ids=[1]), service_class=RT,
                                    sampling=tpb.SamplingParams(max_tokens=4, top_p=0.0)), "sampling.top_p"),
    ("top_p 1.5", ipb.GenerateRequest(token_ids=ipb.TokenIds(ids=[1]), service_class=RT,
                                      sampling=tpb.SamplingParams(max_tokens=4, top_p=1.5)), "sampling.top_p"),
    ("class unspecified", request(cls=tpb.SERVICE_CLASS_UNSPECIFIED), "service_class"),
    ("class unknown", request(cls=7), "service_class"),
    ("oversized", ipb.GenerateRequest(text="x" * 1_500_000, service_class=RT,
                                      sampling=tpb.SamplingParams(max_tokens=4)), "text"),
    ("bad chat role", ipb.GenerateRequest(chat=worker_pb2.ChatList(messages=[worker_pb2.ChatMessage(
        role="robot", content="hi")]), service_class=RT, sampling=tpb.SamplingParams(max_tokens=4)), "role"),
    ("bad request id", request(request_id="has space"), "request_id"),
]


@pytest.mark.parametrize("name,req,field", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_and_nothing_is_enqueued(stub, name, req, field):
    before = [(c.queued_requests, c.queued_tokens) for c in load(stub).classes]
    for rpc in (lambda: collect(stub.Generate(req, timeout=10)), lambda: stub.Submit(req, timeout=10)):
        with pytest.raises(grpc.RpcError) as e:
            rpc()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert field in e.value.details()
    assert [(c.queued_requests, c.queued_tokens) for c in load(stub).classes] == before


@pytest.mark.parametrize("rpc", ["Watch", "Abort"])
def test_unknown_request_id_is_not_found(stub, rpc):
    with pytest.raises(grpc.RpcError) as e:
        if rpc == "Watch":
            collect(stub.Watch(ipb.WatchRequest(request_id="no-such-request"), timeout=5))
        else:
            stub.Abort(ipb.AbortRequest(request_id="no-such-request"), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "request_id" in e.value.details()


def test_resume_after_a_dropped_stream(tmp, redis_server, sim_worker, stub):
    """A client streaming from a replica that dies reconnects to another with the request
    id and the last index it saw, and gets the rest: nothing lost, nothing twice."""
    doomed = Scheduler(tmp, redis_server.url, [sim_worker.address]).start()
    req = request(ids=[42] * 20, max_tokens=60, request_id="resume-me")
    first = stub_for(doomed.address).Generate(req, timeout=30)
    seen = []
    for msg in first:
        seen += list(msg.chunk.token_ids)
        if len(seen) >= 5:
            break
    doomed.kill()  # the stream drops with the replica; the request itself lives on in Redis
    resume = ipb.GenerateRequest()
    resume.CopyFrom(req)
    resume.resume_from_index = len(seen) - 1
    rest, final = collect_from(stub.Generate(resume, timeout=30), len(seen))
    assert len(seen) + len(rest) == 60 == final.num_output_tokens
    full, _ = collect(stub.Watch(ipb.WatchRequest(request_id="resume-me", wait=False), timeout=10))
    assert seen + rest == full


@pytest.mark.parametrize("policy,depth", [("priority", 0), ("partition", 0), ("bros", 0),
                                          ("bros", 1), ("priority", 1), ("fcfs", 1)])
def test_every_policy_serves_a_mixed_load_end_to_end(tmp, redis_server, policy, depth):
    """A pool of 64 blocks for 12 concurrent requests: preemption and refused growth
    happen, serially and with the loop planning a step ahead (--pipeline-depth 1)."""
    worker = Worker(tmp, "--backend", "sim", "--sim-clock", "real", "--num-blocks", "64", name=f"{policy}{depth}").start()
    prefix = f"bros-{policy}-{depth}"
    sched = Scheduler(tmp, redis_server.url, [worker.address], "--policy", policy, "--max-num-batched-tokens", "128",
                      "--pipeline-depth", str(depth), prefix=prefix).start()
    try:
        s = stub_for(sched.address)

        def one(i):
            return collect(s.Generate(request(ids=[7 + i] * (20 + 13 * i), cls=RT if i % 3 == 0 else BE,
                                              max_tokens=10 + i), timeout=60))

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(12)))
        for i, (tokens, final) in enumerate(results):
            assert len(tokens) == 10 + i == final.num_output_tokens, (policy, i, final)
        # The loop publishes what planning cost, as wall and as CPU time (sim-scale reads it).
        state = asyncio.run(_worker_state(redis_server.url, prefix, worker.address))
        assert int(state["iterations"]) > 0
        assert 0 < float(state["planner_cpu_p50_ms"]) <= float(state["planner_p99_ms"]) + 0.05, state
        # ... and what its plans did, counted as the tokens reached Redis (live benchmarks read it).
        assert int(state["rt_output_tokens"]) == sum(10 + i for i in range(0, 12, 3))
        assert int(state["be_output_tokens"]) == sum(10 + i for i in range(12) if i % 3)
        assert (int(state["rt_finished"]), int(state["be_finished"])) == (4, 8)
        assert int(state["num_scheduled_seqs"]) >= int(state["num_steps"]) > 0
    finally:
        sched.stop()
        worker.stop()


# (policy and its flags, class, prompt tokens refused, prompt tokens that fit, the limit named)
LIMITED_POLICIES = [
    (("bros-no-chunking", "--max-num-batched-tokens", "128"), BE, 120, 100, "max_num_batched_tokens"),
    (("partition",), RT, 500, 496, "RT share of the KV pool"),
]


@pytest.mark.parametrize("policy,cls,refused,fits,limit", LIMITED_POLICIES, ids=["bros-no-chunking", "partition"])
def test_a_policy_refuses_a_request_it_could_never_run(tmp, redis_server, policy, cls, refused, fits, limit):
    """bros-no-chunking runs each prompt whole, so a request that could not fit one step
    (prompt + max_tokens: a recompute re-runs the output too) would wait forever; so would
    one longer than its class's share of the pool under partition (half of 64 blocks of 16
    slots: 512 tokens). Refused up front, naming the field and the limit."""
    worker = Worker(tmp, "--backend", "sim", "--sim-clock", "real", "--num-blocks", "64", name=policy[0]).start()
    sched = Scheduler(tmp, redis_server.url, [worker.address], "--policy", *policy, prefix=f"bros-{policy[0]}").start()
    try:
        s = stub_for(sched.address)
        with pytest.raises(grpc.RpcError) as e:
            collect(s.Generate(request(ids=[7] * refused, cls=cls, max_tokens=16), timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith("sampling.max_tokens:") and limit in e.value.details()
        tokens, final = collect(s.Generate(request(ids=[7] * fits, cls=cls, max_tokens=16), timeout=30))
        assert len(tokens) == 16 == final.num_output_tokens
    finally:
        sched.stop()
        worker.stop()


async def _worker_state(url: str, prefix: str, worker_id: str) -> dict:
    client = aioredis.from_url(url)
    try:
        load = await Store(client, prefix=prefix).load([worker_id])
    finally:
        await client.aclose()
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in load["workers"][worker_id].state.items()}
