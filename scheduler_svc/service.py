"""bros.v1.Inference over gRPC (asyncio): validate, admit to Redis, stream from Redis.

Thin: any replica serves any request, because everything a stream needs is in Redis (the
request record and its token stream); the worker loops write there, this reads there.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING

import grpc
from redis.exceptions import RedisError

from bros.v1 import inference_pb2, inference_pb2_grpc, types_pb2, worker_pb2, worker_pb2_grpc

from .auth import caller
from .config import SchedulerConfig
from .policies import POLICIES
from .store import AdmissionBounds, QueuesFull, RequestRecord, Store, TargetInfeasible
from .stream_hub import StreamHub
from .validation import InvalidArgument, check_generate, check_length, check_lookup
from .worker_loop import WorkerLoop

if TYPE_CHECKING:
    from .metrics import SchedulerMetrics
    from .tracing import Admission, RpcTracing

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
_FINISH = {"stop": types_pb2.STOP, "length": types_pb2.LENGTH, "abort": types_pb2.ABORT,
           "timeout": types_pb2.TIMEOUT}
_STREAM_POLL_S = 1.0        # a waiting call re-reads this often even without a wake-up


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, cfg: SchedulerConfig, store: Store, loops: list[WorkerLoop], hub: StreamHub):
        self.cfg = cfg
        self.store = store
        self.loops = loops
        self.hub = hub
        self.draining = False   # SIGTERM: refuse new requests, keep serving streams
        self.closing = False    # after the drain: end every open stream (clients resume elsewhere)
        self._channels = {loop.address: loop.channel() for loop in loops}
        self._background: set[asyncio.Task] = set()
        # Observability, set by server.py when enabled (None: off, one test per call).
        self.tracing: RpcTracing | None = None
        self.metrics: SchedulerMetrics | None = None

    # ---- RPCs -------------------------------------------------------------------------------

    async def Generate(self, request, context):
        rpc = self.tracing.start_rpc("Generate", context) if self.tracing is not None else None
        rid, created = await self._admit_traced(request, context, False, rpc)
        attach = 1 if created else await self._unavailable_on_redis(self.store.attach(rid), context)
        completed = False
        try:
            async for msg in self._stream(rid, _resume_index(request), True, context):
                yield msg
            completed = True
        except grpc.aio.AbortError:
            raise  # ended by the server with UNAVAILABLE, "resume after index N": not the client leaving
        except BaseException:
            # Cancelled (CancelledError at an await, GeneratorExit at a yield; neither may
            # await any more, so the abort runs as its own task) or broken: the client may
            # come back for it within the grace, else the request goes too. Unless this
            # replica is shutting down: then the cut is ours and the client resumes
            # elsewhere, so the request lives on.
            if not self.draining:
                self._in_background(self._abort_if_abandoned(rid, attach))
            raise
        finally:
            if rpc is not None:  # the request's span ends with its stream
                self.tracing.end(rpc, **{"bros.stream_completed": completed})

    async def Submit(self, request, context):
        rpc = self.tracing.start_rpc("Submit", context) if self.tracing is not None else None
        rid, _ = await self._admit_traced(request, context, True, rpc)
        if rpc is not None:
            self.tracing.end(rpc)
        return inference_pb2.SubmitResponse(request_id=rid)

    async def Watch(self, request, context):
        await self._unavailable_on_redis(self._require_known(request, context), context)
        async for msg in self._stream(request.request_id, _resume_index(request), request.wait, context):
            yield msg

    async def Abort(self, request, context):
        await self._unavailable_on_redis(self._require_known(request, context), context)
        aborted = await self._unavailable_on_redis(self.store.request_abort(request.request_id), context)
        if aborted and self.metrics is not None:
            await self._count_queued_abort(request.request_id)
        return inference_pb2.AbortResponse(aborted=aborted)

    async def GetLoad(self, request, context):
        load = await self._unavailable_on_redis(self.store.load([loop.address for loop in self.loops]), context)
        report = inference_pb2.LoadReport()
        for cls in (types_pb2.REALTIME, types_pb2.BEST_EFFORT):
            c = load["classes"][cls]
            report.classes.add(service_class=cls, queued_requests=c.queued_requests,
                               queued_tokens=c.queued_tokens, running_requests=c.running_requests,
                               recent_finished=c.recent_finished, recent_ttft_attainment=c.recent_ttft_attainment,
                               recent_tpot_attainment=c.recent_tpot_attainment)
        fields = worker_pb2.PoolOccupancy.DESCRIPTOR.fields_by_name
        for loop in self.loops:
            w = load["workers"][loop.address]
            occ = worker_pb2.PoolOccupancy(**{k: int(v) for k, v in w.state.items() if k in fields})
            report.workers.add(worker_id=loop.address, leased_by=w.leased_by, reachable=loop.status.reachable,
                               occupancy=occ, running_sequences=int(w.state.get("running", 0)),
                               last_step_ms=float(w.state.get("last_step_ms", 0.0)))
        return report

    def close_streams(self) -> None:
        """Shutdown, after the drain: every open stream ends with UNAVAILABLE once it has
        sent what Redis holds (a finished request still gets its final result), so its
        client resumes on another replica instead of waiting out the server's stop."""
        self.closing = True
        self.hub.wake_all()

    # ---- admission ---------------------------------------------------------------------------

    async def _admit_traced(self, request, context, submitted: bool, rpc) -> tuple[str, bool]:
        """_admit (UNAVAILABLE while Redis is away), inside a bros.admit span when traced."""
        if rpc is None:
            return await self._unavailable_on_redis(self._admit(request, context, submitted), context)
        admission = self.tracing.start_admission(rpc)
        try:
            rid, created = await self._unavailable_on_redis(
                self._admit(request, context, submitted, admission), context)
        except BaseException as e:
            admission.fail(e)
            raise
        admission.end(rid, created)
        return rid, created

    async def _admit(self, request, context, submitted: bool, admission: Admission | None = None
                     ) -> tuple[str, bool]:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this scheduler replica is shutting down; retry")
        info = self._any_worker_info()
        if info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no worker is connected yet")
        try:
            check_generate(request, self.cfg, info.vocab_size, info.max_model_len)
            if request.request_id:
                existing = await self.store.get(request.request_id)
                if existing is not None:
                    await self._require_owner(existing, context)
                    return request.request_id, False
            prompt = await self._tokenize(request, context)
            limit, limit_name = self._context_limit(info, request.service_class)
            check_length(len(prompt), request.sampling.max_tokens, limit, request.WhichOneof("prompt"), limit_name)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        rec = self._record(request, prompt, submitted, info.default_sampling)
        rec.deadline_ms = self._deadline_ms(request, context, rec.arrival_ms, submitted)
        rec.owner = caller() or ""
        if admission is not None:  # stored with the record, in the same round trip
            rec.trace_context = admission.describe(rec)
        try:
            rid, created = await self.store.admit(rec, self._bounds(rec))
        except (QueuesFull, TargetInfeasible) as e:
            await self._refuse(context, rec, e)
        if not created:  # the same id was admitted meanwhile: it must be this caller's too
            await self._require_owner(await self.store.get(rid), context)
        return rid, created

    async def _tokenize(self, request, context) -> list[int]:
        which = request.WhichOneof("prompt")
        if which == "token_ids":
            return list(request.token_ids.ids)
        tok_req = (worker_pb2.TokenizeRequest(text=request.text) if which == "text"
                   else worker_pb2.TokenizeRequest(chat=request.chat))
        for loop in self.loops:
            if not loop.status.reachable:
                continue
            try:
                stub = worker_pb2_grpc.WorkerStub(self._channels[loop.address])
                ids = list((await stub.Tokenize(tok_req, timeout=10)).token_ids)
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED):
                    # UNIMPLEMENTED: a sim worker has no tokenizer; the caller must send ids.
                    raise InvalidArgument(which, e.details()) from None
                continue
            if not ids:
                raise InvalidArgument(which, "tokenizes to nothing")
            return ids
        await context.abort(grpc.StatusCode.UNAVAILABLE, "no worker can tokenize text now")

    def _record(self, request, prompt: list[int], submitted: bool,
                default: types_pb2.SamplingParams) -> RequestRecord:
        rt = request.service_class == types_pb2.REALTIME
        sampling = types_pb2.SamplingParams()
        sampling.CopyFrom(request.sampling)
        # Unset fields become the model's recommendation now, so every worker samples alike.
        if not sampling.HasField("temperature"):
            sampling.temperature = default.temperature if default.HasField("temperature") else 0.0
        if not sampling.HasField("top_p"):
            sampling.top_p = default.top_p if default.HasField("top_p") else 1.0
        sampling.top_k = sampling.top_k or default.top_k
        return RequestRecord(
            request_id=request.request_id or uuid.uuid4().hex, service_class=request.service_class,
            prompt_token_ids=prompt, sampling=sampling.SerializeToString(),
            ttft_ms=float(request.ttft_ms or (self.cfg.rt_ttft_ms if rt else self.cfg.be_ttft_ms)),
            tpot_ms=float(request.tpot_ms or (self.cfg.rt_tpot_ms if rt else 0.0)),
            arrival_ms=time.time() * 1e3, submitted=submitted, state="queued", worker_id="",
            num_output_tokens=0, first_scheduled_ms=None, first_token_ms=None, last_token_ms=None,
            finished_ms=None, finish_reason="", error="",
            num_attaches=0 if submitted else 1)  # a Generate's own stream is its first

    def _bounds(self, rec: RequestRecord) -> AdmissionBounds:
        share = 1.0 if rec.service_class == types_pb2.REALTIME else self.cfg.be_queue_share
        tokens = late_after = None
        if rec.service_class == types_pb2.REALTIME:
            # Infeasible: more RT prompt tokens queued than the connected workers prefill
            # before this one's deadline at their measured rates (no check until measured),
            # or RT already queued past its own TTFT deadline (RT is behind, whatever the
            # limit: seats, memory or prefill).
            loops = [loop for loop in self.loops if loop.status.connected]
            if loops and all(loop.prefill_tokens_per_ms > 0 for loop in loops):
                tokens = rec.ttft_ms * sum(loop.prefill_tokens_per_ms for loop in loops)
            late_after = rec.arrival_ms
        return AdmissionBounds(max_queued_requests=max(1, int(self.cfg.max_queued_requests * share)),
                               max_queued_tokens=max(1, int(self.cfg.max_queued_tokens * share)),
                               rt_token_budget=tokens, rt_late_after_ms=late_after,
                               flag_infeasible=self.cfg.rt_infeasible == "flag")

    async def _refuse(self, context, rec: RequestRecord, why: Exception) -> None:
        """RESOURCE_EXHAUSTED with a retry hint: in the message, as `retry-after-ms`, and as
        gRPC's own `grpc-retry-pushback-ms`, which gRPC clients with a retry policy obey."""
        hint = str(self.cfg.retry_after_ms)
        context.set_trailing_metadata((("retry-after-ms", hint), ("grpc-retry-pushback-ms", hint)))
        cls = "RT" if rec.service_class == types_pb2.REALTIME else "BE"
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"service_class: {cls} request refused, {why}; retry after {hint} ms")

    def _deadline_ms(self, request, context, arrival_ms: float, submitted: bool) -> float | None:
        """The request's own timeout, else the configured default; a Generate also ends with
        its call's deadline (which outlives this replica: the sweep is in Redis)."""
        timeout_ms = request.timeout_ms or self.cfg.default_timeout_ms
        candidates = [arrival_ms + timeout_ms] if timeout_ms else []
        remaining_s = None if submitted else context.time_remaining()
        if remaining_s is not None:
            candidates.append(arrival_ms + remaining_s * 1e3)
        return min(candidates) if candidates else None

    def _context_limit(self, info: worker_pb2.WorkerInfo, service_class: int) -> tuple[int, str]:
        """The most tokens a request may span. A policy that runs each prompt whole
        (bros-no-chunking) can never run one over the step budget, nor re-run a
        recomputed sequence over it, so the budget caps it too (vLLM refuses such a
        configuration outright). One that fences each class into a share of the pool
        (partition) can never run one over its class's share, on the smallest worker."""
        policy = POLICIES[self.cfg.policy]
        budget = self.cfg.max_num_batched_tokens
        if not getattr(policy, "chunked", True) and budget < info.max_model_len:
            return budget, f"max_num_batched_tokens (--policy {self.cfg.policy} runs each prompt whole)"
        per_class = getattr(policy, "max_request_tokens", None)
        if per_class is not None:
            share = min(per_class(service_class, i.num_blocks, i.block_size, self.cfg)
                        for i in (loop.info for loop in self.loops) if i is not None)
            if share < info.max_model_len:
                cls = "RT" if service_class == types_pb2.REALTIME else "BE"
                return share, f"the {cls} share of the KV pool (--policy {self.cfg.policy})"
        return info.max_model_len, "max_model_len"

    def _any_worker_info(self) -> worker_pb2.WorkerInfo | None:
        infos = [loop.info for loop in self.loops if loop.info is not None]
        if not infos:
            return None
        # Admission must fit every worker the request may land on.
        smallest = min(infos, key=lambda i: i.max_model_len)
        return smallest

    # ---- streaming ----------------------------------------------------------------------------

    async def _stream(self, rid: str, after_index: int, wait: bool, context):
        """Token chunks after after_index, then the final result; exactly once, in order."""
        wake = await self.hub.register(rid, after_index) if wait else None
        try:
            while True:
                if wake is not None:
                    wake.clear()  # before the read: whatever lands after it wakes us
                entries = await self._outlasting_redis(lambda: self.store.read_stream(rid, after_index),
                                                       context, after_index)
                tokens = [e for e in entries if not e.final]
                if tokens:
                    yield inference_pb2.GenerateResponse(request_id=rid, chunk=inference_pb2.TokenChunk(
                        index=tokens[0].index, token_ids=[e.token_id for e in tokens],
                        text="".join(e.text for e in tokens)))
                    after_index = tokens[-1].index
                if any(e.final for e in entries):
                    final = await self._outlasting_redis(lambda: self._final(rid), context, after_index)
                    yield inference_pb2.GenerateResponse(request_id=rid, final=final)
                    return
                if wake is None:
                    if not tokens:
                        return
                    continue
                if self.closing:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "this scheduler replica is shutting "
                                        f"down; resume after index {after_index} on another replica")
                try:
                    await asyncio.wait_for(wake.wait(), _STREAM_POLL_S)
                except TimeoutError:
                    pass
        finally:
            if wake is not None:
                self.hub.unregister(rid, wake)

    async def _outlasting_redis(self, read, context, after_index: int):
        """A stream rides out a Redis restart: retry with backoff for redis_retry_s, then
        UNAVAILABLE (the client resumes after the last index it saw)."""
        try:
            return await self._retrying_redis(read)
        except RedisError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"state store unavailable ({type(e).__name__}); resume after index {after_index}")

    async def _retrying_redis(self, call):
        """await call() until Redis answers, with backoff, for up to redis_retry_s; then
        the last RedisError."""
        deadline = time.monotonic() + self.cfg.redis_retry_s
        delay = 0.1
        while True:
            try:
                return await call()
            except RedisError:
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    @staticmethod
    async def _unavailable_on_redis(call, context):
        """Nothing is accepted while Redis is away: UNAVAILABLE, which clients retry."""
        try:
            return await call
        except RedisError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"state store unavailable ({type(e).__name__})")

    async def _final(self, rid: str) -> inference_pb2.FinalResult:
        rec = await self.store.get(rid)
        n = rec.num_output_tokens
        ttft = (rec.first_token_ms - rec.arrival_ms) if rec.first_token_ms else 0.0
        tpot = (rec.last_token_ms - rec.first_token_ms) / (n - 1) if n > 1 and rec.first_token_ms else 0.0
        queue = (rec.first_scheduled_ms - rec.arrival_ms) if rec.first_scheduled_ms else 0.0
        rt = rec.service_class == types_pb2.REALTIME
        return inference_pb2.FinalResult(
            finish_reason=_FINISH.get(rec.finish_reason, types_pb2.FINISH_REASON_UNSPECIFIED),
            num_prompt_tokens=len(rec.prompt_token_ids), num_output_tokens=n, queue_ms=queue, ttft_ms=ttft,
            tpot_ms=tpot, ttft_met=rt and rec.first_token_ms is not None and ttft <= rec.ttft_ms,
            tpot_met=rt and tpot <= rec.tpot_ms, error=rec.error, ttft_flagged=rec.ttft_flagged)

    def _in_background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort_if_abandoned(self, rid: str, attach: int) -> None:
        """A Generate stream that ended early, the attach-th to its request: after
        resume_grace_s the request is aborted unless a Generate has resumed it since or it
        was Submitted. A Watch only looks on: it keeps nothing alive. With Redis away when
        the grace ends, retried with backoff for redis_retry_s (as streams wait for it).
        Lost if this replica exits first, or Redis stays away longer: the request then
        runs to its end (or its deadline)."""
        if self.cfg.resume_grace_s > 0:
            await asyncio.sleep(self.cfg.resume_grace_s)
        try:
            aborted = await self._retrying_redis(lambda: self.store.abort_abandoned(rid, attach))
            if aborted and self.metrics is not None:
                await self._count_queued_abort(rid)
        except RedisError as e:  # the request runs on; its deadline (if any) still ends it
            log.warning("abort of %s after its client left: %s", rid, e)

    async def _count_queued_abort(self, rid: str) -> None:
        """An abort that finished a queued request at once is counted here (one running on
        a worker is counted by its loop): finished and never claimed since (no worker)."""
        rec = await self.store.get(rid)
        if rec is not None and rec.state == "finished" and not rec.worker_id:
            self.metrics.aborted_in_queue(rec.service_class)

    async def _require_known(self, request, context) -> None:
        rid = request.request_id
        try:
            check_lookup(request, self.cfg)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        rec = await self.store.get(rid)
        if rec is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request_id {rid!r} not found")
        await self._require_owner(rec, context)

    @staticmethod
    async def _require_owner(rec: RequestRecord | None, context) -> None:
        """With tokens on, a request is its sender's alone: no other token may Watch,
        Abort or re-Generate it (docs/reliability.md#access)."""
        who = caller()
        if who is not None and rec is not None and rec.owner != who:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"request_id {rec.request_id!r} belongs to another token")


def _resume_index(request) -> int:
    return request.resume_from_index if request.HasField("resume_from_index") else -1
