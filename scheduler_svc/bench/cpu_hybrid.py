"""The cpu-hybrid scenario (live): the torch worker with the default model on this CPU.

Lengths are the Azure conversation trace's (RT) and the paper's synthetic BE, divided by
LENGTH_SCALE so a step takes CPU time comparable to a GPU step of the original sizes;
rates are set for the CPU's measured speed. The RT targets come from a measured RT-only
run at the same rate: TTFT and TPOT targets are TARGET_FACTOR x its p50, so "meeting the
target" means "as good as alone, within a factor", whatever machine this runs on.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from ..planner import PlannerConfig
from . import workload
from .live import run_live

LENGTH_SCALE = 8
TARGET_FACTOR = 2.0
RT_RATE = 0.5          # req/s
BE_RATE = 1.5          # req/s: with RT, keeps this 2-core CPU busy (measured: ~80% alone)
MAX_MODEL_LEN = 2048
TORCH_WORKER = ("--backend", "torch", "--kv-cache-mb", "256")


def _scaled(reqs: list[workload.Request]) -> list[workload.Request]:
    return [replace(r, prompt_len=max(8, r.prompt_len // LENGTH_SCALE), output_len=max(4, r.output_len // LENGTH_SCALE))
            for r in reqs]


def run_cpu_hybrid(policies: list[str], duration_s: float = 60.0, seed: int = 0,
                   out: Path = Path("bench/out")) -> dict:
    planner = PlannerConfig(max_num_seqs=32, max_num_batched_tokens=256)
    rt = _scaled(workload.rt_azure(RT_RATE, duration_s, seed, MAX_MODEL_LEN, 1e9, 1e9))
    print(f"cpu-hybrid: measuring RT alone ({len(rt)} requests)", file=sys.stderr)
    alone = run_live(rt, "bros", planner, worker_args=TORCH_WORKER)
    ttft, tpot = TARGET_FACTOR * alone.rt_ttft_p50_ms, TARGET_FACTOR * alone.rt_tpot_p50_ms
    rt = [replace(r, ttft_ms=ttft, tpot_ms=tpot) for r in rt]
    be = _scaled(workload.be_requests("poisson", "paper", BE_RATE, duration_s, seed + 1, MAX_MODEL_LEN))
    reqs = workload.merge(rt, be)
    result = {"scenario": "cpu-hybrid", "rt_alone": alone.to_dict(), "targets_ms": {"ttft": ttft, "tpot": tpot},
              "points": [{"rt_rate": RT_RATE, "be_rate": BE_RATE, "policies": {}}]}
    for name in policies:
        print(f"cpu-hybrid: {name} ({len(reqs)} requests, {duration_s:.0f} s)", file=sys.stderr)
        m = run_live(reqs, name, planner, worker_args=TORCH_WORKER)
        result["points"][0]["policies"][name] = m.to_dict()
        print(f"  {name}: RT both {m.rt_attain_both:.3f}, TTFT p99 {m.rt_ttft_p99_ms:.0f} ms, "
              f"BE {m.be_tok_s:.1f} tok/s, total {m.total_tok_s:.1f} tok/s", file=sys.stderr)
    _report(result, out)
    return result


def _report(r: dict, out: Path) -> None:
    t = r["targets_ms"]
    print(f"\ncpu-hybrid: targets TTFT {t['ttft']:.0f} ms, TPOT {t['tpot']:.0f} ms "
          f"({TARGET_FACTOR}x the RT-alone p50)")
    print("| policy | RT both | RT TTFT | RT TPOT | TTFT p99 ms | RT norm ms | BE tok/s | total tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in r["points"][0]["policies"].items():
        print(f"| {name} | {m['rt_attain_both']:.3f} | {m['rt_attain_ttft']:.3f} | {m['rt_attain_tpot']:.3f} | "
              f"{m['rt_ttft_p99_ms']:.0f} | {m['rt_norm_latency_ms']:.1f} | {m['be_tok_s']:.1f} | {m['total_tok_s']:.1f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu-hybrid.json").write_text(json.dumps(r, indent=2))
    print(f"wrote {out / 'cpu-hybrid.json'}")
