"""Wait for a child process's gRPC service to report SERVING (grpc.health.v1)."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def wait_serving(address: str, service: str, proc: subprocess.Popen, timeout: float, log: Path,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
    """Return once `service` at `address` is SERVING; raise, with the end of the child's
    log, if the child exits first or the timeout passes. With credentials, over TLS."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{service} at {address} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{service} at {address} not SERVING after {timeout}s:\n{log.read_text()[-3000:]}")
    finally:
        channel.close()
