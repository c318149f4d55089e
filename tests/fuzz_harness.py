"""The fuzz drivers and what every answer is held to. One driver per way in:

    InferenceFuzz  one Inference RPC per case, through the scheduler
    StepFuzz       a few StepPlans per case, straight into a worker
    RawFuzz        bytes that may not be a message, on any method of any process
    send_garbage   junk on the raw TCP port

Every case ends by checking that no process died. A failed call must fail precisely: a
known code (never INTERNAL or UNKNOWN), INVALID_ARGUMENT naming a field of the request,
and the refusal the scheduler's own pure checks predict (an oracle, so a refusal cannot
hide behind a timeout or a different code).
"""
from __future__ import annotations

import queue
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fuzz_strategies as fs
from bros.v1 import inference_pb2 as ipb
from bros.v1 import inference_pb2_grpc
from bros.v1 import worker_pb2 as wpb
from bros.v1 import worker_pb2_grpc
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.validation import InvalidArgument, check_generate, check_lookup

C = grpc.StatusCode
# Codes bad input may get. DEADLINE_EXCEEDED and CANCELLED only ever come from the
# fuzzer's own client (a short deadline on a stream, a cancel after the first message).
PRECISE = {C.INVALID_ARGUMENT, C.NOT_FOUND, C.RESOURCE_EXHAUSTED, C.UNIMPLEMENTED}
CLIENT_SIDE = {C.DEADLINE_EXCEEDED, C.CANCELLED}
# "<field>: why", the field a path into the request ("sampling.stop", "chat.messages[2].role").
FIELD_MESSAGE = re.compile(r"^([a-z_]+)((\.[a-z_]+)|(\[\d+\]))*: .+", re.S)
ITEM_FIELDS = {"new_sequences.seq_id", "new_sequences.service_class", "new_sequences.prompt_token_ids",
               "new_sequences.output_token_ids", "new_sequences.sampling", "scheduled", "scheduled.seq_id",
               "scheduled.num_tokens", "free", "recompute", "checkpoint", "preempt", "restore"}
# gRPC's hard limit on a request's metadata (grpc.absolute_max_metadata_size default).
MAX_METADATA_BYTES = 16 * 1024


def fuzz(name: str, n: int, strategies: list, body, seconds: dict) -> None:
    """Run body on n cases drawn from strategies (one positional argument each)."""
    t0 = time.monotonic()
    fuzz_settings(n)(given(*strategies)(body))()
    seconds[name] = round(time.monotonic() - t0, 1)


def fuzz_settings(n: int) -> settings:
    # Derandomized and database-free: CI runs the same cases every time. No shrinking:
    # the servers keep state between cases, so a shrunk case would not replay alike.
    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))


@dataclass
class Target:
    """The processes under test, by name, and what the fuzz saw of them."""
    procs: dict                               # name -> tests/stack.py Proc (or Redis)
    stats: Counter = field(default_factory=Counter)

    def assert_alive(self) -> None:
        for name, p in self.procs.items():
            popen = getattr(p, "proc", None) or getattr(p, "_proc", None)
            assert popen is not None and popen.poll() is None, \
                f"{name} died ({getattr(popen, 'returncode', None)}):\n{_log_tail(p)}"


def _log_tail(p) -> str:
    log = getattr(p, "log", None) or getattr(p, "log_path", None)
    try:
        return log.read_text(errors="replace")[-3000:]
    except (AttributeError, OSError):
        return "(no log)"


def worker_stub(address: str):
    return worker_pb2_grpc.WorkerStub(grpc.insecure_channel(address))


# ---- checks ------------------------------------------------------------------------------

def check_error(e: grpc.RpcError, request_type=None) -> str:
    """A failed call failed precisely: a known code, and INVALID_ARGUMENT names a field
    (returned, for the tally; else the code's name)."""
    code, details = e.code(), e.details() or ""
    assert code in PRECISE | CLIENT_SIDE, f"{code.name}: {details}"
    if code != C.INVALID_ARGUMENT:
        return code.name
    m = FIELD_MESSAGE.match(details)
    assert m, f"INVALID_ARGUMENT without a field: {details!r}"
    if request_type is not None:
        names = {f.name for f in request_type.DESCRIPTOR.fields} | set(request_type.DESCRIPTOR.oneofs_by_name)
        assert m.group(1) in names | {"request"}, f"{m.group(1)!r} is no field of {request_type.__name__}"
    return details.split(":", 1)[0]


