"""bros.v1 protobuf <-> the engine's plain types (plan.py). Nothing else touches pb2."""
from __future__ import annotations

from bros.v1 import types_pb2, worker_pb2

from .block_allocator import SeqClass
from .plan import NewSeq, Plan, Report
from .sampler import SamplingConfig

_FINISH = {None: types_pb2.FINISH_REASON_UNSPECIFIED, "stop": types_pb2.STOP,
           "length": types_pb2.LENGTH, "abort": types_pb2.ABORT}


def sampling_from_pb(p: types_pb2.SamplingParams, default: SamplingConfig | None = None) -> SamplingConfig:
    """Unset temperature / top_p / top_k take the model's defaults (greedy if none)."""
    default = default or SamplingConfig(max_tokens=1, temperature=0.0)
    return SamplingConfig(
        max_tokens=p.max_tokens,
        temperature=p.temperature if p.HasField("temperature") else default.temperature,
        top_p=p.top_p if p.HasField("top_p") else default.top_p,
        top_k=p.top_k or default.top_k,
        seed=p.seed if p.HasField("seed") else None,
        stop_token_ids=tuple(p.stop_token_ids),
        stop=tuple(p.stop),
        ignore_eos=p.ignore_eos,
    )


def sampling_to_pb(s: SamplingConfig) -> types_pb2.SamplingParams:
    p = types_pb2.SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                                 top_k=s.top_k, stop_token_ids=s.stop_token_ids, stop=s.stop,
                                 ignore_eos=s.ignore_eos)
    if s.seed is not None:
        p.seed = s.seed
    return p


def plan_from_pb(p: worker_pb2.StepPlan, default_sampling: SamplingConfig | None = None) -> Plan:
    return Plan(
        plan_id=p.plan_id,
        new_sequences=[NewSeq(n.seq_id, _seq_class(n.service_class), list(n.prompt_token_ids),
                              sampling_from_pb(n.sampling, default_sampling), list(n.output_token_ids))
                       for n in p.new_sequences],
        scheduled=[(s.seq_id, s.num_tokens) for s in p.scheduled],
        preempt=list(p.preempt), checkpoint=list(p.checkpoint), restore=list(p.restore),
        recompute=list(p.recompute), free=list(p.free), list_resident=p.list_resident,
    )


def _seq_class(value: int) -> SeqClass | int:
    # Unknown values pass through as ints; the engine rejects them per item.
    return SeqClass(value) if value in (1, 2) else value


def report_to_pb(r: Report) -> worker_pb2.StepReport:
    t = r.timings
    return worker_pb2.StepReport(
        plan_id=r.plan_id,
        outputs=[worker_pb2.SequenceOutput(
            seq_id=o.seq_id, token_ids=o.token_ids, text=o.text, finished=o.finished,
            finish_reason=_FINISH[o.finish_reason], num_computed_tokens=o.num_computed_tokens,
            num_output_tokens=o.num_output_tokens) for o in r.outputs],
        errors=[worker_pb2.ItemError(seq_id=e.seq_id, field=e.field, message=e.message) for e in r.errors],
        occupancy=worker_pb2.PoolOccupancy(**r.occupancy),
        timings=worker_pb2.StepTimings(
            step_ms=t.step_ms, forward_ms=t.forward_ms, sample_ms=t.sample_ms, copy_ms=t.copy_ms,
            num_prefill_tokens=t.num_prefill_tokens, num_decode_tokens=t.num_decode_tokens, clock_ms=t.clock_ms),
        resident=[worker_pb2.ResidentSequence(
            seq_id=s.seq_id, service_class=int(s.seq_class), state=s.state,
            num_prompt_tokens=s.num_prompt_tokens, num_computed_tokens=s.num_computed_tokens,
            output_token_ids=s.output_token_ids, finished=s.finished,
            finish_reason=_FINISH[s.finish_reason]) for s in r.resident],
        recompute_needed=r.recompute_needed,
    )
