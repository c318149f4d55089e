"""Hostile input against the running stack: real Redis, a scheduler and workers, each a
process. Hypothesis draws bros.v1 messages at and past every limit, bytes that are not
messages, and junk on the raw TCP port (drivers and checks: fuzz_harness.py).

After every case no process died and no call ended INTERNAL or UNKNOWN. The workers run
with --check-integrity, so a step that leaves the pool inconsistent reports it; none may.
After the run: everything aborted or freed leaves the pools empty, Describe reports no
integrity violation, and a valid request still completes.

Sim stack: worker A is the scheduler's, fuzzed through the Inference API (and its
Describe/Tokenize); worker B is fuzzed straight on its Step stream (a Step stream would
take worker A away from the scheduler). The normal suite runs ~1,500 cases, `-m faults`
>= 10,000. Torch stack: a few hundred cases against the real model and tokenizer.
"""
from __future__ import annotations

import time

import grpc
import pytest
from hypothesis import strategies as st

import fuzz_strategies as fs
from bros.redis_server import EmbeddedRedis
from bros.v1 import inference_pb2 as ipb
from bros.v1 import inference_pb2_grpc
from bros.v1 import types_pb2 as tpb
from bros.v1 import worker_pb2 as wpb
from fuzz_harness import (InferenceFuzz, RawFuzz, StepFuzz, Target, assert_empty, fuzz, raw_cases, send_garbage,
                          worker_stub, worker_unary_case)
from stack import Proc, Scheduler, Worker

# Cases per target in the normal suite; `-m faults` runs each FULL_FACTOR times as many.
QUICK = {"inference": 500, "step": 400, "raw_grpc": 400, "tcp": 100, "worker_unary": 100}
FULL_FACTOR = 7
TORCH = {"inference": 160, "worker_unary": 80, "step": 30}

SIM = ("--backend", "sim", "--sim-clock", "virtual", "--check-integrity")
WORKER_A = (*SIM, "--num-blocks", "64", "--max-model-len", "2048", "--host-cache-mb", "16")
# B: a pool smaller than the context, host memory for ~20 slots: the fallbacks get exercised.
WORKER_B = (*SIM, "--num-blocks", "24", "--max-model-len", "1024", "--host-cache-mb", "16",
            "--max-num-seqs", "8", "--max-num-batched-tokens", "128")
SCHEDULER = ("--max-num-batched-tokens", "256")


def start_workers(*workers: Worker, timeout: float = 180) -> None:
    """Start all, then wait for each: they load side by side."""
    for w in workers:
        Proc.start(w)
    for w in workers:
        w._wait(w.address, "bros.v1.Worker", timeout)


@pytest.fixture(scope="module")
def sim_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    with EmbeddedRedis() as redis:
        a, b = Worker(tmp, *WORKER_A, name="fuzz-a"), Worker(tmp, *WORKER_B, name="fuzz-b")
        s = None
        try:
            start_workers(a, b)
            s = Scheduler(tmp, redis.url, [a.address], *SCHEDULER).start()
            yield {"redis": redis, "scheduler": s, "worker_a": a, "worker_b": b}
        finally:
            stop_all(s, a, b)


def stop_all(*procs) -> None:
    """SIGTERM to all first: they drain side by side, not one after another."""
    procs = [p for p in procs if p is not None]
    for p in procs:
        if p.proc is not None and p.proc.poll() is None:
            p.proc.terminate()
    for p in procs:
        p.stop()


def wait_idle(stub, timeout: float = 60) -> None:
    """Every request ended, and the scheduler's view of each worker's pool is empty."""
    deadline = time.monotonic() + timeout
    while True:
        load = stub.GetLoad(ipb.GetLoadRequest(), timeout=10)
        busy = [c for c in load.classes if c.queued_requests or c.running_requests]
        pools = [w.occupancy for w in load.workers]
        if not busy and all(o.free_blocks == o.num_blocks and not o.be_host_slots for o in pools):
            return
        assert time.monotonic() < deadline, f"not idle after {timeout} s: {busy}, {pools}"
        time.sleep(0.1)