def check_report(report: wpb.StepReport, plan_id: int, vocab_size: int) -> None:
    """A Step report: in order, every refusal a known plan field, the pool consistent."""
    assert report.plan_id == plan_id
    for err in report.errors:
        assert err.field != "integrity", f"pool integrity violated: {err.message}"
        assert not err.message.startswith("step failed"), f"the engine raised: {err.message}"
        assert err.field in ITEM_FIELDS, f"unknown field {err.field!r}: {err.message}"
    occ = report.occupancy
    assert occ.rt_slots + occ.be_slots + occ.free_slots == occ.num_blocks * occ.block_size, occ
    assert occ.free_blocks <= occ.num_blocks, occ
    for out in report.outputs:
        assert all(0 <= t < vocab_size for t in out.token_ids), out


def assert_empty(occ: wpb.PoolOccupancy) -> None:
    assert (occ.rt_slots, occ.be_slots, occ.be_host_slots, occ.shared_blocks) == (0, 0, 0, 0), occ
    assert occ.free_blocks == occ.num_blocks and occ.free_slots == occ.num_blocks * occ.block_size, occ


def refusal(rpc: str, req, vocab_size: int, max_model_len: int) -> str | None:
    """The field the scheduler's own pure checks refuse before tokenizing; None if they pass."""
    try:
        if rpc in ("Generate", "Submit"):
            check_generate(req, SchedulerConfig(), vocab_size, max_model_len)
        elif rpc in ("Watch", "Abort"):
            check_lookup(req, SchedulerConfig())
    except InvalidArgument as e:
        return e.field
    return None


def metadata_too_big(md) -> bool:
    return sum(len(k) + len(v) for k, v in md) > MAX_METADATA_BYTES


# ---- Inference: structured requests --------------------------------------------------------

class InferenceFuzz:
    """One case = one RPC. Submitted requests are aborted a few at a time, so the queue
    stays short and later cases are not stuck behind long requests."""

    def __init__(self, target: Target, address: str, info: wpb.WorkerInfo, prompt_kinds=fs.PROMPT_KINDS):
        self.target = target
        self.stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(address))
        self.info = info
        self.prompt_kinds = prompt_kinds
        self.submitted: list[str] = []

    def strategy(self):
        gen = fs.generate_request(self.info.vocab_size, self.prompt_kinds)
        return st.one_of(st.tuples(st.just("Generate"), gen, fs.metadata),
                         st.tuples(st.just("Submit"), gen, fs.metadata),
                         st.tuples(st.just("Watch"), fs.watch_request(), fs.metadata),
                         st.tuples(st.just("Abort"), fs.abort_request, fs.metadata),
                         st.tuples(st.just("GetLoad"), st.just(ipb.GetLoadRequest()), fs.metadata))

    def run(self, case) -> None:
        rpc, req, md = case
        stats = self.target.stats
        stats[f"inference.{rpc}"] += 1
        expected = refusal(rpc, req, self.info.vocab_size, self.info.max_model_len)
        t0 = time.perf_counter()
        try:
            self._call(rpc, req, md)
            assert expected is None and not metadata_too_big(md), f"{rpc} accepted; expected {expected} refused"
            stats["inference.ok"] += 1
        except grpc.RpcError as e:
            stats[f"why.{check_error(e, type(req))}"] += 1
            self._check_refusal(e, rpc, req, md, expected)
        stats[f"ms.{rpc}"] += round((time.perf_counter() - t0) * 1e3)
        while len(self.submitted) > 6:
            self.abort(self.submitted.pop(0))
        self.target.assert_alive()

    def _call(self, rpc: str, req, md) -> None:
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

    @staticmethod
    def _check_refusal(e: grpc.RpcError, rpc: str, req, md, expected: str | None) -> None:
        if metadata_too_big(md):
            assert e.code() == C.RESOURCE_EXHAUSTED, e
        elif expected is not None:
            assert e.code() == C.INVALID_ARGUMENT and e.details().startswith(expected + ":"), \
                f"{rpc} should be refused for {expected}, got {e.code().name}: {e.details()}"
        elif e.code() == C.INVALID_ARGUMENT:
            # Past the pure checks only the tokenizer and the length are left to refuse.
            prompt = req.WhichOneof("prompt")
            assert e.details().split(":")[0] in (prompt, "sampling.max_tokens"), e.details()
        elif e.code() == C.DEADLINE_EXCEEDED:
            # Only a stream that waits for tokens may run into the fuzzer's deadline.
            assert rpc == "Generate" or (rpc == "Watch" and req.wait), e
        elif e.code() == C.RESOURCE_EXHAUSTED:
            # Overload: a full queue, or an RT target no longer reachable (a 1 ms TTFT, say).
            assert rpc in ("Generate", "Submit") and e.details().startswith("service_class: "), e
        else:
            assert e.code() in (C.NOT_FOUND, C.CANCELLED) and rpc in ("Watch", "Abort", "Generate"), e

    def abort(self, rid: str) -> None:
        try:
            self.stub.Abort(ipb.AbortRequest(request_id=rid), timeout=10)
        except grpc.RpcError as e:
            assert e.code() == C.NOT_FOUND, e

    def abort_all(self) -> None:
        for rid in self.submitted + fs.REQUEST_IDS:
            self.abort(rid)
        self.submitted.clear()


