"""bros.v1.Worker over gRPC (asyncio): Describe, Tokenize, Step; health and reflection.

Thin: protobuf in, engine call, protobuf out. Steps run one at a time on a dedicated
thread so the event loop keeps answering health checks during a long forward pass.
One scheduler drives the worker at a time: a new Step stream takes over from an older
one (a restarted scheduler must not wait for a dead connection to time out). The engine
and its resident sequences outlive every stream.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from jinja2.exceptions import TemplateError

from bros.decode_guard import DecodeGuard
from bros import tls
from bros.telemetry import Telemetry
from bros.v1 import worker_pb2, worker_pb2_grpc

from .build import build_engine
from .config import WorkerConfig
from .engine import Engine
from .metrics import WorkerMetrics
from .plan import ItemError, Plan, Report
from .tracing import StepTracing
from .wire import plan_from_pb, report_to_pb, sampling_to_pb

log = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DRAIN_WAIT_FOR_SCHEDULER_S = 2.0
LIVENESS = "liveness"   # health entry that is SERVING while the process runs (k8s liveness)


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, cfg: WorkerConfig, health_servicer: health.HealthServicer):
        self.cfg = cfg
        self.health = health_servicer
        self.engine: Engine | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._active_stream = 0
        self._num_open_streams = 0
        self.draining = False   # SIGTERM: every report says so; the scheduler moves work off
        self._occupancy: dict[str, int] = {}  # after the last step, for Describe
        # Observability, set by serve() when enabled (None: off, one test per step).
        self.metrics: WorkerMetrics | None = None
        self.tracing: StepTracing | None = None

    # ---- startup --------------------------------------------------------------------

    async def load(self, clock=None) -> None:
        """Load the model and warm it up, then report SERVING."""
        loop = asyncio.get_running_loop()
        self.engine = await loop.run_in_executor(self._executor, build_engine, self.cfg, clock)
        if self.cfg.warmup:
            await loop.run_in_executor(self._executor, self._warmup)
        self._occupancy = self.engine.allocator.occupancy()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("worker %s serving %s (%s)", self.cfg.resolved_worker_id, self.engine.runner.model_name,
                 self.engine.runner.name)

    def _warmup(self) -> None:
        from .plan import NewSeq
        from .sampler import SamplingConfig
        from .block_allocator import SeqClass
        seq_id = "__warmup__"
        prompt = [min(5, self.engine.runner.vocab_size - 1)] * 8
        self.engine.step(Plan(new_sequences=[NewSeq(seq_id, SeqClass.RT, prompt, SamplingConfig(max_tokens=2,
                                                                                         temperature=0))],
                              scheduled=[(seq_id, len(prompt))]))
        self.engine.step(Plan(scheduled=[(seq_id, 1)]))
        self.engine.step(Plan(free=[seq_id]))

    # ---- RPCs ---------------------------------------------------------------------------

    async def Describe(self, request, context):
        engine = await self._ready_or_abort(context)
        r, lim = engine.runner, engine.limits
        return worker_pb2.WorkerInfo(
            worker_id=self.cfg.resolved_worker_id, model_name=r.model_name, backend=r.name,
            device=str(r.device), dtype=r.dtype_name,
            attention_backend=getattr(getattr(r, "attn", None), "name", "none"),
            vocab_size=r.vocab_size, max_model_len=engine.max_model_len, num_blocks=lim.num_blocks,
            block_size=lim.block_size, max_num_host_slots=lim.max_num_host_slots,
            max_num_batched_tokens=lim.max_num_batched_tokens, max_num_seqs=lim.max_num_seqs,
            eos_token_ids=r.eos_token_ids, kv_bytes_per_slot=r.kv_bytes_per_slot,
            default_sampling=sampling_to_pb(r.default_sampling),
            occupancy=worker_pb2.PoolOccupancy(**self._occupancy), integrity_error=engine.integrity_error,
            max_num_fused_tokens=r.max_num_fused_tokens)

    async def Tokenize(self, request, context):
        engine = await self._ready_or_abort(context)
        tok = getattr(engine.runner, "tokenizer", None)
        if tok is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the sim backend has no tokenizer")
        which = request.WhichOneof("input")
        # Messages start with the field at fault, like every other refusal.
        if which == "text":
            # Off the event loop: a long prompt must not stall health checks and Step reports.
            ids = await asyncio.to_thread(tok.encode, request.text)
        elif which == "chat":
            msgs = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            if not msgs:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "chat.messages: must not be empty")
            bad = next((i for i, m in enumerate(msgs) if m["role"] not in ("system", "user", "assistant")), None)
            if bad is not None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"chat.messages[{bad}].role: must be "
                                    f"system, user or assistant, got {msgs[bad]['role'][:32]!r}")
            try:
                ids = await asyncio.to_thread(tok.apply_chat_template, msgs, add_generation_prompt=True)
            except (ValueError, TemplateError) as e:  # no template, or it refuses these messages
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"chat.messages: {e}")
        else:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input: one of text or chat must be set")
        return worker_pb2.TokenizeResponse(token_ids=ids)

    async def Step(self, request_iterator, context):
        engine = await self._ready_or_abort(context)
        self._active_stream += 1
        my_stream = self._active_stream
        loop = asyncio.get_running_loop()
        self._num_open_streams += 1
        try:
            async for report_pb in self._steps(engine, request_iterator, context, my_stream, loop):
                yield report_pb
        finally:
            self._num_open_streams -= 1

    async def _steps(self, engine: Engine, request_iterator, context, my_stream: int, loop):
        async for plan_pb in request_iterator:
            if my_stream != self._active_stream:
                await context.abort(grpc.StatusCode.ABORTED, "another scheduler took over this worker")
            plan = plan_from_pb(plan_pb, engine.runner.default_sampling)
            started_ns = time.time_ns()
            report = await loop.run_in_executor(self._executor, self._safe_step, engine, plan,
                                                self.cfg.check_integrity)
            self._occupancy = report.occupancy
            if self.metrics is not None or self.tracing is not None:
                self._observe(engine, plan_pb, report, started_ns)
            report_pb = report_to_pb(report)
            report_pb.draining = self.draining
            yield report_pb

    async def drain(self, grace_s: float) -> None:
        """Until the scheduler has moved every sequence off (RT finished, BE requeued) or
        the grace time is up; without a scheduler attached, nobody will, so not long."""
        self.draining = True
        t0 = time.monotonic()
        while self.engine is not None and self.engine.seqs and time.monotonic() - t0 < grace_s:
            if not self._num_open_streams and time.monotonic() - t0 > DRAIN_WAIT_FOR_SCHEDULER_S:
                break
            await asyncio.sleep(0.05)
        left = len(self.engine.seqs) if self.engine is not None else 0
        log.info("drained in %.1f s, %d sequences left to the scheduler's recovery", time.monotonic() - t0, left)

    @staticmethod
    def _safe_step(engine: Engine, plan: Plan, check_integrity: bool = False) -> Report:
        """Input never crashes the worker: an unexpected failure fails this plan's items."""
        try:
            report = engine.step(plan)
        except Exception as e:  # noqa: BLE001 — a bug must not take the worker down
            log.exception("step %d failed", plan.plan_id)
            report = Report(plan_id=plan.plan_id, occupancy=engine.allocator.occupancy())
            report.errors = [ItemError(seq_id, "scheduled", f"step failed: {type(e).__name__}: {e}")
                             for seq_id, _ in plan.scheduled]
        if check_integrity and (violation := engine.audit()):
            log.error("step %d left the pool inconsistent: %s", plan.plan_id, violation)
            report.errors.append(ItemError("", "integrity", violation))
        return report

    def _observe(self, engine: Engine, plan_pb: worker_pb2.StepPlan, report: Report, started_ns: int) -> None:
        if self.metrics is not None:
            self.metrics.observe_step(engine, report)
        if self.tracing is not None:
            self.tracing.step(plan_pb, report, started_ns, time.time_ns())

    async def _ready_or_abort(self, context) -> Engine:
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is still loading its model")
        return self.engine