def collect(stream):
    tokens, final = [], None
    for msg in stream:
        if msg.HasField("chunk"):
            assert msg.chunk.index == len(tokens)
            tokens += list(msg.chunk.token_ids)
        else:
            final = msg.final
    return tokens, final


def assert_serves(scheduler_address: str, prompt: list[int]) -> None:
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(scheduler_address))
    tokens, final = collect(stub.Generate(ipb.GenerateRequest(
        token_ids=ipb.TokenIds(ids=prompt), service_class=tpb.REALTIME,
        sampling=tpb.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)), timeout=60))
    assert len(tokens) == 8 and final.finish_reason == tpb.LENGTH, final


def assert_consistent(*workers: Worker) -> None:
    for w in workers:
        info = worker_stub(w.address).Describe(wpb.DescribeRequest(), timeout=10)
        assert info.integrity_error == "", f"{w.address}: {info.integrity_error}"
        assert_empty(info.occupancy)


def report(target: Target, seconds: dict, planned: dict) -> int:
    s = target.stats
    cases = (s["step.cases"] + s["tcp.cases"] + s["worker.unary"] + sum(v for k, v in s.items()
             if k.startswith("raw.") or (k.startswith("inference.") and k != "inference.ok")))
    print(f"\nfuzz: {cases} cases in {sum(seconds.values()):.1f} s {seconds}; {dict(sorted(s.items()))}")
    assert cases >= 0.95 * sum(planned.values()), (cases, planned)
    return cases


def fuzz_sim_stack(stack: dict, factor: int) -> None:
    n = {k: v * factor for k, v in QUICK.items()}
    target = Target({k: v for k, v in stack.items()})
    a, b, sched = stack["worker_a"], stack["worker_b"], stack["scheduler"]
    info = worker_stub(a.address).Describe(wpb.DescribeRequest(), timeout=10)
    seconds: dict[str, float] = {}

    inference = InferenceFuzz(target, sched.address, info)
    fuzz("inference", n["inference"], [inference.strategy()], lambda case: inference.run(case), seconds)
    stepper = StepFuzz(target, b.address, info.vocab_size)
    fuzz("step", n["step"], [stepper.strategy()], lambda case: stepper.run(case), seconds)
    raw = RawFuzz(target, {"scheduler": sched.address, "a": a.address, "b": b.address}, "scheduler")
    fuzz("raw_grpc", n["raw_grpc"], [raw_cases(info.vocab_size, "scheduler", ["a", "b"], "b")],
         lambda case: raw.run(case), seconds)
    raw.close()
    ports = [p.port for p in (sched, a, b)]

    def tcp_case(i: int, data: bytes) -> None:
        send_garbage(ports[i], data)
        target.stats["tcp.cases"] += 1
        target.assert_alive()
    fuzz("tcp", n["tcp"], [st.integers(0, len(ports) - 1), fs.tcp_garbage], tcp_case, seconds)
    fuzz("worker_unary", n["worker_unary"], [st.sampled_from([a.address, b.address]), fs.tokenize_request()],
         lambda address, req: worker_unary_case(target, address, req), seconds)

    # Afterwards: empty once everything is aborted or freed, consistent, still serving.
    inference.abort_all()
    stepper.reconnect()  # the raw cases took worker B's stream over
    assert_empty(stepper.free_all())
    stepper.driver.close()
    wait_idle(inference.stub)
    assert_consistent(a, b)
    assert_serves(sched.address, [5, 6, 7])
    target.assert_alive()
    report(target, seconds, n)


def test_fuzz_sim_quick(sim_stack):
    fuzz_sim_stack(sim_stack, 1)


@pytest.mark.faults
def test_fuzz_sim_full(sim_stack):
    fuzz_sim_stack(sim_stack, FULL_FACTOR)