# ---- the worker's Step stream -------------------------------------------------------------

class Driver:
    """One Step stream to a worker: a plan in, its report out."""

    def __init__(self, address: str):
        self.q: queue.Queue = queue.Queue()
        self.channel = grpc.insecure_channel(address)
        self.stream = worker_pb2_grpc.WorkerStub(self.channel).Step(iter(self.q.get, None), timeout=3600)

    def step(self, plan: wpb.StepPlan) -> wpb.StepReport:
        self.q.put(plan)
        return next(self.stream)

    def close(self) -> None:
        self.q.put(None)
        self.channel.close()


class StepFuzz:
    """One case = a few plans on a worker's Step stream; every 20 cases everything
    resident is freed and the pool must be empty again.

    Drawn plans rarely name a resident sequence with a valid chunk size, so the case also
    picks resident sequences and does what a scheduler would (schedule a chunk within
    what is left to compute, free a finished one): the pool then fills, shares blocks
    and evicts, and the hostile items meet a busy pool."""

    def __init__(self, target: Target, address: str, vocab_size: int):
        self.target = target
        self.address = address
        self.vocab_size = vocab_size
        self.driver = Driver(address)
        self.num_cases = 0
        self.resident: list[wpb.ResidentSequence] = []  # as of the last report

    def strategy(self):
        # Per plan, picks (which resident, how much of what is left) are drawn up front:
        # what a case draws must not depend on the worker's state (Hypothesis checks).
        picks = st.lists(st.tuples(st.integers(0, 63), st.integers(0, 2**16)), max_size=6)
        return st.tuples(st.lists(fs.step_plan(self.vocab_size), min_size=1, max_size=3),
                         st.lists(picks, min_size=3, max_size=3))

    def run(self, case) -> None:
        plans, picks = case
        stats = self.target.stats
        for plan, plan_picks in zip(plans, picks):
            self._add_scheduler_moves(plan, plan_picks)
            plan.list_resident = True
            report = self.driver.step(plan)
            check_report(report, plan.plan_id, self.vocab_size)
            self.resident = list(report.resident)
            stats["step.plans"] += 1
            stats.update(f"item.{e.field}" for e in report.errors)
            stats["step.tokens"] += sum(len(o.token_ids) for o in report.outputs)
        stats["step.cases"] += 1
        self.num_cases += 1
        if self.num_cases % 20 == 0:
            assert_empty(self.free_all())
        self.target.assert_alive()

    def _add_scheduler_moves(self, plan: wpb.StepPlan, plan_picks) -> None:
        resident = [r for r in self.resident if r.seq_id not in plan.free]
        if not resident:
            return
        chosen = {}
        for i, k in plan_picks:
            r = resident[i % len(resident)]
            chosen[r.seq_id] = (r, k)
        for r, k in chosen.values():
            if r.finished:  # its tokens are "stored": free it
                plan.free.append(r.seq_id)
                continue
            left = r.num_prompt_tokens + len(r.output_token_ids) - r.num_computed_tokens
            plan.scheduled.add(seq_id=r.seq_id, num_tokens=1 + k % max(1, left))

    def reconnect(self) -> None:
        """A new stream (the raw cases take the worker's stream over)."""
        self.driver.close()
        self.driver = Driver(self.address)

    def free_all(self) -> wpb.PoolOccupancy:
        resident = self.driver.step(wpb.StepPlan(plan_id=1, list_resident=True)).resident
        report = self.driver.step(wpb.StepPlan(plan_id=2, free=[s.seq_id for s in resident]))
        check_report(report, 2, self.vocab_size)
        assert not report.errors, report.errors
        self.resident = []
        self.target.stats["step.freed"] += len(resident)
        return report.occupancy


