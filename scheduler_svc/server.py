"""Process assembly: Redis client, one WorkerLoop per worker, the Inference service,
health (SERVING only while Redis answers and a worker is connected), reflection."""
from __future__ import annotations

import asyncio
import logging
import signal

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bros.v1 import inference_pb2_grpc

from .config import SchedulerConfig
from .placement import RoomBoard
from .planner import PlannerConfig, make_policy
from .service import SERVICE_NAME, InferenceService
from .store import Store
from .worker_loop import WorkerLoop

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


async def serve(cfg: SchedulerConfig, ready: asyncio.Event | None = None) -> None:
    client = aioredis.from_url(cfg.redis_url)
    store = Store(client, prefix=cfg.key_prefix, result_ttl_s=cfg.result_ttl_s)
    planner_cfg = PlannerConfig(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens)
    board = RoomBoard()
    loops = [WorkerLoop(addr, store, make_policy(cfg.policy), planner_cfg, cfg.resolved_replica_id,
                        lease_ttl_ms=cfg.lease_ttl_ms, board=board) for addr in cfg.workers]
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceService(cfg, store, loops), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    await _set_health(health_servicer, False)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    await server.start()
    log.info("scheduler %s on %s:%d, workers %s, policy %s", cfg.resolved_replica_id, cfg.host, port,
             ",".join(cfg.workers), cfg.policy)
    tasks = [asyncio.create_task(loop.run(), name=f"loop {loop.address}") for loop in loops]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    watcher = asyncio.create_task(_watch_health(health_servicer, client, loops, ready))
    await stop.wait()
    await _set_health(health_servicer, False)
    for loop in loops:
        await loop.stop()
    for t in tasks + [watcher]:
        t.cancel()
    await server.stop(grace=5)
    await client.aclose()


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
