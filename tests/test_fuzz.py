"""Hostile input against the running stack: real Redis, a scheduler and two sim workers,
each a process. Hypothesis draws bros.v1 messages at and past every limit, bytes that
are not messages, and junk on the raw TCP port.

After every case: no process died, and no call ended INTERNAL or UNKNOWN (bad input
gets a precise code, and INVALID_ARGUMENT names the field). The workers run with
--check-integrity, so a step that leaves the pool inconsistent reports it; none may.
After the run: everything aborted or freed leaves the pools empty, and a valid request
still completes.

Worker A is the scheduler's: fuzzed through the Inference API (and Describe/Tokenize).
Worker B is fuzzed directly on its Step stream (a Step stream would take worker A away
from the scheduler). The normal suite runs ~1,500 cases; `-m faults` runs >= 10,000.
"""
from __future__ import annotations

import queue
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fuzz_strategies as fs
from bros.redis_server import EmbeddedRedis
from bros.v1 import inference_pb2 as ipb
from bros.v1 import inference_pb2_grpc
from bros.v1 import types_pb2 as tpb
from bros.v1 import worker_pb2 as wpb
from bros.v1 import worker_pb2_grpc
from stack import Scheduler, Worker

SIM_VOCAB = 50272
C = grpc.StatusCode
# Codes bad input may get. DEADLINE_EXCEEDED and CANCELLED only ever come from this
# test's own client (a short deadline on a stream, a cancel after the first message).
PRECISE = {C.INVALID_ARGUMENT, C.NOT_FOUND, C.RESOURCE_EXHAUSTED, C.UNIMPLEMENTED}
CLIENT_SIDE = {C.DEADLINE_EXCEEDED, C.CANCELLED}
# "<field>: why", the field a path into the request ("sampling.stop", "chat.messages[2].role").
FIELD_MESSAGE = re.compile(r"^([a-z_]+)((\.[a-z_]+)|(\[\d+\]))*: .+", re.S)
ITEM_FIELDS = {"new_sequences.seq_id", "new_sequences.service_class", "new_sequences.prompt_token_ids",
               "new_sequences.output_token_ids", "new_sequences.sampling", "scheduled", "scheduled.seq_id",
               "scheduled.num_tokens", "free", "recompute", "checkpoint", "preempt", "restore"}

# Cases per target: the normal suite, and `-m faults` (each x7: >= 10,000 in all).
QUICK = {"inference": 500, "step": 450, "raw_grpc": 400, "tcp": 100, "worker_unary": 100}
FULL_FACTOR = 7


def fuzz(name: str, n: int, strategies, body, seconds: dict) -> None:
    """Run body on n cases drawn from strategies (positional)."""
    t0 = time.monotonic()
    fuzz_settings(n)(given(*strategies)(body))()
    seconds[name] = round(time.monotonic() - t0, 1)


def fuzz_settings(n: int) -> settings:
    # Derandomized and database-free: CI runs the same cases every time. No shrinking:
    # the servers keep state between cases, so a shrunk case would not replay alike.
    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))


# ---- the stack ---------------------------------------------------------------------------

WORKER_A = ("--backend", "sim", "--sim-clock", "virtual", "--num-blocks", "64", "--max-model-len", "2048",
            "--host-cache-mb", "16", "--check-integrity")
# B: a pool smaller than the context, host memory for ~20 slots: the fallbacks get exercised.
WORKER_B = ("--backend", "sim", "--sim-clock", "virtual", "--num-blocks", "24", "--max-model-len", "1024",
            "--host-cache-mb", "16", "--max-num-seqs", "8", "--max-num-batched-tokens", "128",
            "--check-integrity")