@pytest.mark.faults
@pytest.mark.model
def test_fuzz_torch(tmp_path):
    """The real model and tokenizer: text and chat prompts, real forward passes. The
    scheduler goes first; then, with it stopped, the worker's own Step stream."""
    t0 = time.monotonic()
    with EmbeddedRedis() as redis:
        w = Worker(tmp_path, "--backend", "torch", "--kv-cache-mb", "16", "--max-model-len", "512",
                   "--host-cache-mb", "4", "--check-integrity", name="fuzz-torch")
        s = None
        try:
            start_workers(w)
            s = Scheduler(tmp_path, redis.url, [w.address], *SCHEDULER).start()
            target = Target({"redis": redis, "scheduler": s, "worker": w})
            info = worker_stub(w.address).Describe(wpb.DescribeRequest(), timeout=10)
            seconds = {"startup": round(time.monotonic() - t0, 1)}
            assert_tokenize_refusals_name_the_field(w.address)
            inference = InferenceFuzz(target, s.address, info, fs.TEXT_PROMPT_KINDS)
            fuzz("inference", TORCH["inference"], [inference.strategy()], lambda case: inference.run(case), seconds)
            fuzz("worker_unary", TORCH["worker_unary"], [st.just(w.address), fs.tokenize_request()],
                 lambda address, req: worker_unary_case(target, address, req), seconds)
            inference.abort_all()
            wait_idle(inference.stub)
            assert_serves(s.address, [1, 2, 3, 4])
            s.stop()
            del target.procs["scheduler"]
            stepper = StepFuzz(target, w.address, info.vocab_size)
            fuzz("step", TORCH["step"], [stepper.strategy()], lambda case: stepper.run(case), seconds)
            assert_empty(stepper.free_all())
            stepper.driver.close()
            assert_consistent(w)
            target.assert_alive()
            report(target, seconds, TORCH)
        finally:
            stop_all(s, w)


# ---- what the fuzzer found, and every limit: plain examples -----------------------------------

def assert_tokenize_refusals_name_the_field(address: str) -> None:
    """Found by the fuzzer on the torch worker: Tokenize's refusals did not start with the
    field ("one of text or chat must be set", "chat.messages.role must be ...")."""
    stub = worker_stub(address)
    tool = wpb.ChatList(messages=[wpb.ChatMessage(role="user", content="hi"), wpb.ChatMessage(role="tool")])
    for req, field in [(wpb.TokenizeRequest(), "input"), (wpb.TokenizeRequest(chat=wpb.ChatList()), "chat.messages"),
                       (wpb.TokenizeRequest(chat=tool), "chat.messages[1].role")]:
        with pytest.raises(grpc.RpcError) as e:
            stub.Tokenize(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field + ": "), \
            e.value.details()


RT = tpb.REALTIME


def ids_request(n: int = 4, max_tokens: int = 4, **kw) -> ipb.GenerateRequest:
    return ipb.GenerateRequest(token_ids=ipb.TokenIds(ids=[5] * n), service_class=RT,
                               sampling=tpb.SamplingParams(max_tokens=max_tokens, temperature=0.0), **kw)


def with_sampling(**fields) -> ipb.GenerateRequest:
    req = ids_request()
    for k, v in fields.items():
        if isinstance(v, list):
            getattr(req.sampling, k).extend(v)
        else:
            setattr(req.sampling, k, v)
    return req


def chat(*messages: tuple[str, str]) -> ipb.GenerateRequest:
    req = ipb.GenerateRequest(service_class=RT, sampling=tpb.SamplingParams(max_tokens=4))
    for role, content in messages:
        req.chat.messages.add(role=role, content=content)
    return req


