"""The cpu-hybrid scenario: the torch worker with the default model on this CPU, live,
and its virtual replica.

The sim-paper setting shrunk to what this CPU serves: lengths are the Azure conversation
trace's (RT) and the paper's synthetic BE, divided by LENGTH_SCALE, and so is every
token-valued knob (the step budget 2048 -> 256; bros' AIMD floor and step, its
admission headroom), so a CPU
step holds the same share of a request as a GPU step of the original sizes. BE arrives
as a Poisson stream at BE_RATE, which alone keeps this 2-core CPU 75-85% busy (the
paper's BE load, read as busy time; each run measures and reports it, measure_be_alone;
the sim scenarios read it as 80% of estimated throughput, which here would overload the
CPU); RT at each of the RT rates (req/s; RT_RATES, or --rt-rates) from the trace's
arrival gaps. The RT targets come from a measured RT-only run at RT_RATE, the first seed's:
by default TARGET_FACTOR x its p50 TTFT and TPOT, so "meeting the target" means "as good
as alone, within a factor", whatever machine this runs on (`--targets-from p99`: its p99
TTFT and TPOT instead, where the paper's targets sit on its own setting; TARGET_RULES);
every rate is judged against the same targets, as a deployment's SLOs do not move with
its load. Each policy serves the same
workload once per seed and rate; the table shows the mean over seeds, the JSON each run
as well. Each seed's RT requests are also served alone against those targets (the "RT
alone" row, point["rt_alone"]): against ~2x its own median, RT alone misses some of them
too, and no policy that also serves BE can be expected to do better.

`live` runs the real stack (Redis, scheduler, the torch worker; ~2 minutes per policy
and seed). `virtual` (scenario cpu-hybrid-virtual) replays the same workloads through
the same planner on the sim worker with this CPU's step costs (the `smollm2_cpu` cost
preset on AVX-512 CPUs, `smollm2_cpu_avx2` on others; --sim-cost names another) and the
live pool's size, in virtual time: a dozen seeds in seconds, so policy differences can
be told from the few-dozen-request noise of a live seed. It is a model of the live run,
checked against it (docs/benchmarks.md), not a replacement.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from worker_svc.config import MB, WorkerConfig
from worker_svc.kv_cache import kv_bytes_per_slot, num_blocks_for_budget
from worker_svc.model.cpu_decode import isa_flags

from ..planner import BE, RT, PlannerConfig, make_policy
from . import virtual, workload
from .criteria import check, format_rows
from .live import replay_live, with_steps
from .metrics import BenchMetrics, busy_fraction, compute, json_safe, mean_of_runs
from .plots import plot_ttft_cdf, plot_vs_rate, ready

LENGTH_SCALE = 8
TARGET_FACTOR = 2.0
# The RT targets from the RT-only run's metrics. "p99": sim-paper's 250 / 100 ms sit at
# q 0.987-1.000 of its own RT-alone TTFT and above every RT-alone TPOT (seeds 0-4, 0.1-0.2
# of capacity), so this is that setting's reading here (docs/benchmarks.md, "Which targets").
TARGET_RULES = {
    "2x-p50": lambda m: (TARGET_FACTOR * m.rt_ttft_p50_ms, TARGET_FACTOR * m.rt_tpot_p50_ms),
    "p99": lambda m: (m.rt_ttft_p99_ms, m.rt_tpot_p99_ms),
}
TARGET_RULE_NAMES = {"2x-p50": f"{TARGET_FACTOR:g}x the RT-alone p50", "p99": "the RT-alone p99"}
RT_RATE = 0.5          # req/s: the rate the targets are measured at, and the live default
# The RT rates a run sweeps unless told (--rt-rates): live, the one (~35 minutes for four
# seeds and four policies); the replica's seconds allow the attainment-against-rate curve.
RT_RATES = {"live": (RT_RATE,), "virtual": (0.25, RT_RATE, 0.75, 1.0)}
# req/s. How busy BE alone keeps the worker (busy_fraction) at 3.0 req/s: live, seed 0,
# 77-85% over three runs on 2-core AVX-512 CPUs (83%, 90% and 97% on a 2-core AVX2 one);
# the replica's mean over seeds 0-11, 75% (68-80% by seed: 90 s of Poisson arrivals
# vary; 82% before prompt steps moved to the C++ GEMM, 3f09cd8).
# docs/benchmarks.md, "cpu-hybrid's BE load". This was 1.5 (~55% busy) until measured.
BE_RATE = 3.0
MAX_MODEL_LEN = 2048
KV_CACHE_MB = 256
TORCH_WORKER = ("--backend", "torch", "--kv-cache-mb", str(KV_CACHE_MB))
# Token-valued policy knobs scaled like the lengths.
_SCALED_KNOBS = {
    "bros_min_batched_tokens": PlannerConfig.bros_min_batched_tokens // LENGTH_SCALE,
    "bros_aimd_step_tokens": max(1, PlannerConfig.bros_aimd_step_tokens // LENGTH_SCALE),
    "bros_admit_headroom_tokens": PlannerConfig.bros_admit_headroom_tokens // LENGTH_SCALE,
}
PLANNER = PlannerConfig(max_num_seqs=32, max_num_batched_tokens=2048 // LENGTH_SCALE, **_SCALED_KNOBS)
# The live scheduler gets the knobs as flags; RT is never refused (every policy serves
# every request, so attainment compares like with like).
SCHEDULER_ARGS = (*(a for k, v in _SCALED_KNOBS.items() for a in ("--" + k.replace("_", "-"), str(v))),
                  "--rt-infeasible", "flag")
# The virtual replica's pool: the blocks the live torch worker carves from KV_CACHE_MB for
# SmolLM2-135M in fp32 (30 layers, 3 KV heads of 64; tests/test_cpu_hybrid.py checks the
# model's own config against these).
SMOLLM2_KV_BYTES_PER_SLOT = kv_bytes_per_slot(30, 3, 64, torch.float32)
VIRTUAL = virtual.VirtualConfig(
    num_blocks=num_blocks_for_budget(KV_CACHE_MB * MB, WorkerConfig.block_size, SMOLLM2_KV_BYTES_PER_SLOT),
    sim_cost="smollm2_cpu", max_model_len=MAX_MODEL_LEN,
    overlap_copies=False)  # the torch worker on a CPU copies in line, before the step
MODES = {"live": "cpu-hybrid", "virtual": "cpu-hybrid-virtual"}   # mode -> scenario name
DEFAULT_NUM_SEEDS = {"live": 2, "virtual": 12}


def replica_preset() -> str:
    """The SmolLM2 cost preset fitted on this kind of CPU: the replica models the live run
    on this machine, and an AVX2 CPU's steps cost another shape than an AVX-512 one's
    (worker_svc/sim/cost_model.py)."""
    return "smollm2_cpu" if "-mavx512f" in isa_flags() else "smollm2_cpu_avx2"


def _scaled(reqs: list[workload.Request]) -> list[workload.Request]:
    return [replace(r, prompt_len=max(8, r.prompt_len // LENGTH_SCALE), output_len=max(4, r.output_len // LENGTH_SCALE))
            for r in reqs]


def build(duration_s: float, seed: int, ttft_ms: float, tpot_ms: float,
          be_rate: float = BE_RATE, rt_rate: float = RT_RATE) -> list[workload.Request]:
    rt = _scaled(workload.rt_azure(rt_rate, duration_s, seed, MAX_MODEL_LEN, ttft_ms, tpot_ms))
    be = _scaled(workload.be_requests("poisson", "paper", be_rate, duration_s, seed + 1, MAX_MODEL_LEN))
    return workload.merge(rt, be)


def serve(reqs: list[workload.Request], policy: str, mode: str, step_log: Path | None = None,
          replica: virtual.VirtualConfig = VIRTUAL) -> tuple[BenchMetrics, list]:
    """`policy`'s metrics and every request's record after it served `reqs`, live or in
    virtual time. Live, preemptions and batch size are the worker loop's own counts, and
    the scheduler logs its steps to step_log if given (scheduler_svc/step_log.py)."""
    if mode == "live":
        log_args = ("--step-log", str(step_log)) if step_log is not None else ()
        records, steps = replay_live(reqs, policy, PLANNER, worker_args=TORCH_WORKER,
                                     scheduler_args=(*SCHEDULER_ARGS, *log_args))
        return with_steps(compute(records, []), steps), records
    result = virtual.run(reqs, make_policy(policy), PLANNER, replica)
    if result.stop_reason != "done":
        raise RuntimeError(f"cpu-hybrid-virtual: {policy} stopped early ({result.stop_reason})")
    return compute(result.requests, result.iterations), result.requests


def run_cpu_hybrid(policies: list[str], duration_s: float = 90.0, seed: int = 0, num_seeds: int | None = None,
                   out: Path = Path("bench/out"), mode: str = "live", be_rate: float | None = None,
                   rt_rates: list[float] | None = None, targets_from: str = "2x-p50",
                   step_logs: Path | None = None, sim_cost: str | None = None) -> dict:
    """step_logs: live, a directory where each run's scheduler logs its steps, one file
    per run (<what ran>.jsonl), for `python -m scheduler_svc.bench.fit_cost`. sim_cost:
    virtual, the replica's cost preset (default: the one fitted on this kind of CPU)."""
    name = MODES[mode]
    logs = _StepLogs(step_logs if mode == "live" else None)
    replica = replace(VIRTUAL, sim_cost=sim_cost or replica_preset())
    be_rate = be_rate or BE_RATE
    num_seeds = num_seeds or DEFAULT_NUM_SEEDS[mode]
    rt_rates = list(dict.fromkeys(rt_rates or RT_RATES[mode]))   # a rate named twice is served once
    first = build(duration_s, seed, 1e9, 1e9, be_rate)
    rt_only = [r for r in first if r.service_class == RT]
    _log(f"{name}: measuring RT alone at {RT_RATE:g} req/s ({len(rt_only)} requests)")
    alone, alone_records = serve(rt_only, "fcfs", mode, logs.path(f"rt-alone-rt{RT_RATE:g}-seed{seed}"), replica)
    ttft, tpot = TARGET_RULES[targets_from](alone)
    be_alone = measure_be_alone([r for r in first if r.service_class == BE], mode, name, be_rate,
                                logs.path(f"be-alone-seed{seed}"), replica)
    seeds = list(range(seed, seed + num_seeds))
    # The targets' own run: judged again where it recurs, not served twice.
    targets_run = (seed, against_targets(alone, alone_records, ttft, tpot))
    ttfts = {rate: {p: [] for p in policies} for rate in rt_rates}   # RT TTFTs per rate and policy
    points = [_serve_rate(rate, seeds, policies, mode, ttft, tpot, be_rate, duration_s, targets_run, ttfts[rate],
                          logs, replica)
              for rate in rt_rates]
    config = {"length_scale": LENGTH_SCALE, "targets_from": targets_from, "target_factor": TARGET_FACTOR,
              "targets_rt_rate": RT_RATE,
              "rt_rates": rt_rates, "be_rate": be_rate,
              "max_num_seqs": PLANNER.max_num_seqs, "max_num_batched_tokens": PLANNER.max_num_batched_tokens}
    if mode == "live":
        config.update(scheduler_args=list(SCHEDULER_ARGS), worker_args=list(TORCH_WORKER))
    else:
        config.update(planner_knobs=_SCALED_KNOBS, num_blocks=replica.num_blocks, sim_cost=replica.sim_cost)
    result = {"scenario": name, "mode": mode, "seeds": seeds, "duration_s": duration_s,
              "rt_alone": alone.to_dict(), "be_alone": be_alone,
              "targets_ms": {"ttft": ttft, "tpot": tpot}, "config": config, "points": points}
    _report(result, out, ttfts)
    return result