@dataclass
class Stack:
    redis: EmbeddedRedis
    worker_a: Worker
    worker_b: Worker
    scheduler: Scheduler
    channel: grpc.Channel
    stats: Counter = field(default_factory=Counter)

    @property
    def stub(self):
        return inference_pb2_grpc.InferenceStub(self.channel)

    def procs(self):
        return (self.worker_a, self.worker_b, self.scheduler)

    def assert_alive(self) -> None:
        assert self.redis._proc.poll() is None, "Redis died"
        for p in self.procs():
            assert p.proc.poll() is None, f"{p.args[1]} died ({p.proc.returncode}):\n{p.log.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    with EmbeddedRedis() as redis:
        a = Worker(tmp, *WORKER_A, name="fuzz-a").start()
        b = Worker(tmp, *WORKER_B, name="fuzz-b").start()
        s = Scheduler(tmp, redis.url, [a.address], "--max-num-batched-tokens", "256").start()
        channel = grpc.insecure_channel(s.address)
        try:
            yield Stack(redis, a, b, s, channel)
        finally:
            channel.close()
            for p in (s, a, b):
                p.stop()


# ---- checks ------------------------------------------------------------------------------

def check_error(e: grpc.RpcError, request_type=None) -> str:
    """A failed call failed precisely: a known code, and INVALID_ARGUMENT names a field
    (returned, for the tally)."""
    code, details = e.code(), e.details() or ""
    assert code in PRECISE | CLIENT_SIDE, f"{code.name}: {details}"
    if code == C.INVALID_ARGUMENT:
        m = FIELD_MESSAGE.match(details)
        assert m, f"INVALID_ARGUMENT without a field: {details!r}"
        if request_type is not None:
            names = {f.name for f in request_type.DESCRIPTOR.fields} | set(request_type.DESCRIPTOR.oneofs_by_name)
            assert m.group(1) in names | {"request"}, f"{m.group(1)!r} is no field of {request_type.__name__}"
        return details.split(":", 1)[0]
    return code.name


def check_report(report: wpb.StepReport, plan_id: int) -> None:
    assert report.plan_id == plan_id
    for err in report.errors:
        assert err.field != "integrity", f"pool integrity violated: {err.message}"
        assert not err.message.startswith("step failed"), f"the engine raised: {err.message}"
        assert err.field in ITEM_FIELDS, f"unknown field {err.field!r}: {err.message}"
    occ = report.occupancy
    assert occ.rt_slots + occ.be_slots + occ.free_slots == occ.num_blocks * occ.block_size
    assert occ.free_blocks <= occ.num_blocks
    for out in report.outputs:
        assert all(0 <= t < SIM_VOCAB for t in out.token_ids)


def assert_empty(occ: wpb.PoolOccupancy) -> None:
    assert (occ.rt_slots, occ.be_slots, occ.be_host_slots, occ.shared_blocks) == (0, 0, 0, 0), occ
    assert occ.free_blocks == occ.num_blocks and occ.free_slots == occ.num_blocks * occ.block_size, occ


# ---- Inference: structured requests --------------------------------------------------------

