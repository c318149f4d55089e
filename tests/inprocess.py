"""A sim worker and a one-loop scheduler on an event loop in a thread of the test process,
over real gRPC and a real Redis: for tests that reach into the loop (tracers, hooks)."""
from __future__ import annotations

import asyncio
import threading
import uuid

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health

from bros.v1 import inference_pb2_grpc, worker_pb2_grpc
from scheduler_svc import round_trips
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.planner import PlannerConfig, make_policy
from scheduler_svc.server import attach_observability
from scheduler_svc.service import InferenceService
from scheduler_svc.store import Store
from scheduler_svc.stream_hub import StreamHub
from scheduler_svc.worker_loop import WorkerLoop
from stack import free_port
from worker_svc.config import WorkerConfig
from worker_svc.service import WorkerService
from worker_svc.tracing import StepTracing


class InProcessStack:
    """tracer=None leaves that side untraced; the loop runs `policy` with a step budget of
    `chunk_budget` tokens and max_num_seqs sequences over a pool of num_blocks blocks,
    planning pipeline_depth plans ahead of the worker's reports."""

    def __init__(self, redis_url: str, scheduler_tracer=None, worker_tracer=None, policy: str = "fcfs",
                 chunk_budget: int = 16, max_num_seqs: int = 8, num_blocks: int = 64, pipeline_depth: int = 0):
        self.redis_url = redis_url
        self.scheduler_tracer, self.worker_tracer = scheduler_tracer, worker_tracer
        self.policy, self.chunk_budget, self.max_num_seqs, self.num_blocks = policy, chunk_budget, max_num_seqs, num_blocks
        self.pipeline_depth = pipeline_depth
        self.prefix = f"t{uuid.uuid4().hex[:8]}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "InProcessStack":
        self.thread.start()
        self.call(self._start())
        return self

    def __exit__(self, *exc) -> None:
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def call(self, coro, timeout: float = 60):
        """Run a coroutine on the stack's event loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        wcfg = WorkerConfig(backend="sim", port=free_port(), num_blocks=self.num_blocks, warmup=False)
        self.worker = WorkerService(wcfg, health.aio.HealthServicer())
        if self.worker_tracer is not None:
            self.worker.tracing = StepTracing(self.worker_tracer, wcfg.resolved_worker_id)
        self.worker_server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServicer_to_server(self.worker, self.worker_server)
        self.worker_address = f"127.0.0.1:{self.worker_server.add_insecure_port(f'127.0.0.1:{wcfg.port}')}"
        await self.worker_server.start()
        await self.worker.load()

        cfg = SchedulerConfig(redis_url=self.redis_url, workers=(self.worker_address,), key_prefix=self.prefix,
                              max_num_batched_tokens=self.chunk_budget, policy=self.policy)
        self.redis = aioredis.from_url(self.redis_url)
        round_trips.install(self.redis)   # as server.py does
        self.store = Store(self.redis, prefix=self.prefix)
        replica = f"replica-{self.prefix}"
        self.worker_loop = WorkerLoop(self.worker_address, self.store, make_policy(self.policy),
                                      PlannerConfig(max_num_seqs=self.max_num_seqs,
                                                    max_num_batched_tokens=self.chunk_budget), replica,
                                      pipeline_depth=self.pipeline_depth)
        self.hub = StreamHub(self.redis, self.store.keys, replica)
        self.hub.start()
        self.service = InferenceService(cfg, self.store, [self.worker_loop], self.hub)
        attach_observability(self.store, [self.worker_loop], self.service, self.scheduler_tracer, None)
        self.server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServicer_to_server(self.service, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()
        self.task = asyncio.get_running_loop().create_task(self.worker_loop.run())
        while not self.worker_loop.status.connected:
            await asyncio.sleep(0.01)

    async def _stop(self) -> None:
        await self.worker_loop.stop()
        self.task.cancel()
        await self.server.stop(0)
        await self.hub.close()
        await self.redis.aclose()
        await self.worker_server.stop(0)

    def record(self, request_id: str):
        return self.call(self.store.get(request_id))