def _serve_rate(rate: float, seeds: list[int], policies: list[str], mode: str, ttft: float, tpot: float,
                be_rate: float, duration_s: float, targets_run: tuple[int, BenchMetrics],
                ttfts: dict[str, list], logs: _StepLogs, replica: virtual.VirtualConfig) -> dict:
    """One RT rate: each seed's RT requests alone, then every policy on the seed's whole
    workload; the point holds each one's mean over seeds and every run."""
    runs: dict[str, list[dict]] = {p: [] for p in policies}
    alone_runs: list[dict] = []
    for s in seeds:
        reqs = build(duration_s, s, ttft, tpot, be_rate, rate)
        if (s, rate) == (targets_run[0], RT_RATE):
            m = targets_run[1]
        else:
            _log(f"RT {rate:g} req/s, seed {s}: RT alone against the targets")
            m, _ = serve([r for r in reqs if r.service_class == RT], "fcfs", mode,
                         logs.path(f"rt-alone-rt{rate:g}-seed{s}"), replica)
        alone_runs.append({"seed": s, **m.to_dict()})
        _log(f"  RT alone: both {m.rt_attain_both:.3f}")
        for p in policies:
            _log(f"RT {rate:g} req/s, seed {s}, {p} ({len(reqs)} requests, {duration_s:.0f} s of arrivals)")
            m, records = serve(reqs, p, mode, logs.path(f"{p}-rt{rate:g}-seed{s}"), replica)
            runs[p].append({"seed": s, **m.to_dict()})
            ttfts[p] += [r.ttft_ms() for r in records if r.request.service_class == RT]
            _log(f"  {p}: RT both {m.rt_attain_both:.3f}, TTFT p99 {m.rt_ttft_p99_ms:.0f} ms, "
                 f"BE {m.be_tok_s:.1f} tok/s, total {m.total_tok_s:.1f} tok/s")
    return {"rt_rate": rate, "be_rate": be_rate,
            "policies": {p: {**mean_of_runs(rs), "runs": rs} for p, rs in runs.items()},
            "rt_alone": {**mean_of_runs(alone_runs), "runs": alone_runs}}


