"""`bros serve`: Redis, one worker and one scheduler on this machine, until Ctrl-C or SIGTERM.

Start order follows the dependencies: Redis, then the worker (ready once its model is
loaded), then the scheduler that drives it. Stop order is the reverse, so the scheduler
never plans against a worker that is already gone. Children run in their own process
groups: a terminal's Ctrl-C reaches only the launcher, which then stops them in that
order. Each child writes to a log file under the run dir; when one dies, the launcher
prints the end of its log and exits non-zero.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

WORKER_SERVICE = "bros.v1.Worker"
SCHEDULER_SERVICE = "bros.v1.Inference"
HOST = "127.0.0.1"
SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class LaunchConfig:
    redis_url: str | None = None         # None: start an embedded Redis
    redis_appendfsync: str = "everysec"  # embedded Redis AOF: always | everysec | no
    backend: str = "torch"               # worker backend: "torch" or "sim"
    model: str | None = None             # None: the worker's bundled default model
    worker_port: int = 50061             # 0: any free port
    worker_args: tuple[str, ...] = ()    # appended to the worker's command line
    port: int = 50051                    # the scheduler's (client-facing) port; 0: any free port
    policy: str | None = None            # None: the scheduler's default
    scheduler_args: tuple[str, ...] = ()
    auth_tokens_file: str | None = None  # the scheduler's bearer tokens (None: no auth)
    run_dir: str = ".bros-run"           # log files (and embedded Redis data) go here
    worker_timeout_s: float = 300.0      # loading a model takes a while
    scheduler_timeout_s: float = 60.0
    grace_s: float = 15.0                # SIGTERM to SIGKILL

    def __post_init__(self) -> None:
        checks = [
            (self.backend in ("torch", "sim"), "backend", "must be 'torch' or 'sim'"),
            (0 <= self.worker_port < 65536, "worker_port", "must be in [0, 65536)"),
            (0 <= self.port < 65536, "port", "must be in [0, 65536)"),
            (self.worker_timeout_s > 0 and self.scheduler_timeout_s > 0, "worker_timeout_s", "must be > 0"),
            (self.grace_s >= 0, "grace_s", "must be >= 0"),
            (self.redis_appendfsync in ("always", "everysec", "no"), "redis_appendfsync",
             "must be always, everysec or no"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = LaunchConfig()
    p.add_argument("--redis-url", help="use this Redis instead of starting an embedded one")
    p.add_argument("--redis-appendfsync", choices=("always", "everysec", "no"), default=d.redis_appendfsync,
                   help="embedded Redis persistence (AOF in the run dir): 'always' loses no acknowledged "
                        "write in a crash, 'everysec' up to a second (default: %(default)s)")
    p.add_argument("--backend", choices=("torch", "sim"), default=d.backend, help="worker backend")
    p.add_argument("--model", help="HF checkpoint dir or .gguf for the worker (default: bundled model)")
    p.add_argument("--worker-port", type=int, default=d.worker_port, help="0 picks a free port")
    p.add_argument("--worker-arg", action="append", default=[], metavar="ARGS",
                   help="extra worker arguments, shell-split, e.g. --worker-arg='--kv-cache-mb 256' (repeatable)")
    p.add_argument("--port", type=int, default=d.port, help="scheduler port for clients; 0 picks a free port")
    p.add_argument("--policy", help="scheduling policy (default: the scheduler's)")
    p.add_argument("--scheduler-arg", action="append", default=[], metavar="ARGS",
                   help="extra scheduler arguments, shell-split (repeatable)")
    p.add_argument("--auth-tokens-file", metavar="PATH",
                   help="bearer tokens the scheduler accepts, one '<token> <class>[,<class>]' a line")
    p.add_argument("--run-dir", default=d.run_dir, help="where child logs go (default: %(default)s)")
    p.add_argument("--worker-timeout", type=float, default=d.worker_timeout_s, metavar="S",
                   help="seconds to wait for the worker to load its model (default: %(default)s)")


def config_from_args(ns: argparse.Namespace) -> LaunchConfig:
    return LaunchConfig(
        redis_url=ns.redis_url, redis_appendfsync=ns.redis_appendfsync, backend=ns.backend, model=ns.model, worker_port=ns.worker_port,
        worker_args=_split_all(ns.worker_arg), port=ns.port, policy=ns.policy,
        scheduler_args=_split_all(ns.scheduler_arg), auth_tokens_file=ns.auth_tokens_file, run_dir=ns.run_dir,
        worker_timeout_s=ns.worker_timeout)


def _split_all(values: list[str]) -> tuple[str, ...]:
    return tuple(arg for value in values for arg in shlex.split(value))


# ---- child processes ---------------------------------------------------------------------------

class LaunchFailed(Exception):
    """Part of the stack failed to start or died; `details` are the lines that show why."""

    def __init__(self, message: str, details: list[str] = ()):
        super().__init__(message)
        self.details = list(details)


class ChildFailed(LaunchFailed):
    def __init__(self, child: "Child", reason: str):
        # The log is read now: it is what the child said before anyone stopped anything.
        super().__init__(f"{child.name} {reason}; last lines of {child.log_path}:", child.tail())
        self.child = child


class Child:
    """One subprocess, its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], log_path: Path, grace_s: float):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.grace_s = grace_s
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            # The child holds its own copy of the file descriptor.
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, process_group=0,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        say(f"stopping {self.name}")
        self.proc.terminate()
        try:
            self.proc.wait(self.grace_s)
        except subprocess.TimeoutExpired:
            say(f"{self.name} did not stop within {self.grace_s:g} s; killing it")
            self.proc.kill()
            self.proc.wait()

    def tail(self, num_lines: int = 30) -> list[str]:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return lines[-num_lines:]


