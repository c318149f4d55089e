"""The Node.js client (clients/node, @grpc/grpc-js + @grpc/proto-loader) against a real
stack: embedded Redis, a sim worker and a scheduler, all real processes over loopback.
Its example script streams a Generate; what it prints must be every token, in order, then
the final, exactly as Redis recorded them (read back through Watch)."""
import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from bros.v1 import inference_pb2 as ipb
from bros.v1 import inference_pb2_grpc
from bros.v1 import types_pb2 as tpb
from stack import sim_stack

NODE_CLIENT = Path(__file__).resolve().parents[1] / "clients" / "node"
EXAMPLE = NODE_CLIENT / "examples" / "generate.js"


@pytest.fixture(scope="module")
def node():
    path = shutil.which("node")
    if path is None:
        pytest.fail("node is not on PATH (Node 20 is part of the machine and of CI)")
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(f"{NODE_CLIENT}/node_modules is missing: run `make install` (npm ci --prefix clients/node)")
    return path


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    # A long resume grace: a request aborted within it was aborted by the client itself.
    with sim_stack(tmp_path_factory.mktemp("node"), "--resume-grace-s", "120") as (sched, _):
        yield sched


def run_example(node, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([node, str(EXAMPLE), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=NODE_CLIENT)


def events_of(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def recorded(address: str, request_id: str) -> tuple[list[int], ipb.FinalResult]:
    """The request's tokens and final as Redis holds them, via Watch (wait=false)."""
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        tokens, final = [], None
        for msg in stub.Watch(ipb.WatchRequest(request_id=request_id, wait=False), timeout=10):
            if msg.HasField("chunk"):
                tokens += list(msg.chunk.token_ids)
            else:
                final = msg.final
        return tokens, final


def test_node_streams_every_token_in_order_then_the_final(node, scheduler):
    result = run_example(node, "--target", scheduler.address, "--class", "rt", "--max-tokens", "24",
                         "--token-ids", "--json", "5,6,7,8,9")
    assert result.returncode == 0, result.stderr
    events = events_of(result.stdout)
    chunks, final = events[:-1], events[-1]

    assert [e["type"] for e in chunks] == ["chunk"] * len(chunks) and final["type"] == "final"
    tokens = []
    for chunk in chunks:
        assert chunk["index"] == len(tokens), f"chunk at index {chunk['index']} after {len(tokens)} tokens"
        tokens += chunk["tokenIds"]
    assert len(tokens) == 24
    assert final["finishReason"] == "LENGTH" and final["numOutputTokens"] == 24 and final["numPromptTokens"] == 5
    assert final["ttftMs"] > 0 and final["tpotMs"] > 0 and final["error"] == ""
    assert len({e["requestId"] for e in events}) == 1

    redis_tokens, redis_final = recorded(scheduler.address, final["requestId"])
    assert tokens == redis_tokens
    assert final["numOutputTokens"] == redis_final.num_output_tokens
    assert final["ttftMs"] == pytest.approx(redis_final.ttft_ms)


def test_node_best_effort_request_finishes(node, scheduler):
    result = run_example(node, "--target", scheduler.address, "--class", "be", "--max-tokens", "5",
                         "--token-ids", "--json", "11,12,13")
    assert result.returncode == 0, result.stderr
    events = events_of(result.stdout)
    assert sum(len(e["tokenIds"]) for e in events if e["type"] == "chunk") == 5
    assert events[-1]["finishReason"] == "LENGTH"


def test_node_reports_the_servers_invalid_argument(node, scheduler):
    result = run_example(node, "--target", scheduler.address, "--max-tokens", "0", "--token-ids", "--json", "5,6")
    assert result.returncode == 1
    assert result.stdout == ""
    # 3 = INVALID_ARGUMENT; the message names the field.
    assert "generate failed: 3 " in result.stderr and "max_tokens" in result.stderr


def test_node_breaking_out_of_the_stream_aborts_the_request(node, scheduler):
    """Not after the server's resume grace (120 s here): the client sends Abort itself."""
    result = run_example(node, "--target", scheduler.address, "--max-tokens", "2000", "--token-ids", "--json",
                         "--stop-after", "2", "5,6,7")
    assert result.returncode == 0, result.stderr
    events = events_of(result.stdout)
    assert [e["type"] for e in events] == ["chunk", "chunk"]
    rid = events[0]["requestId"]
    with grpc.insecure_channel(scheduler.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        finals = [m.final for m in stub.Watch(ipb.WatchRequest(request_id=rid, wait=True), timeout=20)
                  if m.HasField("final")]
    assert finals[0].finish_reason == tpb.ABORT and finals[0].num_output_tokens < 2000