class InferenceFuzz:
    """One case = one RPC. Submitted requests are aborted a few at a time, so the queue
    stays short and later cases are not stuck behind long requests."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.stub = stack.stub
        self.submitted: list[str] = []

    def strategy(self):
        gen = fs.generate_request(SIM_VOCAB)
        return st.one_of(st.tuples(st.just("Generate"), gen, fs.metadata),
                         st.tuples(st.just("Submit"), gen, fs.metadata),
                         st.tuples(st.just("Watch"), fs.watch_request(), fs.metadata),
                         st.tuples(st.just("Abort"), fs.abort_request, fs.metadata),
                         st.tuples(st.just("GetLoad"), st.just(ipb.GetLoadRequest()), fs.metadata))

    def run(self, case) -> None:
        rpc, req, md = case
        self.stack.stats[f"inference.{rpc}"] += 1
        t0 = time.perf_counter()
        try:
            if rpc in ("Generate", "Watch"):
                call = getattr(self.stub, rpc)(req, timeout=3, metadata=md)
                try:
                    first = next(call, None)
                    if first is not None:
                        self.submitted.append(first.request_id)  # Abort is harmless on a finished one
                finally:
                    call.cancel()
            else:
                resp = getattr(self.stub, rpc)(req, timeout=10, metadata=md)
                if rpc == "Submit":
                    self.submitted.append(resp.request_id)
            self.stack.stats["inference.ok"] += 1
        except grpc.RpcError as e:
            self.stack.stats[f"code.{e.code().name}"] += 1
            self.stack.stats[f"why.{check_error(e, type(req))}"] += 1
        self.stack.stats[f"ms.{rpc}"] += round((time.perf_counter() - t0) * 1e3)
        while len(self.submitted) > 6:
            self.abort(self.submitted.pop(0))
        self.stack.assert_alive()

    def abort(self, rid: str) -> None:
        try:
            self.stub.Abort(ipb.AbortRequest(request_id=rid), timeout=10)
        except grpc.RpcError as e:
            assert e.code() == C.NOT_FOUND, e


# ---- the worker's Step stream -------------------------------------------------------------

class Driver:
    """One Step stream to a worker: a plan in, its report out."""

    def __init__(self, channel: grpc.Channel):
        self.q: queue.Queue = queue.Queue()
        self.stream = worker_pb2_grpc.WorkerStub(channel).Step(iter(self.q.get, None), timeout=600)

    def step(self, plan: wpb.StepPlan) -> wpb.StepReport:
        self.q.put(plan)
        return next(self.stream)

    def close(self) -> None:
        self.q.put(None)


class StepFuzz:
    """One case = a few plans on worker B's Step stream; every 20 cases everything
    resident is freed and the pool must be empty again.

    Drawn plans rarely name a resident sequence with a valid chunk size, so the case also
    schedules some resident sequences right (a chunk within what is left to compute): the
    pool then fills, shares blocks and evicts, and the hostile items meet a busy pool."""

    def __init__(self, channel: grpc.Channel, stats: Counter, vocab: int = SIM_VOCAB):
        self.channel = channel
        self.stats = stats
        self.vocab = vocab
        self.driver = Driver(channel)
        self.num_cases = 0
        self.resident: list[wpb.ResidentSequence] = []  # as of the last report

    def strategy(self):
        # Per plan, picks (which resident, how much of what is left) are drawn up front:
        # what a case draws must not depend on the worker's state (Hypothesis checks).
        picks = st.lists(st.tuples(st.integers(0, 63), st.integers(0, 2**16)), max_size=4)
        return st.tuples(st.lists(fs.step_plan(self.vocab), min_size=1, max_size=3),
                         st.lists(picks, min_size=3, max_size=3))

    def run(self, case) -> None:
        plans, picks = case
        for plan, plan_picks in zip(plans, picks):
            running = [r for r in self.resident if not r.finished and r.seq_id not in plan.free]
            chosen = {running[i % len(running)].seq_id: (running[i % len(running)], k)
                      for i, k in plan_picks} if running else {}
            for r, k in chosen.values():
                left = r.num_prompt_tokens + len(r.output_token_ids) - r.num_computed_tokens
                plan.scheduled.add(seq_id=r.seq_id, num_tokens=1 + k % max(1, left))
            plan.list_resident = True
            report = self.driver.step(plan)
            check_report(report, plan.plan_id)
            self.resident = list(report.resident)
            self.stats["step.plans"] += 1
            self.stats.update(f"item.{e.field}" for e in report.errors)
            self.stats["step.tokens"] += sum(len(o.token_ids) for o in report.outputs)
        self.stats["step.cases"] += 1
        self.num_cases += 1
        if self.num_cases % 20 == 0:
            assert_empty(self.free_all())

    def free_all(self) -> wpb.PoolOccupancy:
        resident = self.driver.step(wpb.StepPlan(plan_id=1, list_resident=True)).resident
        report = self.driver.step(wpb.StepPlan(plan_id=2, free=[s.seq_id for s in resident]))
        check_report(report, 2)
        assert not report.errors, report.errors
        self.resident = []
        self.stats["step.freed"] += len(resident)
        return report.occupancy


# ---- bytes on the wire ------------------------------------------------------------------------

INFERENCE = "/bros.v1.Inference/"
WORKER = "/bros.v1.Worker/"
HEALTH = "/grpc.health.v1.Health/"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def raw_targets(vocab: int):
    """(target, method, kind, strategy of payload bytes). Worker A's Step is left out: it
    belongs to the scheduler."""
    gen = fs.mutated(fs.generate_request(vocab))
    return st.one_of(
        st.tuples(st.just("scheduler"), st.just(INFERENCE + "Submit"), st.just("unary"), gen),
        st.tuples(st.just("scheduler"), st.just(INFERENCE + "Generate"), st.just("server_stream"), gen),
        st.tuples(st.just("scheduler"), st.just(INFERENCE + "Watch"), st.just("server_stream"),
                  fs.mutated(fs.watch_request())),
        st.tuples(st.just("scheduler"), st.just(INFERENCE + "Abort"), st.just("unary"),
                  fs.mutated(fs.abort_request)),
        st.tuples(st.just("scheduler"), st.just(INFERENCE + "GetLoad"), st.just("unary"), st.binary(max_size=64)),
        st.tuples(st.sampled_from(["scheduler", "worker_a"]), st.sampled_from([HEALTH + "Check", INFERENCE + "Nope"]),
                  st.just("unary"), st.binary(max_size=64)),
        st.tuples(st.sampled_from(["scheduler", "worker_b"]), st.just(REFLECTION), st.just("bidi"),
                  st.binary(max_size=64)),
        st.tuples(st.sampled_from(["worker_a", "worker_b"]), st.just(WORKER + "Describe"), st.just("unary"),
                  st.binary(max_size=64)),
        st.tuples(st.sampled_from(["worker_a", "worker_b"]), st.just(WORKER + "Tokenize"), st.just("unary"),
                  fs.mutated(fs.tokenize_request())),
        st.tuples(st.just("worker_b"), st.just(WORKER + "Step"), st.just("bidi"),
                  fs.mutated(fs.step_plan(vocab))),
    )


class RawFuzz:
    def __init__(self, stack: Stack):
        self.stack = stack
        self.channels = {name: grpc.insecure_channel(p.address) for name, p in
                         (("scheduler", stack.scheduler), ("worker_a", stack.worker_a), ("worker_b", stack.worker_b))}
        self.submitted: list[str] = []

    def run(self, case) -> None:
        target, method, kind, payload = case
        ch = self.channels[target]
        self.stack.stats[f"raw.{method.rsplit('/', 1)[-1]}"] += 1
        try:
            if kind == "unary":
                resp = ch.unary_unary(method)(payload, timeout=10)
                if method.endswith("Submit"):
                    self.submitted.append(ipb.SubmitResponse.FromString(resp).request_id)
            elif kind == "server_stream":
                call = ch.unary_stream(method)(payload, timeout=3)
                try:
                    first = next(call, None)
                    if first is not None:
                        self.submitted.append(ipb.GenerateResponse.FromString(first).request_id)
                finally:
                    call.cancel()
            else:
                for _ in ch.stream_stream(method)(iter([payload]), timeout=10):
                    pass
        except grpc.RpcError as e:
            check_error(e)
            self.stack.stats[f"code.{e.code().name}"] += 1
        for rid in self.submitted:
            try:
                self.stack.stub.Abort(ipb.AbortRequest(request_id=rid), timeout=10)
            except grpc.RpcError as e:
                assert e.code() == C.NOT_FOUND, e
        self.submitted.clear()
        self.stack.assert_alive()

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()


def send_garbage(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        try:
            s.sendall(data)
            s.settimeout(0.05)
            s.recv(4096)
        except OSError:
            pass  # the server may hang up on us: that is the point


# ---- the runs -------------------------------------------------------------------------------

def fuzz_stack(stack: Stack, factor: int) -> None:
    t0 = time.monotonic()
    n = {k: v * factor for k, v in QUICK.items()}
    seconds: dict[str, float] = {}

    inference = InferenceFuzz(stack)
    fuzz("inference", n["inference"], [inference.strategy()], lambda case: inference.run(case), seconds)

    stepper = StepFuzz(grpc.insecure_channel(stack.worker_b.address), stack.stats)
    fuzz("step", n["step"], [stepper.strategy()], lambda plans: stepper.run(plans), seconds)
    stack.assert_alive()

    raw = RawFuzz(stack)
    fuzz("raw_grpc", n["raw_grpc"], [raw_targets(SIM_VOCAB)], lambda case: raw.run(case), seconds)
    raw.close()

    ports = [p.port for p in stack.procs()]

    def tcp_case(port_index: int, data: bytes) -> None:
        send_garbage(ports[port_index], data)
        stack.stats["tcp.cases"] += 1
        stack.assert_alive()
    fuzz("tcp", n["tcp"], [st.integers(0, len(ports) - 1), fs.tcp_garbage], tcp_case, seconds)

    workers = {"a": wpb_stub(stack.worker_a), "b": wpb_stub(stack.worker_b)}

    def worker_unary(which: str, req: wpb.TokenizeRequest) -> None:
        stack.stats["worker.unary"] += 1
        try:
            workers[which].Describe(wpb.DescribeRequest(), timeout=10)
            workers[which].Tokenize(req, timeout=10)
        except grpc.RpcError as e:
            check_error(e, wpb.TokenizeRequest)
            stack.stats[f"code.{e.code().name}"] += 1
    fuzz("worker_unary", n["worker_unary"], [st.sampled_from("ab"), fs.tokenize_request()], worker_unary, seconds)

    # ---- afterwards: consistent, empty once aborted, and still serving ----------------------
    for rid in inference.submitted + fs.REQUEST_IDS:
        inference.abort(rid)
    stepper.driver.close()
    stepper.driver = Driver(stepper.channel)  # the raw cases took worker B's stream over
    assert_empty(stepper.free_all())
    stepper.driver.close()
    wait_idle(stack)
    for w in (stack.worker_a, stack.worker_b):
        info = wpb_stub(w).Describe(wpb.DescribeRequest(), timeout=10)
        assert info.integrity_error == "", f"{w.address}: {info.integrity_error}"
        assert_empty(info.occupancy)
    tokens, final = collect(stack.stub.Generate(ipb.GenerateRequest(
        token_ids=ipb.TokenIds(ids=[5, 6, 7]), service_class=tpb.REALTIME,
        sampling=tpb.SamplingParams(max_tokens=12, temperature=0.0)), timeout=30))
    assert len(tokens) == 12 and final.finish_reason == tpb.LENGTH
    stack.assert_alive()
    cases = sum(v for k, v in stack.stats.items() if k in ("step.cases", "tcp.cases", "worker.unary")
                or k.startswith(("inference.", "raw.")) and k != "inference.ok")
    print(f"\nfuzz: {cases} cases in {time.monotonic() - t0:.1f} s {seconds}; {dict(sorted(stack.stats.items()))}")
    assert cases >= sum(n.values()) * 0.95


def wpb_stub(worker: Worker):
    return worker_pb2_grpc.WorkerStub(grpc.insecure_channel(worker.address))


def wait_idle(stack: Stack, timeout: float = 60) -> None:
    """Every request ended, and the scheduler's view of worker A's pool is empty."""
    deadline = time.monotonic() + timeout
    while True:
        load = stack.stub.GetLoad(ipb.GetLoadRequest(), timeout=10)
        busy = [(c.service_class, c.queued_requests, c.running_requests) for c in load.classes
                if c.queued_requests or c.running_requests]
        occ = load.workers[0].occupancy
        if not busy and occ.free_blocks == occ.num_blocks and occ.be_host_slots == 0:
            return
        assert time.monotonic() < deadline, f"not idle after {timeout} s: {busy}, {occ}"
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


def test_fuzz_quick(stack):
    fuzz_stack(stack, 1)


@pytest.mark.faults
def test_fuzz_full(stack):
    fuzz_stack(stack, FULL_FACTOR)