def against_targets(m: BenchMetrics, records: list, ttft_ms: float, tpot_ms: float) -> BenchMetrics:
    """m, a run's metrics, with its RT attainment judged against these targets (the
    requests ran with none); no other metric depends on them."""
    judged = compute([replace(r, request=replace(r.request, ttft_ms=ttft_ms, tpot_ms=tpot_ms)) for r in records], [])
    return replace(m, rt_attain_ttft=judged.rt_attain_ttft, rt_attain_tpot=judged.rt_attain_tpot,
                   rt_attain_both=judged.rt_attain_both)


def measure_be_alone(be_only: list[workload.Request], mode: str, name: str, be_rate: float,
                     step_log: Path | None = None, replica: virtual.VirtualConfig = VIRTUAL) -> dict:
    """The first seed's BE stream served alone: how busy it keeps the worker (the share of
    the run with a request in the system), so the load the table is measured under is
    stated by the run itself, not assumed."""
    _log(f"{name}: measuring BE alone ({len(be_only)} requests at {be_rate:g} req/s)")
    m, records = serve(be_only, "fcfs", mode, step_log, replica)
    busy = busy_fraction(records)
    _log(f"  BE alone keeps the worker {busy:.0%} busy; {m.be_req_s:.2f} req/s served")
    return {"busy_fraction": busy, **m.to_dict()}