# (name, request, the field the refusal must start with). Defaults: SchedulerConfig; worker
# A's vocabulary is 50272 and its max_model_len 1024 (its pool; the model allows 2048).
LIMITS = [
    ("prompt chars", ipb.GenerateRequest(text="x" * 1_000_001, service_class=RT,
                                         sampling=tpb.SamplingParams(max_tokens=4)), "text"),
    ("chat chars", chat(("user", "x" * 600_000), ("user", "y" * 400_001)), "chat.messages"),
    ("chat messages", chat(*[("user", "hi")] * 1025), "chat.messages"),
    ("chat role", chat(("user", "hi"), ("robot", "hi")), "chat.messages[1].role"),
    ("prompt tokens vs context", ids_request(n=1024, max_tokens=1), "token_ids.ids"),
    ("token id beyond the vocabulary", ipb.GenerateRequest(
        token_ids=ipb.TokenIds(ids=[1, 50272]), service_class=RT, sampling=tpb.SamplingParams(max_tokens=4)),
     "token_ids.ids"),
    ("max_tokens 0", ids_request(max_tokens=0), "sampling.max_tokens"),
    ("max_tokens vs context", ids_request(max_tokens=1024), "sampling.max_tokens"),
    ("prompt + max_tokens vs context", ids_request(n=1000, max_tokens=25), "sampling.max_tokens"),
    ("stop strings count", with_sampling(stop=["x"] * 17), "sampling.stop"),
    ("stop string length", with_sampling(stop=["x" * 257]), "sampling.stop"),
    ("empty stop string", with_sampling(stop=["x", ""]), "sampling.stop"),
    ("stop token ids count", with_sampling(stop_token_ids=[3] * 257), "sampling.stop_token_ids"),
    ("stop token id beyond the vocabulary", with_sampling(stop_token_ids=[50272]), "sampling.stop_token_ids"),
    ("request_id length", ids_request(request_id="r" * 129), "request_id"),
    # Found writing the request_id strategy: `$` in the id pattern let a trailing newline through.
    ("request_id with a trailing newline", ids_request(request_id="fz-a\n"), "request_id"),
    ("resume index", ids_request(resume_from_index=-2), "resume_from_index"),
]


def scheduler_stub(stack: dict):
    return inference_pb2_grpc.InferenceStub(grpc.insecure_channel(stack["scheduler"].address))


def queued(stub) -> list[tuple[int, int]]:
    return [(c.queued_requests, c.queued_tokens) for c in stub.GetLoad(ipb.GetLoadRequest(), timeout=10).classes]


