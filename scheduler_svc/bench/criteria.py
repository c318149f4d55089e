"""The hybrid benchmark's acceptance checks, read off a scenario's JSON (issue #4):
at each RT rate where fcfs meets the TTFT target for fewer than half of RT requests,
does bros
  - attain both targets for >= 95% of RT requests,
  - cut RT normalised latency by >= 74% against fcfs,
  - keep total token throughput >= 95% of fcfs's,
  - beat priority and partition on RT attainment with no less BE throughput?

`python -m scheduler_svc.bench.criteria bench/out/sim-paper.json` prints one row per
such rate; the benchmark prints the same after its table. A run over several seeds
(--num-seeds) gets a row for each seed where fcfs fails there, then one for the mean
over seeds where fcfs fails on the mean (the ratios of the means, so a seed with a long
fcfs queue weighs more in the latency cut than a mild one). "RT-alone cut" is the cut
the same RT requests would show served with no BE at all: the bound on any policy's;
"RT-alone both" the share of them that would meet both targets then.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

MIN_ATTAIN, MIN_NORM_CUT, MIN_TOTAL_RATIO = 0.95, 0.74, 0.95


def check_point(policies: dict, rt_alone: dict | None = None) -> dict:
    """The checks at one rate; a baseline that was not run is skipped. With the RT
    requests' latency served alone (no BE), also the cut that alone would make against
    fcfs, and the share of them that meets both targets alone: no policy that keeps
    serving BE gets far past either (not checks, bounds)."""
    bros, fcfs = policies["bros"], policies["fcfs"]
    out = {"bros_attain_both": bros["rt_attain_both"],
           "norm_latency_cut": 1 - bros["rt_norm_latency_ms"] / fcfs["rt_norm_latency_ms"],
           "total_tok_s_ratio": bros["total_tok_s"] / fcfs["total_tok_s"]}
    if rt_alone is not None:
        out["rt_alone_norm_latency_cut"] = 1 - rt_alone["rt_norm_latency_ms"] / fcfs["rt_norm_latency_ms"]
        out["rt_alone_attain_both"] = rt_alone["rt_attain_both"]
    ok = {"attain": out["bros_attain_both"] >= MIN_ATTAIN, "norm_cut": out["norm_latency_cut"] >= MIN_NORM_CUT,
          "total": out["total_tok_s_ratio"] >= MIN_TOTAL_RATIO}
    for name in ("priority", "partition"):
        if name in policies:
            other = policies[name]
            out[f"be_tok_s_vs_{name}"] = bros["be_tok_s"] / other["be_tok_s"]
            ok[f"beats_{name}"] = (bros["rt_attain_both"] > other["rt_attain_both"]
                                   and bros["be_tok_s"] >= other["be_tok_s"])
    out["ok"] = ok
    return out


def check(doc: dict) -> list[dict]:
    rows = []
    for pt in doc["points"]:
        pols = pt["policies"]
        alone = pt.get("rt_alone")
        runs = {name: entry["runs"] for name, entry in pols.items() if "runs" in entry}
        if runs:   # several seeds: each seed's own checks, then the mean's
            for i, run in enumerate(next(iter(runs.values()))):
                rows += _row(pt, {name: rs[i] for name, rs in runs.items()},
                             alone["runs"][i] if alone else None, run.get("seed"))
            rows += _row(pt, pols, alone, "mean")
        else:
            rows += _row(pt, pols, alone, doc.get("seed"))
    return rows


def _row(pt: dict, pols: dict, alone: dict | None, seed: int | str | None) -> list[dict]:
    if "bros" not in pols or "fcfs" not in pols or pols["fcfs"]["rt_attain_ttft"] >= 0.5:
        return []
    return [{"rt_rate": pt["rt_rate"], "rt_rate_frac": pt.get("rt_rate_frac"), "seed": seed,
             "fcfs_attain_ttft": pols["fcfs"]["rt_attain_ttft"], **check_point(pols, alone)}]


def format_rows(rows: list[dict]) -> str:
    lines = ["rates where fcfs attains TTFT for < 50% of RT (targets: bros both >= 0.95, norm. latency cut "
             ">= 74%, total >= 95% of fcfs, beats priority/partition with no less BE tok/s):",
             "| RT req/s | seed | fcfs TTFT | bros both | RT-alone both | norm cut | RT-alone cut | total vs fcfs "
             "| BE vs priority | BE vs partition | failed |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        failed = ", ".join(k for k, v in r["ok"].items() if not v) or "none"
        seed = "-" if r.get("seed") is None else r["seed"]
        lines.append(f"| {r['rt_rate']:.3f} | {seed} | {r['fcfs_attain_ttft']:.3f} | {r['bros_attain_both']:.3f} | "
                     f"{_num(r.get('rt_alone_attain_both'))} | {r['norm_latency_cut']:.0%} | "
                     f"{_pct(r.get('rt_alone_norm_latency_cut'), 0)} | {r['total_tok_s_ratio']:.1%} | "
                     f"{_pct(r.get('be_tok_s_vs_priority'))} | {_pct(r.get('be_tok_s_vs_partition'))} | {failed} |")
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}%}"


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"{arg}:\n{format_rows(check(json.loads(Path(arg).read_text())))}")