class _StepLogs:
    """Where each live run's step log goes (None: no logs). A file left by an earlier
    invocation is replaced, not appended to."""
    def __init__(self, root: Path | None) -> None:
        self.root = root
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)

    def path(self, run: str) -> Path | None:
        if self.root is None:
            return None
        p = self.root / f"{run}.jsonl"
        p.unlink(missing_ok=True)
        return p


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _report(r: dict, out: Path, ttfts: dict[float, dict[str, list]]) -> None:
    t = r["targets_ms"]
    name = r["scenario"]
    print(f"\n{name}: targets TTFT {t['ttft']:.0f} ms, TPOT {t['tpot']:.0f} ms "
          f"({TARGET_RULE_NAMES[r['config']['targets_from']]} at {r['config']['targets_rt_rate']:g} req/s); "
          f"mean of seeds {r['seeds']}")
    print(f"BE {r['config']['be_rate']:g} req/s, which alone keeps the worker "
          f"{r['be_alone']['busy_fraction']:.0%} busy (seed {r['seeds'][0]})")
    print("| RT req/s | policy | RT both | RT TTFT | RT TPOT | TTFT p99 ms | TPOT p99 ms | RT norm ms | BE req/s "
          "| BE tok/s | total tok/s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for point in r["points"]:
        for policy, m in [*point["policies"].items(), ("RT alone (no BE)", point["rt_alone"])]:
            print(f"| {point['rt_rate']:g} | {policy} | {m['rt_attain_both']:.3f} | {m['rt_attain_ttft']:.3f} | "
                  f"{m['rt_attain_tpot']:.3f} | {m['rt_ttft_p99_ms']:.0f} | {m['rt_tpot_p99_ms']:.0f} | "
                  f"{m['rt_norm_latency_ms']:.1f} | {m['be_req_s']:.2f} | {m['be_tok_s']:.1f} | "
                  f"{m['total_tok_s']:.1f} |")
    rows = check(r)
    if rows:
        print(format_rows(rows))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(json_safe(r), indent=2, allow_nan=False))
    print(f"wrote {out / f'{name}.json'}")
    if not ready():
        return
    rate = RT_RATE if RT_RATE in ttfts else next(iter(ttfts))   # the CDF at the targets' rate if swept
    plot_ttft_cdf(out / f"{name}-ttft-cdf.png", ttfts[rate], t["ttft"], f"{name}: RT TTFT CDF at {rate:g} RT req/s")
    if len(r["points"]) > 1:
        plot_vs_rate(out / f"{name}-vs-rate.png", r["points"], list(r["points"][0]["policies"]), name)
