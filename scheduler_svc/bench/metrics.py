"""What a benchmark run measured, and the metrics PAPER.md defines over it. Pure.

    TTFT    = first token time - arrival
    TPOT    = (end-to-end latency - TTFT) / (output tokens - 1)
    attain  = share of RT requests that met the target (TTFT, TPOT, both); a request that
              never finished (or never got its first token) is a miss
    norm    = mean over finished RT requests of end-to-end latency / output tokens
    tok/s   = output (generated) tokens per second of makespan, makespan being the first
              arrival to the last finish

Percentiles interpolate linearly between order statistics (numpy's default) and cover
the requests that have the value: unfinished ones are in `rt_unfinished`, not in p99.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from scheduler_svc.planner import BE, RT

from .workload import Request


@dataclass
class RequestRecord:
    """One request's fate in a run: times in virtual ms from the start of the run."""
    request: Request
    first_token_ms: float | None = None
    finish_ms: float | None = None
    num_output_tokens: int = 0
    error: str | None = None        # the worker refused it; it never ran

    @property
    def finished(self) -> bool:
        return self.finish_ms is not None

    def ttft_ms(self) -> float | None:
        if self.first_token_ms is None:
            return None
        return self.first_token_ms - self.request.arrival_ms

    def tpot_ms(self) -> float | None:
        """None until finished; 0 for a one-token output (no gap to average)."""
        if self.finish_ms is None or self.first_token_ms is None:
            return None
        if self.num_output_tokens < 2:
            return 0.0
        return (self.finish_ms - self.first_token_ms) / (self.num_output_tokens - 1)

    def ttft_met(self) -> bool:
        ttft = self.ttft_ms()
        return ttft is not None and ttft <= self.request.ttft_ms

    def tpot_met(self) -> bool:
        tpot = self.tpot_ms()
        return tpot is not None and tpot <= self.request.tpot_ms


@dataclass(frozen=True)
class IterationRecord:
    start_ms: float       # virtual clock when the step began
    step_ms: float        # virtual time the step took (forward pass and KV copies)
    batch_size: int       # sequences that ran
    num_tokens: int       # tokens computed (prefill chunks + decodes)
    planner_ms: float     # wall time of policy.plan
    preemptions: int      # preempt + checkpoint + recompute entries in the plan


@dataclass(frozen=True)
class BenchMetrics:
    rt_ttft_p50_ms: float
    rt_ttft_p99_ms: float
    rt_tpot_p50_ms: float
    rt_tpot_p99_ms: float
    rt_attain_ttft: float
    rt_attain_tpot: float
    rt_attain_both: float
    rt_norm_latency_ms: float
    be_req_s: float
    be_tok_s: float
    total_tok_s: float
    preemptions: int | None           # live: the worker loops' own counts (live.with_steps)
    mean_batch_size: float
    planner_p50_ms: float
    planner_p99_ms: float
    # Context for reading the numbers above.
    num_rt: int
    num_be: int
    rt_unfinished: int
    be_unfinished: int
    makespan_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between order statistics; NaN if empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else math.nan


def makespan_ms(records: list[RequestRecord]) -> float:
    finishes = [r.finish_ms for r in records if r.finish_ms is not None]
    if not finishes:
        return 0.0
    return max(finishes) - min(r.request.arrival_ms for r in records)


def busy_fraction(records: list[RequestRecord]) -> float:
    """The share of the makespan during which some request was in the system (arrived,
    not finished; an unfinished one counts to the end). A continuously batching worker
    runs a step whenever one is, so this is how busy a load keeps it, measured the same
    way live and in virtual time, from the requests alone."""
    span_ms = makespan_ms(records)
    if not span_ms:
        return 0.0
    end = min(r.request.arrival_ms for r in records) + span_ms
    busy_ms, run_start, run_end = 0.0, None, None
    for start, finish in sorted((r.request.arrival_ms, end if r.finish_ms is None else r.finish_ms)
                                for r in records):
        if run_end is None or start > run_end:   # a gap: the last busy run ended
            busy_ms += 0.0 if run_end is None else run_end - run_start
            run_start, run_end = start, finish
        else:
            run_end = max(run_end, finish)
    return (busy_ms + run_end - run_start) / span_ms


def compute(records: list[RequestRecord], iterations: list[IterationRecord]) -> BenchMetrics:
    rt = [r for r in records if r.request.service_class == RT]
    be = [r for r in records if r.request.service_class == BE]
    ttfts = [t for t in (r.ttft_ms() for r in rt) if t is not None]
    # A one-token output has no TPOT to rank (it meets its target by definition).
    tpots = [r.tpot_ms() for r in rt if r.finished and r.num_output_tokens >= 2]
    span_s = makespan_ms(records) / 1e3
    be_done = [r for r in be if r.finished]
    ran = [it for it in iterations if it.batch_size]
    planner = [it.planner_ms for it in iterations]
    return BenchMetrics(
        rt_ttft_p50_ms=percentile(ttfts, 50), rt_ttft_p99_ms=percentile(ttfts, 99),
        rt_tpot_p50_ms=percentile(tpots, 50), rt_tpot_p99_ms=percentile(tpots, 99),
        rt_attain_ttft=_share([r.ttft_met() for r in rt]),
        rt_attain_tpot=_share([r.tpot_met() for r in rt]),
        rt_attain_both=_share([r.ttft_met() and r.tpot_met() for r in rt]),
        rt_norm_latency_ms=_mean([(r.finish_ms - r.request.arrival_ms) / r.num_output_tokens
                                  for r in rt if r.finished and r.num_output_tokens]),
        be_req_s=len(be_done) / span_s if span_s else 0.0,
        be_tok_s=sum(r.num_output_tokens for r in be) / span_s if span_s else 0.0,
        total_tok_s=sum(r.num_output_tokens for r in records) / span_s if span_s else 0.0,
        preemptions=sum(it.preemptions for it in iterations),
        mean_batch_size=_mean([it.batch_size for it in ran]),
        planner_p50_ms=percentile(planner, 50), planner_p99_ms=percentile(planner, 99),
        num_rt=len(rt), num_be=len(be),
        rt_unfinished=sum(not r.finished for r in rt), be_unfinished=sum(not r.finished for r in be),
        makespan_s=span_s,
    )


def json_safe(obj):
    """obj with every non-finite float as None: JSON has no NaN, and an undefined metric
    (e.g. no RT request finished) is null, not 0."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def mean_of_runs(runs: list[dict]) -> dict:
    """The mean of each numeric field over several seeds' runs (None where no run has
    it); the other fields are left out, each run keeps its own under "runs"."""
    keys = [k for k, v in runs[0].items()
            if k != "seed" and (v is None or isinstance(v, (int, float)) and not isinstance(v, bool))]
    return {k: statistics.fmean(vals) if (vals := [r[k] for r in runs if r.get(k) is not None]) else None
            for k in keys}
