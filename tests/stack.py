"""Start real processes for end-to-end tests: Redis, workers, scheduler replicas."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import contextlib

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bros.health import wait_serving
from bros.redis_server import EmbeddedRedis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process with its output in a log file."""

    def __init__(self, args: list[str], log: Path, credentials: grpc.ChannelCredentials | None = None):
        self.args, self.log = args, log
        self.credentials = credentials  # TLS for the health probe, when the process serves TLS
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Proc":
        self.proc = subprocess.Popen([sys.executable, *self.args], stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return self

    def _wait(self, address: str, service: str, timeout: float) -> None:
        try:
            wait_serving(address, service, self.proc, timeout, self.log, self.credentials)
        except BaseException:
            self.kill()  # never leave a half-started process behind a failed test
            raise

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class Worker(Proc):
    def __init__(self, tmp: Path, *extra: str, name: str = "worker", credentials=None, port: int | None = None):
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        super().__init__(["-m", "worker_svc", "--port", str(self.port), *extra], tmp / f"{name}-{self.port}.log",
                         credentials)

    def start(self, timeout: float = 120) -> "Worker":
        super().start()
        self._wait(self.address, "bros.v1.Worker", timeout)
        return self


class Scheduler(Proc):
    def __init__(self, tmp: Path, redis_url: str, workers: list[str], *extra: str, port: int | None = None,
                 prefix: str = "bros", credentials=None):
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        super().__init__(["-m", "scheduler_svc", "--port", str(self.port), "--redis-url", redis_url,
                          "--workers", ",".join(workers), "--key-prefix", prefix, *extra],
                         tmp / f"scheduler-{self.port}.log", credentials)

    def start(self, timeout: float = 60) -> "Scheduler":
        super().start()
        self._wait(self.address, "bros.v1.Inference", timeout)
        return self


def health_status(address: str, service: str = "", timeout: float = 2) -> str:
    """The health service's answer (SERVING, NOT_SERVING), or the call's status code name
    when there is none (UNAVAILABLE: nothing listens)."""
    with grpc.insecure_channel(address) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                        timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


@contextlib.contextmanager
def sim_stack(tmp: Path, *scheduler_args: str, num_blocks: int = 256):
    """Redis, one sim worker (real clock) and a scheduler: (scheduler, worker)."""
    with EmbeddedRedis() as redis_server:
        worker = Worker(tmp, "--backend", "sim", "--sim-clock", "real", "--num-blocks", str(num_blocks),
                        name="sim").start()
        try:
            sched = Scheduler(tmp, redis_server.url, [worker.address], *scheduler_args).start()
            try:
                yield sched, worker
            finally:
                sched.stop()
        finally:
            worker.stop()
