"""bros.v1.Worker over real gRPC on loopback, against real worker processes."""
import os
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bros.v1 import types_pb2, worker_pb2, worker_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_status(address: str) -> int:
    # A fresh channel each time: a channel refused while the process starts backs off
    # reconnecting (1 s, 1.6 s, ...) and can sleep through the whole NOT_SERVING phase.
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return stub.Check(health_pb2.HealthCheckRequest(service="bros.v1.Worker"), timeout=2).status
        except grpc.RpcError:
            return -1


def start_worker(*args: str, timeout: float = 120.0):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "worker_svc", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    deadline = time.monotonic() + timeout
    saw_not_serving = False
    while time.monotonic() < deadline:
        status = health_status(f"127.0.0.1:{port}")
        if status == health_pb2.HealthCheckResponse.NOT_SERVING:
            saw_not_serving = True
        if status == health_pb2.HealthCheckResponse.SERVING:
            return proc, channel, saw_not_serving
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited: {proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError("worker did not become SERVING")


def stop_worker(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def greedy(max_tokens, **kw):
    return types_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


class Driver:
    """One Step stream: send a plan, get its report."""

    def __init__(self, channel):
        import queue
        self.q = queue.Queue()
        self.stream = worker_pb2_grpc.WorkerStub(channel).Step(iter(self.q.get, None))
        self.plan_id = 0

    def step(self, **fields) -> worker_pb2.StepReport:
        self.plan_id += 1
        self.q.put(worker_pb2.StepPlan(plan_id=self.plan_id, **fields))
        report = next(self.stream)
        assert report.plan_id == self.plan_id
        return report

    def close(self):
        self.q.put(None)


@pytest.fixture(scope="module")
def sim_worker():
    proc, channel, saw_not_serving = start_worker("--backend", "sim", "--sim-clock", "virtual",
                                                  "--num-blocks", "64", "--host-cache-mb", "16")
    yield channel
    stop_worker(proc)


def test_describe_and_reflection(sim_worker):
    info = worker_pb2_grpc.WorkerStub(sim_worker).Describe(worker_pb2.DescribeRequest(), timeout=5)
    assert (info.backend, info.num_blocks, info.block_size) == ("sim", 64, 16)
    assert info.max_model_len > 0 and info.vocab_size > 0 and info.kv_bytes_per_slot == 819200
    assert info.max_num_fused_tokens == 0   # the A100 cost model has no fused path
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    stub = reflection_pb2_grpc.ServerReflectionStub(sim_worker)
    resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"bros.v1.Worker", "grpc.health.v1.Health"} <= names


def test_bad_items_get_errors_and_change_nothing(sim_worker):
    d = Driver(sim_worker)
    try:
        ok = worker_pb2.NewSequence(seq_id="ok", service_class=types_pb2.REALTIME,
                                    prompt_token_ids=[5, 6, 7], sampling=greedy(4))
        before = d.step().occupancy
        r = d.step(new_sequences=[
            ok,
            worker_pb2.NewSequence(seq_id="empty", service_class=types_pb2.REALTIME, sampling=greedy(4)),
            worker_pb2.NewSequence(seq_id="cls", prompt_token_ids=[1], sampling=greedy(4)),
            worker_pb2.NewSequence(seq_id="vocab", service_class=types_pb2.BEST_EFFORT,
                                   prompt_token_ids=[10**9], sampling=greedy(4)),
            worker_pb2.NewSequence(seq_id="long", service_class=types_pb2.BEST_EFFORT,
                                   prompt_token_ids=[5] * 9000, sampling=greedy(4)),
            worker_pb2.NewSequence(seq_id="topp", service_class=types_pb2.BEST_EFFORT,
                                   prompt_token_ids=[5], sampling=types_pb2.SamplingParams(max_tokens=3, top_p=1.5)),
            worker_pb2.NewSequence(seq_id="ok", service_class=types_pb2.REALTIME,
                                   prompt_token_ids=[5], sampling=greedy(4)),
        ], scheduled=[worker_pb2.ScheduledSequence(seq_id="ghost", num_tokens=1),
                      worker_pb2.ScheduledSequence(seq_id="ok", num_tokens=0),
                      worker_pb2.ScheduledSequence(seq_id="ok", num_tokens=4)],
            free=["nobody"], preempt=["nobody"])
        errors = {(e.seq_id, e.field) for e in r.errors}
        assert errors == {
            ("empty", "new_sequences.prompt_token_ids"), ("cls", "new_sequences.service_class"),
            ("vocab", "new_sequences.prompt_token_ids"), ("long", "new_sequences.prompt_token_ids"),
            ("topp", "new_sequences.sampling"), ("ok", "new_sequences.seq_id"),
            ("ghost", "scheduled.seq_id"), ("ok", "scheduled.num_tokens"), ("nobody", "free"),
            ("nobody", "preempt")}, r.errors
        assert "top_p" in next(e.message for e in r.errors if e.seq_id == "topp")
        assert r.occupancy == before  # nothing ran, nothing was allocated
        # The good item is intact and runs.
        r = d.step(scheduled=[worker_pb2.ScheduledSequence(seq_id="ok", num_tokens=3)])
        assert not r.errors and len(r.outputs[0].token_ids) == 1
        d.step(free=["ok"])
    finally:
        d.close()


def test_survives_disconnect_and_lists_resident_sequences(sim_worker):
    d = Driver(sim_worker)
    seq = worker_pb2.NewSequence(seq_id="keep", service_class=types_pb2.BEST_EFFORT,
                                 prompt_token_ids=list(range(1, 40)), sampling=greedy(8))
    d.step(new_sequences=[seq], scheduled=[worker_pb2.ScheduledSequence(seq_id="keep", num_tokens=39)])
    r = d.step(scheduled=[worker_pb2.ScheduledSequence(seq_id="keep", num_tokens=1)])
    produced = [t for o in r.outputs for t in o.token_ids]
    d.stream.cancel()  # the scheduler vanishes mid-stream
    d2 = Driver(sim_worker)
    try:
        r = d2.step(list_resident=True)
        resident = {s.seq_id: s for s in r.resident}
        assert resident["keep"].num_computed_tokens == 40
        assert len(resident["keep"].output_token_ids) == 2 and resident["keep"].output_token_ids[1] == produced[0]
        assert r.occupancy.be_slots == 40
        # The new scheduler carries on where the old one stopped.
        r = d2.step(scheduled=[worker_pb2.ScheduledSequence(seq_id="keep", num_tokens=1)])
        assert r.outputs[0].num_output_tokens == 3
        d2.step(free=["keep"])
    finally:
        d2.close()


def test_new_stream_takes_over(sim_worker):
    old = Driver(sim_worker)
    old.step()
    new = Driver(sim_worker)
    new.step()
    with pytest.raises(grpc.RpcError) as e:
        old.step()
    assert e.value.code() == grpc.StatusCode.ABORTED
    new.close()


@pytest.mark.model
def test_torch_worker_answers_a_chat_prompt():
    proc, channel, saw_not_serving = start_worker("--backend", "torch", "--kv-cache-mb", "64")
    try:
        assert saw_not_serving  # health said NOT_SERVING while the model loaded and warmed
        stub = worker_pb2_grpc.WorkerStub(channel)
        info = stub.Describe(worker_pb2.DescribeRequest(), timeout=5)
        assert info.model_name.startswith("SmolLM2") and info.vocab_size == 49152
        assert info.max_num_fused_tokens == 64   # the C++ stack's rows (cpu_decode.MAX_NUM_ROWS)
        chat = worker_pb2.ChatList(messages=[worker_pb2.ChatMessage(role="user",
                                                                    content="What is the capital of France?")])
        ids = list(stub.Tokenize(worker_pb2.TokenizeRequest(chat=chat), timeout=5).token_ids)
        d = Driver(channel)
        r = d.step(new_sequences=[worker_pb2.NewSequence(seq_id="q", service_class=types_pb2.REALTIME,
                                                         prompt_token_ids=ids, sampling=greedy(24))],
                   scheduled=[worker_pb2.ScheduledSequence(seq_id="q", num_tokens=len(ids))])
        text = r.outputs[0].text
        while not r.outputs[0].finished:
            r = d.step(scheduled=[worker_pb2.ScheduledSequence(seq_id="q", num_tokens=1)])
            text += r.outputs[0].text
        assert "Paris" in text
        assert r.outputs[0].finish_reason == types_pb2.STOP
        d.close()
    finally:
        stop_worker(proc)
