"""`python -m scheduler_svc.bench`: the hybrid RT + BE benchmark, in virtual time or live.

For each RT rate (sim scenarios: a fraction of the worker's estimated RT capacity;
cpu-hybrid: requests/s, cpu_hybrid.py) every policy serves the same seeded workload, on a
simulated worker in virtual time or on the live stack (cpu-hybrid, sim-scale: their own
modules). Progress goes to stderr; a rate x policy table to stdout; the numbers to
<out>/<scenario>.json; plots, if matplotlib is installed, to <out>/<scenario>-ttft-cdf.png
and <out>/<scenario>-vs-rate.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from scheduler_svc.planner import RT

from .criteria import check, format_rows
from .plots import plot_ttft_cdf, plot_vs_rate, ready
from .metrics import BenchMetrics, json_safe, mean_of_runs
from .scenarios import SCENARIOS, Capacity, PointResult, Scenario, build_workload, capacity, policy_names, run_policy


# Every scenario, in the order `bench` runs them when none is named: virtual ones first.
ALL_SCENARIOS = ["sim-paper", "sim-paper-backlog", "sim-arxiv", "cpu-hybrid-virtual", "sim-scale", "cpu-hybrid"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scheduler_svc.bench", description=__doc__.splitlines()[0])
    p.add_argument("--scenario", choices=ALL_SCENARIOS, default=None,
                   help="one scenario; default: every one, in the order listed")
    p.add_argument("--policies", type=_csv(str), default=None, help="comma-separated; default: all registered")
    p.add_argument("--duration-s", type=float, default=None, help="arrival window in virtual seconds")
    p.add_argument("--rates", type=_csv(float), default=None,
                   help="RT rates as fractions of the estimated RT capacity, e.g. 0.1,0.2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-seeds", type=int, default=None,
                   help="seeds --seed, --seed+1, ...: every policy serves each seed's workload and the "
                        "tables and checks report the mean (default: 1; cpu-hybrid 2 live, 12 virtual)")
    p.add_argument("--out", type=Path, default=Path("bench/out"))
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--sim-cost", default=None,
                   help="cost-model preset, e.g. opt13b_a100_tp2 (cpu-hybrid-virtual: default by this CPU)")
    p.add_argument("--max-model-len", type=int, default=None, help="context window; default: the scenario's")
    p.add_argument("--num-blocks", type=int, default=None, help="KV pool blocks; default: the sim worker's")
    p.add_argument("--rt-ttft-ms", type=_positive, default=None,
                   help="sim scenarios: every RT request's TTFT target (default: the scenario's, 250)")
    p.add_argument("--rt-tpot-ms", type=_positive, default=None,
                   help="sim scenarios: every RT request's TPOT target (default: the scenario's, 100); "
                        "a tighter one makes bros trade BE throughput for RT per-token latency")
    p.add_argument("--bros-admit-headroom-sd", type=float, default=None,
                   help="sim scenarios: bros' admission headroom in standard deviations of finished BE "
                        "output lengths (0: the fixed headroom; default: the planner's)")
    p.add_argument("--overlap-copies", action=argparse.BooleanOptionalAction, default=None,
                   help="sim scenarios: host copies run beside the step on the GPU's copy engine "
                        "(default), or before it (--no-overlap-copies)")
    p.add_argument("--pipeline-depth", type=int, choices=(0, 1), default=None,
                   help="sim scenarios: the loop makes each plan while the step before it runs (1), as "
                        "the scheduler's --pipeline-depth 1, or after its report (0, the default)")
    p.add_argument("--be-rate", type=_positive, default=None,
                   help="cpu-hybrid scenarios: BE requests/s (default: the scenario's; the run reports "
                        "how busy BE alone keeps the worker at that rate)")
    p.add_argument("--rt-rates", type=_csv(_positive), default=None,
                   help="cpu-hybrid scenarios: RT requests/s to sweep, e.g. 0.25,0.5,1.0 (default: 0.5 live; "
                        "0.25,0.5,0.75,1.0 virtual); the targets are measured at 0.5 either way")
    p.add_argument("--targets-from", choices=("2x-p50", "p99"), default=None,
                   help="cpu-hybrid scenarios: the RT targets from the RT-only run, twice its p50 "
                        "(the default) or its p99")
    p.add_argument("--step-logs", type=Path, default=None,
                   help="cpu-hybrid (live): each run's scheduler logs its steps to DIR/<run>.jsonl "
                        "(--step-log), the input of python -m scheduler_svc.bench.fit_cost")
    p.add_argument("--shared-cores", action="store_true",
                   help="sim-scale: the scheduler shares every core with Redis and the workers "
                        "(default: it gets the last core to itself)")
    return p.parse_args(argv)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:   # also refuses nan
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def configure(args: argparse.Namespace, name: str) -> Scenario:
    scn = SCENARIOS[name]
    given = {"duration_s": args.duration_s, "max_num_seqs": args.max_num_seqs,
             "max_num_batched_tokens": args.max_num_batched_tokens, "num_blocks": args.num_blocks,
             "sim_cost": args.sim_cost, "max_model_len": args.max_model_len,
             "rate_fracs": tuple(args.rates) if args.rates else None,
             "bros_admit_headroom_sd": args.bros_admit_headroom_sd, "overlap_copies": args.overlap_copies,
             "pipeline_depth": args.pipeline_depth, "rt_ttft_ms": args.rt_ttft_ms, "rt_tpot_ms": args.rt_tpot_ms}
    return replace(scn, **{k: v for k, v in given.items() if v is not None})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.num_seeds is not None and args.num_seeds < 1:
        sys.exit(f"--num-seeds: must be at least 1, got {args.num_seeds}")
    if args.be_rate is not None and args.scenario not in ("cpu-hybrid", "cpu-hybrid-virtual"):
        sys.exit("--be-rate: only for --scenario cpu-hybrid or cpu-hybrid-virtual "
                 "(the sim scenarios size BE from the worker's capacity)")
    if args.rt_rates is not None and args.scenario not in ("cpu-hybrid", "cpu-hybrid-virtual"):
        sys.exit("--rt-rates: only for --scenario cpu-hybrid or cpu-hybrid-virtual "
                 "(the sim scenarios take --rates, fractions of the worker's RT capacity)")
    if args.targets_from is not None and args.scenario not in ("cpu-hybrid", "cpu-hybrid-virtual"):
        sys.exit("--targets-from: only for --scenario cpu-hybrid or cpu-hybrid-virtual "
                 "(the sim scenarios take --rt-ttft-ms and --rt-tpot-ms)")
    unknown = sorted(set(args.policies or ()) - set(policy_names()))
    if unknown:
        sys.exit(f"--policies: unknown {unknown}; registered: {policy_names()}")
    for name in [args.scenario] if args.scenario else ALL_SCENARIOS:
        run_scenario(name, args)


def run_scenario(name: str, args: argparse.Namespace) -> None:
    policies = args.policies or policy_names()
    if name == "sim-scale":  # live: processes, not the virtual driver
        if (args.num_seeds or 1) > 1:
            sys.exit("--num-seeds: sim-scale runs one seed (it measures the planner, not a workload's luck)")
        from .scale import run_scale
        run_scale(policies, window_s=args.duration_s or 30.0, out=args.out, seed=args.seed,
                  own_core=not args.shared_cores)
        return
    if name in ("cpu-hybrid", "cpu-hybrid-virtual"):  # the real model on this CPU, or its replica
        from .cpu_hybrid import run_cpu_hybrid
        run_cpu_hybrid(policies, duration_s=args.duration_s or 90.0, seed=args.seed, num_seeds=args.num_seeds,
                       out=args.out, mode="live" if name == "cpu-hybrid" else "virtual", be_rate=args.be_rate,
                       rt_rates=args.rt_rates, targets_from=args.targets_from or "2x-p50",
                       step_logs=args.step_logs, sim_cost=args.sim_cost)
        return
    run_sim(configure(args, name), policies, args)


def run_sim(scn: Scenario, policies: list[str], args: argparse.Namespace) -> None:
    cap = capacity(scn)
    seeds = list(range(args.seed, args.seed + (args.num_seeds or 1)))
    _log(f"{scn.name}: {scn.description}; RT targets TTFT {scn.rt_ttft_ms:g} ms, TPOT {scn.rt_tpot_ms:g} ms")
    _log(f"pool {cap.pool_tokens} tokens; capacity RT {cap.rt_req_s:.2f} req/s, BE {cap.be_req_s:.2f} req/s; "
         f"BE load {scn.be_busy * cap.be_req_s:.2f} req/s ({scn.be_arrival}); seeds {seeds}")
    points, ttfts = [], {}
    cdf_frac = scn.rate_fracs[len(scn.rate_fracs) // 2]
    total, done = len(scn.rate_fracs) * len(seeds) * len(policies), 0
    for frac in scn.rate_fracs:
        rate = frac * cap.rt_req_s
        runs: dict[str, list[dict]] = {name: [] for name in policies}
        num_requests, alone = [], []
        for seed in seeds:
            requests = build_workload(scn, cap, rate, scn.duration_s, seed)
            num_requests.append(len(requests))
            alone.append({"seed": seed, **_rt_alone(scn, requests)})
            for name in policies:
                res = run_policy(scn, requests, name)
                done += 1
                _log(f"[{done}/{total}] rate {frac:.2f} ({rate:.3f} req/s) seed {seed} {name}: {_summary(res)}")
                runs[name].append({"seed": seed, **_policy_entry(res)})
                if frac == cdf_frac:
                    ttfts.setdefault(name, []).extend(
                        r.ttft_ms() for r in res.run.requests if r.request.service_class == RT)
        points.append(sim_point(rate, frac, num_requests, runs, alone))
    if len(seeds) > 1:
        print(f"{scn.name}: the mean over seeds {seeds} (each seed's run is in the JSON)")
    print(format_table(points, policies))
    rows = check({"points": points, "seed": seeds[0]})
    if rows:
        print(format_rows(rows))
    write_outputs(args.out, scn, cap, seeds, points, policies, ttfts, cdf_frac)


def _rt_alone(scn: Scenario, requests: list) -> dict:
    """The workload's RT requests served with no BE at all (fcfs): the RT latency a
    policy that also serves BE can approach but not beat by much, so the largest cut
    against fcfs any policy could show at this rate."""
    return _policy_entry(run_policy(scn, [r for r in requests if r.service_class == RT], "fcfs"))


def sim_point(rate: float, frac: float, num_requests: list[int], runs: dict[str, list[dict]],
              alone: list[dict] | None = None) -> dict:
    """One RT rate's results. One seed: each policy's metrics. Several: each policy's
    mean over the seeds (the figures the table and the checks read), with every seed's
    own under "runs"; a seed's workload is the same for every policy. "rt_alone" is
    the same for the workload's RT requests alone (_rt_alone)."""
    point = {"rt_rate": rate, "rt_rate_frac": frac}
    if len(num_requests) == 1:
        point["num_requests"] = num_requests[0]
        point["policies"] = {name: _one(rs) for name, rs in runs.items()}
        if alone:
            point["rt_alone"] = _one(alone)
        return point
    point["seeds"] = [r["seed"] for r in next(iter(runs.values()))]
    point["num_requests"] = num_requests
    point["policies"] = {name: _mean(rs) for name, rs in runs.items()}
    if alone:
        point["rt_alone"] = _mean(alone)
    return point


