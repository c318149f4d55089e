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
QUICK = {"inference": 500, "step": 450, "raw_grpc": 400, "tcp": 100, "worker_unary": 100}
FULL_FACTOR = 7
TORCH = {"inference": 150, "worker_unary": 60, "step": 90}

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
            for p in (s, a, b):
                if p is not None:
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
            for p in (s, w):
                if p is not None:
                    p.stop()