def start_child(stack: ExitStack, name: str, argv: list[str], run_dir: Path, grace_s: float) -> Child:
    child = Child(name, argv, run_dir / f"{name}.log", grace_s)
    # Registered before starting, so a signal arriving during start still stops it.
    stack.callback(child.stop)
    child.start()
    say(f"started {name} (pid {child.proc.pid}), log: {child.log_path}")
    return child


def health_status(stub: health_pb2_grpc.HealthStub, service: str) -> int | None:
    try:
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
    except grpc.RpcError:
        return None  # not listening yet, or the service is not registered yet


def wait_serving(child: Child, target: str, service: str, timeout_s: float, progress_every_s: float = 10.0) -> None:
    """Return once `service` on `target` reports SERVING; raise ChildFailed if it dies or times out."""
    start = time.monotonic()
    next_progress = start + progress_every_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while health_status(stub, service) != health_pb2.HealthCheckResponse.SERVING:
            if child.poll() is not None:
                raise ChildFailed(child, f"exited with code {child.poll()} while starting")
            now = time.monotonic()
            if now - start > timeout_s:
                raise ChildFailed(child, f"did not report SERVING within {timeout_s:g} s")
            if now >= next_progress:
                say(f"waiting for {child.name} on {target}: {now - start:.0f} s")
                next_progress += progress_every_s
            time.sleep(0.25)
    say(f"{child.name} serving on {target} after {time.monotonic() - start:.1f} s")


def supervise(children: list[Child], poll_s: float = 0.5) -> None:
    """Block until a child exits (raise ChildFailed) or a signal raises Stop."""
    while True:
        for child in children:
            if child.poll() is not None:
                raise ChildFailed(child, f"exited unexpectedly with code {child.poll()}")
        time.sleep(poll_s)


# ---- signals ----------------------------------------------------------------------------------

class Stop(Exception):
    """SIGINT or SIGTERM: shut down cleanly."""


@contextmanager
def stop_on_signals():
    """The first SIGINT/SIGTERM raises Stop; later ones are ignored so teardown can finish
    (it is bounded: every child is killed after its grace period)."""
    def on_signal(signum, frame):
        for s in SIGNALS:
            signal.signal(s, lambda *_: say("already stopping; children are killed after their grace period"))
        raise Stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---- the stack -------------------------------------------------------------------------------