def _one(runs: list[dict]) -> dict:
    return {k: v for k, v in runs[0].items() if k != "seed"}


def _mean(runs: list[dict]) -> dict:
    return {**mean_of_runs(runs), "stop_reason": _stop_reasons(runs), "runs": runs}


def _stop_reasons(runs: list[dict]) -> str:
    """"done" if every seed's run finished its workload, else each distinct reason."""
    return ",".join(sorted({r["stop_reason"] for r in runs}))


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _summary(res: PointResult) -> str:
    m = res.metrics
    return (f"attain {m.rt_attain_both:.3f}, TTFT p99 {m.rt_ttft_p99_ms:.0f} ms, BE {m.be_tok_s:.0f} tok/s, "
            f"{len(res.run.iterations)} steps, {res.wall_s:.1f} s wall ({res.run.stop_reason})")


def _policy_entry(res: PointResult) -> dict:
    entry = json_safe(res.metrics.to_dict())
    entry.update(stop_reason=res.run.stop_reason, wall_s=res.wall_s, num_iterations=len(res.run.iterations),
                 num_dropped=res.run.num_dropped, num_retries=res.run.num_retries,
                 error_fields=res.run.error_fields, error_examples=res.run.error_examples,
                 end_s=res.run.end_ms / 1e3)
    return entry