# ---- bytes on the wire ------------------------------------------------------------------------

INFERENCE = "/bros.v1.Inference/"
WORKER = "/bros.v1.Worker/"
HEALTH = "/grpc.health.v1.Health/"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def raw_cases(vocab_size: int, scheduler: str, workers: list[str], step_worker: str):
    """(process, method, kind, payload). Only step_worker's Step is fuzzed: a Step stream
    takes a worker over, and the others belong to the scheduler."""
    gen = fs.mutated(fs.generate_request(vocab_size))
    anyone = st.sampled_from([scheduler, *workers])
    worker = st.sampled_from(workers)
    noise = st.binary(max_size=64)
    return st.one_of(
        st.tuples(st.just(scheduler), st.just(INFERENCE + "Submit"), st.just("unary"), gen),
        st.tuples(st.just(scheduler), st.just(INFERENCE + "Generate"), st.just("server_stream"), gen),
        st.tuples(st.just(scheduler), st.just(INFERENCE + "Watch"), st.just("server_stream"),
                  fs.mutated(fs.watch_request())),
        st.tuples(st.just(scheduler), st.just(INFERENCE + "Abort"), st.just("unary"), fs.mutated(fs.abort_request)),
        st.tuples(st.just(scheduler), st.just(INFERENCE + "GetLoad"), st.just("unary"), noise),
        st.tuples(anyone, st.sampled_from([HEALTH + "Check", INFERENCE + "Nope"]), st.just("unary"), noise),
        st.tuples(anyone, st.just(HEALTH + "Watch"), st.just("server_stream"), noise),
        st.tuples(anyone, st.just(REFLECTION), st.just("bidi"), noise),
        st.tuples(worker, st.just(WORKER + "Describe"), st.just("unary"), noise),
        st.tuples(worker, st.just(WORKER + "Tokenize"), st.just("unary"), fs.mutated(fs.tokenize_request())),
        st.tuples(st.just(step_worker), st.just(WORKER + "Step"), st.just("bidi"),
                  st.lists(fs.mutated(fs.step_plan(vocab_size)), min_size=1, max_size=3)),
    )


class RawFuzz:
    """Identity (de)serializers: the bytes go out as drawn, whatever they decode to."""

    def __init__(self, target: Target, addresses: dict[str, str], scheduler: str):
        self.target = target
        self.channels = {name: grpc.insecure_channel(a) for name, a in addresses.items()}
        self.scheduler = scheduler
        self.submitted: list[str] = []

    def run(self, case) -> None:
        name, method, kind, payload = case
        ch = self.channels[name]
        self.target.stats[f"raw.{method.rsplit('/', 1)[-1]}"] += 1
        try:
            if kind == "unary":
                resp = ch.unary_unary(method)(payload, timeout=10)
                if method.endswith("Submit"):
                    self.submitted.append(ipb.SubmitResponse.FromString(resp).request_id)
            elif kind == "server_stream":
                call = ch.unary_stream(method)(payload, timeout=3)
                try:
                    first = next(call, None)
                    if first is not None and method.startswith(INFERENCE):
                        self.submitted.append(ipb.GenerateResponse.FromString(first).request_id)
                finally:
                    call.cancel()
            else:
                payloads = payload if isinstance(payload, list) else [payload]
                for _ in ch.stream_stream(method)(iter(payloads), timeout=10):
                    pass
        except grpc.RpcError as e:
            self.target.stats[f"why.{check_error(e)}"] += 1
        stub = inference_pb2_grpc.InferenceStub(self.channels[self.scheduler])
        for rid in self.submitted:
            try:
                stub.Abort(ipb.AbortRequest(request_id=rid), timeout=10)
            except grpc.RpcError as e:
                assert e.code() == C.NOT_FOUND, e
        self.submitted.clear()
        self.target.assert_alive()

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


def worker_unary_case(target: Target, address: str, req: wpb.TokenizeRequest) -> None:
    """Describe, then Tokenize: a refusal must name a TokenizeRequest field."""
    target.stats["worker.unary"] += 1
    stub = worker_stub(address)
    stub.Describe(wpb.DescribeRequest(), timeout=10)
    try:
        stub.Tokenize(req, timeout=10)
    except grpc.RpcError as e:
        target.stats[f"why.{check_error(e, wpb.TokenizeRequest)}"] += 1
    target.assert_alive()