@pytest.mark.parametrize("name,req,field", LIMITS, ids=[x[0] for x in LIMITS])
def test_limits_are_refused_naming_the_field(sim_stack, name, req, field):
    stub = scheduler_stub(sim_stack)
    before = queued(stub)
    for rpc in (stub.Submit, lambda r, timeout: collect(stub.Generate(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as e:
            rpc(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert e.value.details().startswith(field + ": "), e.value.details()
    assert queued(stub) == before


def test_transport_limits_are_resource_exhausted(sim_stack):
    """Over gRPC's message size (16 MiB here) or metadata size (16 KiB): refused by gRPC
    itself, before any handler, with RESOURCE_EXHAUSTED; the scheduler keeps serving."""
    stub = scheduler_stub(sim_stack)
    big = ipb.GenerateRequest(text="x" * (17 * 1024 * 1024), service_class=RT,
                              sampling=tpb.SamplingParams(max_tokens=4))
    for call in (lambda: stub.Submit(big, timeout=30),
                 lambda: stub.Submit(ids_request(), timeout=10, metadata=(("x-big", "a" * 17_000),))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert_serves(sim_stack["scheduler"].address, [5, 6])


def test_a_request_longer_than_the_pool_is_refused_at_admission(sim_stack):
    """Found fuzzing prompts past the pool: worker A's model allows 2048 tokens, its pool
    holds 1024. A request between the two used to be admitted, grow until the pool was
    full, then wait forever holding it. Describe now reports the smaller of the two."""
    info = worker_stub(sim_stack["worker_a"].address).Describe(wpb.DescribeRequest(), timeout=10)
    assert info.max_model_len == info.num_blocks * info.block_size == 1024
    stub = scheduler_stub(sim_stack)
    with pytest.raises(grpc.RpcError) as e:
        stub.Submit(ids_request(n=8, max_tokens=1100), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.max_tokens" in e.value.details()
    tokens, final = collect(stub.Generate(ids_request(n=1000, max_tokens=24), timeout=60))  # exactly fits
    assert len(tokens) == 24 and final.finish_reason == tpb.LENGTH


def test_watch_with_a_bad_resume_index_is_refused_at_once(sim_stack):
    """Found writing the Watch strategy: Watch did not check resume_from_index, and -5
    became a stream id Redis refuses; that surfaced as UNKNOWN (later: retried as if
    Redis were down, then UNAVAILABLE). Now INVALID_ARGUMENT, before Redis is asked."""
    stub = scheduler_stub(sim_stack)
    rid = stub.Submit(ids_request(max_tokens=2), timeout=10).request_id
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        collect(stub.Watch(ipb.WatchRequest(request_id=rid, resume_from_index=-5, wait=False), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert e.value.details().startswith("resume_from_index: ") and time.monotonic() - t0 < 5


@pytest.mark.parametrize("process,method,kind,payload,message_type", [
    ("scheduler", "/bros.v1.Inference/Submit", "unary", b"\x0a\x01\xff", "bros.v1.GenerateRequest"),
    ("scheduler", "/bros.v1.Inference/Generate", "server_stream", b"\xff\xff\xff", "bros.v1.GenerateRequest"),
    ("scheduler", "/grpc.health.v1.Health/Check", "unary", b"\x0a\x01\xff", "grpc.health.v1.HealthCheckRequest"),
    ("worker_b", "/bros.v1.Worker/Tokenize", "unary", b"\x0a\x01\xff", "bros.v1.TokenizeRequest"),
    ("worker_b", "/bros.v1.Worker/Step", "bidi", b"\x12\x01\xff", "bros.v1.StepPlan"),
])
def test_undecodable_bytes_are_invalid_argument(sim_stack, process, method, kind, payload, message_type):
    """Found by the raw-bytes fuzzing: bytes that are not the method's message (bad UTF-8
    in a string, a corrupt wire format) ended the call UNKNOWN, from inside grpcio. The
    DecodeGuard interceptor answers INVALID_ARGUMENT naming the message instead."""
    channel = grpc.insecure_channel(sim_stack[process].address)
    with pytest.raises(grpc.RpcError) as e:
        if kind == "unary":
            channel.unary_unary(method)(payload, timeout=10)
        elif kind == "server_stream":
            list(channel.unary_stream(method)(payload, timeout=10))
        else:
            list(channel.stream_stream(method)(iter([payload]), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert e.value.details().startswith(f"request: not a valid {message_type}: "), e.value.details()


def test_a_new_sequence_without_max_tokens_names_sampling(sim_stack):
    """Found by the fuzzer: with max_tokens 0 and carried output tokens the worker blamed
    new_sequences.output_token_ids ("0 carried tokens reach max_tokens")."""
    from fuzz_harness import Driver
    d = Driver(sim_stack["worker_b"].address)
    try:
        report = d.step(wpb.StepPlan(plan_id=1, new_sequences=[wpb.NewSequence(
            seq_id="no-max", service_class=RT, prompt_token_ids=[5, 6], output_token_ids=[7])]))
        assert [(e.seq_id, e.field) for e in report.errors] == [("no-max", "new_sequences.sampling")], report.errors
        assert "max_tokens" in report.errors[0].message
    finally:
        d.close()


def test_check_integrity_reports_a_violation_as_a_step_error():
    """What --check-integrity does after every step, here on an in-process sim engine
    whose block table is corrupted by hand (the fuzz runs rely on this path)."""
    from worker_svc.engine import Engine, EngineLimits
    from worker_svc.plan import Plan
    from worker_svc.service import WorkerService
    from worker_svc.sim.clock import VirtualClock
    from worker_svc.sim.runner import SimRunner

    engine = Engine(SimRunner(VirtualClock()), EngineLimits(num_blocks=8, block_size=16, max_num_host_slots=0,
                                                            max_num_seqs=4, max_num_batched_tokens=64))
    assert not WorkerService._safe_step(engine, Plan(plan_id=1), True).errors
    engine.allocator.rt_used[3] += 2  # slots in use that no sequence owns
    report = WorkerService._safe_step(engine, Plan(plan_id=2), True)
    assert [(e.seq_id, e.field) for e in report.errors] == [("", "integrity")]
    assert "block table out of sync" in report.errors[0].message
    assert engine.integrity_error == report.errors[0].message  # kept for Describe
    assert not WorkerService._safe_step(engine, Plan(plan_id=3), False).errors  # off: not checked