def serve(cfg: LaunchConfig) -> int:
    """Run the stack until a signal (exit 0) or a child failure (exit 1)."""
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    say(f"run dir: {run_dir}")
    try:
        worker_port, port = resolve_port(cfg.worker_port, "--worker-port"), resolve_port(cfg.port, "--port")
    except OSError as e:
        print(f"bros serve: {e}", file=sys.stderr)
        return 1
    try:
        # Returning from inside the ExitStack stops the children (in reverse start order).
        with stop_on_signals(), ExitStack() as stack:
            try:
                run_stack(cfg, stack, run_dir, worker_port, port)
            except Stop as e:
                say(f"{e}: shutting down")
                return 0
            except LaunchFailed as e:
                report_failure(e)
                return 1
    except Stop:
        return 1  # a signal cut short the teardown after a failure


def run_stack(cfg: LaunchConfig, stack: ExitStack, run_dir: Path, worker_port: int, port: int) -> None:
    """Start everything, registering each stop on `stack` (unwound in reverse), then supervise."""
    redis_url = cfg.redis_url or start_redis(stack, run_dir, cfg.redis_appendfsync)
    worker_target = f"{HOST}:{worker_port}"
    worker = start_child(stack, "worker", worker_argv(cfg, worker_port), run_dir, cfg.grace_s)
    wait_serving(worker, worker_target, WORKER_SERVICE, cfg.worker_timeout_s)
    scheduler = start_child(stack, "scheduler", scheduler_argv(cfg, port, redis_url, worker_target), run_dir,
                            cfg.grace_s)
    wait_serving(scheduler, f"{HOST}:{port}", SCHEDULER_SERVICE, cfg.scheduler_timeout_s)
    say(ready_message(port))
    supervise([scheduler, worker])


def start_redis(stack: ExitStack, run_dir: Path, appendfsync: str = "everysec") -> str:
    from bros.redis_server import EmbeddedRedis  # only needed without --redis-url
    data_dir = run_dir / "redis"
    data_dir.mkdir(exist_ok=True)
    # AOF on: queued requests and finished results survive a restart of `bros serve`.
    redis = EmbeddedRedis(data_dir=str(data_dir), appendonly=True, appendfsync=appendfsync)
    try:
        stack.enter_context(redis)
    except RuntimeError as e:  # its message carries the server's log
        raise LaunchFailed(f"embedded Redis failed to start: {e}") from None
    stack.callback(say, "stopping embedded Redis")  # runs just before its stop (LIFO)
    say(f"started embedded Redis at {redis.url}, log: {redis.log_path}")
    return redis.url


def worker_argv(cfg: LaunchConfig, port: int) -> list[str]:
    argv = [sys.executable, "-m", "worker_svc", "--backend", cfg.backend, "--port", str(port),
            "--drain-grace-s", _drain_grace(cfg)]
    if cfg.model:
        argv += ["--model", cfg.model]
    return argv + list(cfg.worker_args)


def scheduler_argv(cfg: LaunchConfig, port: int, redis_url: str, worker_target: str) -> list[str]:
    argv = [sys.executable, "-m", "scheduler_svc", "--port", str(port), "--redis-url", redis_url,
            "--workers", worker_target, "--drain-grace-s", _drain_grace(cfg)]
    if cfg.policy:
        argv += ["--policy", cfg.policy]
    if cfg.auth_tokens_file:
        argv += ["--auth-tokens-file", cfg.auth_tokens_file]
    return argv + list(cfg.scheduler_args)


def _drain_grace(cfg: LaunchConfig) -> str:
    """Children drain within the launcher's SIGTERM-to-SIGKILL grace, with a margin."""
    return str(max(0.5, cfg.grace_s - 2.0))


def ready_message(port: int) -> str:
    target = "" if port == 50051 else f" --target {HOST}:{port}"
    return (f"bros serving bros.v1.Inference on {HOST}:{port}; try: "
            f"bros generate --class rt --chat{target} \"Hello!\"   (Ctrl-C stops)")


def report_failure(e: LaunchFailed) -> None:
    print(f"bros serve: {e}", file=sys.stderr)
    for line in e.details:
        print(f"  | {line}", file=sys.stderr)


def resolve_port(port: int, flag: str) -> int:
    """A free loopback port for 0; otherwise check `port` is free. A gRPC server binds with
    SO_REUSEPORT, so a second one would share a busy port silently instead of failing."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            raise OSError(f"port {port} is in use on {HOST}; choose another with {flag}") from None
        return s.getsockname()[1]


def say(msg: str) -> None:
    print(f"bros serve: {msg}", flush=True)