async def serve(cfg: WorkerConfig, clock=None, ready: asyncio.Event | None = None) -> None:
    try:  # before anything starts: a bad certificate flag is a one-line exit
        credentials = tls.server_credentials(cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_client_ca_file)
    except ValueError as e:
        raise SystemExit(f"worker: {e}") from None
    server = grpc.aio.server(interceptors=[DecodeGuard()],
                             options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    health_servicer = health.aio.HealthServicer()
    service = WorkerService(cfg, health_servicer)
    telemetry = start_telemetry(cfg, service)
    worker_pb2_grpc.add_WorkerServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    port = tls.bind(server, f"{cfg.host}:{cfg.port}", credentials)
    if credentials is not None:
        log.info("TLS on, client certificates %s", "required" if cfg.tls_client_ca_file else "not required")
    await server.start()
    log.info("worker listening on %s:%d (loading %s backend)", cfg.host, port, cfg.backend)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    await service.load(clock)
    if service.metrics is not None:
        service.metrics.observe_pool(service.engine.allocator.occupancy())
    if ready is not None:
        ready.set()
    await stop.wait()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await service.drain(cfg.drain_grace_s)
    await server.stop(grace=1)
    telemetry.close()  # after the server: the last steps' spans are exported too


def start_telemetry(cfg: WorkerConfig, service: WorkerService) -> Telemetry:
    """Tracing and /metrics as configured (both off by default)."""
    metrics = WorkerMetrics(cfg.resolved_worker_id) if cfg.metrics_port else None
    telemetry = Telemetry.start(cfg, metrics.registry if metrics is not None else None)
    tracer = telemetry.tracer("bros.worker")
    service.metrics = metrics
    service.tracing = StepTracing(tracer, cfg.resolved_worker_id) if tracer is not None else None
    return telemetry
