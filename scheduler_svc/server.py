"""Process assembly: Redis client, one WorkerLoop per worker, the Inference service,
health (SERVING only while Redis answers and a worker is connected), reflection."""
from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from opentelemetry.trace import Tracer

from bros import tls
from bros.telemetry import Telemetry
from bros.decode_guard import DecodeGuard
from bros.v1 import inference_pb2_grpc

from .access import check_redis_credentials, load_access
from .config import SchedulerConfig
from .metrics import SchedulerMetrics
from .step_log import StepLog
from . import round_trips
from .placement import BOARD_FIELDS, RoomBoard, sync_board
from .planner import make_policy
from .service import SERVICE_NAME, InferenceService
from .store import Store
from .stream_hub import StreamHub
from .tracing import LoopTracing, RpcTracing
from .worker_loop import WorkerLoop

log = logging.getLogger(__name__)
LIVENESS = "liveness"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


async def serve(cfg: SchedulerConfig, ready: asyncio.Event | None = None) -> None:
    try:  # every credential file is read now: a bad one is a one-line exit naming its flag
        access = load_access(cfg)
        client = aioredis.from_url(cfg.redis_url, **access.redis_options)
        round_trips.install(client)
        await check_redis_credentials(client, cfg)
    except ValueError as e:
        raise SystemExit(f"scheduler: {e}") from None
    try:
        step_log = StepLog(cfg.step_log) if cfg.step_log else None
    except OSError as e:
        raise SystemExit(f"scheduler: --step-log {cfg.step_log}: {e.strerror}") from None
    store = Store(client, prefix=cfg.key_prefix, result_ttl_s=cfg.result_ttl_s)
    planner_cfg = cfg.planner_config()
    board = RoomBoard(tolerance=cfg.placement_tolerance)
    loops = [WorkerLoop(addr, store, make_policy(cfg.policy), planner_cfg, cfg.resolved_replica_id,
                        lease_ttl_ms=cfg.lease_ttl_ms, board=board, step_timeout_ms=cfg.step_timeout_ms,
                        requeue_after_ms=cfg.worker_requeue_after_ms,
                        credentials=access.worker_credentials, pipeline_depth=cfg.pipeline_depth)
             for addr in cfg.workers]
    server = grpc.aio.server(interceptors=[*access.interceptors, DecodeGuard()],
                             options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    hub = StreamHub(client, store.keys, cfg.resolved_replica_id)
    hub.start()
    service = InferenceService(cfg, store, loops, hub)
    inference_pb2_grpc.add_InferenceServicer_to_server(service, server)
    telemetry = start_telemetry(cfg, store, loops, service)
    for loop in loops:
        loop.step_log = step_log
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    await _set_health(health_servicer, False)
    # Liveness (k8s): SERVING while the process runs, whatever Redis or the workers do, so
    # an outage elsewhere never gets schedulers restarted.
    await health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    port = tls.bind(server, f"{cfg.host}:{cfg.port}", access.server_credentials)
    await server.start()
    log.info("scheduler %s on %s:%d, workers %s, policy %s", cfg.resolved_replica_id, cfg.host, port,
             ",".join(cfg.workers), cfg.policy)
    tasks = [asyncio.create_task(loop.run(), name=f"loop {loop.address}") for loop in loops]
    tasks.append(asyncio.create_task(
        sync_board(board, lambda: store.worker_fields(BOARD_FIELDS, cfg.lease_ttl_ms), cfg.placement_refresh_ms / 1e3),
        name="placement board"))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    watcher = asyncio.create_task(_watch_health(health_servicer, client, loops, ready))
    await stop.wait()
    watcher.cancel()
    await _drain(cfg, service, health_servicer, loops)
    for loop in loops:
        await loop.stop()
    for t in tasks:
        t.cancel()
    service.close_streams()
    await server.stop(grace=1)
    telemetry.close()  # after the server: spans of the last calls are exported too
    if step_log is not None:
        step_log.close()
    await hub.close()
    await client.aclose()


def start_telemetry(cfg: SchedulerConfig, store: Store, loops: list[WorkerLoop],
                    service: InferenceService) -> Telemetry:
    """Tracing and /metrics as configured (both off by default)."""
    metrics = SchedulerMetrics() if cfg.metrics_port else None
    telemetry = Telemetry.start(cfg, metrics.registry if metrics is not None else None)
    attach_observability(store, loops, service, telemetry.tracer("bros.scheduler"), metrics)
    return telemetry


def attach_observability(store: Store, loops: list[WorkerLoop], service: InferenceService,
                         tracer: Tracer | None, metrics: SchedulerMetrics | None) -> None:
    """Give the loops and the service their tracer and metrics (None: that one stays off)."""
    if metrics is not None:
        metrics.watch(asyncio.get_running_loop(), store, loops)
    for loop in loops:
        loop.metrics = metrics
        loop.tracing = LoopTracing(tracer, loop.address) if tracer is not None else None
    service.metrics = metrics
    service.tracing = RpcTracing(tracer) if tracer is not None else None


async def _drain(cfg: SchedulerConfig, service: InferenceService, health_servicer, loops: list[WorkerLoop]) -> None:
    """SIGTERM: NOT_SERVING and no admissions (clients retry another replica), BE handed
    back to the queues, in-flight RT finished, all within drain_grace_s; whatever is left
    then is recovered by the replica that takes the leases."""
    service.draining = True
    await _set_health(health_servicer, False)
    t0 = time.monotonic()
    for loop in loops:
        loop.begin_drain()
    try:
        await asyncio.wait_for(asyncio.gather(*(loop.drained.wait() for loop in loops)), cfg.drain_grace_s)
    except TimeoutError:
        log.warning("drain: grace time %.0f s up with work left", cfg.drain_grace_s)
    log.info("drained in %.1f s", time.monotonic() - t0)


async def _watch_health(health_servicer, client, loops: list[WorkerLoop], ready: asyncio.Event | None) -> None:
    serving = None
    while True:
        try:
            redis_ok = bool(await client.ping())
        except Exception:  # noqa: BLE001 — any failure means Redis is away
            redis_ok = False
        now = redis_ok and any(loop.status.reachable for loop in loops)
        if now != serving:
            await _set_health(health_servicer, now)
            serving = now
            if now and ready is not None:
                ready.set()
        await asyncio.sleep(0.2)


async def _set_health(health_servicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