_COLUMNS = (("rate", 6), ("req/s", 7), ("policy", 18), ("both", 6), ("ttft", 6), ("tpot", 6),
            ("TTFTp99", 9), ("TPOTp99", 9), ("norm ms", 8), ("BE tok/s", 9), ("tok/s", 8), ("preempt", 8),
            ("unfin", 6), ("stop", 9))


def format_table(points: list[dict], policies: list[str]) -> str:
    lines = ["".join(f"{name:>{w}}" for name, w in _COLUMNS)]
    for pt in points:
        for name in policies:
            m = pt["policies"][name]
            cells = (f"{pt['rt_rate_frac']:.2f}", f"{pt['rt_rate']:.3f}", name,
                     *(_num(m[k], 3) for k in ("rt_attain_both", "rt_attain_ttft", "rt_attain_tpot")),
                     *(_num(m[k], 0) for k in ("rt_ttft_p99_ms", "rt_tpot_p99_ms")),
                     _num(m["rt_norm_latency_ms"], 1), _num(m["be_tok_s"], 0), _num(m["total_tok_s"], 0),
                     _num(m["preemptions"], 0), _num(m["rt_unfinished"] + m["be_unfinished"], 0), m["stop_reason"])
            lines.append("".join(f"{c:>{w}}" for c, (_, w) in zip(cells, _COLUMNS)))
    return "\n".join(lines)


def _num(v, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def write_outputs(out: Path, scn: Scenario, cap: Capacity, seeds: list[int], points: list[dict],
                  policies: list[str], ttfts: dict[str, list[float | None]], cdf_frac: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"scenario": scn.name, "description": scn.description, "seed": seeds[0], "seeds": seeds,
           "config": json_safe({k: v for k, v in vars(scn).items() if k not in ("name", "description")}),
           "capacity": vars(cap), "metric_fields": list(BenchMetrics.__dataclass_fields__), "points": points}
    path = out / f"{scn.name}.json"
    path.write_text(json.dumps(doc, indent=1))
    _log(f"wrote {path}")
    if ready():
        plot_ttft_cdf(out / f"{scn.name}-ttft-cdf.png", ttfts, scn.rt_ttft_ms,
                      f"{scn.name}: RT TTFT CDF at {cdf_frac:.2f} of RT capacity")
        plot_vs_rate(out / f"{scn.name}-vs-rate.png", points, policies, scn.name)


if __name__ == "__main__":
    main()
